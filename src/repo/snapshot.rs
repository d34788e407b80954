//! Snapshot files: one immutable file per snapshot under `snapshots/<id>`.
//!
//! Layout (see docs/FORMAT.md): preamble, manifest segments (zstd-compressed block-reference
//! records, 65,536 blocks each), the JSON header, the segment directory, and a 64-byte
//! trailer whose BLAKE3 checksum covers preamble, header, directory and trailer fields. The
//! snapshot id is that checksum in hex. Segments are checked by their own BLAKE3 in the
//! directory, so a reader can load any one of them without reading the others: memory for
//! random access stays bounded by one segment, whatever the volume size.
//!
//! Version 3 (repository format 2) keeps the container but has no segments: the header's
//! `tree` names the root of the block map, a tree of blobs ([`super::tree`]). Reading its
//! block references needs a [`BlobSource`] attached to the [`SnapshotFile`]
//! ([`SnapshotFile::set_blobs`]). [`BlockMap`] and [`BlockCursor`] read either kind.
//!
//! In an encrypted repository (format 3) the whole version 3 file is one sealed record
//! ([`Sealer`]) and the snapshot id is the BLAKE3 of the stored record: a name check needs no
//! key, and the record is opened only once its bytes match the name.

use super::backend::{PutMode, ReadBackend, WriteBackend};
use super::blob::BlobSource;
use super::format::*;
use super::fsio::TempFile;
use super::seal::Sealer;
use super::tree::{TreeCursor, TreeReader, TreeRoot, tree_height};
use crate::crypto::Kind;
use crate::error::{Error, IoContext, Result};
use crate::hash::HashAlgorithm;
use crate::platform;
use crate::source::SourceInfo;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Statistics of the backup run(s) that produced a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SnapshotStats {
    /// Bytes read from the source (holes of sparse files are not read).
    pub bytes_read: u64,
    /// Blocks that hold data (a chunk reference).
    pub data_blocks: u64,
    /// Blocks that were all zeros or holes.
    pub zero_blocks: u64,
    /// Blocks the filesystem does not use (not read, restored as zeros).
    #[serde(default)]
    pub unused_blocks: u64,
    /// Blocks whose hash equals the parent's block at the same offset.
    pub unchanged_blocks: u64,
    /// Blocks whose chunk already existed in the repository (other volume, other offset).
    pub deduplicated_blocks: u64,
    /// Chunks written by this backup.
    pub new_chunks: u64,
    /// Uncompressed bytes of those chunks.
    pub new_bytes: u64,
    /// Bytes those chunks occupy in the repository (headers included).
    pub new_bytes_stored: u64,
    /// Wall-clock seconds of all runs that contributed (resumed runs add up).
    pub duration_secs: f64,
    /// How many times the backup was resumed after an interruption.
    pub resumed: u32,
}

/// The JSON header of a snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotHeader {
    /// RFC 3339 UTC time the backup started.
    pub time: String,
    /// Same, as Unix seconds.
    pub time_unix: i64,
    /// Nanoseconds past `time_unix`: orders snapshots started in the same second (0 in
    /// snapshots written before it existed).
    #[serde(default)]
    pub time_nanos: u32,
    pub hostname: String,
    pub source: SourceInfo,
    /// The filesystem found on the volume, if recognised.
    #[serde(default)]
    pub filesystem: Option<crate::fs::FsInfo>,
    /// The partition layout of a partitioned disk (each partition with its filesystem).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout: Option<crate::fs::disk::DiskLayout>,
    /// True when every block was read (`--all-blocks`, or no usable allocation map).
    #[serde(default)]
    pub all_blocks: bool,
    /// Identity used to find the parent of the next backup of the same volume.
    pub volume_key: String,
    pub block_size: u32,
    pub block_count: u64,
    pub chunk_hash: HashAlgorithm,
    pub parent: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    pub stats: SnapshotStats,
    /// Byte ranges that could not be read and were stored as zeros.
    #[serde(default)]
    pub unreadable: Vec<(u64, u64)>,
    /// True when the source was not mounted read-write while it was read: the snapshot is
    /// one point in time, and later backups may use it for change tracking. Absent in
    /// snapshots written before change tracking (not trusted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistent: Option<bool>,
    /// Version 3: the root of the block map (required there, absent before). Writers leave it
    /// `None`; [`write_tree_snapshot`] fills it in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tree: Option<TreeRoot>,
}

/// One entry of the segment directory.
#[derive(Debug, Clone, Copy)]
struct SegmentEntry {
    offset: u64,
    stored_len: u32,
    block_count: u32,
    hash: [u8; 32],
}

/// Writes a version 2 snapshot file (manifest segments, format 1 repositories) block by
/// block, in block order. Format 2 repositories write version 3: [`write_tree_snapshot`].
pub struct SnapshotWriter {
    tmp: TempFile,
    out: BufWriter<File>,
    pos: u64,
    records: Vec<u8>,
    blocks_in_segment: u64,
    blocks_total: u64,
    directory: Vec<SegmentEntry>,
    compressor: zstd::bulk::Compressor<'static>,
    /// A run of zero or unused blocks not yet encoded (merged with following equal runs).
    run: Option<(BlockRef, u64)>,
}

impl SnapshotWriter {
    /// Starts a snapshot in the repository's temporary directory `tmp_dir`.
    pub fn create(tmp_dir: &Path) -> Result<SnapshotWriter> {
        let tmp = TempFile::create_in(tmp_dir, ".snapshot")?;
        let file = tmp.file().try_clone().ctx("open", tmp.path())?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&SNAPSHOT_MAGIC).ctx("write", tmp.path())?;
        out.write_all(&SNAPSHOT_SEGMENTS_VERSION.to_le_bytes())
            .ctx("write", tmp.path())?;
        let compressor = zstd::bulk::Compressor::new(3)
            .map_err(|e| Error::io("set up zstd for", tmp.path(), e))?;
        Ok(SnapshotWriter {
            tmp,
            out,
            pos: SNAPSHOT_PREAMBLE_LEN as u64,
            records: Vec::new(),
            blocks_in_segment: 0,
            blocks_total: 0,
            directory: Vec::new(),
            compressor,
            run: None,
        })
    }

    /// Blocks pushed so far.
    pub fn blocks(&self) -> u64 {
        self.blocks_total + self.run.map_or(0, |(_, c)| c)
    }

    /// Appends `count` blocks that all refer to `r`.
    pub fn push(&mut self, r: BlockRef, count: u64) -> Result<()> {
        if count == 0 {
            return Ok(());
        }
        if let BlockRef::Part { .. } = r {
            return Err(Error::internal(
                "snapshot writer",
                "pieces of blobs belong in a tree (version 3), not in segments",
            ));
        }
        if let Some((pr, pc)) = self.run {
            if pr == r {
                self.run = Some((r, pc + count));
                return Ok(());
            }
            self.run = None;
            self.encode(pr, pc)?;
        }
        if r.is_data() {
            self.encode(r, count)
        } else {
            self.run = Some((r, count));
            Ok(())
        }
    }

    fn encode(&mut self, r: BlockRef, mut count: u64) -> Result<()> {
        while count > 0 {
            let n = count.min(SEGMENT_BLOCKS - self.blocks_in_segment);
            encode_run(&mut self.records, r, n);
            self.blocks_in_segment += n;
            self.blocks_total += n;
            count -= n;
            if self.blocks_in_segment == SEGMENT_BLOCKS {
                self.flush_segment()?;
            }
        }
        Ok(())
    }

    fn flush_segment(&mut self) -> Result<()> {
        if self.blocks_in_segment == 0 {
            return Ok(());
        }
        let stored = self
            .compressor
            .compress(&self.records)
            .map_err(|e| Error::io("compress manifest segment for", self.tmp.path(), e))?;
        self.out.write_all(&stored).ctx("write", self.tmp.path())?;
        self.directory.push(SegmentEntry {
            offset: self.pos,
            stored_len: stored.len() as u32,
            block_count: self.blocks_in_segment as u32,
            hash: *blake3::hash(&stored).as_bytes(),
        });
        self.pos += stored.len() as u64;
        self.records.clear();
        self.blocks_in_segment = 0;
        Ok(())
    }

    /// Writes header, directory and trailer, makes the file durable and moves it to
    /// `snapshots_dir/<id>`. `header.block_count` must equal the blocks pushed. Returns the id.
    pub fn finish(mut self, header: &SnapshotHeader, snapshots_dir: &Path) -> Result<String> {
        if let Some((r, c)) = self.run.take() {
            self.encode(r, c)?;
        }
        if header.block_count != self.blocks_total {
            return Err(Error::internal(
                "snapshot writer",
                format!(
                    "{} blocks were pushed but the header says {}",
                    self.blocks_total, header.block_count
                ),
            ));
        }
        if header.tree.is_some() {
            return Err(Error::internal(
                "snapshot writer",
                "a snapshot with segments cannot name a tree",
            ));
        }
        self.flush_segment()?;
        let dir_bytes = encode_directory(&self.directory);
        finish_file(
            self.tmp,
            self.out,
            SNAPSHOT_SEGMENTS_VERSION,
            self.pos,
            header,
            &dir_bytes,
            self.directory.len() as u32,
            snapshots_dir,
        )
    }
}

fn encode_directory(directory: &[SegmentEntry]) -> Vec<u8> {
    let mut dir_bytes = Vec::with_capacity(directory.len() * SEGMENT_DIR_ENTRY_LEN);
    for e in directory {
        dir_bytes.extend_from_slice(&e.offset.to_le_bytes());
        dir_bytes.extend_from_slice(&e.stored_len.to_le_bytes());
        dir_bytes.extend_from_slice(&e.block_count.to_le_bytes());
        dir_bytes.extend_from_slice(&e.hash);
    }
    dir_bytes
}

/// Writes header, directory and trailer after what `out` holds (`header_offset` bytes), makes
/// the file durable and moves it to `snapshots_dir/<id>`. Returns the id.
#[allow(clippy::too_many_arguments)]
fn finish_file(
    tmp: TempFile,
    mut out: BufWriter<File>,
    version: u32,
    header_offset: u64,
    header: &SnapshotHeader,
    dir_bytes: &[u8],
    segment_count: u32,
    snapshots_dir: &Path,
) -> Result<String> {
    let header_json = serde_json::to_vec(header).map_err(|e| {
        Error::internal("snapshot writer", format!("cannot encode the header: {e}"))
    })?;
    out.write_all(&header_json).ctx("write", tmp.path())?;
    let directory_offset = header_offset + header_json.len() as u64;
    out.write_all(dir_bytes).ctx("write", tmp.path())?;
    let mut trailer = Vec::with_capacity(SNAPSHOT_TRAILER_LEN);
    trailer.extend_from_slice(&header_offset.to_le_bytes());
    trailer.extend_from_slice(&(header_json.len() as u32).to_le_bytes());
    trailer.extend_from_slice(&segment_count.to_le_bytes());
    trailer.extend_from_slice(&directory_offset.to_le_bytes());
    trailer.extend_from_slice(&0u64.to_le_bytes());
    let checksum = snapshot_checksum(version, &header_json, dir_bytes, &trailer);
    trailer.extend_from_slice(&checksum);
    out.write_all(&trailer).ctx("write", tmp.path())?;
    out.flush().ctx("write", tmp.path())?;
    let id = hex::encode(checksum);
    let dest = snapshots_dir.join(&id);
    drop(out);
    tmp.persist(&dest, true)?;
    Ok(id)
}

/// Writes a version 3 snapshot: `header` with `tree` as its block map (every node of the
/// tree must already be durable and indexed), stored as `sealer` says, as the object
/// `snapshots/<id>` of `b`, durably. Returns the id.
pub fn write_tree_snapshot(
    b: &dyn WriteBackend,
    header: &SnapshotHeader,
    tree: TreeRoot,
    sealer: &Sealer,
) -> Result<String> {
    let want = tree_height(header.block_count);
    if tree.height != want {
        return Err(Error::internal(
            "snapshot writer",
            format!(
                "a tree of height {} for {} blocks (height {want} expected)",
                tree.height, header.block_count
            ),
        ));
    }
    let mut header = header.clone();
    header.tree = Some(tree);
    let (bytes, id) = encode_tree_snapshot(&header, sealer)?;
    b.put(&format!("snapshots/{id}"), &bytes, PutMode::Overwrite)?;
    Ok(id)
}

/// The bytes and id of a version 3 snapshot (it has no segments: preamble, header,
/// trailer). Plain: named by its checksum; sealed: one record named by its BLAKE3.
fn encode_tree_snapshot(header: &SnapshotHeader, sealer: &Sealer) -> Result<(Vec<u8>, String)> {
    let header_json = serde_json::to_vec(header).map_err(|e| {
        Error::internal("snapshot writer", format!("cannot encode the header: {e}"))
    })?;
    let header_offset = SNAPSHOT_PREAMBLE_LEN as u64;
    let mut out = Vec::with_capacity(
        SNAPSHOT_PREAMBLE_LEN + header_json.len() + SNAPSHOT_TRAILER_LEN + sealer.overhead(),
    );
    let start = sealer.begin_seal(&mut out);
    out.extend_from_slice(&SNAPSHOT_MAGIC);
    out.extend_from_slice(&SNAPSHOT_TREE_VERSION.to_le_bytes());
    out.extend_from_slice(&header_json);
    let mut trailer = Vec::with_capacity(SNAPSHOT_TRAILER_LEN);
    trailer.extend_from_slice(&header_offset.to_le_bytes());
    trailer.extend_from_slice(&(header_json.len() as u32).to_le_bytes());
    trailer.extend_from_slice(&0u32.to_le_bytes());
    trailer.extend_from_slice(&(header_offset + header_json.len() as u64).to_le_bytes());
    trailer.extend_from_slice(&0u64.to_le_bytes());
    let checksum = snapshot_checksum(SNAPSHOT_TREE_VERSION, &header_json, &[], &trailer);
    trailer.extend_from_slice(&checksum);
    out.extend_from_slice(&trailer);
    if !sealer.is_encrypted() {
        return Ok((out, hex::encode(checksum)));
    }
    sealer.finish_seal(Kind::Snapshot, b"", &mut out, start)?;
    let id = blake3::hash(&out).to_hex().to_string();
    Ok((out, id))
}

fn snapshot_checksum(
    version: u32,
    header: &[u8],
    directory: &[u8],
    trailer_fields: &[u8],
) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&SNAPSHOT_MAGIC);
    h.update(&version.to_le_bytes());
    h.update(header);
    h.update(directory);
    h.update(&trailer_fields[..32]);
    *h.finalize().as_bytes()
}

/// An opened, checked snapshot file. Cloning is cheap (the file handle is shared).
#[derive(Clone)]
pub struct SnapshotFile {
    path: PathBuf,
    /// Where its segments are read from (format 1 snapshots): the open file, or its bytes.
    data: Data,
    id: String,
    version: u32,
    header: SnapshotHeader,
    directory: Arc<Vec<SegmentEntry>>,
    /// Where the nodes of a version 3 snapshot's tree are read from.
    blobs: Option<Arc<dyn BlobSource>>,
}

impl std::fmt::Debug for SnapshotFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotFile")
            .field("path", &self.path)
            .field("id", &self.id)
            .field("version", &self.version)
            .field("header", &self.header)
            .field("segments", &self.directory.len())
            .field("blobs", &self.blobs.is_some())
            .finish()
    }
}

/// A snapshot's stored bytes: an open file, or the whole object read into memory.
#[derive(Clone)]
enum Data {
    File(Arc<File>),
    Memory(Arc<Vec<u8>>),
}

impl Data {
    fn bytes(&self) -> Bytes<'_> {
        match self {
            Data::File(f) => Bytes::File(f),
            Data::Memory(m) => Bytes::Memory(m),
        }
    }
}

/// Largest snapshot object read whole from a backend without local files (a version 3
/// snapshot is a header of at most `MAX_HEADER_LEN` bytes and a few more).
const MAX_SNAPSHOT_OBJECT: u64 = MAX_HEADER_LEN as u64 + 4096;

/// Where a snapshot's bytes are read from: the file (plain), or the opened record (sealed).
enum Bytes<'a> {
    File(&'a File),
    Memory(&'a [u8]),
}

impl Bytes<'_> {
    fn read(&self, path: &Path, offset: u64, len: usize) -> Result<Vec<u8>> {
        match self {
            Bytes::File(f) => read_exact_at(f, path, offset, len),
            Bytes::Memory(m) => usize::try_from(offset)
                .ok()
                .and_then(|o| m.get(o..o.checked_add(len)?))
                .map(<[u8]>::to_vec)
                .ok_or_else(|| Error::corrupt("snapshot", path, "file ends early")),
        }
    }
}

/// What the checks of a snapshot's container found.
struct Parsed {
    version: u32,
    header: SnapshotHeader,
    directory: Vec<SegmentEntry>,
    checksum: [u8; 32],
}

fn read_exact_at(file: &File, path: &Path, offset: u64, len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    platform::read_exact_at(file, &mut buf, offset).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => Error::corrupt("snapshot", path, "file ends early"),
        _ => Error::IoAt {
            op: "read",
            path: path.to_path_buf(),
            offset,
            source: e,
        },
    })?;
    Ok(buf)
}

impl SnapshotFile {
    /// Opens and checks the snapshot file at `path` of a plain repository. When
    /// `expected_id` is given, the file's checksum must match it.
    pub fn open(path: &Path, expected_id: Option<&str>) -> Result<SnapshotFile> {
        Self::open_with(
            &Sealer::plain(crate::hash::HashAlgorithm::Blake3),
            path,
            expected_id,
        )
    }

    /// Opens and checks snapshot object `key` of `b` (`snapshots/<id>`), stored as `sealer`
    /// says; see [`SnapshotFile::open_with`].
    pub fn open_in(
        b: &dyn ReadBackend,
        key: &str,
        sealer: &Sealer,
        expected_id: Option<&str>,
    ) -> Result<SnapshotFile> {
        let path = b.display_path(key);
        if b.local_root().is_some() {
            return Self::open_with(sealer, &path, expected_id);
        }
        let limit = MAX_SNAPSHOT_OBJECT + sealer.overhead() as u64;
        let stored = b.get(key, limit, "snapshot")?;
        Self::open_bytes(sealer, &path, Data::Memory(Arc::new(stored)), expected_id)
    }

    /// Opens and checks the snapshot file at `path`, stored as `sealer` says. When
    /// `expected_id` is given, the id (plain: the file's checksum; sealed: the BLAKE3 of the
    /// stored record, checked before the record is opened) must match it.
    pub fn open_with(
        sealer: &Sealer,
        path: &Path,
        expected_id: Option<&str>,
    ) -> Result<SnapshotFile> {
        let file = super::fsio::open_regular(path, false, "open snapshot")?;
        Self::open_bytes(sealer, path, Data::File(Arc::new(file)), expected_id)
    }

    fn open_bytes(
        sealer: &Sealer,
        path: &Path,
        file: Data,
        expected_id: Option<&str>,
    ) -> Result<SnapshotFile> {
        let len = match &file {
            Data::File(f) => f.metadata().ctx("stat", path)?.len(),
            Data::Memory(m) => m.len() as u64,
        };
        let bad = |d: String| Error::corrupt("snapshot", path, d);
        if !sealer.is_encrypted() {
            let parsed = Self::parse(&file.bytes(), len, path)?;
            let id = hex::encode(parsed.checksum);
            if let Some(expected) = expected_id
                && expected != id
            {
                return Err(bad(format!(
                    "file is named {expected} but its checksum is {id}"
                )));
            }
            return Ok(Self::from_parsed(path, file, id, parsed));
        }
        let limit = (SNAPSHOT_PREAMBLE_LEN + SNAPSHOT_TRAILER_LEN + sealer.overhead()) as u64
            + u64::from(MAX_HEADER_LEN);
        if len > limit {
            return Err(bad(format!("{len} bytes, more than a snapshot can hold")));
        }
        let mut stored = file.bytes().read(path, 0, len as usize)?;
        let id = blake3::hash(&stored).to_hex().to_string();
        if let Some(expected) = expected_id
            && expected != id
        {
            return Err(bad(format!(
                "file is named {expected} but the BLAKE3 of its bytes is {id}"
            )));
        }
        let what = format!("snapshot {id}");
        let plain = sealer.open_in_place(Kind::Snapshot, b"", &mut stored, &what, path)?;
        let plain = &stored[plain];
        let parsed = Self::parse(&Bytes::Memory(plain), plain.len() as u64, path)?;
        if parsed.version != SNAPSHOT_TREE_VERSION {
            return Err(bad(format!(
                "sealed snapshot of version {} (only version {SNAPSHOT_TREE_VERSION} is sealed)",
                parsed.version
            )));
        }
        Ok(Self::from_parsed(path, file, id, parsed))
    }

    fn from_parsed(path: &Path, file: Data, id: String, p: Parsed) -> SnapshotFile {
        SnapshotFile {
            path: path.to_path_buf(),
            data: file,
            id,
            version: p.version,
            header: p.header,
            directory: Arc::new(p.directory),
            blobs: None,
        }
    }

    /// Checks the container of `len` bytes read through `bytes`: preamble, trailer, header,
    /// directory, checksum.
    fn parse(bytes: &Bytes<'_>, len: u64, path: &Path) -> Result<Parsed> {
        let bad = |d: String| Error::corrupt("snapshot", path, d);
        let min = (SNAPSHOT_PREAMBLE_LEN + SNAPSHOT_TRAILER_LEN) as u64;
        if len < min {
            return Err(bad(format!("{len} bytes, too short to be a snapshot")));
        }
        let pre = bytes.read(path, 0, SNAPSHOT_PREAMBLE_LEN)?;
        if pre[..8] != SNAPSHOT_MAGIC {
            return Err(bad("bad magic (not a volback snapshot)".into()));
        }
        let version = le_u32(&pre, 8);
        if !SNAPSHOT_VERSIONS_READ.contains(&version) {
            return Err(Error::UnsupportedVersion {
                what: "snapshot",
                path: path.to_path_buf(),
                found: version,
                supported: SNAPSHOT_VERSION,
            });
        }
        let tr = bytes.read(
            path,
            len - SNAPSHOT_TRAILER_LEN as u64,
            SNAPSHOT_TRAILER_LEN,
        )?;
        let header_offset = le_u64(&tr, 0);
        let header_len = le_u32(&tr, 8);
        let segment_count = le_u32(&tr, 12);
        let directory_offset = le_u64(&tr, 16);
        let dir_len = segment_count as u64 * SEGMENT_DIR_ENTRY_LEN as u64;
        let trailer_at = len - SNAPSHOT_TRAILER_LEN as u64;
        if header_len > MAX_HEADER_LEN
            || header_offset < SNAPSHOT_PREAMBLE_LEN as u64
            || header_offset.checked_add(header_len as u64) != Some(directory_offset)
            || directory_offset.checked_add(dir_len) != Some(trailer_at)
        {
            return Err(bad(
                "trailer offsets are inconsistent (truncated or damaged file)".into(),
            ));
        }
        let header_json = bytes.read(path, header_offset, header_len as usize)?;
        let dir_bytes = bytes.read(path, directory_offset, dir_len as usize)?;
        let checksum = snapshot_checksum(version, &header_json, &dir_bytes, &tr);
        if checksum[..] != tr[32..64] {
            return Err(bad("checksum mismatch (damaged file)".into()));
        }
        let header: SnapshotHeader =
            serde_json::from_slice(&header_json).map_err(|e| bad(format!("header: {e}")))?;
        let bs = header.block_size;
        if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) || !bs.is_power_of_two() {
            return Err(bad(format!("block size {bs} out of range")));
        }
        if header.block_count != header.source.size.div_ceil(bs as u64) {
            return Err(bad(format!(
                "{} blocks do not fit a volume of {} bytes",
                header.block_count, header.source.size
            )));
        }
        let want_segments = if version >= SNAPSHOT_TREE_VERSION {
            let Some(tree) = header.tree else {
                return Err(bad(format!("version {version} snapshot without a tree")));
            };
            let want = tree_height(header.block_count);
            if tree.height != want {
                return Err(bad(format!(
                    "tree of height {} for {} blocks (height {want} expected)",
                    tree.height, header.block_count
                )));
            }
            0
        } else {
            if header.tree.is_some() {
                return Err(bad(format!("version {version} snapshot names a tree")));
            }
            header.block_count.div_ceil(SEGMENT_BLOCKS)
        };
        if segment_count as u64 != want_segments {
            return Err(bad(format!(
                "{segment_count} segments for {} blocks",
                header.block_count
            )));
        }
        let mut directory = Vec::with_capacity(segment_count as usize);
        let mut expect_offset = SNAPSHOT_PREAMBLE_LEN as u64;
        for (i, e) in dir_bytes.chunks_exact(SEGMENT_DIR_ENTRY_LEN).enumerate() {
            let mut hash = [0u8; 32];
            hash.copy_from_slice(&e[16..48]);
            let entry = SegmentEntry {
                offset: le_u64(e, 0),
                stored_len: le_u32(e, 8),
                block_count: le_u32(e, 12),
                hash,
            };
            let want_blocks = (header.block_count - i as u64 * SEGMENT_BLOCKS).min(SEGMENT_BLOCKS);
            if entry.offset != expect_offset || entry.block_count as u64 != want_blocks {
                return Err(bad(format!("segment {i} directory entry is inconsistent")));
            }
            expect_offset = entry.offset + entry.stored_len as u64;
            directory.push(entry);
        }
        if expect_offset != header_offset {
            return Err(bad("segments do not end where the header starts".into()));
        }
        Ok(Parsed {
            version,
            header,
            directory,
            checksum,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn header(&self) -> &SnapshotHeader {
        &self.header
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's format version (1, 2: segments; 3: tree).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The root of the block map of a version 3 snapshot.
    pub fn tree(&self) -> Option<TreeRoot> {
        self.header.tree
    }

    /// Attaches the blob source that a version 3 snapshot's tree is read from (the
    /// repository's blob store, or a backup's own). Snapshots with segments do not need one.
    pub fn set_blobs(&mut self, blobs: Arc<dyn BlobSource>) {
        self.blobs = Some(blobs);
    }

    /// [`Self::set_blobs`], by value.
    pub fn with_blobs(mut self, blobs: Arc<dyn BlobSource>) -> SnapshotFile {
        self.set_blobs(blobs);
        self
    }

    /// The blob source attached by [`Self::set_blobs`].
    pub fn blobs(&self) -> Option<&Arc<dyn BlobSource>> {
        self.blobs.as_ref()
    }

    pub fn segment_count(&self) -> usize {
        self.directory.len()
    }

    /// Loads segment `index`: the references of blocks
    /// `index * SEGMENT_BLOCKS .. + block_count`. A version 3 snapshot has no segments.
    pub fn segment(&self, index: usize) -> Result<Vec<BlockRef>> {
        let e = self.directory.get(index).ok_or_else(|| {
            // The blocks of a segment past the last one.
            let bs = self.header.block_size as u64;
            Error::read_out_of_range(
                format!("snapshot {}", self.id),
                (index as u64)
                    .saturating_mul(SEGMENT_BLOCKS)
                    .saturating_mul(bs),
                SEGMENT_BLOCKS * bs,
                self.header.source.size,
            )
        })?;
        let what = || format!("manifest segment {index} of snapshot {}", self.id);
        let stored = self
            .data
            .bytes()
            .read(&self.path, e.offset, e.stored_len as usize)?;
        if *blake3::hash(&stored).as_bytes() != e.hash {
            return Err(Error::corrupt(what(), &self.path, "checksum mismatch"));
        }
        let bound = e.block_count as usize * REC_MAX_LEN;
        let raw = zstd::bulk::decompress(&stored, bound)
            .map_err(|err| Error::corrupt(what(), &self.path, format!("zstd: {err}")))?;
        let mut out = Vec::with_capacity(e.block_count as usize);
        let mut part = false;
        decode_records(&raw, e.block_count as u64, |r, n| {
            part |= matches!(r, BlockRef::Part { .. });
            out.extend(std::iter::repeat_n(r, n as usize))
        })
        .map_err(|d| Error::corrupt(what(), &self.path, d))?;
        if part {
            // Pieces of blobs belong in trees; a segment holding one is damaged.
            return Err(Error::corrupt(
                what(),
                &self.path,
                "format 2 record in a segment",
            ));
        }
        Ok(out)
    }

    /// The block map: segments (versions 1, 2) or the tree (version 3, read through the
    /// attached blob source; an error without one).
    pub fn block_map(&self) -> Result<BlockMap> {
        match self.header.tree {
            None => Ok(BlockMap::Segments(Arc::new(SegmentMap {
                snap: self.clone(),
                cache: Mutex::new(Vec::new()),
            }))),
            Some(root) => {
                let Some(blobs) = &self.blobs else {
                    return Err(Error::internal(
                        "snapshot reader",
                        format!(
                            "snapshot {} (version {}) was opened without its blob store",
                            self.id, self.version
                        ),
                    ));
                };
                Ok(BlockMap::Tree(Arc::new(TreeReader::new(
                    blobs.clone(),
                    root,
                    self.header.block_count,
                    format!("snapshot {}", self.id),
                    &self.path,
                )?)))
            }
        }
    }

    /// Visits every block in order: `f(first_block, ref, count)` per run (equal references,
    /// or consecutive pieces of one blob: see [`BlockRef::advance`]).
    pub fn for_each_run(&self, f: impl FnMut(u64, BlockRef, u64) -> Result<()>) -> Result<()> {
        self.block_map()?.for_each_run(f)
    }
}

/// How many decoded manifest segments a [`BlockMap`] keeps (a few MiB each).
const CACHED_SEGMENTS: usize = 4;

/// The segments of a version 1 or 2 snapshot, with a small cache of decoded ones.
pub struct SegmentMap {
    snap: SnapshotFile,
    cache: Mutex<Vec<(usize, Arc<Vec<BlockRef>>)>>,
}

impl SegmentMap {
    /// Segment `index`, decoded (from the cache when it is there).
    fn segment(&self, index: usize) -> Result<Arc<Vec<BlockRef>>> {
        {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((_, s)) = cache.iter().find(|(i, _)| *i == index) {
                return Ok(s.clone());
            }
        }
        let seg = Arc::new(self.snap.segment(index)?);
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHED_SEGMENTS {
            cache.remove(0);
        }
        cache.push((index, seg.clone()));
        Ok(seg)
    }

    fn get(&self, seg: &[BlockRef], index: u64) -> Result<BlockRef> {
        seg.get((index % SEGMENT_BLOCKS) as usize)
            .copied()
            .ok_or_else(|| {
                Error::corrupt(
                    format!(
                        "manifest segment of block {index} of snapshot {}",
                        self.snap.id()
                    ),
                    self.snap.path(),
                    "segment is shorter than the block count says",
                )
            })
    }
}

/// A snapshot's block map, whatever its version: the references of its blocks by index, in
/// runs, or through a cursor. Cloning is cheap (the caches are shared).
#[derive(Clone)]
pub enum BlockMap {
    /// Versions 1 and 2: manifest segments in the snapshot file.
    Segments(Arc<SegmentMap>),
    /// Version 3: a tree of blobs.
    Tree(Arc<TreeReader>),
}

impl BlockMap {
    pub fn block_count(&self) -> u64 {
        match self {
            BlockMap::Segments(s) => s.snap.header().block_count,
            BlockMap::Tree(t) => t.block_count(),
        }
    }

    /// The reference of block `index`; past the end, an [`Error::OutOfRange`].
    pub fn block_ref(&self, index: u64) -> Result<BlockRef> {
        match self {
            BlockMap::Segments(s) => {
                let h = s.snap.header();
                if index >= h.block_count {
                    let bs = h.block_size as u64;
                    return Err(Error::read_out_of_range(
                        format!("snapshot {}", s.snap.id()),
                        index.saturating_mul(bs),
                        bs,
                        h.source.size,
                    ));
                }
                let seg = s.segment((index / SEGMENT_BLOCKS) as usize)?;
                s.get(&seg, index)
            }
            BlockMap::Tree(t) => t.block_ref(index),
        }
    }

    /// The reference of block `index` and how many blocks from it on continue its run (at
    /// least 1; a run may be cut short at a segment or leaf boundary). Walking a volume run by
    /// run costs one lookup per run, not per block.
    pub fn run_at(&self, index: u64) -> Result<(BlockRef, u64)> {
        match self {
            BlockMap::Segments(s) => {
                let r = self.block_ref(index)?;
                let seg = s.segment((index / SEGMENT_BLOCKS) as usize)?;
                let at = (index % SEGMENT_BLOCKS) as usize;
                let n = seg
                    .get(at..)
                    .unwrap_or(&[])
                    .iter()
                    .take_while(|x| **x == r)
                    .count()
                    .max(1);
                Ok((r, n as u64))
            }
            BlockMap::Tree(t) => {
                if index >= t.block_count() {
                    return self.block_ref(index).map(|r| (r, 1));
                }
                t.run_at(index)
            }
        }
    }

    /// Visits every block in order: `f(first_block, ref, count)` per run (equal references,
    /// or consecutive pieces of one blob: see [`BlockRef::advance`]).
    pub fn for_each_run(&self, mut f: impl FnMut(u64, BlockRef, u64) -> Result<()>) -> Result<()> {
        match self {
            BlockMap::Segments(s) => {
                for i in 0..s.snap.directory.len() {
                    let seg = s.snap.segment(i)?;
                    let base = i as u64 * SEGMENT_BLOCKS;
                    let mut j = 0usize;
                    while j < seg.len() {
                        let r = seg[j];
                        let mut k = j + 1;
                        while k < seg.len() && seg[k] == r {
                            k += 1;
                        }
                        f(base + j as u64, r, (k - j) as u64)?;
                        j = k;
                    }
                }
                Ok(())
            }
            BlockMap::Tree(t) => t.for_each_run(f),
        }
    }

    /// A cursor for reading references in increasing block order (one segment or leaf
    /// decoded at a time).
    pub fn cursor(&self) -> MapCursor {
        match self {
            BlockMap::Segments(s) => MapCursor::Segments {
                map: s.clone(),
                index: usize::MAX,
                segment: Arc::new(Vec::new()),
            },
            BlockMap::Tree(t) => MapCursor::Tree(TreeReader::cursor(t)),
        }
    }
}

/// Reads a [`BlockMap`] in increasing block order.
pub enum MapCursor {
    Segments {
        map: Arc<SegmentMap>,
        index: usize,
        segment: Arc<Vec<BlockRef>>,
    },
    Tree(TreeCursor),
}

impl MapCursor {
    /// The reference of block `index`; `None` past the end. Sequential access is cheap.
    pub fn get(&mut self, index: u64) -> Result<Option<BlockRef>> {
        match self {
            MapCursor::Segments {
                map,
                index: seg_index,
                segment,
            } => {
                if index >= map.snap.header().block_count {
                    return Ok(None);
                }
                let seg = (index / SEGMENT_BLOCKS) as usize;
                if seg != *seg_index {
                    *segment = map.segment(seg)?;
                    *seg_index = seg;
                }
                map.get(segment, index).map(Some)
            }
            MapCursor::Tree(c) => c.get(index),
        }
    }
}

/// Streams a snapshot's block references in order, one segment or leaf in memory at a time.
/// A version 3 snapshot needs its blob source attached ([`SnapshotFile::set_blobs`]).
pub struct BlockCursor<'a> {
    snap: &'a SnapshotFile,
    cursor: Option<MapCursor>,
}

impl<'a> BlockCursor<'a> {
    pub fn new(snap: &'a SnapshotFile) -> Self {
        BlockCursor { snap, cursor: None }
    }

    /// The reference of block `index`; `None` past the end. Sequential access is cheap.
    pub fn get(&mut self, index: u64) -> Result<Option<BlockRef>> {
        if index >= self.snap.header.block_count {
            return Ok(None);
        }
        if self.cursor.is_none() {
            self.cursor = Some(self.snap.block_map()?.cursor());
        }
        match &mut self.cursor {
            Some(c) => c.get(index),
            None => Ok(None),
        }
    }
}

/// Helpers for tests of the modules that read snapshots.
#[cfg(test)]
pub(crate) mod testing {
    /// A local backend on `dir`, with its `snapshots/` directory.
    pub fn backend(dir: &Path) -> crate::repo::backend::local::LocalDir {
        std::fs::create_dir_all(dir.join("snapshots")).unwrap();
        crate::repo::backend::local::LocalDir::new(dir)
    }

    use super::*;

    /// A header for a volume of `size` bytes in blocks of `block_size`.
    pub fn header(size: u64, block_size: u32) -> SnapshotHeader {
        SnapshotHeader {
            time: "2026-12-03T00:00:00Z".into(),
            time_unix: 0,
            time_nanos: 0,
            hostname: "h".into(),
            source: SourceInfo {
                path: "/dev/x".into(),
                kind: "file".into(),
                size,
                logical_sector_size: 512,
                physical_sector_size: 512,
            },
            filesystem: None,
            layout: None,
            all_blocks: true,
            volume_key: "k".into(),
            block_size,
            block_count: size.div_ceil(block_size as u64),
            chunk_hash: HashAlgorithm::Blake3,
            parent: None,
            tags: Vec::new(),
            stats: SnapshotStats::default(),
            unreadable: Vec::new(),
            consistent: None,
            tree: None,
        }
    }

    /// Writes the runs as a version 3 snapshot of `size` bytes into `dir` (blobs into
    /// `sink`) and opens it with `src` attached.
    pub fn tree_snapshot(
        dir: &Path,
        size: u64,
        block_size: u32,
        runs: &[(BlockRef, u64)],
        blobs: Arc<super::super::tree::testing::MemBlobs>,
    ) -> SnapshotFile {
        let h = header(size, block_size);
        let mut w = super::super::tree::TreeWriter::new(&*blobs, h.block_count);
        for &(r, n) in runs {
            w.push(r, n).unwrap();
        }
        let root = w.finish().unwrap();
        let plain = Sealer::plain(HashAlgorithm::Blake3);
        let id = write_tree_snapshot(&backend(dir), &h, root, &plain).unwrap();
        SnapshotFile::open(&dir.join("snapshots").join(&id), Some(&id))
            .unwrap()
            .with_blobs(blobs)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tree::testing::MemBlobs;
    use super::super::tree::{LEAF_BLOCKS, TreeWriter};
    use super::testing::{header, tree_snapshot};
    use super::*;

    fn write_snapshot(dir: &Path) -> PathBuf {
        let mut w = SnapshotWriter::create(dir).unwrap();
        w.push(BlockRef::Zero, 3).unwrap();
        let id = w.finish(&header(3 * 4096, 4096), dir).unwrap();
        dir.join(id)
    }

    /// Writes a file with any version and header (checksum valid), for the checks of `open`.
    fn write_raw(dir: &Path, version: u32, h: &SnapshotHeader) -> PathBuf {
        let tmp = TempFile::create_in(dir, ".snapshot").unwrap();
        let mut out = BufWriter::new(tmp.file().try_clone().unwrap());
        out.write_all(&SNAPSHOT_MAGIC).unwrap();
        out.write_all(&version.to_le_bytes()).unwrap();
        let id = finish_file(tmp, out, version, 12, h, &[], 0, dir).unwrap();
        dir.join(id)
    }

    fn part(b: u8, index: u32) -> BlockRef {
        BlockRef::Part {
            blob: crate::hash::ChunkId([b; 32]),
            index,
        }
    }

    #[test]
    fn version_3_snapshots_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = MemBlobs::new();
        let blocks = LEAF_BLOCKS + 7;
        let runs = [
            (part(1, 0), 4),
            (BlockRef::Unused, LEAF_BLOCKS),
            (part(2, 3), 2),
            (BlockRef::Zero, 1),
        ];
        let snap = tree_snapshot(dir.path(), blocks * 4096 - 100, 4096, &runs, blobs.clone());
        assert_eq!(snap.version(), SNAPSHOT_TREE_VERSION);
        assert_eq!(snap.segment_count(), 0);
        let tree = snap.tree().unwrap();
        assert_eq!(tree.height, 1);
        // The header JSON names the tree in hex.
        let json = serde_json::to_value(snap.header()).unwrap();
        assert_eq!(json["tree"]["root"], tree.root.to_hex());
        assert_eq!(json["tree"]["height"], 1);
        let want: Vec<BlockRef> = runs
            .iter()
            .flat_map(|&(r, n)| (0..n).map(move |k| r.advance(k)))
            .collect();
        let mut got = Vec::new();
        snap.for_each_run(|first, r, n| {
            assert_eq!(first, got.len() as u64);
            got.extend((0..n).map(|k| r.advance(k)));
            Ok(())
        })
        .unwrap();
        assert_eq!(got, want);
        let map = snap.block_map().unwrap();
        assert_eq!(map.block_count(), blocks);
        assert_eq!(map.block_ref(2).unwrap(), part(1, 2));
        assert_eq!(map.block_ref(LEAF_BLOCKS + 5).unwrap(), part(2, 4));
        assert!(matches!(
            map.block_ref(blocks),
            Err(Error::OutOfRange { .. })
        ));
        let mut c = BlockCursor::new(&snap);
        for (i, w) in want.iter().enumerate() {
            assert_eq!(c.get(i as u64).unwrap(), Some(*w));
        }
        assert_eq!(c.get(blocks).unwrap(), None);
        // Without a blob source the tree cannot be read, but the file opens.
        let bare = SnapshotFile::open(snap.path(), Some(snap.id())).unwrap();
        assert!(bare.block_map().is_err());
        assert!(BlockCursor::new(&bare).get(0).is_err());
        assert!(matches!(bare.segment(0), Err(Error::OutOfRange { .. })));
    }

    #[test]
    fn segments_and_trees_read_alike() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_snapshot(dir.path());
        let snap = SnapshotFile::open(&path, None).unwrap();
        assert_eq!(snap.version(), SNAPSHOT_SEGMENTS_VERSION);
        assert_eq!(snap.tree(), None);
        let map = snap.block_map().unwrap();
        assert_eq!(map.block_ref(2).unwrap(), BlockRef::Zero);
        let mut runs = Vec::new();
        map.for_each_run(|f, r, n| {
            runs.push((f, r, n));
            Ok(())
        })
        .unwrap();
        assert_eq!(runs, vec![(0, BlockRef::Zero, 3)]);
        assert_eq!(map.run_at(1).unwrap(), (BlockRef::Zero, 2));
        assert!(map.run_at(3).is_err());
        let mut c = map.cursor();
        assert_eq!(c.get(1).unwrap(), Some(BlockRef::Zero));
        assert_eq!(c.get(3).unwrap(), None);
        // Pieces of blobs have no place in segments.
        let mut w = SnapshotWriter::create(dir.path()).unwrap();
        assert!(w.push(part(1, 0), 1).is_err());
    }

    #[test]
    fn the_tree_field_must_match_the_version() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = MemBlobs::new();
        let h = header(5 * 4096, 4096);
        let mut tw = TreeWriter::new(&*blobs, 5);
        tw.push(BlockRef::Zero, 5).unwrap();
        let root = tw.finish().unwrap();
        // Version 3 without a tree.
        let p = write_raw(dir.path(), 3, &h);
        let e = SnapshotFile::open(&p, None).unwrap_err().to_string();
        assert!(e.contains("without a tree"), "{e}");
        // Version 2 naming a tree.
        let mut with_tree = h.clone();
        with_tree.tree = Some(root);
        let p = write_raw(dir.path(), 2, &with_tree);
        let e = SnapshotFile::open(&p, None).unwrap_err().to_string();
        assert!(e.contains("names a tree"), "{e}");
        // A height that does not fit the block count.
        let mut tall = h.clone();
        tall.tree = Some(super::super::tree::TreeRoot {
            root: root.root,
            height: 1,
        });
        let p = write_raw(dir.path(), 3, &tall);
        let e = SnapshotFile::open(&p, None).unwrap_err().to_string();
        assert!(e.contains("height"), "{e}");
        let plain = Sealer::plain(HashAlgorithm::Blake3);
        let tall_root = tall.tree.unwrap();
        let b = super::testing::backend(dir.path());
        assert!(write_tree_snapshot(&b, &h, tall_root, &plain).is_err());
        // The segments writer refuses a header naming a tree.
        let mut w = SnapshotWriter::create(dir.path()).unwrap();
        w.push(BlockRef::Zero, 5).unwrap();
        assert!(w.finish(&with_tree, dir.path()).is_err());
        // The good one.
        let id = write_tree_snapshot(&b, &h, root, &plain).unwrap();
        let snap = SnapshotFile::open(&dir.path().join("snapshots").join(&id), Some(&id)).unwrap();
        assert_eq!(snap.tree(), Some(root));
        // A root that is not hex is a damaged header.
        let mut json = serde_json::to_value(&with_tree).unwrap();
        json["tree"]["root"] = "zz".into();
        assert!(serde_json::from_value::<SnapshotHeader>(json).is_err());
    }

    #[test]
    fn sealed_snapshots_are_named_by_their_stored_bytes_and_authenticated() {
        let dir = tempfile::tempdir().unwrap();
        let sealer = crate::repo::seal::testing::encrypted("5a");
        let blobs = MemBlobs::new();
        let h = header(5 * 4096 + 1, 4096);
        let mut tw = TreeWriter::new(&*blobs, h.block_count);
        tw.push(BlockRef::Zero, 6).unwrap();
        let root = tw.finish().unwrap();
        let b = super::testing::backend(dir.path());
        let id = write_tree_snapshot(&b, &h, root, &sealer).unwrap();
        let path = dir.path().join("snapshots").join(&id);
        let stored = std::fs::read(&path).unwrap();
        assert_eq!(blake3::hash(&stored).to_hex().as_str(), id);
        assert!(!stored.windows(8).any(|w| w == SNAPSHOT_MAGIC));
        assert!(!stored.windows(8).any(|w| w == b"hostname"));
        let snap = SnapshotFile::open_with(&sealer, &path, Some(&id)).unwrap();
        assert_eq!((snap.id(), snap.tree()), (id.as_str(), Some(root)));
        assert_eq!(snap.header().source.size, 5 * 4096 + 1);
        assert_eq!(
            SnapshotFile::open_with(&sealer, &path, None).unwrap().id(),
            id
        );
        let snap = snap.with_blobs(blobs.clone());
        assert_eq!(
            snap.block_map().unwrap().block_ref(5).unwrap(),
            BlockRef::Zero
        );
        // Renamed: refused before it is opened.
        let e = SnapshotFile::open_with(&sealer, &path, Some(&"0".repeat(64))).unwrap_err();
        assert!(e.to_string().contains("BLAKE3 of its bytes"), "{e}");
        // A changed byte, under its new name: authentication fails, naming the snapshot.
        let mut bad = stored.clone();
        bad[40] ^= 4;
        let bad_id = blake3::hash(&bad).to_hex().to_string();
        std::fs::write(dir.path().join(&bad_id), &bad).unwrap();
        let e =
            SnapshotFile::open_with(&sealer, &dir.path().join(&bad_id), Some(&bad_id)).unwrap_err();
        assert!(matches!(e, Error::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains(&format!("snapshot {bad_id}")), "{e}");
        // Another key, a plain reader, a truncated file: errors, no panic.
        let other = crate::repo::seal::testing::encrypted("5b");
        assert!(SnapshotFile::open_with(&other, &path, Some(&id)).is_err());
        assert!(SnapshotFile::open(&path, None).is_err());
        for cut in [0, 10, 39, 40, stored.len() - 1] {
            std::fs::write(&path, &stored[..cut]).unwrap();
            assert!(
                SnapshotFile::open_with(&sealer, &path, None).is_err(),
                "cut {cut}"
            );
        }
        // A sealed snapshot with segments (version 2) is refused.
        let seg = write_snapshot(dir.path());
        let plain_bytes = std::fs::read(&seg).unwrap();
        let sealed_seg = sealer.seal(Kind::Snapshot, b"", &plain_bytes).unwrap();
        let sid = blake3::hash(&sealed_seg).to_hex().to_string();
        std::fs::write(dir.path().join(&sid), &sealed_seg[..]).unwrap();
        let e = SnapshotFile::open_with(&sealer, &dir.path().join(&sid), Some(&sid)).unwrap_err();
        assert!(e.to_string().contains("only version 3"), "{e}");
    }

    #[test]
    fn a_snapshot_of_the_next_version_is_unsupported() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_snapshot(dir.path());
        let snap = SnapshotFile::open(&path, None).unwrap();
        assert_eq!(snap.segment(0).unwrap(), vec![BlockRef::Zero; 3]);
        // Past the last segment: out of range, not a bad argument.
        assert!(matches!(snap.segment(1), Err(Error::OutOfRange { .. })));
        crate::error::testing::set_version(&path, SNAPSHOT_VERSION + 1);
        let e = SnapshotFile::open(&path, None).unwrap_err();
        assert!(
            crate::error::testing::is_next_version(&e, "snapshot", SNAPSHOT_VERSION),
            "{e}"
        );
    }
}
