//! The Raft log in its own redb file: entries by index, the vote, the committed log id
//! and the last purged log id. The leader's appends of its own entries are queued and
//! written and flushed in the background ([`super::durable`] says why that is safe);
//! every other write (a follower's appends, membership entries, the vote, truncations,
//! purges) writes the queue too and is durable when it returns. Appends are made durable
//! through the log's write-ahead file beside it ([`super::wal`]: one sequential write
//! and one `fdatasync` instead of a durable redb commit's scattered pages). The committed
//! log id is a restart hint kept in memory and written with the next write at most once
//! a second (a write of it adds its pages to a flush, and an `fdatasync` costs more the
//! more scattered pages it writes).
//!
//! The log has a file of its own so that applying committed entries to the state (in
//! the node's state file) never waits for the log's write lock while the next entries
//! are flushed.

use std::fmt::Debug;
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{EntryPayload, OptionalSend, StorageIOError};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::de::DeserializeOwned;

use super::codec::{decode_entry, encode_entry};
use super::durable::{DurableLog, Flusher, Queued, Shared};
use super::wal::Wal;
use super::{Entry, LogId, NodeId, StorageError, TypeConfig, Vote};

/// Log index -> entry (`Entry` in raft.capnp).
pub(super) const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
/// Key -> JSON value: `vote`, `committed`, `last_purged`.
pub(super) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_log_meta");

const VOTE: &str = "vote";
pub(super) const COMMITTED: &str = "committed";
const LAST_PURGED: &str = "last_purged";

/// The Raft log storage. Cheap to clone: clones share the database and the queue.
#[derive(Clone)]
pub struct LogStore {
    /// This node: appends of entries it made as the leader are flushed in the background.
    id: NodeId,
    /// The vote last saved.
    vote: Arc<Mutex<Option<Vote>>>,
    flusher: Flusher,
}

fn locked<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl LogStore {
    /// Opens (creating it if need be) the log of node `id` in the redb file at `path`,
    /// with its write-ahead file beside it (`raft-log.wal` for `raft-log.redb`). A log
    /// that an older wafer kept in the node's state file `legacy` is moved into it first.
    pub fn open_file(path: &Path, legacy: &Database, id: NodeId) -> Result<LogStore, StorageError> {
        let db = Database::create(path).map_err(write_err)?;
        migrate(legacy, &db)?;
        LogStore::open(Arc::new(db), &LogStore::wal_path(path), id)
    }

    /// The write-ahead file of the log in the redb file at `path`.
    fn wal_path(path: &Path) -> PathBuf {
        path.with_extension("wal")
    }

    /// Whether the state file `legacy` holds a log that [`LogStore::open_file`] moves.
    pub fn kept_in(legacy: &Database) -> bool {
        legacy
            .begin_read()
            .is_ok_and(|txn| txn.open_table(LOG).is_ok())
    }

    /// Opens the log of node `id` in `db` with its write-ahead file at `wal` (see
    /// [`super::wal`]; created when the log has none yet), creating its tables,
    /// replaying the file, and starts its flusher thread.
    pub fn open(db: Arc<Database>, wal: &Path, id: NodeId) -> Result<LogStore, StorageError> {
        let txn = db.begin_write().map_err(write_err)?;
        txn.open_table(LOG).map_err(write_err)?;
        txn.open_table(META).map_err(write_err)?;
        txn.commit().map_err(write_err)?;
        let wal = Wal::open(wal, &db).map_err(write_err)?;
        let appended = last_log_id(&db)?;
        let flusher = Flusher::start(db, wal, appended).map_err(write_err)?;
        let mut store = LogStore {
            id,
            vote: Arc::default(),
            flusher,
        };
        let vote = store.get_meta::<Vote>(VOTE)?;
        store.vote = Arc::new(Mutex::new(vote));
        Ok(store)
    }

    fn shared(&self) -> &Shared {
        &self.flusher.shared
    }

    fn db(&self) -> &Database {
        &self.flusher.shared.db
    }

    /// How far the log is durable, for the state machine and the network.
    pub fn durable(&self) -> DurableLog {
        self.flusher.view()
    }

    /// Whether `entries` are this node's own as the leader of the current vote, so their
    /// append may be flushed in the background. Entries that change the membership are
    /// not: the next change must only follow one that is durably committed.
    fn own_entries(&self, entries: &[Entry]) -> bool {
        let vote = *locked(&self.vote);
        let Some(vote) = vote else {
            return false;
        };
        vote.is_committed()
            && vote.leader_id().voted_for() == Some(self.id)
            && entries.iter().all(|entry| {
                entry.log_id.leader_id == *vote.leader_id()
                    && !matches!(entry.payload, EntryPayload::Membership(_))
            })
    }

    /// Appends `entries`: the leader's own (unless `durably`) to the queue the flusher
    /// thread writes, the others durably, with whatever is queued before them.
    fn write_entries(&self, entries: Vec<Entry>, durably: bool) -> Result<(), StorageError> {
        let Some(last) = entries.last().map(|entry| entry.log_id) else {
            return Ok(());
        };
        if !durably && self.own_entries(&entries) {
            let queued = entries
                .into_iter()
                .map(|entry| {
                    let bytes = Arc::from(encode_entry(&entry));
                    Queued { entry, bytes }
                })
                .collect();
            self.flusher.enqueue(queued);
            return Ok(());
        }
        let encoded: Vec<(u64, Vec<u8>)> = entries
            .iter()
            .map(|entry| (entry.log_id.index, encode_entry(entry)))
            .collect();
        self.shared()
            .append(Some(last), false, &encoded)
            .map_err(write_err)?;
        self.shared().set_appended(Some(last));
        Ok(())
    }

    /// Writes what is queued and `write`'s changes in one durable transaction.
    fn write_durably(
        &self,
        write: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
    ) -> Result<(), StorageError> {
        self.shared().write(write).map_err(write_err)
    }

    fn get_meta<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StorageError> {
        let txn = self.db().begin_read().map_err(read_err)?;
        let table = txn.open_table(META).map_err(read_err)?;
        match table.get(key).map_err(read_err)? {
            Some(value) => Ok(Some(
                serde_json::from_slice(value.value()).map_err(read_err)?,
            )),
            None => Ok(None),
        }
    }
}

/// Moves a log that an older wafer kept in the state file `legacy` into `db`, when
/// `db` has none yet, then drops it from `legacy`. Each step is one durable
/// transaction: a crash between them leaves the copy in `db`, and the next start
/// drops the old one.
fn migrate(legacy: &Database, db: &Database) -> Result<(), StorageError> {
    let read = legacy.begin_read().map_err(read_err)?;
    let (old_log, old_meta) = match (read.open_table(LOG), read.open_table(META)) {
        (Ok(log), Ok(meta)) => (log, meta),
        // Never had one (or only a part: nothing to move).
        _ => return Ok(()),
    };
    let txn = db.begin_write().map_err(write_err)?;
    let fresh = {
        let log = txn.open_table(LOG).map_err(write_err)?;
        let meta = txn.open_table(META).map_err(write_err)?;
        log.is_empty().map_err(read_err)? && meta.is_empty().map_err(read_err)?
    };
    if fresh {
        let mut log = txn.open_table(LOG).map_err(write_err)?;
        for item in old_log.iter().map_err(read_err)? {
            let (index, value) = item.map_err(read_err)?;
            log.insert(index.value(), value.value())
                .map_err(write_err)?;
        }
        let mut meta = txn.open_table(META).map_err(write_err)?;
        for item in old_meta.iter().map_err(read_err)? {
            let (key, value) = item.map_err(read_err)?;
            // The generation of another log's write-ahead file (the copy is whole).
            if key.value() == super::wal::GENERATION {
                continue;
            }
            meta.insert(key.value(), value.value()).map_err(write_err)?;
        }
    }
    txn.commit().map_err(write_err)?;
    drop((old_log, old_meta, read));
    let txn = legacy.begin_write().map_err(write_err)?;
    txn.delete_table(LOG).map_err(write_err)?;
    txn.delete_table(META).map_err(write_err)?;
    txn.commit().map_err(write_err)?;
    if fresh {
        tracing::info!("moved the Raft log into a file of its own");
    }
    Ok(())
}

/// The id of the last entry written to the log, or the last purged one when it is empty.
fn last_log_id(db: &Database) -> Result<Option<LogId>, StorageError> {
    let txn = db.begin_read().map_err(read_err)?;
    let table = txn.open_table(LOG).map_err(read_err)?;
    if let Some((_, value)) = table.last().map_err(read_err)? {
        return Ok(Some(decode_entry(value.value()).map_err(read_err)?.log_id));
    }
    let meta = txn.open_table(META).map_err(read_err)?;
    match meta.get(LAST_PURGED).map_err(read_err)? {
        Some(value) => {
            Ok(serde_json::from_slice::<Option<LogId>>(value.value()).map_err(read_err)?)
        }
        None => Ok(None),
    }
}

fn read_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::read_logs(&e).into()
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write_logs(&e).into()
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        // The queue first: an entry the flusher writes meanwhile leaves the queue only
        // after its transaction commits, so it is found in one place or the other.
        let (queued, first_queued) = {
            let queue = self.shared().queue();
            let first = queue.entries.front().map(|q| q.entry.log_id.index);
            let queued: Vec<Entry> = queue
                .entries
                .iter()
                .filter(|q| range.contains(&q.entry.log_id.index))
                .map(|q| q.entry.clone())
                .collect();
            (queued, first)
        };
        let txn = self.db().begin_read().map_err(read_err)?;
        let table = txn.open_table(LOG).map_err(read_err)?;
        let mut entries = Vec::new();
        for item in table.range(range).map_err(read_err)? {
            let (index, value) = item.map_err(read_err)?;
            // What the queue holds comes from the queue.
            if first_queued.is_some_and(|first| index.value() >= first) {
                break;
            }
            entries.push(decode_entry(value.value()).map_err(read_err)?);
        }
        entries.extend(queued);
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged: Option<LogId> = self.get_meta(LAST_PURGED)?;
        let queued = self.shared().queue().entries.back().map(|q| q.entry.log_id);
        let last_log_id = match queued {
            Some(id) => Some(id),
            None => last_log_id(self.db())?,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> LogStore {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let bytes = serde_json::to_vec(vote).map_err(write_err)?;
        // Durable, and with it every queued append before it: a node that stops leading
        // saves a new vote before it answers another leader.
        self.write_durably(|txn| {
            txn.open_table(META)?.insert(VOTE, bytes.as_slice())?;
            Ok(())
        })
        .map_err(|e| StorageError::from(StorageIOError::write_vote(&e)))?;
        *locked(&self.vote) = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.get_meta(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // A hint for restarts (what to re-apply): losing the latest one is harmless, so
        // it waits for a later write to carry it.
        self.shared().queue().committed = Some(committed);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        let unsaved = self.shared().queue().committed;
        match unsaved {
            Some(committed) => Ok(committed),
            None => Ok(self.get_meta::<Option<LogId>>(COMMITTED)?.flatten()),
        }
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        // Raft runs on the node's RPC thread: bulky entries (modules, job inputs) are
        // encoded and written durably off it, so that it keeps serving meanwhile.
        let written = if super::bulk_bytes(&entries) > super::OFF_THREAD_BYTES {
            let store = self.clone();
            tokio::task::spawn_blocking(move || store.write_entries(entries, true))
                .await
                .unwrap_or_else(|e| Err(write_err(e)))
        } else {
            self.write_entries(entries, false)
        };
        callback.log_io_completed(
            written
                .as_ref()
                .map(|_| ())
                .map_err(|e| std::io::Error::other(e.to_string())),
        );
        written
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Queued entries from `log_id` on are dropped unwritten.
        self.shared()
            .queue()
            .entries
            .retain(|q| q.entry.log_id.index < log_id.index);
        self.write_durably(|txn| {
            txn.open_table(LOG)?
                .retain_in(log_id.index.., |_, _| false)?;
            Ok(())
        })?;
        // Everything is written now: the queue was, in the same transaction.
        self.shared().set_all_durable(last_log_id(self.db())?);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let bytes = serde_json::to_vec(&Some(log_id)).map_err(write_err)?;
        self.write_durably(|txn| {
            txn.open_table(META)?
                .insert(LAST_PURGED, bytes.as_slice())?;
            txn.open_table(LOG)?
                .retain_in(..=log_id.index, |_, _| false)?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use openraft::Membership;

    use super::*;
    use crate::consensus::codec::new_log_id;
    use crate::consensus::NodeAddr;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn blank(term: u64, leader: NodeId, index: u64) -> Entry {
        Entry {
            log_id: new_log_id(term, leader, index),
            payload: EntryPayload::Blank,
        }
    }

    /// The log of node 1 in a fresh redb file.
    fn open(dir: &tempfile::TempDir) -> Result<LogStore, Box<dyn std::error::Error>> {
        let db = Arc::new(Database::create(dir.path().join("log.redb"))?);
        Ok(LogStore::open(db, &dir.path().join("log.wal"), 1)?)
    }

    #[tokio::test]
    async fn the_leaders_own_entries_are_flushed_in_the_background() -> TestResult {
        let dir = tempfile::tempdir()?;
        let mut log = open(&dir)?;
        log.save_vote(&Vote::new_committed(2, 1)).await?;
        let own = vec![blank(2, 1, 1), blank(2, 1, 2)];
        assert!(log.own_entries(&own));
        log.write_entries(own, false)?;
        // Readable at once, durable once the flusher thread is done.
        assert_eq!(log.try_get_log_entries(1..=2).await?.len(), 2);
        let durable = log.durable();
        durable.wait_for(2).await?;
        assert_eq!(durable.upto(), Some(new_log_id(2, 1, 2)));
        // Followers hear of commits only as far as the leader's log is durable.
        let flushed = Some(new_log_id(2, 1, 2));
        assert_eq!(durable.clamp(flushed, false).await, flushed);
        assert_eq!(
            durable.clamp(Some(new_log_id(2, 1, 5)), false).await,
            flushed
        );
        assert_eq!(durable.clamp(None, false).await, None);
        // A later flush of nothing new changes nothing.
        durable.wait_for(1).await?;
        assert_eq!(durable.upto(), flushed);
        Ok(())
    }

    #[tokio::test]
    async fn other_appends_are_durable_when_they_return() -> TestResult {
        let dir = tempfile::tempdir()?;
        let mut log = open(&dir)?;
        let durable = log.durable();
        let membership = Membership::new(
            vec![BTreeSet::from([1, 2, 3])],
            BTreeMap::from([1, 2, 3].map(|id| (id, NodeAddr::default()))),
        );
        let change = Entry {
            log_id: new_log_id(2, 1, 1),
            payload: EntryPayload::Membership(membership),
        };

        // No vote yet, a candidate's vote, another leader's entries.
        assert!(!log.own_entries(&[blank(2, 1, 1)]));
        log.save_vote(&Vote::new(2, 1)).await?;
        assert!(!log.own_entries(&[blank(2, 1, 1)]));
        log.save_vote(&Vote::new_committed(2, 1)).await?;
        assert!(log.own_entries(&[blank(2, 1, 1)]));
        assert!(!log.own_entries(&[blank(1, 1, 1)]), "an earlier term's");
        assert!(!log.own_entries(&[blank(2, 1, 1), change.clone()]));

        // A membership change is on disk when its append returns.
        log.write_entries(vec![change], false)?;
        assert_eq!(durable.upto(), Some(new_log_id(2, 1, 1)));

        // So is a follower's append, and a vote flushes what the leader left unflushed.
        log.write_entries(vec![blank(2, 1, 2)], false)?;
        log.save_vote(&Vote::new_committed(3, 2)).await?;
        assert_eq!(durable.upto(), Some(new_log_id(2, 1, 2)));
        log.write_entries(vec![blank(3, 2, 3)], false)?;
        assert_eq!(durable.upto(), Some(new_log_id(3, 2, 3)));

        // A truncation takes the durable mark back to the last entry kept.
        log.truncate(new_log_id(3, 2, 3)).await?;
        assert_eq!(durable.upto(), Some(new_log_id(2, 1, 2)));
        Ok(())
    }

    #[tokio::test]
    async fn the_committed_hint_is_written_with_the_next_append() -> TestResult {
        let dir = tempfile::tempdir()?;
        let mut log = open(&dir)?;
        log.write_entries(vec![blank(1, 1, 1)], false)?;
        log.save_committed(Some(new_log_id(1, 1, 1))).await?;
        assert_eq!(log.read_committed().await?, Some(new_log_id(1, 1, 1)));
        assert_eq!(log.get_meta::<Option<LogId>>(COMMITTED)?, None);
        log.write_entries(vec![blank(1, 1, 2)], false)?;
        assert_eq!(
            log.get_meta::<Option<LogId>>(COMMITTED)?,
            Some(Some(new_log_id(1, 1, 1)))
        );
        Ok(())
    }

    fn indexes(entries: &[Entry]) -> Vec<u64> {
        entries.iter().map(|e| e.log_id.index).collect()
    }

    #[tokio::test]
    async fn queued_and_written_entries_read_as_one_log() -> TestResult {
        let dir = tempfile::tempdir()?;
        let mut log = open(&dir)?;
        log.save_vote(&Vote::new_committed(2, 1)).await?;
        log.write_entries(vec![blank(2, 1, 1), blank(2, 1, 2)], true)?;
        log.write_entries(vec![blank(2, 1, 3), blank(2, 1, 4)], false)?;
        let state = log.get_log_state().await?;
        assert_eq!(state.last_log_id, Some(new_log_id(2, 1, 4)));
        for _ in 0..2 {
            // Queued (maybe), then surely written: the same log either way.
            assert_eq!(
                indexes(&log.try_get_log_entries(1..=4).await?),
                [1, 2, 3, 4]
            );
            assert_eq!(indexes(&log.try_get_log_entries(2..4).await?), [2, 3]);
            assert_eq!(indexes(&log.try_get_log_entries(3..).await?), [3, 4]);
            assert_eq!(indexes(&log.try_get_log_entries(..2).await?), [1]);
            assert!(log.try_get_log_entries(5..).await?.is_empty());
            log.durable().wait_for(4).await?;
        }
        assert_eq!(log.durable().upto(), Some(new_log_id(2, 1, 4)));
        Ok(())
    }

    #[tokio::test]
    async fn a_truncation_drops_queued_entries() -> TestResult {
        let dir = tempfile::tempdir()?;
        let mut log = open(&dir)?;
        log.save_vote(&Vote::new_committed(2, 1)).await?;
        log.write_entries(vec![blank(2, 1, 1), blank(2, 1, 2), blank(2, 1, 3)], false)?;
        log.truncate(new_log_id(2, 1, 2)).await?;
        assert_eq!(indexes(&log.try_get_log_entries(..).await?), [1]);
        assert_eq!(
            log.get_log_state().await?.last_log_id,
            Some(new_log_id(2, 1, 1))
        );
        assert_eq!(log.durable().upto(), Some(new_log_id(2, 1, 1)));
        // The next entries follow the one kept.
        log.write_entries(vec![blank(2, 1, 2)], false)?;
        log.durable().wait_for(2).await?;
        assert_eq!(indexes(&log.try_get_log_entries(..).await?), [1, 2]);
        Ok(())
    }

    #[tokio::test]
    async fn a_log_kept_in_the_state_file_moves_into_a_file_of_its_own() -> TestResult {
        let dir = tempfile::tempdir()?;
        let legacy = Arc::new(Database::create(dir.path().join("wafer.redb"))?);
        {
            let mut old = LogStore::open(legacy.clone(), &dir.path().join("wafer.wal"), 1)?;
            old.save_vote(&Vote::new_committed(3, 1)).await?;
            old.write_entries(vec![blank(3, 1, 1), blank(3, 1, 2), blank(3, 1, 3)], true)?;
            old.purge(new_log_id(3, 1, 1)).await?;
        }
        let path = dir.path().join("raft-log.redb");
        {
            let mut log = LogStore::open_file(&path, &legacy, 1)?;
            assert_eq!(log.read_vote().await?, Some(Vote::new_committed(3, 1)));
            assert_eq!(indexes(&log.try_get_log_entries(..).await?), [2, 3]);
            let state = log.get_log_state().await?;
            assert_eq!(state.last_purged_log_id, Some(new_log_id(3, 1, 1)));
            assert_eq!(state.last_log_id, Some(new_log_id(3, 1, 3)));
        }
        // Gone from the state file; a second start finds it in its own.
        let txn = legacy.begin_read()?;
        assert!(txn.open_table(LOG).is_err());
        drop(txn);
        // The first store's flusher thread lets go of the file once it sees the store
        // gone.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut log = loop {
            match LogStore::open_file(&path, &legacy, 1) {
                Ok(log) => break log,
                Err(e) if std::time::Instant::now() < deadline => {
                    assert!(e.to_string().contains("already open"), "{e}");
                    std::thread::yield_now();
                }
                Err(e) => return Err(e.into()),
            }
        };
        assert_eq!(indexes(&log.try_get_log_entries(..).await?), [2, 3]);
        Ok(())
    }
}
