//! `wafer agent`: a worker node. It registers its resources (slots, memory,
//! accelerators, attributes) and the attempts it runs with the cluster through any
//! server, heartbeats to the leader (following it across leader changes; the answers
//! list the attempts placed on it), registers again when the leader no longer knows it
//! as active, and serves `Executor` (launch, kill) for the work placed on it
//! (`worker.rs`). `wafer server --agent` and `wafer dev` run one in the same process.

mod worker;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rand::Rng;
use wafer_proto::node_capnp::executor;

use crate::accel::client::AccelLink;
use crate::cluster::ClusterError;
use crate::rpc::{read_failure, read_launch, write_agent_info, AgentInfo, RpcError, RpcHandle};
use crate::runtime::{Runtime, RuntimeConfig};
use crate::scheduler::serverless::AgentLoad;
use crate::scheduler::LaunchSpec;
use crate::state::{read_task_ref, write_task_ref, AgentId, Resources, TaskRef};
use worker::Worker;

const AGENT_FILE: &str = "agent.json";
/// Pause between registration attempts while no server answers.
const RETRY_PAUSE: Duration = Duration::from_millis(250);

/// Settings of an agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Its id; `None` uses the one in the data folder, or makes one up on first start.
    pub id: Option<AgentId>,
    /// Data folder (its id; later, cached modules and task output).
    pub data: PathBuf,
    /// Address of its `Executor` (port 0 picks a free one).
    pub listen: SocketAddr,
    /// Servers' `--listen` addresses (any one suffices; the others are tried in turn).
    pub servers: Vec<String>,
    /// What it offers.
    pub resources: Resources,
    /// Attributes for placement constraints.
    pub attributes: BTreeMap<String, String>,
    /// The cluster secret (presented to servers; asked of whoever calls the executor).
    pub secret: crate::rpc::ClusterSecret,
    /// The runtime to run work in: an in-process agent shares its server's (one
    /// engine, pool and code cache per process). `None`: the agent builds its own, with
    /// its code cache in DATA/cache.
    pub runtime: Option<Arc<Runtime>>,
}

/// Where an agent's registration stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Registration {
    /// Not (or no longer) registered: registering.
    Pending,
    /// Registered and heartbeating.
    Registered,
    /// The cluster refused the registration (bad attributes, say): the agent stops.
    Refused(String),
}

/// A running agent.
pub struct Agent {
    /// Its id.
    pub id: AgentId,
    /// Its executor's address.
    pub rpc: String,
    /// Its accelerator backends.
    pub accel: AccelLink,
    identity: Arc<Identity>,
    registration: tokio::sync::watch::Receiver<Registration>,
}

impl Agent {
    /// A function that attaches a backend's devices to this agent (as
    /// `Executor.attachAccel` does for a remote backend); call it again to renew.
    pub fn attach_handle(
        &self,
    ) -> impl Fn(String, Vec<crate::accel::DeviceInfoSummary>) + Send + Sync + 'static {
        let identity = self.identity.clone();
        move |addr, devices| identity.attach(addr, devices)
    }

    /// Waits until the cluster has committed the agent's registration; fails if the
    /// cluster refused it.
    pub async fn registered(&mut self) -> anyhow::Result<()> {
        let state = self
            .registration
            .wait_for(|r| *r != Registration::Pending)
            .await
            .map(|r| r.clone())
            .map_err(|_| anyhow::anyhow!("the agent stopped before it registered"))?;
        match state {
            Registration::Refused(why) => {
                anyhow::bail!("the cluster refused agent {}: {why}", self.id)
            }
            _ => Ok(()),
        }
    }
}

/// Reads the agent's id from its data folder, or stores `wanted` (or a new id) there.
fn claim_id(data: &Path, wanted: Option<&AgentId>) -> anyhow::Result<AgentId> {
    std::fs::create_dir_all(data)
        .with_context(|| format!("creating data folder {}", data.display()))?;
    let file = data.join(AGENT_FILE);
    match std::fs::read_to_string(&file) {
        Ok(text) => {
            let stored: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is corrupt", file.display()))?;
            let id: AgentId = stored
                .get("id")
                .and_then(|v| v.as_str())
                .context("no id")
                .and_then(|s| Ok(s.parse()?))
                .with_context(|| format!("{} is corrupt", file.display()))?;
            if let Some(wanted) = wanted {
                if *wanted != id {
                    anyhow::bail!(
                        "data folder {} belongs to agent {id}, not {wanted}",
                        data.display()
                    );
                }
            }
            Ok(id)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = match wanted {
                Some(id) => id.clone(),
                None => format!("agent-{:08x}", rand::rng().random::<u32>()).parse()?,
            };
            std::fs::write(&file, serde_json::json!({ "id": id }).to_string())
                .with_context(|| format!("writing {}", file.display()))?;
            Ok(id)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", file.display())),
    }
}

/// Starts an agent: serves its executor and keeps it registered in the background.
pub async fn start(config: AgentConfig) -> anyhow::Result<Agent> {
    if config.servers.is_empty() {
        anyhow::bail!("an agent needs at least one server address (--servers)");
    }
    let id = claim_id(&config.data, config.id.as_ref())?;
    let listener = std::net::TcpListener::bind(config.listen)
        .with_context(|| format!("binding the executor address {}", config.listen))?;
    listener.set_nonblocking(true)?;
    let rpc_addr = listener.local_addr()?.to_string();
    let info = AgentInfo {
        id: id.clone(),
        rpc: rpc_addr.clone(),
        resources: config.resources,
        attributes: config.attributes.clone(),
    };
    let rpc = RpcHandle::start(config.secret.clone()).context("starting the RPC thread")?;
    let accel = AccelLink::new(rpc.clone());
    let (info_tx, info_rx) = tokio::sync::watch::channel(info.clone());
    let identity = Arc::new(Identity {
        base: info.clone(),
        info: info_tx,
        link: accel.clone(),
    });
    let runtime = match config.runtime.clone() {
        Some(shared) => shared,
        None => {
            let cache = config.data.join("cache");
            let runtime = tokio::task::spawn_blocking(move || {
                Runtime::new(&RuntimeConfig {
                    // Pooled instances, as on servers: invocations routed here under a
                    // lease are latency-bound, and on-demand allocation mmaps and unmaps
                    // each instance's memory and stack (TLB shoot-downs on every core),
                    // ~4x the CPU per call.
                    cache_dir: Some(cache),
                    ..RuntimeConfig::default()
                })
            })
            .await??;
            Arc::new(runtime)
        }
    };
    runtime.set_accel(accel.clone());
    let worker = Worker::new(id.clone(), rpc.clone(), config.servers.clone(), runtime);
    let service = ExecutorService {
        identity: identity.clone(),
        worker: worker.clone(),
    };
    let serving = rpc.clone();
    let secret = config.secret.clone();
    tokio::spawn(async move {
        let served = serving
            .serve_with(listener, crate::state::reader_options(), move || {
                let executor = capnp_rpc::new_client::<executor::Client, _>(service);
                move |peer| {
                    crate::rpc::door::DoorService::agent(executor.clone(), secret.clone(), peer)
                        .client
                }
            })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "the executor RPC server stopped");
        }
    });
    tokio::spawn(withdraw_lapsed_devices(Arc::downgrade(&identity)));
    let (registration_tx, registration) = tokio::sync::watch::channel(Registration::Pending);
    tokio::spawn(keep_registered(
        rpc,
        info_rx,
        config.servers,
        worker,
        registration_tx,
    ));
    Ok(Agent {
        id,
        rpc: rpc_addr,
        accel,
        identity,
        registration,
    })
}

/// `wafer agent`: starts, waits to be registered, prints its ready line, runs until
/// SIGINT or SIGTERM.
pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    let data = config.data.clone();
    let servers = config.servers.join(", ");
    let mut agent = start(config).await?;
    tracing::info!(agent = %agent.id, servers, "registering with the cluster");
    agent.registered().await?;
    // The first line on stdout is machine-readable: tests and scripts wait for it.
    say!(
        "wafer agent {}: registered; executor rpc {}",
        agent.id,
        agent.rpc
    );
    say!("  data folder: {}", data.display());
    crate::signals::stopped().await;
    tracing::info!("wafer agent stopped");
    Ok(())
}

/// Registers through any server, then heartbeats to the leader until told to
/// register again. Runs until the process ends.
async fn keep_registered(
    rpc: RpcHandle,
    mut infos: tokio::sync::watch::Receiver<AgentInfo>,
    servers: Vec<String>,
    worker: Arc<Worker>,
    registration: tokio::sync::watch::Sender<Registration>,
) {
    let mut next = 0usize;
    let server = |i: usize| servers[i % servers.len()].clone();
    loop {
        let info = infos.borrow_and_update().clone();
        // Register through whichever server answers.
        let mut warned = false;
        let interval = loop {
            let via = server(next);
            match register(&rpc, &via, &info, worker.running()).await {
                Ok(interval) => {
                    tracing::info!(agent = %info.id, via, "registered");
                    break interval;
                }
                Err(ClusterError::Rejected(why)) => {
                    tracing::error!(agent = %info.id, error = why, "the cluster refused this agent");
                    registration.send_replace(Registration::Refused(why));
                    return;
                }
                Err(e) => {
                    if !warned {
                        tracing::warn!(agent = %info.id, via, error = %e, "registering; retrying");
                        warned = true;
                    }
                    next += 1;
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
            }
        };
        registration.send_replace(Registration::Registered);
        // Heartbeat to the leader, starting with the server that took the registration.
        let mut target = server(next);
        let mut warned = false;
        loop {
            match heartbeat(&rpc, &target, &info.id, worker.take_load()).await {
                Ok((false, _)) if infos.has_changed().unwrap_or(false) => {
                    tracing::info!(agent = %info.id, "its devices changed: registering again");
                    break;
                }
                Ok((false, assigned)) => {
                    warned = false;
                    // Attempts younger than two heartbeats may not be in the leader's
                    // answer yet: they are not stopped.
                    worker.reconcile(assigned, interval * 2);
                    // A change of devices ends the wait: register again at once.
                    let changed = tokio::select! {
                        _ = tokio::time::sleep(interval) => false,
                        changed = infos.changed() => match changed {
                            Ok(()) => true,
                            // Nothing can change any more: just wait.
                            Err(_) => {
                                tokio::time::sleep(interval).await;
                                false
                            }
                        },
                    };
                    if changed {
                        tracing::info!(agent = %info.id, "its devices changed: registering again");
                        break;
                    }
                }
                Ok((true, _)) => {
                    tracing::info!(agent = %info.id, "the leader asks this agent to register again");
                    registration.send_replace(Registration::Pending);
                    break;
                }
                Err(ClusterError::NotLeader {
                    leader: Some((_, leader)),
                }) if leader.rpc != target => {
                    target = leader.rpc;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => {
                    if !warned {
                        tracing::warn!(agent = %info.id, server = target, error = %e, "heartbeat failed; trying another server");
                        warned = true;
                    }
                    next += 1;
                    target = server(next);
                    tokio::time::sleep(interval / 2).await;
                }
            }
        }
    }
}

/// Registers `info` (running `running`) through the server at `addr`; returns the
/// heartbeat interval.
async fn register(
    rpc: &RpcHandle,
    addr: &str,
    info: &AgentInfo,
    running: Vec<TaskRef>,
) -> Result<Duration, ClusterError> {
    let (addr, info) = (addr.to_string(), info.clone());
    rpc.run(move |peers| async move {
        let (node, _) = peers.get(&addr).await?;
        let transport = |e: capnp::Error| ClusterError::from(RpcError::from_capnp(&addr, e));
        let mut request = node.register_agent_request();
        write_agent_info(request.get().init_agent(), &info);
        let mut list = request.get().init_running(running.len() as u32);
        for (i, task) in running.iter().enumerate() {
            write_task_ref(list.reborrow().get(i as u32), task);
        }
        let reply = request.send().promise.await.map_err(|e| {
            peers.forget(&addr);
            transport(e)
        })?;
        let r = reply.get().map_err(transport)?;
        if r.has_failure() {
            return Err(read_failure(r.get_failure().map_err(transport)?).map_err(transport)?);
        }
        Ok(Duration::from_millis(u64::from(
            r.get_heartbeat_ms().max(10),
        )))
    })
    .await?
}

/// Heartbeats to the server at `addr`; answers whether to register again, and the
/// attempts placed on this agent.
async fn heartbeat(
    rpc: &RpcHandle,
    addr: &str,
    agent: &AgentId,
    load: AgentLoad,
) -> Result<(bool, Vec<LaunchSpec>), ClusterError> {
    let (addr, agent) = (addr.to_string(), agent.clone());
    rpc.run(move |peers| async move {
        let (node, _) = peers.get(&addr).await?;
        let transport = |e: capnp::Error| ClusterError::from(RpcError::from_capnp(&addr, e));
        let mut request = node.heartbeat_request();
        request.get().set_agent(agent.as_str());
        let count = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
        request.get().set_busy_slots(count(load.slots));
        request.get().set_accel_busy(count(load.accelerators));
        let reply = request.send().promise.await.map_err(|e| {
            peers.forget(&addr);
            transport(e)
        })?;
        let r = reply.get().map_err(transport)?;
        if r.has_failure() {
            return Err(read_failure(r.get_failure().map_err(transport)?).map_err(transport)?);
        }
        let mut assigned = Vec::new();
        if r.has_assigned() {
            for launch in r.get_assigned().map_err(transport)? {
                assigned.push(read_launch(launch).map_err(transport)?);
            }
        }
        Ok((r.get_reregister(), assigned))
    })
    .await?
}

/// What the agent registers: its configured capacity and attributes, plus the devices
/// of the accelerator backend attached to it.
struct Identity {
    base: AgentInfo,
    info: tokio::sync::watch::Sender<AgentInfo>,
    link: AccelLink,
}

impl Identity {
    fn attach(&self, addr: String, devices: Vec<crate::accel::DeviceInfoSummary>) {
        if self.link.attach(addr, devices.clone()) {
            self.info.send_replace(with_devices(&self.base, &devices));
        }
    }
}

/// How often the agent checks that its accelerator backend still renews its attachment.
const LAPSE_CHECK: Duration = Duration::from_secs(1);

/// Withdraws the devices of a backend whose attachment lapsed (it died or lost its
/// connection): the agent registers again without them, so they are no longer offered.
/// A backend that attaches again brings them back. Ends with the agent.
async fn withdraw_lapsed_devices(identity: std::sync::Weak<Identity>) {
    let mut tick = tokio::time::interval(LAPSE_CHECK);
    loop {
        tick.tick().await;
        let Some(identity) = identity.upgrade() else {
            return;
        };
        // Checked under the lock of `info`, which a re-attaching backend's devices
        // also take after it renewed: its devices are never overwritten by a stale
        // "lapsed".
        let withdrawn = identity.info.send_if_modified(|info| {
            let lapsed = *info != identity.base && identity.link.attached().is_none();
            if lapsed {
                *info = identity.base.clone();
            }
            lapsed
        });
        if withdrawn {
            tracing::warn!(
                "the accelerator backend stopped renewing its attachment: its devices are withdrawn"
            );
        }
    }
}

/// `base` with `devices` as its accelerators: their number, and attributes
/// `accel.type` (the best type: gpu, then accelerator, then cpu), `accel.vendor`,
/// `accel.name` and `accel.memory_mb` of that device, and `accel.TYPE` (how many of
/// each type).
fn with_devices(base: &AgentInfo, devices: &[crate::accel::DeviceInfoSummary]) -> AgentInfo {
    use crate::accel::DeviceType;
    let mut info = base.clone();
    if devices.is_empty() {
        return info;
    }
    info.resources.accelerators = devices.len() as u64;
    let rank = |t: DeviceType| match t {
        DeviceType::Gpu => 0,
        DeviceType::Accelerator => 1,
        DeviceType::Cpu => 2,
        DeviceType::Other => 3,
    };
    if let Some(best) = devices.iter().min_by_key(|d| rank(d.kind)) {
        let attrs = &mut info.attributes;
        attrs.insert(
            crate::accel::ACCEL_TYPE_ATTRIBUTE.into(),
            best.kind.as_str().into(),
        );
        attrs.insert(
            "accel.vendor".into(),
            best.vendor.chars().take(128).collect(),
        );
        attrs.insert("accel.name".into(), best.name.chars().take(128).collect());
        attrs.insert(
            "accel.memory_mb".into(),
            (best.global_memory >> 20).to_string(),
        );
    }
    for device in devices {
        let key = format!("accel.{}", device.kind.as_str());
        let count = info
            .attributes
            .get(&key)
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
        info.attributes.insert(key, (count + 1).to_string());
    }
    info
}

/// The agent's `Executor` capability.
struct ExecutorService {
    identity: Arc<Identity>,
    worker: Arc<Worker>,
}

impl executor::Server for ExecutorService {
    async fn info(
        self: Rc<Self>,
        _: executor::InfoParams,
        mut results: executor::InfoResults,
    ) -> Result<(), capnp::Error> {
        write_agent_info(results.get().init_agent(), &self.identity.info.borrow());
        Ok(())
    }

    async fn attach_accel(
        self: Rc<Self>,
        params: executor::AttachAccelParams,
        _: executor::AttachAccelResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let addr = p.get_address()?.to_string()?;
        let mut devices = Vec::new();
        for device in p.get_devices()? {
            devices.push(crate::accel::backend::read_device(device)?.0);
        }
        self.identity.attach(addr, devices);
        Ok(())
    }

    async fn launch(
        self: Rc<Self>,
        params: executor::LaunchParams,
        _: executor::LaunchResults,
    ) -> Result<(), capnp::Error> {
        let spec = read_launch(params.get()?.get_task()?)?;
        self.worker.launch(spec);
        Ok(())
    }

    async fn kill(
        self: Rc<Self>,
        params: executor::KillParams,
        _: executor::KillResults,
    ) -> Result<(), capnp::Error> {
        self.worker.kill(&read_task_ref(params.get()?.get_task()?));
        Ok(())
    }

    async fn run(
        self: Rc<Self>,
        params: executor::RunParams,
        mut results: executor::RunResults,
    ) -> Result<(), capnp::Error> {
        let (module, limits, invocation) = crate::rpc::remote::read_run(params.get()?)?;
        match self.worker.invoke(module, limits, invocation).await {
            Ok(outcome) => {
                crate::rpc::remote::write_outcome(results.get().init_outcome(), &outcome)
            }
            Err(worker::RunError::Busy(why)) => {
                let mut r = results.get();
                r.set_busy(true);
                r.set_error(why.as_str());
            }
            Err(worker::RunError::Failed(why)) => results.get().set_error(why.as_str()),
        }
        Ok(())
    }
}
