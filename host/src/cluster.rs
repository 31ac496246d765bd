//! This node's view of the cluster: proposing commands and linearizable reads through
//! the leader (forwarded over Cap'n Proto when this node is not the leader), membership
//! changes, and status.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{
    ChangeMembershipError, CheckIsLeaderError, ClientWriteError, ForwardToLeader, RaftError,
};
use openraft::{ChangeMembers, ServerState};
use serde::Serialize;

use crate::consensus::{NodeAddr, NodeId, Raft};
use wafer_proto::node_capnp::failure;

use crate::rpc::{read_failure, write_node_info, Peers, RpcError, RpcHandle};
use crate::state::{Command, CommandResponse, Rejection};

/// How long an operation may wait for a leader and retry on leadership changes.
const LEADER_DEADLINE: Duration = Duration::from_secs(15);
/// How long adding a node may take (the new node catches up first).
const ADD_NODE_DEADLINE: Duration = Duration::from_secs(120);
/// Pause between retries while no leader is known.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// What a cluster operation can fail with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClusterError {
    /// This node is not the leader (the leader it knows of, if any, is given).
    #[error("this node is not the leader{}", leader.as_ref().map(|(id, a)| format!("; the leader is node {id} at {}", a.rpc)).unwrap_or_default())]
    NotLeader {
        /// The leader's id and addresses.
        leader: Option<(NodeId, NodeAddr)>,
    },
    /// The request was refused.
    #[error("{0}")]
    Rejected(String),
    /// The cluster cannot serve the request now (no leader or quorum, shutting down).
    #[error("cluster unavailable: {0}")]
    Unavailable(String),
}

impl From<RpcError> for ClusterError {
    fn from(e: RpcError) -> ClusterError {
        let message = e.to_string();
        // A peer of another cluster will not change its mind: not worth retrying.
        if message.contains(crate::rpc::door::WRONG_SECRET) {
            ClusterError::Rejected(message)
        } else {
            ClusterError::Unavailable(message)
        }
    }
}

fn not_leader(f: ForwardToLeader<NodeId, NodeAddr>) -> ClusterError {
    ClusterError::NotLeader {
        leader: f.leader_id.zip(f.leader_node),
    }
}

fn write_error(e: RaftError<NodeId, ClientWriteError<NodeId, NodeAddr>>) -> ClusterError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => not_leader(f),
        // Another membership change is under way: retry after it.
        RaftError::APIError(ClientWriteError::ChangeMembershipError(
            e @ ChangeMembershipError::InProgress(_),
        )) => ClusterError::Unavailable(e.to_string()),
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            ClusterError::Rejected(e.to_string())
        }
        RaftError::Fatal(f) => ClusterError::Unavailable(f.to_string()),
    }
}

/// An operation that must run on the leader.
#[derive(Clone)]
enum LeaderOp {
    Propose(Command),
    ReadIndex,
    AddNode(NodeId, NodeAddr, bool),
    RemoveNode(NodeId),
}

/// What a [`LeaderOp`] returned.
enum LeaderAnswer {
    Proposed(Committed),
    ReadIndex(u64),
    Done,
}

/// A member as shown by [`ClusterStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Member {
    /// Node id.
    pub id: NodeId,
    /// Cap'n Proto address.
    pub rpc: String,
    /// HTTP gateway address.
    pub http: String,
    /// Whether it votes (else it is a learner).
    pub voter: bool,
}

/// This node's view of the cluster (`GET /v1/cluster`).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ClusterStatus {
    /// This node's id.
    pub id: NodeId,
    /// This node's role: leader, follower, candidate or learner.
    pub state: String,
    /// The leader this node knows of.
    pub leader_id: Option<NodeId>,
    /// Current term.
    pub term: u64,
    /// Voters and learners.
    pub members: Vec<Member>,
    /// Index of the last entry in this node's log.
    pub last_log_index: Option<u64>,
    /// Index of the last entry applied to this node's state.
    pub applied_index: Option<u64>,
    /// On the leader, the highest index a majority of voters has in its log (the
    /// commit index); absent on other nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub committed_index: Option<u64>,
    /// Index covered by this node's latest snapshot.
    pub snapshot_index: Option<u64>,
    /// Index up to which this node's log was compacted away.
    pub purged_index: Option<u64>,
}

/// Most commands in one batch.
const MAX_BATCH: usize = 512;
/// Most bytes of commands in one batch (a deploy's module counts).
const MAX_BATCH_BYTES: usize = 4 << 20;

/// A committed command: its log index, and the state machine's refusal if it refused
/// it. (What it changed is read from the local state once it has caught up to `index`.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    /// The log index of the entry that carried the command.
    pub index: u64,
    /// Why the state machine refused the command, if it did.
    pub rejection: Option<Rejection>,
    /// The id the command created (a submitted job's).
    pub created: Option<u64>,
}

impl Committed {
    fn new(index: u64, response: CommandResponse) -> Committed {
        Committed {
            index,
            created: match &response {
                CommandResponse::JobSubmitted(job) => Some(job.0),
                CommandResponse::JobLaunched { task, .. } => Some(task.job.0),
                _ => None,
            },
            rejection: match response {
                CommandResponse::Rejected(why) => Some(why),
                _ => None,
            },
        }
    }
}

type Proposal = (
    Command,
    tokio::sync::oneshot::Sender<Result<Committed, ClusterError>>,
);

/// Log entries of batched proposals in flight at once: one, until the log's flush
/// thread takes it to write (see [`batch_proposals`]). The next batch gathers every
/// proposal that arrives meanwhile and is queued during that flush, so the disk goes
/// from one flush to the next. Two in flight (until applied) made smaller batches for
/// the same fsyncs and measured 15-45 % fewer commits/s at 4 to 64 clients; releasing
/// at the flush's start instead of its end measured +6-12 % at 4-64 clients on one
/// node and +9 % at 64 on three (docs/benchmarks.md).
const MAX_IN_FLIGHT: usize = 1;

/// Batches proposals made on this node: while entries are being committed, the
/// proposals that arrive meanwhile wait and then go together as one
/// [`Command::Batch`] entry. (openraft 0.9 writes one entry per `client_write`;
/// batching lets one fsync commit many commands.) Entries are submitted in arrival
/// order; up to [`MAX_IN_FLIGHT`] are in flight, an entry until this node's log
/// (`durable`) has taken it to write, or it is answered: the next one is then queued
/// while the last is flushed, and the log's flush thread writes it right after (group
/// commit).
async fn batch_proposals(
    raft: Raft,
    durable: crate::consensus::DurableLog,
    mut proposals: tokio::sync::mpsc::UnboundedReceiver<Proposal>,
) {
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    while let Some(first) = proposals.recv().await {
        // Wait for a slot first: proposals keep arriving meanwhile and join the batch.
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let mut bytes = first.0.size();
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            match proposals.try_recv() {
                Ok(next) => {
                    bytes += next.0.size();
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        let (commands, waiters): (Vec<Command>, Vec<_>) = batch.into_iter().unzip();
        let single = commands.len() == 1;
        let command = match <[Command; 1]>::try_from(commands) {
            Ok([one]) => one,
            Err(many) => Command::Batch(many),
        };
        // Submitted here, in order; answered by a task.
        let next_index = durable.appended_index() + 1;
        let submitted = raft.client_write_ff(command).await;
        let durable = durable.clone();
        tokio::spawn(async move {
            let answered = async {
                match submitted {
                    Err(fatal) => Err(ClusterError::Unavailable(fatal.to_string())),
                    Ok(receiver) => match receiver.await {
                        Err(_) => Err(ClusterError::Unavailable("Raft stopped".into())),
                        Ok(result) => result.map_err(|e| write_error(RaftError::APIError(e))),
                    },
                }
            };
            tokio::pin!(answered);
            // The next batch may go once this one is being written to this node's
            // disk: it is then appended while this one is flushed (and, on a leader of
            // several, while the followers flush this one), and flushed right after.
            let early = tokio::select! {
                result = &mut answered => Some(result),
                () = durable.wait_taken(next_index) => None,
            };
            drop(permit);
            let result = match early {
                Some(result) => result,
                None => answered.await,
            };
            answer(waiters, single, result);
        });
    }
}

/// Sends each waiter of a batch its answer.
fn answer(
    waiters: Vec<tokio::sync::oneshot::Sender<Result<Committed, ClusterError>>>,
    single: bool,
    result: Result<openraft::raft::ClientWriteResponse<crate::consensus::TypeConfig>, ClusterError>,
) {
    let answers: Vec<Result<Committed, ClusterError>> = match result {
        Err(e) => waiters.iter().map(|_| Err(e.clone())).collect(),
        Ok(response) => {
            let index = response.log_id.index;
            match (single, response.data) {
                (true, Some(answer)) => vec![Ok(Committed::new(index, answer))],
                (false, Some(CommandResponse::Batch(answers)))
                    if answers.len() == waiters.len() =>
                {
                    answers
                        .into_iter()
                        .map(|a| Ok(Committed::new(index, a)))
                        .collect()
                }
                (_, other) => waiters
                    .iter()
                    .map(|_| {
                        Err(ClusterError::Unavailable(format!(
                            "unexpected answer from the state machine: {other:?}"
                        )))
                    })
                    .collect(),
            }
        }
    };
    for (waiter, answer) in waiters.into_iter().zip(answers) {
        let _ = waiter.send(answer);
    }
}

/// This node's handle on the cluster.
pub struct Cluster {
    id: NodeId,
    addr: NodeAddr,
    raft: Raft,
    rpc: RpcHandle,
    /// Membership changes made here run one at a time (Raft allows one in flight).
    membership_changes: tokio::sync::Mutex<()>,
    /// Proposals to batch (see [`batch_proposals`]).
    proposals: tokio::sync::mpsc::UnboundedSender<Proposal>,
}

impl Cluster {
    /// A handle for node `id` reachable at `addr`. Starts its proposal batcher on the
    /// RPC thread, where Raft runs (see `server::start`).
    pub fn new(
        id: NodeId,
        addr: NodeAddr,
        raft: Raft,
        rpc: RpcHandle,
        durable: crate::consensus::DurableLog,
    ) -> Cluster {
        let (proposals, queue) = tokio::sync::mpsc::unbounded_channel();
        if let Err(e) = rpc.spawn(batch_proposals(raft.clone(), durable, queue)) {
            // Proposals then fail with "unavailable" instead of waiting.
            tracing::error!(error = %e, "cannot start the proposal batcher");
        }
        Cluster {
            id,
            addr,
            raft,
            rpc,
            membership_changes: tokio::sync::Mutex::new(()),
            proposals,
        }
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// This node's addresses.
    pub fn addr(&self) -> &NodeAddr {
        &self.addr
    }

    /// The RPC thread's handle.
    pub fn rpc(&self) -> &RpcHandle {
        &self.rpc
    }

    /// The local Raft.
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// Why the local Raft stopped by itself (a storage error it cannot go on from), if
    /// it did: the node can then serve nothing that needs the cluster.
    pub fn raft_stopped(&self) -> Option<String> {
        match &self.raft.metrics().borrow().running_state {
            Err(fatal) => Some(fatal.to_string()),
            Ok(()) => None,
        }
    }

    /// The leader this node knows of, with its addresses.
    pub fn leader(&self) -> Option<(NodeId, NodeAddr)> {
        let metrics = self.raft.metrics().borrow().clone();
        let leader = metrics.current_leader?;
        let addr = metrics
            .membership_config
            .membership()
            .get_node(&leader)?
            .clone();
        Some((leader, addr))
    }

    /// This node's term while it is the leader.
    pub fn leading_term(&self) -> Option<u64> {
        let metrics = self.raft.metrics().borrow().clone();
        (metrics.state == ServerState::Leader && metrics.current_leader == Some(self.id))
            .then_some(metrics.current_term)
    }

    /// The index of the last entry applied to this node's state.
    pub fn applied_index(&self) -> Option<u64> {
        self.raft
            .metrics()
            .borrow()
            .last_applied
            .map(|log_id| log_id.index)
    }

    /// Whether this node has a Raft state (it bootstrapped or was added to a cluster).
    pub async fn is_member(&self) -> bool {
        self.raft.is_initialized().await.unwrap_or(false)
    }

    /// Makes this node a one-node cluster, unless it already has a Raft state.
    pub async fn bootstrap(&self) -> Result<(), ClusterError> {
        if self.is_member().await {
            return Ok(());
        }
        let members = std::collections::BTreeMap::from([(self.id, self.addr.clone())]);
        self.raft
            .initialize(members)
            .await
            .map_err(|e| ClusterError::Unavailable(format!("bootstrapping: {e}")))
    }

    /// Commits `command` through the leader; returns its log index and the state
    /// machine's answer.
    pub async fn propose(&self, command: Command) -> Result<Committed, ClusterError> {
        match self
            .on_leader(LeaderOp::Propose(command), LEADER_DEADLINE)
            .await?
        {
            LeaderAnswer::Proposed(committed) => Ok(committed),
            _ => Err(ClusterError::Unavailable(
                "unexpected answer to a proposal".into(),
            )),
        }
    }

    /// A linearizable read point: the leader's confirmed commit index, once this node
    /// has applied up to it.
    pub async fn read_index(&self) -> Result<u64, ClusterError> {
        let index = match self.on_leader(LeaderOp::ReadIndex, LEADER_DEADLINE).await? {
            LeaderAnswer::ReadIndex(index) => index,
            _ => {
                return Err(ClusterError::Unavailable(
                    "unexpected answer to a read".into(),
                ))
            }
        };
        self.raft
            .wait(Some(LEADER_DEADLINE))
            .applied_index_at_least(Some(index), "read index")
            .await
            .map_err(|e| {
                ClusterError::Unavailable(format!("catching up to the read index {index}: {e}"))
            })?;
        Ok(index)
    }

    /// Adds node `id` as a learner and, with `voter`, promotes it once it caught up.
    pub async fn add_node(
        &self,
        id: NodeId,
        addr: NodeAddr,
        voter: bool,
    ) -> Result<(), ClusterError> {
        self.on_leader(LeaderOp::AddNode(id, addr, voter), ADD_NODE_DEADLINE)
            .await
            .map(|_| ())
    }

    /// Adds the node listening at `rpc_addr` (it must not belong to another cluster).
    pub async fn add_node_at(&self, rpc_addr: &str) -> Result<(NodeId, NodeAddr), ClusterError> {
        let target = rpc_addr.to_string();
        let (id, addr, member) = self
            .rpc
            .run(move |peers| async move {
                let (node, _) = peers.get(&target).await?;
                let reply = node.info_request().send().promise.await.map_err(|e| {
                    peers.forget(&target);
                    RpcError::from_capnp(&target, e)
                })?;
                let fail = |e: capnp::Error| RpcError::Failed {
                    addr: target.clone(),
                    message: e.to_string(),
                };
                let r = reply.get().map_err(fail)?;
                let (id, addr) =
                    crate::rpc::read_node_info(r.get_info().map_err(fail)?).map_err(fail)?;
                Ok::<_, RpcError>((id, addr, r.get_member()))
            })
            .await??;
        let known = self.status().members.iter().any(|m| m.id == id);
        if member && !known {
            return Err(ClusterError::Rejected(format!(
                "node {id} at {rpc_addr} already belongs to another cluster; start it with \
                 an empty data folder and --join"
            )));
        }
        self.add_node(id, addr.clone(), true).await?;
        Ok((id, addr))
    }

    /// Removes node `id` from the voters and learners.
    pub async fn remove_node(&self, id: NodeId) -> Result<(), ClusterError> {
        self.on_leader(LeaderOp::RemoveNode(id), LEADER_DEADLINE)
            .await
            .map(|_| ())
    }

    /// Asks the cluster at `rpc_addr` (any member) to add this node, retrying until
    /// `deadline` while the cluster is unreachable or has no leader.
    pub async fn join(&self, rpc_addr: &str, deadline: Duration) -> Result<(), ClusterError> {
        let until = Instant::now() + deadline;
        loop {
            let result = self
                .remote(
                    rpc_addr,
                    LeaderOp::AddNode(self.id, self.addr.clone(), true),
                )
                .await;
            match result {
                Ok(_) => return Ok(()),
                Err(ClusterError::Rejected(message)) => {
                    return Err(ClusterError::Rejected(message))
                }
                Err(e) if Instant::now() >= until => return Err(e),
                Err(e) => {
                    tracing::info!(error = %e, "joining the cluster; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// Proposes `command` to the local Raft, which must be the leader.
    pub async fn propose_here(&self, command: Command) -> Result<Committed, ClusterError> {
        match self.here(LeaderOp::Propose(command)).await? {
            LeaderAnswer::Proposed(committed) => Ok(committed),
            _ => Err(ClusterError::Unavailable(
                "unexpected answer to a proposal".into(),
            )),
        }
    }

    /// The read index of the local Raft, which must be the leader.
    pub async fn read_index_here(&self) -> Result<u64, ClusterError> {
        match self.here(LeaderOp::ReadIndex).await? {
            LeaderAnswer::ReadIndex(index) => Ok(index),
            _ => Err(ClusterError::Unavailable(
                "unexpected answer to a read".into(),
            )),
        }
    }

    /// This node's view of the cluster.
    pub fn status(&self) -> ClusterStatus {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let members = membership
            .nodes()
            .map(|(id, addr)| Member {
                id: *id,
                rpc: addr.rpc.clone(),
                http: addr.http.clone(),
                voter: voters.contains(id),
            })
            .collect();
        let committed_index = (metrics.state == ServerState::Leader)
            .then(|| {
                let replication = metrics.replication.as_ref()?;
                let mut matched: Vec<u64> = voters
                    .iter()
                    .map(|v| {
                        if *v == self.id {
                            metrics.last_log_index.unwrap_or(0)
                        } else {
                            replication
                                .get(v)
                                .copied()
                                .flatten()
                                .map_or(0, |id| id.index)
                        }
                    })
                    .collect();
                matched.sort_unstable_by(|a, b| b.cmp(a));
                matched.get(matched.len() / 2).copied()
            })
            .flatten();
        ClusterStatus {
            id: self.id,
            state: match metrics.state {
                ServerState::Leader => "leader",
                ServerState::Follower => "follower",
                ServerState::Candidate => "candidate",
                ServerState::Learner => "learner",
                ServerState::Shutdown => "shutdown",
            }
            .to_string(),
            leader_id: metrics.current_leader,
            term: metrics.current_term,
            members,
            last_log_index: metrics.last_log_index,
            applied_index: metrics.last_applied.map(|id| id.index),
            committed_index,
            snapshot_index: metrics.snapshot.map(|id| id.index),
            purged_index: metrics.purged.map(|id| id.index),
        }
    }

    /// Runs `op` on the leader: here when this node leads, else forwarded; retried
    /// across leader changes until `deadline`.
    async fn on_leader(
        &self,
        op: LeaderOp,
        deadline: Duration,
    ) -> Result<LeaderAnswer, ClusterError> {
        let until = Instant::now() + deadline;
        let mut leader: Option<(NodeId, NodeAddr)> = None;
        loop {
            let result = match &leader {
                Some((id, addr)) if *id != self.id => self.remote(&addr.rpc, op.clone()).await,
                _ => self.here(op.clone()).await,
            };
            let retry = match result {
                Ok(answer) => return Ok(answer),
                Err(ClusterError::NotLeader { leader: known }) => {
                    let moved = known.is_some() && known != leader;
                    leader = known;
                    if moved {
                        continue;
                    }
                    ClusterError::Unavailable("no leader is elected".into())
                }
                Err(ClusterError::Rejected(m)) => return Err(ClusterError::Rejected(m)),
                Err(e) => {
                    // The leader we tried is gone: ask the local Raft again.
                    leader = None;
                    e
                }
            };
            if let Some(fatal) = self.raft_stopped() {
                // Nothing to wait for: the node exits (see `server::serve`).
                return Err(ClusterError::Unavailable(format!(
                    "this node's Raft stopped: {fatal}"
                )));
            }
            if Instant::now() >= until {
                return Err(retry);
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    /// Runs `op` on the local Raft.
    async fn here(&self, op: LeaderOp) -> Result<LeaderAnswer, ClusterError> {
        match op {
            LeaderOp::Propose(command) => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                self.proposals
                    .send((command, tx))
                    .map_err(|_| ClusterError::Unavailable("the proposer has stopped".into()))?;
                let committed = rx
                    .await
                    .map_err(|_| ClusterError::Unavailable("the proposer has stopped".into()))??;
                Ok(LeaderAnswer::Proposed(committed))
            }
            LeaderOp::ReadIndex => match self.raft.ensure_linearizable().await {
                Ok(read) => Ok(LeaderAnswer::ReadIndex(read.map_or(0, |id| id.index))),
                Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                    Err(not_leader(f))
                }
                Err(e) => Err(ClusterError::Unavailable(e.to_string())),
            },
            LeaderOp::AddNode(id, addr, voter) => {
                let _one_at_a_time = self.membership_changes.lock().await;
                let metrics = self.raft.metrics().borrow().clone();
                let membership = metrics.membership_config.membership();
                if let Some(existing) = membership.get_node(&id) {
                    if existing != &addr {
                        return Err(ClusterError::Rejected(format!(
                            "node id {id} is already a member at {existing}; remove it first"
                        )));
                    }
                }
                let is_voter = membership.voter_ids().any(|v| v == id);
                if metrics.current_leader != Some(self.id) {
                    return Err(ClusterError::NotLeader {
                        leader: metrics
                            .current_leader
                            .and_then(|l| membership.get_node(&l).map(|a| (l, a.clone()))),
                    });
                }
                if !is_voter {
                    self.raft
                        .add_learner(id, addr, true)
                        .await
                        .map_err(write_error)?;
                    if voter {
                        self.raft
                            .change_membership(
                                ChangeMembers::AddVoterIds(BTreeSet::from([id])),
                                false,
                            )
                            .await
                            .map_err(write_error)?;
                    }
                    tracing::info!(node = id, voter, "node added");
                }
                Ok(LeaderAnswer::Done)
            }
            LeaderOp::RemoveNode(id) => {
                let _one_at_a_time = self.membership_changes.lock().await;
                let metrics = self.raft.metrics().borrow().clone();
                let membership = metrics.membership_config.membership();
                if membership.get_node(&id).is_none() {
                    return Err(ClusterError::Rejected(format!("node {id} is not a member")));
                }
                let change = if membership.voter_ids().any(|v| v == id) {
                    ChangeMembers::RemoveVoters(BTreeSet::from([id]))
                } else {
                    ChangeMembers::RemoveNodes(BTreeSet::from([id]))
                };
                self.raft
                    .change_membership(change, false)
                    .await
                    .map_err(write_error)?;
                tracing::info!(node = id, "node removed");
                Ok(LeaderAnswer::Done)
            }
        }
    }

    /// Runs `op` on the node at `rpc_addr`.
    async fn remote(&self, rpc_addr: &str, op: LeaderOp) -> Result<LeaderAnswer, ClusterError> {
        let target = rpc_addr.to_string();
        self.rpc
            .run(move |peers| async move {
                let result = call_remote(&peers, &target, op).await;
                if let Err(ClusterError::Unavailable(_)) = &result {
                    peers.forget(&target);
                }
                result
            })
            .await?
    }
}

/// Sends `op` to the node at `addr` (on the RPC thread).
async fn call_remote(
    peers: &Peers,
    addr: &str,
    op: LeaderOp,
) -> Result<LeaderAnswer, ClusterError> {
    let (node, _) = peers.get(addr).await?;
    let transport = |e: capnp::Error| ClusterError::from(RpcError::from_capnp(addr, e));
    let failure = |r: Result<failure::Reader<'_>, capnp::Error>| -> ClusterError {
        match r.and_then(read_failure) {
            Ok(e) => e,
            Err(e) => transport(e),
        }
    };
    match op {
        LeaderOp::Propose(command) => {
            let mut request = node.propose_request();
            command.write(request.get().init_command());
            let reply = request.send().promise.await.map_err(transport)?;
            let r = reply.get().map_err(transport)?;
            if r.has_failure() {
                return Err(failure(r.get_failure()));
            }
            let text = r
                .get_rejection()
                .map_err(transport)?
                .to_str()
                .map_err(|e| transport(e.into()))?;
            let rejection = if text.is_empty() {
                None
            } else {
                Some(serde_json::from_str(text).map_err(|e| {
                    ClusterError::Unavailable(format!("malformed answer from {addr}: {e}"))
                })?)
            };
            Ok(LeaderAnswer::Proposed(Committed {
                index: r.get_log_index(),
                rejection,
                created: Some(r.get_created()).filter(|c| *c != 0),
            }))
        }
        LeaderOp::ReadIndex => {
            let reply = node
                .read_index_request()
                .send()
                .promise
                .await
                .map_err(transport)?;
            let r = reply.get().map_err(transport)?;
            if r.has_failure() {
                return Err(failure(r.get_failure()));
            }
            Ok(LeaderAnswer::ReadIndex(r.get_index()))
        }
        LeaderOp::AddNode(id, node_addr, voter) => {
            let mut request = node.add_node_request();
            write_node_info(request.get().init_node(), id, &node_addr);
            request.get().set_voter(voter);
            let reply = request.send().promise.await.map_err(transport)?;
            let r = reply.get().map_err(transport)?;
            if r.has_failure() {
                return Err(failure(r.get_failure()));
            }
            Ok(LeaderAnswer::Done)
        }
        LeaderOp::RemoveNode(id) => {
            let mut request = node.remove_node_request();
            request.get().set_id(id);
            let reply = request.send().promise.await.map_err(transport)?;
            let r = reply.get().map_err(transport)?;
            if r.has_failure() {
                return Err(failure(r.get_failure()));
            }
            Ok(LeaderAnswer::Done)
        }
    }
}
