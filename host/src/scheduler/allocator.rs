//! The allocator: which framework is offered which agent's free resources. It runs on
//! the leader, in memory, over the free resources the replicated state records, and
//! follows Mesos's hierarchical dominant resource fairness: an agent's free resources
//! go to the role with the lowest weighted dominant share, and within it to the
//! framework with the lowest dominant share. Offered resources count as held until the
//! offer is declined, rescinded, times out, or its accept is settled.
//!
//! Unlike Mesos, an agent's free resources are split when another framework waits:
//! the lowest is offered what lifts it to the next one's share (at least one slot's
//! worth), then the lowest is picked again, and so on (DRF's progressive filling, in
//! chunks), one offer per framework and agent. Without that, frameworks whose tasks
//! end together (a batch of equal tasks) refill the cluster in whole-agent chunks each
//! time, and whoever gets the last chunk overshoots its share until its tasks end.
//!
//! Offers are promises, not allocations: only a committed `Accept` allocates, and the
//! state machine refuses one whose resources are gone. So a stale offer (from a leader
//! that lost its leadership, say) can waste a proposal but never overcommit an agent.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::state::{AgentId, AgentState, FrameworkId, Resources, RoleName, SchedulingView};

/// An offer's id (unique on this leader).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct OfferId(pub u64);

impl fmt::Display for OfferId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Free resources of one agent offered to one framework.
#[derive(Debug, Clone, PartialEq)]
pub struct Offer {
    /// Its id.
    pub id: OfferId,
    /// To whom.
    pub framework: FrameworkId,
    /// Whose resources.
    pub agent: AgentId,
    /// How much.
    pub resources: Resources,
    /// The agent's attributes, for the framework's placement constraints.
    pub attributes: BTreeMap<String, String>,
    /// When it was made.
    pub made_at: Instant,
}

/// What an offer operation can fail with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OfferError {
    /// The offer is not open: it was answered, rescinded or timed out.
    #[error("offer {0} is no longer open (answered, rescinded or timed out)")]
    NotOpen(OfferId),
    /// A framework answered another framework's offer.
    #[error("offer {0} was not made to framework `{1}`")]
    NotYours(OfferId, FrameworkId),
    /// An accept used more than the offer holds.
    #[error("offer {offer} holds {offered}, less than the {used} accepted")]
    MoreThanOffered {
        /// The offer.
        offer: OfferId,
        /// What it holds.
        offered: Resources,
        /// What the accept used.
        used: Resources,
    },
}

/// Settings of the allocator.
#[derive(Debug, Clone)]
pub struct AllocatorConfig {
    /// An offer not answered within this is rescinded.
    pub offer_timeout: Duration,
    /// Free resources smaller than this (in every kind) are not offered.
    pub min_offer: Resources,
}

impl Default for AllocatorConfig {
    fn default() -> AllocatorConfig {
        AllocatorConfig {
            offer_timeout: Duration::from_secs(10),
            min_offer: Resources::new(1, 0),
        }
    }
}

struct AgentEntry {
    capacity: Resources,
    /// Committed allocations plus open and accepted offers.
    held: Resources,
    attributes: BTreeMap<String, String>,
}

struct FrameworkEntry {
    role: RoleName,
    held: Resources,
    wants_offers: bool,
    /// Agents this framework declined, until when.
    filters: HashMap<AgentId, Instant>,
}

#[derive(Default)]
struct RoleEntry {
    weight: f64,
    quota: Option<Resources>,
    held: Resources,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OfferState {
    Open,
    /// Accepted; the accept's command is being committed.
    Accepted,
}

/// A framework's share, as `GET /v1/frameworks` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Share {
    /// The framework.
    pub framework: FrameworkId,
    /// Its role.
    pub role: RoleName,
    /// What it holds (allocations and outstanding offers).
    pub held: Resources,
    /// Its dominant share of the cluster, 0-1.
    pub dominant_share: f64,
    /// Whether it wants offers now.
    pub wants_offers: bool,
}

/// The allocator's state on the leader.
pub struct Allocator {
    config: AllocatorConfig,
    agents: BTreeMap<AgentId, AgentEntry>,
    frameworks: BTreeMap<FrameworkId, FrameworkEntry>,
    roles: BTreeMap<RoleName, RoleEntry>,
    offers: BTreeMap<OfferId, (Offer, OfferState)>,
    total: Resources,
    next_offer: u64,
    /// Where the next round of offers starts, so that no agent is always first.
    cursor: Option<AgentId>,
}

impl Allocator {
    /// An allocator with no agents and no frameworks.
    pub fn new(config: AllocatorConfig) -> Allocator {
        Allocator {
            config,
            agents: BTreeMap::new(),
            frameworks: BTreeMap::new(),
            roles: BTreeMap::new(),
            offers: BTreeMap::new(),
            total: Resources::ZERO,
            next_offer: 1,
            cursor: None,
        }
    }

    /// Takes agents, frameworks, roles and allocations from the replicated state,
    /// keeping which frameworks want offers, their decline filters, and the offers
    /// that still fit. Returns the offers rescinded because their agent is gone or
    /// unreachable, their framework unregistered, or their resources no longer free.
    pub fn sync(&mut self, view: &SchedulingView) -> Vec<Offer> {
        self.agents.clear();
        self.total = Resources::ZERO;
        for agent in view.agents.values() {
            if agent.state != AgentState::Active {
                continue;
            }
            self.total = self.total.plus(&agent.resources);
            self.agents.insert(
                agent.id.clone(),
                AgentEntry {
                    capacity: agent.resources,
                    held: agent.allocated,
                    attributes: agent.attributes.clone(),
                },
            );
        }
        let mut frameworks = BTreeMap::new();
        for record in view.frameworks.values() {
            let previous = self.frameworks.remove(&record.id);
            frameworks.insert(
                record.id.clone(),
                FrameworkEntry {
                    role: record.role.clone(),
                    held: Resources::ZERO,
                    wants_offers: previous.as_ref().is_some_and(|p| p.wants_offers),
                    filters: previous.map(|p| p.filters).unwrap_or_default(),
                },
            );
        }
        self.frameworks = frameworks;
        self.roles.clear();
        for record in view.roles.values() {
            self.roles.insert(
                record.name.clone(),
                RoleEntry {
                    weight: record.weight,
                    quota: record.quota,
                    held: Resources::ZERO,
                },
            );
        }
        for framework in self.frameworks.values() {
            self.roles
                .entry(framework.role.clone())
                .or_insert_with(|| RoleEntry {
                    weight: 1.0,
                    ..RoleEntry::default()
                });
        }
        for allocation in view.allocations.values() {
            if let Some(framework) = self.frameworks.get_mut(&allocation.framework) {
                framework.held = framework.held.plus(&allocation.resources);
            }
            let role = self
                .roles
                .entry(allocation.role.clone())
                .or_insert_with(|| RoleEntry {
                    weight: 1.0,
                    ..RoleEntry::default()
                });
            role.held = role.held.plus(&allocation.resources);
        }
        // Outstanding offers. Open ones are kept, in id order, while they fit beside
        // the committed allocations and the open offers kept before them. Accepted ones
        // are not weighed: the tasks of an accept already applied show in their
        // agent's allocation until the accept settles them, so counting the offer too
        // would rescind open offers that fit. They stay held while their agent and
        // framework are there (the state machine refuses any task that does not fit).
        let mut rescinded = Vec::new();
        let mut accepted = Vec::new();
        for (id, (offer, state)) in std::mem::take(&mut self.offers) {
            let known = self.frameworks.contains_key(&offer.framework);
            let Some(agent) = self.agents.get(&offer.agent).filter(|_| known) else {
                if state == OfferState::Open {
                    rescinded.push(offer);
                }
                continue;
            };
            match state {
                OfferState::Accepted => accepted.push((id, offer)),
                OfferState::Open if offer.resources.fits_in(&agent.capacity.minus(&agent.held)) => {
                    self.hold(&offer.framework, &offer.agent, &offer.resources);
                    self.offers.insert(id, (offer, state));
                }
                OfferState::Open => rescinded.push(offer),
            }
        }
        for (id, offer) in accepted {
            self.hold(&offer.framework, &offer.agent, &offer.resources);
            self.offers.insert(id, (offer, OfferState::Accepted));
        }
        rescinded
    }

    /// Adds (or replaces) an active agent. For simulations; a leader uses [`Self::sync`].
    pub fn add_agent(
        &mut self,
        id: AgentId,
        capacity: Resources,
        attributes: BTreeMap<String, String>,
    ) {
        if let Some(old) = self.agents.remove(&id) {
            self.total = self.total.minus(&old.capacity);
        }
        self.total = self.total.plus(&capacity);
        self.agents.insert(
            id,
            AgentEntry {
                capacity,
                held: Resources::ZERO,
                attributes,
            },
        );
    }

    /// Adds a framework in `role`. For simulations; a leader uses [`Self::sync`].
    pub fn add_framework(&mut self, id: FrameworkId, role: RoleName) {
        self.roles.entry(role.clone()).or_insert_with(|| RoleEntry {
            weight: 1.0,
            ..RoleEntry::default()
        });
        self.frameworks.insert(
            id,
            FrameworkEntry {
                role,
                held: Resources::ZERO,
                wants_offers: true,
                filters: HashMap::new(),
            },
        );
    }

    /// Sets a role's weight and quota. For simulations; a leader uses [`Self::sync`].
    pub fn set_role(&mut self, role: RoleName, weight: f64, quota: Option<Resources>) {
        let entry = self.roles.entry(role).or_default();
        entry.weight = weight;
        entry.quota = quota;
    }

    /// Whether `framework` is sent offers (a framework with nothing to run suppresses
    /// them; a registered framework that is not connected gets none). Asking again
    /// after suppressing (reviving) clears its decline filters.
    pub fn set_wants_offers(&mut self, framework: &FrameworkId, wants: bool) {
        if let Some(entry) = self.frameworks.get_mut(framework) {
            if wants && !entry.wants_offers {
                entry.filters.clear();
            }
            entry.wants_offers = wants;
        }
    }

    /// Records a committed allocation. For simulations; a leader uses [`Self::sync`].
    pub fn allocate(&mut self, framework: &FrameworkId, agent: &AgentId, resources: &Resources) {
        self.hold(framework, agent, resources);
    }

    /// Records a released allocation. For simulations; a leader uses [`Self::sync`].
    pub fn release(&mut self, framework: &FrameworkId, agent: &AgentId, resources: &Resources) {
        self.unhold(framework, agent, resources);
    }

    fn hold(&mut self, framework: &FrameworkId, agent: &AgentId, resources: &Resources) {
        if let Some(entry) = self.agents.get_mut(agent) {
            entry.held = entry.held.plus(resources);
        }
        if let Some(entry) = self.frameworks.get_mut(framework) {
            entry.held = entry.held.plus(resources);
            if let Some(role) = self.roles.get_mut(&entry.role) {
                role.held = role.held.plus(resources);
            }
        }
    }

    fn unhold(&mut self, framework: &FrameworkId, agent: &AgentId, resources: &Resources) {
        if let Some(entry) = self.agents.get_mut(agent) {
            entry.held = entry.held.minus(resources);
        }
        if let Some(entry) = self.frameworks.get_mut(framework) {
            entry.held = entry.held.minus(resources);
            if let Some(role) = self.roles.get_mut(&entry.role) {
                role.held = role.held.minus(resources);
            }
        }
    }

    /// Makes offers of every agent's free resources (those not allocated nor offered)
    /// to the frameworks that want them, by weighted dominant resource fairness. An
    /// agent's free resources go to one framework (trimmed to its role's quota), or are
    /// split among several while more than one waits (see [`Self::pick`]).
    pub fn make_offers(&mut self, now: Instant) -> Vec<Offer> {
        let mut made = Vec::new();
        if self.agents.is_empty() || !self.frameworks.values().any(|f| f.wants_offers) {
            return made;
        }
        // Rotate the starting agent so that the first agents do not always go first.
        let order: Vec<AgentId> = match &self.cursor {
            Some(cursor) => self
                .agents
                .range(cursor.clone()..)
                .chain(self.agents.range(..cursor.clone()))
                .map(|(id, _)| id.clone())
                .collect(),
            None => self.agents.keys().cloned().collect(),
        };
        let mut next_cursor = None;
        // What each framework gets of this agent in this round, chunk by chunk.
        let mut chunks: Vec<(FrameworkId, Resources)> = Vec::new();
        for agent_id in order {
            let Some(agent) = self.agents.get(&agent_id) else {
                continue;
            };
            let mut free = agent.capacity.minus(&agent.held);
            while self.config.min_offer.fits_in(&free) {
                let Some((framework, resources)) = self.pick(&agent_id, free, now) else {
                    break;
                };
                self.hold(&framework, &agent_id, &resources);
                free = free.minus(&resources);
                match chunks.iter_mut().find(|(f, _)| *f == framework) {
                    Some((_, got)) => *got = got.plus(&resources),
                    None => chunks.push((framework, resources)),
                }
            }
            if chunks.is_empty() {
                continue;
            }
            if next_cursor.is_none() {
                next_cursor = Some(agent_id.clone());
            }
            let attributes = self
                .agents
                .get(&agent_id)
                .map(|a| a.attributes.clone())
                .unwrap_or_default();
            for (framework, resources) in chunks.drain(..) {
                let offer = Offer {
                    id: OfferId(self.next_offer),
                    framework,
                    agent: agent_id.clone(),
                    resources,
                    attributes: attributes.clone(),
                    made_at: now,
                };
                self.next_offer += 1;
                self.offers
                    .insert(offer.id, (offer.clone(), OfferState::Open));
                made.push(offer);
            }
        }
        // Next time, start just after the first agent offered this time.
        if let Some(first) = next_cursor {
            self.cursor = self
                .agents
                .range((std::ops::Bound::Excluded(first), std::ops::Bound::Unbounded))
                .next()
                .map(|(id, _)| id.clone());
        }
        made
    }

    /// The framework that gets (a chunk of) `free` of `agent`, and how much: the
    /// lowest weighted dominant share of role, then of framework. Its role's quota may
    /// trim the amount. While another framework could take the agent too, it gets only
    /// what lifts it to that framework's share (in its role's weighted share, or in its
    /// own within one role), and at least one slot's worth.
    fn pick(
        &self,
        agent: &AgentId,
        free: Resources,
        now: Instant,
    ) -> Option<(FrameworkId, Resources)> {
        let mut best: Option<((f64, f64), &FrameworkId, Resources)> = None;
        // The runner-up's key and role.
        let mut next: Option<((f64, f64), &RoleName)> = None;
        for (id, framework) in &self.frameworks {
            if !framework.wants_offers {
                continue;
            }
            if framework
                .filters
                .get(agent)
                .is_some_and(|until| *until > now)
            {
                continue;
            }
            let role = self.roles.get(&framework.role);
            let amount = match role.and_then(|r| r.quota.map(|q| q.minus(&r.held))) {
                Some(headroom) => free.min(&headroom),
                None => free,
            };
            if !self.config.min_offer.fits_in(&amount) || amount.is_zero() {
                continue;
            }
            let role_share = role.map_or(0.0, |r| {
                r.held.dominant_share(&self.total) / r.weight.max(f64::MIN_POSITIVE)
            });
            let key = (role_share, framework.held.dominant_share(&self.total));
            match &best {
                Some((k, _, _)) if key >= *k => {
                    if next.is_none_or(|(n, _)| key < n) {
                        next = Some((key, &framework.role));
                    }
                }
                _ => {
                    next =
                        best.and_then(|(k, id, _)| self.frameworks.get(id).map(|f| (k, &f.role)));
                    best = Some((key, id, amount));
                }
            }
        }
        let (key, id, amount) = best?;
        let Some(next) = next else {
            return Some((id.clone(), amount));
        };
        let Some(framework) = self.frameworks.get(id) else {
            return Some((id.clone(), amount));
        };
        let ((next_role_share, next_share), next_role) = next;
        let (held, target) = match self.roles.get(&framework.role) {
            Some(role) if *next_role != framework.role => {
                (role.held, next_role_share.max(key.0) * role.weight)
            }
            _ => (framework.held, next_share),
        };
        let chunk = fair_slice(&amount, &held, &self.total, target);
        if chunk.is_zero() || !self.config.min_offer.fits_in(&chunk) {
            return Some((id.clone(), amount));
        }
        Some((id.clone(), chunk))
    }

    /// Offers older than the offer timeout, now rescinded.
    pub fn expire(&mut self, now: Instant) -> Vec<Offer> {
        let timeout = self.config.offer_timeout;
        let expired: Vec<OfferId> = self
            .offers
            .iter()
            .filter(|(_, (offer, state))| {
                *state == OfferState::Open && now.duration_since(offer.made_at) >= timeout
            })
            .map(|(id, _)| *id)
            .collect();
        expired
            .into_iter()
            .filter_map(|id| self.close(id))
            .collect()
    }

    /// Withdraws the open offers made to `framework` (it went away).
    pub fn rescind_framework(&mut self, framework: &FrameworkId) -> Vec<Offer> {
        let ids: Vec<OfferId> = self
            .offers
            .iter()
            .filter(|(_, (offer, state))| {
                *state == OfferState::Open && offer.framework == *framework
            })
            .map(|(id, _)| *id)
            .collect();
        ids.into_iter().filter_map(|id| self.close(id)).collect()
    }

    /// Rescinds the open offers of `agent` (it was lost).
    pub fn rescind_agent(&mut self, agent: &AgentId) -> Vec<Offer> {
        let ids: Vec<OfferId> = self
            .offers
            .iter()
            .filter(|(_, (offer, state))| *state == OfferState::Open && offer.agent == *agent)
            .map(|(id, _)| *id)
            .collect();
        ids.into_iter().filter_map(|id| self.close(id)).collect()
    }

    /// Removes an offer and stops holding its resources.
    fn close(&mut self, id: OfferId) -> Option<Offer> {
        let (offer, _) = self.offers.remove(&id)?;
        self.unhold(&offer.framework, &offer.agent, &offer.resources);
        Some(offer)
    }

    /// `framework` accepts `used` of offer `id`: the rest returns to the pool, `used`
    /// stays held until [`Self::settle`] (called once the accept's command is decided).
    pub fn accept(
        &mut self,
        id: OfferId,
        framework: &FrameworkId,
        used: Resources,
    ) -> Result<Offer, OfferError> {
        let offer = match self.offers.get(&id) {
            Some((offer, OfferState::Open)) => offer.clone(),
            _ => return Err(OfferError::NotOpen(id)),
        };
        if offer.framework != *framework {
            return Err(OfferError::NotYours(id, framework.clone()));
        }
        if !used.fits_in(&offer.resources) {
            return Err(OfferError::MoreThanOffered {
                offer: id,
                offered: offer.resources,
                used,
            });
        }
        let unused = offer.resources.minus(&used);
        self.unhold(framework, &offer.agent, &unused);
        let accepted = Offer {
            resources: used,
            ..offer
        };
        if used.is_zero() {
            self.offers.remove(&id);
        } else {
            self.offers
                .insert(id, (accepted.clone(), OfferState::Accepted));
        }
        Ok(accepted)
    }

    /// The accept of offer `id` was decided (committed and applied here, or refused):
    /// the offer is done and no longer held. What it allocated is in the replicated
    /// state, which the next [`Self::sync`] reads before any new offer is made (a
    /// simulation calls [`Self::allocate`] instead).
    pub fn settle(&mut self, id: OfferId) {
        if let Some((offer, _)) = self.offers.remove(&id) {
            self.unhold(&offer.framework, &offer.agent, &offer.resources);
        }
    }

    /// Part of accepted offer `id` was decided (one task's commit was applied here, or
    /// refused): that part is no longer held by the offer (the state has it now).
    pub fn settle_part(&mut self, id: OfferId, part: &Resources) {
        let Some((offer, OfferState::Accepted)) = self.offers.get_mut(&id) else {
            return;
        };
        let part = part.min(&offer.resources);
        offer.resources = offer.resources.minus(&part);
        let (framework, agent, empty) = (
            offer.framework.clone(),
            offer.agent.clone(),
            offer.resources.is_zero(),
        );
        if empty {
            self.offers.remove(&id);
        }
        self.unhold(&framework, &agent, &part);
    }

    /// `framework` declines offer `id`: its agent is not offered to it again for
    /// `refuse_for` (unless it asks for offers anew).
    pub fn decline(
        &mut self,
        id: OfferId,
        framework: &FrameworkId,
        refuse_for: Duration,
        now: Instant,
    ) -> Result<(), OfferError> {
        match self.offers.get(&id) {
            Some((offer, OfferState::Open)) if offer.framework == *framework => {}
            Some((_, OfferState::Open)) => return Err(OfferError::NotYours(id, framework.clone())),
            _ => return Err(OfferError::NotOpen(id)),
        }
        if let Some(offer) = self.close(id) {
            if let Some(entry) = self.frameworks.get_mut(framework) {
                entry.filters.insert(offer.agent, now + refuse_for);
            }
        }
        Ok(())
    }

    /// Open offers, oldest first.
    pub fn open_offers(&self) -> Vec<Offer> {
        self.offers
            .values()
            .filter(|(_, state)| *state == OfferState::Open)
            .map(|(offer, _)| offer.clone())
            .collect()
    }

    /// Every framework's holdings and dominant share.
    pub fn shares(&self) -> Vec<Share> {
        self.frameworks
            .iter()
            .map(|(id, f)| Share {
                framework: id.clone(),
                role: f.role.clone(),
                held: f.held,
                dominant_share: f.held.dominant_share(&self.total),
                wants_offers: f.wants_offers,
            })
            .collect()
    }

    /// The sum of the active agents' capacities.
    pub fn total(&self) -> Resources {
        self.total
    }

    /// Agents holding more than their capacity (a bug if ever non-empty).
    pub fn overcommitted(&self) -> Vec<AgentId> {
        self.agents
            .iter()
            .filter(|(_, a)| !a.held.fits_in(&a.capacity))
            .map(|(id, _)| id.clone())
            .collect()
    }
}

/// The smallest slice of `free` (the same fraction of every kind, rounded up to whole
/// units, and at least one slot's worth) that lifts `held`'s dominant share of `total`
/// to `share`.
fn fair_slice(free: &Resources, held: &Resources, total: &Resources, share: f64) -> Resources {
    // Rounding up with a little slack, so that 1/3 of 24 is 8, not 9.
    let up = |x: f64| (x - 1e-6).ceil().max(0.0) as u64;
    let kinds = [
        (free.slots, held.slots, total.slots),
        (free.memory_mb, held.memory_mb, total.memory_mb),
        (free.accelerators, held.accelerators, total.accelerators),
    ];
    // The share is reached when the first kind reaches it.
    let mut fraction = 1.0f64;
    for (free, held, total) in kinds {
        if free > 0 && total > 0 {
            let room = up(share * total as f64).saturating_sub(held);
            fraction = fraction.min(room as f64 / free as f64);
        }
    }
    if free.slots > 0 {
        fraction = fraction.max(1.0 / free.slots as f64);
    }
    let part = |free: u64| up(free as f64 * fraction).min(free);
    Resources {
        slots: part(free.slots),
        memory_mb: part(free.memory_mb),
        accelerators: part(free.accelerators),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::simulation::{self, SimConfig};
    use crate::state::{AgentRecord, FrameworkRecord, RoleRecord};

    use crate::state::ident::test_id as id;

    fn two_agents() -> Allocator {
        let mut allocator = Allocator::new(AllocatorConfig::default());
        allocator.add_agent(id("a"), Resources::new(4, 4096), BTreeMap::new());
        allocator.add_agent(
            id("b"),
            Resources::new(4, 4096),
            BTreeMap::from([("zone".into(), "b".into())]),
        );
        allocator
    }

    #[test]
    fn weighted_drf_converges_to_the_weights() {
        let report = simulation::run(&SimConfig {
            agents: 200,
            agent: Resources::new(16, 16384),
            weights: vec![1.0, 2.0],
            task: Resources::new(1, 256),
            rounds: 400,
            max_task_rounds: 6,
            seed: 7,
        });
        assert!(!report.overcommitted);
        let [one, two] = report.mean_shares[..] else {
            panic!("two frameworks");
        };
        // Saturated: together they hold (nearly) everything, at about 1:2.
        assert!(one + two > 0.9, "shares {one} + {two}");
        let ratio = two / one;
        assert!((1.8..=2.2).contains(&ratio), "ratio {ratio}");
    }

    #[test]
    fn an_agent_is_split_so_that_no_framework_overshoots_while_another_waits() {
        // Light (weight 1) and heavy (weight 2) refill a cluster of 3 x 8 slots: light
        // holds 5, heavy 11, agent c is free. Light has the lowest weighted share, but
        // all of c would lift it to 13 slots; filled chunk by chunk, it gets 3 (its fair
        // 8) and heavy the 5 left (its fair 16), one offer each.
        let mut allocator = Allocator::new(AllocatorConfig::default());
        for agent in ["a", "b", "c"] {
            allocator.add_agent(id(agent), Resources::new(8, 8192), BTreeMap::new());
        }
        let (light, heavy): (FrameworkId, FrameworkId) = (id("light"), id("heavy"));
        allocator.set_role(id("light"), 1.0, None);
        allocator.set_role(id("heavy"), 2.0, None);
        allocator.add_framework(light.clone(), id("light"));
        allocator.add_framework(heavy.clone(), id("heavy"));
        let slot = Resources::new(1, 128);
        allocator.allocate(&light, &id("a"), &slot.times(5));
        allocator.allocate(&heavy, &id("a"), &slot.times(3));
        allocator.allocate(&heavy, &id("b"), &slot.times(8));
        let offers = allocator.make_offers(Instant::now());
        let got: Vec<(&str, &str, Resources)> = offers
            .iter()
            .map(|o| (o.framework.as_str(), o.agent.as_str(), o.resources))
            .collect();
        assert_eq!(
            got,
            [
                ("light", "c", Resources::new(3, 3072)),
                ("heavy", "c", Resources::new(5, 5120)),
            ]
        );
        // One framework alone takes a whole agent, past any fair share.
        let mut alone = two_agents();
        alone.add_framework(id("f"), id("r"));
        let offers = alone.make_offers(Instant::now());
        assert_eq!(offers.len(), 2);
        assert!(offers
            .iter()
            .all(|o| o.resources == Resources::new(4, 4096)));
    }

    #[test]
    fn an_accept_keeps_what_it_uses_and_frees_the_rest() {
        let mut allocator = two_agents();
        let f: FrameworkId = id("f");
        allocator.add_framework(f.clone(), id("r"));
        let now = Instant::now();
        let offers = allocator.make_offers(now);
        assert_eq!(offers.len(), 2);
        assert!(
            allocator.make_offers(now).is_empty(),
            "everything is offered"
        );
        let accepted = allocator.accept(offers[0].id, &f, Resources::new(1, 100));
        assert!(accepted.is_ok());
        // Accepting twice, or someone else's offer, fails.
        assert_eq!(
            allocator.accept(offers[0].id, &f, Resources::new(1, 100)),
            Err(OfferError::NotOpen(offers[0].id))
        );
        assert!(matches!(
            allocator.accept(offers[1].id, &id("g"), Resources::new(1, 1)),
            Err(OfferError::NotYours(..))
        ));
        assert!(matches!(
            allocator.accept(offers[1].id, &f, Resources::new(5, 1)),
            Err(OfferError::MoreThanOffered { .. })
        ));
        allocator.settle(offers[0].id);
        allocator.allocate(&f, &offers[0].agent, &Resources::new(1, 100));
        // The unused rest of the first agent is offered again.
        let again = allocator.make_offers(now);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].agent, offers[0].agent);
        assert_eq!(again[0].resources, Resources::new(3, 3996));
    }

    #[test]
    fn declines_filter_timeouts_rescind_and_quotas_trim() {
        let mut allocator = Allocator::new(AllocatorConfig {
            offer_timeout: Duration::from_secs(5),
            ..AllocatorConfig::default()
        });
        allocator.add_agent(id("a"), Resources::new(4, 4096), BTreeMap::new());
        let f: FrameworkId = id("f");
        allocator.add_framework(f.clone(), id("r"));
        let t0 = Instant::now();
        let offer = allocator.make_offers(t0).remove(0);
        assert_eq!(
            allocator.decline(offer.id, &f, Duration::from_secs(30), t0),
            Ok(())
        );
        assert!(allocator
            .make_offers(t0 + Duration::from_secs(29))
            .is_empty());
        let offer = allocator
            .make_offers(t0 + Duration::from_secs(31))
            .remove(0);
        // Unanswered past the timeout: rescinded, then offered anew.
        assert!(allocator.expire(t0 + Duration::from_secs(32)).is_empty());
        let expired = allocator.expire(t0 + Duration::from_secs(37));
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].id, offer.id);
        assert_eq!(
            allocator.decline(offer.id, &f, Duration::ZERO, t0),
            Err(OfferError::NotOpen(offer.id))
        );
        // A quota trims what the role is offered.
        allocator.set_role(id("r"), 1.0, Some(Resources::new(2, 1 << 20)));
        let offer = allocator
            .make_offers(t0 + Duration::from_secs(38))
            .remove(0);
        assert_eq!(offer.resources, Resources::new(2, 4096));
        let rescinded = allocator.rescind_agent(&id("a"));
        assert_eq!(rescinded.len(), 1);
    }

    #[test]
    fn sync_takes_the_replicated_state_and_rescinds_what_no_longer_fits() {
        let mut allocator = Allocator::new(AllocatorConfig::default());
        let agent = |name: &str, state| AgentRecord {
            id: id(name),
            rpc: "127.0.0.1:1".into(),
            resources: Resources::new(4, 4096),
            allocated: Resources::ZERO,
            attributes: BTreeMap::new(),
            state,
            registered_at_ms: 0,
            changed_at_ms: 0,
        };
        let mut view = SchedulingView::default();
        for (name, state) in [("a", AgentState::Active), ("b", AgentState::Active)] {
            view.agents.insert(id(name), agent(name, state));
        }
        let f: FrameworkId = id("f");
        view.frameworks.insert(
            f.clone(),
            FrameworkRecord {
                id: f.clone(),
                name: "f".into(),
                role: id("r"),
                registered_at_ms: 0,
            },
        );
        view.roles.insert(
            id("r"),
            RoleRecord {
                name: id("r"),
                weight: 3.0,
                quota: None,
            },
        );
        assert!(allocator.sync(&view).is_empty());
        // Registered but not asking: no offers.
        assert!(allocator.make_offers(Instant::now()).is_empty());
        allocator.set_wants_offers(&f, true);
        assert_eq!(allocator.make_offers(Instant::now()).len(), 2);
        // Agent b becomes unreachable: its offer is rescinded; a's is kept.
        view.agents
            .insert(id("b"), agent("b", AgentState::Unreachable));
        let rescinded = allocator.sync(&view);
        assert_eq!(rescinded.len(), 1);
        assert_eq!(rescinded[0].agent.as_str(), "b");
        assert_eq!(allocator.open_offers().len(), 1);
        assert_eq!(allocator.total(), Resources::new(4, 4096));
        assert!(allocator.overcommitted().is_empty());
    }

    #[test]
    fn an_accept_half_applied_does_not_rescind_the_open_offers_beside_it() {
        let mut allocator = Allocator::new(AllocatorConfig::default());
        let mut view = SchedulingView::default();
        let agent = AgentRecord {
            id: id("a"),
            rpc: "127.0.0.1:1".into(),
            resources: Resources::new(4, 4096),
            allocated: Resources::ZERO,
            attributes: BTreeMap::new(),
            state: AgentState::Active,
            registered_at_ms: 0,
            changed_at_ms: 0,
        };
        view.agents.insert(id("a"), agent.clone());
        let f: FrameworkId = id("f");
        view.frameworks.insert(
            f.clone(),
            FrameworkRecord {
                id: f.clone(),
                name: "f".into(),
                role: id("r"),
                registered_at_ms: 0,
            },
        );
        assert!(allocator.sync(&view).is_empty());
        allocator.set_wants_offers(&f, true);
        let first = allocator.make_offers(Instant::now());
        assert_eq!(first.len(), 1);
        // f accepts half of the agent for two tasks; the other half is offered again.
        let task = Resources::new(1, 1024);
        allocator
            .accept(first[0].id, &f, task.times(2))
            .map_err(|e| e.to_string())
            .unwrap();
        let second = allocator.make_offers(Instant::now());
        assert_eq!(second.len(), 1);
        assert_eq!(second[0].resources, Resources::new(2, 2048));
        // One task's commit is applied (the agent's allocation has it) before the
        // accept settles it: the open offer still fits, and nothing is overcommitted
        // once the accept settles.
        view.agents.insert(
            id("a"),
            AgentRecord {
                allocated: task,
                ..agent
            },
        );
        assert!(allocator.sync(&view).is_empty(), "nothing is rescinded");
        assert_eq!(allocator.open_offers().len(), 1);
        allocator.settle_part(first[0].id, &task);
        allocator.settle(first[0].id);
        assert!(allocator.overcommitted().is_empty());
    }
}
