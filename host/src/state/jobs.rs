//! The jobs half of the replicated state: job records and their data (inputs and
//! outputs by digest) in redb, and the deterministic `apply` of the job commands. The
//! rules that make a job's result trustworthy live here: only the current attempt may
//! report, the first completion wins and later results are dropped, a lost agent's
//! tasks become `UNREACHABLE` (never `GONE` while they may run), and an agent that
//! registers again reconciles its tasks (what it no longer runs becomes `GONE`).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::sync::Arc;

use redb::{ReadTransaction, ReadableTable, TableDefinition, TableHandle, WriteTransaction};

use super::job::{log_tail, ATTEMPT_CAP, MAX_ATTEMPTS, MAX_JOB_INPUT_BYTES, MAX_JOB_OUTPUT_BYTES};
use super::scheduling::{allocate, allocations_of, get_agent, next_counter, release};
use super::{
    function_record, storage, AgentId, Allocation, Attempt, Command, CommandResponse, Constraint,
    FrameworkId, FunctionName, JobId, JobOutput, JobRecord, Rejection, StateError, TaskRef,
    TaskState, TaskUpdate,
};
use crate::digest::Digest;

/// Job id -> JSON [`JobRecord`].
const JOBS: TableDefinition<u64, &[u8]> = TableDefinition::new("jobs");
/// Ids of the jobs not in a terminal state (what the scheduler reads).
const ACTIVE_JOBS: TableDefinition<u64, ()> = TableDefinition::new("active_jobs");
/// Hex digest -> job input or output bytes.
const JOB_DATA: TableDefinition<&str, &[u8]> = TableDefinition::new("job_data");
/// (agent, job) -> attempt: attempts left `UNREACHABLE` on an agent, reconciled when
/// it registers again.
const UNREACHABLE: TableDefinition<(&str, u64), u32> = TableDefinition::new("unreachable_tasks");

const NEXT_JOB: &str = "next_job";

/// Creates the tables.
pub(super) fn create_tables(txn: &WriteTransaction) -> Result<(), StateError> {
    txn.open_table(JOBS).map_err(storage)?;
    txn.open_table(ACTIVE_JOBS).map_err(storage)?;
    txn.open_table(JOB_DATA).map_err(storage)?;
    txn.open_table(UNREACHABLE).map_err(storage)?;
    Ok(())
}

/// Empties the tables (before a snapshot is restored).
pub(super) fn clear(txn: &WriteTransaction) -> Result<(), StateError> {
    txn.delete_table(JOBS).map_err(storage)?;
    txn.delete_table(ACTIVE_JOBS).map_err(storage)?;
    txn.delete_table(JOB_DATA).map_err(storage)?;
    txn.delete_table(UNREACHABLE).map_err(storage)?;
    create_tables(txn)
}

fn get(txn: &WriteTransaction, job: JobId) -> Result<Option<JobRecord>, StateError> {
    let jobs = txn.open_table(JOBS).map_err(storage)?;
    let record = match jobs.get(job.0).map_err(storage)? {
        Some(bytes) => Some(decode(job, bytes.value())?),
        None => None,
    };
    Ok(record)
}

fn put(txn: &WriteTransaction, record: &JobRecord) -> Result<(), StateError> {
    let encoded = serde_json::to_vec(record).map_err(|e| StateError::Corrupt {
        key: record.id.to_string(),
        message: e.to_string(),
    })?;
    txn.open_table(JOBS)
        .map_err(storage)?
        .insert(record.id.0, encoded.as_slice())
        .map_err(storage)?;
    let mut active = txn.open_table(ACTIVE_JOBS).map_err(storage)?;
    if record.ended() {
        if active.remove(record.id.0).map_err(storage)?.is_some() {
            drop(active);
            next_counter(txn, &format!("jobs_{}", record.state))?;
        }
    } else {
        active.insert(record.id.0, ()).map_err(storage)?;
    }
    Ok(())
}

fn decode(job: JobId, bytes: &[u8]) -> Result<JobRecord, StateError> {
    serde_json::from_slice(bytes).map_err(|e| StateError::Corrupt {
        key: format!("job {job}"),
        message: e.to_string(),
    })
}

fn store_data(txn: &WriteTransaction, bytes: &[u8]) -> Result<Digest, StateError> {
    let digest = Digest::of(bytes);
    let hex = digest.to_hex();
    let mut data = txn.open_table(JOB_DATA).map_err(storage)?;
    if data.get(hex.as_str()).map_err(storage)?.is_none() {
        data.insert(hex.as_str(), bytes).map_err(storage)?;
    }
    Ok(digest)
}

/// Applies a job command (any other command is answered `None`).
pub(super) fn apply(
    txn: &WriteTransaction,
    command: &Command,
) -> Result<Option<CommandResponse>, StateError> {
    let answer = match command {
        Command::SubmitJob {
            function,
            input,
            constraints,
            max_attempts,
            at_ms,
            accel,
        } => submit(
            txn,
            function,
            input,
            constraints,
            *max_attempts,
            *at_ms,
            *accel,
        )?,
        Command::LaunchJob {
            job,
            framework,
            agent,
            at_ms,
        } => launch(txn, *job, framework, agent, *at_ms)?,
        Command::UpdateJob {
            task,
            update: change,
            at_ms,
        } => update(txn, *task, change, *at_ms)?,
        Command::KillJob { job, at_ms } => kill(txn, *job, *at_ms)?,
        Command::PlaceTask {
            framework,
            agent,
            function,
            input,
            at_ms,
        } => place_task(txn, framework, agent, function, input, *at_ms)?,
        Command::SetJobReason { job, reason } => {
            let Some(mut record) = get(txn, *job)? else {
                return Ok(Some(CommandResponse::Rejected(Rejection::UnknownJob(*job))));
            };
            if record.state == TaskState::Staging {
                record.reason = reason.clone();
                put(txn, &record)?;
            }
            CommandResponse::JobUpdated {
                job: *job,
                attempt: 0,
                state: record.state,
            }
        }
        _ => return Ok(None),
    };
    Ok(Some(answer))
}

fn submit(
    txn: &WriteTransaction,
    function: &FunctionName,
    input: &[u8],
    constraints: &[Constraint],
    max_attempts: u32,
    at_ms: u64,
    accel: u64,
) -> Result<CommandResponse, StateError> {
    let reject = |why| Ok(CommandResponse::Rejected(why));
    let (mut spec, size) = match function_and_input(txn, function, input)? {
        Ok(found) => found,
        Err(why) => return reject(why),
    };
    if accel > 1 {
        return reject(Rejection::InvalidJob(format!(
            "an attempt is granted at most 1 accelerator, not {accel}"
        )));
    }
    // The job's own request raises the function's (the attempt's limits follow the
    // job's resources at placement).
    spec.spec.limits.accel = spec.spec.limits.accel.max(accel);
    if !(1..=MAX_ATTEMPTS).contains(&max_attempts) {
        return reject(Rejection::InvalidJob(format!(
            "a job makes 1 to {MAX_ATTEMPTS} attempts, not {max_attempts}"
        )));
    }
    if constraints.len() > 16 {
        return reject(Rejection::InvalidJob(
            "a job has at most 16 constraints".into(),
        ));
    }
    let id = JobId(next_counter(txn, NEXT_JOB)?);
    let record = JobRecord {
        id,
        function: function.clone(),
        input: store_data(txn, input)?,
        input_size: size,
        constraints: with_accel_type(constraints, &spec.spec.limits),
        max_attempts,
        resources: spec.spec.limits.resources(),
        state: TaskState::Staging,
        reason: None,
        attempts: Vec::new(),
        output: None,
        submitted_at_ms: at_ms,
        finished_at_ms: None,
        owner: None,
    };
    put(txn, &record)?;
    Ok(CommandResponse::JobSubmitted(id))
}

/// A job's constraints plus the one its function's device type implies
/// (`accel.type=gpu`, matched against the attribute agents derive from their devices).
fn with_accel_type(constraints: &[Constraint], limits: &crate::runtime::Limits) -> Vec<Constraint> {
    let mut all = constraints.to_vec();
    if let (Some(kind), true) = (limits.accel_type, limits.accel > 0) {
        let implied = Constraint {
            key: crate::accel::ACCEL_TYPE_ATTRIBUTE.to_string(),
            op: crate::state::constraint::Op::Equals,
            value: kind.as_str().to_string(),
        };
        if !all.contains(&implied) {
            all.push(implied);
        }
    }
    all
}

/// The record of `function` and the size of `input`, or why a job cannot run it.
fn function_and_input(
    txn: &WriteTransaction,
    function: &FunctionName,
    input: &[u8],
) -> Result<Result<(crate::state::FunctionRecord, u64), Rejection>, StateError> {
    let Some(record) = function_record(txn, function)? else {
        return Ok(Err(Rejection::NotFound(function.clone())));
    };
    let size = input.len() as u64;
    if size > MAX_JOB_INPUT_BYTES {
        return Ok(Err(Rejection::JobInputTooLarge {
            size,
            limit: MAX_JOB_INPUT_BYTES,
        }));
    }
    Ok(Ok((record, size)))
}

/// An external framework's task: a job it owns, placed on `agent` at once.
fn place_task(
    txn: &WriteTransaction,
    framework: &FrameworkId,
    agent: &AgentId,
    function: &FunctionName,
    input: &[u8],
    at_ms: u64,
) -> Result<CommandResponse, StateError> {
    let reject = |why| Ok(CommandResponse::Rejected(why));
    let (spec, size) = match function_and_input(txn, function, input)? {
        Ok(found) => found,
        Err(why) => return reject(why),
    };
    let resources = spec.spec.limits.resources();
    // Check the allocation before the job takes an id: a refusal changes nothing.
    let Some(agent_record) = get_agent(txn, agent)? else {
        return reject(Rejection::UnknownAgent(agent.clone()));
    };
    let free = agent_record.resources.minus(&agent_record.allocated);
    if !resources.fits_in(&free) {
        return reject(Rejection::InsufficientResources {
            agent: agent.clone(),
            requested: resources,
            free,
        });
    }
    let id = JobId(next_counter(txn, NEXT_JOB)?);
    let task = TaskRef {
        job: id,
        attempt: 1,
    };
    let allocation = match allocate(txn, framework, agent, &resources, at_ms, Some(task))? {
        Ok(allocation) => allocation,
        Err(why) => {
            // The job id stays used; nothing else was written.
            return reject(why);
        }
    };
    let record = JobRecord {
        id,
        function: function.clone(),
        input: store_data(txn, input)?,
        input_size: size,
        constraints: Vec::new(),
        max_attempts: 1,
        resources,
        state: TaskState::Starting,
        reason: None,
        attempts: vec![Attempt {
            number: 1,
            agent: agent.clone(),
            framework: framework.clone(),
            allocation: allocation.id,
            module: spec.digest,
            limits: spec.spec.limits,
            env: spec.spec.env.clone(),
            state: TaskState::Starting,
            reason: None,
            started_at_ms: at_ms,
            ended_at_ms: None,
            log: None,
        }],
        output: None,
        submitted_at_ms: at_ms,
        finished_at_ms: None,
        owner: Some(framework.clone()),
    };
    put(txn, &record)?;
    Ok(CommandResponse::JobLaunched {
        task,
        allocation: allocation.id,
    })
}

fn launch(
    txn: &WriteTransaction,
    job: JobId,
    framework: &FrameworkId,
    agent: &AgentId,
    at_ms: u64,
) -> Result<CommandResponse, StateError> {
    let reject = |why| Ok(CommandResponse::Rejected(why));
    let Some(mut record) = get(txn, job)? else {
        return reject(Rejection::UnknownJob(job));
    };
    if !record.wants_placement() {
        return reject(Rejection::JobNotPlaceable {
            job,
            state: record.state,
        });
    }
    let Some(agent_record) = get_agent(txn, agent)? else {
        return reject(Rejection::UnknownAgent(agent.clone()));
    };
    if let Some(unmet) = record
        .constraints
        .iter()
        .find(|c| !c.matches(&agent_record.attributes))
    {
        return reject(Rejection::ConstraintMismatch {
            agent: agent.clone(),
            constraint: unmet.to_string(),
        });
    }
    let Some(function) = function_record(txn, &record.function)? else {
        record.state = TaskState::Failed;
        record.reason = Some(format!("function `{}` was deleted", record.function));
        record.finished_at_ms = Some(at_ms);
        put(txn, &record)?;
        return Ok(CommandResponse::JobUpdated {
            job,
            attempt: 0,
            state: record.state,
        });
    };
    let task = TaskRef {
        job,
        attempt: record.attempts.len() as u32 + 1,
    };
    let allocation = match allocate(txn, framework, agent, &record.resources, at_ms, Some(task))? {
        Ok(allocation) => allocation,
        Err(why) => return reject(why),
    };
    record.attempts.push(Attempt {
        number: task.attempt,
        agent: agent.clone(),
        framework: framework.clone(),
        allocation: allocation.id,
        module: function.digest,
        limits: crate::runtime::Limits {
            // What the job asked for (it may raise the function's device count).
            accel: record.resources.accelerators,
            ..function.spec.limits
        },
        env: function.spec.env.clone(),
        state: TaskState::Starting,
        reason: None,
        started_at_ms: at_ms,
        ended_at_ms: None,
        log: None,
    });
    record.state = TaskState::Starting;
    record.reason = None;
    put(txn, &record)?;
    Ok(CommandResponse::JobLaunched {
        task,
        allocation: allocation.id,
    })
}

fn update(
    txn: &WriteTransaction,
    task: TaskRef,
    change: &TaskUpdate,
    at_ms: u64,
) -> Result<CommandResponse, StateError> {
    let reject = |why| Ok(CommandResponse::Rejected(why));
    let Some(mut record) = get(txn, task.job)? else {
        return reject(Rejection::UnknownJob(task.job));
    };
    let current = record.attempts.len() as u32;
    if record.ended() {
        return reject(Rejection::StaleUpdate {
            task,
            why: format!("the job is already {}", record.state),
        });
    }
    if task.attempt != current || current == 0 {
        return reject(Rejection::StaleUpdate {
            task,
            why: format!("attempt {current} is the current one"),
        });
    }
    let attempt_state = record.attempts[current as usize - 1].state;
    if !matches!(
        attempt_state,
        TaskState::Starting | TaskState::Running | TaskState::Unreachable
    ) {
        return reject(Rejection::StaleUpdate {
            task,
            why: format!("the attempt is {attempt_state}"),
        });
    }
    let (agent, allocation) = {
        let a = &record.attempts[current as usize - 1];
        (a.agent.clone(), a.allocation)
    };
    match change {
        TaskUpdate::Running => {
            record.attempts[current as usize - 1].state = TaskState::Running;
            record.state = TaskState::Running;
        }
        TaskUpdate::Finished {
            exit_code,
            output,
            log,
        } if output.len() as u64 <= MAX_JOB_OUTPUT_BYTES => {
            let digest = store_data(txn, output)?;
            let attempt = &mut record.attempts[current as usize - 1];
            attempt.state = TaskState::Finished;
            attempt.ended_at_ms = Some(at_ms);
            attempt.log = log_tail(log);
            record.output = Some(JobOutput {
                digest,
                size: output.len() as u64,
                exit_code: *exit_code,
                attempt: current,
            });
            record.state = TaskState::Finished;
            record.reason = None;
            record.finished_at_ms = Some(at_ms);
            end_attempt(txn, &agent, task, allocation)?;
        }
        TaskUpdate::Finished { output, log, .. } => {
            let why = format!(
                "output of {} bytes is over the limit of {MAX_JOB_OUTPUT_BYTES} bytes",
                output.len()
            );
            record.attempts[current as usize - 1].log = log_tail(log);
            fail(&mut record, current, why, at_ms);
            end_attempt(txn, &agent, task, allocation)?;
        }
        TaskUpdate::Failed { reason, log, .. } => {
            record.attempts[current as usize - 1].log = log_tail(log);
            fail(&mut record, current, reason.clone(), at_ms);
            end_attempt(txn, &agent, task, allocation)?;
        }
    }
    put(txn, &record)?;
    Ok(CommandResponse::JobUpdated {
        job: task.job,
        attempt: task.attempt,
        state: record.state,
    })
}

/// Marks attempt `current` failed; the job is retried unless it used up its attempts.
fn fail(record: &mut JobRecord, current: u32, reason: String, at_ms: u64) {
    let attempt = &mut record.attempts[current as usize - 1];
    attempt.state = TaskState::Failed;
    attempt.reason = Some(reason.clone());
    attempt.ended_at_ms = Some(at_ms);
    if record.failures() >= record.max_attempts || record.attempts.len() >= ATTEMPT_CAP {
        record.state = TaskState::Failed;
        record.reason = Some(format!("attempt {current} failed: {reason}"));
        record.finished_at_ms = Some(at_ms);
    } else {
        record.state = TaskState::Staging;
        record.reason = Some(format!("attempt {current} failed ({reason}); retrying"));
    }
}

/// Frees what an ended attempt held: its allocation and its unreachable mark.
fn end_attempt(
    txn: &WriteTransaction,
    agent: &AgentId,
    task: TaskRef,
    allocation: crate::state::AllocationId,
) -> Result<(), StateError> {
    release(txn, allocation)?;
    let mut unreachable = txn.open_table(UNREACHABLE).map_err(storage)?;
    let marked = unreachable
        .get((agent.as_str(), task.job.0))
        .map_err(storage)?
        .map(|v| v.value());
    if marked == Some(task.attempt) {
        unreachable
            .remove((agent.as_str(), task.job.0))
            .map_err(storage)?;
    }
    Ok(())
}

fn kill(txn: &WriteTransaction, job: JobId, at_ms: u64) -> Result<CommandResponse, StateError> {
    let Some(mut record) = get(txn, job)? else {
        return Ok(CommandResponse::Rejected(Rejection::UnknownJob(job)));
    };
    if record.ended() {
        return Ok(CommandResponse::Rejected(Rejection::JobEnded {
            job,
            state: record.state,
        }));
    }
    if let Some(attempt) = record.attempts.last_mut() {
        if attempt.state.is_live() {
            attempt.state = TaskState::Killed;
            attempt.ended_at_ms = Some(at_ms);
            let (agent, allocation, number) =
                (attempt.agent.clone(), attempt.allocation, attempt.number);
            end_attempt(
                txn,
                &agent,
                TaskRef {
                    job,
                    attempt: number,
                },
                allocation,
            )?;
        }
    }
    record.state = TaskState::Killed;
    record.reason = Some("killed on request".into());
    record.finished_at_ms = Some(at_ms);
    put(txn, &record)?;
    Ok(CommandResponse::JobUpdated {
        job,
        attempt: 0,
        state: record.state,
    })
}

/// Agent `agent` was marked unreachable and these allocations released: their tasks'
/// attempts become `UNREACHABLE` (they may still run) and are remembered for when the
/// agent registers again.
pub(super) fn agent_lost(
    txn: &WriteTransaction,
    agent: &AgentId,
    released: &[Allocation],
) -> Result<(), StateError> {
    for allocation in released {
        let Some(task) = allocation.task else {
            continue;
        };
        let Some(mut record) = get(txn, task.job)? else {
            continue;
        };
        let current = record.attempts.len() as u32;
        let Some(attempt) = record
            .attempts
            .iter_mut()
            .find(|a| a.number == task.attempt)
        else {
            continue;
        };
        if !attempt.state.is_live() {
            continue;
        }
        attempt.state = TaskState::Unreachable;
        attempt.reason = Some(format!("agent `{agent}` is unreachable"));
        if task.attempt == current && !record.ended() {
            record.state = TaskState::Unreachable;
            record.reason = Some(format!(
                "agent `{agent}` is unreachable; the task may still run there"
            ));
        }
        put(txn, &record)?;
        txn.open_table(UNREACHABLE)
            .map_err(storage)?
            .insert((agent.as_str(), task.job.0), task.attempt)
            .map_err(storage)?;
    }
    Ok(())
}

/// Agent `agent` registered (again) reporting `running`: attempts it no longer runs
/// are `GONE` (retried if current); unreachable attempts it still runs resume (if
/// current, with their resources allocated again) or are superseded.
pub(super) fn reconcile(
    txn: &WriteTransaction,
    agent: &AgentId,
    running: &[TaskRef],
    at_ms: u64,
) -> Result<(), StateError> {
    let running: BTreeSet<TaskRef> = running.iter().copied().collect();
    // Live attempts with allocations (the agent restarted before it was missed).
    for allocation in allocations_of(txn, agent)? {
        let Some(task) = allocation.task else {
            continue;
        };
        if running.contains(&task) {
            continue;
        }
        release(txn, allocation.id)?;
        if let Some(mut record) = get(txn, task.job)? {
            gone(&mut record, task, agent, at_ms);
            put(txn, &record)?;
        }
    }
    // Attempts left unreachable on this agent.
    let marked: Vec<(u64, u32)> = {
        let table = txn.open_table(UNREACHABLE).map_err(storage)?;
        let mut out = Vec::new();
        for entry in table
            .range((agent.as_str(), 0)..=(agent.as_str(), u64::MAX))
            .map_err(storage)?
        {
            let (key, value) = entry.map_err(storage)?;
            out.push((key.value().1, value.value()));
        }
        out
    };
    for (job, attempt) in marked {
        txn.open_table(UNREACHABLE)
            .map_err(storage)?
            .remove((agent.as_str(), job))
            .map_err(storage)?;
        let task = TaskRef {
            job: JobId(job),
            attempt,
        };
        let Some(mut record) = get(txn, task.job)? else {
            continue;
        };
        let current = record.attempts.len() as u32;
        let Some(index) = (attempt as usize).checked_sub(1) else {
            continue;
        };
        if index >= record.attempts.len() || record.attempts[index].state != TaskState::Unreachable
        {
            continue;
        }
        if !running.contains(&task) {
            gone(&mut record, task, agent, at_ms);
        } else if attempt == current && !record.ended() {
            let framework = record.attempts[index].framework.clone();
            match allocate(txn, &framework, agent, &record.resources, at_ms, Some(task))? {
                Ok(allocation) => {
                    let a = &mut record.attempts[index];
                    a.allocation = allocation.id;
                    a.state = TaskState::Running;
                    a.reason = None;
                    record.state = TaskState::Running;
                    record.reason = None;
                }
                Err(why) => {
                    let a = &mut record.attempts[index];
                    a.state = TaskState::Killed;
                    a.reason = Some(format!("could not resume: {why}"));
                    a.ended_at_ms = Some(at_ms);
                    record.state = TaskState::Staging;
                    record.reason = Some(format!("attempt {attempt} could not resume; retrying"));
                }
            }
        } else {
            let a = &mut record.attempts[index];
            a.state = TaskState::Killed;
            a.reason = Some("superseded by a later attempt; stopped on its agent".into());
            a.ended_at_ms = Some(at_ms);
        }
        put(txn, &record)?;
    }
    Ok(())
}

/// Attempt `task` is known not to run: `GONE`; the job is placed again if it was the
/// current attempt (a lost agent is not the job's failure).
fn gone(record: &mut JobRecord, task: TaskRef, agent: &AgentId, at_ms: u64) {
    let current = record.attempts.len() as u32;
    let Some(attempt) = record
        .attempts
        .iter_mut()
        .find(|a| a.number == task.attempt)
    else {
        return;
    };
    attempt.state = TaskState::Gone;
    attempt.reason = Some(format!("agent `{agent}` no longer runs it"));
    attempt.ended_at_ms = Some(at_ms);
    if task.attempt == current && !record.ended() {
        if record.owner.is_some() {
            // An external framework decides what to do about its lost task.
            record.state = TaskState::Gone;
            record.reason = Some(format!("agent `{agent}` no longer runs it"));
            record.finished_at_ms = Some(at_ms);
        } else if record.attempts.len() >= ATTEMPT_CAP {
            record.state = TaskState::Failed;
            record.reason = Some(format!("gave up after {ATTEMPT_CAP} attempts"));
            record.finished_at_ms = Some(at_ms);
        } else {
            record.state = TaskState::Staging;
            record.reason = Some(format!("attempt {} is gone; retrying", task.attempt));
        }
    }
}

/// The jobs not in a terminal state as last read, each with its stored bytes: a read
/// parses only the records whose bytes changed since (the leader reads every active
/// job at each scheduling round, and most of them wait unchanged).
#[derive(Debug, Default)]
pub struct ActiveJobs(BTreeMap<JobId, (Box<[u8]>, Arc<JobRecord>)>);

impl ActiveJobs {
    /// The jobs not in a terminal state in `txn`; keeps them for the next read.
    pub(super) fn read(
        &mut self,
        txn: &ReadTransaction,
    ) -> Result<BTreeMap<JobId, Arc<JobRecord>>, StateError> {
        let active = txn.open_table(ACTIVE_JOBS).map_err(storage)?;
        let jobs = txn.open_table(JOBS).map_err(storage)?;
        let mut kept = BTreeMap::new();
        let mut out = BTreeMap::new();
        for entry in active.iter().map_err(storage)? {
            let (id, _) = entry.map_err(storage)?;
            let id = JobId(id.value());
            let Some(bytes) = jobs.get(id.0).map_err(storage)? else {
                continue;
            };
            let bytes = bytes.value();
            let entry = match self.0.remove(&id) {
                Some(known) if *known.0 == *bytes => known,
                _ => (Box::from(bytes), Arc::new(decode(id, bytes)?)),
            };
            out.insert(id, entry.1.clone());
            kept.insert(id, entry);
        }
        // Jobs that ended (or vanished with a snapshot) are dropped here.
        self.0 = kept;
        Ok(out)
    }
}

/// Job `job`.
pub(super) fn read_job(txn: &ReadTransaction, job: JobId) -> Result<Option<JobRecord>, StateError> {
    let jobs = txn.open_table(JOBS).map_err(storage)?;
    let record = match jobs.get(job.0).map_err(storage)? {
        Some(bytes) => Some(decode(job, bytes.value())?),
        None => None,
    };
    Ok(record)
}

/// Every job, newest first, at most `limit`.
pub(super) fn read_all(txn: &ReadTransaction, limit: usize) -> Result<Vec<JobRecord>, StateError> {
    let jobs = txn.open_table(JOBS).map_err(storage)?;
    let mut out = Vec::new();
    for entry in jobs.iter().map_err(storage)?.rev().take(limit) {
        let (id, bytes) = entry.map_err(storage)?;
        out.push(decode(JobId(id.value()), bytes.value())?);
    }
    Ok(out)
}

/// Job input or output bytes with `digest`.
pub(super) fn read_data(
    txn: &ReadTransaction,
    digest: &Digest,
) -> Result<Option<Vec<u8>>, StateError> {
    let data = txn.open_table(JOB_DATA).map_err(storage)?;
    Ok(data
        .get(digest.to_hex().as_str())
        .map_err(storage)?
        .map(|b| b.value().to_vec()))
}

/// Writes every row of the job tables to `out`.
pub(super) fn dump(txn: &ReadTransaction, out: &mut impl Write) -> Result<(), StateError> {
    let mut row = |table: &str, key: &[u8], value: &[u8]| super::write_row(out, table, key, value);
    for entry in txn
        .open_table(JOBS)
        .map_err(storage)?
        .iter()
        .map_err(storage)?
    {
        let (key, value) = entry.map_err(storage)?;
        row(JOBS.name(), &key.value().to_be_bytes(), value.value())?;
    }
    for entry in txn
        .open_table(JOB_DATA)
        .map_err(storage)?
        .iter()
        .map_err(storage)?
    {
        let (key, value) = entry.map_err(storage)?;
        row(JOB_DATA.name(), key.value().as_bytes(), value.value())?;
    }
    for entry in txn
        .open_table(UNREACHABLE)
        .map_err(storage)?
        .iter()
        .map_err(storage)?
    {
        let (key, value) = entry.map_err(storage)?;
        let (agent, job) = key.value();
        let mut k = job.to_be_bytes().to_vec();
        k.extend_from_slice(agent.as_bytes());
        row(UNREACHABLE.name(), &k, &value.value().to_be_bytes())?;
    }
    Ok(())
}

/// Restores one row [`dump`] wrote; `false` if `table` is not a job table.
pub(super) fn restore_row(
    txn: &WriteTransaction,
    table: &str,
    key: &[u8],
    value: &[u8],
) -> Result<bool, StateError> {
    let bad = || StateError::Snapshot(format!("malformed row in {table}"));
    match table {
        "jobs" => {
            let id = JobId(u64::from_be_bytes(key.try_into().map_err(|_| bad())?));
            let record = decode(id, value)?;
            put(txn, &record)?;
        }
        "job_data" => {
            let digest = std::str::from_utf8(key).map_err(|_| bad())?;
            txn.open_table(JOB_DATA)
                .map_err(storage)?
                .insert(digest, value)
                .map_err(storage)?;
        }
        "unreachable_tasks" => {
            if key.len() < 8 {
                return Err(bad());
            }
            let job = u64::from_be_bytes(key[..8].try_into().map_err(|_| bad())?);
            let agent = std::str::from_utf8(&key[8..]).map_err(|_| bad())?;
            let attempt = u32::from_be_bytes(value.try_into().map_err(|_| bad())?);
            txn.open_table(UNREACHABLE)
                .map_err(storage)?
                .insert((agent, job), attempt)
                .map_err(storage)?;
        }
        _ => return Ok(false),
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use crate::state::Resources;
    use redb::ReadableDatabase;

    use super::super::{apply, dump, restore, FunctionSpec, State};
    use super::*;

    use crate::state::ident::test_id as id;

    fn run(state: &State, command: Command) -> Result<CommandResponse, StateError> {
        let txn = state.database().begin_write().map_err(storage)?;
        let answer = apply(&txn, &command)?;
        txn.commit().map_err(storage)?;
        assert!(
            state.scheduling()?.overcommitted().is_empty(),
            "overcommitted after {command:?}"
        );
        Ok(answer)
    }

    fn register(agent: &str, zone: &str, running: Vec<TaskRef>) -> Command {
        Command::RegisterAgent {
            agent: id(agent),
            rpc: "127.0.0.1:9".into(),
            resources: Resources::new(2, 1024),
            attributes: BTreeMap::from([("zone".into(), zone.into())]),
            running,
            at_ms: 1,
        }
    }

    fn submit(constraint: Option<&str>, max_attempts: u32) -> Command {
        Command::SubmitJob {
            function: id("f"),
            input: bytes::Bytes::from_static(b"input"),
            constraints: constraint.map(|c| vec![id(c)]).unwrap_or_default(),
            max_attempts,
            at_ms: 1,
            accel: 0,
        }
    }

    fn launch(job: u64, agent: &str) -> Command {
        Command::LaunchJob {
            job: JobId(job),
            framework: id("jobs"),
            agent: id(agent),
            at_ms: 2,
        }
    }

    fn report(job: u64, attempt: u32, update: TaskUpdate) -> Command {
        Command::UpdateJob {
            task: TaskRef {
                job: JobId(job),
                attempt,
            },
            update,
            at_ms: 3,
        }
    }

    fn finished(output: &'static [u8]) -> TaskUpdate {
        TaskUpdate::Finished {
            exit_code: 0,
            output: bytes::Bytes::from_static(output),
            log: bytes::Bytes::new(),
        }
    }

    fn job(state: &State, job: u64) -> JobRecord {
        match state.get_job(JobId(job)) {
            Ok(Some(record)) => record,
            other => panic!("job {job}: {other:?}"),
        }
    }

    /// Deploys function `f` and registers the `jobs` framework.
    fn function_and_framework(state: &State) -> Result<(), StateError> {
        run(
            state,
            Command::DeployFunction {
                name: id("f"),
                spec: FunctionSpec::default(),
                module: bytes::Bytes::from_static(b"module"),
                deployed_at_ms: 0,
            },
        )?;
        run(
            state,
            Command::RegisterFramework {
                id: id("jobs"),
                name: "jobs".into(),
                role: id("jobs"),
                at_ms: 0,
            },
        )?;
        Ok(())
    }

    /// The scheduling view parses a waiting job once and shares it with later reads; a
    /// job that changes is read afresh, and one that ends leaves the view.
    #[test]
    fn unchanged_active_jobs_are_not_parsed_again() -> Result<(), StateError> {
        let dir = tempfile::tempdir().map_err(|e| StateError::Snapshot(e.to_string()))?;
        let state = State::open(&dir.path().join("s.redb"))?;
        function_and_framework(&state)?;
        run(&state, register("a1", "a", Vec::new()))?;
        run(&state, submit(None, 1))?;
        run(&state, submit(None, 1))?;
        let first = state.scheduling()?;
        let again = state.scheduling()?;
        assert!(Arc::ptr_eq(&first.jobs[&JobId(1)], &again.jobs[&JobId(1)]));
        assert!(Arc::ptr_eq(&first.jobs[&JobId(2)], &again.jobs[&JobId(2)]));

        run(&state, launch(1, "a1"))?;
        let launched = state.scheduling()?;
        assert_eq!(launched.jobs[&JobId(1)].state, TaskState::Starting);
        assert_eq!(first.jobs[&JobId(1)].state, TaskState::Staging);
        assert!(Arc::ptr_eq(
            &first.jobs[&JobId(2)],
            &launched.jobs[&JobId(2)]
        ));

        run(&state, report(1, 1, TaskUpdate::Running))?;
        run(
            &state,
            report(
                1,
                1,
                TaskUpdate::Finished {
                    exit_code: 0,
                    output: bytes::Bytes::from_static(b"done"),
                    log: bytes::Bytes::new(),
                },
            ),
        )?;
        let ended = state.scheduling()?;
        assert!(
            !ended.jobs.contains_key(&JobId(1)),
            "a finished job is not active"
        );
        assert_eq!(ended.jobs.len(), 1);
        Ok(())
    }

    #[test]
    fn jobs_survive_lost_agents_and_only_the_first_result_counts() -> Result<(), StateError> {
        let dir = tempfile::tempdir().map_err(|e| StateError::Snapshot(e.to_string()))?;
        let state = State::open(&dir.path().join("s.redb"))?;
        function_and_framework(&state)?;
        run(&state, register("a1", "a", Vec::new()))?;
        run(&state, register("a2", "b", Vec::new()))?;
        assert_eq!(
            run(&state, submit(Some("zone=b"), 3))?,
            CommandResponse::JobSubmitted(JobId(1))
        );
        assert!(matches!(
            run(&state, submit(None, 0))?,
            CommandResponse::Rejected(Rejection::InvalidJob(_))
        ));
        assert!(matches!(
            run(
                &state,
                Command::SubmitJob {
                    function: id("nope"),
                    input: bytes::Bytes::new(),
                    constraints: Vec::new(),
                    max_attempts: 1,
                    at_ms: 1,
                    accel: 0,
                }
            )?,
            CommandResponse::Rejected(Rejection::NotFound(_))
        ));

        // The constraint decides where it may go.
        assert!(matches!(
            run(&state, launch(1, "a1"))?,
            CommandResponse::Rejected(Rejection::ConstraintMismatch { .. })
        ));
        assert!(matches!(
            run(&state, launch(1, "a2"))?,
            CommandResponse::JobLaunched { .. }
        ));
        assert_eq!(job(&state, 1).state, TaskState::Starting);
        assert!(matches!(
            run(&state, launch(1, "a2"))?,
            CommandResponse::Rejected(Rejection::JobNotPlaceable { .. })
        ));
        run(&state, report(1, 1, TaskUpdate::Running))?;
        assert_eq!(job(&state, 1).state, TaskState::Running);

        // Its agent is lost: UNREACHABLE (not GONE), resources back; placed again.
        run(
            &state,
            Command::AgentUnreachable {
                agent: id("a2"),
                at_ms: 4,
            },
        )?;
        assert_eq!(job(&state, 1).state, TaskState::Unreachable);
        assert_eq!(job(&state, 1).attempts[0].state, TaskState::Unreachable);
        run(&state, register("a3", "b", Vec::new()))?;
        assert!(matches!(
            run(&state, launch(1, "a3"))?,
            CommandResponse::JobLaunched { .. }
        ));

        // The lost agent's late result is dropped; the current attempt's counts, once.
        assert!(matches!(
            run(&state, report(1, 1, finished(b"old")))?,
            CommandResponse::Rejected(Rejection::StaleUpdate { .. })
        ));
        run(&state, report(1, 2, finished(b"new")))?;
        let done = job(&state, 1);
        assert_eq!(done.state, TaskState::Finished);
        let output = done.output.clone().unwrap_or_else(|| panic!("output"));
        assert_eq!(output.attempt, 2);
        assert_eq!(
            state.job_data(&output.digest)?.as_deref(),
            Some(&b"new"[..])
        );
        assert!(matches!(
            run(&state, report(1, 2, finished(b"again")))?,
            CommandResponse::Rejected(Rejection::StaleUpdate { .. })
        ));
        assert_eq!(
            state.scheduling()?.agents[&id("a3")].allocated,
            Resources::ZERO
        );

        // The lost agent comes back still running the superseded attempt: it is stopped,
        // never reported GONE while it ran.
        run(
            &state,
            register(
                "a2",
                "b",
                vec![TaskRef {
                    job: JobId(1),
                    attempt: 1,
                }],
            ),
        )?;
        assert_eq!(job(&state, 1).attempts[0].state, TaskState::Killed);
        assert_eq!(job(&state, 1).state, TaskState::Finished);

        // An agent that restarts without its attempt: GONE, and the job waits again.
        run(&state, submit(None, 3))?;
        run(&state, launch(2, "a3"))?;
        run(&state, register("a3", "b", Vec::new()))?;
        let restarted = job(&state, 2);
        assert_eq!(restarted.attempts[0].state, TaskState::Gone);
        assert_eq!(restarted.state, TaskState::Staging);
        assert_eq!(
            state.scheduling()?.agents[&id("a3")].allocated,
            Resources::ZERO
        );

        // An agent that comes back still running the current attempt keeps it.
        run(&state, launch(2, "a1"))?;
        run(
            &state,
            Command::AgentUnreachable {
                agent: id("a1"),
                at_ms: 5,
            },
        )?;
        run(
            &state,
            register(
                "a1",
                "a",
                vec![TaskRef {
                    job: JobId(2),
                    attempt: 2,
                }],
            ),
        )?;
        assert_eq!(job(&state, 2).state, TaskState::Running);
        assert_eq!(state.scheduling()?.agents[&id("a1")].allocated.slots, 1);

        // Failures use up attempts; a kill ends a job.
        run(&state, submit(None, 1))?;
        run(&state, launch(3, "a2"))?;
        run(
            &state,
            report(
                3,
                1,
                TaskUpdate::Failed {
                    reason: "trap".into(),
                    exit_code: None,
                    log: bytes::Bytes::from_static(b"the guest said why\n"),
                },
            ),
        )?;
        assert_eq!(job(&state, 3).state, TaskState::Failed);
        assert_eq!(
            job(&state, 3).attempts[0].log.as_deref(),
            Some("the guest said why\n"),
            "the attempt keeps its log"
        );
        run(
            &state,
            Command::KillJob {
                job: JobId(2),
                at_ms: 6,
            },
        )?;
        assert_eq!(job(&state, 2).state, TaskState::Killed);
        assert_eq!(
            state.scheduling()?.agents[&id("a1")].allocated,
            Resources::ZERO
        );
        assert!(state.scheduling()?.jobs.is_empty(), "no job is active");

        // A snapshot carries the jobs and their data.
        let mut stream = Vec::new();
        dump(
            &state.database().begin_read().map_err(storage)?,
            &mut stream,
        )?;
        let copy = State::open(&dir.path().join("copy.redb"))?;
        let txn = copy.database().begin_write().map_err(storage)?;
        restore(&txn, &mut stream.as_slice())?;
        txn.commit().map_err(storage)?;
        assert_eq!(copy.list_jobs(10)?, state.list_jobs(10)?);
        assert_eq!(copy.job_data(&output.digest)?.as_deref(), Some(&b"new"[..]));
        Ok(())
    }
}
