//! The allocator alone (no Raft, no agents, no network): placements per second and
//! allocation-round latency with many simulated agents, using
//! `wafer::scheduler::simulation` (frameworks in weighted roles with endless queues of
//! one-slot tasks that run for 1-6 rounds).

use wafer::scheduler::simulation::{self, SimConfig};
use wafer::state::Resources;

/// Options of the allocator benchmark.
#[derive(Debug, Clone, clap::Args)]
pub struct AllocatorArgs {
    /// Numbers of simulated agents.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    pub agents: Vec<usize>,
    /// Allocation rounds per configuration.
    #[arg(long, default_value_t = 200)]
    pub rounds: u64,
}

/// The target: placements per second.
const TARGET: f64 = 10_000.0;

/// Runs the benchmark and prints a Markdown table.
pub fn run(args: &AllocatorArgs) -> anyhow::Result<()> {
    println!(
        "## Allocator: weighted DRF offers and accepts, {} rounds, 3 frameworks (weights 1:2:1), agents of 16 slots, tasks of 1 slot",
        args.rounds
    );
    println!();
    println!("| agents | placements | placements/s | vs target (10,000/s) | offers/s | round p50 | round p99 | overcommitted |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---|");
    for &agents in &args.agents {
        let report = simulation::run(&SimConfig {
            agents,
            agent: Resources::new(16, 16 * 1024),
            weights: vec![1.0, 2.0, 1.0],
            task: Resources::new(1, 256),
            rounds: args.rounds,
            max_task_rounds: 6,
            seed: 1,
        });
        if report.overcommitted {
            anyhow::bail!("the allocator overcommitted an agent with {agents} agents");
        }
        let rate = report.placements_per_sec();
        println!(
            "| {agents} | {} | {rate:.0} | {:.1}x | {:.0} | {:.2} ms | {:.2} ms | no |",
            report.placements,
            rate / TARGET,
            report.offers as f64 / report.deciding.as_secs_f64().max(1e-9),
            report.round_quantile(0.5).as_secs_f64() * 1e3,
            report.round_quantile(0.99).as_secs_f64() * 1e3,
        );
    }
    println!();
    Ok(())
}
