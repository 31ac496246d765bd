//! An allocator-only simulation (no Raft, no agents): many agents, frameworks in
//! weighted roles with endless queues of small tasks, tasks that finish after a few
//! rounds. The benchmark measures placements per second with it, and tests check
//! fairness and the capacity invariant.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use super::{Allocator, AllocatorConfig};
use crate::state::{AgentId, FrameworkId, Resources, RoleName};

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Number of agents.
    pub agents: usize,
    /// Capacity of each agent.
    pub agent: Resources,
    /// Frameworks: each in its own role of the given weight.
    pub weights: Vec<f64>,
    /// What one task uses.
    pub task: Resources,
    /// Allocation rounds.
    pub rounds: u64,
    /// A task runs for 1 to this many rounds.
    pub max_task_rounds: u64,
    /// Seed of the random task lengths.
    pub seed: u64,
}

/// What a simulation measured.
#[derive(Debug, Clone)]
pub struct SimReport {
    /// Tasks placed.
    pub placements: u64,
    /// Offers made and accepted (each places one or more tasks on one agent).
    pub offers: u64,
    /// Time spent deciding (offers, accepts, releases), not the simulation's own
    /// bookkeeping.
    pub deciding: Duration,
    /// Duration of each allocation round (offers to every free agent and the
    /// frameworks' accepts), in round order.
    pub rounds: Vec<Duration>,
    /// Each framework's mean dominant share over the second half of the rounds.
    pub mean_shares: Vec<f64>,
    /// Whether any agent ever held more than its capacity.
    pub overcommitted: bool,
}

impl SimReport {
    /// Placements per second of deciding time.
    pub fn placements_per_sec(&self) -> f64 {
        self.placements as f64 / self.deciding.as_secs_f64().max(1e-9)
    }

    /// The `q` quantile (0-1) of round durations.
    pub fn round_quantile(&self, q: f64) -> Duration {
        let mut sorted = self.rounds.clone();
        sorted.sort();
        let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
        sorted.get(i).copied().unwrap_or_default()
    }
}

/// Runs a simulation.
pub fn run(config: &SimConfig) -> SimReport {
    let mut rng = rand::rngs::StdRng::seed_from_u64(config.seed);
    let mut allocator = Allocator::new(AllocatorConfig::default());
    for i in 0..config.agents {
        let id: AgentId = match format!("agent-{i:06}").parse() {
            Ok(id) => id,
            Err(_) => continue,
        };
        allocator.add_agent(id, config.agent, BTreeMap::new());
    }
    let mut frameworks = Vec::new();
    for (i, weight) in config.weights.iter().enumerate() {
        let (Ok(id), Ok(role)) = (
            format!("framework-{i}").parse::<FrameworkId>(),
            format!("role-{i}").parse::<RoleName>(),
        ) else {
            continue;
        };
        allocator.set_role(role.clone(), *weight, None);
        allocator.add_framework(id.clone(), role);
        frameworks.push(id);
    }
    // Allocations ending at each round: (framework, agent, resources).
    let mut ending: BTreeMap<u64, Vec<(FrameworkId, AgentId, Resources)>> = BTreeMap::new();
    let mut report = SimReport {
        placements: 0,
        offers: 0,
        deciding: Duration::ZERO,
        rounds: Vec::with_capacity(config.rounds as usize),
        mean_shares: vec![0.0; frameworks.len()],
        overcommitted: false,
    };
    let start = Instant::now();
    let mut measured_rounds = 0u64;
    for round in 0..config.rounds {
        let now = start + Duration::from_millis(100 * round);
        let finished = ending.remove(&round).unwrap_or_default();
        let began = Instant::now();
        for (framework, agent, resources) in &finished {
            allocator.release(framework, agent, resources);
        }
        let offers = allocator.make_offers(now);
        let mut accepted = Vec::with_capacity(offers.len());
        for offer in offers {
            let tasks = offer.resources.count_of(&config.task);
            let used = config.task.times(tasks);
            if let Ok(accept) = allocator.accept(offer.id, &offer.framework, used) {
                allocator.settle(accept.id);
                allocator.allocate(&accept.framework, &accept.agent, &accept.resources);
                report.placements += tasks;
                report.offers += 1;
                accepted.push(accept);
            }
        }
        let took = began.elapsed();
        report.deciding += took;
        report.rounds.push(took);
        for accept in accepted {
            let ends = round + rng.random_range(1..=config.max_task_rounds.max(1));
            ending.entry(ends).or_default().push((
                accept.framework,
                accept.agent,
                accept.resources,
            ));
        }
        if !allocator.overcommitted().is_empty() {
            report.overcommitted = true;
        }
        if round >= config.rounds / 2 {
            measured_rounds += 1;
            for share in allocator.shares() {
                if let Some(i) = frameworks.iter().position(|f| *f == share.framework) {
                    report.mean_shares[i] += share.dominant_share;
                }
            }
        }
    }
    for share in &mut report.mean_shares {
        *share /= measured_rounds.max(1) as f64;
    }
    report
}
