//! The scheduler that runs on every server and acts on the leader: it takes agents'
//! heartbeats (kept in the leader's memory only), marks agents that fall silent
//! unreachable through Raft, keeps the allocator in step with the replicated state,
//! makes offers, and runs the built-in jobs framework on them (placing jobs with
//! `LaunchJob` commands, then telling the agents). A new leader gives every active
//! agent a full timeout before it judges it, so heartbeats that went to the old leader
//! are never held against an agent.
//!
//! Rounds run every tick, and also early (at most one per [`EARLY_ROUND_GAP`]) on the
//! leader when it applies a change that can make room or work: a job submitted or
//! ended, resources released, an agent joining or lost ([`Wakeups`]). A job then waits
//! for commits, not for the next tick.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::jobs::{self, JobsFramework, LaunchSpec};
use super::serverless::{self, AgentLoad, ServerlessFramework};
use super::{Allocator, AllocatorConfig, SchedulerMetrics, Share};
use crate::cluster::{Cluster, ClusterError};
use crate::digest::Digest;
use crate::rpc::framework::{self as callbacks, TaskStatusInfo};
use crate::rpc::{write_launch, RpcError};
use crate::state::{
    AgentId, AgentRecord, AgentState, Command, CommandResponse, FrameworkId, FunctionName, JobId,
    JobRecord, Observer, Rejection, Resources, RoleName, SchedulingView, State, TaskRef, TaskState,
    TaskUpdate,
};

/// Least time between the start of one round and an early one (see [`Wakeups`]): bounds
/// the rounds, each of which reads the scheduling state, while changes pour in.
pub const EARLY_ROUND_GAP: Duration = Duration::from_millis(5);

/// Settings of the scheduler.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// An agent not heard from for this long is marked unreachable.
    pub agent_timeout: Duration,
    /// How often the leader checks agents and makes offers.
    pub tick: Duration,
    /// Invocation slots the serverless framework leases on each agent (0: none).
    pub lease_slots: u64,
    /// Settings of the allocator.
    pub allocator: AllocatorConfig,
}

impl Default for SchedulerConfig {
    fn default() -> SchedulerConfig {
        SchedulerConfig {
            agent_timeout: Duration::from_secs(5),
            tick: Duration::from_millis(100),
            lease_slots: 4,
            allocator: AllocatorConfig::default(),
        }
    }
}

impl SchedulerConfig {
    /// How often agents heartbeat: five times per timeout.
    pub fn heartbeat_interval(&self) -> Duration {
        self.agent_timeout / 5
    }
}

/// Milliseconds since the Unix epoch, for the times commands carry.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// An agent as `GET /v1/nodes` shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct AgentView {
    /// The replicated record.
    #[serde(flatten)]
    pub record: AgentRecord,
    /// Capacity not allocated.
    pub free: Resources,
    /// When the leader last heard the agent's heartbeat, ms since the Unix epoch (only
    /// the leader knows; absent elsewhere or before the first heartbeat).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_ms: Option<u64>,
}

/// The leader's in-memory scheduling state.
struct Inner {
    /// The term this node leads in (none while it does not lead).
    term: Option<u64>,
    /// When each active agent was last heard from (or given a fresh timeout).
    heartbeats: HashMap<AgentId, Instant>,
    /// When each agent's heartbeat last arrived here, ms since the Unix epoch.
    heard_ms: HashMap<AgentId, u64>,
    /// Agents being marked unreachable (the proposal is in flight).
    marking: HashSet<AgentId>,
    allocator: Allocator,
    /// The applied index the view was read at.
    synced: Option<u64>,
    view: Arc<SchedulingView>,
    jobs: JobsFramework,
    serverless: ServerlessFramework,
    /// External frameworks subscribed here, and whether each wants offers.
    subscribed: HashMap<FrameworkId, bool>,
    /// The last state each external framework was told of its tasks.
    reported: HashMap<JobId, (u32, TaskState)>,
    /// Offers rescinded when the state changed, to tell their frameworks.
    rescinded: Vec<super::Offer>,
}

/// The leader's answer to a heartbeat.
#[derive(Debug, Clone, Default)]
pub struct HeartbeatAnswer {
    /// The leader does not know the agent as active: register again.
    pub reregister: bool,
    /// The attempts placed on the agent.
    pub assigned: Vec<LaunchSpec>,
}

/// Asks for an early scheduling round: told of every change this node applies (it is
/// one of the state machine's observers), it wakes the round loop for the changes that
/// can free resources or bring work. Only the leader acts on a wake-up.
#[derive(Debug, Default)]
pub struct Wakeups(tokio::sync::Notify);

impl Wakeups {
    /// Asks for a round soon (one wake-up is kept until the loop takes it).
    pub fn wake(&self) {
        self.0.notify_one();
    }

    async fn woken(&self) {
        self.0.notified().await;
    }
}

impl Observer for Wakeups {
    fn applied(&self, _last_index: u64, changes: &[&CommandResponse]) {
        if changes.iter().any(|change| wakes_the_scheduler(change)) {
            self.wake();
        }
    }

    fn replaced(&self, _last_index: u64) {
        self.wake();
    }
}

/// Whether an applied change can let a round place or offer something new.
fn wakes_the_scheduler(change: &CommandResponse) -> bool {
    match change {
        // A staging job's waiting reason, written by the scheduler itself.
        CommandResponse::JobUpdated {
            attempt: 0,
            state: TaskState::Staging,
            ..
        } => false,
        CommandResponse::JobSubmitted(_)
        | CommandResponse::JobUpdated { .. }
        | CommandResponse::Released(_)
        | CommandResponse::AgentRegistered(_)
        | CommandResponse::AgentLost { .. }
        | CommandResponse::FrameworkRegistered(_)
        | CommandResponse::RoleSet(_) => true,
        _ => false,
    }
}

/// The scheduler of one server.
pub struct Scheduler {
    cluster: Arc<Cluster>,
    wakeups: Arc<Wakeups>,
    state: State,
    config: SchedulerConfig,
    metrics: SchedulerMetrics,
    inner: Mutex<Inner>,
    /// Serverless leases as this node's state has them (for routing invocations), and
    /// the applied index they were read at.
    leases: Mutex<(Option<u64>, Arc<Vec<LeaseTarget>>)>,
}

/// An agent holding a serverless lease: where gateways may send invocations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LeaseTarget {
    /// The agent.
    pub agent: AgentId,
    /// Its executor's address.
    pub rpc: String,
    /// Slots leased there.
    pub slots: u64,
    /// Devices leased there (for invocations granted one).
    pub leased_accelerators: u64,
    /// The agent's accelerator devices.
    pub accelerators: u64,
    /// `accel.type` of the agent (`gpu`, `cpu` ...), if it has devices.
    pub accel_type: Option<String>,
}

impl LeaseTarget {
    /// Whether a run granted `limits` can get its device on this agent.
    pub fn serves(&self, limits: &crate::runtime::Limits) -> bool {
        limits.accel == 0
            || (self.accelerators >= limits.accel
                && limits
                    .accel_type
                    .is_none_or(|t| self.accel_type.as_deref() == Some(t.as_str())))
    }
}

impl Scheduler {
    /// A scheduler for this server; [`Scheduler::start`] runs it. `wakeups` must be
    /// among the observers of the state machine that applies this node's log.
    pub fn new(
        cluster: Arc<Cluster>,
        state: State,
        config: SchedulerConfig,
        wakeups: Arc<Wakeups>,
    ) -> Arc<Scheduler> {
        let allocator = Allocator::new(config.allocator.clone());
        let lease_slots = config.lease_slots;
        Arc::new(Scheduler {
            cluster,
            wakeups,
            state,
            config,
            leases: Mutex::new((None, Arc::new(Vec::new()))),
            metrics: SchedulerMetrics::default(),
            inner: Mutex::new(Inner {
                term: None,
                heartbeats: HashMap::new(),
                heard_ms: HashMap::new(),
                marking: HashSet::new(),
                allocator,
                synced: None,
                view: Arc::new(SchedulingView::default()),
                jobs: JobsFramework::default(),
                serverless: ServerlessFramework::new(lease_slots),
                subscribed: HashMap::new(),
                reported: HashMap::new(),
                rescinded: Vec::new(),
            }),
        })
    }

    /// Runs the scheduler's rounds, every tick and early when woken (see [`Wakeups`]),
    /// until the scheduler is dropped.
    pub fn start(self: &Arc<Scheduler>) {
        let weak: Weak<Scheduler> = Arc::downgrade(self);
        let wakeups = self.wakeups.clone();
        let tick = self.config.tick;
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(tick);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_round = Instant::now();
            loop {
                let early = tokio::select! {
                    _ = interval.tick() => false,
                    () = wakeups.woken() => true,
                };
                let Some(scheduler) = weak.upgrade() else {
                    return;
                };
                if early {
                    // Followers keep to the tick: only the leader schedules.
                    if scheduler.cluster.leading_term().is_none() {
                        continue;
                    }
                    let next = last_round + EARLY_ROUND_GAP;
                    // Not holding the scheduler while waiting: it may be dropped.
                    drop(scheduler);
                    tokio::time::sleep_until(next.into()).await;
                    let Some(again) = weak.upgrade() else {
                        return;
                    };
                    last_round = Instant::now();
                    again.tick();
                    continue;
                }
                last_round = Instant::now();
                scheduler.tick();
            }
        });
    }

    /// Its settings.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Its metrics.
    pub fn metrics(&self) -> &SchedulerMetrics {
        &self.metrics
    }

    /// Sets the metrics' gauges from the local state (before they are rendered).
    pub fn observe_metrics(&self) {
        match self.state.scheduling() {
            Ok(view) => self.metrics.observe(&view),
            Err(e) => tracing::warn!(error = %e, "reading the scheduling state for metrics"),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers an agent (from any server: the command goes through the leader).
    pub async fn register_agent(
        &self,
        agent: AgentId,
        rpc: String,
        resources: Resources,
        attributes: BTreeMap<String, String>,
        running: Vec<TaskRef>,
    ) -> Result<(), ClusterError> {
        let committed = self
            .cluster
            .propose(Command::RegisterAgent {
                agent: agent.clone(),
                rpc,
                resources,
                attributes,
                running,
                at_ms: now_ms(),
            })
            .await?;
        if let Some(why) = committed.rejection {
            return Err(ClusterError::Rejected(why.to_string()));
        }
        tracing::info!(%agent, %resources, "agent registered");
        Ok(())
    }

    /// Agent `agent` is alive. Only the leader takes heartbeats. Answers whether the
    /// agent must register again (the leader does not know it as active), and the
    /// attempts placed on it.
    pub fn heartbeat(
        &self,
        agent: &AgentId,
        load: AgentLoad,
    ) -> Result<HeartbeatAnswer, ClusterError> {
        let Some(term) = self.cluster.leading_term() else {
            return Err(ClusterError::NotLeader {
                leader: self.cluster.leader(),
            });
        };
        let mut inner = self.lock();
        self.refresh(&mut inner, term, false);
        let active = inner
            .view
            .agents
            .get(agent)
            .is_some_and(|a| a.state == AgentState::Active);
        if active && !inner.marking.contains(agent) {
            let now = Instant::now();
            inner.heartbeats.insert(agent.clone(), now);
            inner.heard_ms.insert(agent.clone(), now_ms());
            let view = inner.view.clone();
            inner.serverless.observe(&view, agent, load, now);
            self.metrics.heartbeats.inc();
            Ok(HeartbeatAnswer {
                reregister: false,
                assigned: jobs::assigned(&inner.view, agent),
            })
        } else {
            Ok(HeartbeatAnswer {
                reregister: true,
                assigned: Vec::new(),
            })
        }
    }

    /// An agent reports on an attempt; answers whether the report was taken (`false`:
    /// it was stale, and the agent should stop that attempt).
    pub async fn task_update(
        &self,
        task: TaskRef,
        update: TaskUpdate,
    ) -> Result<bool, ClusterError> {
        let committed = self
            .cluster
            .propose(Command::UpdateJob {
                task,
                update,
                at_ms: now_ms(),
            })
            .await?;
        match committed.rejection {
            None => Ok(true),
            Some(Rejection::StaleUpdate { .. } | Rejection::UnknownJob(_)) => Ok(false),
            Some(other) => Err(ClusterError::Rejected(other.to_string())),
        }
    }

    /// A module or a job's input or output, by digest.
    pub fn fetch(&self, digest: &Digest) -> Result<Option<Vec<u8>>, ClusterError> {
        let unavailable = |e: crate::state::StateError| ClusterError::Unavailable(e.to_string());
        if let Some(module) = self.state.get_blob(digest).map_err(unavailable)? {
            return Ok(Some(module));
        }
        self.state.job_data(digest).map_err(unavailable)
    }

    /// Agents as the local state knows them.
    pub fn agents(&self) -> Result<Vec<AgentView>, ClusterError> {
        let view = self
            .state
            .scheduling()
            .map_err(|e| ClusterError::Unavailable(e.to_string()))?;
        let inner = self.lock();
        let leading = inner.term.is_some();
        Ok(view
            .agents
            .into_values()
            .map(|record| AgentView {
                free: record.resources.minus(&record.allocated),
                last_heartbeat_ms: leading
                    .then(|| inner.heard_ms.get(&record.id).copied())
                    .flatten(),
                record,
            })
            .collect())
    }

    /// The scheduling state as this node has applied it.
    pub fn view(&self) -> Result<SchedulingView, crate::state::StateError> {
        self.state.scheduling()
    }

    /// Job `job` as the local state has it.
    pub fn job(
        &self,
        job: JobId,
    ) -> Result<Option<crate::state::JobRecord>, crate::state::StateError> {
        self.state.get_job(job)
    }

    /// The newest `limit` jobs (in `state`, if given), newest first.
    pub fn jobs(
        &self,
        limit: usize,
        state: Option<crate::state::TaskState>,
    ) -> Result<Vec<crate::state::JobRecord>, crate::state::StateError> {
        let mut jobs = self
            .state
            .list_jobs(if state.is_some() { usize::MAX } else { limit })?;
        if let Some(state) = state {
            jobs.retain(|j| j.state == state);
            jobs.truncate(limit);
        }
        Ok(jobs)
    }

    /// The leader's open offers (none elsewhere).
    pub fn open_offers(&self) -> Vec<super::Offer> {
        let inner = self.lock();
        if inner.term.is_none() {
            return Vec::new();
        }
        inner.allocator.open_offers()
    }

    /// The frameworks' shares (on the leader; empty elsewhere).
    pub fn shares(&self) -> Vec<Share> {
        let inner = self.lock();
        if inner.term.is_none() {
            return Vec::new();
        }
        inner.allocator.shares()
    }

    /// The agents holding serverless leases, as this node's state has them (refreshed
    /// every tick).
    pub fn lease_targets(&self) -> Arc<Vec<LeaseTarget>> {
        self.leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .clone()
    }

    /// Re-reads the leases when this node applied more.
    fn refresh_leases(&self) {
        let applied = self.cluster.applied_index();
        {
            let leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
            if leases.0 == applied && applied.is_some() {
                return;
            }
        }
        let Ok(view) = self.state.scheduling() else {
            return;
        };
        let id = serverless::framework_id();
        let mut targets: Vec<LeaseTarget> = Vec::new();
        for allocation in view.allocations.values().filter(|a| a.framework == id) {
            let Some(agent) = view.agents.get(&allocation.agent) else {
                continue;
            };
            if agent.state != AgentState::Active {
                continue;
            }
            match targets.iter_mut().find(|t| t.agent == agent.id) {
                Some(target) => {
                    target.slots += allocation.resources.slots;
                    target.leased_accelerators += allocation.resources.accelerators;
                }
                None => targets.push(LeaseTarget {
                    agent: agent.id.clone(),
                    rpc: agent.rpc.clone(),
                    slots: allocation.resources.slots,
                    leased_accelerators: allocation.resources.accelerators,
                    accelerators: agent.resources.accelerators,
                    accel_type: agent
                        .attributes
                        .get(crate::accel::ACCEL_TYPE_ATTRIBUTE)
                        .cloned(),
                }),
            }
        }
        *self.leases.lock().unwrap_or_else(|p| p.into_inner()) = (applied, Arc::new(targets));
    }

    /// One round of the periodic work (most of it on the leader only).
    fn tick(self: &Arc<Scheduler>) {
        self.refresh_leases();
        let Some(term) = self.cluster.leading_term() else {
            let mut inner = self.lock();
            if inner.term.take().is_some() {
                inner.heartbeats.clear();
                inner.subscribed.clear();
                inner.reported.clear();
                let rpc = self.cluster.rpc().clone();
                tokio::spawn(async move {
                    let _ = rpc.run(|_| async { callbacks::forget_callbacks() }).await;
                });
                tracing::info!("no longer the leader: scheduling stops here");
            }
            return;
        };
        let mut inner = self.lock();
        // Every round reads the state afresh: the Raft metrics' applied index may lag
        // the state, and offers must never be made from a stale view.
        self.refresh(&mut inner, term, true);
        let now = Instant::now();
        let timeout = self.config.agent_timeout;
        let silent: Vec<AgentId> = inner
            .view
            .agents
            .values()
            .filter(|a| a.state == AgentState::Active && !inner.marking.contains(&a.id))
            .filter(|a| {
                inner
                    .heartbeats
                    .get(&a.id)
                    .is_some_and(|last| now.duration_since(*last) > timeout)
            })
            .map(|a| a.id.clone())
            .collect();
        self.run_jobs(&mut inner, now);
        let updates = self.task_updates(&mut inner);
        self.send_statuses(updates);
        for agent in silent {
            inner.marking.insert(agent.clone());
            inner.heartbeats.remove(&agent);
            let scheduler = self.clone();
            tokio::spawn(async move {
                tracing::warn!(%agent, ?timeout, "agent missed its heartbeats; marking it unreachable");
                let result = scheduler
                    .cluster
                    .propose(Command::AgentUnreachable {
                        agent: agent.clone(),
                        at_ms: now_ms(),
                    })
                    .await;
                match result {
                    Ok(_) => {
                        scheduler.metrics.agents_lost.inc();
                    }
                    Err(e) => tracing::warn!(%agent, error = %e, "marking an agent unreachable"),
                }
                scheduler.lock().marking.remove(&agent);
            });
        }
    }

    /// Expires offers, makes new ones, lets the jobs framework place jobs in its own,
    /// and sends the others (and task updates) to their external frameworks.
    fn run_jobs(self: &Arc<Scheduler>, inner: &mut Inner, now: Instant) {
        let Inner {
            allocator,
            jobs,
            serverless: leases,
            view,
            subscribed,
            rescinded,
            ..
        } = inner;
        let mut rescinded = std::mem::take(rescinded);
        rescinded.extend(allocator.expire(now));
        self.metrics.offers_rescinded.inc_by(rescinded.len() as u64);
        let jobs_id = jobs::framework_id();
        let serverless_id = serverless::framework_id();
        allocator.set_wants_offers(&jobs_id, jobs.wants_offers(view));
        allocator.set_wants_offers(&serverless_id, leases.wants_offers(view));
        for (framework, wants) in subscribed.iter() {
            allocator.set_wants_offers(framework, *wants);
        }
        let (mine, theirs): (Vec<super::Offer>, Vec<super::Offer>) = allocator
            .make_offers(now)
            .into_iter()
            .partition(|o| o.framework == jobs_id);
        let (lease_offers, theirs): (Vec<super::Offer>, Vec<super::Offer>) = theirs
            .into_iter()
            .partition(|o| o.framework == serverless_id);
        self.metrics
            .offers_made
            .inc_by((mine.len() + theirs.len() + lease_offers.len()) as u64);
        let lease_plan = leases.plan(view, lease_offers, allocator, now, now_ms());
        if let Some(register) = lease_plan.register {
            let cluster = self.cluster.clone();
            tokio::spawn(async move {
                if let Err(e) = cluster.propose(register).await {
                    tracing::warn!(error = %e, "registering the serverless framework");
                }
            });
        }
        for allocation in lease_plan.releases {
            let cluster = self.cluster.clone();
            tokio::spawn(async move {
                match cluster.propose(Command::Release { allocation }).await {
                    Ok(_) => tracing::info!(%allocation, "serverless lease given back"),
                    Err(e) => tracing::warn!(%allocation, error = %e, "giving back a lease"),
                }
            });
        }
        for (offer, agent, lease) in lease_plan.leases {
            let scheduler = self.clone();
            tokio::spawn(async move {
                let committed = scheduler
                    .cluster
                    .propose(Command::Accept {
                        framework: serverless::framework_id(),
                        agent: agent.clone(),
                        resources: lease,
                        at_ms: now_ms(),
                    })
                    .await;
                match committed {
                    Ok(c) if c.rejection.is_none() => {
                        scheduler.metrics.offers_accepted.inc();
                        tracing::info!(%agent, %lease, "serverless lease taken");
                    }
                    Ok(c) => tracing::info!(%agent, rejection = ?c.rejection, "lease refused"),
                    Err(e) => tracing::warn!(%agent, error = %e, "taking a lease"),
                }
                let mut inner = scheduler.lock();
                inner.allocator.settle_part(offer, &lease);
                inner.serverless.accepted(&agent);
            });
        }
        let made = mine.len();
        let plan = jobs.plan(view, mine, allocator, now, now_ms());
        self.metrics
            .offers_declined
            .inc_by(made.saturating_sub(plan.launches.len()) as u64);
        let mut by_framework: HashMap<FrameworkId, Vec<super::Offer>> = HashMap::new();
        for offer in theirs {
            by_framework
                .entry(offer.framework.clone())
                .or_default()
                .push(offer);
        }
        for (framework, offers) in by_framework {
            self.send_offers(framework, offers);
        }
        let mut withdrawn: HashMap<FrameworkId, Vec<u64>> = HashMap::new();
        for offer in rescinded {
            if offer.framework != jobs_id && subscribed.contains_key(&offer.framework) {
                withdrawn
                    .entry(offer.framework.clone())
                    .or_default()
                    .push(offer.id.0);
            }
        }
        for (framework, ids) in withdrawn {
            self.send_rescinds(framework, ids);
        }
        if let Some(register) = plan.register {
            let cluster = self.cluster.clone();
            tokio::spawn(async move {
                if let Err(e) = cluster.propose(register).await {
                    tracing::warn!(error = %e, "registering the jobs framework");
                }
            });
        }
        for reason in plan.reasons {
            let cluster = self.cluster.clone();
            tokio::spawn(async move {
                let _ = cluster.propose(reason).await;
            });
        }
        for (offer, agent, placed) in plan.launches {
            let scheduler = self.clone();
            let rpc_addr = view.agents.get(&agent).map(|a| a.rpc.clone());
            tokio::spawn(async move {
                scheduler.launch(offer, agent, rpc_addr, placed).await;
            });
        }
    }

    /// Commits the launches of `placed` on `agent` (one accepted offer), then tells the
    /// agent (heartbeats repeat it if this fails).
    async fn launch(
        self: Arc<Scheduler>,
        offer: super::OfferId,
        agent: AgentId,
        rpc_addr: Option<String>,
        placed: Vec<JobId>,
    ) {
        let view = self.lock().view.clone();
        let this = &self;
        let proposals = placed.iter().map(|job| {
            let part = view.jobs.get(job).map(|j| j.resources).unwrap_or_default();
            let launched = this.cluster.propose(Command::LaunchJob {
                job: *job,
                framework: jobs::framework_id(),
                agent: agent.clone(),
                at_ms: now_ms(),
            });
            async move {
                let result = launched.await;
                // Applied here (or refused): the state holds it now, not the offer.
                this.lock().allocator.settle_part(offer, &part);
                result
            }
        });
        let results = futures_util::future::join_all(proposals).await;
        let mut launches = Vec::new();
        let mut any = false;
        for (job, result) in placed.iter().zip(results) {
            match result {
                Ok(committed) if committed.rejection.is_none() => {
                    any = true;
                    match self.state.get_job(*job) {
                        Ok(Some(record)) => launches.extend(LaunchSpec::of(&record)),
                        Ok(None) => {}
                        Err(e) => tracing::warn!(%job, error = %e, "reading a launched job"),
                    }
                }
                Ok(committed) => {
                    tracing::info!(%job, %agent, rejection = ?committed.rejection, "launch refused")
                }
                Err(e) => tracing::warn!(%job, %agent, error = %e, "launching a job"),
            }
        }
        {
            let mut inner = self.lock();
            inner.allocator.settle(offer);
            for job in &placed {
                inner.jobs.launched(*job);
            }
        }
        // What the offer held and the launches did not take is free to offer again.
        self.wakeups.wake();
        if any {
            self.metrics.offers_accepted.inc();
        }
        self.push_launches(&agent, rpc_addr, launches).await;
    }

    /// Tells `agent` (at `rpc_addr`) to run `launches`; its heartbeats repeat them if
    /// this fails.
    async fn push_launches(
        &self,
        agent: &AgentId,
        rpc_addr: Option<String>,
        launches: Vec<LaunchSpec>,
    ) {
        let Some(addr) = rpc_addr else {
            return;
        };
        for spec in launches {
            let target = addr.clone();
            let pushed = self
                .cluster
                .rpc()
                .run(move |peers| async move {
                    let executor = peers.executor(&target).await?;
                    let mut request = executor.launch_request();
                    write_launch(request.get().init_task(), &spec);
                    request.send().promise.await.map_err(|e| {
                        peers.forget(&target);
                        RpcError::from_capnp(&target, e)
                    })?;
                    Ok::<_, RpcError>(())
                })
                .await;
            if let Err(e) = pushed.and_then(|r| r) {
                tracing::info!(%agent, error = %e, "telling the agent of a launch failed; its next heartbeat will");
            }
        }
    }

    /// Registers external framework `id` in `role` and subscribes it here (the leader);
    /// its callback is kept on the RPC thread by the caller.
    pub async fn subscribe(
        &self,
        id: FrameworkId,
        name: String,
        role: RoleName,
    ) -> Result<(), ClusterError> {
        self.leading()?;
        if id == jobs::framework_id() {
            return Err(ClusterError::Rejected(format!(
                "framework id `{id}` is the built-in jobs framework's"
            )));
        }
        let committed = self
            .cluster
            .propose(Command::RegisterFramework {
                id: id.clone(),
                name,
                role: role.clone(),
                at_ms: now_ms(),
            })
            .await?;
        if let Some(why) = committed.rejection {
            return Err(ClusterError::Rejected(why.to_string()));
        }
        self.leading()?;
        let mut inner = self.lock();
        inner.subscribed.insert(id.clone(), true);
        // Tell it of its tasks afresh.
        inner.reported.clear();
        tracing::info!(framework = %id, %role, "framework subscribed");
        Ok(())
    }

    /// Whether `framework` is subscribed here.
    pub fn is_subscribed(&self, framework: &FrameworkId) -> Result<bool, ClusterError> {
        self.leading()?;
        Ok(self.lock().subscribed.contains_key(framework))
    }

    /// `framework` accepts `offer` with `tasks` (function, input): each becomes a task
    /// placed on the offer's agent. Answers the ids of the tasks placed (a task the
    /// state refuses, e.g. for a deleted function, is left out).
    pub async fn accept(
        self: &Arc<Scheduler>,
        framework: FrameworkId,
        offer: super::OfferId,
        tasks: Vec<(FunctionName, bytes::Bytes)>,
    ) -> Result<Vec<JobId>, ClusterError> {
        self.leading()?;
        let mut used = Resources::ZERO;
        let mut parts = Vec::with_capacity(tasks.len());
        for (function, _) in &tasks {
            let record = self
                .state
                .get_function(function)
                .map_err(|e| ClusterError::Unavailable(e.to_string()))?
                .ok_or_else(|| ClusterError::Rejected(format!("no function named `{function}`")))?;
            let part = record.spec.limits.resources();
            used = used.plus(&part);
            parts.push(part);
        }
        let (agent, rpc_addr) = {
            let mut inner = self.lock();
            let accepted = inner
                .allocator
                .accept(offer, &framework, used)
                .map_err(|e| ClusterError::Rejected(e.to_string()))?;
            let rpc_addr = inner
                .view
                .agents
                .get(&accepted.agent)
                .map(|a| a.rpc.clone());
            (accepted.agent, rpc_addr)
        };
        let proposals = tasks
            .into_iter()
            .zip(parts)
            .map(|((function, input), part)| {
                let placed = self.cluster.propose(Command::PlaceTask {
                    framework: framework.clone(),
                    agent: agent.clone(),
                    function,
                    input,
                    at_ms: now_ms(),
                });
                async move {
                    let result = placed.await;
                    // Applied here (or refused): the state holds it now, not the offer.
                    self.lock().allocator.settle_part(offer, &part);
                    result
                }
            });
        let results = futures_util::future::join_all(proposals).await;
        let mut placed = Vec::new();
        let mut launches = Vec::new();
        for result in results {
            match result {
                Ok(committed) => match (committed.rejection, committed.created) {
                    (None, Some(job)) => {
                        placed.push(JobId(job));
                        if let Ok(Some(record)) = self.state.get_job(JobId(job)) {
                            launches.extend(LaunchSpec::of(&record));
                        }
                    }
                    (why, _) => {
                        tracing::info!(%framework, %agent, rejection = ?why, "task refused")
                    }
                },
                Err(e) => tracing::warn!(%framework, %agent, error = %e, "placing a task"),
            }
        }
        {
            let mut inner = self.lock();
            inner.allocator.settle(offer);
            // Remembered as placed, so that the framework hears of them even if they
            // end before the next round looks at the active jobs.
            for job in &placed {
                inner
                    .reported
                    .entry(*job)
                    .or_insert((0, TaskState::Staging));
            }
        }
        if !placed.is_empty() {
            self.metrics.offers_accepted.inc();
        }
        self.push_launches(&agent, rpc_addr, launches).await;
        Ok(placed)
    }

    /// `framework` declines `offer`; its agent is not offered to it for `refuse_for`.
    pub fn decline(
        &self,
        framework: &FrameworkId,
        offer: super::OfferId,
        refuse_for: Duration,
    ) -> Result<(), ClusterError> {
        self.leading()?;
        self.lock()
            .allocator
            .decline(offer, framework, refuse_for, Instant::now())
            .map_err(|e| ClusterError::Rejected(e.to_string()))?;
        self.metrics.offers_declined.inc();
        Ok(())
    }

    /// Whether `framework` gets offers (suppress / revive).
    pub fn want_offers(&self, framework: &FrameworkId, want: bool) -> Result<(), ClusterError> {
        self.leading()?;
        let mut inner = self.lock();
        match inner.subscribed.get_mut(framework) {
            Some(wants) => {
                *wants = want;
                Ok(())
            }
            None => Err(ClusterError::Rejected(format!(
                "framework `{framework}` is not subscribed here"
            ))),
        }
    }

    /// `framework` kills its task `job`.
    pub async fn kill_task(&self, framework: &FrameworkId, job: JobId) -> Result<(), ClusterError> {
        let record = self
            .state
            .get_job(job)
            .map_err(|e| ClusterError::Unavailable(e.to_string()))?
            .ok_or_else(|| ClusterError::Rejected(format!("no task {job}")))?;
        if record.owner.as_ref() != Some(framework) {
            return Err(ClusterError::Rejected(format!(
                "task {job} is not framework `{framework}`'s"
            )));
        }
        let committed = self
            .cluster
            .propose(Command::KillJob {
                job,
                at_ms: now_ms(),
            })
            .await?;
        match committed.rejection {
            Some(why) => Err(ClusterError::Rejected(why.to_string())),
            None => Ok(()),
        }
    }

    fn leading(&self) -> Result<u64, ClusterError> {
        self.cluster
            .leading_term()
            .ok_or_else(|| ClusterError::NotLeader {
                leader: self.cluster.leader(),
            })
    }

    /// Sends `offers` to external framework `framework`; unsubscribes it if it cannot
    /// be reached (its offers are rescinded).
    fn send_offers(self: &Arc<Scheduler>, framework: FrameworkId, offers: Vec<super::Offer>) {
        let scheduler = self.clone();
        tokio::spawn(async move {
            let target = framework.clone();
            let sent = scheduler
                .cluster
                .rpc()
                .run(move |_| async move {
                    let callback = callbacks::callback(&target).ok_or(())?;
                    let mut request = callback.offers_request();
                    let mut list = request.get().init_offers(offers.len() as u32);
                    for (i, offer) in offers.iter().enumerate() {
                        callbacks::write_offer(list.reborrow().get(i as u32), offer);
                    }
                    request.send().promise.await.map(|_| ()).map_err(|_| ())
                })
                .await;
            if !matches!(sent, Ok(Ok(()))) {
                scheduler.unsubscribe(&framework).await;
            }
        });
    }

    fn send_rescinds(self: &Arc<Scheduler>, framework: FrameworkId, ids: Vec<u64>) {
        let rpc = self.cluster.rpc().clone();
        tokio::spawn(async move {
            let _ = rpc
                .run(move |_| async move {
                    let Some(callback) = callbacks::callback(&framework) else {
                        return;
                    };
                    let mut request = callback.rescind_request();
                    let mut list = request.get().init_offers(ids.len() as u32);
                    for (i, id) in ids.iter().enumerate() {
                        list.set(i as u32, *id);
                    }
                    let _ = request.send().promise.await;
                })
                .await;
        });
    }

    /// Sends task updates to their external frameworks, in order.
    fn send_statuses(self: &Arc<Scheduler>, updates: Vec<(FrameworkId, TaskStatusInfo)>) {
        if updates.is_empty() {
            return;
        }
        let scheduler = self.clone();
        tokio::spawn(async move {
            for (framework, status) in updates {
                let target = framework.clone();
                let sent = scheduler
                    .cluster
                    .rpc()
                    .run(move |_| async move {
                        let callback = callbacks::callback(&target).ok_or(())?;
                        let mut request = callback.status_request();
                        callbacks::write_status(request.get().init_status(), &status);
                        request.send().promise.await.map(|_| ()).map_err(|_| ())
                    })
                    .await;
                if !matches!(sent, Ok(Ok(()))) {
                    scheduler.unsubscribe(&framework).await;
                }
            }
        });
    }

    /// Forgets external framework `framework` here (it disconnected): no more offers;
    /// its open offers are withdrawn. Its tasks keep running.
    async fn unsubscribe(&self, framework: &FrameworkId) {
        let was = {
            let mut inner = self.lock();
            let was = inner.subscribed.remove(framework).is_some();
            inner.allocator.set_wants_offers(framework, false);
            inner.allocator.rescind_framework(framework);
            was
        };
        let target = framework.clone();
        let _ = self
            .cluster
            .rpc()
            .run(move |_| async move { callbacks::forget_callback(&target) })
            .await;
        if was {
            tracing::info!(%framework, "framework unreachable: unsubscribed");
        }
    }

    /// What external frameworks have not been told about their tasks yet.
    fn task_updates(&self, inner: &mut Inner) -> Vec<(FrameworkId, TaskStatusInfo)> {
        let mut updates = Vec::new();
        let view = inner.view.clone();
        for job in view.jobs.values() {
            let Some(owner) = &job.owner else {
                continue;
            };
            if !inner.subscribed.contains_key(owner) {
                continue;
            }
            let key = (job.attempts.len() as u32, job.state);
            if inner.reported.get(&job.id) != Some(&key) {
                inner.reported.insert(job.id, key);
                updates.push((owner.clone(), status_of(job)));
            }
        }
        let ended: Vec<JobId> = inner
            .reported
            .keys()
            .filter(|id| !view.jobs.contains_key(id))
            .copied()
            .collect();
        for id in ended {
            inner.reported.remove(&id);
            if let Ok(Some(job)) = self.state.get_job(id) {
                if let Some(owner) = &job.owner {
                    updates.push((owner.clone(), status_of(&job)));
                }
            }
        }
        updates
    }

    /// Starts afresh when this node became the leader in a new term; re-reads the
    /// scheduling state when more has been applied (or always, with `force`); gives
    /// every active agent not yet heard from a full timeout from now.
    fn refresh(&self, inner: &mut Inner, term: u64, force: bool) {
        if inner.term != Some(term) {
            tracing::info!(term, "leading: scheduling starts here");
            inner.term = Some(term);
            inner.heartbeats.clear();
            inner.allocator = Allocator::new(self.config.allocator.clone());
            inner.jobs = JobsFramework::default();
            inner.serverless = ServerlessFramework::new(self.config.lease_slots);
            inner.subscribed.clear();
            inner.reported.clear();
            inner.rescinded.clear();
            inner.synced = None;
        }
        let applied = self.cluster.applied_index();
        if force || applied != inner.synced || inner.synced.is_none() {
            match self.state.scheduling() {
                Ok(view) => {
                    let rescinded = inner.allocator.sync(&view);
                    inner.rescinded.extend(rescinded);
                    inner.view = Arc::new(view);
                    inner.synced = applied;
                }
                Err(e) => tracing::warn!(error = %e, "reading the scheduling state"),
            }
        }
        let now = Instant::now();
        let view = inner.view.clone();
        for agent in view.agents.values() {
            if agent.state == AgentState::Active {
                inner.heartbeats.entry(agent.id.clone()).or_insert(now);
            }
        }
    }
}

/// A task's status as its framework is told.
fn status_of(job: &JobRecord) -> TaskStatusInfo {
    let attempt = job.current();
    TaskStatusInfo {
        job: job.id,
        attempt: attempt.map_or(0, |a| a.number),
        state: job.state.to_string(),
        reason: job
            .reason
            .clone()
            .or_else(|| attempt.and_then(|a| a.reason.clone()))
            .unwrap_or_default(),
        agent: attempt.map(|a| a.agent.to_string()).unwrap_or_default(),
        output: job
            .output
            .as_ref()
            .map(|o| o.digest.to_string())
            .unwrap_or_default(),
    }
}
