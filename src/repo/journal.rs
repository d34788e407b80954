//! Resume journals: what an unfinished backup has already done.
//!
//! While a backup runs it appends, every few seconds, a batch with the block references of
//! the blocks finished since the previous batch (always a prefix of the volume, in order) and
//! the statistics they add. Before a batch is appended, every blob it refers to has been made
//! durable and indexed (format 2, version 4: the packer's checkpoint wrote the packs, synced
//! the filesystem and wrote an index file naming them; format 1: every chunk was synced); the
//! batch itself is fsynced. After kill -9 or a power cut, the journal
//! holds a valid prefix of batches, possibly followed by a torn record that is ignored and cut
//! off. The next backup of the same volume replays the batches and continues after them.

use super::format::*;
use super::fsio::{TempFile, read_unless_eof};
use crate::error::{Error, IoContext, Result};
use crate::hash::HashAlgorithm;
use crate::source::SourceInfo;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// What a journal is the journal of. A resume happens only when all of it matches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournalHeader {
    pub source: SourceInfo,
    pub volume_key: String,
    pub block_size: u32,
    pub block_count: u64,
    pub chunk_hash: HashAlgorithm,
    pub parent: Option<String>,
    /// Every block was read (no allocation map).
    #[serde(default)]
    pub all_blocks: bool,
    pub time: String,
    pub time_unix: i64,
    /// Nanoseconds past `time_unix` (orders backups started in the same second; 0 in
    /// journals written before it existed).
    #[serde(default)]
    pub time_nanos: u32,
    pub tags: Vec<String>,
    /// The source's state when the backup started (journals written before volback recorded
    /// it have none, and are never resumed: nothing proves their source did not change).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_state: Option<crate::source_state::SourceState>,
}

/// Statistics added by one batch (integers only; see `SnapshotStats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct BatchStats {
    pub bytes_read: u64,
    pub data_blocks: u64,
    pub zero_blocks: u64,
    pub unchanged_blocks: u64,
    pub deduplicated_blocks: u64,
    pub new_chunks: u64,
    pub new_bytes: u64,
    pub new_bytes_stored: u64,
    pub duration_ms: u64,
    pub unused_blocks: u64,
}

impl BatchStats {
    const FIELDS: usize = 10;

    fn to_array(self) -> [u64; Self::FIELDS] {
        [
            self.bytes_read,
            self.data_blocks,
            self.zero_blocks,
            self.unchanged_blocks,
            self.deduplicated_blocks,
            self.new_chunks,
            self.new_bytes,
            self.new_bytes_stored,
            self.duration_ms,
            self.unused_blocks,
        ]
    }

    fn from_array(a: [u64; Self::FIELDS]) -> Self {
        BatchStats {
            bytes_read: a[0],
            data_blocks: a[1],
            zero_blocks: a[2],
            unchanged_blocks: a[3],
            deduplicated_blocks: a[4],
            new_chunks: a[5],
            new_bytes: a[6],
            new_bytes_stored: a[7],
            duration_ms: a[8],
            unused_blocks: a[9],
        }
    }

    pub fn add(&mut self, o: &BatchStats) {
        let mut a = self.to_array();
        for (x, y) in a.iter_mut().zip(o.to_array()) {
            *x = x.saturating_add(y);
        }
        *self = Self::from_array(a);
    }
}

/// One decoded batch.
#[derive(Debug)]
pub struct Batch {
    pub first_block: u64,
    pub block_count: u64,
    pub stats: BatchStats,
    /// Byte ranges (offset, length) of the batch's blocks that could not be read and were
    /// stored as zeros (always empty in journals before version 3).
    pub unreadable: Vec<(u64, u64)>,
    /// Block-reference records (see `format::decode_records`).
    pub records: Vec<u8>,
}

/// An open journal, appended to by a running backup.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    /// The layout of its batches: a resumed older journal is continued in its own layout.
    version: u32,
}

const BATCH_FIXED: usize = 16 + BatchStats::FIELDS * 8;

/// Reads the preamble and header of a journal from the start of `file`. `Ok(None)` when it is
/// not a complete, checksummed journal header; returns the header and its JSON length.
fn read_header_from(file: &mut File, path: &Path) -> Result<Option<(JournalHeader, u64, u32)>> {
    let len = file.metadata().ctx("stat", path)?.len();
    let mut pre = [0u8; 16];
    if len < 16 || !read_unless_eof(file, &mut pre, path, 0)? || pre[..8] != JOURNAL_MAGIC {
        return Ok(None);
    }
    let version = le_u32(&pre, 8);
    if !JOURNAL_VERSIONS_READ.contains(&version) {
        return Err(Error::UnsupportedVersion {
            what: "resume journal",
            path: path.to_path_buf(),
            found: version,
            supported: JOURNAL_VERSION,
        });
    }
    let hlen = le_u32(&pre, 12) as u64;
    if hlen > MAX_HEADER_LEN as u64 || 16 + hlen + 32 > len {
        return Ok(None);
    }
    let mut json = vec![0u8; hlen as usize];
    let mut sum = [0u8; 32];
    file.read_exact(&mut json).ctx("read", path)?;
    file.read_exact(&mut sum).ctx("read", path)?;
    if *blake3::hash(&json).as_bytes() != sum {
        return Ok(None);
    }
    Ok(serde_json::from_slice(&json)
        .ok()
        .map(|h| (h, hlen, version)))
}

fn header_bytes(h: &JournalHeader) -> Result<Vec<u8>> {
    let json = serde_json::to_vec(h)
        .map_err(|e| Error::internal("backup journal", format!("cannot encode its header: {e}")))?;
    let mut out = Vec::with_capacity(json.len() + 48);
    out.extend_from_slice(&JOURNAL_MAGIC);
    out.extend_from_slice(&JOURNAL_VERSION.to_le_bytes());
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(blake3::hash(&json).as_bytes());
    Ok(out)
}

/// Byte ranges (offset, length).
type Ranges = Vec<(u64, u64)>;

/// Splits what follows a batch's statistics into its unreadable ranges (version 3 and later)
/// and its records; `None` when the list is malformed.
fn split_batch_tail(tail: &[u8], version: u32) -> Option<(Ranges, &[u8])> {
    if version < 3 {
        return Some((Vec::new(), tail));
    }
    let (n, rest) = tail.split_first_chunk::<4>()?;
    let n = u32::from_le_bytes(*n);
    if n > MAX_BATCH_UNREADABLE || (n as usize) * 16 > rest.len() {
        return None;
    }
    let (list, records) = rest.split_at(n as usize * 16);
    let mut ranges = Vec::with_capacity(n as usize);
    for r in list.chunks_exact(16) {
        let (off, len) = (le_u64(r, 0), le_u64(r, 8));
        off.checked_add(len).filter(|_| len > 0)?;
        ranges.push((off, len));
    }
    Some((ranges, records))
}

/// Reads the header and then the valid batches of a journal through `f`; returns the header,
/// the journal's version and the offset where its valid batches end (a torn tail follows).
fn scan(
    file: &mut File,
    path: &Path,
    mut f: impl FnMut(&JournalHeader, Batch) -> Result<()>,
) -> Result<Option<(JournalHeader, u32, u64)>> {
    let len = file.metadata().ctx("stat", path)?.len();
    let Some((header, hlen, version)) = read_header_from(file, path)? else {
        return Ok(None);
    };
    let mut valid_end = 16 + hlen + 32;
    let mut sum = [0u8; 32];
    let mut next_block = 0u64;
    let mut reader = std::io::BufReader::new(file);
    loop {
        let mut lenb = [0u8; 4];
        if !read_unless_eof(&mut reader, &mut lenb, path, valid_end)? {
            break;
        }
        let plen = u32::from_le_bytes(lenb);
        if plen > MAX_JOURNAL_RECORD
            || (plen as usize) < BATCH_FIXED
            || valid_end + 4 + plen as u64 + 32 > len
        {
            break;
        }
        let mut payload = vec![0u8; plen as usize];
        if !read_unless_eof(&mut reader, &mut payload, path, valid_end + 4)?
            || !read_unless_eof(&mut reader, &mut sum, path, valid_end + 4 + plen as u64)?
        {
            break;
        }
        if *blake3::hash(&payload).as_bytes() != sum {
            break;
        }
        let first_block = le_u64(&payload, 0);
        let block_count = le_u64(&payload, 8);
        let mut a = [0u64; BatchStats::FIELDS];
        for (i, x) in a.iter_mut().enumerate() {
            *x = le_u64(&payload, 16 + i * 8);
        }
        let Some((unreadable, records)) = split_batch_tail(&payload[BATCH_FIXED..], version) else {
            break;
        };
        let end = first_block.checked_add(block_count);
        if first_block != next_block
            || end.is_none_or(|e| e > header.block_count)
            || decode_records(records, block_count, |_, _| {}).is_err()
        {
            break;
        }
        let records = records.to_vec();
        f(
            &header,
            Batch {
                first_block,
                block_count,
                stats: BatchStats::from_array(a),
                unreadable,
                records,
            },
        )?;
        next_block += block_count;
        valid_end += 4 + plen as u64 + 32;
    }
    Ok(Some((header, version, valid_end)))
}

impl Journal {
    /// Creates a new journal at `path` (replacing any old one) atomically.
    pub fn create(path: &Path, header: &JournalHeader) -> Result<Journal> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let tmp = TempFile::create_in(dir, ".journal")?;
        tmp.file()
            .write_all(&header_bytes(header)?)
            .ctx("write", tmp.path())?;
        tmp.persist(path, true)?;
        Self::open_append(path, JOURNAL_VERSION)
    }

    fn open_append(path: &Path, version: u32) -> Result<Journal> {
        let mut file = super::fsio::open_regular(path, true, "open journal")?;
        file.seek(SeekFrom::End(0)).ctx("seek", path)?;
        Ok(Journal {
            path: path.to_path_buf(),
            file,
            version,
        })
    }

    /// Reads only the header of the journal at `path`; `None` when there is no usable one.
    pub fn read_header(path: &Path) -> Result<Option<JournalHeader>> {
        let mut file = match super::fsio::open_regular(path, false, "open journal") {
            Ok(f) => f,
            Err(e) if super::fsio::is_not_found(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        match read_header_from(&mut file, path) {
            Ok(h) => Ok(h.map(|(h, _, _)| h)),
            // A journal of another version is not resumable; `resume` reports it.
            Err(Error::UnsupportedVersion { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Opens an existing journal, replays its valid batches through `f` in order, cuts off a
    /// torn tail and returns the journal ready for appending, with its header.
    /// `Ok(None)` when the file does not exist or its header is unreadable (a journal whose
    /// header never became durable holds nothing worth resuming).
    pub fn resume(
        path: &Path,
        f: impl FnMut(&JournalHeader, Batch) -> Result<()>,
    ) -> Result<Option<(Journal, JournalHeader)>> {
        let mut file = match super::fsio::open_regular(path, true, "open journal") {
            Ok(f) => f,
            Err(e) if super::fsio::is_not_found(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        let Some((header, version, valid_end)) = scan(&mut file, path, f)? else {
            return Ok(None);
        };
        let len = file.metadata().ctx("stat", path)?.len();
        if valid_end < len {
            file.set_len(valid_end).ctx("truncate torn journal", path)?;
            file.sync_data().ctx("flush", path)?;
        }
        drop(file);
        Ok(Some((Self::open_append(path, version)?, header)))
    }

    /// Reads the valid batches of the journal at `path` through `f`, in order, changing
    /// nothing (a resume checks them before it commits to resuming). Returns the header, or
    /// `None` when there is no usable journal.
    pub fn read_batches(
        path: &Path,
        f: impl FnMut(&JournalHeader, Batch) -> Result<()>,
    ) -> Result<Option<JournalHeader>> {
        let mut file = match super::fsio::open_regular(path, false, "open journal") {
            Ok(f) => f,
            Err(e) if super::fsio::is_not_found(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(scan(&mut file, path, f)?.map(|(h, _, _)| h))
    }

    /// Appends a batch and makes it durable. `unreadable` lists the byte ranges of its blocks
    /// that could not be read (dropped when continuing a journal older than version 3).
    pub fn append(
        &mut self,
        first_block: u64,
        block_count: u64,
        stats: &BatchStats,
        unreadable: &[(u64, u64)],
        records: &[u8],
    ) -> Result<()> {
        let mut payload =
            Vec::with_capacity(BATCH_FIXED + 4 + unreadable.len() * 16 + records.len());
        payload.extend_from_slice(&first_block.to_le_bytes());
        payload.extend_from_slice(&block_count.to_le_bytes());
        for x in stats.to_array() {
            payload.extend_from_slice(&x.to_le_bytes());
        }
        if self.version >= 3 {
            let n = u32::try_from(unreadable.len())
                .ok()
                .filter(|&n| n <= MAX_BATCH_UNREADABLE)
                .ok_or_else(|| {
                    Error::internal(
                        "backup journal",
                        format!(
                            "{} unreadable ranges in one checkpoint (at most {MAX_BATCH_UNREADABLE})",
                            unreadable.len()
                        ),
                    )
                })?;
            payload.extend_from_slice(&n.to_le_bytes());
            for &(off, len) in unreadable {
                payload.extend_from_slice(&off.to_le_bytes());
                payload.extend_from_slice(&len.to_le_bytes());
            }
        }
        payload.extend_from_slice(records);
        let mut rec = Vec::with_capacity(payload.len() + 36);
        rec.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        rec.extend_from_slice(&payload);
        rec.extend_from_slice(blake3::hash(&payload).as_bytes());
        self.file
            .write_all(&rec)
            .ctx("append to journal", &self.path)?;
        self.file.sync_data().ctx("flush journal", &self.path)
    }

    /// Deletes the journal (the snapshot it led to is committed).
    pub fn remove(self) -> Result<()> {
        drop(self.file);
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("remove journal", &self.path, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::HashAlgorithm;
    use crate::repo::format::{BlockRef, encode_run};
    use proptest::prelude::*;

    fn header() -> JournalHeader {
        JournalHeader {
            source: crate::source::SourceInfo {
                path: "/dev/x".into(),
                kind: "file".into(),
                size: 1 << 20,
                logical_sector_size: 512,
                physical_sector_size: 512,
            },
            volume_key: "k".into(),
            block_size: 65536,
            block_count: 16,
            chunk_hash: HashAlgorithm::Blake3,
            parent: None,
            all_blocks: true,
            time: "2026-11-22T00:00:00Z".into(),
            time_unix: 0,
            time_nanos: 0,
            tags: Vec::new(),
            source_state: None,
        }
    }

    /// Batches come back with their unreadable ranges; a torn last batch is cut off.
    #[test]
    fn batches_round_trip_with_unreadable_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.journal");
        let mut j = Journal::create(&path, &header()).unwrap();
        let mut recs = Vec::new();
        encode_run(&mut recs, BlockRef::Zero, 4);
        j.append(
            0,
            4,
            &BatchStats::default(),
            &[(4096, 512), (8192, 1024)],
            &recs,
        )
        .unwrap();
        j.append(4, 4, &BatchStats::default(), &[], &recs).unwrap();
        drop(j);
        // A torn third batch.
        let len = std::fs::metadata(&path).unwrap().len();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2, 3]).unwrap();
        drop(f);
        let mut got = Vec::new();
        let (_, h) = Journal::resume(&path, |_, b| {
            got.push((b.first_block, b.block_count, b.unreadable));
            Ok(())
        })
        .unwrap()
        .unwrap();
        assert_eq!(h.block_count, 16);
        assert_eq!(
            got,
            vec![(0, 4, vec![(4096, 512), (8192, 1024)]), (4, 4, vec![])]
        );
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
    }

    /// Version 4 batches carry PART records: pieces of blobs, one record per run.
    #[test]
    fn part_records_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.journal");
        let mut j = Journal::create(&path, &header()).unwrap();
        let blob = crate::hash::ChunkId([7; 32]);
        let mut recs = Vec::new();
        encode_run(&mut recs, BlockRef::Part { blob, index: 2 }, 5);
        encode_run(&mut recs, BlockRef::Zero, 3);
        j.append(0, 8, &BatchStats::default(), &[], &recs).unwrap();
        drop(j);
        let mut got = Vec::new();
        let (j, _) = Journal::resume(&path, |_, b| {
            crate::repo::format::decode_records(&b.records, b.block_count, |r, n| got.push((r, n)))
                .unwrap();
            Ok(())
        })
        .unwrap()
        .unwrap();
        drop(j);
        assert_eq!(JOURNAL_VERSION, 4);
        assert_eq!(
            got,
            vec![(BlockRef::Part { blob, index: 2 }, 5), (BlockRef::Zero, 3)]
        );
    }

    #[test]
    fn a_journal_of_the_next_version_is_unsupported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.journal");
        drop(Journal::create(&path, &header()).unwrap());
        crate::error::testing::set_version(&path, JOURNAL_VERSION + 1);
        let bytes = std::fs::read(&path).unwrap();
        let e = Journal::resume(&path, |_, _| Ok(())).err().unwrap();
        assert!(
            crate::error::testing::is_next_version(&e, "resume journal", JOURNAL_VERSION),
            "{e}"
        );
        let e = Journal::read_batches(&path, |_, _| Ok(())).err().unwrap();
        assert!(matches!(e, Error::UnsupportedVersion { .. }), "{e}");
        // Reading only the header treats it as no journal; `resume` reports the version.
        assert!(Journal::read_header(&path).unwrap().is_none());
        // The file was left as it was.
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
    }

    proptest! {
        #[test]
        fn batch_tail_parser_never_panics(
            tail in proptest::collection::vec(any::<u8>(), 0..120),
            version in 1u32..5,
        ) {
            let _ = split_batch_tail(&tail, version);
        }
    }
}
