//! The Raft network: openraft's RPCs sent as `raft.capnp` calls over TCP, through the
//! node's RPC thread.

use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};

use super::{
    codec, AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest,
    InstallSnapshotResponse, NodeAddr, NodeId, TypeConfig, VoteRequest, VoteResponse,
};
use crate::rpc::{RpcError, RpcHandle};

/// Makes a [`Network`] per peer.
#[derive(Clone)]
pub struct NetworkFactory {
    rpc: RpcHandle,
}

impl NetworkFactory {
    /// Sends through `rpc`.
    pub fn new(rpc: RpcHandle) -> NetworkFactory {
        NetworkFactory { rpc }
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = Network;

    async fn new_client(&mut self, target: NodeId, node: &NodeAddr) -> Network {
        Network {
            rpc: self.rpc.clone(),
            target,
            addr: node.rpc.clone(),
        }
    }
}

/// The connection to one peer.
pub struct Network {
    rpc: RpcHandle,
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
        rpc: AppendEntriesRequest,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse> {
        raft_call!(
            self,
            rpc,
            option,
            append_entries_request,
            codec::write_append_request,
            codec::read_append_response
        )
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
