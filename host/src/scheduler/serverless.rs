//! The built-in serverless framework (fast path), on the leader: it holds leases —
//! allocations of invocation slots — on every active agent, accepted from its offers
//! like any framework's. A lease starts at `lease_slots` slots (at most half the agent)
//! and follows the load the agent reports in its heartbeats (the most invocations it
//! ran at once): it doubles (up to the whole agent, as offers allow) when that reaches
//! three quarters of it, and halves (not below its start) after a few seconds under a
//! quarter of it. Gateways route invocations to
//! the agents under these leases; no consensus round per invocation: consensus decides
//! who holds which slots, not each call. A lease goes back to the pool with its agent
//! (when the agent is marked unreachable), and the framework takes one on an agent that
//! comes (back).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use super::{Allocator, Offer, OfferId};
use crate::state::{
    AgentId, AgentState, AllocationId, Command, FrameworkId, Resources, RoleName, SchedulingView,
};

/// The serverless framework's id (and role).
pub const SERVERLESS_FRAMEWORK: &str = "serverless";
/// Guest memory leased per slot, MiB (the default memory limit of a function).
pub const LEASE_MB_PER_SLOT: u64 = 128;
/// How long a declined agent is not offered to the framework again.
const REFUSE_FOR: Duration = Duration::from_secs(5);
/// How long an agent's lease must be mostly idle before it shrinks.
const SHRINK_AFTER: Duration = Duration::from_secs(3);

/// What an agent last reported of its invocations.
#[derive(Debug, Clone, Copy)]
struct Load {
    /// The most invocations it ran at once in its last heartbeat interval.
    peak: u64,
    /// Since when it has used under a quarter of its lease.
    low_since: Option<Instant>,
}

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
    /// Leases to give back (their agents' load fell).
    pub releases: Vec<AllocationId>,
}

/// The serverless framework's memory on the leader.
#[derive(Debug)]
pub struct ServerlessFramework {
    lease_slots: u64,
    registering: bool,
    /// Agents whose lease is being committed.
    accepting: HashSet<AgentId>,
    /// Leases being given back.
    releasing: HashSet<AllocationId>,
    /// What each agent reported of its load.
    loads: HashMap<AgentId, Load>,
    /// The lease each agent should have, slots.
    targets: HashMap<AgentId, u64>,
}

impl ServerlessFramework {
    /// A framework that leases up to `lease_slots` slots per agent (0: none).
    pub fn new(lease_slots: u64) -> ServerlessFramework {
        ServerlessFramework {
            lease_slots,
            registering: false,
            accepting: HashSet::new(),
            releasing: HashSet::new(),
            loads: HashMap::new(),
            targets: HashMap::new(),
        }
    }

    /// Agent `agent` ran at most `busy` invocations at once since its last heartbeat.
    pub fn observe(&mut self, view: &SchedulingView, agent: &AgentId, busy: u64, now: Instant) {
        let lease = leased(view, agent);
        let low = busy * 4 < lease;
        let load = self.loads.entry(agent.clone()).or_insert(Load {
            peak: 0,
            low_since: None,
        });
        load.peak = busy;
        load.low_since = match (low, load.low_since) {
            (true, Some(since)) => Some(since),
            (true, None) => Some(now),
            (false, _) => None,
        };
    }

    /// The lease `agent` starts with: `lease_slots`, at most half of it (the rest
    /// stays for jobs and other frameworks).
    fn base(&self, capacity: u64) -> u64 {
        self.lease_slots.min(capacity / 2)
    }

    /// Updates the lease each agent should have from its load.
    fn retarget(&mut self, view: &SchedulingView, now: Instant) {
        self.targets
            .retain(|agent, _| view.agents.contains_key(agent));
        for record in view.agents.values() {
            let base = self.base(record.resources.slots);
            let lease = leased(view, &record.id);
            let target = self.targets.get(&record.id).copied().unwrap_or(base);
            let target = match self.loads.get(&record.id) {
                Some(load) if lease > 0 && load.peak * 4 >= lease * 3 => {
                    (lease * 2).min(record.resources.slots).max(target)
                }
                Some(Load {
                    low_since: Some(since),
                    ..
                }) if now.duration_since(*since) >= SHRINK_AFTER && lease > base => {
                    self.loads.remove(&record.id);
                    (lease / 2).max(base)
                }
                _ => target.max(base),
            };
            self.targets.insert(record.id.clone(), target);
        }
    }

    fn wanted(&self, view: &SchedulingView, agent: &AgentId) -> u64 {
        let Some(record) = view.agents.get(agent) else {
            return 0;
        };
        if record.state != AgentState::Active || self.accepting.contains(agent) {
            return 0;
        }
        let target = self
            .targets
            .get(agent)
            .copied()
            .unwrap_or_else(|| self.base(record.resources.slots));
        target.saturating_sub(leased(view, agent))
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
        self.retarget(view, now);
        self.releasing
            .retain(|allocation| view.allocations.contains_key(allocation));
        // Give back the newest leases of agents over their target.
        for (agent, target) in &self.targets {
            let mut held: Vec<(AllocationId, u64)> = view
                .allocations
                .values()
                .filter(|a| a.framework == id && a.agent == *agent)
                .filter(|a| !self.releasing.contains(&a.id))
                .map(|a| (a.id, a.resources.slots))
                .collect();
            held.sort();
            let mut total: u64 = held.iter().map(|(_, slots)| slots).sum();
            while total > *target {
                let Some((allocation, slots)) = held.pop() else {
                    break;
                };
                total -= slots;
                plan.releases.push(allocation);
            }
        }
        self.releasing.extend(plan.releases.iter().copied());
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
