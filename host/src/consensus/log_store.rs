//! The Raft log in the node's redb file: entries by index, the vote, the committed log
//! id and the last purged log id. The leader's appends of its own entries are flushed in
//! the background ([`super::durable`] says why that is safe); every other write (a
//! follower's appends, membership entries, the vote, truncations, purges) is durable
//! (fsynced) when it returns. The committed log id is a restart hint kept in memory and
//! written with the next append (a transaction of its own would add its pages to every
//! flush, and an `fdatasync` costs more the more scattered pages it writes).

use std::fmt::Debug;
use std::ops::RangeBounds;
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{EntryPayload, OptionalSend, StorageIOError};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;

use super::codec::{decode_entry, encode_entry};
use super::durable::{DurableLog, Flusher, Writes};
use super::{Entry, LogId, NodeId, StorageError, TypeConfig, Vote};

/// Log index -> entry (`Entry` in raft.capnp).
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
/// Key -> JSON value: `vote`, `committed`, `last_purged`.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_log_meta");

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const LAST_PURGED: &str = "last_purged";

/// The Raft log storage. Cheap to clone: clones share the database.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    /// This node: appends of entries it made as the leader are flushed in the background.
    id: NodeId,
    /// The vote last saved.
    vote: Arc<Mutex<Option<Vote>>>,
    /// The committed log id saved since the last write that carried it (`None`: none).
    unsaved_committed: Arc<Mutex<Option<Option<LogId>>>>,
    flusher: Flusher,
}

fn locked<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl LogStore {
    /// Opens the log of node `id` in `db`, creating its tables, and starts its flusher
    /// thread.
    pub fn open(db: Arc<Database>, id: NodeId) -> Result<LogStore, StorageError> {
        let txn = db.begin_write().map_err(write_err)?;
        txn.open_table(LOG).map_err(write_err)?;
        txn.open_table(META).map_err(write_err)?;
        txn.commit().map_err(write_err)?;
        let appended = last_log_id(&db)?;
        let flusher = Flusher::start(db.clone(), appended).map_err(write_err)?;
        let mut store = LogStore {
            db,
            id,
            vote: Arc::default(),
            unsaved_committed: Arc::default(),
            flusher,
        };
        let vote = store.get_meta::<Vote>(VOTE)?;
        store.vote = Arc::new(Mutex::new(vote));
        Ok(store)
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

    /// The committed log id not yet written, taken to be written now.
    fn take_unsaved_committed(&self) -> Option<Option<LogId>> {
        locked(&self.unsaved_committed).take()
    }

    /// Appends `entries`: durably, or, for the leader's own entries, at once with a
    /// flush in the background (see [`super::durable`]).
    fn write_entries(&self, entries: Vec<Entry>) -> Result<(), StorageError> {
        let Some(last) = entries.last().map(|entry| entry.log_id) else {
            return Ok(());
        };
        let background = self.own_entries(&entries);
        let mut writes = self.flusher.lock();
        let mut txn = self.db.begin_write().map_err(write_err)?;
        if background {
            txn.set_durability(Durability::None).map_err(write_err)?;
        }
        {
            // A committed log id always names an entry appended before it.
            if let Some(committed) = self.take_unsaved_committed() {
                let bytes = serde_json::to_vec(&committed).map_err(write_err)?;
                txn.open_table(META)
                    .map_err(write_err)?
                    .insert(COMMITTED, bytes.as_slice())
                    .map_err(write_err)?;
            }
            let mut table = txn.open_table(LOG).map_err(write_err)?;
            for entry in &entries {
                table
                    .insert(entry.log_id.index, encode_entry(entry).as_slice())
                    .map_err(write_err)?;
            }
        }
        txn.commit().map_err(write_err)?;
        writes.appended = Some(last);
        if background {
            self.flusher.appended(&writes);
        } else {
            self.flusher.durable(&writes);
        }
        Ok(())
    }

    fn get_meta<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StorageError> {
        let txn = self.db.begin_read().map_err(read_err)?;
        let table = txn.open_table(META).map_err(read_err)?;
        match table.get(key).map_err(read_err)? {
            Some(value) => Ok(Some(
                serde_json::from_slice(value.value()).map_err(read_err)?,
            )),
            None => Ok(None),
        }
    }

    /// Commits `txn` durably under the write lock `writes`, then records that
    /// everything appended is on disk.
    fn commit_durably(
        &self,
        txn: redb::WriteTransaction,
        writes: &Writes,
    ) -> Result<(), StorageError> {
        txn.commit().map_err(write_err)?;
        self.flusher.durable(writes);
        Ok(())
    }
}

/// The id of the last entry in the log, or the last purged one when it is empty.
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
        let txn = self.db.begin_read().map_err(read_err)?;
        let table = txn.open_table(LOG).map_err(read_err)?;
        let mut entries = Vec::new();
        for item in table.range(range).map_err(read_err)? {
            let (_, value) = item.map_err(read_err)?;
            entries.push(decode_entry(value.value()).map_err(read_err)?);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged: Option<LogId> = self.get_meta(LAST_PURGED)?;
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last_log_id(&self.db)?,
        })
    }

    async fn get_log_reader(&mut self) -> LogStore {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let bytes = serde_json::to_vec(vote).map_err(write_err)?;
        let writes = self.flusher.lock();
        let vote_err = |e: StorageError| StorageError::from(StorageIOError::write_vote(&e));
        let txn = self.db.begin_write().map_err(write_err).map_err(vote_err)?;
        txn.open_table(META)
            .map_err(write_err)
            .map_err(vote_err)?
            .insert(VOTE, bytes.as_slice())
            .map_err(write_err)
            .map_err(vote_err)?;
        // Durable, and with it every append before it: a node that stops leading saves
        // a new vote before it answers another leader.
        self.commit_durably(txn, &writes).map_err(vote_err)?;
        *locked(&self.vote) = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.get_meta(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // A hint for restarts (what to re-apply): losing the latest one is harmless, so
        // it waits for the next append to carry it.
        *locked(&self.unsaved_committed) = Some(committed);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        let unsaved = *locked(&self.unsaved_committed);
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
        // written off it, so that it keeps serving meanwhile.
        let written = if super::bulk_bytes(&entries) > super::OFF_THREAD_BYTES {
            let store = self.clone();
            tokio::task::spawn_blocking(move || store.write_entries(entries))
                .await
                .unwrap_or_else(|e| Err(write_err(e)))
        } else {
            self.write_entries(entries)
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
        let mut writes = self.flusher.lock();
        let txn = self.db.begin_write().map_err(write_err)?;
        {
            let mut table = txn.open_table(LOG).map_err(write_err)?;
            table
                .retain_in(log_id.index.., |_, _| false)
                .map_err(write_err)?;
        }
        txn.commit().map_err(write_err)?;
        writes.appended = last_log_id(&self.db)?;
        self.flusher.durable(&writes);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let bytes = serde_json::to_vec(&Some(log_id)).map_err(write_err)?;
        let writes = self.flusher.lock();
        let txn = self.db.begin_write().map_err(write_err)?;
        {
            let mut meta = txn.open_table(META).map_err(write_err)?;
            meta.insert(LAST_PURGED, bytes.as_slice())
                .map_err(write_err)?;
            let mut table = txn.open_table(LOG).map_err(write_err)?;
            table
                .retain_in(..=log_id.index, |_, _| false)
                .map_err(write_err)?;
        }
        self.commit_durably(txn, &writes)
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
        Ok(LogStore::open(db, 1)?)
    }

    #[tokio::test]
    async fn the_leaders_own_entries_are_flushed_in_the_background() -> TestResult {
        let dir = tempfile::tempdir()?;
        let mut log = open(&dir)?;
        log.save_vote(&Vote::new_committed(2, 1)).await?;
        let own = vec![blank(2, 1, 1), blank(2, 1, 2)];
        assert!(log.own_entries(&own));
        log.write_entries(own)?;
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
        log.write_entries(vec![change])?;
        assert_eq!(durable.upto(), Some(new_log_id(2, 1, 1)));

        // So is a follower's append, and a vote flushes what the leader left unflushed.
        log.write_entries(vec![blank(2, 1, 2)])?;
        log.save_vote(&Vote::new_committed(3, 2)).await?;
        assert_eq!(durable.upto(), Some(new_log_id(2, 1, 2)));
        log.write_entries(vec![blank(3, 2, 3)])?;
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
        log.write_entries(vec![blank(1, 1, 1)])?;
        log.save_committed(Some(new_log_id(1, 1, 1))).await?;
        assert_eq!(log.read_committed().await?, Some(new_log_id(1, 1, 1)));
        assert_eq!(log.get_meta::<Option<LogId>>(COMMITTED)?, None);
        log.write_entries(vec![blank(1, 1, 2)])?;
        assert_eq!(
            log.get_meta::<Option<LogId>>(COMMITTED)?,
            Some(Some(new_log_id(1, 1, 1)))
        );
        Ok(())
    }
}
