//! The scheduler's metrics: heartbeats, agents lost, offers, and (set when metrics are
//! rendered) agents by state and resources allocated per role.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::state::{AgentState, SchedulingView, TaskState};

/// Labels of the agent count.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct StateLabels {
    /// `active` or `unreachable`.
    pub state: String,
}

/// Labels of the allocation gauges.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RoleLabels {
    /// The role.
    pub role: String,
    /// `slots`, `memory_mb` or `accelerators`.
    pub resource: String,
}

/// The scheduler's series.
#[derive(Debug, Clone, Default)]
pub struct SchedulerMetrics {
    /// Heartbeats this node took as leader.
    pub heartbeats: Counter,
    /// Agents this node marked unreachable as leader.
    pub agents_lost: Counter,
    /// Offers made.
    pub offers_made: Counter,
    /// Offers accepted (and committed).
    pub offers_accepted: Counter,
    /// Offers declined.
    pub offers_declined: Counter,
    /// Offers rescinded (timed out, or their agent was lost).
    pub offers_rescinded: Counter,
    agents: Family<StateLabels, Gauge>,
    allocated: Family<RoleLabels, Gauge>,
    jobs: Family<StateLabels, Gauge>,
}

impl SchedulerMetrics {
    /// Registers the series in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "agent_heartbeats",
            "Agent heartbeats taken by this node as leader",
            self.heartbeats.clone(),
        );
        registry.register(
            "agents_lost",
            "Agents this node marked unreachable as leader",
            self.agents_lost.clone(),
        );
        registry.register(
            "offers_made",
            "Resource offers made",
            self.offers_made.clone(),
        );
        registry.register(
            "offers_accepted",
            "Resource offers accepted and committed",
            self.offers_accepted.clone(),
        );
        registry.register(
            "offers_declined",
            "Resource offers declined",
            self.offers_declined.clone(),
        );
        registry.register(
            "offers_rescinded",
            "Resource offers rescinded (timed out, or their agent was lost)",
            self.offers_rescinded.clone(),
        );
        registry.register(
            "agents",
            "Agents by state, as this node's state has them",
            self.agents.clone(),
        );
        registry.register(
            "jobs",
            "Jobs by state (active ones now; ended ones since the cluster began), as this \
             node's state has them",
            self.jobs.clone(),
        );
        registry.register(
            "allocated",
            "Resources allocated per role, as this node's state has them",
            self.allocated.clone(),
        );
    }

    /// Sets the gauges from the replicated state (before rendering).
    pub fn observe(&self, view: &SchedulingView) {
        for state in [AgentState::Active, AgentState::Unreachable] {
            let count = view.agents.values().filter(|a| a.state == state).count();
            self.agents
                .get_or_create(&StateLabels {
                    state: format!("{state:?}").to_lowercase(),
                })
                .set(count as i64);
        }
        for state in [
            TaskState::Staging,
            TaskState::Starting,
            TaskState::Running,
            TaskState::Unreachable,
        ] {
            let count = view.jobs.values().filter(|j| j.state == state).count();
            self.jobs
                .get_or_create(&StateLabels {
                    state: state.to_string(),
                })
                .set(count as i64);
        }
        for state in [TaskState::Finished, TaskState::Failed, TaskState::Killed] {
            let count = view
                .ended_jobs
                .get(&state.to_string())
                .copied()
                .unwrap_or(0);
            self.jobs
                .get_or_create(&StateLabels {
                    state: state.to_string(),
                })
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
        self.allocated.clear();
        for allocation in view.allocations.values() {
            let r = &allocation.resources;
            for (resource, amount) in [
                ("slots", r.slots),
                ("memory_mb", r.memory_mb),
                ("accelerators", r.accelerators),
            ] {
                self.allocated
                    .get_or_create(&RoleLabels {
                        role: allocation.role.to_string(),
                        resource: resource.to_string(),
                    })
                    .inc_by(i64::try_from(amount).unwrap_or(i64::MAX));
            }
        }
    }
}
