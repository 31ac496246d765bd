//! The built-in serverless framework (fast path), on the leader: it holds leases —
//! allocations of invocation slots — on every active agent, up to `lease_slots` slots
//! each and at most half the agent, accepted from its offers like any framework's.
//! (Lease sizes are fixed; growing and shrinking them with load is not built yet.) Gateways route invocations to
//! the agents under these leases; no consensus round per invocation: consensus decides
//! who holds which slots, not each call. A lease goes back to the pool with its agent
//! (when the agent is marked unreachable), and the framework takes one on an agent that
//! comes (back).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use super::{Allocator, Offer, OfferId};
use crate::state::{
    AgentId, AgentState, Command, FrameworkId, Resources, RoleName, SchedulingView,
};

/// The serverless framework's id (and role).
pub const SERVERLESS_FRAMEWORK: &str = "serverless";
/// Guest memory leased per slot, MiB (the default memory limit of a function).
pub const LEASE_MB_PER_SLOT: u64 = 128;
/// How long a declined agent is not offered to the framework again.
const REFUSE_FOR: Duration = Duration::from_secs(5);

/// The serverless framework's id.
pub fn framework_id() -> FrameworkId {
    FrameworkId::from_static(SERVERLESS_FRAMEWORK)
}

/// Slots leased on `agent`.
pub fn leased(view: &SchedulingView, agent: &AgentId) -> u64 {
    let id = framework_id();
    view.allocations
        .values()
        .filter(|a| a.framework == id && a.agent == *agent)
        .map(|a| a.resources.slots)
        .sum()
}

/// What one round of the serverless framework decided.
#[derive(Debug, Default)]
pub struct Plan {
    /// Register the framework first.
    pub register: Option<Command>,
    /// Accepted offers: the offer, its agent, the lease taken.
    pub leases: Vec<(OfferId, AgentId, Resources)>,
}

/// The serverless framework's memory on the leader.
#[derive(Debug)]
pub struct ServerlessFramework {
    lease_slots: u64,
    registering: bool,
    /// Agents whose lease is being committed.
    accepting: HashSet<AgentId>,
}

impl ServerlessFramework {
    /// A framework that leases up to `lease_slots` slots per agent (0: none).
    pub fn new(lease_slots: u64) -> ServerlessFramework {
        ServerlessFramework {
            lease_slots,
            registering: false,
            accepting: HashSet::new(),
        }
    }

    fn wanted(&self, view: &SchedulingView, agent: &AgentId) -> u64 {
        let Some(record) = view.agents.get(agent) else {
            return 0;
        };
        if record.state != AgentState::Active || self.accepting.contains(agent) {
            return 0;
        }
        // At most half of an agent: the rest stays for jobs and other frameworks.
        self.lease_slots
            .min(record.resources.slots / 2)
            .saturating_sub(leased(view, agent))
    }

    /// Whether some active agent has less than its lease.
    pub fn wants_offers(&self, view: &SchedulingView) -> bool {
        self.lease_slots > 0 && view.agents.keys().any(|a| self.wanted(view, a) > 0)
    }

    /// Takes leases from `offers` (all made to this framework); declines the rest.
    pub fn plan(
        &mut self,
        view: &SchedulingView,
        offers: Vec<Offer>,
        allocator: &mut Allocator,
        now: Instant,
        at_ms: u64,
    ) -> Plan {
        let mut plan = Plan::default();
        let id = framework_id();
        if !view.frameworks.contains_key(&id) {
            if !self.registering && self.lease_slots > 0 {
                self.registering = true;
                plan.register = Some(Command::RegisterFramework {
                    id: id.clone(),
                    name: "serverless invocations (built in)".into(),
                    role: RoleName::from_static(SERVERLESS_FRAMEWORK),
                    at_ms,
                });
            }
            for offer in offers {
                let _ = allocator.decline(offer.id, &id, REFUSE_FOR, now);
            }
            return plan;
        }
        self.registering = false;
        for offer in offers {
            let want = self.wanted(view, &offer.agent);
            let slots = want
                .min(offer.resources.slots)
                .min(offer.resources.memory_mb / LEASE_MB_PER_SLOT);
            if slots == 0 {
                let _ = allocator.decline(offer.id, &id, REFUSE_FOR, now);
                continue;
            }
            let lease = Resources::new(slots, slots * LEASE_MB_PER_SLOT);
            if allocator.accept(offer.id, &id, lease).is_ok() {
                self.accepting.insert(offer.agent.clone());
                plan.leases.push((offer.id, offer.agent, lease));
            }
        }
        plan
    }

    /// The lease on `agent` was decided (committed or refused).
    pub fn accepted(&mut self, agent: &AgentId) {
        self.accepting.remove(agent);
    }
}
