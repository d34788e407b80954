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
//!
//! In an encrypted repository (format 3) the header and each batch are sealed records
//! ([`Sealer`]): the header named by the volume key (the file is `journals/<key>.journal`),
//! batch `n` (0, 1, … in file order) named `<key>/<n>`, so that a record moved to another
//! journal or place does not open. A record that does not open at the end of the file is a
//! torn write; anywhere else, or in the header, it is damage: an error naming the journal.

use super::backend::{Log, LogMode, WriteBackend};
use super::format::*;
use super::fsio::read_unless_eof;
use super::seal::Sealer;
use crate::crypto::Kind;
use crate::error::{Error, IoContext, Result};
use crate::hash::HashAlgorithm;
use crate::source::SourceInfo;
use serde::{Deserialize, Serialize};
use std::io::Read;
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
pub struct Journal {
    /// Where it is, for messages.
    path: PathBuf,
    log: Box<dyn Log>,
    /// The layout of its batches: a resumed older journal is continued in its own layout.
    version: u32,
    sealer: Sealer,
    /// The volume key its records are sealed under ([`journal_key`]).
    key: String,
    /// Number of the next batch record.
    next_record: u64,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("next_record", &self.next_record)
            .finish_non_exhaustive()
    }
}

const BATCH_FIXED: usize = 16 + BatchStats::FIELDS * 8;

/// The volume key of the journal object `name` (`journals/<key>.journal`): what its sealed
/// records are named by.
pub fn journal_key(name: &str) -> String {
    let name = super::backend::base_name(name);
    match name.strip_suffix(".journal") {
        Some(key) => key.to_string(),
        None => name.to_string(),
    }
}

/// The name batch record `n` of the journal of volume `key` is sealed under.
fn record_name(key: &str, n: u64) -> Vec<u8> {
    format!("{key}/{n}").into_bytes()
}

/// Reads the preamble and header of a journal of `len` bytes from the start of `file`, the
/// journal of volume `key`. `Ok(None)` when it is not a complete, checksummed journal header;
/// returns the header, the offset where its batches start and its version. A sealed header
/// that does not open is an error.
fn read_header_from(
    file: &mut dyn Read,
    len: u64,
    key: &str,
    path: &Path,
    sealer: &Sealer,
) -> Result<Option<(JournalHeader, u64, u32)>> {
    let mut pre = [0u8; 16];
    if len < 16 || !read_unless_eof(file, &mut pre, path, 0)? || pre[..8] != JOURNAL_MAGIC {
        return Ok(None);
    }
    let version = le_u32(&pre, 8);
    let readable = match sealer.is_encrypted() {
        // Encrypted repositories only ever held journals of the current version.
        true => version == JOURNAL_VERSION,
        false => JOURNAL_VERSIONS_READ.contains(&version),
    };
    if !readable {
        return Err(Error::UnsupportedVersion {
            what: "resume journal",
            path: path.to_path_buf(),
            found: version,
            supported: JOURNAL_VERSION,
        });
    }
    if sealer.is_encrypted() {
        let rlen = le_u32(&pre, 12) as u64;
        if rlen > MAX_HEADER_LEN as u64 + sealer.overhead() as u64 || 16 + rlen > len {
            return Ok(None);
        }
        let mut rec = vec![0u8; rlen as usize];
        file.read_exact(&mut rec).ctx("read", path)?;
        let plain = sealer
            .open_in_place(
                Kind::JournalHeader,
                key.as_bytes(),
                &mut rec,
                "resume journal header",
                path,
            )
            .map_err(|e| damaged_journal(e, path))?;
        let header = serde_json::from_slice(&rec[plain]).map_err(|e| {
            Error::corrupt(
                "resume journal header",
                path,
                format!("{e} (remove the file to start the backup over)"),
            )
        })?;
        return Ok(Some((header, 16 + rlen, version)));
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
        .map(|h| (h, 16 + hlen + 32, version)))
}

/// A sealed journal record that does not open: the error says what to do.
fn damaged_journal(e: Error, path: &Path) -> Error {
    match e {
        Error::Corrupt {
            what,
            path: p,
            detail,
        } => Error::Corrupt {
            what,
            path: p,
            detail: format!("{detail} (remove the file to start the backup over)"),
        },
        e => Error::corrupt("resume journal", path, e.to_string()),
    }
}

/// The bytes of a new journal of volume `key`: preamble and header (plain: JSON and its
/// BLAKE3; sealed: one record).
fn header_bytes(h: &JournalHeader, sealer: &Sealer, key: &str) -> Result<Vec<u8>> {
    let json = serde_json::to_vec(h)
        .map_err(|e| Error::internal("backup journal", format!("cannot encode its header: {e}")))?;
    let mut out = Vec::with_capacity(json.len() + 48 + sealer.overhead());
    out.extend_from_slice(&JOURNAL_MAGIC);
    out.extend_from_slice(&JOURNAL_VERSION.to_le_bytes());
    if sealer.is_encrypted() {
        let stored = sealer.seal(Kind::JournalHeader, key.as_bytes(), &json)?;
        out.extend_from_slice(&(stored.len() as u32).to_le_bytes());
        out.extend_from_slice(&stored);
        return Ok(out);
    }
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

/// Where the valid batches of a journal end: its header, version, end offset and number of
/// batch records.
struct Scanned {
    header: JournalHeader,
    version: u32,
    valid_end: u64,
    records: u64,
}

/// Reads the header and then the valid batches of a journal through `f`; returns the header,
/// the journal's version and the offset where its valid batches end (a torn tail follows).
fn scan(
    file: &mut dyn Read,
    len: u64,
    key: &str,
    path: &Path,
    sealer: &Sealer,
    mut f: impl FnMut(&JournalHeader, Batch) -> Result<()>,
) -> Result<Option<Scanned>> {
    let Some((header, start, version)) = read_header_from(file, len, key, path, sealer)? else {
        return Ok(None);
    };
    let overhead = sealer.overhead();
    // Plain: u32 length, payload, BLAKE3 (32); sealed: u32 length, record.
    let trailer = if sealer.is_encrypted() { 0 } else { 32 };
    let mut valid_end = start;
    let mut nrec = 0u64;
    let mut sum = [0u8; 32];
    let mut next_block = 0u64;
    let mut reader = std::io::BufReader::new(file);
    loop {
        let mut lenb = [0u8; 4];
        if !read_unless_eof(&mut reader, &mut lenb, path, valid_end)? {
            break;
        }
        let rlen = u32::from_le_bytes(lenb) as u64;
        if rlen > u64::from(MAX_JOURNAL_RECORD) + overhead as u64
            || rlen < (BATCH_FIXED + overhead) as u64
            || valid_end + 4 + rlen + trailer > len
        {
            break;
        }
        let mut payload = vec![0u8; rlen as usize];
        if !read_unless_eof(&mut reader, &mut payload, path, valid_end + 4)? {
            break;
        }
        let body = if sealer.is_encrypted() {
            let what = format!("resume journal batch record {nrec}");
            let name = record_name(key, nrec);
            match sealer.open_in_place(Kind::JournalRecord, &name, &mut payload, &what, path) {
                Ok(plain) => plain,
                // The last thing in the file: a torn write.
                Err(_) if valid_end + 4 + rlen == len => break,
                Err(e) => return Err(damaged_journal(e, path)),
            }
        } else {
            if !read_unless_eof(&mut reader, &mut sum, path, valid_end + 4 + rlen)? {
                break;
            }
            if *blake3::hash(&payload).as_bytes() != sum {
                break;
            }
            0..payload.len()
        };
        let payload = &payload[body];
        let first_block = le_u64(payload, 0);
        let block_count = le_u64(payload, 8);
        let mut a = [0u64; BatchStats::FIELDS];
        for (i, x) in a.iter_mut().enumerate() {
            *x = le_u64(payload, 16 + i * 8);
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
        valid_end += 4 + rlen + trailer;
        nrec += 1;
    }
    Ok(Some(Scanned {
        header,
        version,
        valid_end,
        records: nrec,
    }))
}

/// An open log, its length before the scan, and what the scan found.
type OpenedLog = (Box<dyn Log>, u64, Scanned);

/// Opens journal `name` of `b` as `mode` says and scans it through `f`: the log, its
/// length before the scan and what the scan found (`None`: no log, or no usable header).
fn open_and_scan(
    b: &dyn WriteBackend,
    name: &str,
    mode: LogMode,
    sealer: &Sealer,
    f: impl FnMut(&JournalHeader, Batch) -> Result<()>,
) -> Result<Option<OpenedLog>> {
    let path = b.display_path(name);
    let Some(mut log) = b.open_log(name, mode)? else {
        return Ok(None);
    };
    let len = log.len();
    let key = journal_key(name);
    let scanned = {
        let mut reader = log.reader()?;
        scan(&mut reader, len, &key, &path, sealer, f)?
    };
    Ok(scanned.map(|sc| (log, len, sc)))
}

impl Journal {
    /// Creates a new journal `name` of `b` (`journals/<key>.journal`), replacing any old one
    /// atomically, stored as `sealer` says.
    pub fn create(
        b: &dyn WriteBackend,
        name: &str,
        header: &JournalHeader,
        sealer: &Sealer,
    ) -> Result<Journal> {
        let path = b.display_path(name);
        let key = journal_key(name);
        let bytes = header_bytes(header, sealer, &key)?;
        let Some(mut log) = b.open_log(name, LogMode::Create)? else {
            return Err(Error::internal(
                "backup journal",
                "a created log is missing",
            ));
        };
        log.append(&bytes)?;
        Ok(Journal {
            path,
            log,
            version: JOURNAL_VERSION,
            sealer: sealer.clone(),
            key,
            next_record: 0,
        })
    }

    /// Reads only the header of journal `name` of `b`; `None` when there is no usable one.
    /// A sealed header that does not open is an error naming the journal.
    pub fn read_header(
        b: &dyn WriteBackend,
        name: &str,
        sealer: &Sealer,
    ) -> Result<Option<JournalHeader>> {
        let path = b.display_path(name);
        let Some(mut log) = b.open_log(name, LogMode::Read)? else {
            return Ok(None);
        };
        let len = log.len();
        let mut reader = log.reader()?;
        match read_header_from(&mut reader, len, &journal_key(name), &path, sealer) {
            Ok(h) => Ok(h.map(|(h, _, _)| h)),
            // A journal of another version is not resumable; `resume` reports it.
            Err(Error::UnsupportedVersion { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Opens an existing journal, replays its valid batches through `f` in order, cuts off a
    /// torn tail and returns the journal ready for appending, with its header.
    /// `Ok(None)` when there is no journal or its header is unreadable (a journal whose
    /// header never became durable holds nothing worth resuming).
    pub fn resume(
        b: &dyn WriteBackend,
        name: &str,
        sealer: &Sealer,
        f: impl FnMut(&JournalHeader, Batch) -> Result<()>,
    ) -> Result<Option<(Journal, JournalHeader)>> {
        let Some((mut log, len, sc)) = open_and_scan(b, name, LogMode::Open, sealer, f)? else {
            return Ok(None);
        };
        if sc.valid_end < len {
            log.truncate(sc.valid_end)?;
        }
        let journal = Journal {
            path: b.display_path(name),
            log,
            version: sc.version,
            sealer: sealer.clone(),
            key: journal_key(name),
            next_record: sc.records,
        };
        Ok(Some((journal, sc.header)))
    }

    /// Reads the valid batches of journal `name` of `b` through `f`, in order, changing
    /// nothing (a resume checks them before it commits to resuming). Returns the header, or
    /// `None` when there is no usable journal.
    pub fn read_batches(
        b: &dyn WriteBackend,
        name: &str,
        sealer: &Sealer,
        f: impl FnMut(&JournalHeader, Batch) -> Result<()>,
    ) -> Result<Option<JournalHeader>> {
        Ok(open_and_scan(b, name, LogMode::Read, sealer, f)?.map(|(_, _, sc)| sc.header))
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
        let sealed = self.sealer.is_encrypted();
        let mut rec =
            Vec::with_capacity(4 + BATCH_FIXED + 4 + unreadable.len() * 16 + records.len() + 40);
        // Plain: u32 length, payload, BLAKE3 of the payload; sealed: u32 length, record.
        rec.extend_from_slice(&[0; 4]);
        let start = self.sealer.begin_seal(&mut rec);
        let payload_start = rec.len();
        let payload = &mut rec;
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
        if sealed {
            let name = record_name(&self.key, self.next_record);
            self.sealer
                .finish_seal(Kind::JournalRecord, &name, &mut rec, start)?;
        } else {
            let sum = blake3::hash(&rec[payload_start..]);
            rec.extend_from_slice(sum.as_bytes());
        }
        let body = rec.len() - 4 - if sealed { 0 } else { 32 };
        let body = u32::try_from(body)
            .map_err(|_| Error::internal("backup journal", format!("a {body}-byte batch")))?;
        rec[..4].copy_from_slice(&body.to_le_bytes());
        self.log.append(&rec)?;
        self.next_record += 1;
        Ok(())
    }

    /// Deletes the journal (the snapshot it led to is committed).
    pub fn remove(self) -> Result<()> {
        self.log.remove()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::HashAlgorithm;
    use crate::repo::format::{BlockRef, encode_run};
    use proptest::prelude::*;
    use std::io::Write;

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

    fn plain() -> Sealer {
        Sealer::plain(HashAlgorithm::Blake3)
    }

    fn sealed() -> Sealer {
        crate::repo::seal::testing::encrypted("77")
    }

    /// Batches come back with their unreadable ranges; a torn last batch is cut off.
    #[test]
    fn batches_round_trip_with_unreadable_ranges() {
        for sealer in [plain(), sealed()] {
            batches_round_trip_with(sealer);
        }
    }

    fn batches_round_trip_with(sealer: Sealer) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.journal");
        let b = crate::repo::backend::local::LocalDir::new(dir.path());
        let name = "j.journal";
        let mut j = Journal::create(&b, name, &header(), &sealer).unwrap();
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
        let (_, h) = Journal::resume(&b, name, &sealer, |_, b| {
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
        for sealer in [plain(), sealed()] {
            part_records_round_trip_with(sealer);
        }
    }

    fn part_records_round_trip_with(sealer: Sealer) {
        let dir = tempfile::tempdir().unwrap();
        let _path = dir.path().join("j.journal");
        let b = crate::repo::backend::local::LocalDir::new(dir.path());
        let name = "j.journal";
        let mut j = Journal::create(&b, name, &header(), &sealer).unwrap();
        let blob = crate::hash::ChunkId([7; 32]);
        let mut recs = Vec::new();
        encode_run(&mut recs, BlockRef::Part { blob, index: 2 }, 5);
        encode_run(&mut recs, BlockRef::Zero, 3);
        j.append(0, 8, &BatchStats::default(), &[], &recs).unwrap();
        drop(j);
        let mut got = Vec::new();
        let (j, _) = Journal::resume(&b, name, &sealer, |_, b| {
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
        for sealer in [plain(), sealed()] {
            next_version_with(sealer);
        }
    }

    fn next_version_with(sealer: Sealer) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.journal");
        let b = crate::repo::backend::local::LocalDir::new(dir.path());
        let name = "j.journal";
        drop(Journal::create(&b, name, &header(), &sealer).unwrap());
        crate::error::testing::set_version(&path, JOURNAL_VERSION + 1);
        let bytes = std::fs::read(&path).unwrap();
        let e = Journal::resume(&b, name, &sealer, |_, _| Ok(()))
            .err()
            .unwrap();
        assert!(
            crate::error::testing::is_next_version(&e, "resume journal", JOURNAL_VERSION),
            "{e}"
        );
        let e = Journal::read_batches(&b, name, &sealer, |_, _| Ok(()))
            .err()
            .unwrap();
        assert!(matches!(e, Error::UnsupportedVersion { .. }), "{e}");
        // Reading only the header treats it as no journal; `resume` reports the version.
        assert!(Journal::read_header(&b, name, &sealer).unwrap().is_none());
        // The file was left as it was.
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
    }

    /// Sealed: nothing in the clear; batches resume with their numbering; a record moved,
    /// changed in the middle, or of another journal is an error naming the journal; a torn
    /// tail is cut.
    #[test]
    fn sealed_journals_are_authenticated_record_by_record() {
        let sealer = sealed();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.journal");
        let b = crate::repo::backend::local::LocalDir::new(dir.path());
        let name = "k.journal";
        let mut j = Journal::create(&b, name, &header(), &sealer).unwrap();
        let mut recs = Vec::new();
        encode_run(&mut recs, BlockRef::Zero, 4);
        j.append(0, 4, &BatchStats::default(), &[(7, 9)], &recs)
            .unwrap();
        j.append(4, 4, &BatchStats::default(), &[], &recs).unwrap();
        drop(j);
        let bytes = std::fs::read(&path).unwrap();
        assert!(!bytes.windows(10).any(|w| w == b"volume_key"));
        let count = |p: &str| {
            let mut n = 0;
            Journal::read_batches(&b, p, &sealer, |_, _| {
                n += 1;
                Ok(())
            })
            .map(|h| (h.is_some(), n))
        };
        assert_eq!(count(name).unwrap(), (true, 2));
        // Resumed: the next record continues the numbering.
        let (mut j, _) = Journal::resume(&b, name, &sealer, |_, _| Ok(()))
            .unwrap()
            .unwrap();
        j.append(8, 4, &BatchStats::default(), &[], &recs).unwrap();
        drop(j);
        assert_eq!(count(name).unwrap(), (true, 3));
        let good = std::fs::read(&path).unwrap();
        let hlen = le_u32(&good, 12) as usize;
        let r0 = 16 + hlen;
        let r0_len = le_u32(&good, r0) as usize;
        let r1 = r0 + 4 + r0_len;
        let r1_len = le_u32(&good, r1) as usize;
        let r2 = r1 + 4 + r1_len;
        // A torn tail (a cut last record, or junk) is cut off.
        for cut in [good.len() - 1, good.len() - 30] {
            std::fs::write(&path, &good[..cut]).unwrap();
            assert_eq!(count(name).unwrap(), (true, 2), "cut {cut}");
        }
        let mut junk = good.clone();
        let n = junk.len();
        junk[n - 5] ^= 1;
        std::fs::write(&path, &junk).unwrap();
        assert_eq!(count(name).unwrap(), (true, 2));
        let (j, _) = Journal::resume(&b, name, &sealer, |_, _| Ok(()))
            .unwrap()
            .unwrap();
        drop(j);
        assert_eq!(std::fs::metadata(&path).unwrap().len() as usize, r2);
        // A changed byte in a record followed by others: damage, naming the journal.
        let mut bad = good.clone();
        bad[r0 + 30] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        let e = Journal::read_batches(&b, name, &sealer, |_, _| Ok(())).unwrap_err();
        assert!(matches!(e, Error::Corrupt { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("k.journal") && msg.contains("record 0"),
            "{msg}"
        );
        // Two records swapped: neither opens under the other's number.
        let mut swapped = good[..r0].to_vec();
        swapped.extend_from_slice(&good[r1..r2]);
        swapped.extend_from_slice(&good[r0..r1]);
        swapped.extend_from_slice(&good[r2..]);
        std::fs::write(&path, &swapped).unwrap();
        assert!(Journal::read_batches(&b, name, &sealer, |_, _| Ok(())).is_err());
        // The journal of another volume: its header does not open under this name.
        let other = dir.path().join("other.journal");
        std::fs::write(&other, &good).unwrap();
        let e = Journal::read_header(&b, "other.journal", &sealer).unwrap_err();
        assert!(e.to_string().contains("other.journal"), "{e}");
        assert!(e.to_string().contains("remove the file"), "{e}");
        // A plain reader finds no usable header; the right one under another key neither.
        std::fs::write(&path, &good).unwrap();
        assert!(Journal::read_header(&b, name, &plain()).unwrap().is_none());
        let wrong = crate::repo::seal::testing::encrypted("78");
        assert!(Journal::read_header(&b, name, &wrong).is_err());
        // Hostile lengths are refused before allocating.
        let mut huge = good[..r0].to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        huge.extend_from_slice(&[0; 100]);
        std::fs::write(&path, &huge).unwrap();
        assert_eq!(count(name).unwrap(), (true, 0));
        let mut hdr = good[..16].to_vec();
        hdr[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        std::fs::write(&path, &hdr).unwrap();
        assert_eq!(count(name).unwrap(), (false, 0));
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
