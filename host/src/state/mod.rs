//! The node's durable state in one redb file: deployed functions (name -> record) and
//! module blobs (digest -> bytes, shared by functions with the same module).

mod function;

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::digest::Digest;
pub use function::{FunctionName, FunctionRecord, FunctionSpec, InvalidName, MAX_NAME_LEN};

/// Function name -> JSON [`FunctionRecord`].
const FUNCTIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("functions");
/// Hex digest -> module bytes.
const BLOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("blobs");

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
}

fn storage<E: Into<redb::Error>>(e: E) -> StateError {
    StateError::Storage(e.into())
}

/// The node's durable state.
pub struct State {
    db: Database,
}

impl State {
    /// Opens (or creates) the state database at `path`.
    pub fn open(path: &Path) -> Result<State, StateError> {
        let db = Database::create(path).map_err(|source| StateError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let txn = db.begin_write().map_err(storage)?;
        txn.open_table(FUNCTIONS).map_err(storage)?;
        txn.open_table(BLOBS).map_err(storage)?;
        txn.commit().map_err(storage)?;
        Ok(State { db })
    }

    /// Stores a new version of function `name` with module `wasm`, replacing any earlier
    /// version, and returns its record. The module blob is kept once per digest.
    pub fn put_function(
        &self,
        name: &FunctionName,
        wasm: &[u8],
        spec: FunctionSpec,
        deployed_at_ms: u64,
    ) -> Result<FunctionRecord, StateError> {
        let digest = Digest::of(wasm);
        let txn = self.db.begin_write().map_err(storage)?;
        let record = {
            let mut functions = txn.open_table(FUNCTIONS).map_err(storage)?;
            let mut blobs = txn.open_table(BLOBS).map_err(storage)?;
            let previous = match functions.get(name.as_str()).map_err(storage)? {
                Some(bytes) => Some(decode(name.as_str(), bytes.value())?),
                None => None,
            };
            let record = FunctionRecord {
                name: name.clone(),
                version: previous.as_ref().map_or(1, |p| p.version + 1),
                digest,
                size: wasm.len() as u64,
                spec,
                deployed_at_ms,
            };
            let hex = digest.to_hex();
            if blobs.get(hex.as_str()).map_err(storage)?.is_none() {
                blobs.insert(hex.as_str(), wasm).map_err(storage)?;
            }
            let encoded = encode(&record)?;
            functions
                .insert(name.as_str(), encoded.as_slice())
                .map_err(storage)?;
            if let Some(previous) = previous {
                release_blob(&functions, &mut blobs, &previous.digest)?;
            }
            record
        };
        txn.commit().map_err(storage)?;
        Ok(record)
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

    /// Removes function `name`; returns its record if it existed.
    pub fn delete_function(
        &self,
        name: &FunctionName,
    ) -> Result<Option<FunctionRecord>, StateError> {
        let txn = self.db.begin_write().map_err(storage)?;
        let removed = {
            let mut functions = txn.open_table(FUNCTIONS).map_err(storage)?;
            let mut blobs = txn.open_table(BLOBS).map_err(storage)?;
            let removed = match functions.remove(name.as_str()).map_err(storage)? {
                Some(bytes) => Some(decode(name.as_str(), bytes.value())?),
                None => None,
            };
            if let Some(record) = &removed {
                release_blob(&functions, &mut blobs, &record.digest)?;
            }
            removed
        };
        txn.commit().map_err(storage)?;
        Ok(removed)
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

/// Deletes blob `digest` unless a function still refers to it.
fn release_blob(
    functions: &redb::Table<&str, &[u8]>,
    blobs: &mut redb::Table<&str, &[u8]>,
    digest: &Digest,
) -> Result<(), StateError> {
    for entry in functions.iter().map_err(storage)? {
        let (key, value) = entry.map_err(storage)?;
        if decode(key.value(), value.value())?.digest == *digest {
            return Ok(());
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
    use super::*;

    fn name(s: &str) -> FunctionName {
        s.parse().expect("valid name")
    }

    #[test]
    fn functions_survive_reopen_and_blobs_are_shared_and_released() -> Result<(), StateError> {
        let dir = tempfile::tempdir().map_err(|e| StateError::Corrupt {
            key: "tempdir".into(),
            message: e.to_string(),
        })?;
        let path = dir.path().join("state.redb");
        {
            let state = State::open(&path)?;
            let a = state.put_function(&name("a"), b"module-1", FunctionSpec::default(), 1)?;
            state.put_function(&name("b"), b"module-1", FunctionSpec::default(), 2)?;
            assert_eq!(a.version, 1);
            let a2 = state.put_function(&name("a"), b"module-2", FunctionSpec::default(), 3)?;
            assert_eq!(a2.version, 2);
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
        assert!(state.delete_function(&name("b"))?.is_some());
        assert!(state.get_blob(&Digest::of(b"module-1"))?.is_none());
        assert_eq!(
            state.get_blob(&Digest::of(b"module-2"))?.as_deref(),
            Some(&b"module-2"[..])
        );
        assert!(state.delete_function(&name("b"))?.is_none());
        Ok(())
    }
}
