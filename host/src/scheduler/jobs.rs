//! The built-in jobs framework (durable path), on the leader: it asks for offers while
//! jobs wait, places waiting jobs into the offers it gets (first come, first placed;
//! resources and placement constraints must fit), declines what it cannot use, and
//! keeps a visible reason on jobs that cannot be placed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use super::{Allocator, Offer, OfferId};
use crate::digest::Digest;
use crate::runtime::Limits;
use crate::state::{
    AgentId, AgentState, Command, Constraint, FrameworkId, FunctionName, JobId, JobRecord,
    RoleName, SchedulingView, TaskRef,
};

/// The jobs framework's id (and role).
pub const JOBS_FRAMEWORK: &str = "jobs";

/// How long a declined agent is not offered to the jobs framework again.
const REFUSE_FOR: Duration = Duration::from_secs(1);

/// The jobs framework's id.
pub fn framework_id() -> FrameworkId {
    FrameworkId::from_static(JOBS_FRAMEWORK)
}

/// What an agent needs to run an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchSpec {
    /// The attempt.
    pub task: TaskRef,
    /// The function (for its name in logs and `argv[0]`).
    pub function: FunctionName,
    /// The module's digest.
    pub module: Digest,
    /// Limits of the run.
    pub limits: Limits,
    /// Environment.
    pub env: BTreeMap<String, String>,
    /// The input's digest.
    pub input: Digest,
}

impl LaunchSpec {
    /// The launch of `job`'s current attempt, if it has one.
    pub fn of(job: &JobRecord) -> Option<LaunchSpec> {
        let attempt = job.current()?;
        Some(LaunchSpec {
            task: TaskRef {
                job: job.id,
                attempt: attempt.number,
            },
            function: job.function.clone(),
            module: attempt.module,
            limits: attempt.limits,
            env: attempt.env.clone(),
            input: job.input,
        })
    }
}

/// The launches due on `agent`: current attempts placed there and not ended.
pub fn assigned(view: &SchedulingView, agent: &AgentId) -> Vec<LaunchSpec> {
    view.jobs
        .values()
        .filter(|job| {
            job.current()
                .is_some_and(|a| a.agent == *agent && a.state.is_live())
        })
        .filter_map(|job| LaunchSpec::of(job))
        .collect()
}

/// What one round of the jobs framework decided.
#[derive(Debug, Default)]
pub struct Plan {
    /// Register the framework first.
    pub register: Option<Command>,
    /// Accepted offers: the offer, its agent, the jobs placed in it.
    pub launches: Vec<(OfferId, AgentId, Vec<JobId>)>,
    /// Reasons to record on waiting jobs.
    pub reasons: Vec<Command>,
}

/// The jobs framework's memory on the leader.
#[derive(Debug, Default)]
pub struct JobsFramework {
    registering: bool,
    /// Jobs whose launch is being committed.
    launching: HashSet<JobId>,
    /// Reasons proposed, by job.
    reasons: HashMap<JobId, Option<String>>,
}

impl JobsFramework {
    /// Whether jobs wait to be placed (the framework then wants offers).
    pub fn wants_offers(&self, view: &SchedulingView) -> bool {
        view.jobs
            .values()
            .any(|j| j.wants_placement() && !self.launching.contains(&j.id))
    }

    /// Places waiting jobs into `offers` (all made to this framework): accepts what it
    /// uses, declines offers it cannot use.
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
            if !self.registering {
                self.registering = true;
                plan.register = Some(Command::RegisterFramework {
                    id: id.clone(),
                    name: "durable jobs (built in)".into(),
                    role: RoleName::from_static(JOBS_FRAMEWORK),
                    at_ms,
                });
            }
            return plan;
        }
        self.registering = false;
        self.reasons.retain(|job, _| view.jobs.contains_key(job));
        let pending: Vec<&JobRecord> = view
            .jobs
            .values()
            .filter(|j| j.wants_placement() && !self.launching.contains(&j.id))
            .map(|j| &**j)
            .collect();
        let mut placed: HashSet<JobId> = HashSet::new();
        for offer in offers {
            let mut left = offer.resources;
            let mut chosen = Vec::new();
            for job in &pending {
                if placed.contains(&job.id)
                    || !job.resources.fits_in(&left)
                    || !Constraint::all_match(&job.constraints, &offer.attributes)
                {
                    continue;
                }
                left = left.minus(&job.resources);
                placed.insert(job.id);
                chosen.push(job.id);
            }
            if chosen.is_empty() {
                let _ = allocator.decline(offer.id, &id, REFUSE_FOR, now);
            } else if allocator
                .accept(offer.id, &id, offer.resources.minus(&left))
                .is_ok()
            {
                self.launching.extend(chosen.iter().copied());
                plan.launches.push((offer.id, offer.agent.clone(), chosen));
            }
        }
        for job in pending.iter().filter(|j| !placed.contains(&j.id)) {
            let reason = waiting_reason(view, job);
            let known = self
                .reasons
                .get(&job.id)
                .cloned()
                .unwrap_or_else(|| job.reason.clone());
            if job.state == crate::state::TaskState::Staging && reason != known {
                self.reasons.insert(job.id, reason.clone());
                plan.reasons.push(Command::SetJobReason {
                    job: job.id,
                    reason,
                });
            }
        }
        plan
    }

    /// The launch of `job` was decided (committed or refused).
    pub fn launched(&mut self, job: JobId) {
        self.launching.remove(&job);
    }
}

/// Why `job` waits, as users see it.
fn waiting_reason(view: &SchedulingView, job: &JobRecord) -> Option<String> {
    let active: Vec<_> = view
        .agents
        .values()
        .filter(|a| a.state == AgentState::Active)
        .collect();
    if active.is_empty() {
        return Some("no active agent".into());
    }
    let matching: Vec<_> = active
        .iter()
        .filter(|a| Constraint::all_match(&job.constraints, &a.attributes))
        .collect();
    if matching.is_empty() {
        let constraints: Vec<String> = job.constraints.iter().map(|c| c.to_string()).collect();
        return Some(format!(
            "no active agent satisfies {}",
            constraints.join(", ")
        ));
    }
    if !matching.iter().any(|a| job.resources.fits_in(&a.resources)) {
        return Some(format!("no matching agent has {} in all", job.resources));
    }
    // Placeable: it waits for free resources, which is normal. A job placed before
    // keeps what happened to its last attempt.
    if job.attempts.is_empty() {
        None
    } else {
        job.reason.clone()
    }
}
