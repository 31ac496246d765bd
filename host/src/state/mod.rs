//! The replicated state machine's data in the node's redb file: deployed functions
//! (name -> record), their newest versions (kept for rollbacks), module blobs (digest ->
//! bytes, shared by every function and version with the same module) and the
//! scheduling tables (agents, frameworks, roles, allocations), changed
//! only by applying [`Command`]s in log order.
//!
//! `apply` is deterministic: its answer and its effect depend only on the command and
//! the state before it, so every replica that applies the same log holds the same state.

mod agent;
mod command;
mod constraint;
mod framework;
mod function;
pub(crate) mod ident;
mod job;
mod jobs;
mod resources;
mod scheduling;
mod token;

use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::Arc;

use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};
use wafer_proto::node_capnp::snapshot_item;

use crate::digest::Digest;
pub use agent::{AgentId, AgentRecord, AgentState};
pub use command::{
    read_resources, read_task_ref, read_task_update, reader_options, write_resources,
    write_task_ref, write_task_update, Command, CommandResponse, MalformedCommand, Rejection,
    MAX_MESSAGE_WORDS, MAX_MODULE_BYTES, MAX_NESTING,
};
pub use constraint::{Constraint, InvalidConstraint};
pub use framework::{
    Allocation, AllocationId, FrameworkId, FrameworkRecord, RoleName, RoleRecord, MAX_WEIGHT,
};
pub use function::{
    check_label_key, check_label_value, FunctionName, FunctionRecord, FunctionSpec, InvalidName,
    MAX_LABELS, MAX_NAME_LEN,
};
pub use ident::InvalidId;
pub use job::{
    Attempt, JobId, JobOutput, JobRecord, TaskRef, TaskState, TaskUpdate, MAX_ATTEMPTS,
    MAX_JOB_INPUT_BYTES, MAX_JOB_OUTPUT_BYTES,
};
pub use resources::Resources;
pub use scheduling::SchedulingView;
pub use token::{
    check_secret, generate_secret, hash_token, hash_token_into, InvalidScope, Scope, TokenId,
    TokenRecord, MAX_TOKEN_NAME_LEN,
};

/// Function name -> JSON [`FunctionRecord`].
const FUNCTIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("functions");
/// Hex digest -> module bytes.
const BLOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("blobs");
/// The name of the [`VERSIONS`] table (also its rows' name in snapshots).
const VERSIONS_TABLE: &str = "function_versions";
/// `NAME/VERSION` (the version in 20 digits, so keys sort by version) -> JSON
/// [`FunctionRecord`] of that version as it was made: the newest [`VERSIONS_KEPT`]
/// versions of every function, its current one included.
const VERSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new(VERSIONS_TABLE);

/// How many versions of a function are kept (and their modules stored) for rollbacks.
pub const VERSIONS_KEPT: usize = 10;

/// What reading or writing the state can fail with.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The database file could not be opened or created.
    #[error("opening the state database {path}: {source}")]
    Open {
        /// The file.
        path: String,
        /// Why.
        source: redb::DatabaseError,
    },
    /// A read or write failed.
    #[error("state storage: {0}")]
    Storage(#[from] redb::Error),
    /// A stored record does not decode.
    #[error("corrupt record for {key:?}: {message}")]
    Corrupt {
        /// The record's key.
        key: String,
        /// The decoding error.
        message: String,
    },
    /// Reading or writing a snapshot stream failed.
    #[error("snapshot: {0}")]
    Snapshot(String),
}

/// Told of changes to the state once they are durable, in log order, on a thread that
/// may block (it prepares modules for invocation, for example).
pub trait Observer: Send + Sync + 'static {
    /// Entries up to log index `last_index` were applied, with these answers (one per
    /// command, in log order; entries without a command have none).
    fn applied(&self, last_index: u64, changes: &[&CommandResponse]);
    /// A snapshot replaced the whole state, as of log index `last_index`.
    fn replaced(&self, last_index: u64);
}

/// Several observers, told in order.
pub struct Observers(pub Vec<Arc<dyn Observer>>);

impl Observer for Observers {
    fn applied(&self, last_index: u64, changes: &[&CommandResponse]) {
        for observer in &self.0 {
            observer.applied(last_index, changes);
        }
    }

    fn replaced(&self, last_index: u64) {
        for observer in &self.0 {
            observer.replaced(last_index);
        }
    }
}

/// An [`Observer`] that ignores everything.
pub struct NoObserver;

impl Observer for NoObserver {
    fn applied(&self, _: u64, _: &[&CommandResponse]) {}
    fn replaced(&self, _: u64) {}
}

/// Turns any redb error into a [`StateError`].
pub fn storage<E: Into<redb::Error>>(e: E) -> StateError {
    StateError::Storage(e.into())
}

/// The node's state database (shared with the Raft log, which keeps its own tables in
/// the same file).
#[derive(Clone)]
pub struct State {
    db: Arc<Database>,
    /// The active jobs as the last [`State::scheduling`] parsed them.
    active_jobs: Arc<std::sync::Mutex<jobs::ActiveJobs>>,
}

impl State {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: &Path) -> Result<State, StateError> {
        let db = Database::create(path).map_err(|source| StateError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let txn = db.begin_write().map_err(storage)?;
        txn.open_table(FUNCTIONS).map_err(storage)?;
        txn.open_table(BLOBS).map_err(storage)?;
        txn.open_table(VERSIONS).map_err(storage)?;
        scheduling::create_tables(&txn)?;
        token::create_tables(&txn)?;
        txn.commit().map_err(storage)?;
        Ok(State {
            db: Arc::new(db),
            active_jobs: Arc::default(),
        })
    }

    /// The underlying database.
    pub fn database(&self) -> &Arc<Database> {
        &self.db
    }

    /// The record of function `name`.
    pub fn get_function(&self, name: &FunctionName) -> Result<Option<FunctionRecord>, StateError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let functions = txn.open_table(FUNCTIONS).map_err(storage)?;
        match functions.get(name.as_str()).map_err(storage)? {
            Some(bytes) => Ok(Some(decode(name.as_str(), bytes.value())?)),
            None => Ok(None),
        }
    }

    /// The kept versions of function `name`, oldest first (empty for no such function).
    /// A function deployed before versions were kept lists its current version only.
    pub fn function_versions(
        &self,
        name: &FunctionName,
    ) -> Result<Vec<FunctionRecord>, StateError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let functions = txn.open_table(FUNCTIONS).map_err(storage)?;
        let Some(current) = functions.get(name.as_str()).map_err(storage)? else {
            return Ok(Vec::new());
        };
        let current = decode(name.as_str(), current.value())?;
        let versions = txn.open_table(VERSIONS).map_err(storage)?;
        let mut kept = read_versions(&versions, name)?;
        if kept.last().map(|v| v.version) != Some(current.version) {
            kept.push(current);
        }
        Ok(kept)
    }

    /// Every function, sorted by name.
    pub fn list_functions(&self) -> Result<Vec<FunctionRecord>, StateError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let functions = txn.open_table(FUNCTIONS).map_err(storage)?;
        let mut out = Vec::new();
        for entry in functions.iter().map_err(storage)? {
            let (key, value) = entry.map_err(storage)?;
            out.push(decode(key.value(), value.value())?);
        }
        Ok(out)
    }

    /// The scheduling tables: agents, frameworks, roles and allocations.
    pub fn scheduling(&self) -> Result<SchedulingView, StateError> {
        let txn = self.db.begin_read().map_err(storage)?;
        // One reader at a time refreshes the parsed jobs; a poisoned cache is only a
        // cache (every entry is checked against the stored bytes).
        let mut active = self.active_jobs.lock().unwrap_or_else(|p| p.into_inner());
        scheduling::read_view(&txn, &mut active)
    }

    /// Job `job`.
    pub fn get_job(&self, job: JobId) -> Result<Option<JobRecord>, StateError> {
        let txn = self.db.begin_read().map_err(storage)?;
        jobs::read_job(&txn, job)
    }

    /// The newest `limit` jobs, newest first.
    pub fn list_jobs(&self, limit: usize) -> Result<Vec<JobRecord>, StateError> {
        let txn = self.db.begin_read().map_err(storage)?;
        jobs::read_all(&txn, limit)
    }

    /// A job's input or output bytes.
    pub fn job_data(&self, digest: &Digest) -> Result<Option<Vec<u8>>, StateError> {
        let txn = self.db.begin_read().map_err(storage)?;
        jobs::read_data(&txn, digest)
    }

    /// Every API token, by id.
    pub fn list_tokens(&self) -> Result<Vec<TokenRecord>, StateError> {
        let txn = self.db.begin_read().map_err(storage)?;
        token::read_all(&txn)
    }

    /// The module with `digest`.
    pub fn get_blob(&self, digest: &Digest) -> Result<Option<Vec<u8>>, StateError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let blobs = txn.open_table(BLOBS).map_err(storage)?;
        Ok(blobs
            .get(digest.to_hex().as_str())
            .map_err(storage)?
            .map(|b| b.value().to_vec()))
    }
}

/// Applies `command` inside `txn`. A command the state refuses is answered with
/// [`CommandResponse::Rejected`] and changes nothing; an `Err` is a storage failure.
pub fn apply(txn: &WriteTransaction, command: &Command) -> Result<CommandResponse, StateError> {
    if let Some(answer) = scheduling::apply(txn, command)? {
        return Ok(answer);
    }
    if let Some(answer) = jobs::apply(txn, command)? {
        return Ok(answer);
    }
    if let Some(answer) = token::apply(txn, command)? {
        return Ok(answer);
    }
    let mut functions = txn.open_table(FUNCTIONS).map_err(storage)?;
    let mut blobs = txn.open_table(BLOBS).map_err(storage)?;
    match command {
        Command::DeployFunction {
            name,
            spec,
            module,
            deployed_at_ms,
        } => {
            let size = module.len() as u64;
            if size > MAX_MODULE_BYTES {
                return Ok(CommandResponse::Rejected(Rejection::ModuleTooLarge {
                    size,
                    limit: MAX_MODULE_BYTES,
                }));
            }
            let previous = match functions.get(name.as_str()).map_err(storage)? {
                Some(bytes) => Some(decode(name.as_str(), bytes.value())?),
                None => None,
            };
            let record = FunctionRecord {
                name: name.clone(),
                version: previous.as_ref().map_or(1, |p| p.version + 1),
                digest: Digest::of(module),
                size,
                spec: spec.clone(),
                deployed_at_ms: *deployed_at_ms,
                labels: previous
                    .as_ref()
                    .map(|p| p.labels.clone())
                    .unwrap_or_default(),
                restored_from: None,
            };
            let hex = record.digest.to_hex();
            if blobs.get(hex.as_str()).map_err(storage)?.is_none() {
                blobs
                    .insert(hex.as_str(), module.as_ref())
                    .map_err(storage)?;
            }
            let mut versions = txn.open_table(VERSIONS).map_err(storage)?;
            make_current(
                &mut functions,
                &mut versions,
                &mut blobs,
                previous.as_ref(),
                &record,
            )?;
            Ok(CommandResponse::Deployed(record))
        }
        Command::RollbackFunction {
            name,
            version,
            at_ms,
        } => {
            let current = match functions.get(name.as_str()).map_err(storage)? {
                Some(bytes) => decode(name.as_str(), bytes.value())?,
                None => return Ok(CommandResponse::Rejected(Rejection::NotFound(name.clone()))),
            };
            let mut versions = txn.open_table(VERSIONS).map_err(storage)?;
            let kept = read_versions(&versions, name)?;
            let wanted = version.unwrap_or(current.version.saturating_sub(1));
            if wanted == current.version {
                return Ok(CommandResponse::Rejected(Rejection::AlreadyCurrent {
                    name: name.clone(),
                    version: wanted,
                }));
            }
            let Some(target) = kept.iter().find(|v| v.version == wanted) else {
                let mut listed: Vec<u64> = kept.iter().map(|v| v.version).collect();
                if listed.last() != Some(&current.version) {
                    listed.push(current.version);
                }
                return Ok(CommandResponse::Rejected(Rejection::UnknownVersion {
                    name: name.clone(),
                    version: wanted,
                    kept: listed,
                }));
            };
            let record = FunctionRecord {
                name: name.clone(),
                version: current.version + 1,
                digest: target.digest,
                size: target.size,
                spec: target.spec.clone(),
                deployed_at_ms: *at_ms,
                labels: current.labels.clone(),
                restored_from: Some(target.version),
            };
            make_current(
                &mut functions,
                &mut versions,
                &mut blobs,
                Some(&current),
                &record,
            )?;
            Ok(CommandResponse::Deployed(record))
        }
        Command::DeleteFunction { name } => {
            let removed = match functions.remove(name.as_str()).map_err(storage)? {
                Some(bytes) => decode(name.as_str(), bytes.value())?,
                None => return Ok(CommandResponse::Rejected(Rejection::NotFound(name.clone()))),
            };
            let mut versions = txn.open_table(VERSIONS).map_err(storage)?;
            let mut digests = vec![removed.digest];
            for version in read_versions(&versions, name)? {
                versions
                    .remove(version_key(name, version.version).as_str())
                    .map_err(storage)?;
                digests.push(version.digest);
            }
            digests.sort();
            digests.dedup();
            for digest in &digests {
                release_blob(&functions, &versions, &mut blobs, digest)?;
            }
            Ok(CommandResponse::Deleted(removed.name))
        }
        Command::SetLabels { name, .. } => {
            drop((functions, blobs));
            let mut responses = Vec::with_capacity(1);
            label_run(txn, name, std::slice::from_ref(command), &mut responses)?;
            Ok(responses
                .pop()
                .unwrap_or(CommandResponse::Rejected(Rejection::NotFound(name.clone()))))
        }
        Command::Batch(commands) => {
            drop((functions, blobs));
            let mut responses = Vec::with_capacity(commands.len());
            let mut i = 0;
            while i < commands.len() {
                match &commands[i] {
                    // Consecutive label changes of one function: read and write it once.
                    Command::SetLabels { name, .. } => {
                        let end = commands[i..]
                            .iter()
                            .position(
                                |c| !matches!(c, Command::SetLabels { name: n, .. } if n == name),
                            )
                            .map_or(commands.len(), |p| i + p);
                        label_run(txn, name, &commands[i..end], &mut responses)?;
                        i = end;
                    }
                    other => {
                        responses.push(apply(txn, other)?);
                        i += 1;
                    }
                }
            }
            Ok(CommandResponse::Batch(responses))
        }
        // Answered by `scheduling::apply` above.
        Command::RegisterAgent { .. }
        | Command::AgentUnreachable { .. }
        | Command::RegisterFramework { .. }
        | Command::SetRole { .. }
        | Command::Accept { .. }
        | Command::Release { .. }
        | Command::SubmitJob { .. }
        | Command::LaunchJob { .. }
        | Command::UpdateJob { .. }
        | Command::KillJob { .. }
        | Command::PlaceTask { .. }
        | Command::SetJobReason { .. }
        | Command::CreateToken { .. }
        | Command::RevokeToken { .. } => Err(StateError::Snapshot(
            "a scheduling or token command reached the function tables".into(),
        )),
    }
}

/// Applies `run`, label changes of function `name` only, in order: the record is read
/// and written once. Pushes one answer per command.
fn label_run(
    txn: &WriteTransaction,
    name: &FunctionName,
    run: &[Command],
    responses: &mut Vec<CommandResponse>,
) -> Result<(), StateError> {
    let mut functions = txn.open_table(FUNCTIONS).map_err(storage)?;
    let mut record = match functions.get(name.as_str()).map_err(storage)? {
        Some(bytes) => decode(name.as_str(), bytes.value())?,
        None => {
            responses.extend(
                run.iter()
                    .map(|_| CommandResponse::Rejected(Rejection::NotFound(name.clone()))),
            );
            return Ok(());
        }
    };
    let mut changed = false;
    for command in run {
        let Command::SetLabels { set, remove, .. } = command else {
            continue;
        };
        responses.push(match change_labels(&mut record, set, remove) {
            Ok(()) => {
                changed = true;
                CommandResponse::Labeled(name.clone())
            }
            Err(why) => CommandResponse::Rejected(why),
        });
    }
    if changed {
        let encoded = encode(&record)?;
        functions
            .insert(name.as_str(), encoded.as_slice())
            .map_err(storage)?;
    }
    Ok(())
}

/// Removes labels `remove`, then sets `set`, on `record`; or refuses the change and
/// leaves `record` as it was.
fn change_labels(
    record: &mut FunctionRecord,
    set: &std::collections::BTreeMap<String, String>,
    remove: &[String],
) -> Result<(), Rejection> {
    for (key, value) in set {
        check_label_key(key)
            .and_then(|()| check_label_value(key, value))
            .map_err(Rejection::InvalidLabel)?;
    }
    let kept = record
        .labels
        .keys()
        .filter(|k| !remove.contains(k) && !set.contains_key(*k))
        .count();
    if kept + set.len() > MAX_LABELS {
        return Err(Rejection::InvalidLabel(format!(
            "a function has at most {MAX_LABELS} labels"
        )));
    }
    for key in remove {
        record.labels.remove(key);
    }
    for (key, value) in set {
        record.labels.insert(key.clone(), value.clone());
    }
    Ok(())
}

/// Writes every record of the state as of `txn` to `out`, one [`snapshot_item`]
/// message each.
pub fn dump(txn: &ReadTransaction, out: &mut impl Write) -> Result<(), StateError> {
    let io = |e: capnp::Error| StateError::Snapshot(e.to_string());
    let functions = txn.open_table(FUNCTIONS).map_err(storage)?;
    for entry in functions.iter().map_err(storage)? {
        let (name, record) = entry.map_err(storage)?;
        let mut message = capnp::message::Builder::new_default();
        let mut function = message
            .init_root::<snapshot_item::Builder>()
            .init_function();
        function.set_name(name.value());
        function.set_record(record.value());
        capnp::serialize::write_message(&mut *out, &message).map_err(io)?;
    }
    let blobs = txn.open_table(BLOBS).map_err(storage)?;
    for entry in blobs.iter().map_err(storage)? {
        let (digest, module) = entry.map_err(storage)?;
        let mut message = capnp::message::Builder::new_default();
        let mut blob = message.init_root::<snapshot_item::Builder>().init_blob();
        blob.set_digest(digest.value());
        blob.set_module(module.value());
        capnp::serialize::write_message(&mut *out, &message).map_err(io)?;
    }
    let versions = txn.open_table(VERSIONS).map_err(storage)?;
    for entry in versions.iter().map_err(storage)? {
        let (key, record) = entry.map_err(storage)?;
        write_row(out, VERSIONS_TABLE, key.value().as_bytes(), record.value())?;
    }
    scheduling::dump(txn, out)?;
    token::dump(txn, out)
}

/// Writes one generic row of a table to a snapshot stream.
pub(super) fn write_row(
    out: &mut impl Write,
    table: &str,
    key: &[u8],
    value: &[u8],
) -> Result<(), StateError> {
    let mut message = capnp::message::Builder::new_default();
    let mut item = message.init_root::<snapshot_item::Builder>().init_row();
    item.set_table(table);
    item.set_key(key);
    item.set_value(value);
    capnp::serialize::write_message(&mut *out, &message)
        .map_err(|e| StateError::Snapshot(e.to_string()))
}

/// Replaces the state in `txn` with the records [`dump`] wrote, read from `input` until
/// its end.
pub fn restore(txn: &WriteTransaction, input: &mut impl BufRead) -> Result<(), StateError> {
    let bad = |e: capnp::Error| StateError::Snapshot(e.to_string());
    txn.delete_table(FUNCTIONS).map_err(storage)?;
    txn.delete_table(BLOBS).map_err(storage)?;
    txn.delete_table(VERSIONS).map_err(storage)?;
    scheduling::clear(txn)?;
    token::clear(txn)?;
    let mut functions = txn.open_table(FUNCTIONS).map_err(storage)?;
    let mut blobs = txn.open_table(BLOBS).map_err(storage)?;
    let mut versions = txn.open_table(VERSIONS).map_err(storage)?;
    while let Some(message) =
        capnp::serialize::try_read_message(&mut *input, reader_options()).map_err(bad)?
    {
        let item: snapshot_item::Reader<'_> = message.get_root().map_err(bad)?;
        match item
            .which()
            .map_err(|e| StateError::Snapshot(e.to_string()))?
        {
            snapshot_item::Function(function) => {
                let name = function
                    .get_name()
                    .and_then(|n| n.to_str().map_err(Into::into))
                    .map_err(bad)?;
                let record = function.get_record().map_err(bad)?;
                // Refuse a record that would not read back later.
                decode(name, record)?;
                functions.insert(name, record).map_err(storage)?;
            }
            snapshot_item::Blob(blob) => {
                let digest = blob
                    .get_digest()
                    .and_then(|n| n.to_str().map_err(Into::into))
                    .map_err(bad)?;
                blobs
                    .insert(digest, blob.get_module().map_err(bad)?)
                    .map_err(storage)?;
            }
            snapshot_item::Row(row) => {
                let table = row
                    .get_table()
                    .and_then(|n| n.to_str().map_err(Into::into))
                    .map_err(bad)?;
                let (key, value) = (row.get_key().map_err(bad)?, row.get_value().map_err(bad)?);
                if table == VERSIONS_TABLE {
                    let key = std::str::from_utf8(key)
                        .map_err(|e| StateError::Snapshot(format!("{VERSIONS_TABLE} key: {e}")))?;
                    // Refuse a record that would not read back later.
                    decode(key, value)?;
                    versions.insert(key, value).map_err(storage)?;
                } else if !token::restore_row(txn, table, key, value)? {
                    scheduling::restore_row(txn, table, key, value)?;
                }
            }
        }
    }
    Ok(())
}

/// The record of function `name`, read inside a write transaction.
pub(crate) fn function_record(
    txn: &WriteTransaction,
    name: &FunctionName,
) -> Result<Option<FunctionRecord>, StateError> {
    let functions = txn.open_table(FUNCTIONS).map_err(storage)?;
    let record = match functions.get(name.as_str()).map_err(storage)? {
        Some(bytes) => Some(decode(name.as_str(), bytes.value())?),
        None => None,
    };
    Ok(record)
}

/// Stores `record` as function's current version (it replaces `previous`), keeps it
/// among the function's versions, drops the versions past [`VERSIONS_KEPT`] and the
/// modules nothing refers to any more.
fn make_current(
    functions: &mut redb::Table<&str, &[u8]>,
    versions: &mut redb::Table<&str, &[u8]>,
    blobs: &mut redb::Table<&str, &[u8]>,
    previous: Option<&FunctionRecord>,
    record: &FunctionRecord,
) -> Result<(), StateError> {
    let name = &record.name;
    let encoded = encode(record)?;
    functions
        .insert(name.as_str(), encoded.as_slice())
        .map_err(storage)?;
    // A function deployed before versions were kept has no row for its current one.
    if let Some(previous) = previous {
        let key = version_key(name, previous.version);
        if versions.get(key.as_str()).map_err(storage)?.is_none() {
            let mut kept = previous.clone();
            kept.labels.clear();
            versions
                .insert(key.as_str(), encode(&kept)?.as_slice())
                .map_err(storage)?;
        }
    }
    let mut kept = record.clone();
    kept.labels.clear();
    versions
        .insert(
            version_key(name, record.version).as_str(),
            encode(&kept)?.as_slice(),
        )
        .map_err(storage)?;
    let all = read_versions(versions, name)?;
    let dropped = &all[..all.len().saturating_sub(VERSIONS_KEPT)];
    for old in dropped {
        versions
            .remove(version_key(name, old.version).as_str())
            .map_err(storage)?;
    }
    for old in dropped {
        release_blob(functions, versions, blobs, &old.digest)?;
    }
    Ok(())
}

/// The key of version `version` of function `name` in [`VERSIONS`].
fn version_key(name: &FunctionName, version: u64) -> String {
    format!("{name}/{version:020}")
}

/// The kept versions of function `name`, oldest first.
fn read_versions(
    versions: &impl ReadableTable<&'static str, &'static [u8]>,
    name: &FunctionName,
) -> Result<Vec<FunctionRecord>, StateError> {
    // Names never contain '/', and '0' sorts just after it: this range holds exactly
    // the keys `NAME/...`.
    let (start, end) = (format!("{name}/"), format!("{name}0"));
    let mut out = Vec::new();
    for entry in versions
        .range::<&str>(start.as_str()..end.as_str())
        .map_err(storage)?
    {
        let (key, value) = entry.map_err(storage)?;
        out.push(decode(key.value(), value.value())?);
    }
    Ok(out)
}

/// Deletes blob `digest` unless a function or a kept version still refers to it.
fn release_blob(
    functions: &redb::Table<&str, &[u8]>,
    versions: &redb::Table<&str, &[u8]>,
    blobs: &mut redb::Table<&str, &[u8]>,
    digest: &Digest,
) -> Result<(), StateError> {
    for table in [functions, versions] {
        for entry in table.iter().map_err(storage)? {
            let (key, value) = entry.map_err(storage)?;
            if decode(key.value(), value.value())?.digest == *digest {
                return Ok(());
            }
        }
    }
    blobs.remove(digest.to_hex().as_str()).map_err(storage)?;
    Ok(())
}

fn encode(record: &FunctionRecord) -> Result<Vec<u8>, StateError> {
    serde_json::to_vec(record).map_err(|e| StateError::Corrupt {
        key: record.name.to_string(),
        message: e.to_string(),
    })
}

fn decode(key: &str, bytes: &[u8]) -> Result<FunctionRecord, StateError> {
    serde_json::from_slice(bytes).map_err(|e| StateError::Corrupt {
        key: key.to_string(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn name(s: &str) -> FunctionName {
        s.parse().expect("valid name")
    }

    fn deploy(
        state: &State,
        n: &str,
        module: &'static [u8],
    ) -> Result<CommandResponse, StateError> {
        let txn = state.database().begin_write().map_err(storage)?;
        let out = apply(
            &txn,
            &Command::DeployFunction {
                name: name(n),
                spec: FunctionSpec::default(),
                module: Bytes::from_static(module),
                deployed_at_ms: 1,
            },
        )?;
        txn.commit().map_err(storage)?;
        Ok(out)
    }

    fn delete(state: &State, n: &str) -> Result<CommandResponse, StateError> {
        let txn = state.database().begin_write().map_err(storage)?;
        let out = apply(&txn, &Command::DeleteFunction { name: name(n) })?;
        txn.commit().map_err(storage)?;
        Ok(out)
    }

    fn version(response: CommandResponse) -> u64 {
        match response {
            CommandResponse::Deployed(record) => record.version,
            other => panic!("expected a deploy, got {other:?}"),
        }
    }

    #[test]
    fn functions_survive_reopen_and_blobs_are_shared_and_released() -> Result<(), StateError> {
        let dir = tempfile::tempdir().map_err(|e| StateError::Snapshot(e.to_string()))?;
        let path = dir.path().join("state.redb");
        {
            let state = State::open(&path)?;
            assert_eq!(version(deploy(&state, "a", b"module-1")?), 1);
            deploy(&state, "b", b"module-1")?;
            assert_eq!(version(deploy(&state, "a", b"module-2")?), 2);
            // module-1 is still used by b.
            assert!(state.get_blob(&Digest::of(b"module-1"))?.is_some());
        }
        let state = State::open(&path)?;
        let names: Vec<String> = state
            .list_functions()?
            .into_iter()
            .map(|r| r.name.to_string())
            .collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(state.get_function(&name("a"))?.map(|r| r.version), Some(2));
        assert!(matches!(delete(&state, "b")?, CommandResponse::Deleted(_)));
        // module-1 is still a's version 1, kept for rollbacks.
        assert!(state.get_blob(&Digest::of(b"module-1"))?.is_some());
        assert_eq!(
            state.get_blob(&Digest::of(b"module-2"))?.as_deref(),
            Some(&b"module-2"[..])
        );
        assert_eq!(
            delete(&state, "b")?,
            CommandResponse::Rejected(Rejection::NotFound(name("b")))
        );
        // Removing a function removes its kept versions and the modules only they used.
        assert!(matches!(delete(&state, "a")?, CommandResponse::Deleted(_)));
        assert!(state.get_blob(&Digest::of(b"module-1"))?.is_none());
        assert!(state.get_blob(&Digest::of(b"module-2"))?.is_none());
        assert!(state.function_versions(&name("a"))?.is_empty());
        Ok(())
    }

    fn rollback(state: &State, n: &str, to: Option<u64>) -> Result<CommandResponse, StateError> {
        let txn = state.database().begin_write().map_err(storage)?;
        let out = apply(
            &txn,
            &Command::RollbackFunction {
                name: name(n),
                version: to,
                at_ms: 7,
            },
        )?;
        txn.commit().map_err(storage)?;
        Ok(out)
    }

    #[test]
    fn a_rollback_makes_a_kept_version_current_again_as_the_next_version() -> Result<(), StateError>
    {
        let dir = tempfile::tempdir().map_err(|e| StateError::Snapshot(e.to_string()))?;
        let state = State::open(&dir.path().join("s.redb"))?;
        assert_eq!(
            rollback(&state, "f", None)?,
            CommandResponse::Rejected(Rejection::NotFound(name("f")))
        );
        deploy(&state, "f", b"module-1")?;
        assert_eq!(
            rollback(&state, "f", None)?,
            CommandResponse::Rejected(Rejection::UnknownVersion {
                name: name("f"),
                version: 0,
                kept: vec![1],
            })
        );
        deploy(&state, "f", b"module-2")?;
        let txn = state.database().begin_write().map_err(storage)?;
        apply(
            &txn,
            &Command::SetLabels {
                name: name("f"),
                set: [("team".to_string(), "a".to_string())].into(),
                remove: Vec::new(),
            },
        )?;
        txn.commit().map_err(storage)?;

        // Back to version 1: its module, as version 3, with today's labels.
        let CommandResponse::Deployed(restored) = rollback(&state, "f", None)? else {
            panic!("a rollback answers with the new record");
        };
        assert_eq!(restored.version, 3);
        assert_eq!(restored.digest, Digest::of(b"module-1"));
        assert_eq!(restored.restored_from, Some(1));
        assert_eq!(restored.deployed_at_ms, 7);
        assert_eq!(labels(&state, "f")?.len(), 1);
        assert_eq!(state.get_function(&name("f"))?, Some(restored));
        let versions: Vec<(u64, Digest)> = state
            .function_versions(&name("f"))?
            .into_iter()
            .map(|v| (v.version, v.digest))
            .collect();
        assert_eq!(
            versions,
            [
                (1, Digest::of(b"module-1")),
                (2, Digest::of(b"module-2")),
                (3, Digest::of(b"module-1")),
            ]
        );
        assert_eq!(
            rollback(&state, "f", Some(3))?,
            CommandResponse::Rejected(Rejection::AlreadyCurrent {
                name: name("f"),
                version: 3,
            })
        );
        assert_eq!(
            rollback(&state, "f", Some(9))?,
            CommandResponse::Rejected(Rejection::UnknownVersion {
                name: name("f"),
                version: 9,
                kept: vec![1, 2, 3],
            })
        );

        // Only the newest VERSIONS_KEPT stay, and a module no kept version uses goes.
        for _ in 0..VERSIONS_KEPT {
            deploy(&state, "f", b"module-3")?;
        }
        let kept: Vec<u64> = state
            .function_versions(&name("f"))?
            .iter()
            .map(|v| v.version)
            .collect();
        assert_eq!(kept, (4..=13).collect::<Vec<u64>>());
        assert!(state.get_blob(&Digest::of(b"module-1"))?.is_none());
        assert!(state.get_blob(&Digest::of(b"module-2"))?.is_none());
        assert!(matches!(
            rollback(&state, "f", Some(2))?,
            CommandResponse::Rejected(Rejection::UnknownVersion { .. })
        ));

        // The kept versions travel in snapshots.
        let mut stream = Vec::new();
        dump(
            &state.database().begin_read().map_err(storage)?,
            &mut stream,
        )?;
        let target = State::open(&dir.path().join("t.redb"))?;
        let txn = target.database().begin_write().map_err(storage)?;
        restore(&txn, &mut stream.as_slice())?;
        txn.commit().map_err(storage)?;
        assert_eq!(
            target.function_versions(&name("f"))?,
            state.function_versions(&name("f"))?
        );
        Ok(())
    }

    fn labels(state: &State, n: &str) -> Result<Vec<(String, String)>, StateError> {
        Ok(state
            .get_function(&name(n))?
            .map(|r| r.labels.into_iter().collect())
            .unwrap_or_default())
    }

    #[test]
    fn a_batch_applies_each_label_change_or_refuses_it_alone() -> Result<(), StateError> {
        let dir = tempfile::tempdir().map_err(|e| StateError::Snapshot(e.to_string()))?;
        let state = State::open(&dir.path().join("s.redb"))?;
        deploy(&state, "f", b"module")?;
        let set = |k: &str, v: &str| Command::SetLabels {
            name: name("f"),
            set: [(k.to_string(), v.to_string())].into(),
            remove: Vec::new(),
        };
        let batch = Command::Batch(vec![
            set("a", "1"),
            set("Bad Key", "x"),
            Command::SetLabels {
                name: name("f"),
                set: [("b".to_string(), "2".to_string())].into(),
                remove: vec!["a".to_string()],
            },
            Command::SetLabels {
                name: name("missing"),
                set: Default::default(),
                remove: Vec::new(),
            },
            set("c", "3"),
        ]);
        let txn = state.database().begin_write().map_err(storage)?;
        let response = apply(&txn, &batch)?;
        txn.commit().map_err(storage)?;
        let CommandResponse::Batch(answers) = response else {
            panic!("a batch answers with a batch");
        };
        assert!(matches!(answers[0], CommandResponse::Labeled(_)));
        assert!(matches!(
            answers[1],
            CommandResponse::Rejected(Rejection::InvalidLabel(_))
        ));
        assert!(matches!(answers[2], CommandResponse::Labeled(_)));
        assert!(matches!(
            answers[3],
            CommandResponse::Rejected(Rejection::NotFound(_))
        ));
        assert!(matches!(answers[4], CommandResponse::Labeled(_)));
        assert_eq!(
            labels(&state, "f")?,
            [
                ("b".to_string(), "2".to_string()),
                ("c".to_string(), "3".to_string())
            ]
        );
        // Labels survive a redeploy, which makes a new version.
        assert_eq!(version(deploy(&state, "f", b"module-2")?), 2);
        assert_eq!(labels(&state, "f")?.len(), 2);
        Ok(())
    }

    #[test]
    fn a_dump_restores_the_same_state_over_a_different_one() -> Result<(), StateError> {
        let dir = tempfile::tempdir().map_err(|e| StateError::Snapshot(e.to_string()))?;
        let source = State::open(&dir.path().join("a.redb"))?;
        deploy(&source, "a", b"module-1")?;
        deploy(&source, "b", b"module-2")?;
        let mut stream = Vec::new();
        dump(
            &source.database().begin_read().map_err(storage)?,
            &mut stream,
        )?;

        let target = State::open(&dir.path().join("b.redb"))?;
        deploy(&target, "stale", b"module-3")?;
        let txn = target.database().begin_write().map_err(storage)?;
        restore(&txn, &mut stream.as_slice())?;
        txn.commit().map_err(storage)?;
        assert_eq!(target.list_functions()?, source.list_functions()?);
        assert!(target.get_blob(&Digest::of(b"module-3"))?.is_none());
        assert!(target.get_blob(&Digest::of(b"module-2"))?.is_some());

        let txn = target.database().begin_write().map_err(storage)?;
        assert!(restore(&txn, &mut &b"garbage that is not capnp"[..]).is_err());
        Ok(())
    }
}
