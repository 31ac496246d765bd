//! The scheduler that runs on every server and acts on the leader: it takes agents'
//! heartbeats (kept in the leader's memory only), marks agents that fall silent
//! unreachable through Raft, keeps the allocator in step with the replicated state,
//! makes offers, and runs the built-in jobs framework on them (placing jobs with
//! `LaunchJob` commands, then telling the agents). A new leader gives every active
//! agent a full timeout before it judges it, so heartbeats that went to the old leader
//! are never held against an agent.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::jobs::{self, JobsFramework, LaunchSpec};
use super::{Allocator, AllocatorConfig, SchedulerMetrics, Share};
use crate::cluster::{Cluster, ClusterError};
use crate::digest::Digest;
use crate::rpc::{write_launch, RpcError};
use crate::state::{
    AgentId, AgentRecord, AgentState, Command, JobId, Rejection, Resources, SchedulingView, State,
    TaskRef, TaskUpdate,
};

/// Settings of the scheduler.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// An agent not heard from for this long is marked unreachable.
    pub agent_timeout: Duration,
    /// How often the leader checks agents (and, later, makes offers).
    pub tick: Duration,
    /// Settings of the allocator.
    pub allocator: AllocatorConfig,
}

impl Default for SchedulerConfig {
    fn default() -> SchedulerConfig {
        SchedulerConfig {
            agent_timeout: Duration::from_secs(5),
            tick: Duration::from_millis(100),
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
}

/// The leader's in-memory scheduling state.
struct Inner {
    /// The term this node leads in (none while it does not lead).
    term: Option<u64>,
    /// When each active agent was last heard from (or given a fresh timeout).
    heartbeats: HashMap<AgentId, Instant>,
    /// Agents being marked unreachable (the proposal is in flight).
    marking: HashSet<AgentId>,
    allocator: Allocator,
    /// The applied index the view was read at.
    synced: Option<u64>,
    view: Arc<SchedulingView>,
    jobs: JobsFramework,
}

/// The leader's answer to a heartbeat.
#[derive(Debug, Clone, Default)]
pub struct HeartbeatAnswer {
    /// The leader does not know the agent as active: register again.
    pub reregister: bool,
    /// The attempts placed on the agent.
    pub assigned: Vec<LaunchSpec>,
}

/// The scheduler of one server.
pub struct Scheduler {
    cluster: Arc<Cluster>,
    state: State,
    config: SchedulerConfig,
    metrics: SchedulerMetrics,
    inner: Mutex<Inner>,
}

impl Scheduler {
    /// A scheduler for this server; [`Scheduler::start`] runs it.
    pub fn new(cluster: Arc<Cluster>, state: State, config: SchedulerConfig) -> Arc<Scheduler> {
        let allocator = Allocator::new(config.allocator.clone());
        Arc::new(Scheduler {
            cluster,
            state,
            config,
            metrics: SchedulerMetrics::default(),
            inner: Mutex::new(Inner {
                term: None,
                heartbeats: HashMap::new(),
                marking: HashSet::new(),
                allocator,
                synced: None,
                view: Arc::new(SchedulingView::default()),
                jobs: JobsFramework::default(),
            }),
        })
    }

    /// Runs the scheduler's periodic work until the scheduler is dropped.
    pub fn start(self: &Arc<Scheduler>) {
        let weak: Weak<Scheduler> = Arc::downgrade(self);
        let tick = self.config.tick;
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(tick);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                let Some(scheduler) = weak.upgrade() else {
                    return;
                };
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
    pub fn heartbeat(&self, agent: &AgentId) -> Result<HeartbeatAnswer, ClusterError> {
        let Some(term) = self.cluster.leading_term() else {
            return Err(ClusterError::NotLeader {
                leader: self.cluster.leader(),
            });
        };
        let mut inner = self.lock();
        self.refresh(&mut inner, term);
        let active = inner
            .view
            .agents
            .get(agent)
            .is_some_and(|a| a.state == AgentState::Active);
        if active && !inner.marking.contains(agent) {
            inner.heartbeats.insert(agent.clone(), Instant::now());
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
        Ok(view
            .agents
            .into_values()
            .map(|record| AgentView {
                free: record.resources.minus(&record.allocated),
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

    /// One round of the leader's periodic work.
    fn tick(self: &Arc<Scheduler>) {
        let Some(term) = self.cluster.leading_term() else {
            let mut inner = self.lock();
            if inner.term.take().is_some() {
                inner.heartbeats.clear();
                tracing::info!("no longer the leader: scheduling stops here");
            }
            return;
        };
        let mut inner = self.lock();
        self.refresh(&mut inner, term);
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

    /// Expires offers, makes new ones, and lets the jobs framework place jobs in them.
    fn run_jobs(self: &Arc<Scheduler>, inner: &mut Inner, now: Instant) {
        let Inner {
            allocator,
            jobs,
            view,
            ..
        } = inner;
        let rescinded = allocator.expire(now);
        self.metrics.offers_rescinded.inc_by(rescinded.len() as u64);
        allocator.set_wants_offers(&jobs::framework_id(), jobs.wants_offers(view));
        let offers = allocator.make_offers(now);
        self.metrics.offers_made.inc_by(offers.len() as u64);
        let made = offers.len();
        let plan = jobs.plan(view, offers, allocator, now, now_ms());
        self.metrics
            .offers_declined
            .inc_by(made.saturating_sub(plan.launches.len()) as u64);
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
        let proposals = placed.iter().map(|job| {
            self.cluster.propose(Command::LaunchJob {
                job: *job,
                framework: jobs::framework_id(),
                agent: agent.clone(),
                at_ms: now_ms(),
            })
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
            inner.allocator.settle(offer, any);
            for job in &placed {
                inner.jobs.launched(*job);
            }
        }
        if any {
            self.metrics.offers_accepted.inc();
        }
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

    /// Starts afresh when this node became the leader in a new term; re-reads the
    /// scheduling state when more has been applied; gives every active agent not yet
    /// heard from a full timeout from now.
    fn refresh(&self, inner: &mut Inner, term: u64) {
        if inner.term != Some(term) {
            tracing::info!(term, "leading: scheduling starts here");
            inner.term = Some(term);
            inner.heartbeats.clear();
            inner.allocator = Allocator::new(self.config.allocator.clone());
            inner.jobs = JobsFramework::default();
            inner.synced = None;
        }
        let applied = self.cluster.applied_index();
        if applied != inner.synced || inner.synced.is_none() {
            match self.state.scheduling() {
                Ok(view) => {
                    inner.allocator.sync(&view);
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
