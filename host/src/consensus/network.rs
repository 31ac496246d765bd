//! The Raft network: openraft's RPCs sent as `raft.capnp` calls over TCP, through the
//! node's RPC thread.

use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};

use super::{
    codec, AppendEntriesRequest, AppendEntriesResponse, DurableLog, Entry, InstallSnapshotRequest,
    InstallSnapshotResponse, NodeAddr, NodeId, TypeConfig, VoteRequest, VoteResponse,
};
use crate::rpc::{RpcError, RpcHandle};
use crate::state::MAX_MESSAGE_WORDS;

/// Estimated bytes of log entries sent in one append-entries call: half the largest
/// message a peer reads ([`MAX_MESSAGE_WORDS`]), so the estimate has room to be wrong.
const MAX_APPEND_BYTES: usize = MAX_MESSAGE_WORDS * 8 / 2;

/// What an entry adds to a message besides its bulky payload, at most (an estimate).
const ENTRY_OVERHEAD: usize = 64 << 10;

/// An entry's estimated size in an append-entries message.
fn entry_bytes(entry: &Entry) -> usize {
    ENTRY_OVERHEAD + super::entry_bulk_bytes(entry)
}

/// Splits a request whose entries would exceed [`MAX_APPEND_BYTES`] into consecutive
/// requests, each following the entries of the one before; an entry is never split.
fn split_append(rpc: AppendEntriesRequest) -> Vec<AppendEntriesRequest> {
    let total: usize = rpc.entries.iter().map(entry_bytes).sum();
    if total <= MAX_APPEND_BYTES || rpc.entries.len() < 2 {
        return vec![rpc];
    }
    let AppendEntriesRequest {
        vote,
        prev_log_id,
        leader_commit,
        entries,
    } = rpc;
    let mut parts = Vec::new();
    let mut part: Vec<Entry> = Vec::new();
    let mut bytes = 0;
    let mut prev = prev_log_id;
    let mut finish = |part: Vec<Entry>, prev: &mut Option<_>| {
        let last = part.last().map(|e| e.log_id);
        // The leader has committed up to `leader_commit`; of that, this part can
        // vouch for its own entries only.
        let commit = match (leader_commit, last) {
            (Some(commit), Some(last)) if commit.index > last.index => Some(last),
            (commit, _) => commit,
        };
        parts.push(AppendEntriesRequest {
            vote,
            prev_log_id: *prev,
            leader_commit: commit,
            entries: part,
        });
        *prev = last;
    };
    for entry in entries {
        let size = entry_bytes(&entry);
        if !part.is_empty() && bytes + size > MAX_APPEND_BYTES {
            finish(std::mem::take(&mut part), &mut prev);
            bytes = 0;
        }
        bytes += size;
        part.push(entry);
    }
    finish(part, &mut prev);
    parts
}

/// Makes a [`Network`] per peer.
#[derive(Clone)]
pub struct NetworkFactory {
    rpc: RpcHandle,
    durable: DurableLog,
}

impl NetworkFactory {
    /// Sends through `rpc`; tells followers of commits only as far as `durable` says
    /// this node's log is on disk.
    pub fn new(rpc: RpcHandle, durable: DurableLog) -> NetworkFactory {
        NetworkFactory { rpc, durable }
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = Network;

    async fn new_client(&mut self, target: NodeId, node: &NodeAddr) -> Network {
        Network {
            rpc: self.rpc.clone(),
            durable: self.durable.clone(),
            target,
            addr: node.rpc.clone(),
        }
    }
}

/// The connection to one peer.
pub struct Network {
    rpc: RpcHandle,
    durable: DurableLog,
    target: NodeId,
    addr: String,
}

type RpcResult<T, E = openraft::error::Infallible> =
    Result<T, RPCError<NodeId, NodeAddr, RaftError<NodeId, E>>>;

/// A remote failure as text, for [`NetworkError`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Remote(String);

fn transport<E: std::error::Error>(
    e: RpcError,
) -> RPCError<NodeId, NodeAddr, RaftError<NodeId, E>> {
    match e {
        RpcError::Unreachable { .. } => RPCError::Unreachable(Unreachable::new(&e)),
        _ => RPCError::Network(NetworkError::new(&e)),
    }
}

/// Decodes the `error` text of a response: openraft's error as JSON.
fn remote<E>(target: NodeId, json: &str) -> RPCError<NodeId, NodeAddr, RaftError<NodeId, E>>
where
    E: std::error::Error + serde::de::DeserializeOwned,
{
    match serde_json::from_str::<RaftError<NodeId, E>>(json) {
        Ok(err) => RPCError::RemoteError(RemoteError::new(target, err)),
        Err(_) => RPCError::Network(NetworkError::new(&Remote(json.to_string()))),
    }
}

fn timed_out<E: std::error::Error>(
    addr: &str,
    ttl: Duration,
) -> RPCError<NodeId, NodeAddr, RaftError<NodeId, E>> {
    RPCError::Unreachable(Unreachable::new(&RpcError::Unreachable {
        addr: addr.to_string(),
        message: format!("no answer within {ttl:?}"),
    }))
}

/// Either an answer or the remote error text.
enum Answer<T> {
    Ok(T),
    Remote(String),
}

impl Network {
    async fn with_timeout<T, E: std::error::Error>(
        &self,
        ttl: Duration,
        call: impl std::future::Future<Output = Result<Result<Answer<T>, RpcError>, RpcError>>,
    ) -> Result<Answer<T>, RPCError<NodeId, NodeAddr, RaftError<NodeId, E>>> {
        match tokio::time::timeout(ttl, call).await {
            Err(_) => Err(timed_out(&self.addr, ttl)),
            Ok(Err(e)) | Ok(Ok(Err(e))) => Err(transport(e)),
            Ok(Ok(Ok(answer))) => Ok(answer),
        }
    }
}

/// One `raft.capnp` call on the RPC thread: `$method` makes the request, `$write` and
/// `$read` are the codec functions of its request and response. Evaluates to the
/// response, or openraft's error (a remote error is decoded from its JSON).
macro_rules! raft_call {
    ($self:ident, $rpc:ident, $option:ident, $method:ident, $write:path, $read:path) => {{
        let addr = $self.addr.clone();
        let call = $self.rpc.run(move |peers| async move {
            let (_, raft) = peers.get(&addr).await?;
            let mut request = raft.$method();
            $write(request.get().init_request(), &$rpc);
            let reply = request.send().promise.await.map_err(|e| {
                peers.forget(&addr);
                RpcError::from_capnp(&addr, e)
            })?;
            let fail = |e: &dyn std::fmt::Display| RpcError::Failed {
                addr: addr.clone(),
                message: e.to_string(),
            };
            let r = reply.get().map_err(|e| fail(&e))?;
            let error = r
                .get_error()
                .map_err(|e| fail(&e))?
                .to_str()
                .map_err(|e| fail(&e))?;
            if !error.is_empty() {
                return Ok(Answer::Remote(error.to_string()));
            }
            let response = $read(r.get_response().map_err(|e| fail(&e))?).map_err(|e| fail(&e))?;
            Ok(Answer::Ok(response))
        });
        match $self.with_timeout($option.hard_ttl(), call).await? {
            Answer::Ok(response) => Ok(response),
            Answer::Remote(json) => Err(remote($self.target, &json)),
        }
    }};
}

impl RaftNetwork<TypeConfig> for Network {
    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse> {
        // The leader may have committed entries it has not flushed yet: a follower must
        // not apply what the leader could still lose (see `super::durable`). Entries go
        // out at once; a message without entries waits for the flush instead.
        rpc.leader_commit = self
            .durable
            .clamp(rpc.leader_commit, rpc.entries.is_empty())
            .await;
        let mut parts = split_append(rpc).into_iter().peekable();
        loop {
            let Some(part) = parts.next() else {
                return Ok(AppendEntriesResponse::Success);
            };
            let response = raft_call!(
                self,
                part,
                option,
                append_entries_request,
                codec::write_append_request,
                codec::read_append_response
            )?;
            // The follower took this part: go on with the next; any other answer is
            // the answer to the whole request.
            if parts.peek().is_none() || !matches!(response, AppendEntriesResponse::Success) {
                return Ok(response);
            }
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse, InstallSnapshotError> {
        raft_call!(
            self,
            rpc,
            option,
            install_snapshot_request,
            codec::write_snapshot_request,
            codec::read_snapshot_response
        )
    }

    async fn vote(&mut self, rpc: VoteRequest, option: RPCOption) -> RpcResult<VoteResponse> {
        raft_call!(
            self,
            rpc,
            option,
            vote_request,
            codec::write_vote_request,
            codec::read_vote_response
        )
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use openraft::{EntryPayload, Vote};

    use super::*;
    use crate::consensus::codec::new_log_id;
    use crate::state::{Command, FunctionSpec, MAX_MODULE_BYTES};

    fn deploy(index: u64, module: &Bytes) -> Entry {
        Entry {
            log_id: new_log_id(2, 1, index),
            payload: EntryPayload::Normal(Command::DeployFunction {
                name: "big".parse().unwrap(),
                spec: FunctionSpec::default(),
                module: module.clone(),
                deployed_at_ms: 0,
            }),
        }
    }

    #[test]
    fn a_batch_of_large_modules_is_sent_in_parts_that_fit_a_message() {
        // Zeroed pages are not touched: the module costs no memory until read.
        let module = Bytes::from(vec![0u8; MAX_MODULE_BYTES as usize]);
        let entries: Vec<Entry> = (11..=15).map(|i| deploy(i, &module)).collect();
        let request = AppendEntriesRequest {
            vote: Vote::new_committed(2, 1),
            prev_log_id: Some(new_log_id(2, 1, 10)),
            leader_commit: Some(new_log_id(2, 1, 14)),
            entries: entries.clone(),
        };
        let parts = split_append(request);
        assert!(parts.len() >= 3, "{} parts", parts.len());
        let mut prev = Some(new_log_id(2, 1, 10));
        for part in &parts {
            let bytes: usize = part.entries.iter().map(entry_bytes).sum();
            assert!(bytes <= MAX_APPEND_BYTES, "a part of {bytes} bytes");
            assert_eq!(part.prev_log_id, prev, "each part follows the one before");
            let last = part.entries.last().map(|e| e.log_id);
            assert!(part.leader_commit.map(|c| c.index) <= last.map(|l| l.index));
            prev = last;
        }
        assert_eq!(
            parts.last().and_then(|p| p.leader_commit),
            Some(new_log_id(2, 1, 14))
        );
        let sent: Vec<Entry> = parts.into_iter().flat_map(|p| p.entries).collect();
        assert_eq!(sent, entries, "every entry once, in order");
    }

    #[test]
    fn a_small_batch_is_sent_whole() {
        let module = Bytes::from_static(b"\0asm\x01\0\0\0");
        let request = AppendEntriesRequest {
            vote: Vote::new_committed(2, 1),
            prev_log_id: None,
            leader_commit: None,
            entries: (1..=64).map(|i| deploy(i, &module)).collect(),
        };
        let parts = split_append(request.clone());
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].entries, request.entries);
        assert_eq!(parts[0].prev_log_id, request.prev_log_id);
    }
}
