//! The `wafer` command line: node roles (`dev`, `server`, `agent`), local execution
//! (`run`) and client verbs (`deploy`, `invoke`, `fns`, `rm`, `nodes`, `cluster`).

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::agent::AgentConfig;
use crate::client::{Client, ClientError};
use crate::dev::{self, DevConfig};
use crate::rpc::ClusterSecret;
use crate::runtime::limits::human_bytes;
use crate::runtime::{Exit, Invocation, Limits, Runtime, RuntimeConfig, Stdio};
use crate::scheduler::SchedulerConfig;
use crate::server::{self, Membership, RaftSettings, ServerConfig};
use crate::state::{AgentId, FunctionSpec, Resources};

/// wafer: a WebAssembly serverless compute fabric.
#[derive(Debug, Parser)]
#[command(name = "wafer", version, about, propagate_version = true)]
pub struct Cli {
    /// Server URL for client commands.
    #[arg(
        long,
        global = true,
        env = "WAFER_SERVER",
        default_value = "http://127.0.0.1:8080"
    )]
    server: String,
    /// API token for client commands [default: the admin token of `wafer dev` in
    /// .wafer/dev, when there is one].
    #[arg(long, global = true, env = "WAFER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(subcommand)]
    command: Command,
}

/// Who may call a server's gateway and how long it waits on them, shared by `server`
/// and `dev`.
#[derive(Debug, Clone, clap::Args)]
struct AccessArgs {
    /// Let callers without a token invoke functions (`/fn/...`); everything else still
    /// needs one.
    #[arg(long)]
    public_invoke: bool,
    /// Secret of the admin token a new cluster starts with (at least 16 characters)
    /// [default: a random one, printed and kept in DATA/admin.token].
    #[arg(long, env = "WAFER_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// How long the gateway waits on a silent client, ms: for the first bytes after it
    /// connects, for a request's headers, between requests on a kept-alive connection,
    /// and for more of a request's body (then 408 `request_timeout`).
    #[arg(long, default_value_t = 60_000, value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    client_timeout_ms: u64,
}

impl AccessArgs {
    fn client_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.client_timeout_ms)
    }
}

/// The default data folder of `wafer dev`, where the CLI finds its admin token.
const DEV_DATA: &str = ".wafer/dev";

/// Limits shared by `run` and `deploy`.
#[derive(Debug, clap::Args)]
struct LimitArgs {
    /// Memory limit, MiB [default: 128].
    #[arg(long = "memory", value_name = "MB")]
    memory_mb: Option<u64>,
    /// Wall-clock timeout, ms [default: 10000].
    #[arg(long = "timeout", value_name = "MS")]
    timeout_ms: Option<u64>,
    /// Fuel for each run, about one unit per WebAssembly instruction: the same budget
    /// on every node and every run [default: 0, unmetered].
    #[arg(long = "fuel", value_name = "UNITS")]
    fuel: Option<u64>,
    /// Environment variable for the function (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Accelerator devices each run is granted (0 or 1).
    #[arg(long = "accel", value_name = "N")]
    accel: Option<u64>,
    /// The kind of device asked for: cpu, gpu, accelerator or other [default: any].
    #[arg(long = "accel-type", value_name = "TYPE")]
    accel_type: Option<crate::accel::DeviceType>,
    /// Device memory of the grant, MiB [default: 256].
    #[arg(long = "accel-memory", value_name = "MB")]
    accel_memory_mb: Option<u64>,
}

impl LimitArgs {
    fn apply(&self, spec: &mut FunctionSpec) -> anyhow::Result<()> {
        if let Some(mb) = self.memory_mb {
            spec.limits.memory_mb = mb;
        }
        if let Some(ms) = self.timeout_ms {
            spec.limits.timeout_ms = ms;
        }
        if let Some(units) = self.fuel {
            spec.limits.fuel = units;
        }
        if let Some(n) = self.accel {
            spec.limits.accel = n;
        }
        if let Some(kind) = self.accel_type {
            spec.limits.accel_type = Some(kind);
        }
        if let Some(mb) = self.accel_memory_mb {
            spec.limits.accel_memory_mb = mb;
        }
        for pair in &self.env {
            let (k, v) = pair
                .split_once('=')
                .with_context(|| format!("--env must be KEY=VALUE, got {pair:?}"))?;
            spec.env.insert(k.to_string(), v.to_string());
        }
        Ok(())
    }
}

/// What an agent offers, shared by `agent`, `server --agent` and `dev`.
#[derive(Debug, Clone, clap::Args)]
struct AgentArgs {
    /// Invocation slots (concurrent instances) offered.
    #[arg(long, default_value_t = 16)]
    slots: u64,
    /// Guest memory offered, MiB.
    #[arg(long = "agent-memory", value_name = "MB", default_value_t = 8192)]
    memory_mb: u64,
    /// Accelerator devices offered.
    #[arg(long, default_value_t = 0)]
    accelerators: u64,
    /// Attribute for placement constraints, e.g. `zone=b` (repeatable).
    #[arg(long = "attribute", value_name = "KEY=VALUE")]
    attributes: Vec<String>,
}

impl AgentArgs {
    fn resources(&self) -> Resources {
        Resources {
            slots: self.slots,
            memory_mb: self.memory_mb,
            accelerators: self.accelerators,
        }
    }

    fn attributes(&self) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
        self.attributes
            .iter()
            .map(|pair| {
                pair.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .with_context(|| format!("attributes are KEY=VALUE, got {pair:?}"))
            })
            .collect()
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a single-node server (state, runtime, gateway) with the example functions.
    Dev {
        /// Gateway address (port 0 picks a free one).
        #[arg(long, default_value = "127.0.0.1:8080")]
        http: SocketAddr,
        /// Public Cap'n Proto API address (port 0 picks a free one).
        #[arg(long, default_value = "127.0.0.1:7080")]
        api: SocketAddr,
        /// Data folder; survives restarts.
        #[arg(long, default_value = DEV_DATA)]
        data: PathBuf,
        /// Folder of example functions to deploy at start (`NAME.wasm` + `NAME.json`).
        #[arg(long, default_value = "target/functions")]
        functions: PathBuf,
        /// Do not deploy example functions.
        #[arg(long)]
        no_examples: bool,
        /// Largest module accepted, MiB.
        #[arg(long, default_value_t = 64)]
        max_module_mb: u64,
        /// Most function instances alive at once.
        #[arg(long, default_value_t = 1000)]
        max_instances: u32,
        #[command(flatten)]
        agent: AgentArgs,
        #[command(flatten)]
        access: AccessArgs,
        /// The cluster secret [default: a random one, kept in DATA/cluster.secret].
        #[arg(long, env = "WAFER_CLUSTER_SECRET", hide_env_values = true)]
        secret: Option<String>,
    },
    /// Run a cluster member: Raft state in the data folder, node RPC, gateway.
    Server {
        /// Node id, unique in the cluster.
        #[arg(long)]
        id: u64,
        /// Data folder; survives restarts.
        #[arg(long)]
        data: PathBuf,
        /// Cap'n Proto address for other nodes (port 0 picks a free one).
        #[arg(long, default_value = "127.0.0.1:7070")]
        listen: SocketAddr,
        /// Gateway address (port 0 picks a free one).
        #[arg(long, default_value = "127.0.0.1:8080")]
        http: SocketAddr,
        /// Public Cap'n Proto API address (port 0 picks a free one).
        #[arg(long, default_value = "127.0.0.1:7080")]
        api: SocketAddr,
        /// On first start, join the cluster through this member's --listen address
        /// instead of starting a new cluster.
        #[arg(long, value_name = "ADDR", conflicts_with = "wait")]
        join: Option<String>,
        /// On first start, neither start a cluster nor join one: wait for
        /// `wafer cluster add`.
        #[arg(long)]
        wait: bool,
        /// Largest module accepted, MiB.
        #[arg(long, default_value_t = 64)]
        max_module_mb: u64,
        /// Most function instances alive at once.
        #[arg(long, default_value_t = 1000)]
        max_instances: u32,
        /// Snapshot the state and compact the log after this many entries.
        #[arg(long, default_value_t = 5000)]
        snapshot_every: u64,
        /// Log entries kept behind a snapshot for lagging followers.
        #[arg(long, default_value_t = 1000)]
        keep_logs: u64,
        /// Raft heartbeat interval, ms (elections time out after 4-8 heartbeats).
        #[arg(long, default_value_t = 100)]
        heartbeat_ms: u64,
        /// Mark an agent unreachable after this long without a heartbeat, ms (agents
        /// heartbeat five times as often).
        #[arg(long, default_value_t = 5000)]
        agent_timeout_ms: u64,
        /// How often the leader's scheduler runs a round (checks agents, expires and
        /// makes offers), ms; it also runs one early whenever a job arrives or ends or
        /// resources are freed.
        #[arg(long, default_value_t = 100)]
        scheduler_tick_ms: u64,
        /// Invocation slots the serverless framework leases on each agent; gateways
        /// route invocations to agents under these leases (0: invocations run on the
        /// servers).
        #[arg(long, default_value_t = 4)]
        lease_slots: u64,
        /// Also run an agent in this process (data in DATA/agent).
        #[arg(long)]
        agent: bool,
        /// Executor address of the in-process agent (with --agent).
        #[arg(long, default_value = "127.0.0.1:0")]
        agent_listen: SocketAddr,
        #[command(flatten)]
        agent_args: AgentArgs,
        #[command(flatten)]
        access: AccessArgs,
        /// The cluster secret: every server and agent of the cluster is started with
        /// the same one (at least 16 characters).
        #[arg(long, env = "WAFER_CLUSTER_SECRET", hide_env_values = true)]
        secret: String,
    },
    /// Run an agent: a worker that registers its resources with the cluster and runs
    /// the work placed on it.
    Agent {
        /// Servers' --listen addresses, comma-separated (any one suffices).
        #[arg(long, value_delimiter = ',', required = true)]
        servers: Vec<String>,
        /// Data folder (keeps the agent's id across restarts).
        #[arg(long)]
        data: PathBuf,
        /// Executor address (port 0 picks a free one).
        #[arg(long, default_value = "127.0.0.1:7071")]
        listen: SocketAddr,
        /// Agent id [default: the one in the data folder, else a new one].
        #[arg(long)]
        id: Option<AgentId>,
        #[command(flatten)]
        agent: AgentArgs,
        /// The cluster secret the servers were started with.
        #[arg(long, env = "WAFER_CLUSTER_SECRET", hide_env_values = true)]
        secret: String,
    },
    /// Run an accelerator backend: serve this machine's OpenCL devices (capnp/accel.capnp)
    /// and attach them to an agent, which offers them as `accel` resources.
    Accel {
        /// Address to serve on (port 0 picks a free one).
        #[arg(long, default_value = "127.0.0.1:7090")]
        listen: SocketAddr,
        /// The agent's executor address to attach the devices to.
        #[arg(long)]
        agent: Option<String>,
        /// Address the agent reaches this backend at [default: the --listen address].
        #[arg(long)]
        advertise: Option<String>,
        /// Device memory of a grant that asks for no amount, MiB.
        #[arg(long = "session-memory", value_name = "MB", default_value_t = 256)]
        session_memory_mb: u64,
        /// Most device memory one grant may hold, MiB.
        #[arg(long = "max-session-memory", value_name = "MB", default_value_t = 4096)]
        max_session_memory_mb: u64,
        /// Deadline of one kernel run when the caller sets none, ms.
        #[arg(long = "run-timeout", value_name = "MS", default_value_t = 10_000)]
        run_timeout_ms: u64,
        /// The cluster secret (only peers that know it reach the devices).
        #[arg(long, env = "WAFER_CLUSTER_SECRET", hide_env_values = true)]
        secret: String,
    },
    /// Submit durable jobs and follow them.
    Jobs {
        #[command(subcommand)]
        command: JobsCommand,
    },
    /// List the attempts of the newest jobs: job, attempt, agent, state.
    Tasks {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show the roles' weights and quotas, or set one (`wafer roles set ROLE ...`).
    Roles {
        #[command(subcommand)]
        command: Option<RolesCommand>,
    },
    /// List the agents: capacity, allocated, free, attributes, state.
    Nodes {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Create, list and revoke API tokens (needs an admin token).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Inspect or change the cluster's membership.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Run a WASI command module locally in wafer's sandbox: stdin -> stdout, exit code
    /// passed through.
    Run {
        /// The module.
        file: PathBuf,
        #[command(flatten)]
        limits: LimitArgs,
        /// Compile every time instead of using the precompiled-code cache
        /// (`$XDG_CACHE_HOME/wafer/modules`, else `~/.cache/wafer/modules`).
        #[arg(long)]
        no_cache: bool,
        /// Arguments passed to the module: everything after FILE (like `wasmtime run`),
        /// so wafer's own options go before it; `--` may separate them too.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Deploy (or update) a function.
    Deploy {
        /// Function name.
        name: String,
        /// The module (.wasm).
        file: PathBuf,
        #[command(flatten)]
        limits: LimitArgs,
        /// JSON manifest with limits and env (flags win).
        #[arg(long)]
        manifest: Option<PathBuf>,
    },
    /// Invoke a function and print its response body.
    Invoke {
        /// Function name.
        name: String,
        /// Request body: text, `@FILE`, or `-` for stdin.
        #[arg(long, short)]
        data: Option<String>,
        /// HTTP method [default: POST with --data, else GET].
        #[arg(long, short = 'X')]
        method: Option<String>,
        /// Path below the function, e.g. `/items/1?x=2`.
        #[arg(long, default_value = "/")]
        path: String,
        /// Request header `Name: value` (repeatable).
        #[arg(long = "header", short = 'H')]
        headers: Vec<String>,
        /// Print the status line and headers too.
        #[arg(long, short)]
        include: bool,
    },
    /// Print a function's recent guest logs (stderr and `wafer.log` lines), gathered
    /// from every server of the cluster: each keeps the logs of the invocations its
    /// gateway took.
    Logs {
        /// Function name.
        name: String,
        /// Keep printing logs as new invocations write them (Ctrl-C ends).
        #[arg(long, short)]
        follow: bool,
        /// Invocations to show per server at first (at most 1000).
        #[arg(long, default_value_t = 20)]
        tail: u64,
    },
    /// List deployed functions.
    Fns {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Set or remove labels of a function (metadata; the module is unchanged).
    Label {
        /// Function name.
        name: String,
        /// Labels to set.
        #[arg(value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Label to remove (repeatable).
        #[arg(long = "remove", value_name = "KEY")]
        remove: Vec<String>,
    },
    /// List the versions of a function the cluster keeps for rollbacks (the newest 10).
    Versions {
        /// Function name.
        name: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Make an earlier version of a function current again (as its next version: same
    /// module, limits and environment). Without --to, the version before the current.
    Rollback {
        /// Function name.
        name: String,
        /// The kept version to restore (see `wafer versions NAME`).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        to: Option<u64>,
    },
    /// Remove a function.
    Rm {
        /// Function name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum RolesCommand {
    /// Set a role's weight (its share relative to other roles') and optional quota.
    Set {
        /// The role.
        role: String,
        /// Weight (above 0).
        #[arg(long, default_value_t = 1.0)]
        weight: f64,
        /// Quota: most slots its frameworks may hold together.
        #[arg(long)]
        quota_slots: Option<u64>,
        /// Quota: most memory, MiB (with --quota-slots).
        #[arg(long, requires = "quota_slots")]
        quota_memory: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
enum JobsCommand {
    /// Submit a job: FUNCTION runs once on the input (stdin -> stdout). Prints its id.
    Submit {
        /// Function name.
        function: String,
        /// Input: text, `@FILE`, or `-` for stdin [default: empty].
        #[arg(long, short)]
        data: Option<String>,
        /// Placement constraint `KEY=VALUE` or `KEY!=VALUE` on agent attributes
        /// (repeatable).
        #[arg(long = "constraint", value_name = "KEY=VALUE")]
        constraints: Vec<String>,
        /// Attempts allowed to fail before the job fails.
        #[arg(long, default_value_t = 3)]
        max_attempts: u32,
        /// Grant each attempt an accelerator device (0 or 1) [default: as the
        /// function says].
        #[arg(long, value_name = "N")]
        accel: Option<u64>,
        /// The kind of device: cpu, gpu, accelerator or other [default: any].
        #[arg(long = "accel-type", value_name = "TYPE")]
        accel_type: Option<crate::accel::DeviceType>,
        /// Wait until it ends and print its output.
        #[arg(long)]
        wait: bool,
    },
    /// Show a job: state, reason, attempts, output digest.
    Status {
        /// Job id.
        id: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Wait until a job ends; print its output if it finished (exit 1 otherwise).
    Wait {
        /// Job id.
        id: u64,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Print a finished job's output.
    Output {
        /// Job id.
        id: u64,
    },
    /// Kill a job.
    Kill {
        /// Job id.
        id: u64,
    },
    /// List the newest jobs.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a token and print its secret (shown this once).
    Create {
        /// What it allows: admin, deploy, invoke, read (repeatable or comma-separated).
        #[arg(long = "scope", value_delimiter = ',', required = true)]
        scopes: Vec<crate::state::Scope>,
        /// Name for people.
        #[arg(long, default_value = "")]
        name: String,
        /// Lifetime, e.g. `30s`, `12h`, `7d` [default: until revoked].
        #[arg(long, value_parser = parse_ttl)]
        ttl: Option<u64>,
        /// Print JSON (with the secret as `token`).
        #[arg(long)]
        json: bool,
    },
    /// List tokens: id, name, scopes, expiry (never secrets).
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token: it stops working at once.
    Revoke {
        /// The token's id (from `wafer token list`).
        id: String,
    },
}

/// Runs `wafer token ...`.
async fn token_command(client: &Client, command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::Create {
            scopes,
            name,
            ttl,
            json,
        } => {
            let created = client.create_token(&name, &scopes, ttl).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&created)?);
            } else {
                // The secret alone on stdout, so that `$(wafer token create ...)` works;
                // what it is goes to stderr.
                println!("{}", created["token"].as_str().unwrap_or_default());
                eprintln!(
                    "token {} ({}) created; the secret above is shown only now",
                    created["id"].as_str().unwrap_or("?"),
                    scopes
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                );
            }
        }
        TokenCommand::List { json } => {
            let tokens = client.tokens().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&tokens)?);
                return Ok(());
            }
            let mut table = comfy_table::Table::new();
            table.load_preset(comfy_table::presets::NOTHING);
            table.set_header(["ID", "NAME", "SCOPES", "CREATED", "EXPIRES"]);
            let when = |v: &serde_json::Value| v.as_u64().map_or("never".to_string(), utc_ms);
            for t in tokens["tokens"].as_array().into_iter().flatten() {
                let scopes: Vec<&str> = t["scopes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|s| s.as_str())
                    .collect();
                let mut expires = when(&t["expires_at_ms"]);
                if t["expired"].as_bool() == Some(true) {
                    expires.push_str(" (expired)");
                }
                table.add_row([
                    t["id"].as_str().unwrap_or("?").to_string(),
                    t["name"].as_str().unwrap_or("").to_string(),
                    scopes.join(","),
                    when(&t["created_at_ms"]),
                    expires,
                ]);
            }
            println!("{table}");
        }
        TokenCommand::Revoke { id } => {
            client.revoke_token(&id).await?;
            println!("revoked token {id}");
        }
    }
    Ok(())
}

/// How often `wafer logs --follow` asks for new logs.
const FOLLOW_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// `wafer logs`: function `name`'s logs from every server of the cluster (the one
/// `client` talks to when it cannot say who the others are), oldest first.
async fn logs(client: &Client, name: &str, follow: bool, tail: u64) -> anyhow::Result<()> {
    let servers: Vec<Client> = match client.cluster_status().await {
        Ok(status) if !status.members.is_empty() => status
            .members
            .iter()
            .map(|m| client.at(&member_url(client.base(), &m.http)))
            .collect(),
        _ => vec![client.clone()],
    };
    // Each server's cursor; none until its first answer.
    let mut cursors: Vec<Option<u64>> = vec![None; servers.len()];
    let mut reached_any = false;
    loop {
        let mut entries = Vec::new();
        for (server, cursor) in servers.iter().zip(cursors.iter_mut()) {
            // At first the newest `tail`, then everything after the cursor.
            let limit = if cursor.is_none() {
                tail.min(1000)
            } else {
                1000
            };
            match server.logs(name, *cursor, limit).await {
                Ok(page) => {
                    reached_any = true;
                    *cursor = Some(page.next);
                    entries.extend(page.records.into_iter().map(|e| (page.node, e)));
                }
                // The function itself is unknown or the token lacks the scope: say so.
                Err(e @ ClientError::Api { .. }) => return Err(e.into()),
                Err(e) if cursor.is_none() && !follow => {
                    eprintln!(
                        "wafer: skipping {}: {:#}",
                        server.base(),
                        anyhow::Error::from(e)
                    );
                }
                Err(_) => {}
            }
        }
        if !reached_any {
            anyhow::bail!("no server of the cluster answered");
        }
        entries.sort_by_key(|(node, e)| (e.at_ms, *node, e.seq));
        let mut out = std::io::stdout().lock();
        for (node, entry) in &entries {
            let ran_on = match &entry.agent {
                Some(agent) => format!("node {node} agent {agent}"),
                None => format!("node {node}"),
            };
            let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(entry.at_ms);
            let head = format!(
                "{} {ran_on} v{} {}",
                humantime::format_rfc3339_millis(at),
                entry.version,
                entry.status
            );
            for line in entry.log.lines() {
                writeln!(out, "{head} | {line}")?;
            }
            if entry.dropped > 0 {
                writeln!(
                    out,
                    "{head} | ({} more bytes beyond the log limit)",
                    entry.dropped
                )?;
            }
        }
        out.flush()?;
        drop(out);
        if !follow {
            if entries.is_empty() {
                eprintln!(
                    "no logs of `{name}` yet (servers keep, in memory, what the guests of \
                     the invocations their gateway took wrote to stderr or `wafer.log`)"
                );
            }
            return Ok(());
        }
        tokio::time::sleep(FOLLOW_EVERY).await;
    }
}

/// The URL of a member's gateway at `http` (its listen address), for a client that
/// reached the cluster at `base`: an unspecified host (`0.0.0.0`) is `base`'s host.
fn member_url(base: &str, http: &str) -> String {
    match http.parse::<std::net::SocketAddr>() {
        Ok(addr) if addr.ip().is_unspecified() => {
            let host = reqwest::Url::parse(base)
                .ok()
                .and_then(|url| url.host_str().map(str::to_string))
                .unwrap_or_else(|| "127.0.0.1".to_string());
            format!("http://{host}:{}", addr.port())
        }
        _ => format!("http://{http}"),
    }
}

/// A time in ms since the Unix epoch as UTC (RFC 3339, seconds).
fn utc_ms(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
}

/// Parses a lifetime such as `30s`, `15m`, `12h` or `7d` into seconds.
fn parse_ttl(text: &str) -> Result<u64, String> {
    match humantime::parse_duration(text) {
        Ok(d) if d.as_secs() > 0 => Ok(d.as_secs()),
        Ok(_) => Err("a lifetime must be at least 1s".into()),
        Err(e) => Err(format!("expected a lifetime like 30s, 15m, 12h or 7d: {e}")),
    }
}

/// The token client commands send: `--token`/`WAFER_TOKEN`, else the admin token of
/// `wafer dev` in its default data folder, if there is one.
fn client_token(given: Option<String>) -> Option<String> {
    given.or_else(|| {
        std::fs::read_to_string(Path::new(DEV_DATA).join(server::ADMIN_TOKEN_FILE))
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
    })
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Term, leader, members and log indices, as the server sees them.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Add the node listening at NODE_ADDR (its --listen address): learner, then voter.
    Add {
        /// The node's Cap'n Proto address.
        node_addr: String,
    },
    /// Remove node ID from the cluster.
    Remove {
        /// The node's id.
        id: u64,
    },
}

/// The log filter: `RUST_LOG` (default `info`), with two crates quieted unless it names
/// them. openraft's own info lines are its developers' trace (state dumps at every
/// start); wafer logs what an operator needs to know about Raft itself. wasmtime-wasi
/// opens an info-level span for every WASI call a guest makes (`#[instrument]`):
/// recording them cost a sixth of the gateway's requests/s, for lines nobody reads.
fn log_filter(rust_log: Option<String>) -> tracing_subscriber::EnvFilter {
    let mut directives = rust_log
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "info".into());
    for quiet in ["openraft", "wasmtime_wasi"] {
        if !directives.contains(quiet) {
            directives.push_str(&format!(",{quiet}=warn"));
        }
    }
    tracing_subscriber::EnvFilter::builder().parse_lossy(directives)
}

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Colours only for a terminal: a log written to a file or a pipe stays plain text.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt()
        .with_env_filter(log_filter(std::env::var("RUST_LOG").ok()))
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: starting the async runtime: {err}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            if let Some(ClientError::Api { log: Some(log), .. }) = err.downcast_ref::<ClientError>()
            {
                eprintln!("function log:\n{log}");
            }
            ExitCode::from(1)
        }
    }
}

/// Lets a client command die quietly when its output pipe closes (`wafer fns | head`),
/// as command-line tools do, instead of panicking in `println!`. Daemons (`dev`,
/// `server`, `agent`, `accel`) keep Rust's default (SIGPIPE ignored): a closed socket
/// or stdout is an error to handle, not a reason to die.
fn default_sigpipe() {
    #[cfg(unix)]
    // SAFETY: `signal` only sets the process-wide disposition of SIGPIPE back to the
    // default; it is thread-safe, takes no pointers, and touches no memory Rust owns.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let client = Client::new(&cli.server, client_token(cli.token).as_deref())?;
    if !matches!(
        cli.command,
        Command::Dev { .. }
            | Command::Server { .. }
            | Command::Agent { .. }
            | Command::Accel { .. }
    ) {
        default_sigpipe();
    } else if let Err(err) = crate::signals::install() {
        tracing::warn!(error = %err, "cannot take over SIGINT and SIGTERM");
    }
    match cli.command {
        Command::Dev {
            http,
            api,
            data,
            functions,
            no_examples,
            max_module_mb,
            max_instances,
            agent,
            access,
            secret,
        } => {
            let examples = if no_examples {
                None
            } else if functions.is_dir() {
                Some(functions)
            } else {
                tracing::warn!(
                    folder = %functions.display(),
                    "no example functions found (run scripts/bootstrap.sh to build them)"
                );
                None
            };
            dev::run(DevConfig {
                http,
                api,
                data,
                examples,
                max_module_mb,
                runtime: RuntimeConfig {
                    max_instances,
                    ..RuntimeConfig::default()
                },
                agent_resources: agent.resources(),
                public_invoke: access.public_invoke,
                client_timeout: access.client_timeout(),
                admin_token: access.admin_token,
                secret,
            })
            .await?;
        }
        Command::Server {
            id,
            data,
            listen,
            http,
            api,
            join,
            wait,
            max_module_mb,
            max_instances,
            snapshot_every,
            keep_logs,
            heartbeat_ms,
            agent_timeout_ms,
            scheduler_tick_ms,
            lease_slots,
            agent,
            agent_listen,
            agent_args,
            access,
            secret,
        } => {
            let secret = ClusterSecret::new(&secret).context("--secret")?;
            let agent = if agent {
                Some(AgentConfig {
                    id: None,
                    data: data.join("agent"),
                    listen: agent_listen,
                    servers: Vec::new(),
                    resources: agent_args.resources(),
                    attributes: agent_args.attributes()?,
                    secret: secret.clone(),
                    runtime: None,
                })
            } else {
                None
            };
            let membership = match (join, wait) {
                (Some(addr), _) => Membership::Join(addr),
                (None, true) => Membership::Wait,
                (None, false) => Membership::Bootstrap,
            };
            server::run(ServerConfig {
                id,
                data,
                listen,
                http,
                api,
                membership,
                max_module_mb,
                runtime: RuntimeConfig {
                    max_instances,
                    ..RuntimeConfig::default()
                },
                raft: RaftSettings {
                    snapshot_every,
                    keep_logs,
                    heartbeat_ms,
                },
                scheduler: SchedulerConfig {
                    agent_timeout: std::time::Duration::from_millis(agent_timeout_ms.max(50)),
                    tick: std::time::Duration::from_millis(scheduler_tick_ms.max(1)),
                    lease_slots,
                    ..SchedulerConfig::default()
                },
                agent,
                public_invoke: access.public_invoke,
                client_timeout: access.client_timeout(),
                admin_token: access.admin_token,
                secret,
            })
            .await?;
        }
        Command::Agent {
            servers,
            data,
            listen,
            id,
            agent,
            secret,
        } => {
            crate::agent::run(AgentConfig {
                id,
                data,
                listen,
                servers,
                resources: agent.resources(),
                attributes: agent.attributes()?,
                secret: ClusterSecret::new(&secret).context("--secret")?,
                runtime: None,
            })
            .await?;
        }
        Command::Accel {
            listen,
            agent,
            advertise,
            session_memory_mb,
            max_session_memory_mb,
            run_timeout_ms,
            secret,
        } => {
            crate::accel::backend::run(crate::accel::backend::AccelConfig {
                listen,
                advertise,
                agent,
                secret: ClusterSecret::new(&secret).context("--secret")?,
                backend: crate::accel::backend::BackendConfig {
                    default_session_memory: session_memory_mb << 20,
                    max_session_memory: max_session_memory_mb << 20,
                    default_timeout: std::time::Duration::from_millis(run_timeout_ms.max(1)),
                    ..Default::default()
                },
            })
            .await?;
        }
        Command::Jobs { command } => return jobs_command(&client, command).await,
        Command::Token { command } => token_command(&client, command).await?,
        Command::Roles { command: None } => {
            let roles = client.roles().await?;
            let list = roles["roles"].as_array().cloned().unwrap_or_default();
            if list.is_empty() {
                println!("no roles configured (every role has weight 1 and no quota)");
            }
            for role in list {
                println!(
                    "{}: weight {}, quota {}",
                    role["name"].as_str().unwrap_or("?"),
                    role["weight"],
                    if role["quota"].is_null() {
                        "none".to_string()
                    } else {
                        role["quota"].to_string()
                    }
                );
            }
        }
        Command::Roles {
            command:
                Some(RolesCommand::Set {
                    role,
                    weight,
                    quota_slots,
                    quota_memory,
                }),
        } => {
            let quota = quota_slots.map(|slots| Resources {
                slots,
                memory_mb: quota_memory.unwrap_or(u64::MAX),
                accelerators: u64::MAX,
            });
            let stored = client.set_role(&role, weight, quota).await?;
            println!("{stored}");
        }
        Command::Tasks { json } => {
            let tasks = client.tasks().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&tasks)?);
            } else if tasks.is_empty() {
                println!("no tasks");
            } else {
                let mut table = comfy_table::Table::new();
                table.load_preset(comfy_table::presets::NOTHING);
                table.set_header(["JOB", "ATTEMPT", "FUNCTION", "AGENT", "STATE", "REASON"]);
                let text = |v: &serde_json::Value| match v {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Null => String::new(),
                    other => other.to_string(),
                };
                for t in &tasks {
                    table.add_row([
                        text(&t["job"]),
                        text(&t["attempt"]),
                        text(&t["function"]),
                        text(&t["agent"]),
                        text(&t["state"]),
                        text(&t["reason"]),
                    ]);
                }
                println!("{table}");
            }
        }
        Command::Nodes { json } => {
            let agents = client.nodes().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&agents)?);
            } else if agents.is_empty() {
                println!("no agents registered");
            } else {
                let mut table = comfy_table::Table::new();
                table.load_preset(comfy_table::presets::NOTHING);
                table.set_header([
                    "AGENT",
                    "STATE",
                    "SLOTS (FREE/ALL)",
                    "MEMORY (FREE/ALL)",
                    "ACCEL",
                    "ATTRIBUTES",
                    "EXECUTOR",
                ]);
                for a in agents {
                    let r = &a.record;
                    table.add_row([
                        r.id.to_string(),
                        format!("{:?}", r.state).to_lowercase(),
                        format!("{}/{}", a.free.slots, r.resources.slots),
                        format!("{}/{} MiB", a.free.memory_mb, r.resources.memory_mb),
                        format!("{}/{}", a.free.accelerators, r.resources.accelerators),
                        r.attributes
                            .iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect::<Vec<_>>()
                            .join(","),
                        r.rpc.clone(),
                    ]);
                }
                println!("{table}");
            }
        }
        Command::Cluster { command } => return cluster_command(&client, command).await,
        Command::Run {
            file,
            limits,
            no_cache,
            args,
        } => {
            let cache_dir = if no_cache { None } else { user_cache_dir() };
            return run_local(&file, &limits, cache_dir, &args).await;
        }
        Command::Deploy {
            name,
            file,
            limits,
            manifest,
        } => {
            let mut spec = match manifest {
                Some(path) => {
                    let text = std::fs::read_to_string(&path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    serde_json::from_str(&text)
                        .with_context(|| format!("parsing {}", path.display()))?
                }
                None => FunctionSpec::default(),
            };
            limits.apply(&mut spec)?;
            let wasm =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let bar = indicatif::ProgressBar::new(wasm.len() as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "uploading {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_message(name.clone());
            let progress = bar.clone();
            let result = client
                .deploy(&name, wasm, &spec, move |sent| progress.set_position(sent))
                .await;
            bar.finish_and_clear();
            let record = result?;
            println!(
                "deployed {} version {} ({}, {} bytes)",
                record.name, record.version, record.digest, record.size
            );
        }
        Command::Invoke {
            name,
            data,
            method,
            path,
            headers,
            include,
        } => {
            let body = match data.as_deref() {
                None => Vec::new(),
                Some(d) => read_data(d)?,
            };
            let method = match method {
                Some(m) => reqwest::Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                    .with_context(|| format!("invalid method {m:?}"))?,
                None if data.is_some() => reqwest::Method::POST,
                None => reqwest::Method::GET,
            };
            let headers = headers
                .iter()
                .map(|h| {
                    h.split_once(':')
                        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                        .with_context(|| format!("header must be `Name: value`, got {h:?}"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let response = client.invoke(&name, method, &path, &headers, body).await?;
            let mut out = std::io::stdout().lock();
            if include {
                writeln!(out, "HTTP {}", response.status)?;
                for (k, v) in &response.headers {
                    writeln!(out, "{}: {}", k, String::from_utf8_lossy(v.as_bytes()))?;
                }
                writeln!(out)?;
            }
            out.write_all(&response.body)?;
            out.flush()?;
            if !response.status.is_success() {
                return Ok(ExitCode::from(1));
            }
        }
        Command::Fns { json } => {
            let functions = client.list().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&functions)?);
            } else if functions.is_empty() {
                println!("no functions deployed");
            } else {
                let mut table = comfy_table::Table::new();
                table.load_preset(comfy_table::presets::NOTHING);
                table.set_header(["NAME", "VERSION", "SIZE", "MEMORY", "TIMEOUT", "DIGEST"]);
                for f in functions {
                    table.add_row([
                        f.name.to_string(),
                        f.version.to_string(),
                        human_bytes(f.size),
                        format!("{} MiB", f.spec.limits.memory_mb),
                        format!("{} ms", f.spec.limits.timeout_ms),
                        f.digest.short(),
                    ]);
                }
                println!("{table}");
            }
        }
        Command::Logs { name, follow, tail } => logs(&client, &name, follow, tail).await?,
        Command::Label { name, set, remove } => {
            let set = set
                .iter()
                .map(|pair| {
                    pair.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .with_context(|| format!("labels are KEY=VALUE, got {pair:?}"))
                })
                .collect::<anyhow::Result<std::collections::BTreeMap<_, _>>>()?;
            let record = client.label(&name, &set, &remove).await?;
            let labels: Vec<String> = record
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            println!(
                "{} labels: {}",
                record.name,
                if labels.is_empty() {
                    "(none)".to_string()
                } else {
                    labels.join(", ")
                }
            );
        }
        Command::Versions { name, json } => {
            let versions = client.versions(&name).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&versions)?);
            } else {
                let current = versions.last().map(|v| v.version);
                let mut table = comfy_table::Table::new();
                table.load_preset(comfy_table::presets::NOTHING);
                table.set_header([
                    "VERSION", "DEPLOYED", "SIZE", "MEMORY", "TIMEOUT", "DIGEST", "",
                ]);
                for v in &versions {
                    let mut note = Vec::new();
                    if Some(v.version) == current {
                        note.push("current".to_string());
                    }
                    if let Some(from) = v.restored_from {
                        note.push(format!("rollback to {from}"));
                    }
                    table.add_row([
                        v.version.to_string(),
                        utc_ms(v.deployed_at_ms),
                        human_bytes(v.size),
                        format!("{} MiB", v.spec.limits.memory_mb),
                        format!("{} ms", v.spec.limits.timeout_ms),
                        v.digest.short(),
                        note.join(", "),
                    ]);
                }
                println!("{table}");
            }
        }
        Command::Rollback { name, to } => {
            let record = client.rollback(&name, to).await?;
            println!(
                "{} is now version {} (the module and spec of version {}, {})",
                record.name,
                record.version,
                record
                    .restored_from
                    .map_or("?".to_string(), |v| v.to_string()),
                record.digest.short()
            );
        }
        Command::Rm { name } => {
            client.remove(&name).await?;
            println!("removed {name}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn cluster_command(client: &Client, command: ClusterCommand) -> anyhow::Result<ExitCode> {
    match command {
        ClusterCommand::Status { json } => {
            let status = client.cluster_status().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
                return Ok(ExitCode::SUCCESS);
            }
            let index = |i: Option<u64>| i.map_or("-".to_string(), |i| i.to_string());
            println!("node:    {} ({})", status.id, status.state);
            println!(
                "leader:  {}",
                status
                    .leader_id
                    .map_or("none".to_string(), |l| l.to_string())
            );
            println!("term:    {}", status.term);
            println!(
                "log:     last {}, applied {}, snapshot {}, purged {}",
                index(status.last_log_index),
                index(status.applied_index),
                index(status.snapshot_index),
                index(status.purged_index)
            );
            let mut table = comfy_table::Table::new();
            table.load_preset(comfy_table::presets::NOTHING);
            table.set_header(["ID", "ROLE", "RPC", "HTTP"]);
            for m in &status.members {
                let role = if Some(m.id) == status.leader_id {
                    "leader"
                } else if m.voter {
                    "voter"
                } else {
                    "learner"
                };
                table.add_row([
                    m.id.to_string(),
                    role.to_string(),
                    m.rpc.clone(),
                    m.http.clone(),
                ]);
            }
            println!("{table}");
        }
        ClusterCommand::Add { node_addr } => {
            let id = client.cluster_add(&node_addr).await?;
            println!("added node {id} ({node_addr}) as a voter");
        }
        ClusterCommand::Remove { id } => {
            client.cluster_remove(id).await?;
            println!("removed node {id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `wafer run`: the module in wafer's sandbox with the host's stdio.
/// The per-user folder for precompiled modules of `wafer run`.
fn user_cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    let dir = base.join("wafer").join("modules");
    // An unwritable cache only costs compile time; run without it.
    std::fs::create_dir_all(&dir).is_ok().then_some(dir)
}

async fn run_local(
    file: &PathBuf,
    limit_args: &LimitArgs,
    cache_dir: Option<PathBuf>,
    args: &[String],
) -> anyhow::Result<ExitCode> {
    let wasm = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let mut spec = FunctionSpec::default();
    limit_args.apply(&mut spec)?;
    let limits: Limits = spec.limits;
    let runtime = Runtime::new(&RuntimeConfig {
        pooling: false,
        cache_dir,
        ..RuntimeConfig::default()
    })?;
    let prepared = runtime.prepare(&crate::runtime::to_binary(&wasm)?, &limits)?;
    let program = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "main.wasm".into());
    let mut argv = vec![program];
    argv.extend(args.iter().cloned());
    let outcome = runtime
        .invoke(
            &prepared,
            &limits,
            Invocation {
                args: argv,
                env: spec.env.into_iter().collect(),
                stdio: Stdio::Inherit,
            },
        )
        .await?;
    let _ = std::io::stdout().flush();
    Ok(match outcome.exit {
        Exit::Code(code) => ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1)),
        Exit::Timeout => {
            eprintln!("error: timed out after {} ms", limits.timeout_ms);
            ExitCode::from(124)
        }
        Exit::MemoryLimit => {
            eprintln!("error: memory limit of {} MiB exceeded", limits.memory_mb);
            ExitCode::from(137)
        }
        Exit::ResponseTooLarge => ExitCode::from(1),
        Exit::OutOfFuel => {
            eprintln!("error: used all of its fuel ({} units)", limits.fuel);
            ExitCode::from(134)
        }
        Exit::Trap(message) => {
            eprintln!("error: trapped: {message}");
            ExitCode::from(134)
        }
    })
}

/// A `--data` argument's bytes: text, `@FILE`, or `-` for stdin.
fn read_data(data: &str) -> anyhow::Result<Vec<u8>> {
    Ok(match data {
        "-" => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("reading stdin")?;
            buf
        }
        d if d.starts_with('@') => {
            std::fs::read(&d[1..]).with_context(|| format!("reading {}", &d[1..]))?
        }
        d => d.as_bytes().to_vec(),
    })
}

/// `wafer jobs ...`.
async fn jobs_command(client: &Client, command: JobsCommand) -> anyhow::Result<ExitCode> {
    match command {
        JobsCommand::Submit {
            function,
            data,
            constraints,
            max_attempts,
            accel,
            accel_type,
            wait,
        } => {
            let input = match data {
                Some(data) => read_data(&data)?,
                None => Vec::new(),
            };
            let mut request = serde_json::json!({
                "function": function,
                "constraints": constraints,
                "max_attempts": max_attempts,
            });
            if let Some(n) = accel {
                request["accel"] = n.into();
            }
            if let Some(kind) = accel_type {
                request["accel_type"] = kind.as_str().into();
            }
            match String::from_utf8(input) {
                Ok(text) => request["input"] = text.into(),
                Err(bytes) => {
                    use base64::Engine;
                    request["input_base64"] = base64::engine::general_purpose::STANDARD
                        .encode(bytes.into_bytes())
                        .into();
                }
            }
            let job = client.submit_job(&request).await?;
            if wait {
                eprintln!("job {} submitted; waiting", job.id);
                return wait_job(client, job.id.0, std::time::Duration::from_secs(600)).await;
            }
            println!("{}", job.id);
        }
        JobsCommand::Status { id, json } => {
            let job = client.job(id, None).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&job)?);
            } else {
                print_job(&job);
            }
        }
        JobsCommand::Wait { id, timeout } => {
            return wait_job(client, id, std::time::Duration::from_secs(timeout)).await;
        }
        JobsCommand::Output { id } => {
            let output = client.job_output(id).await?;
            std::io::stdout().write_all(&output)?;
        }
        JobsCommand::Kill { id } => {
            let job = client.kill_job(id).await?;
            println!("job {} {}", job.id, job.state);
        }
        JobsCommand::List { json } => {
            let jobs = client.jobs().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&jobs)?);
            } else if jobs.is_empty() {
                println!("no jobs");
            } else {
                let mut table = comfy_table::Table::new();
                table.load_preset(comfy_table::presets::NOTHING);
                table.set_header(["JOB", "FUNCTION", "STATE", "ATTEMPTS", "REASON"]);
                for job in jobs {
                    table.add_row([
                        job.id.to_string(),
                        job.function.to_string(),
                        job.state.to_string(),
                        job.attempts.len().to_string(),
                        job.reason.clone().unwrap_or_default(),
                    ]);
                }
                println!("{table}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Waits for job `id` to end (showing progress on stderr), prints its output if it
/// finished; exit 1 if it did not.
async fn wait_job(
    client: &Client,
    id: u64,
    timeout: std::time::Duration,
) -> anyhow::Result<ExitCode> {
    let spinner = indicatif::ProgressBar::new_spinner();
    spinner.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    let until = std::time::Instant::now() + timeout;
    let job = loop {
        let left = until.saturating_duration_since(std::time::Instant::now());
        let job = client
            .job(id, Some(left.min(std::time::Duration::from_secs(10))))
            .await?;
        spinner.set_message(format!(
            "job {id}: {}{}",
            job.state,
            job.reason
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        ));
        if job.state.is_terminal() || std::time::Instant::now() >= until {
            break job;
        }
    };
    spinner.finish_and_clear();
    if job.state == crate::state::TaskState::Finished {
        let output = client.job_output(id).await?;
        std::io::stdout().write_all(&output)?;
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "job {id} is {}{}",
            job.state,
            job.reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        );
        Ok(ExitCode::from(1))
    }
}

fn print_job(job: &crate::state::JobRecord) {
    println!("job {}: {} ({})", job.id, job.state, job.function);
    if let Some(reason) = &job.reason {
        println!("  reason: {reason}");
    }
    if !job.constraints.is_empty() {
        let c: Vec<String> = job.constraints.iter().map(|c| c.to_string()).collect();
        println!("  constraints: {}", c.join(", "));
    }
    for a in &job.attempts {
        println!(
            "  attempt {} on {}: {}{}",
            a.number,
            a.agent,
            a.state,
            a.reason
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        );
    }
    if let Some(output) = &job.output {
        println!(
            "  output: {} bytes, {} (attempt {})",
            output.size,
            output.digest.short(),
            output.attempt
        );
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    /// The file and guest arguments `wafer run` parses from `argv`.
    fn run_args(argv: &[&str]) -> (String, Vec<String>, Option<u64>) {
        let cli = super::Cli::try_parse_from(argv).expect("parses");
        match cli.command {
            super::Command::Run {
                file, args, limits, ..
            } => (file.display().to_string(), args, limits.memory_mb),
            _ => panic!("not `run`"),
        }
    }

    #[test]
    fn run_passes_everything_after_the_file_to_the_guest() {
        let owned = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (file, args, _) = run_args(&["wafer", "run", "f.wasm", "x", "-y", "--memory", "1"]);
        assert_eq!(file, "f.wasm");
        assert_eq!(args, owned(&["x", "-y", "--memory", "1"]));
        let (_, args, memory) = run_args(&["wafer", "run", "--memory", "16", "f.wasm", "--", "a"]);
        assert_eq!((args, memory), (owned(&["a"]), Some(16)));
        let (_, args, _) = run_args(&["wafer", "run", "f.wasm"]);
        assert!(args.is_empty());
    }
    #[test]
    fn the_log_filter_quiets_chatty_crates_unless_rust_log_names_them() {
        let shown = |v: Option<&str>| super::log_filter(v.map(String::from)).to_string();
        let default = shown(None);
        for part in ["info", "openraft=warn", "wasmtime_wasi=warn"] {
            assert!(default.contains(part), "{default}");
        }
        assert!(shown(Some("debug")).contains("wasmtime_wasi=warn"));
        let named = shown(Some("info,wasmtime_wasi=trace"));
        assert!(
            named.contains("wasmtime_wasi=trace") && !named.contains("wasmtime_wasi=warn"),
            "{named}"
        );
    }
}
