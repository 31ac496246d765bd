//! The scheduling half of the replicated state: agents, frameworks, roles and
//! allocations in their redb tables, and the deterministic `apply` of the commands that
//! change them. An accept is checked against the agent's free resources and the role's
//! quota as the state stands when it is applied, so a stale offer is refused on every
//! replica alike and nothing is ever allocated twice.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;

use redb::{ReadTransaction, ReadableTable, TableDefinition, TableHandle, WriteTransaction};
use serde::{de::DeserializeOwned, Serialize};

use super::{
    check_label_key, check_label_value, storage, AgentId, AgentRecord, AgentState, Allocation,
    AllocationId, Command, CommandResponse, FrameworkId, FrameworkRecord, Rejection, Resources,
    RoleName, RoleRecord, StateError, TaskRef, MAX_LABELS, MAX_WEIGHT,
};
use super::{jobs, JobId, JobRecord};

/// Agent id -> JSON [`AgentRecord`].
const AGENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("agents");
/// Framework id -> JSON [`FrameworkRecord`].
const FRAMEWORKS: TableDefinition<&str, &[u8]> = TableDefinition::new("frameworks");
/// Role -> JSON [`RoleRecord`] (configured roles only).
const ROLES: TableDefinition<&str, &[u8]> = TableDefinition::new("roles");
/// Allocation id -> JSON [`Allocation`].
const ALLOCATIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("allocations");
/// Counters: `next_allocation`.
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");

const NEXT_ALLOCATION: &str = "next_allocation";

/// Creates the tables (so that readers find them empty rather than missing).
pub(super) fn create_tables(txn: &WriteTransaction) -> Result<(), StateError> {
    txn.open_table(AGENTS).map_err(storage)?;
    txn.open_table(FRAMEWORKS).map_err(storage)?;
    txn.open_table(ROLES).map_err(storage)?;
    txn.open_table(ALLOCATIONS).map_err(storage)?;
    txn.open_table(COUNTERS).map_err(storage)?;
    jobs::create_tables(txn)
}

/// The next value of counter `name` (1 first), counted.
pub(super) fn next_counter(txn: &WriteTransaction, name: &str) -> Result<u64, StateError> {
    let mut counters = txn.open_table(COUNTERS).map_err(storage)?;
    let id = counters
        .get(name)
        .map_err(storage)?
        .map_or(1, |v| v.value());
    counters.insert(name, id + 1).map_err(storage)?;
    Ok(id)
}

/// The allocations on `agent`.
pub(super) fn allocations_of(
    txn: &WriteTransaction,
    agent: &AgentId,
) -> Result<Vec<Allocation>, StateError> {
    let allocations = txn.open_table(ALLOCATIONS).map_err(storage)?;
    let mut out = Vec::new();
    for entry in allocations.iter().map_err(storage)? {
        let (key, value) = entry.map_err(storage)?;
        let allocation: Allocation = decode(&key.value().to_string(), value.value())?;
        if allocation.agent == *agent {
            out.push(allocation);
        }
    }
    Ok(out)
}

/// Everything the scheduler reads: one consistent view of the scheduling tables.
#[derive(Debug, Clone, Default)]
pub struct SchedulingView {
    /// Agents by id.
    pub agents: BTreeMap<AgentId, AgentRecord>,
    /// Frameworks by id.
    pub frameworks: BTreeMap<FrameworkId, FrameworkRecord>,
    /// Configured roles.
    pub roles: BTreeMap<RoleName, RoleRecord>,
    /// Allocations by id.
    pub allocations: BTreeMap<AllocationId, Allocation>,
    /// Jobs not in a terminal state (shared with the reads before and after this one
    /// while a record is unchanged).
    pub jobs: BTreeMap<JobId, Arc<JobRecord>>,
    /// How many jobs ended in each terminal state (`FINISHED`, `FAILED`, `KILLED`).
    pub ended_jobs: BTreeMap<String, u64>,
}

impl SchedulingView {
    /// The settings of `role` (defaults when nobody configured it).
    pub fn role(&self, role: &RoleName) -> RoleRecord {
        self.roles
            .get(role)
            .cloned()
            .unwrap_or_else(|| RoleRecord::default_for(role.clone()))
    }

    /// Agents whose allocations exceed their capacity (always empty: a test checks it).
    pub fn overcommitted(&self) -> Vec<AgentId> {
        let mut sums: BTreeMap<&AgentId, Resources> = BTreeMap::new();
        for a in self.allocations.values() {
            let sum = sums.entry(&a.agent).or_default();
            *sum = sum.plus(&a.resources);
        }
        self.agents
            .values()
            .filter(|agent| {
                let sum = sums.get(&agent.id).copied().unwrap_or_default();
                sum != agent.allocated || !sum.fits_in(&agent.resources)
            })
            .map(|agent| agent.id.clone())
            .collect()
    }
}

/// Every record of a table keyed by name.
fn read_records<T: DeserializeOwned>(
    txn: &ReadTransaction,
    table: TableDefinition<&str, &[u8]>,
) -> Result<Vec<T>, StateError> {
    let mut out = Vec::new();
    for entry in txn
        .open_table(table)
        .map_err(storage)?
        .iter()
        .map_err(storage)?
    {
        let (key, value) = entry.map_err(storage)?;
        out.push(decode(key.value(), value.value())?);
    }
    Ok(out)
}

/// Reads the scheduling tables as of `txn`.
pub(super) fn read_view(
    txn: &ReadTransaction,
    active: &mut jobs::ActiveJobs,
) -> Result<SchedulingView, StateError> {
    let mut view = SchedulingView::default();
    for record in read_records::<AgentRecord>(txn, AGENTS)? {
        view.agents.insert(record.id.clone(), record);
    }
    for record in read_records::<FrameworkRecord>(txn, FRAMEWORKS)? {
        view.frameworks.insert(record.id.clone(), record);
    }
    for record in read_records::<RoleRecord>(txn, ROLES)? {
        view.roles.insert(record.name.clone(), record);
    }
    for entry in txn
        .open_table(ALLOCATIONS)
        .map_err(storage)?
        .iter()
        .map_err(storage)?
    {
        let (key, value) = entry.map_err(storage)?;
        let record: Allocation = decode(&key.value().to_string(), value.value())?;
        view.allocations.insert(record.id, record);
    }
    view.jobs = active.read(txn)?;
    for entry in txn
        .open_table(COUNTERS)
        .map_err(storage)?
        .iter()
        .map_err(storage)?
    {
        let (key, value) = entry.map_err(storage)?;
        if let Some(state) = key.value().strip_prefix("jobs_") {
            // A counter holds the next value: the count is one less.
            view.ended_jobs
                .insert(state.to_string(), value.value().saturating_sub(1));
        }
    }
    Ok(view)
}

/// Applies a scheduling command (any other command is answered `None`).
pub(super) fn apply(
    txn: &WriteTransaction,
    command: &Command,
) -> Result<Option<CommandResponse>, StateError> {
    let answer = match command {
        Command::RegisterAgent {
            agent,
            rpc,
            resources,
            attributes,
            running,
            at_ms,
        } => register_agent(txn, agent, rpc, resources, attributes, running, *at_ms)?,
        Command::AgentUnreachable { agent, at_ms } => agent_unreachable(txn, agent, *at_ms)?,
        Command::RegisterFramework {
            id,
            name,
            role,
            at_ms,
        } => {
            let mut frameworks = txn.open_table(FRAMEWORKS).map_err(storage)?;
            let registered_at_ms = match frameworks.get(id.as_str()).map_err(storage)? {
                Some(bytes) => {
                    decode::<FrameworkRecord>(id.as_str(), bytes.value())?.registered_at_ms
                }
                None => *at_ms,
            };
            let record = FrameworkRecord {
                id: id.clone(),
                name: name.clone(),
                role: role.clone(),
                registered_at_ms,
            };
            frameworks
                .insert(id.as_str(), encode(id.as_str(), &record)?.as_slice())
                .map_err(storage)?;
            CommandResponse::FrameworkRegistered(id.clone())
        }
        Command::SetRole {
            role,
            weight,
            quota,
        } => {
            if !(weight.is_finite() && *weight > 0.0 && *weight <= MAX_WEIGHT) {
                return Ok(Some(CommandResponse::Rejected(Rejection::InvalidWeight(
                    format!(
                        "a role's weight must be above 0 and at most {MAX_WEIGHT}, not {weight}"
                    ),
                ))));
            }
            let record = RoleRecord {
                name: role.clone(),
                weight: *weight,
                quota: *quota,
            };
            txn.open_table(ROLES)
                .map_err(storage)?
                .insert(role.as_str(), encode(role.as_str(), &record)?.as_slice())
                .map_err(storage)?;
            CommandResponse::RoleSet(role.clone())
        }
        Command::Accept {
            framework,
            agent,
            resources,
            at_ms,
        } => accept(txn, framework, agent, resources, *at_ms)?,
        Command::Release { allocation } => match release(txn, *allocation)? {
            Some(_) => CommandResponse::Released(*allocation),
            None => CommandResponse::Rejected(Rejection::UnknownAllocation(*allocation)),
        },
        _ => return Ok(None),
    };
    Ok(Some(answer))
}

fn register_agent(
    txn: &WriteTransaction,
    id: &AgentId,
    rpc: &str,
    resources: &Resources,
    attributes: &BTreeMap<String, String>,
    running: &[TaskRef],
    at_ms: u64,
) -> Result<CommandResponse, StateError> {
    if attributes.len() > MAX_LABELS {
        return Ok(CommandResponse::Rejected(Rejection::InvalidAttribute(
            format!("an agent has at most {MAX_LABELS} attributes"),
        )));
    }
    for (key, value) in attributes {
        if let Err(why) = check_label_key(key).and_then(|()| check_label_value(key, value)) {
            return Ok(CommandResponse::Rejected(Rejection::InvalidAttribute(why)));
        }
    }
    let mut agents = txn.open_table(AGENTS).map_err(storage)?;
    let previous = match agents.get(id.as_str()).map_err(storage)? {
        Some(bytes) => Some(decode::<AgentRecord>(id.as_str(), bytes.value())?),
        None => None,
    };
    let allocated = previous.as_ref().map(|p| p.allocated).unwrap_or_default();
    // Devices can go away while tasks hold them (their backend died): the capacity
    // drops at once, so no new task gets them, and the held ones stay allocated until
    // their tasks end. Slots and memory cannot shrink below what is allocated.
    let held_devices_aside = Resources {
        accelerators: 0,
        ..allocated
    };
    if !held_devices_aside.fits_in(resources) {
        return Ok(CommandResponse::Rejected(
            Rejection::CapacityBelowAllocated {
                agent: id.clone(),
                capacity: *resources,
                allocated,
            },
        ));
    }
    let record = AgentRecord {
        id: id.clone(),
        rpc: rpc.to_string(),
        resources: *resources,
        allocated,
        attributes: attributes.clone(),
        state: AgentState::Active,
        registered_at_ms: previous.as_ref().map_or(at_ms, |p| p.registered_at_ms),
        changed_at_ms: match &previous {
            Some(p) if p.state == AgentState::Active => p.changed_at_ms,
            _ => at_ms,
        },
    };
    agents
        .insert(id.as_str(), encode(id.as_str(), &record)?.as_slice())
        .map_err(storage)?;
    drop(agents);
    jobs::reconcile(txn, id, running, at_ms)?;
    Ok(CommandResponse::AgentRegistered(id.clone()))
}

fn agent_unreachable(
    txn: &WriteTransaction,
    id: &AgentId,
    at_ms: u64,
) -> Result<CommandResponse, StateError> {
    let mut agents = txn.open_table(AGENTS).map_err(storage)?;
    let mut record = match agents.get(id.as_str()).map_err(storage)? {
        Some(bytes) => decode::<AgentRecord>(id.as_str(), bytes.value())?,
        None => {
            return Ok(CommandResponse::Rejected(Rejection::UnknownAgent(
                id.clone(),
            )))
        }
    };
    let mut allocations = txn.open_table(ALLOCATIONS).map_err(storage)?;
    let mut released = Vec::new();
    for entry in allocations.iter().map_err(storage)? {
        let (key, value) = entry.map_err(storage)?;
        let allocation: Allocation = decode(&key.value().to_string(), value.value())?;
        if allocation.agent == *id {
            released.push(allocation);
        }
    }
    for allocation in &released {
        allocations.remove(allocation.id.0).map_err(storage)?;
    }
    drop(allocations);
    if record.state != AgentState::Unreachable {
        record.changed_at_ms = at_ms;
    }
    record.state = AgentState::Unreachable;
    record.allocated = Resources::ZERO;
    agents
        .insert(id.as_str(), encode(id.as_str(), &record)?.as_slice())
        .map_err(storage)?;
    drop(agents);
    jobs::agent_lost(txn, id, &released)?;
    Ok(CommandResponse::AgentLost {
        agent: id.clone(),
        released: released.iter().map(|a| a.id).collect(),
    })
}

fn accept(
    txn: &WriteTransaction,
    framework: &FrameworkId,
    agent: &AgentId,
    resources: &Resources,
    at_ms: u64,
) -> Result<CommandResponse, StateError> {
    Ok(
        match allocate(txn, framework, agent, resources, at_ms, None)? {
            Ok(allocation) => CommandResponse::Allocated(allocation),
            Err(why) => CommandResponse::Rejected(why),
        },
    )
}

/// Allocates `resources` of `agent` to `framework` (for `task`, if any): the checks of
/// an accept, then a new allocation. `Ok(Err(why))`: refused, nothing changed.
pub(super) fn allocate(
    txn: &WriteTransaction,
    framework: &FrameworkId,
    agent: &AgentId,
    resources: &Resources,
    at_ms: u64,
    task: Option<TaskRef>,
) -> Result<Result<Allocation, Rejection>, StateError> {
    let reject = |why| Ok(Err(why));
    if resources.is_zero() {
        return reject(Rejection::NothingToAllocate);
    }
    let role = match txn
        .open_table(FRAMEWORKS)
        .map_err(storage)?
        .get(framework.as_str())
        .map_err(storage)?
    {
        Some(bytes) => decode::<FrameworkRecord>(framework.as_str(), bytes.value())?.role,
        None => return reject(Rejection::UnknownFramework(framework.clone())),
    };
    let mut agents = txn.open_table(AGENTS).map_err(storage)?;
    let mut record = match agents.get(agent.as_str()).map_err(storage)? {
        Some(bytes) => decode::<AgentRecord>(agent.as_str(), bytes.value())?,
        None => return reject(Rejection::UnknownAgent(agent.clone())),
    };
    if record.state != AgentState::Active {
        return reject(Rejection::AgentUnreachable(agent.clone()));
    }
    let free = record.resources.minus(&record.allocated);
    if !resources.fits_in(&free) {
        return reject(Rejection::InsufficientResources {
            agent: agent.clone(),
            requested: *resources,
            free,
        });
    }
    let mut allocations = txn.open_table(ALLOCATIONS).map_err(storage)?;
    let quota = match txn
        .open_table(ROLES)
        .map_err(storage)?
        .get(role.as_str())
        .map_err(storage)?
    {
        Some(bytes) => decode::<RoleRecord>(role.as_str(), bytes.value())?.quota,
        None => None,
    };
    if let Some(quota) = quota {
        // Only roles with a quota pay for this scan.
        let mut held = Resources::ZERO;
        for entry in allocations.iter().map_err(storage)? {
            let (key, value) = entry.map_err(storage)?;
            let allocation: Allocation = decode(&key.value().to_string(), value.value())?;
            if allocation.role == role {
                held = held.plus(&allocation.resources);
            }
        }
        let would_hold = held.plus(resources);
        if !would_hold.fits_in(&quota) {
            return reject(Rejection::QuotaExceeded {
                role,
                quota,
                would_hold,
            });
        }
    }
    let id = next_counter(txn, NEXT_ALLOCATION)?;
    let allocation = Allocation {
        id: AllocationId(id),
        framework: framework.clone(),
        role,
        agent: agent.clone(),
        resources: *resources,
        allocated_at_ms: at_ms,
        task,
    };
    allocations
        .insert(id, encode(&id.to_string(), &allocation)?.as_slice())
        .map_err(storage)?;
    record.allocated = record.allocated.plus(resources);
    agents
        .insert(agent.as_str(), encode(agent.as_str(), &record)?.as_slice())
        .map_err(storage)?;
    Ok(Ok(allocation))
}

/// Removes allocation `id` and returns its resources to its agent; `None` if there is
/// no such allocation.
pub(super) fn release(
    txn: &WriteTransaction,
    id: AllocationId,
) -> Result<Option<Allocation>, StateError> {
    let mut allocations = txn.open_table(ALLOCATIONS).map_err(storage)?;
    let removed: Allocation = match allocations.remove(id.0).map_err(storage)? {
        Some(bytes) => decode(&id.to_string(), bytes.value())?,
        None => return Ok(None),
    };
    drop(allocations);
    let mut agents = txn.open_table(AGENTS).map_err(storage)?;
    let record = match agents.get(removed.agent.as_str()).map_err(storage)? {
        Some(bytes) => Some(decode::<AgentRecord>(
            removed.agent.as_str(),
            bytes.value(),
        )?),
        None => None,
    };
    if let Some(mut record) = record {
        record.allocated = record.allocated.minus(&removed.resources);
        agents
            .insert(
                removed.agent.as_str(),
                encode(removed.agent.as_str(), &record)?.as_slice(),
            )
            .map_err(storage)?;
    }
    Ok(Some(removed))
}

/// The record of `agent`.
pub(super) fn get_agent(
    txn: &WriteTransaction,
    agent: &AgentId,
) -> Result<Option<AgentRecord>, StateError> {
    let agents = txn.open_table(AGENTS).map_err(storage)?;
    let record = match agents.get(agent.as_str()).map_err(storage)? {
        Some(bytes) => Some(decode(agent.as_str(), bytes.value())?),
        None => None,
    };
    Ok(record)
}

/// Writes every row of the scheduling tables to `out`, one [`snapshot_item`] each.
pub(super) fn dump(txn: &ReadTransaction, out: &mut impl Write) -> Result<(), StateError> {
    let mut row = |table: &str, key: &[u8], value: &[u8]| super::write_row(out, table, key, value);
    for definition in [AGENTS, FRAMEWORKS, ROLES] {
        let table = txn.open_table(definition).map_err(storage)?;
        for entry in table.iter().map_err(storage)? {
            let (key, value) = entry.map_err(storage)?;
            row(definition.name(), key.value().as_bytes(), value.value())?;
        }
    }
    for entry in txn
        .open_table(ALLOCATIONS)
        .map_err(storage)?
        .iter()
        .map_err(storage)?
    {
        let (key, value) = entry.map_err(storage)?;
        row(
            ALLOCATIONS.name(),
            &key.value().to_be_bytes(),
            value.value(),
        )?;
    }
    for entry in txn
        .open_table(COUNTERS)
        .map_err(storage)?
        .iter()
        .map_err(storage)?
    {
        let (key, value) = entry.map_err(storage)?;
        row(
            COUNTERS.name(),
            key.value().as_bytes(),
            &value.value().to_be_bytes(),
        )?;
    }
    jobs::dump(txn, out)
}

/// Empties the scheduling tables (before a snapshot's rows are restored).
pub(super) fn clear(txn: &WriteTransaction) -> Result<(), StateError> {
    txn.delete_table(AGENTS).map_err(storage)?;
    txn.delete_table(FRAMEWORKS).map_err(storage)?;
    txn.delete_table(ROLES).map_err(storage)?;
    txn.delete_table(ALLOCATIONS).map_err(storage)?;
    txn.delete_table(COUNTERS).map_err(storage)?;
    jobs::clear(txn)?;
    create_tables(txn)
}

/// Restores one row [`dump`] wrote; refuses rows that would not read back.
pub(super) fn restore_row(
    txn: &WriteTransaction,
    table: &str,
    key: &[u8],
    value: &[u8],
) -> Result<(), StateError> {
    let bad = |what: &str| StateError::Snapshot(format!("malformed {what} row in {table}"));
    let text_key = || std::str::from_utf8(key).map_err(|_| bad("key"));
    match table {
        "agents" => restore_named::<AgentRecord>(txn, AGENTS, text_key()?, value)?,
        "frameworks" => restore_named::<FrameworkRecord>(txn, FRAMEWORKS, text_key()?, value)?,
        "roles" => restore_named::<RoleRecord>(txn, ROLES, text_key()?, value)?,
        "allocations" => {
            let id = u64::from_be_bytes(key.try_into().map_err(|_| bad("key"))?);
            decode::<Allocation>(&id.to_string(), value)?;
            txn.open_table(ALLOCATIONS)
                .map_err(storage)?
                .insert(id, value)
                .map_err(storage)?;
        }
        "counters" => {
            let count = u64::from_be_bytes(value.try_into().map_err(|_| bad("value"))?);
            txn.open_table(COUNTERS)
                .map_err(storage)?
                .insert(text_key()?, count)
                .map_err(storage)?;
        }
        other => {
            if !jobs::restore_row(txn, other, key, value)? {
                return Err(StateError::Snapshot(format!(
                    "unknown table {other:?} in the snapshot"
                )));
            }
        }
    }
    Ok(())
}

/// Restores a record of a table keyed by name, if it decodes as a `T`.
fn restore_named<T: DeserializeOwned>(
    txn: &WriteTransaction,
    table: TableDefinition<&str, &[u8]>,
    key: &str,
    value: &[u8],
) -> Result<(), StateError> {
    decode::<T>(key, value)?;
    txn.open_table(table)
        .map_err(storage)?
        .insert(key, value)
        .map_err(storage)?;
    Ok(())
}

fn encode<T: Serialize>(key: &str, record: &T) -> Result<Vec<u8>, StateError> {
    serde_json::to_vec(record).map_err(|e| StateError::Corrupt {
        key: key.to_string(),
        message: e.to_string(),
    })
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StateError> {
    serde_json::from_slice(bytes).map_err(|e| StateError::Corrupt {
        key: key.to_string(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::super::{apply, dump, restore, State};
    use super::*;
    use redb::ReadableDatabase;

    use crate::state::ident::test_id as id;

    fn run(state: &State, command: Command) -> Result<CommandResponse, StateError> {
        let txn = state.database().begin_write().map_err(storage)?;
        let answer = apply(&txn, &command)?;
        txn.commit().map_err(storage)?;
        Ok(answer)
    }

    fn register(agent: &str, slots: u64) -> Command {
        Command::RegisterAgent {
            agent: id(agent),
            rpc: "127.0.0.1:9".into(),
            resources: Resources::new(slots, 1024),
            attributes: BTreeMap::from([("zone".into(), "a".into())]),
            running: Vec::new(),
            at_ms: 1,
        }
    }

    fn register_framework(framework: &str, role: &str) -> Command {
        Command::RegisterFramework {
            id: id(framework),
            name: framework.into(),
            role: id(role),
            at_ms: 1,
        }
    }

    fn accept(framework: &str, agent: &str, slots: u64) -> Command {
        Command::Accept {
            framework: id(framework),
            agent: id(agent),
            resources: Resources::new(slots, 100),
            at_ms: 2,
        }
    }

    #[test]
    fn withdrawn_devices_leave_the_capacity_while_held_ones_stay_allocated(
    ) -> Result<(), StateError> {
        let dir = tempfile::tempdir().map_err(|e| StateError::Snapshot(e.to_string()))?;
        let state = State::open(&dir.path().join("s.redb"))?;
        let with_devices = |accelerators: u64| Command::RegisterAgent {
            agent: id("a1"),
            rpc: "127.0.0.1:9".into(),
            resources: Resources {
                accelerators,
                ..Resources::new(4, 1024)
            },
            attributes: BTreeMap::new(),
            running: Vec::new(),
            at_ms: 1,
        };
        run(&state, with_devices(2))?;
        run(&state, register_framework("f", "r"))?;
        let held = Resources {
            accelerators: 1,
            ..Resources::new(1, 100)
        };
        let CommandResponse::Allocated(allocation) = run(
            &state,
            Command::Accept {
                framework: id("f"),
                agent: id("a1"),
                resources: held,
                at_ms: 2,
            },
        )?
        else {
            panic!("the device was not allocated");
        };
        let devices = |state: &State| -> Result<u64, StateError> {
            Ok(state.scheduling()?.agents[&id("a1")].resources.accelerators)
        };
        // The backend went away: both devices leave the capacity at once (nothing
        // more can be allocated), the held one stays allocated until released.
        assert!(matches!(
            run(&state, with_devices(0))?,
            CommandResponse::AgentRegistered(_)
        ));
        assert_eq!(devices(&state)?, 0);
        assert_eq!(
            state.scheduling()?.agents[&id("a1")].allocated.accelerators,
            1
        );
        assert!(matches!(
            run(
                &state,
                Command::Accept {
                    framework: id("f"),
                    agent: id("a1"),
                    resources: held,
                    at_ms: 3,
                },
            )?,
            CommandResponse::Rejected(Rejection::InsufficientResources { .. })
        ));
        run(
            &state,
            Command::Release {
                allocation: allocation.id,
            },
        )?;
        let view = state.scheduling()?;
        assert_eq!(view.agents[&id("a1")].allocated, Resources::default());
        assert!(view.overcommitted().is_empty());
        // Slots cannot shrink below what is allocated.
        run(
            &state,
            Command::Accept {
                framework: id("f"),
                agent: id("a1"),
                resources: Resources::new(3, 100),
                at_ms: 4,
            },
        )?;
        assert!(matches!(
            run(&state, register("a1", 2))?,
            CommandResponse::Rejected(Rejection::CapacityBelowAllocated { .. })
        ));
        Ok(())
    }

    #[test]
    fn accepts_never_overcommit_and_lost_agents_release() -> Result<(), StateError> {
        let dir = tempfile::tempdir().map_err(|e| StateError::Snapshot(e.to_string()))?;
        let state = State::open(&dir.path().join("s.redb"))?;
        assert!(matches!(
            run(&state, register("a1", 4))?,
            CommandResponse::AgentRegistered(_)
        ));
        assert!(matches!(
            run(&state, accept("f", "a1", 1))?,
            CommandResponse::Rejected(Rejection::UnknownFramework(_))
        ));
        run(&state, register_framework("f", "r"))?;
        // Two accepts of the same offer: the second finds the resources gone.
        assert!(matches!(
            run(&state, accept("f", "a1", 3))?,
            CommandResponse::Allocated(_)
        ));
        assert!(matches!(
            run(&state, accept("f", "a1", 3))?,
            CommandResponse::Rejected(Rejection::InsufficientResources { .. })
        ));
        assert!(matches!(
            run(&state, accept("f", "a1", 1))?,
            CommandResponse::Allocated(_)
        ));
        assert!(matches!(
            run(&state, accept("f", "nobody", 1))?,
            CommandResponse::Rejected(Rejection::UnknownAgent(_))
        ));
        // Shrinking below what is allocated is refused.
        assert!(matches!(
            run(&state, register("a1", 2))?,
            CommandResponse::Rejected(Rejection::CapacityBelowAllocated { .. })
        ));
        let view = state.scheduling()?;
        assert_eq!(view.allocations.len(), 2);
        assert_eq!(view.agents[&id("a1")].allocated, Resources::new(4, 200));
        assert!(view.overcommitted().is_empty());

        // A quota limits the role.
        run(&state, register("a2", 8))?;
        run(
            &state,
            Command::SetRole {
                role: id("r"),
                weight: 2.0,
                quota: Some(Resources::new(6, 1 << 20)),
            },
        )?;
        assert!(matches!(
            run(&state, accept("f", "a2", 3))?,
            CommandResponse::Rejected(Rejection::QuotaExceeded { .. })
        ));
        assert!(matches!(
            run(&state, accept("f", "a2", 2))?,
            CommandResponse::Allocated(_)
        ));
        assert!(matches!(
            run(
                &state,
                Command::SetRole {
                    role: id("r"),
                    weight: f64::NAN,
                    quota: None
                }
            )?,
            CommandResponse::Rejected(Rejection::InvalidWeight(_))
        ));

        // A lost agent's allocations go back; it takes no accepts until it registers.
        let CommandResponse::AgentLost { released, .. } = run(
            &state,
            Command::AgentUnreachable {
                agent: id("a1"),
                at_ms: 3,
            },
        )?
        else {
            panic!("the agent is marked unreachable");
        };
        assert_eq!(released.len(), 2);
        assert!(matches!(
            run(&state, accept("f", "a1", 1))?,
            CommandResponse::Rejected(Rejection::AgentUnreachable(_))
        ));
        run(&state, register("a1", 4))?;
        let view = state.scheduling()?;
        assert_eq!(view.agents[&id("a1")].state, AgentState::Active);
        assert_eq!(view.agents[&id("a1")].allocated, Resources::ZERO);
        assert_eq!(view.allocations.len(), 1);

        // Release, twice.
        let only = *view.allocations.keys().next().unwrap_or(&AllocationId(0));
        assert!(matches!(
            run(&state, Command::Release { allocation: only })?,
            CommandResponse::Released(_)
        ));
        assert!(matches!(
            run(&state, Command::Release { allocation: only })?,
            CommandResponse::Rejected(Rejection::UnknownAllocation(_))
        ));
        assert_eq!(
            state.scheduling()?.agents[&id("a2")].allocated,
            Resources::ZERO
        );

        // A snapshot carries the scheduling tables, counters included.
        run(&state, accept("f", "a2", 1))?;
        let mut stream = Vec::new();
        dump(
            &state.database().begin_read().map_err(storage)?,
            &mut stream,
        )?;
        let copy = State::open(&dir.path().join("copy.redb"))?;
        let txn = copy.database().begin_write().map_err(storage)?;
        restore(&txn, &mut stream.as_slice())?;
        txn.commit().map_err(storage)?;
        let (a, b) = (state.scheduling()?, copy.scheduling()?);
        assert_eq!(a.agents, b.agents);
        assert_eq!(a.frameworks, b.frameworks);
        assert_eq!(a.roles, b.roles);
        assert_eq!(a.allocations, b.allocations);
        // Both assign the same next allocation id.
        let (x, y) = (
            run(&state, accept("f", "a2", 1))?,
            run(&copy, accept("f", "a2", 1))?,
        );
        assert_eq!(x, y);
        Ok(())
    }
}
