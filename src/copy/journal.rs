//! The journal of a copy or update in progress (`BASE.journal`).
//!
//! Every few seconds the update makes the blocks it wrote durable (data first), then appends
//! a record: the blocks finished since the previous record (a contiguous range continuing the
//! previous one) with their new SHA-256s, and a *horizon*: the update will modify no block at
//! or past the horizon before the next record is durable. After a crash the journal holds a
//! valid prefix of records (a torn last record is ignored and cut off); the next run continues
//! after the last finished block, and rewrites unconditionally the blocks between it and the
//! highest recorded horizon (their content is unknown). At the end the new hash list is the
//! concatenation of the records' hashes.

use super::format::*;
use super::meta::{CopyStats, UpdateBase};
use crate::bytes::{le_u32, le_u64};
use crate::error::{Error, IoContext, Result};
use crate::repo::fsio::{self, TempFile, read_unless_eof};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// What the journal is the journal of; a run resumes only when it matches the metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalHeader {
    /// The update id recorded in the metadata.
    pub id: String,
    pub base: UpdateBase,
    /// Checksum of the hash list the update started from (base `hashes`).
    pub base_sha256: Option<String>,
    pub size: u64,
    pub block_size: u32,
    pub block_count: u64,
    /// The source's state when this run started; `None` for a snapshot (immutable) source,
    /// and in journals written before volback recorded it (those of a device or file are then
    /// never resumed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_state: Option<crate::source_state::SourceState>,
}

/// One record as read back.
pub struct Record<'a> {
    pub first: u64,
    pub count: u64,
    pub horizon: u64,
    pub stats: CopyStats,
    /// `count` × 32 bytes.
    pub hashes: &'a [u8],
}

/// What the records of a journal say.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Replay {
    /// Blocks `0..done` are finished.
    pub done: u64,
    /// The highest horizon recorded: blocks in `done..horizon` may have been modified.
    pub horizon: u64,
    pub stats: CopyStats,
    /// Runs that appended to the journal (each starts with a record of 0 blocks).
    pub runs: u32,
}

/// An open journal, appended to by one run.
pub struct Journal {
    file: File,
    path: PathBuf,
    header_end: u64,
    next: u64,
}

fn bad(path: &Path, detail: impl Into<String>) -> Error {
    Error::corrupt("copy journal", path, detail)
}

/// A failed read of the journal header: the file ending early is damage (`short`
/// describes it), any other failure an I/O error.
fn header_read_error(path: &Path, e: std::io::Error, short: &str) -> Error {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        bad(path, short)
    } else {
        Error::io("read", path, e)
    }
}

impl Journal {
    /// Creates a journal with no records, durably (replacing any file at `path`).
    pub fn create(path: &Path, header: &JournalHeader) -> Result<Journal> {
        let json = serde_json::to_vec(header).map_err(|e| {
            Error::internal("copy journal", format!("cannot encode its header: {e}"))
        })?;
        let mut b = Vec::with_capacity(json.len() + 48);
        b.extend_from_slice(&JOURNAL_MAGIC_V1);
        b.extend_from_slice(&JOURNAL_VERSION_V1.to_le_bytes());
        b.extend_from_slice(&(json.len() as u32).to_le_bytes());
        b.extend_from_slice(&json);
        b.extend_from_slice(&Sha256::digest(&json));
        let dir = path.parent().unwrap_or(Path::new("."));
        let tmp = TempFile::create_in(dir, JOURNAL_EXT)?;
        tmp.file().write_all(&b).ctx("write", tmp.path())?;
        tmp.persist(path, true)?;
        let file = fsio::open_regular(path, true, "open")?;
        Ok(Journal {
            file,
            path: path.to_path_buf(),
            header_end: b.len() as u64,
            next: 0,
        })
    }

    /// Opens an existing journal, replays its records (cutting off a torn tail) and returns it
    /// ready for appending. `Ok(None)`: there is no journal at `path`.
    pub fn open(path: &Path) -> Result<Option<(Journal, JournalHeader, Replay)>> {
        let file = match fsio::open_regular(path, true, "open") {
            Ok(f) => f,
            Err(e) if fsio::is_not_found(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        let (header, header_end) = read_header(&file, path)?;
        let mut replay = Replay::default();
        let valid_end = scan_records(&file, path, header_end, header.block_count, |r| {
            if r.count == 0 {
                replay.runs += 1;
            }
            replay.done = r.first + r.count;
            replay.horizon = replay.horizon.max(r.horizon);
            replay.stats.add(&r.stats);
            Ok(())
        })?;
        file.set_len(valid_end).ctx("truncate", path)?;
        Ok(Some((
            Journal {
                file,
                path: path.to_path_buf(),
                header_end,
                next: replay.done,
            },
            header,
            replay,
        )))
    }

    /// The first block not covered by a record.
    pub fn next_block(&self) -> u64 {
        self.next
    }

    /// Appends a record for blocks `first .. first + hashes.len() / 32` and fsyncs it. The
    /// blocks' data must already be durable.
    pub fn append(
        &mut self,
        first: u64,
        horizon: u64,
        stats: &CopyStats,
        hashes: &[u8],
    ) -> Result<()> {
        let count = (hashes.len() / HASH_LEN) as u64;
        if first != self.next || count > RECORD_MAX_BLOCKS {
            return Err(Error::internal(
                "copy journal",
                format!(
                    "a record for blocks {first}+{count} does not continue at {}",
                    self.next
                ),
            ));
        }
        let mut p = Vec::with_capacity(4 + RECORD_FIXED_LEN + hashes.len() + 32);
        let len = (RECORD_FIXED_LEN + hashes.len()) as u32;
        p.extend_from_slice(&len.to_le_bytes());
        p.extend_from_slice(&first.to_le_bytes());
        p.extend_from_slice(&count.to_le_bytes());
        p.extend_from_slice(&horizon.to_le_bytes());
        for v in stats.to_array() {
            p.extend_from_slice(&v.to_le_bytes());
        }
        p.extend_from_slice(hashes);
        let sum = Sha256::digest(&p[4..]);
        p.extend_from_slice(&sum);
        let mut f = &self.file;
        f.seek(SeekFrom::End(0)).ctx("write", &self.path)?;
        f.write_all(&p).ctx("write", &self.path)?;
        self.file.sync_data().ctx("flush", &self.path)?;
        self.next = first + count;
        Ok(())
    }

    /// Visits every record in order (for writing the final hash list).
    pub fn for_each_record(
        &self,
        block_count: u64,
        f: impl FnMut(&Record) -> Result<()>,
    ) -> Result<()> {
        scan_records(&self.file, &self.path, self.header_end, block_count, f).map(|_| ())
    }

    /// Deletes the journal (durably).
    pub fn remove(self) -> Result<()> {
        drop(self.file);
        match std::fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("remove", &self.path, e)),
        }
        if let Some(dir) = self.path.parent() {
            crate::platform::sync_dir(dir).ctx("flush directory", dir)?;
        }
        Ok(())
    }
}

fn read_header(file: &File, path: &Path) -> Result<(JournalHeader, u64)> {
    let mut r = BufReader::new(file);
    let mut pre = [0u8; 16];
    r.read_exact(&mut pre)
        .map_err(|e| header_read_error(path, e, "shorter than its header"))?;
    if pre[0..8] != JOURNAL_MAGIC_V1 {
        return Err(bad(path, "bad magic number"));
    }
    let version = le_u32(&pre, 8);
    if version != JOURNAL_VERSION_V1 {
        return Err(Error::UnsupportedVersion {
            what: "copy journal",
            path: path.to_path_buf(),
            found: version,
            supported: JOURNAL_VERSION_V1,
        });
    }
    let len = le_u32(&pre, 12);
    if len > JOURNAL_HEADER_MAX {
        return Err(bad(path, format!("header of {len} bytes")));
    }
    let mut json = vec![0u8; len as usize + 32];
    r.read_exact(&mut json)
        .map_err(|e| header_read_error(path, e, "header cut short"))?;
    let (json, sum) = json.split_at(len as usize);
    if Sha256::digest(json).as_slice() != sum {
        return Err(bad(path, "header checksum mismatch"));
    }
    let header: JournalHeader =
        serde_json::from_slice(json).map_err(|e| bad(path, format!("header: {e}")))?;
    Ok((header, 16 + len as u64 + 32))
}

/// Reads records from `start` while they are whole, intact and contiguous from block 0;
/// returns the file offset where the valid records end.
fn scan_records(
    file: &File,
    path: &Path,
    start: u64,
    block_count: u64,
    mut f: impl FnMut(&Record) -> Result<()>,
) -> Result<u64> {
    let mut fh = file;
    fh.seek(SeekFrom::Start(start)).ctx("read", path)?;
    let mut r = BufReader::with_capacity(1 << 20, fh);
    let mut at = start;
    let mut next = 0u64;
    let max_len = RECORD_FIXED_LEN as u64 + RECORD_MAX_BLOCKS * HASH_LEN as u64;
    let mut payload = Vec::new();
    loop {
        let mut lb = [0u8; 4];
        if !read_unless_eof(&mut r, &mut lb, path, at)? {
            break;
        }
        let len = u32::from_le_bytes(lb) as u64;
        if len < RECORD_FIXED_LEN as u64 || len > max_len {
            break;
        }
        payload.resize(len as usize + 32, 0);
        if !read_unless_eof(&mut r, &mut payload, path, at + 4)? {
            break;
        }
        let (p, sum) = payload.split_at(len as usize);
        if Sha256::digest(p).as_slice() != sum {
            break;
        }
        let first = le_u64(p, 0);
        let count = le_u64(p, 8);
        let horizon = le_u64(p, 16);
        let hashes = &p[RECORD_FIXED_LEN..];
        if first != next
            || count.checked_mul(HASH_LEN as u64) != Some(hashes.len() as u64)
            || first + count > block_count
        {
            break;
        }
        let mut stats = [0u64; CopyStats::FIELDS];
        for (i, s) in stats.iter_mut().enumerate() {
            *s = le_u64(p, 24 + 8 * i);
        }
        f(&Record {
            first,
            count,
            horizon,
            stats: CopyStats::from_array(stats),
            hashes,
        })?;
        next = first + count;
        at += 4 + len + 32;
    }
    Ok(at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header() -> JournalHeader {
        JournalHeader {
            id: "abc".into(),
            base: UpdateBase::Zeros,
            base_sha256: None,
            size: 10 * 4096,
            block_size: 4096,
            block_count: 10,
            source_state: None,
        }
    }

    #[test]
    fn records_replay_and_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let mut j = Journal::create(&path, &header()).unwrap();
        let stats = CopyStats {
            blocks_written: 2,
            ..CopyStats::default()
        };
        j.append(0, 5, &CopyStats::default(), &[]).unwrap();
        j.append(0, 8, &stats, &[1u8; 3 * 32]).unwrap();
        j.append(3, 9, &stats, &[2u8; 2 * 32]).unwrap();
        assert!(
            j.append(3, 9, &stats, &[]).is_err(),
            "must continue at block 5"
        );
        drop(j);
        let good_len = std::fs::metadata(&path).unwrap().len();
        // A torn record at the end.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(&[200, 0, 0, 0, 5, 0, 0]).unwrap();
        drop(f);
        let (j, h, r) = Journal::open(&path).unwrap().unwrap();
        assert_eq!(h, header());
        assert_eq!(
            r,
            Replay {
                done: 5,
                horizon: 9,
                stats: CopyStats {
                    blocks_written: 4,
                    ..CopyStats::default()
                },
                runs: 1
            }
        );
        assert_eq!(std::fs::metadata(&path).unwrap().len(), good_len);
        let mut all = Vec::new();
        j.for_each_record(10, |r| {
            all.extend_from_slice(r.hashes);
            Ok(())
        })
        .unwrap();
        assert_eq!(all.len(), 5 * 32);
        assert_eq!(j.next_block(), 5);
        j.remove().unwrap();
        assert!(Journal::open(&path).unwrap().is_none());
    }

    #[test]
    fn a_journal_of_the_next_version_is_unsupported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        drop(Journal::create(&path, &header()).unwrap());
        crate::error::testing::set_version(&path, JOURNAL_VERSION_V1 + 1);
        let e = Journal::open(&path).err().unwrap();
        assert!(
            crate::error::testing::is_next_version(&e, "copy journal", JOURNAL_VERSION_V1),
            "{e}"
        );
    }

    proptest! {
        /// Flipping any byte of a journal never panics; a flipped header is an error, a
        /// flipped record ends the valid prefix.
        #[test]
        fn damaged_journals_never_panic(pos in 0usize..600, byte in any::<u8>()) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("j");
            let mut j = Journal::create(&path, &header()).unwrap();
            j.append(0, 4, &CopyStats::default(), &[7u8; 4 * 32]).unwrap();
            j.append(4, 8, &CopyStats::default(), &[8u8; 3 * 32]).unwrap();
            drop(j);
            let mut bytes = std::fs::read(&path).unwrap();
            let i = pos % bytes.len();
            bytes[i] ^= byte.max(1);
            std::fs::write(&path, &bytes).unwrap();
            if let Ok(Some((_, _, r))) = Journal::open(&path) {
                prop_assert!(r.done <= 10);
            }
        }
    }
}
