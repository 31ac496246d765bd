//! The server side of `node.capnp` and `raft.capnp`: decodes requests, hands them to
//! the node's [`Cluster`], encodes the answers.

use std::sync::Arc;

use capnp::capability::Rc;
use wafer_proto::node_capnp::{agent_info, failure, node, node_info, task_launch};
use wafer_proto::raft_capnp::raft;

use crate::cluster::{Cluster, ClusterError};
use crate::consensus::{codec, NodeAddr, NodeId};
use crate::scheduler::{LaunchSpec, Scheduler};
use crate::state::{
    read_resources, read_task_ref, read_task_update, write_resources, write_task_ref, AgentId,
    Command, Resources,
};

/// The node's `Node` capability.
pub struct NodeService {
    cluster: Arc<Cluster>,
    scheduler: Arc<Scheduler>,
}

impl NodeService {
    /// Serves `cluster` and its `scheduler`.
    pub fn new(cluster: Arc<Cluster>, scheduler: Arc<Scheduler>) -> NodeService {
        NodeService { cluster, scheduler }
    }
}

/// What an agent registers with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentInfo {
    /// Its id.
    pub id: AgentId,
    /// Its executor's Cap'n Proto address.
    pub rpc: String,
    /// Its capacity.
    pub resources: Resources,
    /// Its attributes.
    pub attributes: std::collections::BTreeMap<String, String>,
}

/// Writes an `AgentInfo`.
pub fn write_agent_info(mut b: agent_info::Builder<'_>, agent: &AgentInfo) {
    b.set_id(agent.id.as_str());
    b.set_rpc_addr(agent.rpc.as_str());
    write_resources(b.reborrow().init_resources(), &agent.resources);
    let mut list = b.init_attributes(agent.attributes.len() as u32);
    for (i, (key, value)) in agent.attributes.iter().enumerate() {
        let mut label = list.reborrow().get(i as u32);
        label.set_key(key.as_str());
        label.set_value(value.as_str());
    }
}

/// Writes a `TaskLaunch`.
pub fn write_launch(mut b: task_launch::Builder<'_>, spec: &LaunchSpec) {
    write_task_ref(b.reborrow().init_task(), &spec.task);
    b.set_function(spec.function.as_str());
    b.set_module(spec.module.to_string().as_str());
    // Limits are plain numbers: they always serialize.
    b.set_limits(
        serde_json::to_string(&spec.limits)
            .unwrap_or_default()
            .as_str(),
    );
    b.set_input(spec.input.to_string().as_str());
    let mut env = b.init_env(spec.env.len() as u32);
    for (i, (key, value)) in spec.env.iter().enumerate() {
        let mut label = env.reborrow().get(i as u32);
        label.set_key(key.as_str());
        label.set_value(value.as_str());
    }
}

/// Reads a `TaskLaunch`.
pub fn read_launch(r: task_launch::Reader<'_>) -> Result<LaunchSpec, capnp::Error> {
    let mut env = std::collections::BTreeMap::new();
    for label in r.get_env()? {
        env.insert(
            label.get_key()?.to_str()?.to_string(),
            label.get_value()?.to_str()?.to_string(),
        );
    }
    Ok(LaunchSpec {
        task: read_task_ref(r.get_task()?),
        function: r.get_function()?.to_str()?.parse().map_err(failed)?,
        module: r.get_module()?.to_str()?.parse().map_err(failed)?,
        limits: serde_json::from_str(r.get_limits()?.to_str()?).map_err(failed)?,
        env,
        input: r.get_input()?.to_str()?.parse().map_err(failed)?,
    })
}

/// Reads an `AgentInfo`.
pub fn read_agent_info(r: agent_info::Reader<'_>) -> Result<AgentInfo, capnp::Error> {
    let mut attributes = std::collections::BTreeMap::new();
    for label in r.get_attributes()? {
        attributes.insert(
            label.get_key()?.to_str()?.to_string(),
            label.get_value()?.to_str()?.to_string(),
        );
    }
    Ok(AgentInfo {
        id: r.get_id()?.to_str()?.parse().map_err(failed)?,
        rpc: r.get_rpc_addr()?.to_str()?.to_string(),
        resources: read_resources(r.get_resources()?),
        attributes,
    })
}

pub(super) fn failed(e: impl std::fmt::Display) -> capnp::Error {
    capnp::Error::failed(e.to_string())
}

/// Writes a node's identity.
pub fn write_node_info(mut b: node_info::Builder<'_>, id: NodeId, addr: &NodeAddr) {
    b.set_id(id);
    b.set_rpc_addr(addr.rpc.as_str());
    b.set_http_addr(addr.http.as_str());
}

/// Reads a node's identity.
pub fn read_node_info(r: node_info::Reader<'_>) -> Result<(NodeId, NodeAddr), capnp::Error> {
    Ok((
        r.get_id(),
        NodeAddr {
            rpc: r.get_rpc_addr()?.to_str()?.to_string(),
            http: r.get_http_addr()?.to_str()?.to_string(),
        },
    ))
}

/// Writes `error` as a `Failure`.
pub fn write_failure(mut b: failure::Builder<'_>, error: &ClusterError) {
    b.set_message(error.to_string().as_str());
    b.set_kind(match error {
        ClusterError::NotLeader { .. } => failure::Kind::NotLeader,
        ClusterError::Rejected(_) => failure::Kind::Rejected,
        _ => failure::Kind::Unavailable,
    });
    if let ClusterError::NotLeader {
        leader: Some((id, addr)),
    } = error
    {
        write_node_info(b.init_leader(), *id, addr);
    }
}

/// Reads a `Failure`.
pub fn read_failure(r: failure::Reader<'_>) -> Result<ClusterError, capnp::Error> {
    let message = r.get_message()?.to_str()?.to_string();
    Ok(match r.get_kind()? {
        failure::Kind::NotLeader => ClusterError::NotLeader {
            leader: if r.has_leader() {
                Some(read_node_info(r.get_leader()?)?)
            } else {
                None
            },
        },
        failure::Kind::Rejected => ClusterError::Rejected(message),
        failure::Kind::Unavailable => ClusterError::Unavailable(message),
    })
}

impl node::Server for NodeService {
    async fn info(
        self: Rc<Self>,
        _: node::InfoParams,
        mut results: node::InfoResults,
    ) -> Result<(), capnp::Error> {
        let member = self.cluster.is_member().await;
        let mut r = results.get();
        write_node_info(
            r.reborrow().init_info(),
            self.cluster.id(),
            self.cluster.addr(),
        );
        r.set_member(member);
        Ok(())
    }

    async fn raft(
        self: Rc<Self>,
        _: node::RaftParams,
        mut results: node::RaftResults,
    ) -> Result<(), capnp::Error> {
        let service: raft::Client = capnp_rpc::new_client(RaftService {
            cluster: self.cluster.clone(),
        });
        results.get().set_raft(service);
        Ok(())
    }

    async fn propose(
        self: Rc<Self>,
        params: node::ProposeParams,
        mut results: node::ProposeResults,
    ) -> Result<(), capnp::Error> {
        let command = Command::read(params.get()?.get_command()?).map_err(failed)?;
        match self.cluster.propose_here(command).await {
            Ok(committed) => {
                let mut r = results.get();
                r.set_log_index(committed.index);
                r.set_created(committed.created.unwrap_or(0));
                if let Some(why) = &committed.rejection {
                    r.set_rejection(serde_json::to_string(why).map_err(failed)?.as_str());
                }
            }
            Err(e) => write_failure(results.get().init_failure(), &e),
        }
        Ok(())
    }

    async fn read_index(
        self: Rc<Self>,
        _: node::ReadIndexParams,
        mut results: node::ReadIndexResults,
    ) -> Result<(), capnp::Error> {
        match self.cluster.read_index_here().await {
            Ok(index) => results.get().set_index(index),
            Err(e) => write_failure(results.get().init_failure(), &e),
        }
        Ok(())
    }

    async fn add_node(
        self: Rc<Self>,
        params: node::AddNodeParams,
        mut results: node::AddNodeResults,
    ) -> Result<(), capnp::Error> {
        let params = params.get()?;
        let (id, addr) = read_node_info(params.get_node()?)?;
        let voter = params.get_voter();
        if let Err(e) = self.cluster.add_node(id, addr, voter).await {
            write_failure(results.get().init_failure(), &e);
        }
        Ok(())
    }

    async fn remove_node(
        self: Rc<Self>,
        params: node::RemoveNodeParams,
        mut results: node::RemoveNodeResults,
    ) -> Result<(), capnp::Error> {
        let id = params.get()?.get_id();
        if let Err(e) = self.cluster.remove_node(id).await {
            write_failure(results.get().init_failure(), &e);
        }
        Ok(())
    }

    async fn register_agent(
        self: Rc<Self>,
        params: node::RegisterAgentParams,
        mut results: node::RegisterAgentResults,
    ) -> Result<(), capnp::Error> {
        let params = params.get()?;
        let agent = read_agent_info(params.get_agent()?)?;
        let running = if params.has_running() {
            params.get_running()?.iter().map(read_task_ref).collect()
        } else {
            Vec::new()
        };
        match self
            .scheduler
            .register_agent(
                agent.id,
                agent.rpc,
                agent.resources,
                agent.attributes,
                running,
            )
            .await
        {
            Ok(()) => {
                let interval = self.scheduler.config().heartbeat_interval();
                results
                    .get()
                    .set_heartbeat_ms(interval.as_millis().clamp(1, u32::MAX as u128) as u32);
            }
            Err(e) => write_failure(results.get().init_failure(), &e),
        }
        Ok(())
    }

    async fn heartbeat(
        self: Rc<Self>,
        params: node::HeartbeatParams,
        mut results: node::HeartbeatResults,
    ) -> Result<(), capnp::Error> {
        let params = params.get()?;
        let agent: AgentId = params.get_agent()?.to_str()?.parse().map_err(failed)?;
        let load = crate::scheduler::serverless::AgentLoad {
            slots: u64::from(params.get_busy_slots()),
            accelerators: u64::from(params.get_accel_busy()),
        };
        match self.scheduler.heartbeat(&agent, load) {
            Ok(answer) => {
                let mut r = results.get();
                r.set_reregister(answer.reregister);
                let mut list = r.init_assigned(answer.assigned.len() as u32);
                for (i, spec) in answer.assigned.iter().enumerate() {
                    write_launch(list.reborrow().get(i as u32), spec);
                }
            }
            Err(e) => write_failure(results.get().init_failure(), &e),
        }
        Ok(())
    }

    async fn task_update(
        self: Rc<Self>,
        params: node::TaskUpdateParams,
        mut results: node::TaskUpdateResults,
    ) -> Result<(), capnp::Error> {
        let params = params.get()?;
        let task = read_task_ref(params.get_task()?);
        let update = read_task_update(params.get_update()?).map_err(failed)?;
        match self.scheduler.task_update(task, update).await {
            Ok(accepted) => results.get().set_accepted(accepted),
            Err(e) => write_failure(results.get().init_failure(), &e),
        }
        Ok(())
    }

    async fn scheduler(
        self: Rc<Self>,
        _: node::SchedulerParams,
        mut results: node::SchedulerResults,
    ) -> Result<(), capnp::Error> {
        let service: wafer_proto::node_capnp::scheduler::Client = capnp_rpc::new_client(
            super::framework::SchedulerService::new(self.scheduler.clone()),
        );
        results.get().set_scheduler(service);
        Ok(())
    }

    async fn fetch(
        self: Rc<Self>,
        params: node::FetchParams,
        mut results: node::FetchResults,
    ) -> Result<(), capnp::Error> {
        let digest: crate::digest::Digest = params
            .get()?
            .get_digest()?
            .to_str()?
            .parse()
            .map_err(failed)?;
        if let Some(data) = self.scheduler.fetch(&digest).map_err(failed)? {
            let mut r = results.get();
            r.set_found(true);
            r.set_data(&data);
        }
        Ok(())
    }
}

/// The node's `Raft` capability: hands RPCs to the local Raft.
struct RaftService {
    cluster: Arc<Cluster>,
}

impl raft::Server for RaftService {
    async fn append_entries(
        self: Rc<Self>,
        params: raft::AppendEntriesParams,
        mut results: raft::AppendEntriesResults,
    ) -> Result<(), capnp::Error> {
        let request = codec::read_append_request(params.get()?.get_request()?).map_err(failed)?;
        match self.cluster.raft().append_entries(request).await {
            Ok(response) => codec::write_append_response(results.get().init_response(), &response),
            Err(e) => results
                .get()
                .set_error(serde_json::to_string(&e).map_err(failed)?.as_str()),
        }
        Ok(())
    }

    async fn vote(
        self: Rc<Self>,
        params: raft::VoteParams,
        mut results: raft::VoteResults,
    ) -> Result<(), capnp::Error> {
        let request = codec::read_vote_request(params.get()?.get_request()?).map_err(failed)?;
        match self.cluster.raft().vote(request).await {
            Ok(response) => codec::write_vote_response(results.get().init_response(), &response),
            Err(e) => results
                .get()
                .set_error(serde_json::to_string(&e).map_err(failed)?.as_str()),
        }
        Ok(())
    }

    async fn install_snapshot(
        self: Rc<Self>,
        params: raft::InstallSnapshotParams,
        mut results: raft::InstallSnapshotResults,
    ) -> Result<(), capnp::Error> {
        let request = codec::read_snapshot_request(params.get()?.get_request()?).map_err(failed)?;
        match self.cluster.raft().install_snapshot(request).await {
            Ok(response) => {
                codec::write_snapshot_response(results.get().init_response(), &response)
            }
            Err(e) => results
                .get()
                .set_error(serde_json::to_string(&e).map_err(failed)?.as_str()),
        }
        Ok(())
    }
}
