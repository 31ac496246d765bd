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
//!
//! Devices are leased on demand: when an agent reports invocations granted a device
//! (functions deployed with `accel`), the framework takes that many of its devices
//! (at most all of them) in leases of one device each (no slots), so jobs are not placed on
//! them meanwhile and DRF counts them as the framework's; it gives them back after a
//! few seconds with fewer such invocations. Invocations do not wait for that lease: an
//! agent with a matching device serves them in the meantime (each in its own session),
//! and gateways send them to agents whose lease holds a device first.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use super::{Allocator, Offer, OfferId};
use crate::state::{
    AgentId, AgentState, Allocation, AllocationId, Command, FrameworkId, Resources, RoleName,
    SchedulingView,
};

/// The serverless framework's id (and role).
pub const SERVERLESS_FRAMEWORK: &str = "serverless";
/// Guest memory leased per slot, MiB (the default memory limit of a function).
pub const LEASE_MB_PER_SLOT: u64 = 128;
/// How long a declined agent is not offered to the framework again.
const REFUSE_FOR: Duration = Duration::from_secs(5);
/// How long an agent's lease must be mostly idle before it shrinks.
const SHRINK_AFTER: Duration = Duration::from_secs(3);

/// What an agent reports in a heartbeat: the most invocations it ran at once since
/// its last one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AgentLoad {
    /// Invocations (slots in use).
    pub slots: u64,
    /// Invocations granted a device.
    pub accelerators: u64,
}

/// What an agent last reported of its invocations.
#[derive(Debug, Clone, Copy)]
struct Load {
    /// The most invocations it ran at once in its last heartbeat interval.
    peak: u64,
    /// Since when it has used under a quarter of its lease.
    low_since: Option<Instant>,
}

/// What an agent last reported of its invocations granted a device.
#[derive(Debug, Clone, Copy, Default)]
struct DeviceLoad {
    /// The most that ran at once in its last heartbeat interval.
    peak: u64,
    /// Since when it has used fewer devices than its target.
    low_since: Option<Instant>,
}

/// The serverless framework's id.
pub fn framework_id() -> FrameworkId {
    FrameworkId::from_static(SERVERLESS_FRAMEWORK)
}

/// The framework's leases in one view, by agent: read once per round, so that a round
/// costs one pass over the allocations, not one per agent.
struct Leases<'a> {
    by_agent: HashMap<&'a AgentId, Vec<&'a Allocation>>,
}

impl<'a> Leases<'a> {
    fn of(view: &'a SchedulingView) -> Leases<'a> {
        let id = framework_id();
        let mut by_agent: HashMap<&AgentId, Vec<&Allocation>> = HashMap::new();
        for allocation in view.allocations.values() {
            if allocation.framework == id {
                by_agent
                    .entry(&allocation.agent)
                    .or_default()
                    .push(allocation);
            }
        }
        Leases { by_agent }
    }

    /// The leases on `agent`.
    fn on(&self, agent: &AgentId) -> &[&'a Allocation] {
        self.by_agent.get(agent).map_or(&[], Vec::as_slice)
    }

    /// What the leases on `agent` hold.
    fn held(&self, agent: &AgentId) -> Resources {
        self.on(agent)
            .iter()
            .fold(Resources::ZERO, |sum, a| sum.plus(&a.resources))
    }
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
    /// What each agent reported of its invocations granted a device.
    device_loads: HashMap<AgentId, DeviceLoad>,
    /// The devices each agent's leases should hold.
    device_targets: HashMap<AgentId, u64>,
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
            device_loads: HashMap::new(),
            device_targets: HashMap::new(),
        }
    }

    /// Agent `agent` ran at most `load` invocations at once since its last heartbeat.
    pub fn observe(
        &mut self,
        view: &SchedulingView,
        agent: &AgentId,
        load: AgentLoad,
        now: Instant,
    ) {
        let leases = Leases::of(view);
        // Devices: grow at once to what ran (up to the agent's devices).
        let mut target = self.device_target(&leases, agent);
        if load.accelerators > target {
            let devices = view
                .agents
                .get(agent)
                .map_or(0, |r| r.resources.accelerators);
            target = load.accelerators.min(devices);
        }
        self.device_targets.insert(agent.clone(), target);
        let devices = self.device_loads.entry(agent.clone()).or_default();
        devices.peak = load.accelerators;
        devices.low_since = match (load.accelerators < target, devices.low_since) {
            (true, Some(since)) => Some(since),
            (true, None) => Some(now),
            (false, _) => None,
        };
        let busy = load.slots;
        let lease = leases.held(agent).slots;
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

    /// The devices `agent`'s leases should hold: at first what they hold (a new leader
    /// keeps the device leases it finds until the agent's load says otherwise).
    fn device_target(&self, leases: &Leases<'_>, agent: &AgentId) -> u64 {
        self.device_targets
            .get(agent)
            .copied()
            .unwrap_or_else(|| leases.held(agent).accelerators)
    }

    /// The lease `agent` starts with: `lease_slots`, at most half of it (the rest
    /// stays for jobs and other frameworks).
    fn base(&self, capacity: u64) -> u64 {
        self.lease_slots.min(capacity / 2)
    }

    /// Updates the lease each agent should have from its load.
    fn retarget(&mut self, view: &SchedulingView, leases: &Leases<'_>, now: Instant) {
        self.targets
            .retain(|agent, _| view.agents.contains_key(agent));
        self.device_targets
            .retain(|agent, _| view.agents.contains_key(agent));
        self.device_loads
            .retain(|agent, _| view.agents.contains_key(agent));
        for record in view.agents.values() {
            let devices = record.resources.accelerators;
            let current = self.device_target(leases, &record.id);
            let target = match self.device_loads.get_mut(&record.id) {
                // Shrink to what ran after a while with less (growing is at once, in
                // `observe`).
                Some(load)
                    if load
                        .low_since
                        .is_some_and(|since| now.duration_since(since) >= SHRINK_AFTER) =>
                {
                    load.low_since = None;
                    load.peak
                }
                _ => current,
            };
            self.device_targets
                .insert(record.id.clone(), target.min(devices));
            let base = self.base(record.resources.slots);
            let lease = leases.held(&record.id).slots;
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

    /// What `agent`'s leases lack: slots, and devices.
    fn wanted(&self, view: &SchedulingView, leases: &Leases<'_>, agent: &AgentId) -> (u64, u64) {
        let Some(record) = view.agents.get(agent) else {
            return (0, 0);
        };
        if record.state != AgentState::Active || self.accepting.contains(agent) {
            return (0, 0);
        }
        let target = self
            .targets
            .get(agent)
            .copied()
            .unwrap_or_else(|| self.base(record.resources.slots));
        let devices = self.device_target(leases, agent);
        let held = leases.held(agent);
        (
            target.saturating_sub(held.slots),
            devices.saturating_sub(held.accelerators),
        )
    }

    /// Whether some active agent has less than its lease.
    pub fn wants_offers(&self, view: &SchedulingView) -> bool {
        if self.lease_slots == 0 {
            return false;
        }
        let leases = Leases::of(view);
        view.agents
            .keys()
            .any(|a| self.wanted(view, &leases, a) != (0, 0))
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
        let leases = Leases::of(view);
        self.retarget(view, &leases, now);
        self.releasing
            .retain(|allocation| view.allocations.contains_key(allocation));
        // Give back the newest leases of agents over their target: slot leases and
        // device leases (which hold no slots) each against their own target.
        let releases = self.over(&leases, &self.targets, |r| r.slots);
        plan.releases.extend(releases);
        let releases = self.over(&leases, &self.device_targets, |r| r.accelerators);
        plan.releases.extend(releases);
        self.releasing.extend(plan.releases.iter().copied());
        for offer in offers {
            let (slots, devices) = self.wanted(view, &leases, &offer.agent);
            // A device lease holds one device and no slots, so that the leases shrink
            // one device at a time and giving one back frees no slots.
            let lease = if devices > 0 && offer.resources.accelerators > 0 {
                Resources {
                    accelerators: 1,
                    ..Resources::ZERO
                }
            } else {
                let slots = slots
                    .min(offer.resources.slots)
                    .min(offer.resources.memory_mb / LEASE_MB_PER_SLOT);
                Resources::new(slots, slots * LEASE_MB_PER_SLOT)
            };
            if lease.is_zero() {
                let _ = allocator.decline(offer.id, &id, REFUSE_FOR, now);
                continue;
            }
            if allocator.accept(offer.id, &id, lease).is_ok() {
                self.accepting.insert(offer.agent.clone());
                plan.leases.push((offer.id, offer.agent, lease));
            }
        }
        plan
    }

    /// The newest leases to give back so that, on each agent of `targets`, what
    /// `amount` counts of its leases comes down to its target. Only leases holding
    /// some of that amount count (slot leases hold no devices, device leases no slots).
    fn over(
        &self,
        leases: &Leases<'_>,
        targets: &HashMap<AgentId, u64>,
        amount: impl Fn(&Resources) -> u64,
    ) -> Vec<AllocationId> {
        let mut releases = Vec::new();
        for (agent, target) in targets {
            let mut held: Vec<(AllocationId, u64)> = leases
                .on(agent)
                .iter()
                .filter(|a| !self.releasing.contains(&a.id))
                .map(|a| (a.id, amount(&a.resources)))
                .filter(|(_, n)| *n > 0)
                .collect();
            held.sort();
            let mut total: u64 = held.iter().map(|(_, n)| n).sum();
            while total > *target {
                let Some((allocation, n)) = held.pop() else {
                    break;
                };
                total -= n;
                releases.push(allocation);
            }
        }
        releases
    }

    /// The lease on `agent` was decided (committed or refused).
    pub fn accepted(&mut self, agent: &AgentId) {
        self.accepting.remove(agent);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::scheduler::AllocatorConfig;
    use crate::state::{AgentRecord, Allocation, FrameworkRecord};

    fn agent() -> AgentId {
        AgentId::from_static("a1")
    }

    /// Agent `a1` (8 slots, 2 devices) with the framework's `leases` on it.
    fn view(leases: &[Resources]) -> SchedulingView {
        let mut view = SchedulingView::default();
        let allocated = leases.iter().fold(Resources::ZERO, |sum, r| sum.plus(r));
        view.agents.insert(
            agent(),
            AgentRecord {
                id: agent(),
                rpc: "127.0.0.1:9".into(),
                resources: Resources {
                    slots: 8,
                    memory_mb: 4096,
                    accelerators: 2,
                },
                allocated,
                attributes: BTreeMap::new(),
                state: AgentState::Active,
                registered_at_ms: 0,
                changed_at_ms: 0,
            },
        );
        let role = RoleName::from_static(SERVERLESS_FRAMEWORK);
        view.frameworks.insert(
            framework_id(),
            FrameworkRecord {
                id: framework_id(),
                name: "serverless".into(),
                role: role.clone(),
                registered_at_ms: 0,
            },
        );
        for (i, resources) in leases.iter().enumerate() {
            let id = AllocationId(i as u64 + 1);
            view.allocations.insert(
                id,
                Allocation {
                    id,
                    framework: framework_id(),
                    role: role.clone(),
                    agent: agent(),
                    resources: *resources,
                    allocated_at_ms: 0,
                    task: None,
                },
            );
        }
        view
    }

    /// One round at `now`: offers of what `view` has free, and the framework's plan.
    fn round(framework: &mut ServerlessFramework, view: &SchedulingView, now: Instant) -> Plan {
        let mut allocator = Allocator::new(AllocatorConfig::default());
        allocator.sync(view);
        allocator.set_wants_offers(&framework_id(), framework.wants_offers(view));
        let offers = allocator.make_offers(now);
        let plan = framework.plan(view, offers, &mut allocator, now, 0);
        framework.accepted(&agent());
        plan
    }

    fn load(slots: u64, accelerators: u64) -> AgentLoad {
        AgentLoad {
            slots,
            accelerators,
        }
    }

    #[test]
    fn devices_are_leased_while_invocations_use_them_and_given_back_one_by_one() {
        let mut framework = ServerlessFramework::new(4);
        let slots = Resources::new(4, 4 * LEASE_MB_PER_SLOT);
        let device = Resources {
            accelerators: 1,
            ..Resources::ZERO
        };
        let start = Instant::now();
        let at = |secs: u64| start + Duration::from_secs(secs);

        // Invocations without a device lease none.
        let plain = view(&[slots]);
        framework.observe(&plain, &agent(), load(2, 0), at(0));
        let plan = round(&mut framework, &plain, at(0));
        assert!(
            plan.leases.is_empty() && plan.releases.is_empty(),
            "{plan:?}"
        );

        // Two ran at once with a device: both devices are leased, one per lease.
        framework.observe(&plain, &agent(), load(2, 2), at(1));
        let plan = round(&mut framework, &plain, at(1));
        let taken: Vec<Resources> = plan.leases.iter().map(|(_, _, r)| *r).collect();
        assert_eq!(taken, vec![device], "{plan:?}");
        let one = view(&[slots, device]);
        let plan = round(&mut framework, &one, at(1));
        let taken: Vec<Resources> = plan.leases.iter().map(|(_, _, r)| *r).collect();
        assert_eq!(taken, vec![device], "{plan:?}");
        let both = view(&[slots, device, device]);
        assert!(!framework.wants_offers(&both));

        // One in use: the newest device lease goes back after a while, not at once.
        framework.observe(&both, &agent(), load(1, 1), at(2));
        let plan = round(&mut framework, &both, at(3));
        assert!(plan.releases.is_empty(), "{plan:?}");
        framework.observe(&both, &agent(), load(1, 1), at(3));
        let plan = round(&mut framework, &both, at(2) + SHRINK_AFTER);
        assert_eq!(plan.releases, vec![AllocationId(3)], "{plan:?}");
        assert!(plan.leases.is_empty(), "{plan:?}");

        // None in use: the other goes back too; the slot lease stays.
        let one = view(&[slots, device]);
        framework.observe(&one, &agent(), load(0, 0), at(6));
        let plan = round(&mut framework, &one, at(6));
        assert!(plan.releases.is_empty(), "{plan:?}");
        let plan = round(&mut framework, &one, at(6) + SHRINK_AFTER);
        assert_eq!(plan.releases, vec![AllocationId(2)], "{plan:?}");
        let none = view(&[slots]);
        assert!(!framework.wants_offers(&none));
    }

    #[test]
    fn a_new_leader_keeps_the_device_leases_it_finds_until_they_idle() {
        let slots = Resources::new(4, 4 * LEASE_MB_PER_SLOT);
        let device = Resources {
            accelerators: 1,
            ..Resources::ZERO
        };
        let held = view(&[slots, device]);
        let start = Instant::now();
        let mut framework = ServerlessFramework::new(4);
        let plan = round(&mut framework, &held, start);
        assert!(
            plan.releases.is_empty() && plan.leases.is_empty(),
            "{plan:?}"
        );
        framework.observe(&held, &agent(), load(0, 0), start);
        let plan = round(&mut framework, &held, start + SHRINK_AFTER);
        assert_eq!(plan.releases, vec![AllocationId(2)], "{plan:?}");
    }
}
