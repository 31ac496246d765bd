//! The node's event stream: what happened in the cluster as this node applied it
//! (deploys, removals, job changes, agents joining and leaving) and the Raft leader
//! changes this node saw, fanned out to watchers (the public API's `watch`).
//!
//! Every node applies the same log, so a watcher connected to any node sees the same
//! state changes; it sees them when that node applies them.

use std::sync::Arc;

use serde::Serialize;
use tokio::sync::broadcast;

use crate::state::{AgentId, CommandResponse, FunctionName, FunctionRecord, Observer};

/// Events kept for slow watchers before they miss some.
const BACKLOG: usize = 4096;

/// What happened.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    /// A function was deployed (a new version).
    Deployed {
        /// Its record.
        function: FunctionRecord,
    },
    /// A function was removed.
    Deleted {
        /// Its name.
        name: FunctionName,
    },
    /// A job changed state.
    TaskChanged {
        /// The job.
        job: u64,
        /// The attempt (0: a change of the job alone).
        attempt: u32,
        /// Its state now (`STAGING`, `RUNNING`, ...).
        state: String,
    },
    /// An agent registered and is active.
    NodeJoined {
        /// The agent.
        agent: AgentId,
    },
    /// An agent became unreachable.
    NodeLost {
        /// The agent.
        agent: AgentId,
    },
    /// The Raft leader changed.
    LeaderChanged {
        /// The new leader (none: unknown now).
        leader_id: Option<u64>,
        /// The term.
        term: u64,
    },
}

/// An event and when this node saw it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
    /// What.
    #[serde(flatten)]
    pub kind: EventKind,
}

/// The node's event fan-out.
pub struct Events {
    sender: broadcast::Sender<Arc<Event>>,
}

impl Default for Events {
    fn default() -> Events {
        Events::new()
    }
}

impl Events {
    /// A stream nobody watches yet.
    pub fn new() -> Events {
        Events {
            sender: broadcast::channel(BACKLOG).0,
        }
    }

    /// A receiver of every event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.sender.subscribe()
    }

    /// Sends `kind` to every watcher (none watching: dropped).
    pub fn publish(&self, kind: EventKind) {
        let _ = self.sender.send(Arc::new(Event {
            at_ms: crate::scheduler::now_ms(),
            kind,
        }));
    }

    /// Publishes a `LeaderChanged` event whenever the leader or term that `raft`
    /// reports changes, until `raft` shuts down.
    pub fn follow_leader(self: &Arc<Events>, raft: &crate::consensus::Raft) {
        // The server metrics change with the vote, the leader and the membership only
        // (the full metrics change with every commit).
        let mut metrics = raft.server_metrics();
        let events = self.clone();
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let seen = {
                    let m = metrics.borrow_and_update();
                    (m.current_leader, m.vote.leader_id().term)
                };
                if last != Some(seen) {
                    // The first reading is the state at start, not a change.
                    if last.is_some() {
                        events.publish(EventKind::LeaderChanged {
                            leader_id: seen.0,
                            term: seen.1,
                        });
                    }
                    last = Some(seen);
                }
                if metrics.changed().await.is_err() {
                    return;
                }
            }
        });
    }
}

impl Observer for Events {
    fn applied(&self, _last_index: u64, changes: &[&CommandResponse]) {
        if self.sender.receiver_count() == 0 {
            return;
        }
        for change in changes {
            let kind = match change {
                CommandResponse::Deployed(record) => EventKind::Deployed {
                    function: record.clone(),
                },
                CommandResponse::Deleted(name) => EventKind::Deleted { name: name.clone() },
                CommandResponse::AgentRegistered(agent) => EventKind::NodeJoined {
                    agent: agent.clone(),
                },
                CommandResponse::AgentLost { agent, .. } => EventKind::NodeLost {
                    agent: agent.clone(),
                },
                CommandResponse::JobSubmitted(job) => EventKind::TaskChanged {
                    job: job.0,
                    attempt: 0,
                    state: "STAGING".into(),
                },
                CommandResponse::JobLaunched { task, .. } => EventKind::TaskChanged {
                    job: task.job.0,
                    attempt: task.attempt,
                    state: "STARTING".into(),
                },
                // A staging job whose waiting reason changed: not a state change.
                CommandResponse::JobUpdated {
                    attempt: 0,
                    state: crate::state::TaskState::Staging,
                    ..
                } => continue,
                CommandResponse::JobUpdated {
                    job,
                    attempt,
                    state,
                } => EventKind::TaskChanged {
                    job: job.0,
                    attempt: *attempt,
                    state: state.to_string(),
                },
                _ => continue,
            };
            self.publish(kind);
        }
    }

    fn replaced(&self, _last_index: u64) {}
}
