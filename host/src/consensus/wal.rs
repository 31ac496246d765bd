//! The Raft log's write-ahead file: appends are made durable with one sequential write
//! and one `fdatasync` here, in front of the log's redb file.
//!
//! Why: a durable redb commit of one small entry writes ~8 scattered pages (the log
//! table's leaf and branch, the table tree, redb's freed-page bookkeeping, the header),
//! and on a virtual disk an `fdatasync` costs by the pages it writes: 150-185 µs against
//! 82 µs for a 200-byte sequential append (docs/benchmarks.md, "Fifth session"). etcd
//! writes its log the same way.
//!
//! How: an append goes to the log's redb file in a *non-durable* commit (so readers see
//! it at once) and, as one record, to this file, which is then fsynced. Every other
//! write of the log (the vote, a truncation, a purge, entries too big for the file) and
//! a periodic checkpoint are durable redb commits, which persist the non-durable ones
//! before them. Each of those starts a new *generation* of this file, stored in the same
//! redb commit, and the file's records carry their generation in their checksum: records
//! of an older generation are never replayed. So a generation's records are exactly the
//! appends made since the redb file was last durable, in order.
//!
//! Opening replays the current generation's records into redb, stopping at the first
//! one that is torn or stale (a record is acknowledged only after its `fdatasync`, and
//! they are written in order), and starts the next generation durably.
//!
//! Layout: [`MAGIC`], then records back to back: length of the payload (u32 LE), CRC-32
//! of the generation (u64 LE) and the payload (u32 LE), payload. A payload is entries
//! back to back: log index (u64 LE), length (u32 LE), the entry as the log table stores
//! it. The file is created at its full size and filled with zeros (then renamed into
//! place and fsynced with its folder), so that a record's `fdatasync` writes data pages
//! only: writing past the end of a file, or into a hole, would also write its inode or
//! extent tree.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase};

use super::log_store::{LOG, META};

/// The first bytes of a write-ahead file (format version 1).
const MAGIC: &[u8; 8] = b"waferwl1";
/// The size a new file is created with: the records between two checkpoints.
const CAPACITY: u64 = 4 << 20;
/// Record header: payload length and checksum.
const RECORD_HEADER: u64 = 8;
/// Entry header inside a payload: index and length.
const ENTRY_HEADER: usize = 12;
/// Key in the log's meta table: the current generation (JSON number).
pub(super) const GENERATION: &str = "wal_generation";

/// The write-ahead file of one log.
pub(super) struct Wal {
    file: File,
    path: PathBuf,
    /// The generation records are written with now.
    generation: u64,
    /// Where the next record goes.
    end: u64,
    /// The file's size.
    capacity: u64,
    /// The record being built (kept to reuse its allocation).
    buf: Vec<u8>,
}

fn redb_io(e: std::io::Error) -> redb::Error {
    redb::StorageError::Io(e).into()
}

fn at(path: &Path, e: impl std::fmt::Display) -> redb::Error {
    redb_io(std::io::Error::other(format!("{}: {e}", path.display())))
}

/// The generation stored in the meta table of the log in `db`, if any.
fn stored_generation(db: &Database) -> Result<Option<u64>, redb::Error> {
    let txn = db.begin_read()?;
    let meta = match txn.open_table(META) {
        Ok(meta) => meta,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let Some(value) = meta.get(GENERATION)? else {
        return Ok(None);
    };
    serde_json::from_slice(value.value())
        .map(Some)
        .map_err(|e| {
            redb_io(std::io::Error::other(format!(
                "the log's {GENERATION}: {e}"
            )))
        })
}

/// Stores `generation` as the current one in `txn` (a durable commit of the log).
pub(super) fn store_generation(
    txn: &redb::WriteTransaction,
    generation: u64,
) -> Result<(), redb::Error> {
    let bytes = serde_json::to_vec(&generation).map_err(|e| redb_io(std::io::Error::other(e)))?;
    txn.open_table(META)?.insert(GENERATION, bytes.as_slice())?;
    Ok(())
}

/// Creates a zero-filled write-ahead file at `path`: written beside it, fsynced, renamed
/// into place, and the folder fsynced, so that a file at `path` is always whole.
fn create(path: &Path) -> Result<File, redb::Error> {
    let temporary = path.with_extension("wal.new");
    let mut file = File::create(&temporary).map_err(|e| at(&temporary, e))?;
    let zeros = vec![0u8; 1 << 20];
    let mut left = CAPACITY;
    while left > 0 {
        let n = left.min(zeros.len() as u64);
        file.write_all(&zeros[..n as usize])
            .map_err(|e| at(&temporary, e))?;
        left -= n;
    }
    file.write_all_at(MAGIC, 0).map_err(|e| at(&temporary, e))?;
    file.sync_all().map_err(|e| at(&temporary, e))?;
    drop(file);
    std::fs::rename(&temporary, path).map_err(|e| at(path, e))?;
    let folder = path
        .parent()
        .filter(|folder| !folder.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    File::open(folder)
        .and_then(|dir| dir.sync_all())
        .map_err(|e| at(folder, e))?;
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| at(path, e))
}

/// The entries of the records of `generation` in `bytes` (a whole file), up to the
/// first record that is not one of them.
fn replayable(bytes: &[u8], generation: u64) -> Result<Vec<(u64, &[u8])>, String> {
    let mut entries = Vec::new();
    let mut at = MAGIC.len();
    while at + RECORD_HEADER as usize <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or_default()) as usize;
        let crc = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap_or_default());
        let start = at + RECORD_HEADER as usize;
        let Some(payload) = bytes.get(start..start + len).filter(|_| len > 0) else {
            break;
        };
        if checksum(generation, payload) != crc {
            break;
        }
        let mut rest = payload;
        while !rest.is_empty() {
            let (Some(index), Some(size)) = (rest.get(..8), rest.get(8..ENTRY_HEADER)) else {
                return Err(format!(
                    "a record at byte {at} ends inside an entry's header"
                ));
            };
            let index = u64::from_le_bytes(index.try_into().unwrap_or_default());
            let size = u32::from_le_bytes(size.try_into().unwrap_or_default()) as usize;
            let Some(entry) = rest.get(ENTRY_HEADER..ENTRY_HEADER + size) else {
                return Err(format!("a record at byte {at} ends inside entry {index}"));
            };
            entries.push((index, entry));
            rest = &rest[ENTRY_HEADER + size..];
        }
        at = start + len;
    }
    Ok(entries)
}

/// Asks the kernel to start writing `len` bytes at `offset` of `file` to the disk now
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`), without waiting. A hint: on failure the
/// `fdatasync` that follows writes them anyway.
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: the descriptor is open for the call's duration; the call reads no memory.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE);
    }
}

fn checksum(generation: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&generation.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

impl Wal {
    /// Opens the write-ahead file at `path` of the log in `db` (creating it when the log
    /// never had one), replays its records into `db` and starts the next generation, in
    /// one durable commit.
    pub(super) fn open(path: &Path, db: &Database) -> Result<Wal, redb::Error> {
        let stored = stored_generation(db)?;
        let file = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == ErrorKind::NotFound => match stored {
                None => create(path)?,
                Some(_) => {
                    return Err(at(
                        path,
                        "the Raft log's write-ahead file is missing: the log may lack \
                         entries this node acknowledged; restore the file, or remove the \
                         data folder and re-add the node with --join",
                    ))
                }
            },
            Err(e) => return Err(at(path, e)),
        };
        let capacity = file.metadata().map_err(|e| at(path, e))?.len();
        let mut bytes = vec![0u8; capacity as usize];
        file.read_exact_at(&mut bytes, 0).map_err(|e| at(path, e))?;
        if !bytes.starts_with(MAGIC) {
            return Err(at(path, "not a wafer write-ahead file (bad magic)"));
        }
        let generation = stored.unwrap_or(0);
        let entries = replayable(&bytes, generation).map_err(|e| at(path, e))?;
        let next = generation + 1;
        let mut txn = db.begin_write()?;
        super::durable::set_immediate(&mut txn)?;
        {
            let mut log = txn.open_table(LOG)?;
            for (index, entry) in &entries {
                log.insert(*index, *entry)?;
            }
        }
        store_generation(&txn, next)?;
        txn.commit()?;
        if !entries.is_empty() {
            tracing::info!(
                entries = entries.len(),
                file = %path.display(),
                "replayed the Raft log's write-ahead file"
            );
        }
        Ok(Wal {
            file,
            path: path.to_path_buf(),
            generation: next,
            end: MAGIC.len() as u64,
            capacity,
            buf: Vec::new(),
        })
    }

    /// Whether a record of entries of `sizes` bytes fits before the end of the file.
    pub(super) fn fits(&self, sizes: impl Iterator<Item = usize>) -> bool {
        let payload: u64 = sizes.map(|size| (ENTRY_HEADER + size) as u64).sum();
        self.end + RECORD_HEADER + payload <= self.capacity
    }

    /// Writes `entries` (index, bytes) as one record and starts writing it to the disk;
    /// [`Wal::sync`] makes it durable. The caller checked that they [fit](Wal::fits).
    pub(super) fn write<'a>(
        &mut self,
        entries: impl Iterator<Item = (u64, &'a [u8])>,
    ) -> Result<(), redb::Error> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        buf.extend_from_slice(&[0u8; RECORD_HEADER as usize]);
        for (index, entry) in entries {
            let size = u32::try_from(entry.len())
                .map_err(|_| at(&self.path, format!("entry {index} is too big for a record")))?;
            buf.extend_from_slice(&index.to_le_bytes());
            buf.extend_from_slice(&size.to_le_bytes());
            buf.extend_from_slice(entry);
        }
        let payload = &buf[RECORD_HEADER as usize..];
        let len = u32::try_from(payload.len())
            .map_err(|_| at(&self.path, "a record is too big for the file"))?;
        let crc = checksum(self.generation, payload);
        buf[..4].copy_from_slice(&len.to_le_bytes());
        buf[4..8].copy_from_slice(&crc.to_le_bytes());
        let written = self.file.write_all_at(&buf, self.end);
        let size = buf.len() as u64;
        self.buf = buf;
        written.map_err(|e| at(&self.path, e))?;
        // The disk writes the record while the caller does its redb commit; `sync`
        // then waits for it and flushes the disk's cache.
        start_writeback(&self.file, self.end, size);
        self.end += size;
        Ok(())
    }

    /// Makes the records written so far durable.
    pub(super) fn sync(&mut self) -> Result<(), redb::Error> {
        self.file.sync_data().map_err(|e| at(&self.path, e))
    }

    /// [`Wal::write`] and [`Wal::sync`].
    #[cfg(test)]
    fn append<'a>(
        &mut self,
        entries: impl Iterator<Item = (u64, &'a [u8])>,
    ) -> Result<(), redb::Error> {
        self.write(entries)?;
        self.sync()
    }

    /// The generation that a durable commit of the log (which makes every record so far
    /// redundant) stores with [`store_generation`] before calling [`Wal::restart`].
    pub(super) fn next_generation(&self) -> u64 {
        self.generation + 1
    }

    /// After a durable commit that stored `generation`: records start over at the
    /// beginning of the file.
    pub(super) fn restart(&mut self, generation: u64) {
        self.generation = generation;
        self.end = MAGIC.len() as u64;
    }
}

#[cfg(test)]
mod tests {
    use redb::ReadableTable;

    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;
    /// The log table's rows: index and entry bytes.
    type Rows = Vec<(u64, Vec<u8>)>;

    fn open(dir: &tempfile::TempDir) -> Result<(Database, Wal), Box<dyn std::error::Error>> {
        let db = Database::create(dir.path().join("log.redb"))?;
        let txn = db.begin_write()?;
        txn.open_table(LOG)?;
        txn.open_table(META)?;
        txn.commit()?;
        let wal = Wal::open(&dir.path().join("log.wal"), &db)?;
        Ok((db, wal))
    }

    fn log(db: &Database) -> Result<Rows, Box<dyn std::error::Error>> {
        let txn = db.begin_read()?;
        let table = txn.open_table(LOG)?;
        let mut out = Vec::new();
        for item in table.iter()? {
            let (k, v) = item?;
            out.push((k.value(), v.value().to_vec()));
        }
        Ok(out)
    }

    #[test]
    fn records_lost_from_redb_are_replayed_once() -> TestResult {
        let dir = tempfile::tempdir()?;
        {
            // Records written, but the redb side of them never reached the disk.
            let (_db, mut wal) = open(&dir)?;
            wal.append([(1, &b"one"[..]), (2, &b"two"[..])].into_iter())?;
            wal.append([(3, &b"three"[..])].into_iter())?;
        }
        let (db, wal) = open(&dir)?;
        assert_eq!(
            log(&db)?,
            vec![
                (1, b"one".to_vec()),
                (2, b"two".to_vec()),
                (3, b"three".to_vec())
            ]
        );
        // Opening started a new generation: a later durable change of the log (here,
        // dropping entry 3 behind the file's back) is not undone by the old records.
        drop(wal);
        let txn = db.begin_write()?;
        txn.open_table(LOG)?.remove(3)?;
        txn.commit()?;
        drop(db);
        let (db, _wal) = open(&dir)?;
        assert_eq!(log(&db)?.len(), 2);
        Ok(())
    }

    #[test]
    fn replay_stops_at_a_torn_record() -> TestResult {
        let dir = tempfile::tempdir()?;
        {
            let (_db, mut wal) = open(&dir)?;
            wal.append([(1, &b"one"[..])].into_iter())?;
            wal.append([(2, &b"two"[..])].into_iter())?;
            wal.append([(3, &b"three"[..])].into_iter())?;
        }
        // Damage the second record's entry: it and everything after it are dropped.
        let path = dir.path().join("log.wal");
        let mut bytes = std::fs::read(&path)?;
        let second = MAGIC.len() + RECORD_HEADER as usize + ENTRY_HEADER + 3;
        bytes[second + RECORD_HEADER as usize + ENTRY_HEADER] ^= 0xff;
        std::fs::write(&path, &bytes)?;
        let (db, _wal) = open(&dir)?;
        assert_eq!(log(&db)?, vec![(1, b"one".to_vec())]);
        Ok(())
    }

    #[test]
    fn a_record_must_fit_the_file() -> TestResult {
        let dir = tempfile::tempdir()?;
        let (_db, wal) = open(&dir)?;
        assert!(wal.fits([100, 200].into_iter()));
        assert!(!wal.fits([CAPACITY as usize].into_iter()));
        Ok(())
    }

    #[test]
    fn a_missing_or_foreign_file_is_an_error() -> TestResult {
        let dir = tempfile::tempdir()?;
        drop(open(&dir)?);
        let path = dir.path().join("log.wal");
        std::fs::remove_file(&path)?;
        let missing = open(&dir).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(missing.contains("write-ahead file is missing"), "{missing}");
        std::fs::write(&path, b"something else entirely")?;
        let foreign = open(&dir).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            foreign.contains("not a wafer write-ahead file"),
            "{foreign}"
        );
        Ok(())
    }
}
