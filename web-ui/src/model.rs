//! What the REST API answers, as the console reads it. Every field has a default, so a
//! field a newer server adds or an older one lacks does not break the console.

use std::collections::BTreeMap;

use serde::Deserialize;

/// The caller's token (`GET /v1/whoami`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Me {
    pub id: String,
    pub name: String,
    pub scopes: Vec<String>,
    pub expires_at_ms: Option<u64>,
}

impl Me {
    fn has(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope || s == "admin")
    }

    /// May deploy and remove functions.
    pub fn can_deploy(&self) -> bool {
        self.has("deploy")
    }

    /// May invoke functions and submit or kill jobs.
    pub fn can_invoke(&self) -> bool {
        self.has("invoke")
    }
}

/// Slots, memory and accelerators.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Resources {
    pub slots: u64,
    pub memory_mb: u64,
    pub accelerators: u64,
}

impl Resources {
    /// The sum of two amounts.
    pub fn plus(self, other: Resources) -> Resources {
        Resources {
            slots: self.slots + other.slots,
            memory_mb: self.memory_mb + other.memory_mb,
            accelerators: self.accelerators + other.accelerators,
        }
    }
}

/// A Raft member.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Member {
    pub id: u64,
    pub rpc: String,
    pub http: String,
    pub voter: bool,
}

/// `GET /v1/cluster`: the answering server's view.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Cluster {
    pub id: u64,
    pub state: String,
    pub leader_id: Option<u64>,
    pub term: u64,
    pub members: Vec<Member>,
    pub last_log_index: Option<u64>,
    pub applied_index: Option<u64>,
    pub committed_index: Option<u64>,
    pub snapshot_index: Option<u64>,
    pub purged_index: Option<u64>,
}

/// An agent (`GET /v1/nodes`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Agent {
    pub id: String,
    pub rpc: String,
    pub state: String,
    pub resources: Resources,
    pub allocated: Resources,
    pub free: Resources,
    pub attributes: BTreeMap<String, String>,
    pub registered_at_ms: u64,
    pub changed_at_ms: u64,
    pub last_heartbeat_ms: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Agents {
    pub agents: Vec<Agent>,
}

/// A deployed function.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Function {
    pub name: String,
    pub version: u64,
    pub digest: String,
    pub size: u64,
    pub memory_mb: u64,
    pub timeout_ms: u64,
    pub max_request_bytes: u64,
    pub max_response_bytes: u64,
    pub env: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    pub deployed_at_ms: u64,
    /// The earlier version a rollback made current again as this one.
    pub restored_from: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Functions {
    pub functions: Vec<Function>,
}

/// The guest log of one invocation (`GET /v1/functions/{name}/logs`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct LogRecord {
    pub seq: u64,
    pub at_ms: u64,
    pub version: u64,
    pub status: u16,
    pub agent: Option<String>,
    pub log: String,
    pub dropped: u64,
}

/// A page of a function's guest logs on the server the console talks to.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct LogPage {
    pub node: u64,
    pub next: u64,
    pub records: Vec<LogRecord>,
}

impl LogPage {
    /// One line per logged line, newest invocation last: `v1 200 | text`.
    pub fn lines(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for record in &self.records {
            let head = format!("v{} {}", record.version, record.status);
            lines.extend(record.log.lines().map(|line| format!("{head} | {line}")));
            if record.dropped > 0 {
                lines.push(format!(
                    "{head} | ({} more bytes beyond the log limit)",
                    record.dropped
                ));
            }
        }
        lines
    }
}

/// One attempt of a job.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Attempt {
    pub number: u32,
    pub agent: String,
    pub framework: String,
    pub state: String,
    pub reason: Option<String>,
    pub started_at_ms: u64,
    pub ended_at_ms: Option<u64>,
    pub log: Option<String>,
}

/// A job's output record.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct JobOutput {
    pub digest: String,
    pub size: u64,
    pub exit_code: i32,
    pub attempt: u32,
}

/// A job.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Job {
    pub id: u64,
    pub function: String,
    pub input_size: u64,
    pub constraints: Vec<String>,
    pub max_attempts: u32,
    pub state: String,
    pub reason: Option<String>,
    pub attempts: Vec<Attempt>,
    pub output: Option<JobOutput>,
    pub submitted_at_ms: u64,
    pub finished_at_ms: Option<u64>,
    pub owner: Option<String>,
}

impl Job {
    /// The agent of the latest attempt.
    pub fn agent(&self) -> &str {
        self.attempts.last().map_or("", |a| a.agent.as_str())
    }

    /// Whether it has ended.
    pub fn ended(&self) -> bool {
        matches!(self.state.as_str(), "FINISHED" | "FAILED" | "KILLED")
    }

    /// From submission to its end (or to `now_ms`), ms.
    pub fn duration_ms(&self, now_ms: u64) -> u64 {
        let end = self.finished_at_ms.unwrap_or(now_ms);
        end.saturating_sub(self.submitted_at_ms)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Jobs {
    pub jobs: Vec<Job>,
}

/// A registered framework.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Framework {
    pub id: String,
    pub name: String,
    pub role: String,
    pub weight: f64,
    pub allocated: Resources,
    pub allocated_share: f64,
    pub dominant_share: Option<f64>,
    pub registered_at_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Frameworks {
    pub frameworks: Vec<Framework>,
    pub leader: bool,
}

/// An open offer.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Offer {
    pub id: u64,
    pub framework: String,
    pub agent: String,
    pub resources: Resources,
    pub age_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Offers {
    pub leader: bool,
    pub offers: Vec<Offer>,
}

/// A serverless lease.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Lease {
    pub id: u64,
    pub agent: String,
    pub resources: Resources,
    pub allocated_at_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Leases {
    pub leases: Vec<Lease>,
}

/// A role's quota.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Role {
    pub name: String,
    pub weight: f64,
    pub quota: Option<Resources>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Roles {
    pub roles: Vec<Role>,
}

/// Human units.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A duration in ms, for people.
pub fn millis(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms} ms"),
        1000..=59_999 => format!("{:.1} s", ms as f64 / 1000.0),
        _ => format!("{}m {}s", ms / 60_000, (ms % 60_000) / 1000),
    }
}

/// How long ago `at_ms` was, for people.
pub fn ago(now_ms: u64, at_ms: u64) -> String {
    if at_ms == 0 {
        return "—".into();
    }
    let d = now_ms.saturating_sub(at_ms) / 1000;
    match d {
        0..=59 => format!("{d}s ago"),
        60..=3599 => format!("{}m ago", d / 60),
        3600..=86_399 => format!("{}h ago", d / 3600),
        _ => format!("{}d ago", d / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_pages_read_as_one_line_per_logged_line() {
        let page: LogPage = serde_json::from_str(
            r#"{"node": 2, "next": 9, "records": [
                {"seq": 8, "version": 3, "status": 200, "log": "a\nb\n", "dropped": 0},
                {"seq": 9, "version": 3, "status": 500, "log": "c", "dropped": 10, "future": 1}
            ]}"#,
        )
        .expect("a log page");
        assert_eq!(
            page.lines(),
            [
                "v3 200 | a",
                "v3 200 | b",
                "v3 500 | c",
                "v3 500 | (10 more bytes beyond the log limit)"
            ]
        );
    }

    #[test]
    fn units_read_well() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(329_869), "322.1 KiB");
        assert_eq!(millis(1500), "1.5 s");
        assert_eq!(millis(125_000), "2m 5s");
        assert_eq!(ago(10_000, 7_000), "3s ago");
    }

    #[test]
    fn a_job_reads_from_the_api_shape() {
        let job: Job = serde_json::from_str(
            r#"{"id":1,"function":"wordcount","state":"FINISHED","attempts":[{"number":1,"agent":"a1","state":"FINISHED"}],"submitted_at_ms":1000,"finished_at_ms":1500,"unknown":true}"#,
        )
        .unwrap();
        assert_eq!(job.agent(), "a1");
        assert!(job.ended());
        assert_eq!(job.duration_ms(9999), 500);
    }
}
