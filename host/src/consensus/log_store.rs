//! The Raft log in the node's redb file: entries by index, the vote, the committed log
//! id and the last purged log id. Appends, the vote, truncations and purges are durable
//! (fsynced) when they return; the committed log id is a restart hint written without
//! an fsync of its own (the next durable write persists it).
//!
//! openraft 0.9 waits for each append to be flushed before it appends again, so there is
//! nothing to gain from flushing in the background: appends are flushed inline, and
//! concurrent proposals are batched into one entry before they reach the log
//! (`crate::cluster`).

use std::fmt::Debug;
use std::ops::RangeBounds;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{OptionalSend, StorageIOError};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::codec::{decode_entry, encode_entry};
use super::{Entry, LogId, StorageError, TypeConfig, Vote};

/// Makes every commit so far durable: an empty commit with immediate durability
/// persists the non-durable commits before it.
pub(super) fn durable_barrier(db: &Database) -> Result<(), redb::Error> {
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate).map_err(|e| {
        redb::Error::from(redb::StorageError::Io(std::io::Error::other(e.to_string())))
    })?;
    txn.commit()?;
    Ok(())
}

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
}

impl LogStore {
    /// Opens the log in `db`, creating its tables.
    pub fn open(db: Arc<Database>) -> Result<LogStore, StorageError> {
        let txn = db.begin_write().map_err(write_err)?;
        txn.open_table(LOG).map_err(write_err)?;
        txn.open_table(META).map_err(write_err)?;
        txn.commit().map_err(write_err)?;
        Ok(LogStore { db })
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

    fn put_meta<T: Serialize>(
        &self,
        key: &str,
        value: &T,
        durability: Durability,
    ) -> Result<(), StorageError> {
        let bytes = serde_json::to_vec(value).map_err(write_err)?;
        let mut txn = self.db.begin_write().map_err(write_err)?;
        txn.set_durability(durability).map_err(write_err)?;
        txn.open_table(META)
            .map_err(write_err)?
            .insert(key, bytes.as_slice())
            .map_err(write_err)?;
        txn.commit().map_err(write_err)?;
        Ok(())
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
        let txn = self.db.begin_read().map_err(read_err)?;
        let table = txn.open_table(LOG).map_err(read_err)?;
        let last = match table.last().map_err(read_err)? {
            Some((_, value)) => Some(decode_entry(value.value()).map_err(read_err)?.log_id),
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> LogStore {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.put_meta(VOTE, vote, Durability::Immediate)
            .map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.get_meta(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // A hint for restarts (what to re-apply): losing the latest one is harmless.
        self.put_meta(COMMITTED, &committed, Durability::None)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.get_meta::<Option<LogId>>(COMMITTED)?.flatten())
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
        let txn = self.db.begin_write().map_err(write_err)?;
        {
            let mut table = txn.open_table(LOG).map_err(write_err)?;
            for entry in entries {
                table
                    .insert(entry.log_id.index, encode_entry(&entry).as_slice())
                    .map_err(write_err)?;
            }
        }
        let result = txn
            .commit()
            .map_err(|e| std::io::Error::other(e.to_string()));
        let failed = result
            .as_ref()
            .err()
            .map(|e| write_err(std::io::Error::other(e.to_string())));
        callback.log_io_completed(result);
        match failed {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let txn = self.db.begin_write().map_err(write_err)?;
        {
            let mut table = txn.open_table(LOG).map_err(write_err)?;
            table
                .retain_in(log_id.index.., |_, _| false)
                .map_err(write_err)?;
        }
        txn.commit().map_err(write_err)?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let bytes = serde_json::to_vec(&Some(log_id)).map_err(write_err)?;
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
        txn.commit().map_err(write_err)?;
        Ok(())
    }
}
