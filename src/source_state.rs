//! The state of a source, recorded when a backup or copy starts and compared before an
//! interrupted run is resumed: a resume must prove the source is still what the finished part
//! was read from, or start over (a resumed run otherwise mixes two states of the volume).
//!
//! A [`SourceState`] holds BLAKE3 hashes of, by name:
//!
//! - `platform`: the write markers the operating system keeps ([`crate::platform::write_markers`]:
//!   a file's identity, size, mtime and ctime; a block device's write and discard counters,
//!   those of its disk and the backing file of a loop device). Unknown on some platforms and
//!   devices: then nothing can be proved and the run starts over.
//! - `partition_table`: sector 0, the primary GPT header and array (sectors 1..34), the last
//!   33 sectors (backup GPT) and the parsed layout (which covers every EBR).
//! - `filesystems`: write markers of each filesystem found (the whole volume or each
//!   partition) read at their documented places, see [`fs_ranges`]: the whole ext2/3/4
//!   superblock (write and mount times, mount count, kbytes written, state, free counts); the
//!   XFS superblock sector and the sectors around the head of its internal log; the btrfs
//!   superblock (generation); the NTFS boot sector, MFT records 0..15 and the first pages of
//!   `$LogFile` (restart area); the FAT boot sector and FATs; the exFAT boot sector, FAT,
//!   allocation bitmap and first root directory cluster.
//! - `allocation`: the allocation map the run uses.
//!
//! These are compared before the journal is replayed. Then [`SampleCheck`] re-reads a sample
//! of the blocks the journal says are finished (the first ones and an even spread, at most
//! [`SAMPLE_MAX`]) and compares them with the content hashes the journal recorded (format 1)
//! or with the bytes of the blob piece it recorded, read from the repository (format 2, PART
//! records: no per-block hash exists, so the blob is read; at most [`SAMPLE_MAX`] blobs): this
//! is what catches a change of content volback cannot interpret. It is a sample, not a proof.

use crate::error::Result;
use crate::fs::disk::DiskLayout;
use crate::fs::{BlockMap, FsInfo};
use crate::source::Source;
use crate::volume::Volume;
use serde::{Deserialize, Serialize};

/// Version of the [`SourceState`] record; a record of another version proves nothing.
pub const SOURCE_STATE_VERSION: u32 = 1;

/// Blocks re-read at most when a resume is checked.
pub const SAMPLE_MAX: usize = 64;

/// Blocks from the start of the volume that are always in the sample.
const SAMPLE_FIRST: u64 = 16;

/// Most bytes hashed from one filesystem structure (a FAT, an exFAT bitmap): beyond this only
/// the start is hashed (the platform markers and the sample cover the rest).
const MAX_REGION: u64 = 16 << 20;

/// One named marker: what it is made of and the BLAKE3 hash of it (hex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    pub what: String,
    pub hash: String,
}

/// The write markers of one filesystem on the source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsMarker {
    /// Byte offset of the filesystem on the source.
    pub offset: u64,
    #[serde(rename = "type")]
    pub fs_type: String,
    pub hash: String,
}

/// What a run records about its source when it starts (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceState {
    pub version: u32,
    /// `None`: the platform cannot tell whether the source was written.
    pub platform: Option<Marker>,
    pub partition_table: Option<String>,
    pub filesystems: Vec<FsMarker>,
    /// Hash of the allocation map's used runs, or of "every block".
    pub allocation: String,
}

fn hex_hash(h: blake3::Hasher) -> String {
    hex::encode(h.finalize().as_bytes())
}

/// Hashes `len` bytes at `offset` of `vol` into `h` (clipped to the volume; an unreadable
/// range hashes as a fixed marker, so that it compares equal only with itself unreadable).
fn hash_range(vol: &dyn Volume, offset: u64, len: u64, h: &mut blake3::Hasher) {
    let size = vol.size();
    let end = offset.saturating_add(len).min(size);
    h.update(&offset.to_le_bytes());
    h.update(&end.saturating_sub(offset).to_le_bytes());
    let mut at = offset;
    let mut buf = vec![0u8; (end.saturating_sub(offset)).min(1 << 20) as usize];
    while at < end {
        let n = ((end - at) as usize).min(buf.len());
        match vol.read_at(at, &mut buf[..n]) {
            Ok(()) => {
                h.update(&buf[..n]);
            }
            Err(_) => {
                h.update(b"\0unreadable\0");
            }
        }
        at += n as u64;
    }
}

fn read_bytes(vol: &dyn Volume, offset: u64, len: usize) -> Option<Vec<u8>> {
    let mut b = vec![0u8; len];
    (offset.checked_add(len as u64)? <= vol.size() && vol.read_at(offset, &mut b).is_ok())
        .then_some(b)
}

/// The `N` bytes at `at` in `b`, `None` past its end.
fn bytes_at<const N: usize>(b: &[u8], at: usize) -> Option<[u8; N]> {
    b.get(at..at + N)?.try_into().ok()
}

fn le16(b: &[u8], at: usize) -> u64 {
    bytes_at(b, at).map_or(0, |s| u16::from_le_bytes(s) as u64)
}

fn le32(b: &[u8], at: usize) -> u64 {
    bytes_at(b, at).map_or(0, |s| u32::from_le_bytes(s) as u64)
}

fn le64(b: &[u8], at: usize) -> u64 {
    bytes_at(b, at).map_or(0, u64::from_le_bytes)
}

fn be32(b: &[u8], at: usize) -> u64 {
    bytes_at(b, at).map_or(0, |s| u32::from_be_bytes(s) as u64)
}

fn be64(b: &[u8], at: usize) -> u64 {
    bytes_at(b, at).map_or(0, u64::from_be_bytes)
}

/// The byte ranges (relative to the filesystem's start) that hold the write markers of a
/// filesystem of type `fs_type` (`blkid` names) on `vol` at `base`. Derived values are read
/// defensively: a nonsense field only yields fewer or clipped ranges.
pub fn fs_ranges(vol: &dyn Volume, base: u64, fs_type: &str) -> Vec<(u64, u64)> {
    match fs_type {
        // The whole superblock: s_wtime, s_mtime, s_mnt_count, s_state, free counts,
        // s_kbytes_written...
        "ext2" | "ext3" | "ext4" => vec![(1024, 1024)],
        // The primary superblock (generation, roots).
        "btrfs" => vec![(64 << 10, 4096)],
        "xfs" => first_sector_and(vol, base, xfs_ranges),
        "ntfs" => first_sector_and(vol, base, ntfs_ranges),
        "vfat" => first_sector_and(vol, base, fat_ranges),
        "exfat" => first_sector_and(vol, base, exfat_ranges),
        _ => Vec::new(),
    }
}

/// Adds the ranges derived from a filesystem's first sector (passed in) to `out`.
type MoreRanges = fn(&dyn Volume, u64, &[u8], &mut Vec<(u64, u64)>);

/// The ranges of a filesystem whose first sector (superblock or boot sector) holds write
/// markers: that sector, then what `more` derives from it (nothing when it cannot be read).
fn first_sector_and(vol: &dyn Volume, base: u64, more: MoreRanges) -> Vec<(u64, u64)> {
    let mut out = vec![(0, 512)];
    if let Some(first) = read_bytes(vol, base, 512) {
        more(vol, base, &first, &mut out);
    }
    out
}

/// The superblock sector and the 4 KiB on each side of the head of the internal log (where
/// the cycle number stamped in each 512-byte log sector drops; found by binary search). Any
/// transaction, and every mount and unmount, moves the head.
fn xfs_ranges(vol: &dyn Volume, base: u64, sb: &[u8], out: &mut Vec<(u64, u64)>) {
    let blocksize = be32(sb, 4);
    let logstart = be64(sb, 48);
    let agblocks = be32(sb, 84);
    let logblocks = be32(sb, 96);
    let agblklog = sb.get(124).copied().unwrap_or(0) as u32;
    if logstart == 0 || !(512..=65536).contains(&blocksize) || agblklog >= 64 || logblocks == 0 {
        return;
    }
    let agno = logstart >> agblklog;
    let agbno = logstart & ((1u64 << agblklog) - 1);
    let Some(start) = agno
        .checked_mul(agblocks)
        .and_then(|b| b.checked_add(agbno))
        .and_then(|b| b.checked_mul(blocksize))
    else {
        return;
    };
    let sectors = logblocks * blocksize / 512;
    let cycle = |i: u64| {
        read_bytes(vol, base.saturating_add(start).saturating_add(i * 512), 4).map(|b| be32(&b, 0))
    };
    let Some(first) = cycle(0) else {
        return;
    };
    // The first sector whose cycle differs from the first one's (the head), or the end.
    let (mut lo, mut hi) = (0u64, sectors);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if cycle(mid) == Some(first) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let head = start.saturating_add(hi * 512);
    let from = head.saturating_sub(4096).max(start);
    let to = head
        .saturating_add(4096)
        .min(start.saturating_add(sectors * 512));
    out.push((from, to - from));
}

/// The boot sector, MFT records 0..15 (`$MFT` .. `$Extend` and reserved: `$Volume` flags,
/// root directory, `$Bitmap` size), the first 8 KiB of `$LogFile` (its restart pages, which a
/// mount rewrites), and the first runs of the MFT's bitmap and of `$Bitmap` (which change
/// whenever a file record or a cluster is allocated or freed).
fn ntfs_ranges(vol: &dyn Volume, base: u64, bs: &[u8], out: &mut Vec<(u64, u64)>) {
    let sector = le16(bs, 0x0b);
    let spc = bs[0x0d] as u64;
    let per_cluster = match spc {
        0..=128 => spc,
        // A negative exponent: 2^(256 - n) sectors.
        _ if 256 - spc <= 20 => 1 << (256 - spc),
        _ => return,
    };
    let cluster = sector * per_cluster;
    let raw = bs[0x40] as i8;
    let record = if raw < 0 {
        1u64 << (-(raw as i32)).min(20)
    } else {
        (raw as u64) * cluster
    };
    let mft = le64(bs, 0x30).checked_mul(cluster);
    let (Some(mft), true) = (mft, (256..=65536).contains(&record) && cluster > 0) else {
        return;
    };
    out.push((mft, 16 * record));
    let rec = |n: u64| {
        read_bytes(
            vol,
            base.saturating_add(mft).saturating_add(n * record),
            record as usize,
        )
    };
    // (record, attribute type, bytes hashed at most)
    for (n, ty, cap) in [
        (2u64, 0x80u32, 8192u64),
        (0, 0xb0, MAX_REGION),
        (6, 0x80, MAX_REGION),
    ] {
        if let Some(r) = rec(n)
            && let Some((lcn, clusters)) = first_run(&r, ty)
            && let Some(off) = lcn.checked_mul(cluster)
        {
            out.push((off, clusters.saturating_mul(cluster).min(cap)));
        }
    }
}

/// The first run (LCN, length in clusters) of the non-resident unnamed attribute of type `ty`
/// of an MFT record; `None` when it is resident (then the record itself holds it) or absent.
/// The update sequence fix-ups do not touch the bytes read here in records of the usual sizes.
fn first_run(rec: &[u8], ty: u32) -> Option<(u64, u64)> {
    if rec.get(0..4)? != b"FILE" {
        return None;
    }
    let mut at = le16(rec, 0x14) as usize;
    for _ in 0..32 {
        let t = le32(rec, at) as u32;
        let len = le32(rec, at + 4) as usize;
        if t == 0xffff_ffff || len < 16 || at + len > rec.len() {
            return None;
        }
        let nonresident = *rec.get(at + 8)? != 0;
        let name_len = *rec.get(at + 9)?;
        if t == ty && nonresident && name_len == 0 {
            let runs = at + le16(rec, at + 0x20) as usize;
            let header = *rec.get(runs)?;
            let (nlen, olen) = ((header & 0x0f) as usize, (header >> 4) as usize);
            if nlen == 0 || nlen > 8 || olen == 0 || olen > 8 {
                return None;
            }
            let field = |from: usize, n: usize| -> Option<u64> {
                let b = rec.get(from..from + n)?;
                Some(
                    b.iter()
                        .enumerate()
                        .fold(0u64, |v, (i, x)| v | (*x as u64) << (8 * i)),
                )
            };
            let clusters = field(runs + 1, nlen)?;
            let lcn = field(runs + 1 + nlen, olen)?;
            return Some((lcn, clusters));
        }
        at += len;
    }
    None
}

/// The boot sector and the FATs (reserved sectors up to the end of the last FAT).
fn fat_ranges(_vol: &dyn Volume, _base: u64, bs: &[u8], out: &mut Vec<(u64, u64)>) {
    let sector = le16(bs, 0x0b);
    let reserved = le16(bs, 0x0e);
    let fats = bs[0x10] as u64;
    let fat16 = le16(bs, 0x16);
    let fat_sectors = if fat16 != 0 { fat16 } else { le32(bs, 0x24) };
    let len = fats * fat_sectors * sector;
    if sector >= 512 && len > 0 {
        out.push((reserved * sector, len.min(MAX_REGION)));
    }
}

/// The boot sector (volume flags, percent in use), the FAT, the allocation bitmap and the
/// first cluster of the root directory.
fn exfat_ranges(vol: &dyn Volume, base: u64, bs: &[u8], out: &mut Vec<(u64, u64)>) {
    let (ss, cs) = (bs[0x6c] as u32, bs[0x6d] as u32);
    if !(9..=12).contains(&ss) || ss + cs > 25 {
        return;
    }
    let sector = 1u64 << ss;
    let cluster = sector << cs;
    out.push((
        le32(bs, 0x50) * sector,
        (le32(bs, 0x54) * sector).min(MAX_REGION),
    ));
    let heap = le32(bs, 0x58) * sector;
    let at = |c: u64| heap.saturating_add(c.saturating_sub(2) * cluster);
    let root = at(le32(bs, 0x60));
    out.push((root, cluster));
    if let Some(dir) = read_bytes(vol, base.saturating_add(root), cluster as usize) {
        for e in dir.chunks_exact(32) {
            if e[0] == 0x81 {
                out.push((at(le32(e, 20)), le64(e, 24).min(MAX_REGION)));
            }
        }
    }
}

/// The hash of the write markers of a filesystem at `base`.
fn fs_hash(vol: &dyn Volume, base: u64, fs_type: &str) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"volback fs markers v1\0");
    h.update(fs_type.as_bytes());
    for (off, len) in fs_ranges(vol, base, fs_type) {
        hash_range(vol, base.saturating_add(off), len, &mut h);
    }
    hex_hash(h)
}

impl SourceState {
    /// Records the state of `source` now, with the filesystem and partition layout found on
    /// it and the allocation map the run uses (`None`: every block).
    pub fn capture(
        source: &Source,
        fs: Option<&FsInfo>,
        layout: Option<&DiskLayout>,
        map: Option<&BlockMap>,
    ) -> Result<SourceState> {
        let platform = crate::platform::write_markers(source.file())
            .map_err(|e| crate::error::Error::io("read the write markers of", source.path(), e))?
            .map(|m| {
                let mut h = blake3::Hasher::new();
                h.update(b"volback platform markers v1\0");
                h.update(&m.bytes);
                Marker {
                    what: m.what,
                    hash: hex_hash(h),
                }
            });
        Ok(Self::capture_volume(source, platform, fs, layout, map))
    }

    /// [`SourceState::capture`] with the platform markers given (any [`Volume`]).
    pub fn capture_volume(
        vol: &dyn Volume,
        platform: Option<Marker>,
        fs: Option<&FsInfo>,
        layout: Option<&DiskLayout>,
        map: Option<&BlockMap>,
    ) -> SourceState {
        let size = vol.size();
        let partition_table = layout.map(|l| {
            let mut h = blake3::Hasher::new();
            h.update(b"volback partition table v1\0");
            let sector = u64::from(l.sector_size.max(512));
            hash_range(vol, 0, 34 * sector, &mut h);
            hash_range(vol, size.saturating_sub(33 * sector), 33 * sector, &mut h);
            h.update(serde_json::to_string(l).unwrap_or_default().as_bytes());
            hex_hash(h)
        });
        let mut filesystems = Vec::new();
        if let Some(f) = fs {
            filesystems.push(FsMarker {
                offset: 0,
                fs_type: f.fs_type.clone(),
                hash: fs_hash(vol, 0, &f.fs_type),
            });
        }
        for p in layout.iter().flat_map(|l| &l.partitions) {
            if let Some(f) = &p.filesystem {
                filesystems.push(FsMarker {
                    offset: p.start,
                    fs_type: f.fs_type.clone(),
                    hash: fs_hash(vol, p.start, &f.fs_type),
                });
            }
        }
        let mut h = blake3::Hasher::new();
        h.update(b"volback allocation v1\0");
        match map {
            Some(m) => {
                h.update(&m.granularity().to_le_bytes());
                h.update(&m.block_count().to_le_bytes());
                for r in m.used_runs() {
                    h.update(&r.start.to_le_bytes());
                    h.update(&r.end.to_le_bytes());
                }
            }
            None => {
                h.update(b"every block");
            }
        }
        SourceState {
            version: SOURCE_STATE_VERSION,
            platform,
            partition_table,
            filesystems,
            allocation: hex_hash(h),
        }
    }

    /// Why a run that recorded `self` cannot be resumed on a source now in state `now`;
    /// `None` when every marker is the same.
    pub fn change_from(&self, now: &SourceState) -> Option<String> {
        if self.version != SOURCE_STATE_VERSION || now.version != SOURCE_STATE_VERSION {
            return Some(format!(
                "the interrupted run recorded its source's state in another format (version {})",
                self.version
            ));
        }
        let mut changed = Vec::new();
        match (&self.platform, &now.platform) {
            (Some(a), Some(b)) if a == b => {}
            (Some(a), Some(_)) => changed.push(a.what.clone()),
            _ => {
                return Some(
                    "this platform cannot tell whether the source was written since the \
                     interrupted run"
                        .into(),
                );
            }
        }
        if self.partition_table != now.partition_table {
            changed.push("partition table".into());
        }
        let fs_names = |s: &SourceState| -> Vec<(u64, String)> {
            s.filesystems
                .iter()
                .map(|f| (f.offset, f.fs_type.clone()))
                .collect()
        };
        if fs_names(self) != fs_names(now) {
            changed.push("filesystems found".into());
        } else {
            for (a, b) in self.filesystems.iter().zip(&now.filesystems) {
                if a.hash != b.hash {
                    changed.push(format!(
                        "{} write markers at offset {}",
                        a.fs_type, a.offset
                    ));
                }
            }
        }
        if self.allocation != now.allocation {
            changed.push("allocation map".into());
        }
        (!changed.is_empty()).then(|| {
            format!(
                "the source changed since it started ({} differ)",
                changed.join(", ")
            )
        })
    }
}

/// Why an interrupted run that recorded `recorded` (absent in journals of older versions)
/// cannot be resumed on a source now in state `now`; `None` when it can.
pub fn resume_refusal(recorded: Option<&SourceState>, now: &SourceState) -> Option<String> {
    match recorded {
        None => Some(
            "the interrupted run was started by an older volback, which did not record its \
             source's state"
                .into(),
        ),
        Some(r) => r.change_from(now),
    }
}

/// What a resumed run's sample check compares one block with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    /// All zeros.
    Zero,
    /// Content with this hash (the journal's hash function).
    Hash([u8; 32]),
    /// The bytes of piece `index` of data blob `blob` (format 2).
    Piece {
        blob: crate::hash::ChunkId,
        index: u32,
    },
}

/// A deterministic, evenly spread sample of finished blocks: the first [`SAMPLE_FIRST`] data
/// blocks, then every `stride`-th block, the stride doubling whenever the sample grows past
/// its bound (so that it stays spread over everything finished, however long).
#[derive(Debug)]
pub struct SampleCheck {
    first: Vec<(u64, Expected)>,
    spread: Vec<(u64, Expected)>,
    stride: u64,
}

impl Default for SampleCheck {
    fn default() -> Self {
        Self::new()
    }
}

impl SampleCheck {
    pub fn new() -> SampleCheck {
        SampleCheck {
            first: Vec::new(),
            spread: Vec::new(),
            stride: 1,
        }
    }

    /// Offers finished block `block` with what it held.
    pub fn offer(&mut self, block: u64, expected: Expected) {
        if (self.first.len() as u64) < SAMPLE_FIRST {
            self.first.push((block, expected));
            return;
        }
        if !block.is_multiple_of(self.stride) {
            return;
        }
        self.spread.push((block, expected));
        let bound = SAMPLE_MAX - SAMPLE_FIRST as usize;
        while self.spread.len() > bound {
            self.stride *= 2;
            let s = self.stride;
            self.spread.retain(|(b, _)| b.is_multiple_of(s));
        }
    }

    /// Offers a run of `count` blocks from `first` with the same expectation (a run of zero
    /// blocks), without visiting each.
    pub fn offer_run(&mut self, first: u64, count: u64, expected: Expected) {
        let mut b = first;
        let end = first.saturating_add(count);
        while b < end {
            self.offer(b, expected);
            if (self.first.len() as u64) < SAMPLE_FIRST {
                b += 1;
            } else {
                // The next multiple of the stride.
                b = (b / self.stride + 1).saturating_mul(self.stride);
            }
        }
    }

    /// The sampled blocks, in order.
    pub fn blocks(&self) -> Vec<(u64, Expected)> {
        let mut v: Vec<_> = self.first.iter().chain(&self.spread).copied().collect();
        v.sort_by_key(|x| x.0);
        v.dedup_by_key(|x| x.0);
        v
    }

    /// Re-reads the sampled blocks of `vol` (blocks of `block_size` bytes) and hashes them
    /// with `hash`; returns the first block whose content differs. A block that cannot be
    /// read is skipped (a failing source keeps its recorded unreadable ranges).
    pub fn first_mismatch<V: Volume + ?Sized>(
        &self,
        vol: &V,
        block_size: u64,
        hash: impl Fn(&[u8]) -> [u8; 32],
    ) -> Option<u64> {
        self.first_mismatch_in(vol, block_size, hash, None)
    }

    /// [`Self::first_mismatch`], comparing blob pieces with `blobs` ([`Expected::Piece`]). A
    /// blob that cannot be read is skipped (whether the journal's blobs are usable is checked
    /// separately); without `blobs`, pieces are skipped.
    pub fn first_mismatch_in<V: Volume + ?Sized>(
        &self,
        vol: &V,
        block_size: u64,
        hash: impl Fn(&[u8]) -> [u8; 32],
        blobs: Option<&dyn crate::repo::blob::BlobSource>,
    ) -> Option<u64> {
        let size = vol.size();
        let mut buf = Vec::new();
        for (b, expected) in self.blocks() {
            let Some(start) = b.checked_mul(block_size).filter(|&s| s < size) else {
                return Some(b);
            };
            let len = block_size.min(size - start) as usize;
            buf.resize(len, 0);
            if vol.read_at(start, &mut buf).is_err() {
                continue;
            }
            let same = match expected {
                Expected::Zero => crate::volume::is_zero(&buf),
                Expected::Hash(h) => hash(&buf) == h,
                Expected::Piece { blob, index } => {
                    let Some(content) =
                        blobs.and_then(|s| s.blob(&blob, crate::repo::blob::BlobKind::Data).ok())
                    else {
                        continue;
                    };
                    let from = u64::from(index).saturating_mul(block_size);
                    usize::try_from(from)
                        .ok()
                        .and_then(|f| content.get(f..f.checked_add(buf.len())?))
                        == Some(&buf[..])
                }
            };
            if !same {
                return Some(b);
            }
        }
        None
    }
}

/// Decides whether the interrupted backup whose journal is at `journal_path` (header
/// `recorded`) may be resumed on `source`, now in state `now`: its recorded state must match
/// and a sample of its finished blocks must still hold what it stored. Warns why not.
#[allow(clippy::too_many_arguments)]
pub fn backup_may_resume(
    source: &dyn Volume,
    repo: &dyn crate::repo::backend::WriteBackend,
    journal_path: &str,
    sealer: &crate::repo::seal::Sealer,
    recorded: &crate::repo::journal::JournalHeader,
    now: &SourceState,
    blobs: Option<&dyn crate::repo::blob::BlobSource>,
    progress: &dyn crate::progress::Progress,
) -> Result<bool> {
    let refuse = |why: &str| {
        progress.warn(&format!(
            "not resuming the interrupted backup: {why}; starting over"
        ));
        Ok(false)
    };
    if let Some(why) = resume_refusal(recorded.source_state.as_ref(), now) {
        return refuse(&why);
    }
    let mut sample = SampleCheck::new();
    let mut next = 0u64;
    let read =
        crate::repo::journal::Journal::read_batches(repo, journal_path, sealer, |_, batch| {
            let _ =
                crate::repo::format::decode_records(&batch.records, batch.block_count, |r, n| {
                    match (r.content_hash(), r) {
                        (Some(h), _) => sample.offer(next, Expected::Hash(h.0)),
                        // The first block of a run of pieces stands for the run (as one chunk record
                        // stands for its block).
                        (None, crate::repo::format::BlockRef::Part { blob, index }) => {
                            sample.offer(next, Expected::Piece { blob, index })
                        }
                        (None, crate::repo::format::BlockRef::Zero) => {
                            sample.offer_run(next, n, Expected::Zero)
                        }
                        (None, _) => {}
                    }
                    next += n;
                });
            Ok(())
        })?;
    if read.is_none() {
        return Ok(false);
    }
    let algo = recorded.chunk_hash;
    let bs = u64::from(recorded.block_size);
    match sample.first_mismatch_in(source, bs, |d| algo.hash(d).0, blobs) {
        Some(b) => refuse(&format!(
            "the source changed since it started (block {b}, finished before the \
             interruption, holds other data now)"
        )),
        None => Ok(true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Mem(Vec<u8>);

    impl Volume for Mem {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
            let s = offset as usize;
            buf.copy_from_slice(&self.0[s..s + buf.len()]);
            Ok(())
        }
        fn describe(&self) -> String {
            "memory".into()
        }
    }

    #[test]
    fn sample_stays_bounded_and_spread() {
        let mut s = SampleCheck::new();
        for b in 0..100_000 {
            s.offer(b, Expected::Zero);
        }
        let v = s.blocks();
        assert!(v.len() <= SAMPLE_MAX, "{}", v.len());
        assert!(v.len() >= SAMPLE_MAX / 2);
        assert_eq!(v[0].0, 0);
        assert!(v.last().unwrap().0 > 90_000);
        let mut r = SampleCheck::new();
        r.offer_run(0, 100_000, Expected::Zero);
        assert_eq!(r.blocks(), v);
    }

    #[test]
    fn sample_finds_a_changed_block() {
        let mut data = vec![0u8; 64 * 4096];
        data[5 * 4096] = 1;
        let mut s = SampleCheck::new();
        for b in 0..64 {
            let blk = &data[b * 4096..(b + 1) * 4096];
            s.offer(b as u64, Expected::Hash(*blake3::hash(blk).as_bytes()));
        }
        let h = |d: &[u8]| *blake3::hash(d).as_bytes();
        assert_eq!(s.first_mismatch(&Mem(data.clone()), 4096, h), None);
        data[5 * 4096] = 2;
        assert_eq!(s.first_mismatch(&Mem(data), 4096, h), Some(5));
    }

    /// Pieces of blobs (format 2) are compared with the blob's bytes; without a blob source,
    /// or when the blob cannot be read, they are skipped.
    #[test]
    fn sample_compares_pieces_with_their_blob() {
        use crate::repo::blob::{BlobKind, BlobSink};
        let mut data = vec![3u8; 8 * 4096];
        data[6 * 4096] = 9;
        let blobs = crate::repo::tree::testing::MemBlobs::new();
        let id = blobs.put_blob(BlobKind::Data, &data[4 * 4096..]).unwrap();
        let mut s = SampleCheck::new();
        for b in 4..8u64 {
            s.offer(
                b,
                Expected::Piece {
                    blob: id,
                    index: (b - 4) as u32,
                },
            );
        }
        let h = |d: &[u8]| *blake3::hash(d).as_bytes();
        let src: &dyn crate::repo::blob::BlobSource = &*blobs;
        assert_eq!(
            s.first_mismatch_in(&Mem(data.clone()), 4096, h, Some(src)),
            None
        );
        data[6 * 4096] = 1;
        assert_eq!(
            s.first_mismatch_in(&Mem(data.clone()), 4096, h, Some(src)),
            Some(6)
        );
        assert_eq!(s.first_mismatch_in(&Mem(data.clone()), 4096, h, None), None);
        // A piece past the blob's end never matches.
        let mut s = SampleCheck::new();
        s.offer(7, Expected::Piece { blob: id, index: 9 });
        assert_eq!(s.first_mismatch_in(&Mem(data), 4096, h, Some(src)), Some(7));
    }

    #[test]
    fn states_name_what_changed() {
        let mut data = vec![0u8; 1 << 20];
        let fs = FsInfo {
            fs_type: "ext4".into(),
            version: None,
            uuid: String::new(),
            label: String::new(),
            block_size: 4096,
            size: 1 << 20,
            used_bytes: 0,
        };
        let marker = Some(Marker {
            what: "file".into(),
            hash: "a".into(),
        });
        let a =
            SourceState::capture_volume(&Mem(data.clone()), marker.clone(), Some(&fs), None, None);
        assert_eq!(a.change_from(&a.clone()), None);
        data[1024 + 0x30] = 9;
        let b = SourceState::capture_volume(&Mem(data), marker, Some(&fs), None, None);
        let why = a.change_from(&b).unwrap();
        assert!(why.contains("ext4 write markers at offset 0"), "{why}");
        let none = SourceState {
            platform: None,
            ..b.clone()
        };
        assert!(a.change_from(&none).unwrap().contains("cannot tell"));
        assert!(resume_refusal(None, &b).unwrap().contains("older volback"));
    }

    #[test]
    fn hostile_filesystem_fields_never_panic() {
        let mut data = vec![0xffu8; 1 << 16];
        for t in ["xfs", "ntfs", "vfat", "exfat", "ext4", "btrfs"] {
            let _ = fs_hash(&Mem(data.clone()), 0, t);
        }
        data.iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (i * 7) as u8);
        for t in ["xfs", "ntfs", "vfat", "exfat"] {
            let _ = fs_hash(&Mem(data.clone()), 0, t);
        }
    }
}
