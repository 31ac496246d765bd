//! The Raft state machine: applies committed commands to the [`crate::state`] tables in
//! the node's redb file, and builds and installs snapshots as files in the data folder.
//!
//! A snapshot file is a stream of single-segment Cap'n Proto messages: a `SnapshotMeta`
//! (raft.capnp), then the state's items ([`crate::state::dump`]). The newest one is
//! `snapshots/current.snap`; it is replaced atomically (write, fsync, rename).

use std::io::{BufReader, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, RaftSnapshotBuilder, StorageIOError,
};
use redb::{ReadableDatabase, TableDefinition};
use serde::de::DeserializeOwned;
use wafer_proto::raft_capnp::snapshot_meta;

use super::codec::{read_snapshot_meta, write_snapshot_meta};
use super::{DurableLog, Entry, LogId, SnapshotMeta, StorageError, StoredMembership, TypeConfig};
use crate::state::{self, reader_options, CommandResponse, Observer, State};

/// Key -> JSON value: `last_applied`, `membership`.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_sm_meta");
const LAST_APPLIED: &str = "last_applied";
const MEMBERSHIP: &str = "membership";
const CURRENT: &str = "current.snap";

/// The state machine over the node's [`State`].
pub struct StateMachine {
    state: State,
    snapshots: Arc<SnapshotFiles>,
    observer: Arc<dyn Observer>,
    /// The file a snapshot being received is written to.
    incoming: Option<PathBuf>,
    /// How far the log is durable: an entry is applied only once it is.
    durable: DurableLog,
    /// When the applied state was last made durable.
    state_flushed: Arc<std::sync::Mutex<super::Paced>>,
}

/// How often the applied state is made durable. Applies are not fsynced (the log is:
/// after a crash openraft applies the log again from the state's last durable point),
/// but redb reuses the pages a transaction frees only after a durable commit, so a
/// state that is never made durable would only grow between snapshots.
const STATE_FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Builds snapshots from a consistent read of the state.
pub struct SnapshotBuilder {
    state: State,
    snapshots: Arc<SnapshotFiles>,
}

/// The snapshot files in the data folder: `current.snap`, and the temporary files that
/// replace it or receive a snapshot. Shared by the state machine and its builders,
/// which openraft runs at the same time as installs.
struct SnapshotFiles {
    dir: PathBuf,
    /// Numbers temporary files and the snapshots built at one log id.
    next: AtomicU64,
    /// Held while `current.snap` is compared with its replacement and replaced.
    replacing: std::sync::Mutex<()>,
}

impl SnapshotFiles {
    /// A number not handed out before in this process.
    fn next(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    fn current(&self) -> PathBuf {
        self.dir.join(CURRENT)
    }

    /// A temporary file's path of its own, named `WHAT-N.tmp`.
    fn temporary(&self, what: &str) -> PathBuf {
        self.dir.join(format!("{what}-{}.tmp", self.next()))
    }

    /// Writes a snapshot of `last_log_id` with `write` to a file of its own, fsyncs it
    /// and makes it `current.snap`, unless that holds a newer snapshot already (a build
    /// that began before an install can end after it). Returns the written file, open
    /// for reading.
    fn replace_current(
        &self,
        last_log_id: Option<LogId>,
        write: impl FnOnce(&mut BufWriter<std::fs::File>) -> Result<(), StorageError>,
    ) -> Result<std::fs::File, StorageError> {
        let tmp = self.temporary("current");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| snap_err(ErrorVerb::Write, format!("{}: {e}", tmp.display())))?;
        let mut out = BufWriter::new(file);
        let written = write(&mut out).and_then(|()| {
            let file = out
                .into_inner()
                .map_err(|e| snap_err(ErrorVerb::Write, e))?;
            file.sync_all().map_err(|e| snap_err(ErrorVerb::Write, e))?;
            Ok(file)
        });
        let file = match written {
            Ok(file) => file,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        let _replacing = self
            .replacing
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let current = self.current();
        let newer_there = std::fs::File::open(&current)
            .ok()
            .and_then(|f| read_header(&mut BufReader::new(f)).ok())
            .is_some_and(|there| there.last_log_id > last_log_id);
        if newer_there {
            // The open file stays readable for whoever asked for this one.
            let _ = std::fs::remove_file(&tmp);
            return Ok(file);
        }
        std::fs::rename(&tmp, &current).map_err(|e| snap_err(ErrorVerb::Write, e))?;
        if let Ok(dir) = std::fs::File::open(&self.dir) {
            let _ = dir.sync_all();
        }
        Ok(file)
    }
}

fn sm_read(e: impl ToString) -> StorageError {
    StorageIOError::read_state_machine(&std::io::Error::other(e.to_string())).into()
}

fn sm_write(e: impl ToString) -> StorageError {
    StorageIOError::write_state_machine(&std::io::Error::other(e.to_string())).into()
}

fn snap_err(verb: ErrorVerb, e: impl ToString) -> StorageError {
    StorageError::from_io_error(
        ErrorSubject::Snapshot(None),
        verb,
        std::io::Error::other(e.to_string()),
    )
}

impl StateMachine {
    /// Opens the state machine over `state`, keeping snapshots in `snapshots`, telling
    /// `observer` of every change, applying entries once `durable` says they are on disk.
    pub fn open(
        state: State,
        snapshots: &Path,
        observer: Arc<dyn Observer>,
        durable: DurableLog,
    ) -> Result<StateMachine, StorageError> {
        std::fs::create_dir_all(snapshots).map_err(|e| {
            snap_err(
                ErrorVerb::Write,
                format!("creating {}: {e}", snapshots.display()),
            )
        })?;
        let txn = state.database().begin_write().map_err(sm_write)?;
        txn.open_table(META).map_err(sm_write)?;
        txn.commit().map_err(sm_write)?;
        // Files of snapshots whose writing or receiving was cut short.
        if let Ok(dir) = std::fs::read_dir(snapshots) {
            for entry in dir.flatten() {
                if entry.path().extension().is_some_and(|e| e == "tmp") {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        Ok(StateMachine {
            state,
            snapshots: Arc::new(SnapshotFiles {
                dir: snapshots.to_path_buf(),
                next: AtomicU64::new(0),
                replacing: std::sync::Mutex::new(()),
            }),
            observer,
            incoming: None,
            durable,
            state_flushed: Arc::default(),
        })
    }

    /// The index of the last entry applied to the stored state (0 when none).
    pub fn applied_index(&self) -> Result<u64, StorageError> {
        Ok(applied_state_of(&self.state)?.0.map_or(0, |id| id.index))
    }
}

fn get_meta<T: DeserializeOwned>(
    txn: &redb::ReadTransaction,
    key: &str,
) -> Result<Option<T>, StorageError> {
    let table = txn.open_table(META).map_err(sm_read)?;
    match table.get(key).map_err(sm_read)? {
        Some(value) => Ok(Some(
            serde_json::from_slice(value.value()).map_err(sm_read)?,
        )),
        None => Ok(None),
    }
}

/// Records the last applied log id and, when it changed, the membership.
fn put_meta(
    txn: &redb::WriteTransaction,
    last_applied: &Option<LogId>,
    membership: Option<&StoredMembership>,
) -> Result<(), StorageError> {
    let mut table = txn.open_table(META).map_err(sm_write)?;
    let applied = serde_json::to_vec(last_applied).map_err(sm_write)?;
    table
        .insert(LAST_APPLIED, applied.as_slice())
        .map_err(sm_write)?;
    if let Some(membership) = membership {
        let membership = serde_json::to_vec(membership).map_err(sm_write)?;
        table
            .insert(MEMBERSHIP, membership.as_slice())
            .map_err(sm_write)?;
    }
    Ok(())
}

fn applied_state_of(state: &State) -> Result<(Option<LogId>, StoredMembership), StorageError> {
    let txn = state.database().begin_read().map_err(sm_read)?;
    let last_applied = get_meta::<Option<LogId>>(&txn, LAST_APPLIED)?.flatten();
    let membership = get_meta::<StoredMembership>(&txn, MEMBERSHIP)?.unwrap_or_default();
    Ok((last_applied, membership))
}

/// Reads the metadata message at the start of a snapshot file.
fn read_header(reader: &mut impl std::io::BufRead) -> Result<SnapshotMeta, StorageError> {
    let message = capnp::serialize::read_message(&mut *reader, reader_options())
        .map_err(|e| snap_err(ErrorVerb::Read, e))?;
    let meta: snapshot_meta::Reader<'_> = message
        .get_root()
        .map_err(|e| snap_err(ErrorVerb::Read, e))?;
    read_snapshot_meta(meta).map_err(|e| snap_err(ErrorVerb::Read, e))
}

/// The snapshot in the open file `file`, for openraft to stream: its metadata read
/// from the file itself, the file rewound to its start. The meta is always that of the
/// data sent, even when a newer snapshot replaces the file's path meanwhile (the open
/// file keeps the data it had).
fn snapshot_in(mut file: std::fs::File) -> Result<Snapshot<TypeConfig>, StorageError> {
    let rewind = |file: &mut std::fs::File| {
        file.seek(SeekFrom::Start(0))
            .map_err(|e| snap_err(ErrorVerb::Read, e))
    };
    rewind(&mut file)?;
    let meta = read_header(&mut BufReader::new(&file))?;
    rewind(&mut file)?;
    Ok(Snapshot {
        meta,
        snapshot: Box::new(tokio::fs::File::from_std(file)),
    })
}

/// Whether applying `entries` may take long: a deploy compiles its module, bulky
/// inputs and outputs are copied.
fn slow_to_apply(entries: &[Entry]) -> bool {
    super::bulk_bytes(entries) > super::OFF_THREAD_BYTES
        || entries
            .iter()
            .any(|entry| matches!(&entry.payload, EntryPayload::Normal(c) if c.deploys()))
}

/// Runs `f`, which blocks on redb (and, when `slow`, on more: compiling modules). Raft
/// runs on the node's RPC thread, a current-thread runtime: quick work runs in place
/// (no hand-off to another thread), slow work on the blocking pool so that the thread
/// keeps serving meanwhile. On a multi-threaded runtime it runs in place, with the
/// worker's other tasks moved to other workers.
async fn blocking<T: Send + 'static>(
    slow: bool,
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    use tokio::runtime::{Handle, RuntimeFlavor};
    if Handle::current().runtime_flavor() == RuntimeFlavor::MultiThread {
        tokio::task::block_in_place(f)
    } else if slow {
        tokio::task::spawn_blocking(f).await.map_err(sm_write)?
    } else {
        f()
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let state = self.state.clone();
        let files = self.snapshots.clone();
        let n = files.next();
        let snapshot = tokio::task::spawn_blocking(move || -> Result<_, StorageError> {
            // Applied commands are not fsynced (the log is): make them durable before
            // the snapshot lets the log behind it be purged.
            super::durable::durable_barrier(state.database()).map_err(sm_write)?;
            // One read transaction: the snapshot is a consistent cut of the state.
            let txn = state.database().begin_read().map_err(sm_read)?;
            let last_applied = get_meta::<Option<LogId>>(&txn, LAST_APPLIED)?.flatten();
            let membership = get_meta::<StoredMembership>(&txn, MEMBERSHIP)?.unwrap_or_default();
            let snapshot_id = match &last_applied {
                Some(id) => format!(
                    "{}-{}-{}-{n}",
                    id.leader_id.term, id.leader_id.node_id, id.index
                ),
                None => format!("0-0-0-{n}"),
            };
            let meta = SnapshotMeta {
                last_log_id: last_applied,
                last_membership: membership,
                snapshot_id,
            };
            let file = files.replace_current(meta.last_log_id, |out| {
                let mut header = capnp::message::Builder::new_default();
                write_snapshot_meta(header.init_root(), &meta);
                capnp::serialize::write_message(&mut *out, &header)
                    .map_err(|e| snap_err(ErrorVerb::Write, e))?;
                state::dump(&txn, out).map_err(|e| snap_err(ErrorVerb::Write, e))?;
                out.flush().map_err(|e| snap_err(ErrorVerb::Write, e))
            })?;
            snapshot_in(file)
        })
        .await
        .map_err(|e| snap_err(ErrorVerb::Write, e))??;
        tracing::info!(snapshot = %snapshot.meta.snapshot_id, "built a snapshot");
        Ok(snapshot)
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        applied_state_of(&self.state)
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Option<CommandResponse>>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let Some(last) = entries.last().map(|e| e.log_id) else {
            return Ok(Vec::new());
        };
        // The leader may have committed entries it has not flushed yet (see
        // `super::durable`): nothing is answered or observed before they are on disk.
        self.durable.wait_for(last.index).await?;
        // Raft's tasks share the RPC thread, and openraft keeps one request in flight
        // per follower: a leader's next entry for a follower waits for the answer to the
        // last request. So what is ready goes out before this thread spends its time on
        // the state's transaction: on a follower, its answer to the append that carried
        // this commit (~69 -> ~28 µs); on the leader, the commit-only appends it sends
        // after each commit (a leader that applied first held its next entry back by
        // ~60 µs more at one client).
        tokio::task::yield_now().await;
        let state = self.state.clone();
        let observer = self.observer.clone();
        let state_flushed = self.state_flushed.clone();
        blocking(
            slow_to_apply(&entries),
            move || -> Result<Vec<Option<CommandResponse>>, StorageError> {
                // Set only by a membership entry in this batch.
                let mut membership = None;
                let mut txn = state.database().begin_write().map_err(sm_write)?;
                // Not fsynced: after a crash, openraft re-applies the committed entries
                // from the durable log (a snapshot first makes the state durable).
                txn.set_durability(redb::Durability::None)
                    .map_err(sm_write)?;
                let mut responses = Vec::with_capacity(entries.len());
                for entry in &entries {
                    responses.push(match &entry.payload {
                        EntryPayload::Blank => None,
                        EntryPayload::Normal(command) => {
                            Some(state::apply(&txn, command).map_err(|e| {
                                StorageError::from(StorageIOError::apply(entry.log_id, &e))
                            })?)
                        }
                        EntryPayload::Membership(m) => {
                            membership = Some(StoredMembership::new(Some(entry.log_id), m.clone()));
                            None
                        }
                    });
                }
                put_meta(&txn, &Some(last), membership.as_ref())?;
                let flush = state_flushed
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .due(STATE_FLUSH_INTERVAL);
                if flush {
                    txn.set_durability(redb::Durability::Immediate)
                        .map_err(sm_write)?;
                }
                txn.commit().map_err(sm_write)?;
                let changes: Vec<&CommandResponse> = responses
                    .iter()
                    .flatten()
                    .flat_map(CommandResponse::flatten)
                    .collect();
                observer.applied(last.index, &changes);
                Ok(responses)
            },
        )
        .await
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        SnapshotBuilder {
            state: self.state.clone(),
            snapshots: self.snapshots.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StorageError> {
        let path = self.snapshots.temporary("incoming");
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .await
            .map_err(|e| snap_err(ErrorVerb::Write, format!("{}: {e}", path.display())))?;
        if let Some(previous) = self.incoming.replace(path) {
            let _ = std::fs::remove_file(previous);
        }
        Ok(Box::new(file))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError> {
        let mut file = *snapshot;
        use tokio::io::AsyncWriteExt;
        file.flush()
            .await
            .map_err(|e| snap_err(ErrorVerb::Write, e))?;
        let file = file.into_std().await;
        let state = self.state.clone();
        let observer = self.observer.clone();
        let files = self.snapshots.clone();
        let incoming = self.incoming.take();
        let meta = meta.clone();
        tokio::task::spawn_blocking(move || -> Result<(), StorageError> {
            file.sync_all().map_err(|e| snap_err(ErrorVerb::Write, e))?;
            let mut reader = BufReader::new(&file);
            reader
                .seek(SeekFrom::Start(0))
                .map_err(|e| snap_err(ErrorVerb::Read, e))?;
            let header = read_header(&mut reader)?;
            if header.last_log_id != meta.last_log_id {
                return Err(snap_err(
                    ErrorVerb::Read,
                    format!(
                        "snapshot file is of {:?}, expected {:?}",
                        header.last_log_id, meta.last_log_id
                    ),
                ));
            }
            let txn = state.database().begin_write().map_err(sm_write)?;
            state::restore(&txn, &mut reader).map_err(|e| snap_err(ErrorVerb::Read, e))?;
            put_meta(&txn, &meta.last_log_id, Some(&meta.last_membership))?;
            txn.commit().map_err(sm_write)?;
            // Keep the received data as this node's current snapshot. (Copied: the data
            // need not be in the file `begin_receiving_snapshot` made.)
            let mut reader = BufReader::new(&file);
            reader
                .seek(SeekFrom::Start(0))
                .map_err(|e| snap_err(ErrorVerb::Read, e))?;
            files.replace_current(meta.last_log_id, |out| {
                std::io::copy(&mut reader, out)
                    .map(|_| ())
                    .map_err(|e| snap_err(ErrorVerb::Write, e))
            })?;
            if let Some(path) = incoming {
                let _ = std::fs::remove_file(path);
            }
            observer.replaced(meta.last_log_id.map_or(0, |id| id.index));
            tracing::info!(snapshot = %meta.snapshot_id, "installed a snapshot");
            Ok(())
        })
        .await
        .map_err(sm_write)?
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let path = self.snapshots.current();
        if !path.exists() {
            return Ok(None);
        }
        let snapshot = tokio::task::spawn_blocking(move || {
            let file = std::fs::File::open(&path)
                .map_err(|e| snap_err(ErrorVerb::Read, format!("{}: {e}", path.display())))?;
            snapshot_in(file)
        })
        .await
        .map_err(|e| snap_err(ErrorVerb::Read, e))??;
        Ok(Some(snapshot))
    }
}

#[cfg(test)]
mod tests {
    use std::io::BufReader;
    use std::sync::Arc;

    use openraft::storage::RaftStateMachine;
    use openraft::RaftSnapshotBuilder;

    use super::{read_header, StateMachine};
    use crate::consensus::LogStore;
    use crate::state::{NoObserver, State};

    /// A build that began before an install and ends after it leaves the installed,
    /// newer snapshot as the current one; what it wrote stays readable for openraft.
    #[test]
    fn an_older_snapshot_does_not_replace_a_newer_current_one() -> anyhow::Result<()> {
        use std::io::Write;

        use super::{snapshot_in, SnapshotFiles, SnapshotMeta};
        use crate::consensus::codec::write_snapshot_meta;

        let dir = tempfile::tempdir()?;
        let files = SnapshotFiles {
            dir: dir.path().to_path_buf(),
            next: std::sync::atomic::AtomicU64::new(0),
            replacing: std::sync::Mutex::new(()),
        };
        let at = |index| SnapshotMeta {
            last_log_id: Some(openraft::LogId::new(
                openraft::CommittedLeaderId::new(1, 1),
                index,
            )),
            last_membership: Default::default(),
            snapshot_id: format!("at-{index}"),
        };
        let replace = |meta: SnapshotMeta| {
            files.replace_current(meta.last_log_id, |out| {
                let mut header = capnp::message::Builder::new_default();
                write_snapshot_meta(header.init_root(), &meta);
                capnp::serialize::write_message(&mut *out, &header)
                    .map_err(|e| super::snap_err(openraft::ErrorVerb::Write, e))?;
                out.flush()
                    .map_err(|e| super::snap_err(openraft::ErrorVerb::Write, e))
            })
        };
        let current_id = || -> anyhow::Result<String> {
            let file = std::fs::File::open(files.current())?;
            Ok(read_header(&mut BufReader::new(file))?.snapshot_id)
        };

        replace(at(9))?;
        let older = replace(at(5))?;
        assert_eq!(current_id()?, "at-9");
        assert_eq!(snapshot_in(older)?.meta.snapshot_id, "at-5");
        replace(at(12))?;
        assert_eq!(current_id()?, "at-12");
        let left: Vec<_> = std::fs::read_dir(dir.path())?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        assert_eq!(left, ["current.snap"], "no temporary files are left");
        Ok(())
    }

    /// A snapshot handed out while new ones are being built streams the data its
    /// metadata describes (a follower refuses a snapshot whose data is of another
    /// log id).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_snapshot_handed_out_during_builds_matches_its_metadata() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let state = State::open(&dir.path().join("wafer.redb"))?;
        let log = LogStore::open(
            state.database().clone(),
            &dir.path().join("raft-log.wal"),
            0,
        )?;
        let mut sm = StateMachine::open(
            state,
            &dir.path().join("snapshots"),
            Arc::new(NoObserver),
            log.durable(),
        )?;
        sm.get_snapshot_builder().await.build_snapshot().await?;
        let mut builder = sm.get_snapshot_builder().await;
        const BUILDS: usize = 200;
        let building = tokio::spawn(async move {
            for _ in 0..BUILDS {
                builder.build_snapshot().await?;
            }
            Ok::<_, anyhow::Error>(())
        });
        let mut checked = 0;
        while !building.is_finished() || checked == 0 {
            let snapshot = sm
                .get_current_snapshot()
                .await?
                .ok_or_else(|| anyhow::anyhow!("no current snapshot"))?;
            let file = snapshot.snapshot.into_std().await;
            let header = read_header(&mut BufReader::new(file))?;
            assert_eq!(header.snapshot_id, snapshot.meta.snapshot_id);
            checked += 1;
        }
        building.await??;
        Ok(())
    }
}
