//! The replicated state machine's commands, their answers, and their Cap'n Proto
//! encoding (`Command` in `capnp/node.capnp`): the bytes proposed, logged and replicated.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use wafer_proto::node_capnp::{command, resources, task_ref, task_update};

use super::{
    AgentId, Allocation, AllocationId, Constraint, FrameworkId, FunctionName, FunctionRecord,
    FunctionSpec, InvalidId, JobId, Resources, RoleName, Scope, TaskRef, TaskState, TaskUpdate,
    TokenId, TokenRecord,
};

/// Largest module a deploy command may carry, bytes. Every replica applies the same
/// limit; a node's gateway may accept less (`--max-module-mb`).
pub const MAX_MODULE_BYTES: u64 = 256 << 20;

/// A change to the replicated state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Stores `module` as the next version of function `name`.
    DeployFunction {
        /// The function.
        name: FunctionName,
        /// Limits and environment.
        spec: FunctionSpec,
        /// The WebAssembly module (binary).
        module: Bytes,
        /// Deploy time chosen by the proposer, ms since the Unix epoch.
        deployed_at_ms: u64,
    },
    /// Removes function `name`.
    DeleteFunction {
        /// The function.
        name: FunctionName,
    },
    /// Makes kept version `version` of function `name` (`None`: the version just before
    /// the current one) current again, as the function's next version.
    RollbackFunction {
        /// The function.
        name: FunctionName,
        /// The version to restore.
        version: Option<u64>,
        /// When, ms since the Unix epoch (chosen by the proposer).
        at_ms: u64,
    },
    /// Sets labels `set` and removes labels `remove` of function `name`.
    SetLabels {
        /// The function.
        name: FunctionName,
        /// Labels to add or change.
        set: BTreeMap<String, String>,
        /// Labels to remove (before `set` is applied).
        remove: Vec<String>,
    },
    /// Commands applied in order as one (answered with [`CommandResponse::Batch`]).
    Batch(Vec<Command>),
    /// Agent `agent` registers (again): active, with this capacity and these attributes.
    RegisterAgent {
        /// The agent.
        agent: AgentId,
        /// Cap'n Proto address of its executor.
        rpc: String,
        /// Its capacity.
        resources: Resources,
        /// Attributes for placement constraints.
        attributes: BTreeMap<String, String>,
        /// The job attempts it runs now (the others placed on it are reconciled).
        running: Vec<TaskRef>,
        /// When, ms since the Unix epoch (chosen by the proposer).
        at_ms: u64,
    },
    /// The leader stopped hearing from `agent`: its allocations return to the pool.
    AgentUnreachable {
        /// The agent.
        agent: AgentId,
        /// When, ms since the Unix epoch.
        at_ms: u64,
    },
    /// A framework registers (again) in a role.
    RegisterFramework {
        /// Its id.
        id: FrameworkId,
        /// A name for people.
        name: String,
        /// Its role.
        role: RoleName,
        /// When, ms since the Unix epoch.
        at_ms: u64,
    },
    /// Sets a role's weight and quota.
    SetRole {
        /// The role.
        role: RoleName,
        /// Its weight (above 0).
        weight: f64,
        /// The most its frameworks may hold together (none: no limit).
        quota: Option<Resources>,
    },
    /// A framework accepts an offer: `resources` of `agent` become its allocation,
    /// unless they are no longer free.
    Accept {
        /// The framework.
        framework: FrameworkId,
        /// The agent.
        agent: AgentId,
        /// How much.
        resources: Resources,
        /// When, ms since the Unix epoch.
        at_ms: u64,
    },
    /// An allocation's resources return to the pool.
    Release {
        /// The allocation.
        allocation: AllocationId,
    },
    /// Submits a job: `function` runs once on `input`.
    SubmitJob {
        /// The function.
        function: FunctionName,
        /// Its stdin.
        input: Bytes,
        /// Placement constraints.
        constraints: Vec<Constraint>,
        /// Attempts allowed to fail.
        max_attempts: u32,
        /// When, ms since the Unix epoch.
        at_ms: u64,
        /// Accelerator devices each attempt holds when the job asks for more than its
        /// function's `accel` (0: as the function says).
        accel: u64,
    },
    /// `framework` places `job` on `agent` (a new attempt, its resources allocated).
    LaunchJob {
        /// The job.
        job: JobId,
        /// The framework placing it.
        framework: FrameworkId,
        /// The agent.
        agent: AgentId,
        /// When, ms since the Unix epoch.
        at_ms: u64,
    },
    /// An agent reports on an attempt.
    UpdateJob {
        /// The attempt.
        task: TaskRef,
        /// What happened.
        update: TaskUpdate,
        /// When, ms since the Unix epoch.
        at_ms: u64,
    },
    /// Kills a job.
    KillJob {
        /// The job.
        job: JobId,
        /// When, ms since the Unix epoch.
        at_ms: u64,
    },
    /// An external framework runs a task on an agent: a job it owns, placed at once.
    PlaceTask {
        /// The framework.
        framework: FrameworkId,
        /// The agent.
        agent: AgentId,
        /// The function.
        function: FunctionName,
        /// Its stdin.
        input: Bytes,
        /// When, ms since the Unix epoch.
        at_ms: u64,
    },
    /// Why a staging job waits.
    SetJobReason {
        /// The job.
        job: JobId,
        /// The reason (none: cleared).
        reason: Option<String>,
    },
    /// Creates an API token (its secret's hash only).
    CreateToken {
        /// A name for people.
        name: String,
        /// What it allows.
        scopes: std::collections::BTreeSet<Scope>,
        /// Hex SHA-256 of the secret.
        hash: String,
        /// When, ms since the Unix epoch.
        at_ms: u64,
        /// When it stops working (none: never).
        expires_at_ms: Option<u64>,
    },
    /// Revokes an API token.
    RevokeToken {
        /// The token.
        id: TokenId,
    },
}

/// What applying a command did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResponse {
    /// The function's new record.
    Deployed(FunctionRecord),
    /// The function was removed.
    Deleted(FunctionName),
    /// The function's labels changed.
    Labeled(FunctionName),
    /// The command was refused; the state is unchanged.
    Rejected(Rejection),
    /// The answers to a [`Command::Batch`], in order.
    Batch(Vec<CommandResponse>),
    /// The agent is registered and active.
    AgentRegistered(AgentId),
    /// The agent is unreachable; these allocations were released.
    AgentLost {
        /// The agent.
        agent: AgentId,
        /// Its allocations, now released.
        released: Vec<AllocationId>,
    },
    /// The framework is registered.
    FrameworkRegistered(FrameworkId),
    /// The role's settings changed.
    RoleSet(RoleName),
    /// The offer was accepted: this allocation was made.
    Allocated(Allocation),
    /// The allocation was released.
    Released(AllocationId),
    /// The job was submitted.
    JobSubmitted(JobId),
    /// The job was placed: this attempt holds this allocation.
    JobLaunched {
        /// The attempt.
        task: TaskRef,
        /// Its allocation.
        allocation: AllocationId,
    },
    /// The job changed (or, for a reason, may have): its state now.
    JobUpdated {
        /// The job.
        job: JobId,
        /// The attempt that reported (0: a change of the job alone).
        attempt: u32,
        /// Its state.
        state: TaskState,
    },
    /// The token was created.
    TokenCreated(TokenRecord),
    /// The token was revoked.
    TokenRevoked(TokenId),
}

impl CommandResponse {
    /// The function this answer changed, if any.
    pub fn function(&self) -> Option<&FunctionName> {
        match self {
            CommandResponse::Deployed(record) => Some(&record.name),
            CommandResponse::Deleted(name) | CommandResponse::Labeled(name) => Some(name),
            _ => None,
        }
    }

    /// The answers this stands for: a batch's, or this one.
    pub fn flatten(&self) -> Vec<&CommandResponse> {
        match self {
            CommandResponse::Batch(responses) => responses
                .iter()
                .flat_map(CommandResponse::flatten)
                .collect(),
            other => vec![other],
        }
    }
}

/// Why the state machine refused a command. Decided from the replicated state alone, so
/// every replica refuses the same commands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    /// No function has this name.
    #[error("no function named `{0}`")]
    NotFound(FunctionName),
    /// The module is over [`MAX_MODULE_BYTES`].
    #[error("module of {size} bytes exceeds the cluster's limit of {limit} bytes")]
    ModuleTooLarge {
        /// Module size.
        size: u64,
        /// Limit.
        limit: u64,
    },
    /// A label key or value is invalid, or there are too many labels.
    #[error("{0}")]
    InvalidLabel(String),
    /// An agent attribute is invalid, or there are too many.
    #[error("{0}")]
    InvalidAttribute(String),
    /// A role's weight is out of range.
    #[error("{0}")]
    InvalidWeight(String),
    /// No agent has this id.
    #[error("no agent `{0}`")]
    UnknownAgent(AgentId),
    /// The agent is unreachable: its resources are not offered.
    #[error("agent `{0}` is unreachable")]
    AgentUnreachable(AgentId),
    /// No framework has this id.
    #[error("no framework `{0}` is registered")]
    UnknownFramework(FrameworkId),
    /// No allocation has this id.
    #[error("no allocation {0}")]
    UnknownAllocation(AllocationId),
    /// An accept asked for nothing.
    #[error("an accept must ask for some resources")]
    NothingToAllocate,
    /// The resources asked for are no longer free on the agent (the offer was stale).
    #[error("agent `{agent}` has {free} free, not the {requested} asked for")]
    InsufficientResources {
        /// The agent.
        agent: AgentId,
        /// What was asked for.
        requested: Resources,
        /// What is free.
        free: Resources,
    },
    /// The role would hold more than its quota.
    #[error("role `{role}` would hold {would_hold}, over its quota of {quota}")]
    QuotaExceeded {
        /// The role.
        role: RoleName,
        /// Its quota.
        quota: Resources,
        /// What it would hold.
        would_hold: Resources,
    },
    /// No job has this id.
    #[error("no job {0}")]
    UnknownJob(JobId),
    /// The job is not waiting to be placed.
    #[error("job {job} is {state}, not waiting to be placed")]
    JobNotPlaceable {
        /// The job.
        job: JobId,
        /// Its state.
        state: TaskState,
    },
    /// The job has ended.
    #[error("job {job} has already ended ({state})")]
    JobEnded {
        /// The job.
        job: JobId,
        /// Its state.
        state: TaskState,
    },
    /// The agent does not satisfy a constraint of the job.
    #[error("agent `{agent}` does not satisfy constraint {constraint}")]
    ConstraintMismatch {
        /// The agent.
        agent: AgentId,
        /// The constraint.
        constraint: String,
    },
    /// A report on an attempt that is not current, or of a job that ended: dropped.
    #[error("report on attempt {task} dropped: {why}")]
    StaleUpdate {
        /// The attempt.
        task: TaskRef,
        /// Why.
        why: String,
    },
    /// No token has this id.
    #[error("no token {0}")]
    UnknownToken(TokenId),
    /// A token's settings are invalid.
    #[error("{0}")]
    InvalidToken(String),
    /// The job's input is too large.
    #[error("job input of {size} bytes exceeds the limit of {limit} bytes")]
    JobInputTooLarge {
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// A job's settings are invalid.
    #[error("{0}")]
    InvalidJob(String),
    /// A rollback named a version the function does not keep.
    #[error("{}", unknown_version(name, *version, kept))]
    UnknownVersion {
        /// The function.
        name: FunctionName,
        /// The version asked for; 0: the one before the current, which is not kept.
        version: u64,
        /// The versions it keeps, oldest first.
        kept: Vec<u64>,
    },
    /// A rollback asked for the version that is already current.
    #[error("function `{name}` already runs version {version}")]
    AlreadyCurrent {
        /// The function.
        name: FunctionName,
        /// Its current version.
        version: u64,
    },
    /// An agent registered with less capacity than it has allocated.
    #[error("agent `{agent}` cannot shrink to {capacity}: {allocated} is allocated")]
    CapacityBelowAllocated {
        /// The agent.
        agent: AgentId,
        /// The capacity it registered with.
        capacity: Resources,
        /// What is allocated on it.
        allocated: Resources,
    },
}

/// The message of [`Rejection::UnknownVersion`].
fn unknown_version(name: &FunctionName, version: u64, kept: &[u64]) -> String {
    let listed = kept
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    if version == 0 {
        format!("function `{name}` has no earlier version to roll back to (kept: {listed})")
    } else {
        format!("function `{name}` keeps no version {version} (kept: {listed})")
    }
}

/// Bytes that are not a valid encoded [`Command`].
#[derive(Debug, thiserror::Error)]
#[error("malformed command: {0}")]
pub struct MalformedCommand(pub String);

impl From<capnp::Error> for MalformedCommand {
    fn from(e: capnp::Error) -> MalformedCommand {
        MalformedCommand(e.to_string())
    }
}

impl From<capnp::NotInSchema> for MalformedCommand {
    fn from(e: capnp::NotInSchema) -> MalformedCommand {
        MalformedCommand(e.to_string())
    }
}

impl From<InvalidId> for MalformedCommand {
    fn from(e: InvalidId) -> MalformedCommand {
        MalformedCommand(e.to_string())
    }
}

impl From<std::str::Utf8Error> for MalformedCommand {
    fn from(e: std::str::Utf8Error) -> MalformedCommand {
        MalformedCommand(e.to_string())
    }
}

/// Largest message a node reads from a peer or from its own storage, in 8-byte words
/// (1 GiB): room for a batch of log entries holding the largest modules
/// ([`MAX_MODULE_BYTES`]); the Raft network splits larger batches
/// (`consensus::network`).
pub const MAX_MESSAGE_WORDS: usize = 1 << 27;

/// Deepest pointer nesting a node accepts; our schemas nest a few levels.
pub const MAX_NESTING: i32 = 64;

/// Reader options for messages between cluster nodes and from their own storage: a
/// message over [`MAX_MESSAGE_WORDS`] or nested deeper than [`MAX_NESTING`] is refused
/// (on a connection, the connection is closed). The size of what enters the cluster is
/// bounded earlier, by the gateway's and the public API's module limit.
pub fn reader_options() -> capnp::message::ReaderOptions {
    let mut options = capnp::message::ReaderOptions::new();
    options.traversal_limit_in_words(Some(MAX_MESSAGE_WORDS));
    options.nesting_limit(MAX_NESTING);
    options
}

impl Command {
    /// Whether the command deploys a function (applying it compiles the module).
    pub fn deploys(&self) -> bool {
        match self {
            Command::DeployFunction { .. } | Command::RollbackFunction { .. } => true,
            Command::Batch(commands) => commands.iter().any(Command::deploys),
            _ => false,
        }
    }

    /// The bytes of the bulky payloads the command carries (modules, job input and
    /// output); the rest of any command is small. Used to size batches of log entries.
    pub fn bulk_bytes(&self) -> usize {
        match self {
            Command::DeployFunction { module, .. } => module.len(),
            Command::SubmitJob { input, .. } | Command::PlaceTask { input, .. } => input.len(),
            Command::UpdateJob {
                update: TaskUpdate::Finished { output, .. },
                ..
            } => output.len(),
            Command::Batch(commands) => commands.iter().map(Command::bulk_bytes).sum(),
            _ => 0,
        }
    }

    /// Writes the command into a Cap'n Proto builder.
    pub fn write(&self, builder: command::Builder<'_>) {
        match self {
            Command::DeployFunction {
                name,
                spec,
                module,
                deployed_at_ms,
            } => {
                let mut deploy = builder.init_deploy_function();
                deploy.set_name(name.as_str());
                // A spec always serializes: it is plain data with string keys.
                let spec_json = serde_json::to_string(spec).unwrap_or_default();
                deploy.set_spec(spec_json.as_str());
                deploy.set_module(module);
                deploy.set_deployed_at_ms(*deployed_at_ms);
            }
            Command::DeleteFunction { name } => {
                builder.init_delete_function().set_name(name.as_str());
            }
            Command::RollbackFunction {
                name,
                version,
                at_ms,
            } => {
                let mut rollback = builder.init_rollback_function();
                rollback.set_name(name.as_str());
                rollback.set_version(version.unwrap_or(0));
                rollback.set_at_ms(*at_ms);
            }
            Command::SetLabels { name, set, remove } => {
                let mut labels = builder.init_set_labels();
                labels.set_name(name.as_str());
                let mut list = labels.reborrow().init_set(set.len() as u32);
                for (i, (key, value)) in set.iter().enumerate() {
                    let mut label = list.reborrow().get(i as u32);
                    label.set_key(key.as_str());
                    label.set_value(value.as_str());
                }
                let mut list = labels.init_remove(remove.len() as u32);
                for (i, key) in remove.iter().enumerate() {
                    list.set(i as u32, key.as_str());
                }
            }
            Command::Batch(commands) => {
                let mut list = builder.init_batch(commands.len() as u32);
                for (i, command) in commands.iter().enumerate() {
                    command.write(list.reborrow().get(i as u32));
                }
            }
            Command::RegisterAgent {
                agent,
                rpc,
                resources,
                attributes,
                running,
                at_ms,
            } => {
                let mut register = builder.init_register_agent();
                register.set_at_ms(*at_ms);
                let mut info = register.reborrow().init_agent();
                info.set_id(agent.as_str());
                info.set_rpc_addr(rpc.as_str());
                write_resources(info.reborrow().init_resources(), resources);
                let mut list = info.init_attributes(attributes.len() as u32);
                for (i, (key, value)) in attributes.iter().enumerate() {
                    let mut label = list.reborrow().get(i as u32);
                    label.set_key(key.as_str());
                    label.set_value(value.as_str());
                }
                let mut list = register.init_running(running.len() as u32);
                for (i, task) in running.iter().enumerate() {
                    write_task_ref(list.reborrow().get(i as u32), task);
                }
            }
            Command::AgentUnreachable { agent, at_ms } => {
                let mut lost = builder.init_agent_unreachable();
                lost.set_agent(agent.as_str());
                lost.set_at_ms(*at_ms);
            }
            Command::RegisterFramework {
                id,
                name,
                role,
                at_ms,
            } => {
                let mut register = builder.init_register_framework();
                register.set_id(id.as_str());
                register.set_name(name.as_str());
                register.set_role(role.as_str());
                register.set_at_ms(*at_ms);
            }
            Command::SetRole {
                role,
                weight,
                quota,
            } => {
                let mut set = builder.init_set_role();
                set.set_role(role.as_str());
                set.set_weight(*weight);
                if let Some(quota) = quota {
                    write_resources(set.init_quota(), quota);
                }
            }
            Command::Accept {
                framework,
                agent,
                resources,
                at_ms,
            } => {
                let mut accept = builder.init_accept();
                accept.set_framework(framework.as_str());
                accept.set_agent(agent.as_str());
                accept.set_at_ms(*at_ms);
                write_resources(accept.init_resources(), resources);
            }
            Command::Release { allocation } => {
                builder.init_release().set_allocation(allocation.0);
            }
            Command::SubmitJob {
                function,
                input,
                constraints,
                max_attempts,
                at_ms,
                accel,
            } => {
                let mut submit = builder.init_submit_job();
                submit.set_function(function.as_str());
                submit.set_input(input);
                submit.set_max_attempts(*max_attempts);
                submit.set_at_ms(*at_ms);
                submit.set_accel(*accel);
                let mut list = submit.init_constraints(constraints.len() as u32);
                for (i, c) in constraints.iter().enumerate() {
                    list.set(i as u32, c.to_string().as_str());
                }
            }
            Command::LaunchJob {
                job,
                framework,
                agent,
                at_ms,
            } => {
                let mut launch = builder.init_launch_job();
                launch.set_job(job.0);
                launch.set_framework(framework.as_str());
                launch.set_agent(agent.as_str());
                launch.set_at_ms(*at_ms);
            }
            Command::UpdateJob {
                task,
                update,
                at_ms,
            } => {
                let mut u = builder.init_update_job();
                u.set_at_ms(*at_ms);
                write_task_ref(u.reborrow().init_task(), task);
                write_task_update(u.init_update(), update);
            }
            Command::KillJob { job, at_ms } => {
                let mut kill = builder.init_kill_job();
                kill.set_job(job.0);
                kill.set_at_ms(*at_ms);
            }
            Command::PlaceTask {
                framework,
                agent,
                function,
                input,
                at_ms,
            } => {
                let mut place = builder.init_place_task();
                place.set_framework(framework.as_str());
                place.set_agent(agent.as_str());
                place.set_function(function.as_str());
                place.set_input(input);
                place.set_at_ms(*at_ms);
            }
            Command::SetJobReason { job, reason } => {
                let mut set = builder.init_set_job_reason();
                set.set_job(job.0);
                set.set_has_reason(reason.is_some());
                set.set_reason(reason.as_deref().unwrap_or_default());
            }
            Command::CreateToken {
                name,
                scopes,
                hash,
                at_ms,
                expires_at_ms,
            } => {
                let mut create = builder.init_create_token();
                create.set_name(name.as_str());
                create.set_hash(hash.as_str());
                create.set_at_ms(*at_ms);
                create.set_has_expiry(expires_at_ms.is_some());
                create.set_expires_at_ms(expires_at_ms.unwrap_or_default());
                let mut list = create.init_scopes(scopes.len() as u32);
                for (i, scope) in scopes.iter().enumerate() {
                    list.set(i as u32, scope.as_str());
                }
            }
            Command::RevokeToken { id } => {
                builder.init_revoke_token().set_id(id.as_str());
            }
        }
    }

    /// Roughly how many bytes the command takes in the log.
    pub fn size(&self) -> usize {
        match self {
            Command::DeployFunction { module, spec, .. } => {
                module.len() + 256 + spec.env.len() * 64
            }
            Command::DeleteFunction { .. } | Command::RollbackFunction { .. } => 64,
            Command::SetLabels { set, remove, .. } => {
                64 + set
                    .iter()
                    .map(|(k, v)| k.len() + v.len() + 16)
                    .sum::<usize>()
                    + remove.iter().map(|k| k.len() + 8).sum::<usize>()
            }
            Command::Batch(commands) => commands.iter().map(Command::size).sum(),
            Command::RegisterAgent {
                rpc, attributes, ..
            } => {
                128 + rpc.len()
                    + attributes
                        .iter()
                        .map(|(k, v)| k.len() + v.len() + 16)
                        .sum::<usize>()
            }
            Command::RegisterFramework { name, .. } => 128 + name.len(),
            Command::SubmitJob { input, .. } | Command::PlaceTask { input, .. } => {
                256 + input.len()
            }
            Command::UpdateJob {
                update: TaskUpdate::Finished { output, .. },
                ..
            } => 128 + output.len(),
            Command::LaunchJob { .. }
            | Command::UpdateJob { .. }
            | Command::KillJob { .. }
            | Command::SetJobReason { .. } => 128,
            Command::CreateToken { name, .. } => 256 + name.len(),
            Command::AgentUnreachable { .. }
            | Command::RevokeToken { .. }
            | Command::SetRole { .. }
            | Command::Accept { .. }
            | Command::Release { .. } => 128,
        }
    }

    /// Reads a command from a Cap'n Proto reader.
    pub fn read(reader: command::Reader<'_>) -> Result<Command, MalformedCommand> {
        let name = |text: capnp::text::Reader<'_>| -> Result<FunctionName, MalformedCommand> {
            text.to_str()?
                .parse()
                .map_err(|e: super::InvalidName| MalformedCommand(e.to_string()))
        };
        Ok(match reader.which()? {
            command::DeployFunction(deploy) => Command::DeployFunction {
                name: name(deploy.get_name()?)?,
                spec: serde_json::from_str(deploy.get_spec()?.to_str()?)
                    .map_err(|e| MalformedCommand(format!("spec: {e}")))?,
                module: Bytes::copy_from_slice(deploy.get_module()?),
                deployed_at_ms: deploy.get_deployed_at_ms(),
            },
            command::DeleteFunction(delete) => Command::DeleteFunction {
                name: name(delete.get_name()?)?,
            },
            command::RollbackFunction(rollback) => Command::RollbackFunction {
                name: name(rollback.get_name()?)?,
                version: Some(rollback.get_version()).filter(|v| *v != 0),
                at_ms: rollback.get_at_ms(),
            },
            command::SetLabels(labels) => {
                let mut set = BTreeMap::new();
                for label in labels.get_set()? {
                    set.insert(
                        label.get_key()?.to_str()?.to_string(),
                        label.get_value()?.to_str()?.to_string(),
                    );
                }
                let mut remove = Vec::new();
                for key in labels.get_remove()? {
                    remove.push(key?.to_str()?.to_string());
                }
                Command::SetLabels {
                    name: name(labels.get_name()?)?,
                    set,
                    remove,
                }
            }
            command::Batch(commands) => Command::Batch(
                commands?
                    .iter()
                    .map(Command::read)
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            command::RegisterAgent(register) => {
                let info = register.get_agent()?;
                let mut attributes = BTreeMap::new();
                for label in info.get_attributes()? {
                    attributes.insert(
                        label.get_key()?.to_str()?.to_string(),
                        label.get_value()?.to_str()?.to_string(),
                    );
                }
                let running = if register.has_running() {
                    register.get_running()?.iter().map(read_task_ref).collect()
                } else {
                    Vec::new()
                };
                Command::RegisterAgent {
                    agent: info.get_id()?.to_str()?.parse()?,
                    rpc: info.get_rpc_addr()?.to_str()?.to_string(),
                    resources: read_resources(info.get_resources()?),
                    attributes,
                    running,
                    at_ms: register.get_at_ms(),
                }
            }
            command::AgentUnreachable(lost) => Command::AgentUnreachable {
                agent: lost.get_agent()?.to_str()?.parse()?,
                at_ms: lost.get_at_ms(),
            },
            command::RegisterFramework(register) => Command::RegisterFramework {
                id: register.get_id()?.to_str()?.parse()?,
                name: register.get_name()?.to_str()?.to_string(),
                role: register.get_role()?.to_str()?.parse()?,
                at_ms: register.get_at_ms(),
            },
            command::SetRole(set) => Command::SetRole {
                role: set.get_role()?.to_str()?.parse()?,
                weight: set.get_weight(),
                quota: if set.has_quota() {
                    Some(read_resources(set.get_quota()?))
                } else {
                    None
                },
            },
            command::Accept(accept) => Command::Accept {
                framework: accept.get_framework()?.to_str()?.parse()?,
                agent: accept.get_agent()?.to_str()?.parse()?,
                resources: read_resources(accept.get_resources()?),
                at_ms: accept.get_at_ms(),
            },
            command::Release(release) => Command::Release {
                allocation: AllocationId(release.get_allocation()),
            },
            command::SubmitJob(submit) => {
                let mut constraints = Vec::new();
                for c in submit.get_constraints()? {
                    constraints.push(
                        c?.to_str()?
                            .parse()
                            .map_err(|e: super::InvalidConstraint| {
                                MalformedCommand(e.to_string())
                            })?,
                    );
                }
                Command::SubmitJob {
                    function: name(submit.get_function()?)?,
                    input: Bytes::copy_from_slice(submit.get_input()?),
                    constraints,
                    max_attempts: submit.get_max_attempts(),
                    at_ms: submit.get_at_ms(),
                    accel: submit.get_accel(),
                }
            }
            command::LaunchJob(launch) => Command::LaunchJob {
                job: JobId(launch.get_job()),
                framework: launch.get_framework()?.to_str()?.parse()?,
                agent: launch.get_agent()?.to_str()?.parse()?,
                at_ms: launch.get_at_ms(),
            },
            command::UpdateJob(u) => Command::UpdateJob {
                task: read_task_ref(u.get_task()?),
                update: read_task_update(u.get_update()?)?,
                at_ms: u.get_at_ms(),
            },
            command::KillJob(kill) => Command::KillJob {
                job: JobId(kill.get_job()),
                at_ms: kill.get_at_ms(),
            },
            command::PlaceTask(place) => Command::PlaceTask {
                framework: place.get_framework()?.to_str()?.parse()?,
                agent: place.get_agent()?.to_str()?.parse()?,
                function: name(place.get_function()?)?,
                input: Bytes::copy_from_slice(place.get_input()?),
                at_ms: place.get_at_ms(),
            },
            command::SetJobReason(set) => Command::SetJobReason {
                job: JobId(set.get_job()),
                reason: if set.get_has_reason() {
                    Some(set.get_reason()?.to_str()?.to_string())
                } else {
                    None
                },
            },
            command::CreateToken(create) => {
                let mut scopes = std::collections::BTreeSet::new();
                for scope in create.get_scopes()? {
                    scopes.insert(
                        scope?
                            .to_str()?
                            .parse()
                            .map_err(|e: super::InvalidScope| MalformedCommand(e.to_string()))?,
                    );
                }
                Command::CreateToken {
                    name: create.get_name()?.to_str()?.to_string(),
                    scopes,
                    hash: create.get_hash()?.to_str()?.to_string(),
                    at_ms: create.get_at_ms(),
                    expires_at_ms: create.get_has_expiry().then(|| create.get_expires_at_ms()),
                }
            }
            command::RevokeToken(revoke) => Command::RevokeToken {
                id: revoke.get_id()?.to_str()?.parse()?,
            },
        })
    }

    /// The command as a single-segment Cap'n Proto message.
    pub fn encode(&self) -> Vec<u8> {
        let mut message = capnp::message::Builder::new_default();
        self.write(message.init_root());
        capnp::serialize::write_message_to_words(&message)
    }

    /// Decodes [`Command::encode`]'s bytes.
    pub fn decode(mut bytes: &[u8]) -> Result<Command, MalformedCommand> {
        let message = capnp::serialize::read_message_from_flat_slice(&mut bytes, reader_options())?;
        Command::read(message.get_root()?)
    }
}

/// Writes a capnp `TaskRef`.
pub fn write_task_ref(mut b: task_ref::Builder<'_>, task: &TaskRef) {
    b.set_job(task.job.0);
    b.set_attempt(task.attempt);
}

/// Reads a capnp `TaskRef`.
pub fn read_task_ref(r: task_ref::Reader<'_>) -> TaskRef {
    TaskRef {
        job: JobId(r.get_job()),
        attempt: r.get_attempt(),
    }
}

/// Writes a capnp `TaskUpdate`.
pub fn write_task_update(mut b: task_update::Builder<'_>, update: &TaskUpdate) {
    match update {
        TaskUpdate::Running => b.set_running(()),
        TaskUpdate::Finished {
            exit_code,
            output,
            log,
        } => {
            b.set_log(log);
            let mut f = b.init_finished();
            f.set_exit_code(*exit_code);
            f.set_output(output);
        }
        TaskUpdate::Failed {
            reason,
            exit_code,
            log,
        } => {
            b.set_log(log);
            let mut f = b.init_failed();
            f.set_reason(reason.as_str());
            f.set_has_exit_code(exit_code.is_some());
            f.set_exit_code(exit_code.unwrap_or_default());
        }
    }
}

/// Reads a capnp `TaskUpdate`.
pub fn read_task_update(r: task_update::Reader<'_>) -> Result<TaskUpdate, MalformedCommand> {
    Ok(match r.which()? {
        task_update::Running(()) => TaskUpdate::Running,
        task_update::Finished(f) => TaskUpdate::Finished {
            exit_code: f.get_exit_code(),
            output: Bytes::copy_from_slice(f.get_output()?),
            log: Bytes::copy_from_slice(r.get_log()?),
        },
        task_update::Failed(f) => TaskUpdate::Failed {
            reason: f.get_reason()?.to_str()?.to_string(),
            exit_code: f.get_has_exit_code().then(|| f.get_exit_code()),
            log: Bytes::copy_from_slice(r.get_log()?),
        },
    })
}

/// Writes `resources` into a capnp `Resources`.
pub fn write_resources(mut b: resources::Builder<'_>, r: &Resources) {
    b.set_slots(r.slots);
    b.set_memory_mb(r.memory_mb);
    b.set_accelerators(r.accelerators);
}

/// Reads a capnp `Resources`.
pub fn read_resources(r: resources::Reader<'_>) -> Resources {
    Resources {
        slots: r.get_slots(),
        memory_mb: r.get_memory_mb(),
        accelerators: r.get_accelerators(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip_through_capnp() -> Result<(), MalformedCommand> {
        let name = |s: &str| -> Result<FunctionName, MalformedCommand> {
            s.parse()
                .map_err(|e: super::super::InvalidName| MalformedCommand(e.to_string()))
        };
        let mut spec = FunctionSpec::default();
        spec.limits.memory_mb = 7;
        spec.env.insert("K".into(), "V".into());
        let commands = [
            Command::DeployFunction {
                name: name("f")?,
                spec,
                module: Bytes::from_static(b"\0asm\x01\0\0\0"),
                deployed_at_ms: 42,
            },
            Command::DeleteFunction { name: name("g")? },
            Command::RollbackFunction {
                name: name("g")?,
                version: None,
                at_ms: 9,
            },
            Command::RollbackFunction {
                name: name("g")?,
                version: Some(3),
                at_ms: 10,
            },
            Command::SetLabels {
                name: name("h")?,
                set: BTreeMap::from([("team".into(), "a".into()), ("tier".into(), "".into())]),
                remove: vec!["old".into()],
            },
            Command::Batch(vec![
                Command::DeleteFunction { name: name("i")? },
                Command::Batch(vec![Command::DeleteFunction { name: name("j")? }]),
            ]),
            Command::RegisterAgent {
                agent: "a-1".parse()?,
                rpc: "127.0.0.1:7000".into(),
                resources: Resources {
                    slots: 8,
                    memory_mb: 4096,
                    accelerators: 1,
                },
                attributes: BTreeMap::from([("zone".into(), "b".into())]),
                running: vec![TaskRef {
                    job: JobId(4),
                    attempt: 2,
                }],
                at_ms: 5,
            },
            Command::AgentUnreachable {
                agent: "a-1".parse()?,
                at_ms: 6,
            },
            Command::RegisterFramework {
                id: "jobs".parse()?,
                name: "durable jobs".into(),
                role: "batch".parse()?,
                at_ms: 7,
            },
            Command::SetRole {
                role: "batch".parse()?,
                weight: 2.5,
                quota: Some(Resources::new(10, 1024)),
            },
            Command::SetRole {
                role: "web".parse()?,
                weight: 1.0,
                quota: None,
            },
            Command::Accept {
                framework: "jobs".parse()?,
                agent: "a-1".parse()?,
                resources: Resources::new(2, 512),
                at_ms: 8,
            },
            Command::Release {
                allocation: AllocationId(3),
            },
            Command::SubmitJob {
                function: name("f")?,
                input: Bytes::from_static(b"in"),
                constraints: vec!["zone=b".parse().map_err(
                    |e: super::super::InvalidConstraint| MalformedCommand(e.to_string()),
                )?],
                max_attempts: 3,
                at_ms: 9,
                accel: 1,
            },
            Command::LaunchJob {
                job: JobId(1),
                framework: "jobs".parse()?,
                agent: "a-1".parse()?,
                at_ms: 10,
            },
            Command::UpdateJob {
                task: TaskRef {
                    job: JobId(1),
                    attempt: 1,
                },
                update: TaskUpdate::Finished {
                    exit_code: 0,
                    output: Bytes::from_static(b"out"),
                    log: Bytes::from_static(b"said something\n"),
                },
                at_ms: 11,
            },
            Command::UpdateJob {
                task: TaskRef {
                    job: JobId(1),
                    attempt: 2,
                },
                update: TaskUpdate::Failed {
                    reason: "trap".into(),
                    exit_code: None,
                    log: Bytes::new(),
                },
                at_ms: 12,
            },
            Command::KillJob {
                job: JobId(2),
                at_ms: 13,
            },
            Command::SetJobReason {
                job: JobId(2),
                reason: Some("no agent matches".into()),
            },
            Command::PlaceTask {
                framework: "batch".parse()?,
                agent: "a-1".parse()?,
                function: name("f")?,
                input: Bytes::from_static(b"task"),
                at_ms: 14,
            },
            Command::CreateToken {
                name: "ci".into(),
                scopes: [Scope::Deploy, Scope::Read].into(),
                hash: super::super::hash_token("secret"),
                at_ms: 15,
                expires_at_ms: Some(16),
            },
            Command::RevokeToken {
                id: "0123456789ab".parse()?,
            },
        ];
        for command in commands {
            assert_eq!(Command::decode(&command.encode())?, command);
        }
        assert!(Command::decode(b"not capnp").is_err());
        Ok(())
    }
}
