//! Durable jobs as the replicated state keeps them: a job runs a function once on its
//! input, as a task on some agent; each try is an attempt. States follow Mesos, with
//! its partition-aware pair: `unreachable` (the agent fell silent; the task may still
//! run) and `gone` (known not to run).

use std::fmt;

use serde::{Deserialize, Serialize};

use super::{AgentId, AllocationId, Constraint, FunctionName, Resources};
use crate::digest::Digest;
use crate::runtime::Limits;

/// Largest job input, bytes (it is replicated through the log).
pub const MAX_JOB_INPUT_BYTES: u64 = 1 << 20;
/// Largest job output kept, bytes (it is replicated through the log).
pub const MAX_JOB_OUTPUT_BYTES: u64 = 4 << 20;
/// Most attempts a job may ask for.
pub const MAX_ATTEMPTS: u32 = 10;
/// Most attempts of one job in all, failures and lost agents together.
pub const ATTEMPT_CAP: usize = 32;

/// A job's id: assigned in log order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(pub u64);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Where a job (or one attempt of it) stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TaskState {
    /// Waiting for resources.
    Staging,
    /// Placed on an agent; not yet reported running.
    Starting,
    /// The agent reported it running.
    Running,
    /// It exited 0; its output is kept.
    Finished,
    /// It failed and has no attempts left (an attempt: it failed).
    Failed,
    /// Killed on request.
    Killed,
    /// Its agent fell silent: it may still run.
    Unreachable,
    /// Known not to run (its agent came back without it).
    Gone,
}

impl TaskState {
    /// Whether nothing more happens to a job in this state.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskState::Finished | TaskState::Failed | TaskState::Killed
        )
    }

    /// Whether an attempt in this state holds (or may hold) its agent's resources.
    pub fn is_live(self) -> bool {
        matches!(self, TaskState::Starting | TaskState::Running)
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            TaskState::Staging => "STAGING",
            TaskState::Starting => "STARTING",
            TaskState::Running => "RUNNING",
            TaskState::Finished => "FINISHED",
            TaskState::Failed => "FAILED",
            TaskState::Killed => "KILLED",
            TaskState::Unreachable => "UNREACHABLE",
            TaskState::Gone => "GONE",
        };
        f.write_str(text)
    }
}

/// One try of a job on one agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// 1 for the first.
    pub number: u32,
    /// Where it runs.
    pub agent: AgentId,
    /// The framework that placed it.
    pub framework: super::FrameworkId,
    /// The resources it holds.
    pub allocation: AllocationId,
    /// The function's module when it was placed.
    pub module: Digest,
    /// The function's limits when it was placed.
    pub limits: Limits,
    /// The function's environment when it was placed.
    pub env: std::collections::BTreeMap<String, String>,
    /// Its state.
    pub state: TaskState,
    /// Why it failed or was lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When it was placed, ms since the Unix epoch.
    pub started_at_ms: u64,
    /// When it ended, ms since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at_ms: Option<u64>,
    /// The tail of what it logged (stderr and `wafer::log`), once it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<String>,
}

/// A finished job's output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobOutput {
    /// Digest of stdout (the bytes are kept under it).
    pub digest: Digest,
    /// Size, bytes.
    pub size: u64,
    /// The guest's exit code.
    pub exit_code: i32,
    /// The attempt that produced it (the first to finish; later results are dropped).
    pub attempt: u32,
}

/// A job's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Its id.
    pub id: JobId,
    /// The function it runs.
    pub function: FunctionName,
    /// Digest of its input (the bytes are kept under it).
    pub input: Digest,
    /// Input size, bytes.
    pub input_size: u64,
    /// Placement constraints on agent attributes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub constraints: Vec<Constraint>,
    /// Attempts allowed to fail before the job fails.
    pub max_attempts: u32,
    /// What one attempt holds (one slot and the function's memory).
    pub resources: Resources,
    /// Where it stands.
    pub state: TaskState,
    /// Why it waits or failed (set by the scheduler while it is staging, too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Every attempt, oldest first.
    #[serde(default)]
    pub attempts: Vec<Attempt>,
    /// The output of the first attempt that finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<JobOutput>,
    /// When it was submitted, ms since the Unix epoch.
    pub submitted_at_ms: u64,
    /// When it reached a terminal state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<u64>,
    /// The external framework that placed it as its task (none: a job of the built-in
    /// jobs framework, retried by the cluster).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<super::FrameworkId>,
}

impl JobRecord {
    /// The current attempt (the last), if any.
    pub fn current(&self) -> Option<&Attempt> {
        self.attempts.last()
    }

    /// Attempts that failed (lost agents do not count).
    pub fn failures(&self) -> u32 {
        self.attempts
            .iter()
            .filter(|a| a.state == TaskState::Failed)
            .count() as u32
    }

    /// Whether the jobs framework should place it: one of its jobs, staging, or its
    /// current attempt is on an unreachable agent (it is placed again; the first result
    /// wins). An external framework's task is its framework's to place.
    pub fn wants_placement(&self) -> bool {
        self.owner.is_none()
            && matches!(self.state, TaskState::Staging | TaskState::Unreachable)
            && self.attempts.len() < ATTEMPT_CAP
    }

    /// Whether nothing more happens to it: a terminal state, or an external framework's
    /// task that is `GONE` (the framework decides what to do next).
    pub fn ended(&self) -> bool {
        self.state.is_terminal() || (self.owner.is_some() && self.state == TaskState::Gone)
    }
}

/// What an agent reports about an attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskUpdate {
    /// It started.
    Running,
    /// It exited 0 with this stdout.
    Finished {
        /// Exit code (0).
        exit_code: i32,
        /// Stdout.
        output: bytes::Bytes,
        /// The tail of its log (stderr and `wafer::log`).
        log: bytes::Bytes,
    },
    /// It failed.
    Failed {
        /// Why (exit code, timeout, trap, missing module ...).
        reason: String,
        /// Exit code, if it exited.
        exit_code: Option<i32>,
        /// The tail of its log, if it ran.
        log: bytes::Bytes,
    },
}

/// Most bytes of an attempt's log that the job keeps (its tail).
pub const MAX_ATTEMPT_LOG_BYTES: usize = 4096;

/// The last [`MAX_ATTEMPT_LOG_BYTES`] of `log` as text (invalid UTF-8 replaced), or
/// none when it is empty.
pub fn log_tail(log: &[u8]) -> Option<String> {
    if log.is_empty() {
        return None;
    }
    let mut start = log.len().saturating_sub(MAX_ATTEMPT_LOG_BYTES);
    // Skip UTF-8 continuation bytes so the tail starts at a character.
    while start < log.len() && (log[start] & 0xC0) == 0x80 {
        start += 1;
    }
    Some(String::from_utf8_lossy(&log[start..]).into_owned())
}

#[cfg(test)]
mod log_tests {
    use super::*;

    #[test]
    fn a_log_tail_starts_at_a_character_and_is_bounded() {
        assert_eq!(log_tail(b""), None);
        assert_eq!(log_tail(b"short\n").as_deref(), Some("short\n"));
        let long = "é".repeat(MAX_ATTEMPT_LOG_BYTES); // two bytes each
        let tail = log_tail(long.as_bytes()).unwrap_or_default();
        assert!(tail.len() <= MAX_ATTEMPT_LOG_BYTES);
        assert!(
            tail.chars().all(|c| c == 'é'),
            "no broken character at the start"
        );
    }
}

/// An attempt, as agents and servers name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TaskRef {
    /// The job.
    pub job: JobId,
    /// The attempt number.
    pub attempt: u32,
}

impl fmt::Display for TaskRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.job, self.attempt)
    }
}
