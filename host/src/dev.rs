//! `wafer dev`: a one-node cluster (the same node as `wafer server`) with its data in a
//! local folder and the example functions deployed at start.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::agent::AgentConfig;
use crate::cluster::Cluster;
use crate::functions::Functions;
use crate::rpc::ClusterSecret;
use crate::runtime::RuntimeConfig;
use crate::scheduler::SchedulerConfig;
use crate::server::{self, Membership, RaftSettings, ServerConfig};
use crate::state::{FunctionName, FunctionSpec};

/// How long a deploy waits for this node to serve what it committed.
const SYNC_TIMEOUT: Duration = Duration::from_secs(30);

/// Settings of a dev server.
#[derive(Debug, Clone)]
pub struct DevConfig {
    /// Gateway address; port 0 picks a free port.
    pub http: SocketAddr,
    /// Public Cap'n Proto API address; port 0 picks a free port.
    pub api: SocketAddr,
    /// Data folder (state database and precompiled-code cache).
    pub data: PathBuf,
    /// Folder of example functions (`NAME.wasm`, optional `NAME.json` manifest) to
    /// deploy at start.
    pub examples: Option<PathBuf>,
    /// Largest module accepted, MiB.
    pub max_module_mb: u64,
    /// Runtime settings (the cache folder is set from `data`).
    pub runtime: RuntimeConfig,
    /// What the in-process agent offers.
    pub agent_resources: crate::state::Resources,
    /// Whether the invocation routes are open to callers without a token.
    pub public_invoke: bool,
    /// How long the gateway waits on a silent client.
    pub client_timeout: std::time::Duration,
    /// The admin token's secret at first start (none: a random one).
    pub admin_token: Option<String>,
    /// The cluster secret (none: the one in DATA/cluster.secret, made at first start).
    pub secret: Option<String>,
}

/// The file in the data folder of `wafer dev` that keeps its cluster secret.
pub const SECRET_FILE: &str = "cluster.secret";

/// The dev server's cluster secret: `given`, else the one kept in `data`, else a new
/// one (kept there, mode 0600).
fn dev_secret(data: &Path, given: Option<&str>) -> anyhow::Result<ClusterSecret> {
    if let Some(text) = given {
        return ClusterSecret::new(text).context("--secret");
    }
    std::fs::create_dir_all(data)
        .with_context(|| format!("creating data folder {}", data.display()))?;
    let path = data.join(SECRET_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let text = ClusterSecret::generate();
            server::write_private(&path, &text)?;
            text
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    ClusterSecret::new(&text).with_context(|| format!("the cluster secret in {}", path.display()))
}

/// Deploys every `NAME.wasm` in `dir` (with `NAME.json` as its manifest when present)
/// whose module or manifest differs from what is deployed. Returns the names.
pub async fn deploy_examples(
    functions: &Arc<Functions>,
    cluster: &Cluster,
    dir: &Path,
) -> anyhow::Result<Vec<FunctionName>> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading examples folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "wasm"))
        .collect();
    entries.sort();
    let mut names = Vec::new();
    for path in entries {
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        let name: FunctionName = stem.parse()?;
        let wasm = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let manifest = path.with_extension("json");
        let spec: FunctionSpec = if manifest.exists() {
            let text = std::fs::read_to_string(&manifest)
                .with_context(|| format!("reading {}", manifest.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", manifest.display()))?
        } else {
            FunctionSpec::default()
        };
        let current = functions.get(&name).ok();
        let unchanged = current.is_some_and(|d| {
            d.record.digest == crate::digest::Digest::of(&wasm) && d.record.spec == spec
        });
        if !unchanged {
            let prepare = {
                let functions = functions.clone();
                let name = name.clone();
                tokio::task::spawn_blocking(move || functions.prepare_deploy(&name, &wasm, spec))
            };
            let command = prepare
                .await?
                .with_context(|| format!("deploying example {}", path.display()))?;
            let committed = cluster
                .propose(command)
                .await
                .with_context(|| format!("deploying example {}", path.display()))?;
            if let Some(why) = committed.rejection {
                anyhow::bail!("deploying example {}: {why}", path.display());
            }
            functions.wait_synced(committed.index, SYNC_TIMEOUT).await;
        }
        names.push(name);
    }
    Ok(names)
}

/// Starts an accelerator backend in this process when an OpenCL platform is present,
/// and attaches its devices to `agent`. Answers its address and devices (none: no
/// OpenCL device, or it could not start, which is logged).
async fn start_accel(
    agent: &crate::agent::Agent,
    secret: &ClusterSecret,
) -> Option<(SocketAddr, Vec<crate::accel::DeviceInfoSummary>)> {
    use crate::accel::backend::{Backend, BackendConfig};
    let backend =
        match tokio::task::spawn_blocking(|| Backend::discover(BackendConfig::default())).await {
            Ok(Ok(backend)) => std::sync::Arc::new(backend),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "no accelerators: discovering OpenCL devices failed");
                return None;
            }
            Err(e) => {
                tracing::warn!(error = %e, "no accelerators: discovery did not finish");
                return None;
            }
        };
    let devices = backend.devices();
    if devices.is_empty() {
        return None;
    }
    match backend
        .start(SocketAddr::from(([127, 0, 0, 1], 0)), secret.clone())
        .await
    {
        Ok(addr) => {
            // In-process: the attachment is renewed directly, not over RPC.
            let (link_addr, link_devices) = (addr.to_string(), devices.clone());
            let identity = agent.attach_handle();
            tokio::spawn(async move {
                loop {
                    identity(link_addr.clone(), link_devices.clone());
                    tokio::time::sleep(crate::accel::backend::ATTACH_EVERY).await;
                }
            });
            Some((addr, devices))
        }
        Err(e) => {
            tracing::warn!(error = %e, "no accelerators: the backend did not start");
            None
        }
    }
}

/// Runs the dev server until Ctrl-C or SIGTERM.
pub async fn run(config: DevConfig) -> anyhow::Result<()> {
    let secret = dev_secret(&config.data, config.secret.as_deref())?;
    let server_config = ServerConfig {
        id: 1,
        data: config.data.clone(),
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        http: config.http,
        api: config.api,
        membership: Membership::Bootstrap,
        max_module_mb: config.max_module_mb,
        runtime: config.runtime.clone(),
        raft: RaftSettings::default(),
        scheduler: SchedulerConfig::default(),
        agent: Some(AgentConfig {
            id: None,
            data: config.data.join("agent"),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            servers: Vec::new(),
            resources: config.agent_resources,
            attributes: Default::default(),
            secret: secret.clone(),
            runtime: None,
        }),
        public_invoke: config.public_invoke,
        client_timeout: config.client_timeout,
        admin_token: config.admin_token.clone(),
        secret,
    };
    let node = server::start(&server_config).await?;
    server::become_member(&node.cluster, &server_config.membership).await?;
    server::catch_up(&node).await;
    let new_token =
        server::bootstrap_admin_token(&node, &config.data, config.admin_token.as_deref()).await?;
    let agent = server::start_agent(&node, server_config.agent.clone()).await?;
    let accel = match &agent {
        Some(agent) => start_accel(agent, &server_config.secret).await,
        None => None,
    };
    let examples = match &config.examples {
        Some(dir) => deploy_examples(&node.functions, &node.cluster, dir).await?,
        None => Vec::new(),
    };
    let addr = node.http.local_addr()?;
    // The first line on stdout is machine-readable: tests and scripts wait for it.
    say!(
        "wafer dev: listening on http://{addr} api {}",
        node.api.local_addr()?
    );
    say!("  data folder: {}", config.data.display());
    if crate::gateway::console::built() {
        say!("  console: http://{addr}/ (log in with the admin token)");
    } else {
        say!("  console: not built into this binary (run scripts/console.sh, then build again)");
    }
    let token_file = config.data.join(server::ADMIN_TOKEN_FILE);
    match &new_token {
        Some(secret) => say!(
            "  admin token: {secret} (kept in {}; the CLI reads it from there)",
            token_file.display()
        ),
        None => say!("  admin token: in {}", token_file.display()),
    }
    match &accel {
        Some((accel_addr, devices)) => {
            for d in devices {
                say!(
                    "  accelerator: {} ({}, {}) served on {accel_addr}",
                    d.name,
                    d.vendor,
                    d.kind.as_str()
                );
            }
        }
        None => {
            say!("  accelerators: none (no OpenCL platform; install pocl-opencl-icd for the CPU)")
        }
    }
    for name in &examples {
        say!("  example: http://{addr}/fn/{name}");
    }
    if config.public_invoke {
        say!(
            "  try: curl 'http://{addr}/fn/hello?name=you'   |   wafer --server http://{addr} fns"
        );
    } else {
        say!(
            "  try: curl -H \"Authorization: Bearer $(cat {})\" 'http://{addr}/fn/hello?name=you'   |   wafer --server http://{addr} fns",
            token_file.display()
        );
    }
    tracing::info!(%addr, functions = node.functions.list().len(), "wafer dev ready");
    server::serve(node).await?;
    tracing::info!("wafer dev stopped");
    Ok(())
}
