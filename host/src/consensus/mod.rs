//! Consensus: openraft 0.9 over a redb log and state machine, with Raft RPC carried by
//! Cap'n Proto (`capnp/raft.capnp`). One [`TypeConfig`] pins every Raft type.

// openraft's storage traits fix the error type (`StorageError`, ~224 bytes); the helpers
// that feed them return it too.
#![allow(clippy::result_large_err)]

pub mod codec;
mod durable;
mod log_store;
mod network;
mod state_machine;
mod wal;

use std::fmt;

use serde::{Deserialize, Serialize};

pub use durable::DurableLog;
pub use log_store::LogStore;
pub use network::NetworkFactory;
pub use state_machine::StateMachine;

use crate::state::{Command, CommandResponse};

/// Bytes of bulky payload (modules, job inputs and outputs) above which writing or
/// applying entries is moved off the thread Raft runs on (the node's RPC thread).
const OFF_THREAD_BYTES: usize = 256 << 10;

/// The bulky payload bytes of `entry` (see [`Command::bulk_bytes`]).
fn entry_bulk_bytes(entry: &Entry) -> usize {
    match &entry.payload {
        openraft::EntryPayload::Normal(command) => command.bulk_bytes(),
        _ => 0,
    }
}

/// When something done from time to time was last done.
#[derive(Debug, Default)]
struct Paced(Option<std::time::Instant>);

impl Paced {
    /// Whether `every` has passed since it was last due (or it never was); if so, now
    /// counts as the last time.
    fn due(&mut self, every: std::time::Duration) -> bool {
        let due = self.0.is_none_or(|at| at.elapsed() >= every);
        if due {
            self.mark();
        }
        due
    }

    /// Counts now as the last time it was due.
    fn mark(&mut self) {
        self.0 = Some(std::time::Instant::now());
    }
}

/// The bulky payload bytes of `entries`.
fn bulk_bytes(entries: &[Entry]) -> usize {
    entries.iter().map(entry_bulk_bytes).sum()
}

/// A server's id in the cluster (`wafer server --id`).
pub type NodeId = u64;

/// Where a cluster member can be reached: the node information Raft replicates with
/// the membership.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAddr {
    /// `host:port` of the node's Cap'n Proto interface (`--listen`).
    pub rpc: String,
    /// `host:port` of the node's HTTP gateway (`--http`).
    pub http: String,
}

impl fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rpc={} http={}", self.rpc, self.http)
    }
}

openraft::declare_raft_types!(
    /// wafer's Raft types: commands in, command responses out, nodes by [`NodeAddr`].
    pub TypeConfig:
        D = Command,
        R = Option<CommandResponse>,
        NodeId = NodeId,
        Node = NodeAddr,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The Raft handle.
pub type Raft = openraft::Raft<TypeConfig>;
/// A log entry.
pub type Entry = openraft::Entry<TypeConfig>;
/// A vote.
pub type Vote = openraft::Vote<NodeId>;
/// A log id.
pub type LogId = openraft::LogId<NodeId>;
/// Snapshot metadata.
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, NodeAddr>;
/// Membership as stored.
pub type StoredMembership = openraft::StoredMembership<NodeId, NodeAddr>;
/// A storage failure.
pub type StorageError = openraft::StorageError<NodeId>;
/// Append-entries request.
pub type AppendEntriesRequest = openraft::raft::AppendEntriesRequest<TypeConfig>;
/// Append-entries response.
pub type AppendEntriesResponse = openraft::raft::AppendEntriesResponse<NodeId>;
/// Vote request.
pub type VoteRequest = openraft::raft::VoteRequest<NodeId>;
/// Vote response.
pub type VoteResponse = openraft::raft::VoteResponse<NodeId>;
/// Snapshot chunk.
pub type InstallSnapshotRequest = openraft::raft::InstallSnapshotRequest<TypeConfig>;
/// Snapshot chunk response.
pub type InstallSnapshotResponse = openraft::raft::InstallSnapshotResponse<NodeId>;

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use openraft::testing::{StoreBuilder, Suite};

    use super::{LogStore, StateMachine, StorageError, TypeConfig};
    use crate::state::{NoObserver, State};

    /// Builds a log store and state machine over a fresh redb file in a temporary folder
    /// (kept alive by the returned guard).
    struct RedbBuilder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for RedbBuilder {
        async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError> {
            let io = |e: &dyn std::fmt::Display| {
                StorageError::from(openraft::StorageIOError::write(&std::io::Error::other(
                    e.to_string(),
                )))
            };
            let dir = tempfile::tempdir().map_err(|e| io(&e))?;
            let state = State::open(&dir.path().join("wafer.redb")).map_err(|e| io(&e))?;
            let log = LogStore::open(
                state.database().clone(),
                &dir.path().join("raft-log.wal"),
                0,
            )?;
            let sm = StateMachine::open(
                state,
                &dir.path().join("snapshots"),
                Arc::new(NoObserver),
                log.durable(),
            )?;
            Ok((dir, log, sm))
        }
    }

    #[test]
    fn redb_storage_passes_openraft_conformance_suite() -> Result<(), StorageError> {
        Suite::test_all(RedbBuilder)
    }
}
