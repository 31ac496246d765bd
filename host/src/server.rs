//! `wafer server`: one member of a wafer cluster: state and Raft in the data folder,
//! the Cap'n Proto node interface, the runtime and the HTTP gateway. `wafer dev` runs
//! the same node as a one-node cluster.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::agent::{self, AgentConfig};
use crate::cluster::{Cluster, ClusterError};
use crate::consensus::{LogStore, NetworkFactory, NodeAddr, NodeId, StateMachine};
use crate::functions::Functions;
use crate::gateway::{self, AppState};
use crate::metrics::Metrics;
use crate::rpc::{NodeService, RpcHandle};
use crate::runtime::{Runtime, RuntimeConfig};
use crate::scheduler::{Scheduler, SchedulerConfig};
use crate::state::State;

/// The file in the data folder that names the node it belongs to.
const NODE_FILE: &str = "node.json";
/// The node's redb file: state machine, blobs.
const DB_FILE: &str = "wafer.redb";
/// The Raft log's redb file in the data folder (older versions kept the log in
/// [`DB_FILE`]; it is moved on the first start).
const RAFT_LOG_FILE: &str = "raft-log.redb";
/// How long a starting node waits to catch up with the cluster before serving.
const CATCH_UP_DEADLINE: Duration = Duration::from_secs(20);
/// How long `--join` keeps trying to reach the cluster.
const JOIN_DEADLINE: Duration = Duration::from_secs(120);

/// Raft settings.
#[derive(Debug, Clone)]
pub struct RaftSettings {
    /// Build a snapshot (and compact the log) after this many applied entries.
    pub snapshot_every: u64,
    /// Entries kept in the log behind a snapshot, for followers that lag a little.
    pub keep_logs: u64,
    /// Leader heartbeat interval, ms.
    pub heartbeat_ms: u64,
}

impl Default for RaftSettings {
    fn default() -> RaftSettings {
        RaftSettings {
            snapshot_every: 5000,
            keep_logs: 1000,
            heartbeat_ms: 100,
        }
    }
}

/// How a server becomes a cluster member when its data folder is new.
#[derive(Debug, Clone)]
pub enum Membership {
    /// Start a new one-node cluster.
    Bootstrap,
    /// Ask the cluster member at this Cap'n Proto address to add this node.
    Join(String),
    /// Wait to be added (`wafer cluster add`).
    Wait,
}

/// Settings of a server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Node id, unique in the cluster.
    pub id: NodeId,
    /// Data folder.
    pub data: PathBuf,
    /// Cap'n Proto address; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Gateway address; port 0 picks a free port.
    pub http: SocketAddr,
    /// Address of the public Cap'n Proto API (`capnp/cluster.capnp`).
    pub api: SocketAddr,
    /// How to become a member on first start.
    pub membership: Membership,
    /// Largest module accepted by the gateway, MiB.
    pub max_module_mb: u64,
    /// Runtime settings (the cache folder is set from `data`).
    pub runtime: RuntimeConfig,
    /// Raft settings.
    pub raft: RaftSettings,
    /// Scheduling settings (agent timeout).
    pub scheduler: SchedulerConfig,
    /// Run an agent in this process too (its `servers` are filled in with this
    /// server's address).
    pub agent: Option<AgentConfig>,
    /// Whether the invocation routes are open to callers without a token.
    pub public_invoke: bool,
    /// How long the gateway waits on a silent client (see [`gateway::serve`]).
    pub client_timeout: std::time::Duration,
    /// The secret of the admin token a new cluster starts with (none: a random one).
    pub admin_token: Option<String>,
    /// The secret nodes of this cluster authenticate each other with.
    pub secret: crate::rpc::ClusterSecret,
}

/// A started node.
pub struct Node {
    /// The node's cluster handle.
    pub cluster: Arc<Cluster>,
    /// The node's scheduler.
    pub scheduler: Arc<Scheduler>,
    /// Whether it runs an agent in-process (then it runs invocations itself).
    pub local_agent: bool,
    /// Deployed functions.
    pub functions: Arc<Functions>,
    /// The bound gateway listener.
    pub http: tokio::net::TcpListener,
    /// The API tokens.
    pub tokens: Arc<crate::auth::Tokens>,
    /// Whether the invocation routes are open to callers without a token.
    pub public_invoke: bool,
    /// How long the gateway waits on a silent client.
    pub client_timeout: std::time::Duration,
    /// The node's event stream.
    pub events: Arc<crate::events::Events>,
    /// The public Cap'n Proto API's listener.
    pub api: std::net::TcpListener,
    /// The cluster secret.
    pub secret: crate::rpc::ClusterSecret,
}

/// Checks (or, on first use, writes) the data folder's node id, so that a folder is
/// never used by another node. Answers whether the folder was the node's already.
fn claim_data_folder(data: &Path, id: NodeId) -> anyhow::Result<bool> {
    std::fs::create_dir_all(data)
        .with_context(|| format!("creating data folder {}", data.display()))?;
    let marker = data.join(NODE_FILE);
    let db = data.join(DB_FILE);
    match std::fs::read_to_string(&marker) {
        Ok(text) => {
            let stored: serde_json::Value = serde_json::from_str(&text).with_context(|| {
                format!(
                    "data folder {}: {} is corrupt",
                    data.display(),
                    marker.display()
                )
            })?;
            let stored_id = stored.get("id").and_then(|v| v.as_u64());
            if stored_id != Some(id) {
                anyhow::bail!(
                    "data folder {} belongs to node {}, not node {id}",
                    data.display(),
                    stored_id.map_or("?".to_string(), |i| i.to_string())
                );
            }
            if !db.exists() {
                anyhow::bail!(
                    "data folder {} of node {id} has lost its database {DB_FILE}; restore it from a \
                     backup, or remove the folder and re-add the node with --join",
                    data.display()
                );
            }
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if db.exists() {
                anyhow::bail!(
                    "data folder {} has a database but no {NODE_FILE}: it was written by an older \
                     wafer (before clustering) or is damaged; move it away to start afresh",
                    data.display()
                );
            }
            let text = serde_json::json!({ "id": id }).to_string();
            std::fs::write(&marker, text)
                .with_context(|| format!("writing {}", marker.display()))?;
            Ok(false)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", marker.display())),
    }
}

/// Opens the node's storage, starts Raft and the RPC server, and binds the gateway.
/// The node is not yet a member when this returns; see [`become_member`].
pub async fn start(config: &ServerConfig) -> anyhow::Result<Node> {
    let known_node = claim_data_folder(&config.data, config.id)?;
    let data = config.data.clone();
    let runtime_config = config.runtime.clone();
    let max_module_mb = config.max_module_mb;
    let (state, functions, tokens) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let state = State::open(&data.join(DB_FILE)).with_context(|| {
            format!(
                "the data folder {} is damaged or in use by another process",
                data.display()
            )
        })?;
        let mut runtime = runtime_config;
        runtime.cache_dir = Some(data.join("cache"));
        let runtime = Arc::new(Runtime::new(&runtime)?);
        let functions = Functions::load(state.clone(), runtime, max_module_mb << 20)?;
        let tokens = crate::auth::Tokens::load(state.clone()).context("loading the API tokens")?;
        Ok((state, Arc::new(functions), Arc::new(tokens)))
    })
    .await??;

    let rpc_listener = std::net::TcpListener::bind(config.listen)
        .with_context(|| format!("binding the node RPC address {}", config.listen))?;
    rpc_listener.set_nonblocking(true)?;
    let http = tokio::net::TcpListener::bind(config.http)
        .await
        .with_context(|| format!("binding the gateway to {}", config.http))?;
    let addr = NodeAddr {
        rpc: rpc_listener.local_addr()?.to_string(),
        http: http.local_addr()?.to_string(),
    };

    let api = std::net::TcpListener::bind(config.api)
        .with_context(|| format!("binding the public API to {}", config.api))?;
    api.set_nonblocking(true)?;
    let events = Arc::new(crate::events::Events::new());
    let wakeups = Arc::new(crate::scheduler::Wakeups::default());
    let log_path = config.data.join(RAFT_LOG_FILE);
    if known_node && !log_path.exists() && !LogStore::kept_in(state.database()) {
        anyhow::bail!(
            "data folder {} of node {} has lost its Raft log {RAFT_LOG_FILE}; restore it from a \
             backup, or remove the folder and re-add the node with --join",
            config.data.display(),
            config.id
        );
    }
    let log = LogStore::open_file(&log_path, state.database(), config.id)
        .with_context(|| format!("opening the Raft log {}", log_path.display()))?;
    let durable = log.durable();
    let sm = StateMachine::open(
        state.clone(),
        &config.data.join("snapshots"),
        Arc::new(crate::state::Observers(vec![
            functions.clone(),
            tokens.clone(),
            events.clone(),
            wakeups.clone(),
        ])),
        durable.clone(),
    )
    .context("opening the state machine")?;
    // The functions were loaded from the state as of this index.
    functions.mark_synced(sm.applied_index().context("reading the state machine")?);
    let raft_config = openraft::Config {
        cluster_name: "wafer".into(),
        heartbeat_interval: config.raft.heartbeat_ms,
        election_timeout_min: config.raft.heartbeat_ms * 4,
        election_timeout_max: config.raft.heartbeat_ms * 8,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(config.raft.snapshot_every),
        max_in_snapshot_log_to_keep: config.raft.keep_logs,
        snapshot_max_chunk_size: 1 << 20,
        max_payload_entries: 64,
        ..Default::default()
    }
    .validate()
    .context("Raft settings")?;
    let rpc = RpcHandle::start(config.secret.clone()).context("starting the RPC thread")?;
    let network = NetworkFactory::new(rpc.clone(), durable.clone());
    let config_id = config.id;
    // Raft's tasks run on the RPC thread (openraft spawns them on the runtime it starts
    // on), next to the connections they talk through: a commit then crosses no thread
    // boundary between a peer's message, the Raft core, the log and the answer (each
    // crossing is a wake-up of a sleeping thread, tens of µs on a VM).
    let raft = rpc
        .run(move |_| async move {
            crate::consensus::Raft::new(config_id, Arc::new(raft_config), network, log, sm).await
        })
        .await
        .context("starting Raft on the RPC thread")?
        .context("starting Raft")?;
    events.follow_leader(&raft);
    let cluster = Arc::new(Cluster::new(config.id, addr, raft, rpc.clone(), durable));
    let scheduler = Scheduler::new(
        cluster.clone(),
        state.clone(),
        config.scheduler.clone(),
        wakeups,
    );
    scheduler.start();
    let service = NodeService::new(cluster.clone(), scheduler.clone());
    let serving = rpc.clone();
    let secret = config.secret.clone();
    tokio::spawn(async move {
        if let Err(e) = serving.serve(rpc_listener, service, secret).await {
            tracing::error!(error = %e, "the node RPC server stopped");
        }
    });
    Ok(Node {
        cluster,
        scheduler,
        local_agent: config.agent.is_some(),
        tokens,
        public_invoke: config.public_invoke,
        client_timeout: config.client_timeout,
        events,
        api,
        secret: config.secret.clone(),
        functions,
        http,
    })
}

/// Makes a node with a new data folder a member: bootstraps, joins, or waits.
pub async fn become_member(cluster: &Cluster, membership: &Membership) -> anyhow::Result<()> {
    if cluster.is_member().await {
        return Ok(());
    }
    match membership {
        Membership::Bootstrap => {
            cluster.bootstrap().await?;
            tracing::info!(node = cluster.id(), "bootstrapped a new cluster");
        }
        Membership::Join(addr) => {
            tracing::info!(node = cluster.id(), via = %addr, "joining the cluster");
            cluster
                .join(addr, JOIN_DEADLINE)
                .await
                .with_context(|| format!("joining the cluster through {addr}"))?;
            tracing::info!(node = cluster.id(), "joined the cluster");
        }
        Membership::Wait => {
            tracing::info!(
                node = cluster.id(),
                "waiting to be added with `wafer cluster add`"
            );
        }
    }
    Ok(())
}

/// The file in a bootstrap node's data folder that keeps the cluster's first admin
/// token.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// On the node that started the cluster, when the cluster has no token at all (a new
/// cluster): creates an admin token, from `DATA/admin.token` if it exists, else from
/// `given`, else a random one; keeps it in `DATA/admin.token` (mode 0600). Returns the
/// secret when it made one.
pub async fn bootstrap_admin_token(
    node: &Node,
    data: &Path,
    given: Option<&str>,
) -> anyhow::Result<Option<String>> {
    if !node.tokens.is_empty() {
        return Ok(None);
    }
    let path = data.join(ADMIN_TOKEN_FILE);
    let secret = match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().to_string(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => given
            .map(str::to_string)
            .unwrap_or_else(crate::state::generate_secret),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    crate::state::check_secret(&secret)
        .map_err(|why| anyhow::anyhow!("the admin token ({}): {why}", path.display()))?;
    write_private(&path, &secret)?;
    let committed = node
        .cluster
        .propose(crate::state::Command::CreateToken {
            name: "admin (bootstrap)".into(),
            scopes: [crate::state::Scope::Admin].into(),
            hash: crate::state::hash_token(&secret),
            at_ms: crate::scheduler::now_ms(),
            expires_at_ms: None,
        })
        .await
        .context("creating the admin token")?;
    if let Some(why) = committed.rejection {
        anyhow::bail!("creating the admin token: {why}");
    }
    node.functions
        .wait_synced(committed.index, CATCH_UP_DEADLINE)
        .await;
    Ok(Some(secret))
}

/// Writes `text` to `path`, readable by its owner only.
pub(crate) fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

/// Waits (up to [`CATCH_UP_DEADLINE`]) until this node serves everything the cluster
/// committed before it started: a restarted node re-applies its log and hears from the
/// leader before it answers, so a restart never shows an older state. Without a leader
/// in time it serves what it has, with a warning.
pub async fn catch_up(node: &Node) {
    if !node.cluster.is_member().await {
        return;
    }
    let caught_up = async {
        let index = node.cluster.read_index().await?;
        if node.functions.wait_synced(index, CATCH_UP_DEADLINE).await {
            Ok(index)
        } else {
            Err(ClusterError::Unavailable(format!(
                "functions not ready at index {index}"
            )))
        }
    };
    match tokio::time::timeout(CATCH_UP_DEADLINE, caught_up).await {
        Ok(Ok(index)) => tracing::info!(index, "caught up with the cluster"),
        Ok(Err(e)) => tracing::warn!(error = %e, "serving without catching up with the cluster"),
        Err(_) => {
            tracing::warn!("no leader within {CATCH_UP_DEADLINE:?}; serving without catching up")
        }
    }
}

/// Serves the gateway for `node` until Ctrl-C or SIGTERM, then stops Raft.
pub async fn serve(node: Node) -> anyhow::Result<()> {
    let metrics =
        Metrics::new(node.functions.runtime().metrics()).with_scheduler(node.scheduler.metrics());
    let state = Arc::new(AppState {
        functions: node.functions.clone(),
        cluster: node.cluster.clone(),
        scheduler: node.scheduler.clone(),
        local_agent: node.local_agent,
        next_target: std::sync::atomic::AtomicUsize::new(0),
        metrics,
        tokens: node.tokens.clone(),
        public_invoke: node.public_invoke,
        events: node.events.clone(),
        client_timeout: node.client_timeout,
    });
    // Its own thread: public clients never delay Raft traffic.
    let api_rpc = RpcHandle::start(node.secret.clone()).context("starting the API's RPC thread")?;
    let api_state = state.clone();
    tokio::spawn(async move {
        let served = api_rpc
            .serve_with(node.api, crate::rpc::api::reader_options(), move || {
                move |_peer| {
                    capnp_rpc::new_client::<wafer_proto::cluster_capnp::gateway::Client, _>(
                        crate::rpc::api::GatewayService::new(api_state.clone()),
                    )
                    .client
                }
            })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "the public API stopped");
        }
    });
    // A node whose Raft stopped by itself (a storage error it cannot go on from) can
    // serve nothing that needs the cluster: it exits with the reason, so that whoever
    // supervises it restarts it, and the restart recovers from the data folder.
    let cluster = node.cluster.clone();
    let until = async move {
        tokio::select! {
            () = crate::signals::stopped() => {}
            why = raft_stopped(&cluster) => {
                tracing::error!(error = %why, "Raft stopped; this node exits");
            }
        }
    };
    gateway::serve::serve(
        node.http,
        gateway::app(state),
        gateway::serve::default_workers(),
        node.client_timeout,
        until,
    )
    .await
    .context("serving HTTP")?;
    if let Some(fatal) = node.cluster.raft_stopped() {
        anyhow::bail!(
            "this node's Raft stopped: {fatal}; start the node again to recover from its data folder"
        );
    }
    if let Err(e) = node.cluster.raft().shutdown().await {
        tracing::warn!(error = %e, "stopping Raft");
    }
    Ok(())
}

/// Resolves with the reason once the cluster's local Raft has stopped by itself.
///
/// Waits on the server metrics, which change with the vote, the leader and the
/// membership only and whose sender goes when Raft's core ends: the full metrics change
/// with every commit, and waking this task (on another thread) for each cost the commit
/// path a thread wake-up per message.
async fn raft_stopped(cluster: &Cluster) -> String {
    let mut server_metrics = cluster.raft().server_metrics();
    while server_metrics.changed().await.is_ok() {}
    cluster
        .raft_stopped()
        .unwrap_or_else(|| "Raft ended".into())
}

/// Runs a server until Ctrl-C or SIGTERM.
pub async fn run(config: ServerConfig) -> anyhow::Result<()> {
    let node = start(&config).await?;
    let addr = node.cluster.addr().clone();
    become_member(&node.cluster, &config.membership).await?;
    catch_up(&node).await;
    let admin_token = match config.membership {
        Membership::Bootstrap => {
            bootstrap_admin_token(&node, &config.data, config.admin_token.as_deref()).await?
        }
        _ => None,
    };
    start_agent(&node, config.agent.clone()).await?;
    // The first line on stdout is machine-readable: tests and scripts wait for it. It
    // comes once the node is a member and caught up (or, with --wait, at once).
    say!(
        "wafer server {}: listening on http://{} rpc {} api {}",
        config.id,
        addr.http,
        addr.rpc,
        node.api.local_addr()?
    );
    say!("  data folder: {}", config.data.display());
    if let Some(secret) = admin_token {
        let file = config.data.join(ADMIN_TOKEN_FILE);
        if config.admin_token.as_deref() == Some(secret.as_str()) {
            say!("  admin token: as given (kept in {})", file.display());
        } else {
            say!("  admin token: {secret} (kept in {})", file.display());
        }
    }
    serve(node).await?;
    tracing::info!("wafer server stopped");
    Ok(())
}

/// Starts the in-process agent of `wafer server --agent` (and `wafer dev`), registered
/// through this server, and waits until it is registered. The node's own invocations
/// reach the agent's accelerator backends.
pub async fn start_agent(
    node: &Node,
    agent: Option<AgentConfig>,
) -> anyhow::Result<Option<agent::Agent>> {
    let Some(mut config) = agent else {
        return Ok(None);
    };
    config.servers = vec![node.cluster.addr().rpc.clone()];
    // One runtime per process: the agent runs its work in the server's (which thereby
    // reaches the agent's accelerator backends too).
    config.runtime = Some(node.functions.runtime().clone());
    let mut agent = agent::start(config).await?;
    if node.cluster.is_member().await {
        agent.registered().await?;
        tracing::info!(agent = %agent.id, executor = agent.rpc, "in-process agent registered");
    } else {
        tracing::info!(agent = %agent.id, "the in-process agent registers once this server is a member");
    }
    Ok(Some(agent))
}
