//! qcow2 images (qemu's `docs/interop/qcow2.txt`), version 3 written, versions 2 and 3 read.
//!
//! All integers are big-endian. The file is a sequence of clusters (64 KiB by default).
//!
//! Header (cluster 0):
//!
//! | off | size | field                                                          |
//! |-----|------|----------------------------------------------------------------|
//! | 0   | 4    | magic `QFI\xfb`                                                |
//! | 4   | 4    | version (3)                                                    |
//! | 8   | 8    | backing file name offset (0: none)                             |
//! | 16  | 4    | backing file name length                                       |
//! | 20  | 4    | cluster bits (16: 64 KiB clusters)                             |
//! | 24  | 8    | virtual size in bytes                                          |
//! | 32  | 4    | encryption method (0: none)                                    |
//! | 36  | 4    | L1 table entries                                               |
//! | 40  | 8    | L1 table offset                                                |
//! | 48  | 8    | refcount table offset                                          |
//! | 56  | 4    | refcount table clusters                                        |
//! | 60  | 4    | number of snapshots                                            |
//! | 64  | 8    | snapshot table offset                                          |
//! | 72  | 8    | incompatible features (bit 0 dirty, 1 corrupt, 2 external data |
//! |     |      | file, 3 compression type, 4 extended L2 entries)               |
//! | 80  | 8    | compatible features (bit 0 lazy refcounts)                     |
//! | 88  | 8    | autoclear features (bit 0 bitmaps, 1 raw external data)        |
//! | 96  | 4    | refcount order (4: 16-bit refcounts)                           |
//! | 100 | 4    | header length (104)                                            |
//!
//! then header extensions (type (4), length (4), data padded to 8 bytes) up to an end marker
//! of type 0, all inside cluster 0.
//!
//! Virtual cluster `v` is found through L1 entry `v / (cluster_size / 8)` (bits 9-55: offset
//! of an L2 table, bit 63: "copied", refcount exactly 1) and entry `v % (cluster_size / 8)`
//! of that L2 table (bit 0: reads as zeros, bits 9-55: data cluster offset, bit 62:
//! compressed, bit 63: copied). An entry of 0 reads as zeros (there is no backing file).
//!
//! Refcounts: the refcount table (entries: offsets of refcount blocks) and refcount blocks
//! (one `2^refcount_order`-bit count per cluster of the file) say how many references each
//! cluster has.
//!
//! Layout written by volback: header in cluster 0, refcount table from cluster 1 (sized for
//! the largest file the virtual size can need), the L1 table after it, then L2 tables and data
//! clusters in allocation order, refcount blocks appended when the image is finished.
//!
//! Crash safety: the dirty bit is set while volback writes an image (refcounts on disk are
//! stale then; qemu rebuilds them when it opens a dirty image read-write, and so does
//! [`open_for_update`]). Data clusters are made durable before the L2 tables that point at
//! them, L2 tables before the L1 entries that point at them. `finish` writes every refcount
//! block from an in-memory bitmap of used clusters, then clears the dirty bit.

use super::file::{BitSet, DirtyPages, ImageFile, round_up};
use super::mapped::{MappedVolume, Mapping, Unit};
use super::sparse::{Alloc, SparseWriter, UnitMap};
use super::{CreateOptions, ImageWriter};
use crate::bytes::{be_u32, be_u64};
use crate::error::{Error, Result};
use crate::volume::Volume;
use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

pub(crate) const MAGIC: &[u8; 4] = b"QFI\xfb";
const VERSION: u32 = 3;
const V2_HEADER_LEN: u32 = 72;
const V3_HEADER_LEN: u32 = 104;
const DEFAULT_CLUSTER_BITS: u32 = 16;
const MIN_CLUSTER_BITS: u32 = 9;
const MAX_CLUSTER_BITS: u32 = 21;
const REFCOUNT_ORDER: u32 = 4;

const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
const AUTOCLEAR_BITMAPS: u64 = 1 << 0;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
const EXT_BITMAPS: u32 = 0x2385_2875;
const EXT_CRYPTO: u32 = 0x0537_be77;
const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Offset bits of L1 and L2 entries (9-55).
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
const ZERO_FLAG: u64 = 1;
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;
const RT_RESERVED: u64 = 0x1ff;

/// qemu's limits: 32 MiB of L1 table, 8 MiB of refcount table.
const MAX_L1_BYTES: u64 = 32 << 20;
const MAX_RT_BYTES: u64 = 8 << 20;
/// Most file clusters volback tracks to write or update an image: one bit each in memory, so
/// at most 256 MiB for a file of 2^31 clusters (128 TiB with 64 KiB clusters); the bitmap
/// only grows as far as the file does.
const MAX_CLUSTERS: u64 = 1 << 31;
/// Memory for cached L2 tables while writing.
const L2_CACHE_BYTES: u64 = 16 << 20;

/// The header fields, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    /// Header extension types present (before the end marker).
    pub extensions: Vec<u32>,
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Virtual bytes one L2 table maps.
    fn l2_coverage(&self) -> u64 {
        self.cluster_size() * (self.cluster_size() / 8)
    }

    fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; V3_HEADER_LEN as usize + 8];
        b[0..4].copy_from_slice(MAGIC);
        b[4..8].copy_from_slice(&self.version.to_be_bytes());
        b[8..16].copy_from_slice(&self.backing_file_offset.to_be_bytes());
        b[20..24].copy_from_slice(&self.cluster_bits.to_be_bytes());
        b[24..32].copy_from_slice(&self.size.to_be_bytes());
        b[32..36].copy_from_slice(&self.crypt_method.to_be_bytes());
        b[36..40].copy_from_slice(&self.l1_size.to_be_bytes());
        b[40..48].copy_from_slice(&self.l1_table_offset.to_be_bytes());
        b[48..56].copy_from_slice(&self.refcount_table_offset.to_be_bytes());
        b[56..60].copy_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b[60..64].copy_from_slice(&self.nb_snapshots.to_be_bytes());
        b[72..80].copy_from_slice(&self.incompatible.to_be_bytes());
        b[80..88].copy_from_slice(&self.compatible.to_be_bytes());
        b[88..96].copy_from_slice(&self.autoclear.to_be_bytes());
        b[96..100].copy_from_slice(&self.refcount_order.to_be_bytes());
        b[100..104].copy_from_slice(&self.header_length.to_be_bytes());
        // b[104..112]: the end-of-extensions marker (type 0, length 0).
        b
    }

    /// Decodes the header and its extensions from the start of cluster 0 (`b` holds at least
    /// the whole header and its extensions, or the whole file when it is shorter). The error
    /// is a detail for [`Error::Corrupt`]; unsupported features are reported separately by
    /// [`Header::unsupported`].
    pub fn parse(b: &[u8]) -> std::result::Result<Header, String> {
        if b.len() < V2_HEADER_LEN as usize {
            return Err(format!("header is {} bytes, too short", b.len()));
        }
        if &b[0..4] != MAGIC {
            return Err("no qcow2 magic".into());
        }
        let version = be_u32(b, 4);
        if version != 2 && version != 3 {
            return Err(format!("unknown version {version}"));
        }
        let cluster_bits = be_u32(b, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(format!(
                "cluster bits {cluster_bits} outside {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}"
            ));
        }
        let cs = 1usize << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be_u64(b, 8),
            cluster_bits,
            size: be_u64(b, 24),
            crypt_method: be_u32(b, 32),
            l1_size: be_u32(b, 36),
            l1_table_offset: be_u64(b, 40),
            refcount_table_offset: be_u64(b, 48),
            refcount_table_clusters: be_u32(b, 56),
            nb_snapshots: be_u32(b, 60),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            extensions: Vec::new(),
        };
        if version == 3 {
            if b.len() < V3_HEADER_LEN as usize {
                return Err(format!("version 3 header is {} bytes, too short", b.len()));
            }
            h.incompatible = be_u64(b, 72);
            h.compatible = be_u64(b, 80);
            h.autoclear = be_u64(b, 88);
            h.refcount_order = be_u32(b, 96);
            h.header_length = be_u32(b, 100);
            if h.header_length < V3_HEADER_LEN || h.header_length as usize > cs {
                return Err(format!(
                    "header length {} outside {V3_HEADER_LEN}..={cs}",
                    h.header_length
                ));
            }
            if h.refcount_order > 6 {
                return Err(format!("refcount order {} above 6", h.refcount_order));
            }
        }
        // Header extensions, inside cluster 0.
        let limit = cs.min(b.len());
        let mut at = round_up(h.header_length as u64, 8).unwrap_or(u64::MAX) as usize;
        loop {
            if at.checked_add(8).is_none_or(|e| e > limit) {
                return Err(
                    "header extensions run past the first cluster without an end marker".into(),
                );
            }
            let ty = be_u32(b, at);
            let len = be_u32(b, at + 4) as usize;
            if ty == EXT_END {
                break;
            }
            let next = round_up(len as u64, 8)
                .and_then(|l| (at as u64 + 8).checked_add(l))
                .filter(|&n| n <= limit as u64);
            let Some(next) = next else {
                return Err(format!(
                    "header extension {ty:#010x} of {len} bytes runs past the first cluster"
                ));
            };
            h.extensions.push(ty);
            at = next as usize;
        }
        Ok(h)
    }

    /// Why volback cannot read this image, if it cannot.
    fn unsupported(&self) -> Option<String> {
        if self.backing_file_offset != 0 {
            return Some(
                "it has a backing file (its data depends on another image); convert it to a \
                 standalone image first (qemu-img convert)"
                    .into(),
            );
        }
        if self.crypt_method != 0 || self.extensions.contains(&EXT_CRYPTO) {
            return Some("it is encrypted".into());
        }
        if self.incompatible & INCOMPAT_DATA_FILE != 0 || self.extensions.contains(&EXT_DATA_FILE) {
            return Some("its data is in an external data file".into());
        }
        if self.incompatible & INCOMPAT_EXTL2 != 0 {
            return Some("it uses extended L2 entries (subclusters)".into());
        }
        let unknown = self.incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Some(format!(
                "it uses unknown incompatible features {unknown:#x}"
            ));
        }
        None
    }
}

/// A qcow2 image opened and checked.
struct Parsed {
    header: Header,
    file_len: u64,
    /// Ranges of the file holding the header, the L1 table and the refcount table.
    reserved: Vec<Range<u64>>,
}

fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

fn parse(file: &ImageFile) -> Result<Parsed> {
    let file_len = file.len()?;
    let mut first = [0u8; 24];
    let n = file.read_at_most(0, &mut first)?;
    if n < first.len() || &first[0..4] != MAGIC {
        return Err(file.corrupt(
            "qcow2 header",
            if n < first.len() {
                "the file is too short for a qcow2 header (truncated image)"
            } else {
                "no qcow2 magic"
            },
        ));
    }
    // The header and its extensions fill (part of) the first cluster.
    let bits = be_u32(&first, 20).clamp(MIN_CLUSTER_BITS, MAX_CLUSTER_BITS);
    let mut cluster0 = vec![0u8; 1 << bits];
    let n = file.read_at_most(0, &mut cluster0)?;
    cluster0.truncate(n);
    let header = Header::parse(&cluster0).map_err(|e| file.corrupt("qcow2 header", e))?;
    if let Some(why) = header.unsupported() {
        return Err(file.unsupported(why));
    }
    let cs = header.cluster_size();
    let corrupt = |d: String| file.corrupt("qcow2 header", d);
    let l1_needed = header.size.div_ceil(header.l2_coverage());
    if (header.l1_size as u64) < l1_needed {
        return Err(corrupt(format!(
            "the L1 table has {} entries but a disk of {} bytes needs {l1_needed}",
            header.l1_size, header.size
        )));
    }
    let l1_bytes = header.l1_size as u64 * 8;
    if l1_bytes > MAX_L1_BYTES {
        return Err(corrupt(format!(
            "the L1 table of {} entries is larger than 32 MiB",
            header.l1_size
        )));
    }
    let l1 = header.l1_table_offset..header.l1_table_offset.saturating_add(l1_bytes);
    if header.l1_size > 0 && (l1.start % cs != 0 || l1.start < cs || l1.end > file_len) {
        return Err(corrupt(format!(
            "the L1 table ({l1_bytes} bytes at offset {}) is not a cluster-aligned range inside \
             the file ({file_len} bytes) after the header",
            l1.start
        )));
    }
    let rt_bytes = header.refcount_table_clusters as u64 * cs;
    let rt = header.refcount_table_offset..header.refcount_table_offset.saturating_add(rt_bytes);
    if rt_bytes > MAX_RT_BYTES
        || rt.start % cs != 0
        || rt.start < cs
        || rt.end > file_len
        || (rt_bytes > 0 && l1_bytes > 0 && overlaps(&rt, &l1))
    {
        return Err(corrupt(format!(
            "the refcount table ({} clusters at offset {}) is not a cluster-aligned range of at \
             most 8 MiB inside the file, clear of the header and the L1 table",
            header.refcount_table_clusters, rt.start
        )));
    }
    Ok(Parsed {
        reserved: vec![0..cs, l1, rt],
        header,
        file_len,
    })
}

/// Checks an L1 entry; returns the L2 table's offset (0: none).
fn l2_offset(file: &ImageFile, p: &Parsed, index: u64, e: u64) -> Result<u64> {
    let what = || format!("qcow2 L1 entry {index}");
    if e & L1_RESERVED != 0 {
        return Err(file.corrupt(what(), format!("reserved bits are set ({e:#018x})")));
    }
    let off = e & OFFSET_MASK;
    if off == 0 {
        return Ok(0);
    }
    check_cluster(file, p, off, p.header.cluster_size(), &what)?;
    Ok(off)
}

/// Checks that a cluster at `off` (`len` bytes of it used) lies inside the file, aligned, clear
/// of the header, L1 and refcount tables.
fn check_cluster(
    file: &ImageFile,
    p: &Parsed,
    off: u64,
    len: u64,
    what: &dyn Fn() -> String,
) -> Result<()> {
    let cs = p.header.cluster_size();
    if !off.is_multiple_of(cs) {
        return Err(file.corrupt(what(), format!("offset {off} is not cluster-aligned")));
    }
    if off.saturating_add(len) > p.file_len {
        return Err(file.corrupt(
            what(),
            format!(
                "cluster at offset {off} is past the end of the file ({} bytes)",
                p.file_len
            ),
        ));
    }
    let r = off..off + cs;
    if let Some(o) = p.reserved.iter().find(|o| !o.is_empty() && overlaps(o, &r)) {
        return Err(file.corrupt(
            what(),
            format!(
                "cluster at offset {off} overlaps the image's own structures at {}..{}",
                o.start, o.end
            ),
        ));
    }
    Ok(())
}

/// What an L2 entry says about virtual cluster `v`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum L2 {
    Zero,
    /// Reads as zeros but keeps a cluster allocated.
    ZeroAllocated(u64),
    Data(u64),
    Compressed,
}

fn decode_l2(file: &ImageFile, p: &Parsed, v: u64, e: u64) -> Result<L2> {
    let what = || format!("qcow2 L2 entry of virtual cluster {v}");
    if e & COMPRESSED != 0 {
        return Ok(L2::Compressed);
    }
    if e & L2_RESERVED != 0 || (p.header.version == 2 && e & ZERO_FLAG != 0) {
        return Err(file.corrupt(what(), format!("reserved bits are set ({e:#018x})")));
    }
    let off = e & OFFSET_MASK;
    if off == 0 {
        return Ok(L2::Zero);
    }
    // Only the virtual part of the last cluster has to be in the file.
    let cs = p.header.cluster_size();
    let used = cs.min(p.header.size.saturating_sub(v * cs));
    check_cluster(file, p, off, used, &what)?;
    Ok(if e & ZERO_FLAG != 0 {
        L2::ZeroAllocated(off)
    } else {
        L2::Data(off)
    })
}

// ---------------------------------------------------------------------------------------------
// Reading

struct Qcow2Map {
    p: Parsed,
    size: u64,
}

impl Mapping for Qcow2Map {
    fn unit_size(&self) -> u64 {
        self.p.header.cluster_size()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn lookup(&self, file: &ImageFile, first: u64, max: u64, out: &mut Vec<Unit>) -> Result<()> {
        let cs = self.p.header.cluster_size();
        let l2e = cs / 8;
        let clusters = self.size.div_ceil(cs);
        let n = max
            .min(l2e - first % l2e)
            .min(clusters.saturating_sub(first));
        let l1i = first / l2e;
        if n == 0 || l1i >= self.p.header.l1_size as u64 {
            return Err(file.corrupt(
                "qcow2 L1 table",
                format!("virtual cluster {first} is past its end"),
            ));
        }
        let mut e = [0u8; 8];
        file.read_exact_at(
            self.p.header.l1_table_offset + l1i * 8,
            &mut e,
            "qcow2 L1 table",
        )?;
        let l2 = l2_offset(file, &self.p, l1i, u64::from_be_bytes(e))?;
        if l2 == 0 {
            out.extend(std::iter::repeat_n(Unit::Zero, n as usize));
            return Ok(());
        }
        let mut raw = vec![0u8; (n * 8) as usize];
        file.read_exact_at(l2 + (first % l2e) * 8, &mut raw, "qcow2 L2 table")?;
        for (i, c) in raw.chunks_exact(8).enumerate() {
            let v = first + i as u64;
            out.push(match decode_l2(file, &self.p, v, be_u64(c, 0))? {
                L2::Zero | L2::ZeroAllocated(_) => Unit::Zero,
                L2::Data(off) => Unit::Data(off),
                L2::Compressed => Unit::Unsupported("a compressed cluster"),
            });
        }
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "qcow2 image"
    }
}

/// Opens a qcow2 image read-only.
pub(crate) fn open(path: &Path) -> Result<Box<dyn Volume>> {
    let file = ImageFile::open_ro(path)?;
    let p = parse(&file)?;
    // qemu sees whole sectors only.
    let size = p.header.size / 512 * 512;
    Ok(Box::new(MappedVolume::new(file, Qcow2Map { p, size })))
}

// ---------------------------------------------------------------------------------------------
// Writing

/// Virtual size of a qcow2 for a volume of `size` bytes: whole 512-byte sectors (qemu ignores
/// a partial last sector).
pub(crate) fn image_size(size: u64) -> Result<u64> {
    round_up(size, 512)
        .filter(|&s| s <= 1 << 61)
        .ok_or_else(|| Error::InvalidArgument(format!("{size} bytes is too large for qcow2")))
}

struct CachedL2 {
    entries: Vec<u64>,
    dirty: bool,
    stamp: u64,
}

struct Qcow2Writer {
    header: Header,
    cs: u64,
    size: u64,
    l1: Vec<u64>,
    l1_dirty: DirtyPages,
    /// Refcount table entries (offsets of refcount blocks).
    rt: Vec<u64>,
    /// Clusters in use (referenced, or deallocated and not yet durable).
    used: BitSet,
    /// Clusters below this are inside the file; above it the file is empty.
    end: u64,
    /// File length set so far (grown in steps ahead of `end`).
    file_len: u64,
    /// Where the search for a free cluster resumes.
    cursor: u64,
    /// Clusters deallocated since the last flush.
    pending: Vec<u64>,
    cache: HashMap<u64, CachedL2>,
    cache_capacity: usize,
    clock: u64,
}

impl Qcow2Writer {
    fn l2_entries(&self) -> u64 {
        self.cs / 8
    }

    /// Takes a free cluster: a hole left by a deallocation whose unmapping is durable, or a new
    /// one at the end of the file.
    fn alloc_cluster(&mut self, file: &ImageFile) -> Result<(u64, bool)> {
        if let Some(c) = self.used.first_clear(self.cursor).filter(|&c| c < self.end) {
            self.used.set(c);
            self.cursor = c + 1;
            return Ok((c, false));
        }
        // No hole left: later searches start at the end (until something is freed).
        self.cursor = self.end;
        let c = self.end;
        if c >= MAX_CLUSTERS {
            return Err(Error::InvalidArgument(format!(
                "qcow2 image {} would exceed {MAX_CLUSTERS} clusters; use a larger cluster size",
                file.path().display()
            )));
        }
        self.end += 1;
        self.used.set(c);
        let need = self.end * self.cs;
        if need > self.file_len {
            // Grow the file in steps: an allocated cluster is always inside the file (qemu
            // checks that), without one ftruncate per cluster.
            let step = (8 << 20u64).max(self.cs);
            self.file_len = round_up(need, step).unwrap_or(need);
            file.set_len(self.file_len)?;
        }
        Ok((c, true))
    }

    /// The cached L2 table for L1 index `l1i`, loading it (and evicting another) if needed.
    fn table(&mut self, file: &ImageFile, l1i: u64) -> Result<&mut CachedL2> {
        self.clock += 1;
        if !self.cache.contains_key(&l1i) {
            if self.cache.len() >= self.cache_capacity {
                self.evict(file)?;
            }
            let off = self.l1[l1i as usize] & OFFSET_MASK;
            let mut raw = vec![0u8; self.cs as usize];
            file.read_exact_at(off, &mut raw, "qcow2 L2 table")?;
            let entries = raw.chunks_exact(8).map(|c| be_u64(c, 0)).collect();
            self.cache.insert(
                l1i,
                CachedL2 {
                    entries,
                    dirty: false,
                    stamp: 0,
                },
            );
        }
        let clock = self.clock;
        let Some(t) = self.cache.get_mut(&l1i) else {
            return Err(Error::InvalidArgument(
                "internal error: L2 table missing from the cache".into(),
            ));
        };
        t.stamp = clock;
        Ok(t)
    }

    /// Drops the least recently used table; a modified one is written first, after the data
    /// it points to is durable.
    fn evict(&mut self, file: &ImageFile) -> Result<()> {
        let Some((&victim, _)) = self.cache.iter().min_by_key(|(_, t)| t.stamp) else {
            return Ok(());
        };
        if let Some(t) = self.cache.remove(&victim)
            && t.dirty
        {
            file.sync()?;
            self.write_table(file, victim, &t.entries)?;
        }
        Ok(())
    }

    fn write_table(&self, file: &ImageFile, l1i: u64, entries: &[u64]) -> Result<()> {
        let off = self.l1[l1i as usize] & OFFSET_MASK;
        let raw: Vec<u8> = entries.iter().flat_map(|e| e.to_be_bytes()).collect();
        file.write_all_at(off, &raw)
    }

    fn set_incompatible(&mut self, file: &ImageFile, value: u64) -> Result<()> {
        self.header.incompatible = value;
        file.write_all_at(72, &value.to_be_bytes())
    }

    /// Writes refcount blocks for every cluster from `used`, growing or moving the refcount
    /// table if the file outgrew it.
    fn write_refcounts(&mut self, file: &ImageFile) -> Result<()> {
        let cs = self.cs;
        let bits = 1u64 << self.header.refcount_order;
        let per_block = cs * 8 / bits;
        let mut released = Vec::new();
        loop {
            let n = self.used.end();
            let blocks = n.div_ceil(per_block);
            let need = (blocks * 8).div_ceil(cs).max(1);
            if need > self.header.refcount_table_clusters as u64 {
                // A larger table at the end of the file, with room to grow.
                let clusters = need + need / 4 + 1;
                if clusters * cs > MAX_RT_BYTES {
                    return Err(Error::InvalidArgument(format!(
                        "qcow2 image {} needs a refcount table larger than 8 MiB; use a larger \
                         cluster size",
                        file.path().display()
                    )));
                }
                let old = self.header.refcount_table_offset / cs;
                released.extend(old..old + self.header.refcount_table_clusters as u64);
                let start = self.end;
                for c in start..start + clusters {
                    self.used.set(c);
                }
                self.end += clusters;
                self.header.refcount_table_offset = start * cs;
                self.header.refcount_table_clusters = clusters as u32;
                self.rt.resize((clusters * cs / 8) as usize, 0);
                continue;
            }
            let mut added = false;
            for i in 0..blocks {
                if self.rt[i as usize] == 0 && self.used.any_in(i * per_block, (i + 1) * per_block)
                {
                    // New blocks go at the end, never into a hole, so that what `used` says
                    // about the holes stays true while the loop runs.
                    let c = self.end;
                    self.end += 1;
                    self.used.set(c);
                    self.rt[i as usize] = c * cs;
                    added = true;
                }
            }
            if !added {
                break;
            }
        }
        for c in released {
            self.used.clear(c);
        }
        let file_end = self.used.end() * cs;
        file.set_len(file_end)?;
        self.file_len = file_end;
        let mut block = vec![0u8; cs as usize];
        for (i, &off) in self.rt.iter().enumerate() {
            if off == 0 {
                continue;
            }
            block.fill(0);
            let first = i as u64 * per_block;
            for j in 0..per_block {
                if self.used.get(first + j) {
                    set_refcount(&mut block, bits, j, 1);
                }
            }
            file.write_all_at(off, &block)?;
        }
        let raw: Vec<u8> = self.rt.iter().flat_map(|e| e.to_be_bytes()).collect();
        file.write_all_at(self.header.refcount_table_offset, &raw)?;
        file.sync()?;
        let mut fields = [0u8; 12];
        fields[0..8].copy_from_slice(&self.header.refcount_table_offset.to_be_bytes());
        fields[8..12].copy_from_slice(&self.header.refcount_table_clusters.to_be_bytes());
        file.write_all_at(48, &fields)
    }
}

/// Stores refcount `value` for entry `index` of a refcount block of `bits`-bit entries
/// (big-endian when a byte or wider; packed from the least significant bit otherwise).
fn set_refcount(block: &mut [u8], bits: u64, index: u64, value: u64) {
    if bits >= 8 {
        let bytes = (bits / 8) as usize;
        let at = index as usize * bytes;
        let v = value.to_be_bytes();
        block[at..at + bytes].copy_from_slice(&v[8 - bytes..]);
    } else {
        let per_byte = 8 / bits;
        let byte = (index / per_byte) as usize;
        let shift = (index % per_byte) * bits;
        let mask = ((1u64 << bits) - 1) as u8;
        block[byte] = (block[byte] & !(mask << shift)) | (((value as u8) & mask) << shift);
    }
}

impl UnitMap for Qcow2Writer {
    fn unit_size(&self) -> u64 {
        self.cs
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn lookup(&mut self, file: &ImageFile, unit: u64) -> Result<Option<u64>> {
        let l2e = self.l2_entries();
        let l1i = unit / l2e;
        if self.l1[l1i as usize] & OFFSET_MASK == 0 {
            return Ok(None);
        }
        let e = self.table(file, l1i)?.entries[(unit % l2e) as usize];
        if e & ZERO_FLAG != 0 {
            return Ok(None);
        }
        let off = e & OFFSET_MASK;
        Ok((off != 0).then_some(off))
    }

    fn allocate(&mut self, file: &ImageFile, unit: u64) -> Result<Alloc> {
        let l2e = self.l2_entries();
        let l1i = unit / l2e;
        if self.l1[l1i as usize] & OFFSET_MASK == 0 {
            let (c, _) = self.alloc_cluster(file)?;
            self.l1[l1i as usize] = (c * self.cs) | COPIED;
            self.l1_dirty.mark(l1i * 8, 4096);
            if self.cache.len() >= self.cache_capacity {
                self.evict(file)?;
            }
            self.cache.insert(
                l1i,
                CachedL2 {
                    entries: vec![0; l2e as usize],
                    dirty: true,
                    stamp: self.clock,
                },
            );
        }
        let (c, fresh) = self.alloc_cluster(file)?;
        let host = c * self.cs;
        let t = self.table(file, l1i)?;
        let old = t.entries[(unit % l2e) as usize];
        t.entries[(unit % l2e) as usize] = host | COPIED;
        t.dirty = true;
        // A "zero" cluster that kept its allocation: its old cluster is free now.
        let old_off = old & OFFSET_MASK;
        if old_off != 0 {
            self.pending.push(old_off / self.cs);
        }
        Ok(Alloc { host, fresh })
    }

    fn deallocate(&mut self, file: &ImageFile, unit: u64) -> Result<Option<u64>> {
        let l2e = self.l2_entries();
        let l1i = unit / l2e;
        if self.l1[l1i as usize] & OFFSET_MASK == 0 {
            return Ok(None);
        }
        let t = self.table(file, l1i)?;
        let e = t.entries[(unit % l2e) as usize];
        let off = e & OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        t.entries[(unit % l2e) as usize] = 0;
        t.dirty = true;
        self.pending.push(off / self.cs);
        Ok((e & ZERO_FLAG == 0).then_some(off))
    }

    fn flush(&mut self, file: &ImageFile) -> Result<()> {
        let mut dirty: Vec<u64> = self
            .cache
            .iter()
            .filter(|(_, t)| t.dirty)
            .map(|(&k, _)| k)
            .collect();
        dirty.sort_unstable();
        for l1i in dirty {
            if let Some(t) = self.cache.get(&l1i) {
                self.write_table(file, l1i, &t.entries)?;
            }
            if let Some(t) = self.cache.get_mut(&l1i) {
                t.dirty = false;
            }
        }
        if !self.l1_dirty.is_empty() {
            // New L2 tables are durable before the L1 entries that point at them.
            file.sync()?;
            let offset = self.header.l1_table_offset;
            self.l1_dirty
                .write_back(file, offset, 4096, &self.l1, u64::to_be_bytes)?;
        }
        Ok(())
    }

    fn durable(&mut self) {
        for c in self.pending.drain(..) {
            self.used.clear(c);
            self.cursor = self.cursor.min(c);
        }
    }

    fn finish(&mut self, file: &ImageFile) -> Result<()> {
        self.write_refcounts(file)?;
        file.sync()?;
        let clean = self.header.incompatible & !INCOMPAT_DIRTY;
        self.set_incompatible(file, clean)
    }

    fn wants_sync(&self) -> bool {
        self.pending.len() > 65536
    }
}

fn cache_capacity(cs: u64) -> usize {
    (L2_CACHE_BYTES / cs).max(4) as usize
}

/// Creates a qcow2 (version 3) image with clusters of `options.block_size` (default 64 KiB).
pub(crate) fn create(
    path: &Path,
    size: u64,
    options: &CreateOptions,
) -> Result<Box<dyn ImageWriter>> {
    let size = image_size(size)?;
    let cs = options.block_size.unwrap_or(1 << DEFAULT_CLUSTER_BITS);
    if !cs.is_power_of_two() || !((1 << MIN_CLUSTER_BITS)..=(1 << MAX_CLUSTER_BITS)).contains(&cs) {
        return Err(Error::InvalidArgument(format!(
            "qcow2 cluster size {cs} is not a power of two from 512 bytes to 2 MiB"
        )));
    }
    let cluster_bits = cs.trailing_zeros();
    let l2e = cs / 8;
    let l1_size = size.div_ceil(cs * l2e);
    let l1_clusters = (l1_size * 8).div_ceil(cs).max(1);
    // The most clusters the file can need: every data cluster, every L2 table, and the
    // refcount blocks for all of them.
    let data = size.div_ceil(cs) + l1_size + 1 + l1_clusters;
    let per_block = cs * 8 / 16;
    let est = data + data.div_ceil(per_block) + 16;
    let rt_clusters = (est.div_ceil(per_block) * 8).div_ceil(cs).max(1);
    if l1_size * 8 > MAX_L1_BYTES || rt_clusters * cs > MAX_RT_BYTES || est > MAX_CLUSTERS {
        return Err(Error::InvalidArgument(format!(
            "a qcow2 image of {size} bytes needs larger clusters than {cs} bytes"
        )));
    }
    let header = Header {
        version: VERSION,
        backing_file_offset: 0,
        cluster_bits,
        size,
        crypt_method: 0,
        l1_size: l1_size as u32,
        l1_table_offset: (1 + rt_clusters) * cs,
        refcount_table_offset: cs,
        refcount_table_clusters: rt_clusters as u32,
        nb_snapshots: 0,
        // Dirty until `finish` has written the refcounts.
        incompatible: INCOMPAT_DIRTY,
        compatible: 0,
        autoclear: 0,
        refcount_order: REFCOUNT_ORDER,
        header_length: V3_HEADER_LEN,
        extensions: Vec::new(),
    };
    let end = 1 + rt_clusters + l1_clusters;
    let file = ImageFile::create_new(path)?;
    file.write_all_at(0, &header.encode())?;
    file.set_len(end * cs)?;
    file.sync()?;
    let mut used = BitSet::new(end);
    for c in 0..end {
        used.set(c);
    }
    let map = Qcow2Writer {
        header,
        cs,
        size,
        l1: vec![0; l1_size as usize],
        l1_dirty: DirtyPages::default(),
        rt: vec![0; (rt_clusters * cs / 8) as usize],
        used,
        end,
        file_len: end * cs,
        cursor: end,
        pending: Vec::new(),
        cache: HashMap::new(),
        cache_capacity: cache_capacity(cs),
        clock: 0,
    };
    Ok(Box::new(SparseWriter::new(file, map)))
}

/// Opens a qcow2 image for update. The refcounts are rebuilt from the L1 and L2 tables (the
/// image may be dirty after an interrupted run) and written again by `finish`.
pub(crate) fn open_for_update(path: &Path, size: u64) -> Result<Box<dyn ImageWriter>> {
    let expected = image_size(size)?;
    let file = ImageFile::open_rw(path)?;
    let p = parse(&file)?;
    let h = p.header.clone();
    if h.size != expected {
        return Err(Error::ImageSizeMismatch {
            path: path.to_path_buf(),
            found: h.size,
            expected,
        });
    }
    let refuse = |why: &str| Err(file.unsupported(format!("{why}; volback cannot update it")));
    if h.version < 3 {
        return refuse(
            "it is a version 2 (compat=0.10) image (upgrade it with \
             `qemu-img amend -o compat=1.1`)",
        );
    }
    if h.nb_snapshots > 0 {
        return refuse("it has internal snapshots");
    }
    if h.incompatible & INCOMPAT_CORRUPT != 0 {
        return refuse("qemu marked it corrupt (repair it with `qemu-img check -r all`)");
    }
    if h.autoclear & AUTOCLEAR_BITMAPS != 0 || h.extensions.contains(&EXT_BITMAPS) {
        return refuse("it has persistent dirty bitmaps");
    }
    if let Some(t) = h
        .extensions
        .iter()
        .find(|&&t| t != EXT_FEATURE_TABLE && t != EXT_BACKING_FORMAT)
    {
        return refuse(&format!(
            "it has a header extension {t:#010x} volback does not know"
        ));
    }
    let cs = h.cluster_size();
    let clusters = p.file_len.div_ceil(cs);
    if clusters > MAX_CLUSTERS {
        return refuse(&format!("it has more than {MAX_CLUSTERS} clusters"));
    }
    // Dirty first: from here on the refcounts on disk may be stale.
    let mut header = h.clone();
    header.incompatible |= INCOMPAT_DIRTY;
    header.autoclear = 0;
    file.write_all_at(72, &header.incompatible.to_be_bytes())?;
    file.write_all_at(88, &0u64.to_be_bytes())?;
    file.sync()?;

    let mut used = BitSet::new(clusters);
    let mark = |used: &mut BitSet, c: u64, what: &dyn Fn() -> String| -> Result<()> {
        if c >= clusters {
            return Err(file.corrupt(what(), format!("cluster {c} is past the end of the file")));
        }
        if used.set(c) {
            return Err(file.corrupt(
                what(),
                format!("cluster {c} is used twice (the image's tables overlap)"),
            ));
        }
        Ok(())
    };
    mark(&mut used, 0, &|| "qcow2 header".into())?;
    let rt_first = h.refcount_table_offset / cs;
    for c in rt_first..rt_first + h.refcount_table_clusters as u64 {
        mark(&mut used, c, &|| "qcow2 refcount table".into())?;
    }
    let l1_first = h.l1_table_offset / cs;
    let l1_clusters = (h.l1_size as u64 * 8).div_ceil(cs);
    for c in l1_first..l1_first + l1_clusters {
        mark(&mut used, c, &|| "qcow2 L1 table".into())?;
    }
    let mut raw = vec![0u8; h.l1_size as usize * 8];
    file.read_exact_at(h.l1_table_offset, &mut raw, "qcow2 L1 table")?;
    let mut l1: Vec<u64> = raw.chunks_exact(8).map(|c| be_u64(c, 0)).collect();
    let mut l1_dirty = DirtyPages::default();
    let l2e = cs / 8;
    let mut table = vec![0u8; cs as usize];
    for (i, l1e) in l1.iter_mut().enumerate() {
        let off = l2_offset(&file, &p, i as u64, *l1e)?;
        if off == 0 {
            continue;
        }
        mark(&mut used, off / cs, &|| format!("qcow2 L1 entry {i}"))?;
        if *l1e & COPIED == 0 {
            *l1e |= COPIED;
            l1_dirty.mark(i as u64 * 8, 4096);
        }
        file.read_exact_at(off, &mut table, "qcow2 L2 table")?;
        let mut fixed = false;
        for j in 0..l2e {
            let at = (j * 8) as usize;
            let e = be_u64(&table, at);
            let v = i as u64 * l2e + j;
            match decode_l2(&file, &p, v, e)? {
                L2::Compressed => {
                    return refuse("it has compressed clusters");
                }
                L2::Zero => {}
                L2::Data(o) | L2::ZeroAllocated(o) => {
                    mark(&mut used, o / cs, &|| {
                        format!("qcow2 L2 entry of virtual cluster {v}")
                    })?;
                    if e & COPIED == 0 {
                        table[at..at + 8].copy_from_slice(&(e | COPIED).to_be_bytes());
                        fixed = true;
                    }
                }
            }
        }
        if fixed {
            // Every cluster has exactly one reference now: say so, as qemu expects.
            file.write_all_at(off, &table)?;
        }
    }
    // Refcount blocks the table lists keep their place when they are sound.
    let mut raw = vec![0u8; (h.refcount_table_clusters as u64 * cs) as usize];
    file.read_exact_at(h.refcount_table_offset, &mut raw, "qcow2 refcount table")?;
    let mut rt: Vec<u64> = raw.chunks_exact(8).map(|c| be_u64(c, 0)).collect();
    for e in rt.iter_mut() {
        let off = *e & !RT_RESERVED;
        let sound = *e & RT_RESERVED == 0
            && off.is_multiple_of(cs)
            && off / cs < clusters
            && off != 0
            && !used.get(off / cs);
        if sound {
            used.set(off / cs);
        } else {
            *e = 0;
        }
    }
    let end = used.end();
    file.set_len(end * cs)?;
    file.sync()?;
    let map = Qcow2Writer {
        header,
        cs,
        size: h.size,
        l1,
        l1_dirty,
        rt,
        used,
        end,
        file_len: end * cs,
        cursor: 0,
        pending: Vec::new(),
        cache: HashMap::new(),
        cache_capacity: cache_capacity(cs),
        clock: 0,
    };
    Ok(Box::new(SparseWriter::new(file, map)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Header {
        Header {
            version: 3,
            backing_file_offset: 0,
            cluster_bits: 16,
            size: 1 << 30,
            crypt_method: 0,
            l1_size: 2,
            l1_table_offset: 2 << 16,
            refcount_table_offset: 1 << 16,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: 104,
            extensions: Vec::new(),
        }
    }

    #[test]
    fn header_roundtrip() {
        let h = sample();
        assert_eq!(Header::parse(&h.encode()).unwrap(), h);
        let mut b = h.encode();
        b[4..8].copy_from_slice(&9u32.to_be_bytes());
        assert!(Header::parse(&b).unwrap_err().contains("version"));
    }

    #[test]
    fn header_extensions_are_bounded() {
        let mut b = sample().encode();
        b.resize(1 << 16, 0);
        // An extension claiming 4 GiB.
        b[104..108].copy_from_slice(&EXT_FEATURE_TABLE.to_be_bytes());
        b[108..112].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(
            Header::parse(&b)
                .unwrap_err()
                .contains("past the first cluster")
        );
        b[108..112].copy_from_slice(&8u32.to_be_bytes());
        let h = Header::parse(&b).unwrap();
        assert_eq!(h.extensions, vec![EXT_FEATURE_TABLE]);
    }

    #[test]
    fn refcount_packing() {
        let mut b = vec![0u8; 8];
        set_refcount(&mut b, 16, 1, 1);
        assert_eq!(b[..4], [0, 0, 0, 1]);
        let mut b = vec![0u8; 8];
        set_refcount(&mut b, 1, 9, 1);
        assert_eq!(b[1], 0b10);
        let mut b = vec![0u8; 8];
        set_refcount(&mut b, 4, 1, 1);
        assert_eq!(b[0], 0x10);
        let mut b = vec![0u8; 16];
        set_refcount(&mut b, 64, 1, 1);
        assert_eq!(b[15], 1);
    }

    proptest! {
        #[test]
        fn parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(h) = Header::parse(&bytes) {
                let _ = h.unsupported();
            }
        }

        #[test]
        fn mutated_headers_never_panic(pos in 0usize..120, val in any::<u8>()) {
            let mut b = sample().encode();
            b.resize(4096, 0);
            b[pos] = val;
            if let Ok(h) = Header::parse(&b) {
                let _ = h.unsupported();
                let _ = h.l2_coverage();
            }
        }
    }
}
