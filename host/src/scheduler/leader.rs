//! The scheduler that runs on every server and acts on the leader: it takes agents'
//! heartbeats (kept in the leader's memory only), marks agents that fall silent
//! unreachable through Raft, and keeps the allocator in step with the replicated
//! state. A new leader gives every active agent a full timeout before it judges it, so
//! heartbeats that went to the old leader are never held against an agent.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{Allocator, AllocatorConfig, SchedulerMetrics, Share};
use crate::cluster::{Cluster, ClusterError};
use crate::state::{AgentId, AgentRecord, AgentState, Command, Resources, SchedulingView, State};

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
    ) -> Result<(), ClusterError> {
        let committed = self
            .cluster
            .propose(Command::RegisterAgent {
                agent: agent.clone(),
                rpc,
                resources,
                attributes,
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
    /// agent must register again (the leader does not know it as active).
    pub fn heartbeat(&self, agent: &AgentId) -> Result<bool, ClusterError> {
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
            Ok(false)
        } else {
            Ok(true)
        }
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

    /// Starts afresh when this node became the leader in a new term; re-reads the
    /// scheduling state when more has been applied; gives every active agent not yet
    /// heard from a full timeout from now.
    fn refresh(&self, inner: &mut Inner, term: u64) {
        if inner.term != Some(term) {
            tracing::info!(term, "leading: scheduling starts here");
            inner.term = Some(term);
            inner.heartbeats.clear();
            inner.allocator = Allocator::new(self.config.allocator.clone());
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
