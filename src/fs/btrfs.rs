//! btrfs (single device): superblock, chunk tree, root tree and extent tree.
//!
//! Layout facts used here (all little-endian), from the btrfs on-disk format:
//! - Superblock: 4096 bytes at 64 KiB, mirrors at 64 MiB and 256 GiB when the device is that
//!   large. csum[32] @0x00 (over bytes 0x20..4096), fsid @0x20, bytenr u64 @0x30 (its own
//!   offset), flags u64 @0x38, magic `_BHRfS_M` @0x40, generation u64 @0x48, root u64 @0x50,
//!   chunk_root u64 @0x58, log_root u64 @0x60, total_bytes u64 @0x70, bytes_used u64 @0x78,
//!   num_devices u64 @0x88, sectorsize u32 @0x90, nodesize u32 @0x94, sys_chunk_array_size
//!   u32 @0xA0, chunk_root_generation u64 @0xA4, compat_ro_flags u64 @0xB4, incompat_flags
//!   u64 @0xBC, csum_type u16 @0xC4 (0 crc32c, 1 xxhash64, 2 sha256, 3 blake2b), root_level
//!   u8 @0xC6, chunk_root_level u8 @0xC7, dev_item @0xC9 (devid u64 @+0, total_bytes u64
//!   @+8, uuid @+66), label[256] @0x12B, metadata_uuid @0x23B (tree blocks carry it instead of
//!   fsid with the METADATA_UUID feature), sys_chunk_array[2048] @0x32B.
//! - Addresses in trees are logical; chunks map them to (device, physical offset) stripes.
//!   The sys_chunk_array holds the SYSTEM chunks (key 17 bytes, then a chunk item) so that the
//!   chunk tree, which lives in them, can be read; the chunk tree holds every chunk.
//! - Chunk item: length u64 @0, owner @8, stripe_len @16, type u64 @24 (block group flags:
//!   DATA 1, SYSTEM 2, METADATA 4, RAID0 8, RAID1 16, DUP 32, RAID10 64, RAID5 128, RAID6
//!   256, RAID1C3 512, RAID1C4 1024; none of the profile bits = SINGLE), io_align u32 @32,
//!   io_width @36, sector_size @40, num_stripes u16 @44, sub_stripes u16 @46, then stripes of
//!   32 bytes: devid u64, offset u64 (physical), dev_uuid[16].
//! - Tree block header (101 bytes): csum[32] @0 (over bytes 32..nodesize), fsid @0x20,
//!   bytenr u64 @0x30, flags @0x38, chunk_tree_uuid @0x40, generation u64 @0x50, owner @0x58,
//!   nritems u32 @0x60, level u8 @0x64. Leaves: items of 25 bytes (key: objectid u64, type
//!   u8, offset u64; data offset u32 relative to the end of the header; data size u32).
//!   Nodes: key pointers of 33 bytes (key, block pointer u64, generation u64).
//! - Root tree: ROOT_ITEM (key type 132) of the extent tree (objectid 2): generation u64
//!   @160, bytenr u64 @176, level u8 @238.
//! - Extent tree: EXTENT_ITEM (type 168; objectid = logical start, offset = length) and, with
//!   skinny metadata, METADATA_ITEM (type 169; objectid = logical start, length = nodesize)
//!   for every allocated extent, data and tree blocks alike (except log-tree blocks).
//!
//! What is used: every extent of the extent tree, mapped through the chunks to its physical
//! stripes (both copies for DUP), the first MiB of the device (never allocated by btrfs; boot
//! loaders live there), every superblock copy, and every tree block the walk visits. Tree
//! blocks are checked (checksum, address, fsid, level, generation, item bounds, key order) and
//! the walks are bounded; the extents must add up to the superblock's `bytes_used`.
//! Filesystems on several devices, RAID profiles other than SINGLE and DUP, an unreplayed log
//! tree, zoned or extent-tree-v2 filesystems and blake2b checksums give
//! no map (the caller reads every block, with a warning saying why).

use super::{BlockMap, FsInfo};
use crate::bytes::{le_u16, le_u32, le_u64};
use crate::error::Result;
use crate::fs::check::{Checked, bad, within};
use crate::fs::crc32::crc32c;
use crate::fs::{uuid_at, uuid_string};
use crate::volume::Volume;
use sha2::Digest;
use std::collections::HashSet;

/// Primary superblock offset, and its magic (at 0x40 in the superblock).
pub const SB_OFFSET: u64 = 64 * 1024;
pub const MAGIC: &[u8; 8] = b"_BHRfS_M";
/// Bytes of a superblock.
pub const SB_LEN: usize = 4096;
/// Superblock copies: 64 KiB, then 16 KiB << 12 and << 24 (`btrfs_sb_offset`).
const SB_MIRRORS: [u64; 3] = [64 << 10, 64 << 20, 256 << 30];
/// btrfs never allocates the first MiB of a device.
const RESERVED_START: u64 = 1 << 20;

const CSUM_LEN: usize = 32;
const HEADER_LEN: usize = 101;
const ITEM_LEN: usize = 25;
const KEY_PTR_LEN: usize = 33;
const KEY_LEN: usize = 17;
/// `BTRFS_MAX_LEVEL` is 8: levels 0 to 7.
const MAX_LEVEL: u8 = 7;
const SYS_CHUNK_ARRAY_OFF: usize = 0x32B;
const SYS_CHUNK_ARRAY_MAX: usize = 2048;
const CHUNK_ITEM_LEN: usize = 48;
const STRIPE_LEN: usize = 32;
/// A root item must reach its level byte.
const ROOT_ITEM_MIN_LEN: usize = 239;

const KEY_ROOT_ITEM: u8 = 132;
const KEY_EXTENT_ITEM: u8 = 168;
const KEY_METADATA_ITEM: u8 = 169;
const KEY_DEV_ITEM: u8 = 216;
const KEY_CHUNK_ITEM: u8 = 228;
const KEY_BLOCK_GROUP_ITEM: u8 = 192;
const KEY_FREE_SPACE_EXTENT: u8 = 199;
const KEY_FREE_SPACE_BITMAP: u8 = 200;
const EXTENT_TREE_OBJECTID: u64 = 2;
const FREE_SPACE_TREE_OBJECTID: u64 = 10;
const BLOCK_GROUP_TREE_OBJECTID: u64 = 11;
/// Extent item flag of a tree block (in non-skinny EXTENT_ITEMs: flags u64 @16).
const EXTENT_FLAG_TREE_BLOCK: u64 = 2;
/// Block group type bits: DATA, SYSTEM, METADATA.
const BG_TYPE_MASK: u64 = 0x7;
/// compat_ro FREE_SPACE_TREE and FREE_SPACE_TREE_VALID: the free-space tree is trustworthy.
const COMPAT_RO_FST: u64 = 0x3;
const COMPAT_RO_BLOCK_GROUP_TREE: u64 = 0x8;

const BG_DUP: u64 = 1 << 5;
/// RAID0, RAID1, DUP, RAID10, RAID5, RAID6, RAID1C3, RAID1C4.
const BG_PROFILE_MASK: u64 = 0x7F8;
const PROFILE_NAMES: [(u64, &str); 8] = [
    (1 << 3, "RAID0"),
    (1 << 4, "RAID1"),
    (1 << 5, "DUP"),
    (1 << 6, "RAID10"),
    (1 << 7, "RAID5"),
    (1 << 8, "RAID6"),
    (1 << 9, "RAID1C3"),
    (1 << 10, "RAID1C4"),
];

/// Incompatible features that change neither chunks nor extent items: MIXED_BACKREF,
/// DEFAULT_SUBVOL, MIXED_GROUPS, COMPRESS_LZO, COMPRESS_ZSTD, BIG_METADATA, EXTENDED_IREF,
/// RAID56 (its profiles are refused per chunk), SKINNY_METADATA, NO_HOLES, METADATA_UUID,
/// RAID1C34 (likewise), SIMPLE_QUOTA.
const INCOMPAT_KNOWN: u64 = 0xFFF | 1 << 16;
const INCOMPAT_METADATA_UUID: u64 = 1 << 10;
const INCOMPAT_NAMES: [(u64, &str); 3] = [
    (1 << 12, "zoned"),
    (1 << 13, "extent-tree-v2"),
    (1 << 14, "raid-stripe-tree"),
];
/// FREE_SPACE_TREE, FREE_SPACE_TREE_VALID, VERITY, BLOCK_GROUP_TREE.
const COMPAT_RO_KNOWN: u64 = 0xF;

/// The fields of a btrfs superblock that the probe and the map need.
#[derive(Debug, Clone)]
pub struct Superblock {
    raw: Vec<u8>,
    fsid: [u8; 16],
    metadata_uuid: [u8; 16],
    generation: u64,
    root: u64,
    chunk_root: u64,
    log_root: u64,
    total_bytes: u64,
    bytes_used: u64,
    num_devices: u64,
    sectorsize: u32,
    nodesize: u32,
    sys_array_size: u32,
    chunk_root_generation: u64,
    compat_ro: u64,
    incompat: u64,
    csum_type: u16,
    root_level: u8,
    chunk_root_level: u8,
    devid: u64,
    dev_total_bytes: u64,
    label: String,
}

impl Superblock {
    /// Parses the 4096 bytes at [`SB_OFFSET`]; `None` when they are not a btrfs superblock
    /// (or its sector size is implausible).
    pub fn parse(sb: &[u8]) -> Option<Superblock> {
        if sb.len() < SB_LEN || sb[0x40..0x48] != *MAGIC || le_u64(sb, 0x30) != SB_OFFSET {
            return None;
        }
        let sectorsize = le_u32(sb, 0x90);
        if !sectorsize.is_power_of_two() || !(512..=65536).contains(&sectorsize) {
            return None;
        }
        let label = &sb[0x12B..0x12B + 256];
        let end = label.iter().position(|&c| c == 0).unwrap_or(label.len());
        Some(Superblock {
            raw: sb[..SB_LEN].to_vec(),
            fsid: uuid_at(sb, 0x20),
            metadata_uuid: uuid_at(sb, 0x23B),
            generation: le_u64(sb, 0x48),
            root: le_u64(sb, 0x50),
            chunk_root: le_u64(sb, 0x58),
            log_root: le_u64(sb, 0x60),
            total_bytes: le_u64(sb, 0x70),
            bytes_used: le_u64(sb, 0x78),
            num_devices: le_u64(sb, 0x88),
            sectorsize,
            nodesize: le_u32(sb, 0x94),
            sys_array_size: le_u32(sb, 0xA0),
            chunk_root_generation: le_u64(sb, 0xA4),
            compat_ro: le_u64(sb, 0xB4),
            incompat: le_u64(sb, 0xBC),
            csum_type: le_u16(sb, 0xC4),
            root_level: sb[0xC6],
            chunk_root_level: sb[0xC7],
            devid: le_u64(sb, 0xC9),
            dev_total_bytes: le_u64(sb, 0xC9 + 8),
            label: String::from_utf8_lossy(&label[..end]).into_owned(),
        })
    }

    /// Reads the primary superblock of `vol`; `None` when it is not btrfs.
    pub fn read(vol: &dyn Volume) -> Result<Option<Superblock>> {
        if vol.size() < SB_OFFSET + SB_LEN as u64 {
            return Ok(None);
        }
        let mut b = vec![0u8; SB_LEN];
        vol.read_at(SB_OFFSET, &mut b)?;
        Ok(Superblock::parse(&b))
    }

    pub fn fsid(&self) -> [u8; 16] {
        self.fsid
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn sector_size(&self) -> u32 {
        self.sectorsize
    }

    /// Bytes the filesystem spans (all its devices).
    pub fn size(&self) -> u64 {
        self.total_bytes
    }

    /// Bytes of allocated extents; `None` when it exceeds the size.
    pub fn used_bytes(&self) -> Option<u64> {
        (self.bytes_used <= self.total_bytes).then_some(self.bytes_used)
    }

    pub fn info(&self) -> FsInfo {
        FsInfo {
            fs_type: "btrfs".into(),
            uuid: uuid_string(&self.fsid),
            label: self.label.clone(),
            block_size: self.sectorsize,
            size: self.total_bytes,
            used_bytes: self.used_bytes().unwrap_or(0),
            version: None,
        }
    }

    /// The fsid that tree blocks carry.
    fn tree_fsid(&self) -> [u8; 16] {
        if self.incompat & INCOMPAT_METADATA_UUID != 0 {
            self.metadata_uuid
        } else {
            self.fsid
        }
    }

    /// Checks the superblock's checksum, features and geometry against `vol`.
    fn check(&self, vol: &dyn Volume) -> Checked<()> {
        verify_csum(self.csum_type, &self.raw, "superblock")?;
        for (bit, name) in INCOMPAT_NAMES {
            if self.incompat & bit != 0 {
                return Err(bad!("{name} filesystems are not mapped"));
            }
        }
        let unknown = self.incompat & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(bad!("unsupported incompatible features {unknown:#x}"));
        }
        let unknown = self.compat_ro & !COMPAT_RO_KNOWN;
        if unknown != 0 {
            return Err(bad!(
                "unsupported read-only-compatible features {unknown:#x}"
            ));
        }
        if self.num_devices != 1 {
            return Err(bad!(
                "the filesystem spans {} devices; only single-device filesystems are mapped",
                self.num_devices
            ));
        }
        if self.log_root != 0 {
            return Err(bad!(
                "it has a log tree that was not replayed (not cleanly unmounted); mount it once \
                 to replay the log"
            ));
        }
        let ns = self.nodesize;
        if !ns.is_power_of_two() || !(4096..=65536).contains(&ns) || ns < self.sectorsize {
            return Err(bad!(
                "node size {ns} is implausible (sector size {})",
                self.sectorsize
            ));
        }
        if self.root_level > MAX_LEVEL || self.chunk_root_level > MAX_LEVEL {
            return Err(bad!("a root level exceeds the btrfs maximum"));
        }
        if self.sys_array_size as usize > SYS_CHUNK_ARRAY_MAX {
            return Err(bad!(
                "system chunk array of {} bytes is too large",
                self.sys_array_size
            ));
        }
        if self.dev_total_bytes > vol.size() {
            return Err(bad!(
                "the device holds {} bytes of filesystem but the volume has only {}",
                self.dev_total_bytes,
                vol.size()
            ));
        }
        Ok(())
    }
}

/// Checks the checksum at the start of `block` (which covers the bytes after the 32-byte
/// checksum field).
fn verify_csum(kind: u16, block: &[u8], what: &str) -> Checked<()> {
    let data = &block[CSUM_LEN..];
    let ok = match kind {
        0 => crc32c(data).to_le_bytes() == block[..4],
        1 => xxh64(data).to_le_bytes() == block[..8],
        2 => sha2::Sha256::digest(data)[..] == block[..32],
        3 => return Err(bad!("blake2b checksums are not supported")),
        k => return Err(bad!("unknown checksum type {k}")),
    };
    if ok {
        Ok(())
    } else {
        Err(bad!("{what}: checksum mismatch"))
    }
}

/// XXH64 with seed 0 (`csum_type` 1, stored little-endian), from the xxHash specification
/// (XXH64: four 64-bit lanes over 32-byte stripes, then the tail and the avalanche).
fn xxh64(data: &[u8]) -> u64 {
    const P1: u64 = 0x9E37_79B1_85EB_CA87;
    const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
    const P3: u64 = 0x1656_67B1_9E37_79F9;
    const P4: u64 = 0x85EB_CA77_C2B2_AE63;
    const P5: u64 = 0x27D4_EB2F_1656_67C5;
    fn round(acc: u64, lane: u64) -> u64 {
        acc.wrapping_add(lane.wrapping_mul(P2))
            .rotate_left(31)
            .wrapping_mul(P1)
    }
    fn merge(acc: u64, v: u64) -> u64 {
        (acc ^ round(0, v)).wrapping_mul(P1).wrapping_add(P4)
    }
    let mut rest = data;
    let mut h = if data.len() >= 32 {
        let mut v = [P1.wrapping_add(P2), P2, 0, 0u64.wrapping_sub(P1)];
        while rest.len() >= 32 {
            for (i, lane) in v.iter_mut().enumerate() {
                *lane = round(*lane, le_u64(rest, i * 8));
            }
            rest = &rest[32..];
        }
        let mut h = v[0]
            .rotate_left(1)
            .wrapping_add(v[1].rotate_left(7))
            .wrapping_add(v[2].rotate_left(12))
            .wrapping_add(v[3].rotate_left(18));
        for lane in v {
            h = merge(h, lane);
        }
        h
    } else {
        P5
    };
    h = h.wrapping_add(data.len() as u64);
    while rest.len() >= 8 {
        h = (h ^ round(0, le_u64(rest, 0)))
            .rotate_left(27)
            .wrapping_mul(P1)
            .wrapping_add(P4);
        rest = &rest[8..];
    }
    if rest.len() >= 4 {
        h = (h ^ u64::from(le_u32(rest, 0)).wrapping_mul(P1))
            .rotate_left(23)
            .wrapping_mul(P2)
            .wrapping_add(P3);
        rest = &rest[4..];
    }
    for &b in rest {
        h = (h ^ u64::from(b).wrapping_mul(P5))
            .rotate_left(11)
            .wrapping_mul(P1);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(P2);
    h ^= h >> 29;
    h = h.wrapping_mul(P3);
    h ^ (h >> 32)
}

/// Checks key `i` of a tree block: the first must be its parent's key for the block (`first`),
/// each must follow the one before it (`prev`).
fn check_key_order(
    what: &str,
    i: usize,
    key: Key,
    first: Option<Key>,
    prev: Option<Key>,
) -> Checked<()> {
    if i == 0 && first.is_some_and(|f| f != key) {
        return Err(bad!("{what}: first key differs from its parent's"));
    }
    if prev.is_some_and(|p| key <= p) {
        return Err(bad!("{what}: keys out of order"));
    }
    Ok(())
}

/// A tree key, ordered as btrfs orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    objectid: u64,
    kind: u8,
    offset: u64,
}

impl Key {
    fn at(b: &[u8], o: usize) -> Key {
        Key {
            objectid: le_u64(b, o),
            kind: b[o + 8],
            offset: le_u64(b, o + 9),
        }
    }
}

/// One logical range and where it lives on this device.
#[derive(Debug, Clone)]
struct Chunk {
    logical: u64,
    length: u64,
    /// Block group flags (type and profile).
    flags: u64,
    /// Physical offsets of its copies on this device (one for SINGLE, two for DUP).
    stripes: Vec<u64>,
}

/// Parses the chunk item `data` for logical address `logical`, checking that it is SINGLE or
/// DUP and lives on device `devid` within `dev_size` bytes.
fn parse_chunk(data: &[u8], logical: u64, devid: u64, dev_size: u64) -> Checked<Chunk> {
    let what = format!("chunk at logical {logical}");
    if data.len() < CHUNK_ITEM_LEN {
        return Err(bad!("{what}: item too short"));
    }
    let length = le_u64(data, 0);
    let flags = le_u64(data, 24);
    let num_stripes = le_u16(data, 44) as usize;
    if length == 0 || logical.checked_add(length).is_none() {
        return Err(bad!("{what}: length {length}"));
    }
    if num_stripes == 0 || data.len() < CHUNK_ITEM_LEN + num_stripes * STRIPE_LEN {
        return Err(bad!("{what}: {num_stripes} stripes do not fit its item"));
    }
    let profile = flags & BG_PROFILE_MASK;
    let expected = match profile {
        0 => 1,
        BG_DUP => 2,
        _ => {
            let name = PROFILE_NAMES
                .iter()
                .find(|(b, _)| profile & b != 0)
                .map_or("unknown", |(_, n)| n);
            return Err(bad!(
                "{what} uses the {name} profile; only SINGLE and DUP are mapped"
            ));
        }
    };
    if num_stripes != expected {
        return Err(bad!(
            "{what}: {num_stripes} stripes for a {} chunk",
            if profile == 0 { "SINGLE" } else { "DUP" }
        ));
    }
    let mut stripes = Vec::with_capacity(num_stripes);
    for i in 0..num_stripes {
        let o = CHUNK_ITEM_LEN + i * STRIPE_LEN;
        let dev = le_u64(data, o);
        let phys = le_u64(data, o + 8);
        if dev != devid {
            return Err(bad!(
                "{what} has a stripe on device {dev}, not on this one ({devid})"
            ));
        }
        if phys.checked_add(length).is_none_or(|e| e > dev_size) {
            return Err(bad!(
                "{what}: stripe at {phys} (+{length}) is past the device's end ({dev_size})"
            ));
        }
        stripes.push(phys);
    }
    Ok(Chunk {
        logical,
        length,
        flags,
        stripes,
    })
}

/// Chunks sorted by logical address, without overlaps.
#[derive(Debug, Default)]
struct ChunkMap {
    chunks: Vec<Chunk>,
}

impl ChunkMap {
    fn from_vec(mut chunks: Vec<Chunk>) -> Checked<ChunkMap> {
        chunks.sort_by_key(|c| c.logical);
        for w in chunks.windows(2) {
            if w[0].logical + w[0].length > w[1].logical {
                return Err(bad!(
                    "chunks at logical {} and {} overlap",
                    w[0].logical,
                    w[1].logical
                ));
            }
        }
        Ok(ChunkMap { chunks })
    }

    /// The chunk holding all of `[logical, logical+len)`.
    fn lookup(&self, logical: u64, len: u64) -> Checked<&Chunk> {
        self.index_of(logical, len).map(|i| &self.chunks[i])
    }

    /// Whether any chunk overlaps `[logical, logical+len)`.
    fn touches(&self, logical: u64, len: u64) -> bool {
        let end = logical.saturating_add(len);
        let i = self
            .chunks
            .partition_point(|c| c.logical + c.length <= logical);
        self.chunks.get(i).is_some_and(|c| c.logical < end)
    }

    /// The index of the chunk holding all of `[logical, logical+len)`.
    fn index_of(&self, logical: u64, len: u64) -> Checked<usize> {
        let i = self.chunks.partition_point(|c| c.logical <= logical);
        i.checked_sub(1)
            .filter(|&i| {
                let c = &self.chunks[i];
                logical
                    .checked_add(len)
                    .is_some_and(|e| e <= c.logical + c.length)
            })
            .ok_or_else(|| bad!("logical range {logical} (+{len}) is not inside one chunk"))
    }
}

/// The SYSTEM chunks of the superblock's sys_chunk_array.
fn sys_chunks(sb: &Superblock) -> Checked<ChunkMap> {
    let arr = &sb.raw[SYS_CHUNK_ARRAY_OFF..SYS_CHUNK_ARRAY_OFF + sb.sys_array_size as usize];
    let mut chunks = Vec::new();
    let mut o = 0usize;
    while o < arr.len() {
        if o + KEY_LEN + CHUNK_ITEM_LEN > arr.len() {
            return Err(bad!("system chunk array is truncated"));
        }
        let key = Key::at(arr, o);
        if key.kind != KEY_CHUNK_ITEM {
            return Err(bad!("system chunk array holds a key of type {}", key.kind));
        }
        let item = &arr[o + KEY_LEN..];
        let stripes = le_u16(item, 44) as usize;
        let len = CHUNK_ITEM_LEN + stripes * STRIPE_LEN;
        if len > item.len() {
            return Err(bad!("system chunk array is truncated"));
        }
        chunks.push(parse_chunk(
            &item[..len],
            key.offset,
            sb.devid,
            sb.dev_total_bytes,
        )?);
        o += KEY_LEN + len;
    }
    if chunks.is_empty() {
        return Err(bad!("system chunk array is empty"));
    }
    ChunkMap::from_vec(chunks)
}

/// What a tree walk reports.
enum Visit<'a> {
    /// A tree block at this logical address was read and checked.
    Node(u64),
    /// A leaf item and its data.
    Item(Key, &'a [u8]),
}

/// Reads and checks tree blocks.
struct Trees<'a> {
    vol: &'a dyn Volume,
    sb: &'a Superblock,
    fsid: [u8; 16],
    /// Tree blocks read so far, against `max_nodes`.
    nodes_read: u64,
    max_nodes: u64,
}

impl Trees<'_> {
    /// Reads the tree block at `logical` (trying each copy) and checks its header.
    fn read_node(
        &mut self,
        chunks: &ChunkMap,
        logical: u64,
        level: u8,
        generation: u64,
    ) -> Checked<Vec<u8>> {
        self.nodes_read += 1;
        if self.nodes_read > self.max_nodes {
            return Err(bad!(
                "the trees have more blocks than the filesystem can hold"
            ));
        }
        let ns = u64::from(self.sb.nodesize);
        if !logical.is_multiple_of(u64::from(self.sb.sectorsize)) {
            return Err(bad!("tree block address {logical} is not sector-aligned"));
        }
        let chunk = chunks.lookup(logical, ns)?;
        let mut buf = vec![0u8; ns as usize];
        let mut last_err = bad!("tree block {logical} has no stripe");
        for &phys in &chunk.stripes {
            let at = phys + (logical - chunk.logical);
            match self.vol.read_at(at, &mut buf) {
                Ok(()) => match self.check_node(&buf, logical, level, generation) {
                    Ok(()) => return Ok(buf),
                    Err(e) => last_err = e,
                },
                Err(e) => last_err = within(e, format!("reading tree block {logical}")),
            }
        }
        Err(last_err)
    }

    fn check_node(&self, b: &[u8], logical: u64, level: u8, generation: u64) -> Checked<()> {
        let what = format!("tree block {logical}");
        verify_csum(self.sb.csum_type, b, &what)?;
        if uuid_at(b, 0x20) != self.fsid {
            return Err(bad!("{what}: belongs to another filesystem"));
        }
        if le_u64(b, 0x30) != logical {
            return Err(bad!("{what}: records address {}", le_u64(b, 0x30)));
        }
        if b[0x64] != level {
            return Err(bad!("{what}: level {}, expected {level}", b[0x64]));
        }
        if le_u64(b, 0x50) != generation {
            return Err(bad!(
                "{what}: generation {}, expected {generation}",
                le_u64(b, 0x50)
            ));
        }
        if generation > self.sb.generation {
            return Err(bad!(
                "{what}: generation {generation} is newer than the superblock's ({})",
                self.sb.generation
            ));
        }
        let n = le_u32(b, 0x60) as usize;
        let room = b.len() - HEADER_LEN;
        if level == 0 {
            if n > room / ITEM_LEN {
                return Err(bad!("{what}: {n} items do not fit"));
            }
            let items_end = n * ITEM_LEN;
            for i in 0..n {
                let o = HEADER_LEN + i * ITEM_LEN;
                let off = le_u32(b, o + KEY_LEN) as usize;
                let size = le_u32(b, o + KEY_LEN + 4) as usize;
                if off < items_end || off.checked_add(size).is_none_or(|e| e > room) {
                    return Err(bad!("{what}: item {i} data is outside the block"));
                }
            }
        } else if n == 0 || n > room / KEY_PTR_LEN {
            return Err(bad!("{what}: {n} key pointers"));
        }
        Ok(())
    }

    /// Walks the tree rooted at `root` depth-first, children in key order, checking that keys
    /// strictly increase (which also catches a block reached twice) and that every child
    /// starts with the key its parent gives it.
    fn walk(
        &mut self,
        chunks: &ChunkMap,
        root: u64,
        level: u8,
        generation: u64,
        visit: &mut dyn FnMut(Visit) -> Checked<()>,
    ) -> Checked<()> {
        if level > MAX_LEVEL {
            return Err(bad!("tree root {root} has level {level}"));
        }
        let mut last: Option<Key> = None;
        let mut nodes = HashSet::new();
        // (address, level, generation, first key the parent expects)
        let mut stack: Vec<(u64, u8, u64, Option<Key>)> = vec![(root, level, generation, None)];
        while let Some((logical, level, gen_, first)) = stack.pop() {
            let b = self.read_node(chunks, logical, level, gen_)?;
            visit(Visit::Node(logical))?;
            let n = le_u32(&b, 0x60) as usize;
            let what = format!("tree block {logical}");
            if level == 0 {
                if n == 0 && first.is_some() {
                    return Err(bad!("{what}: empty leaf below a node"));
                }
                for i in 0..n {
                    let o = HEADER_LEN + i * ITEM_LEN;
                    let key = Key::at(&b, o);
                    check_key_order(&what, i, key, first, last)?;
                    last = Some(key);
                    let off = HEADER_LEN + le_u32(&b, o + KEY_LEN) as usize;
                    let size = le_u32(&b, o + KEY_LEN + 4) as usize;
                    visit(Visit::Item(key, &b[off..off + size]))?;
                }
            } else {
                if !nodes.insert(logical) {
                    return Err(bad!("{what}: reached twice (the tree has a loop)"));
                }
                let mut children = Vec::with_capacity(n);
                let mut prev: Option<Key> = None;
                for i in 0..n {
                    let o = HEADER_LEN + i * KEY_PTR_LEN;
                    let key = Key::at(&b, o);
                    check_key_order(&what, i, key, first, prev)?;
                    prev = Some(key);
                    let ptr = le_u64(&b, o + KEY_LEN);
                    let child_gen = le_u64(&b, o + KEY_LEN + 8);
                    children.push((ptr, level - 1, child_gen, Some(key)));
                }
                stack.extend(children.into_iter().rev());
            }
        }
        Ok(())
    }
}

/// Marks the physical copies of the logical range `[logical, logical+len)`.
fn mark_logical(map: &mut BlockMap, chunks: &ChunkMap, logical: u64, len: u64) -> Checked<()> {
    let c = chunks.lookup(logical, len)?;
    for &phys in &c.stripes {
        map.mark_bytes(phys + (logical - c.logical), len);
    }
    Ok(())
}

/// Builds the allocation map of a single-device btrfs filesystem at `granularity` bytes per
/// bit. `Err` explains why the filesystem's data cannot be used.
pub fn allocation_map(vol: &dyn Volume, sb: &Superblock, granularity: u64) -> Checked<BlockMap> {
    sb.check(vol)?;
    let dev_size = sb.dev_total_bytes;
    let ns = u64::from(sb.nodesize);
    let mut map = BlockMap::new(vol.size(), granularity);
    map.mark_bytes(dev_size, vol.size() - dev_size);
    map.mark_bytes(0, RESERVED_START.min(dev_size));
    for m in SB_MIRRORS {
        if m + SB_LEN as u64 <= dev_size {
            map.mark_bytes(m, SB_LEN as u64);
        }
    }
    if sb.chunk_root_generation > sb.generation {
        return Err(bad!(
            "the chunk root's generation {} is newer than the superblock's ({})",
            sb.chunk_root_generation,
            sb.generation
        ));
    }
    let mut trees = Trees {
        vol,
        sb,
        fsid: sb.tree_fsid(),
        nodes_read: 0,
        max_nodes: dev_size / ns + 1,
    };
    // Every tree block read: the extent tree must account for each of them.
    let mut read_nodes: Vec<u64> = Vec::new();
    // The chunk tree, read through the SYSTEM chunks.
    let sys = sys_chunks(sb)?;
    let mut chunks = Vec::new();
    let mut devices = Vec::new();
    trees.walk(
        &sys,
        sb.chunk_root,
        sb.chunk_root_level,
        sb.chunk_root_generation,
        &mut |v| {
            match v {
                Visit::Node(logical) => {
                    read_nodes.push(logical);
                    mark_logical(&mut map, &sys, logical, ns)?
                }
                Visit::Item(key, data) if key.kind == KEY_CHUNK_ITEM => {
                    chunks.push(parse_chunk(data, key.offset, sb.devid, dev_size)?)
                }
                Visit::Item(key, _) if key.kind == KEY_DEV_ITEM => devices.push(key.offset),
                Visit::Item(..) => {}
            }
            Ok(())
        },
    )?;
    if devices != [sb.devid] {
        return Err(bad!(
            "the chunk tree lists devices {devices:?}; only single-device filesystems are mapped"
        ));
    }
    let chunks = ChunkMap::from_vec(chunks)?;
    // The superblock's copy of the SYSTEM chunks must be the chunk tree's.
    for c in &sys.chunks {
        let same = chunks.lookup(c.logical, c.length).is_ok_and(|t| {
            t.logical == c.logical
                && t.length == c.length
                && t.flags == c.flags
                && t.stripes == c.stripes
        });
        if !same {
            return Err(bad!(
                "the system chunk at logical {} differs from the chunk tree's",
                c.logical
            ));
        }
    }

    // The root tree, for the roots of the extent, free-space and block group trees.
    let mut extent_root = None;
    let mut fst_root = None;
    let mut bg_root = None;
    trees.walk(&chunks, sb.root, sb.root_level, sb.generation, &mut |v| {
        match v {
            Visit::Node(logical) => {
                read_nodes.push(logical);
                mark_logical(&mut map, &chunks, logical, ns)?
            }
            Visit::Item(key, data) if key.kind == KEY_ROOT_ITEM => {
                let slot = match key.objectid {
                    EXTENT_TREE_OBJECTID => &mut extent_root,
                    FREE_SPACE_TREE_OBJECTID => &mut fst_root,
                    BLOCK_GROUP_TREE_OBJECTID => &mut bg_root,
                    _ => return Ok(()),
                };
                if data.len() < ROOT_ITEM_MIN_LEN {
                    return Err(bad!("root item of tree {} is too short", key.objectid));
                }
                let generation = le_u64(data, 160);
                if generation > sb.generation {
                    return Err(bad!(
                        "tree {} has generation {generation}, newer than the superblock's ({})",
                        key.objectid,
                        sb.generation
                    ));
                }
                *slot = Some((le_u64(data, 176), data[238], generation));
            }
            Visit::Item(..) => {}
        }
        Ok(())
    })?;
    let (root, level, generation) =
        extent_root.ok_or_else(|| bad!("the root tree has no extent tree"))?;

    // The free-space tree, when valid: its free ranges (in order, disjoint) and their bytes
    // per chunk, for the extents to be checked against.
    let sector = u64::from(sb.sectorsize);
    let fst = if sb.compat_ro & COMPAT_RO_FST == COMPAT_RO_FST {
        let (root, level, generation) =
            fst_root.ok_or_else(|| bad!("the root tree has no free-space tree"))?;
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let mut per_chunk = vec![0u64; chunks.chunks.len()];
        let mut add_free = |start: u64, len: u64| -> Checked<()> {
            let i = match chunks.index_of(start, len) {
                Ok(i) => i,
                // mkfs.btrfs (6.2 at least) leaves the free space of the temporary block
                // groups it removes in the tree: a range no chunk touches describes nothing.
                Err(_) if !chunks.touches(start, len) => return Ok(()),
                Err(e) => return Err(e),
            };
            if let Some(&(s, l)) = ranges.last()
                && start < s + l
            {
                return Err(bad!(
                    "the free-space tree's ranges at {s} (+{l}) and {start} (+{len}) overlap"
                ));
            }
            ranges.push((start, len));
            per_chunk[i] += len;
            Ok(())
        };
        trees.walk(&chunks, root, level, generation, &mut |v| {
            match v {
                Visit::Node(logical) => {
                    read_nodes.push(logical);
                    mark_logical(&mut map, &chunks, logical, ns)?
                }
                Visit::Item(key, _) if key.kind == KEY_FREE_SPACE_EXTENT => {
                    if key.offset == 0 {
                        return Err(bad!("free-space extent at {} is empty", key.objectid));
                    }
                    add_free(key.objectid, key.offset)?
                }
                Visit::Item(key, data) if key.kind == KEY_FREE_SPACE_BITMAP => {
                    let bits = key.offset / sector;
                    if bits == 0 || (data.len() as u64) < bits.div_ceil(8) {
                        return Err(bad!(
                            "free-space bitmap at {} is shorter than its range",
                            key.objectid
                        ));
                    }
                    let mut run: Option<u64> = None;
                    for b in 0..=bits {
                        let set = b < bits && data[(b / 8) as usize] & (1 << (b % 8)) != 0;
                        match (set, run) {
                            (true, None) => run = Some(b),
                            (false, Some(r)) => {
                                add_free(key.objectid + r * sector, (b - r) * sector)?;
                                run = None;
                            }
                            _ => {}
                        }
                    }
                }
                Visit::Item(..) => {}
            }
            Ok(())
        })?;
        Some((ranges, per_chunk))
    } else {
        None
    };

    // The extent tree: every allocated extent, in order and disjoint; tree block extents
    // remembered; bytes per chunk summed; block group items collected.
    let mut used = 0u64;
    let mut last_extent: Option<(u64, u64)> = None;
    // The first free range that may still meet an extent.
    let mut next_free = 0usize;
    let mut tree_extents: HashSet<u64> = HashSet::new();
    let mut chunk_used = vec![0u64; chunks.chunks.len()];
    let mut groups: Vec<(Key, Vec<u8>)> = Vec::new();
    trees.walk(&chunks, root, level, generation, &mut |v| {
        let (logical, len) = match v {
            Visit::Node(logical) => {
                read_nodes.push(logical);
                return mark_logical(&mut map, &chunks, logical, ns);
            }
            Visit::Item(key, data) if key.kind == KEY_BLOCK_GROUP_ITEM => {
                groups.push((key, data.to_vec()));
                return Ok(());
            }
            Visit::Item(key, data) if key.kind == KEY_EXTENT_ITEM => {
                let tree_block = data.len() >= 24 && le_u64(data, 16) & EXTENT_FLAG_TREE_BLOCK != 0;
                if tree_block && key.offset == ns {
                    tree_extents.insert(key.objectid);
                }
                (key.objectid, key.offset)
            }
            Visit::Item(key, _) if key.kind == KEY_METADATA_ITEM => {
                tree_extents.insert(key.objectid);
                (key.objectid, ns)
            }
            Visit::Item(..) => return Ok(()),
        };
        if len == 0 || !logical.is_multiple_of(sector) || !len.is_multiple_of(sector) {
            return Err(bad!(
                "extent at logical {logical} (+{len}) is empty or not sector-aligned"
            ));
        }
        if let Some((s, l)) = last_extent
            && logical < s + l
        {
            return Err(bad!(
                "extents at logical {s} (+{l}) and {logical} (+{len}) overlap"
            ));
        }
        if let Some((free, _)) = &fst {
            while free.get(next_free).is_some_and(|&(s, l)| s + l <= logical) {
                next_free += 1;
            }
            if let Some(&(s, l)) = free.get(next_free)
                && s < logical + len
            {
                return Err(bad!(
                    "the free-space tree lists logical {s} (+{l}) as free, but the extent at \
                     {logical} (+{len}) is allocated"
                ));
            }
        }
        let i = chunks.index_of(logical, len)?;
        mark_logical(&mut map, &chunks, logical, len)?;
        chunk_used[i] += len;
        last_extent = Some((logical, len));
        used = used.saturating_add(len);
        Ok(())
    })?;
    if used != sb.bytes_used {
        return Err(bad!(
            "the extent tree holds {used} bytes of extents, the superblock counts {}",
            sb.bytes_used
        ));
    }

    // Block group items: in the block group tree when the filesystem has one.
    if sb.compat_ro & COMPAT_RO_BLOCK_GROUP_TREE != 0 {
        let (root, level, generation) =
            bg_root.ok_or_else(|| bad!("the root tree has no block group tree"))?;
        trees.walk(&chunks, root, level, generation, &mut |v| {
            match v {
                Visit::Node(logical) => {
                    read_nodes.push(logical);
                    mark_logical(&mut map, &chunks, logical, ns)?
                }
                Visit::Item(key, data) if key.kind == KEY_BLOCK_GROUP_ITEM => {
                    groups.push((key, data.to_vec()))
                }
                Visit::Item(..) => {}
            }
            Ok(())
        })?;
    }
    check_block_groups(&chunks, &groups, &chunk_used)?;

    // Extents and free space must tile each block group.
    if let Some((_, free)) = &fst {
        for (i, c) in chunks.chunks.iter().enumerate() {
            // The kernel records a new block group as wholly free, superblock copies
            // included (only its in-memory cache leaves them out).
            let accounted = chunk_used[i] + free[i];
            if accounted != c.length {
                return Err(bad!(
                    "block group at logical {}: {} bytes of extents and {} free make {accounted} \
                     of its {} bytes",
                    c.logical,
                    chunk_used[i],
                    free[i],
                    c.length
                ));
            }
        }
    }

    // Every tree block read lies in an extent the extent tree lists as a tree block.
    for logical in read_nodes {
        if !tree_extents.contains(&logical) {
            return Err(bad!(
                "tree block {logical} is not allocated in the extent tree"
            ));
        }
    }
    Ok(map)
}

/// Checks that each chunk has one block group item of the same range and type, whose `used`
/// counter equals the bytes of extents the extent tree lists in it. Block group item: used
/// u64 @0, chunk_objectid u64 @8, flags u64 @16; key (start, 192, length).
fn check_block_groups(
    chunks: &ChunkMap,
    groups: &[(Key, Vec<u8>)],
    chunk_used: &[u64],
) -> Checked<()> {
    if groups.len() != chunks.chunks.len() {
        return Err(bad!(
            "{} block group items for {} chunks",
            groups.len(),
            chunks.chunks.len()
        ));
    }
    for (key, data) in groups {
        let what = format!("block group at logical {}", key.objectid);
        if data.len() < 24 {
            return Err(bad!("{what}: item too short"));
        }
        let i = chunks
            .index_of(key.objectid, key.offset.max(1))
            .map_err(|e| within(e, what.clone()))?;
        let c = &chunks.chunks[i];
        if c.logical != key.objectid || c.length != key.offset {
            return Err(bad!("{what}: its range differs from its chunk's"));
        }
        let (bg_used, flags) = (le_u64(data, 0), le_u64(data, 16));
        if flags & BG_TYPE_MASK != c.flags & BG_TYPE_MASK {
            return Err(bad!("{what}: its type differs from its chunk's"));
        }
        if bg_used != chunk_used[i] {
            return Err(bad!(
                "{what}: it counts {bg_used} bytes used, the extent tree lists {}",
                chunk_used[i]
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::tests::Mem;
    use proptest::prelude::*;

    const MIB: u64 = 1 << 20;
    const NS: usize = 4096;
    const GEN: u64 = 7;
    const FSID: [u8; 16] = [0xB7; 16];
    const SIZE: u64 = 8 * MIB;
    /// SYSTEM chunk: logical 1 MiB, SINGLE at physical 1 MiB.
    const SYS: u64 = MIB;
    /// METADATA chunk: logical 16 MiB, DUP at physical 3 MiB and 6 MiB.
    const META: u64 = 16 * MIB;
    const META_PHYS: [u64; 2] = [3 * MIB, 6 * MIB];
    /// DATA chunk: logical 32 MiB, SINGLE at physical 5 MiB.
    const DATA: u64 = 32 * MIB;
    const DATA_PHYS: u64 = 5 * MIB;
    /// Data extents (logical, length).
    const EXTENTS: [(u64, u64); 2] = [(DATA, 8192), (DATA + 65536, 4096)];

    fn put(b: &mut [u8], at: usize, bytes: &[u8]) {
        b[at..at + bytes.len()].copy_from_slice(bytes);
    }

    fn key_bytes(k: Key) -> Vec<u8> {
        let mut v = k.objectid.to_le_bytes().to_vec();
        v.push(k.kind);
        v.extend_from_slice(&k.offset.to_le_bytes());
        v
    }

    fn key(objectid: u64, kind: u8, offset: u64) -> Key {
        Key {
            objectid,
            kind,
            offset,
        }
    }

    fn chunk_item(len: u64, flags: u64, stripes: &[u64]) -> Vec<u8> {
        let mut v = vec![0u8; CHUNK_ITEM_LEN];
        put(&mut v, 0, &len.to_le_bytes());
        put(&mut v, 8, &2u64.to_le_bytes());
        put(&mut v, 16, &65536u64.to_le_bytes());
        put(&mut v, 24, &flags.to_le_bytes());
        put(&mut v, 44, &(stripes.len() as u16).to_le_bytes());
        for &s in stripes {
            v.extend_from_slice(&1u64.to_le_bytes());
            v.extend_from_slice(&s.to_le_bytes());
            v.extend_from_slice(&[0xDE; 16]);
        }
        v
    }

    fn finish_block(b: &mut [u8], logical: u64, level: u8, n: usize) {
        put(b, 0x20, &FSID);
        put(b, 0x30, &logical.to_le_bytes());
        put(b, 0x50, &GEN.to_le_bytes());
        put(b, 0x60, &(n as u32).to_le_bytes());
        b[0x64] = level;
        let c = crc32c(&b[CSUM_LEN..]);
        b[..CSUM_LEN].fill(0);
        put(b, 0, &c.to_le_bytes());
    }

    fn leaf(logical: u64, items: &[(Key, Vec<u8>)]) -> Vec<u8> {
        let mut b = vec![0u8; NS];
        let mut end = NS - HEADER_LEN;
        for (i, (k, data)) in items.iter().enumerate() {
            end -= data.len();
            let o = HEADER_LEN + i * ITEM_LEN;
            put(&mut b, o, &key_bytes(*k));
            put(&mut b, o + KEY_LEN, &(end as u32).to_le_bytes());
            put(&mut b, o + KEY_LEN + 4, &(data.len() as u32).to_le_bytes());
            put(&mut b, HEADER_LEN + end, data);
        }
        finish_block(&mut b, logical, 0, items.len());
        b
    }

    fn node(logical: u64, level: u8, ptrs: &[(Key, u64)]) -> Vec<u8> {
        let mut b = vec![0u8; NS];
        for (i, (k, ptr)) in ptrs.iter().enumerate() {
            let o = HEADER_LEN + i * KEY_PTR_LEN;
            put(&mut b, o, &key_bytes(*k));
            put(&mut b, o + KEY_LEN, &ptr.to_le_bytes());
            put(&mut b, o + KEY_LEN + 8, &GEN.to_le_bytes());
        }
        finish_block(&mut b, logical, level, ptrs.len());
        b
    }

    fn set_sb_csum(img: &mut [u8]) {
        let sb = &mut img[SB_OFFSET as usize..SB_OFFSET as usize + SB_LEN];
        let c = crc32c(&sb[CSUM_LEN..]);
        put(sb, 0, &c.to_le_bytes());
    }

    /// Recomputes every tree block checksum and the superblock's.
    fn recrc_all(img: &mut [u8]) {
        let blocks = [SYS].into_iter().chain(
            META_PHYS
                .iter()
                .flat_map(|&p| (0..4).map(move |i| p + i * NS as u64)),
        );
        for p in blocks {
            let b = &mut img[p as usize..p as usize + NS];
            if b[0x20..0x30] == FSID {
                let c = crc32c(&b[CSUM_LEN..]);
                put(b, 0, &c.to_le_bytes());
            }
        }
        set_sb_csum(img);
    }

    /// Where a tree block at a META logical address lives: both DUP copies.
    fn write_meta(img: &mut [u8], logical: u64, block: &[u8]) {
        for p in META_PHYS {
            let at = (p + logical - META) as usize;
            put(img, at, block);
        }
    }

    /// A tiny single-device btrfs image (8 MiB, 4 KiB nodes): SYSTEM, METADATA (DUP) and DATA
    /// chunks; a chunk tree leaf, a root tree leaf and an extent tree of one leaf or (`split`)
    /// two leaves under a node; two data extents.
    fn image(split: bool) -> Vec<u8> {
        let mut img = vec![0u8; SIZE as usize];
        let sys_chunk = chunk_item(MIB, 2, &[SYS]);
        let meta_chunk = chunk_item(MIB, 4 | BG_DUP, &META_PHYS);
        let data_chunk = chunk_item(2 * MIB, 1, &[DATA_PHYS]);
        // Chunk tree leaf at SYS.
        let chunk_leaf = leaf(
            SYS,
            &[
                (key(1, KEY_DEV_ITEM, 1), vec![0u8; 98]),
                (key(256, KEY_CHUNK_ITEM, SYS), sys_chunk.clone()),
                (key(256, KEY_CHUNK_ITEM, META), meta_chunk),
                (key(256, KEY_CHUNK_ITEM, DATA), data_chunk),
            ],
        );
        put(&mut img, SYS as usize, &chunk_leaf);
        // Root tree leaf at META, extent tree at META + 4 KiB (and + 8, + 12 KiB).
        let ext_root = META + NS as u64;
        let mut root_item = vec![0u8; 439];
        put(&mut root_item, 160, &GEN.to_le_bytes());
        put(&mut root_item, 176, &ext_root.to_le_bytes());
        root_item[238] = u8::from(split);
        let root_leaf = leaf(
            META,
            &[
                (key(1, KEY_ROOT_ITEM, 0), vec![0u8; 439]),
                (key(EXTENT_TREE_OBJECTID, KEY_ROOT_ITEM, 0), root_item),
            ],
        );
        write_meta(&mut img, META, &root_leaf);
        let tree_blocks: Vec<u64> = if split {
            vec![META, META + 4096, META + 8192, META + 12288]
        } else {
            vec![META, META + 4096]
        };
        let mut items: Vec<(Key, Vec<u8>)> = vec![(key(SYS, KEY_METADATA_ITEM, 0), vec![1; 33])];
        items.extend(
            tree_blocks
                .iter()
                .map(|&b| (key(b, KEY_METADATA_ITEM, 0), vec![1; 33])),
        );
        // Block group items: used bytes, chunk objectid, flags.
        let bg = |used: u64, flags: u64| [used, 256, flags].map(u64::to_le_bytes).concat();
        items.push((key(SYS, KEY_BLOCK_GROUP_ITEM, MIB), bg(NS as u64, 2)));
        let meta_used = tree_blocks.len() as u64 * NS as u64;
        items.push((
            key(META, KEY_BLOCK_GROUP_ITEM, MIB),
            bg(meta_used, 4 | BG_DUP),
        ));
        let data_used = EXTENTS.iter().map(|e| e.1).sum();
        items.push((key(DATA, KEY_BLOCK_GROUP_ITEM, 2 * MIB), bg(data_used, 1)));
        items.extend(
            EXTENTS
                .iter()
                .map(|&(l, n)| (key(l, KEY_EXTENT_ITEM, n), vec![2; 53])),
        );
        items.sort_by_key(|i| i.0);
        if split {
            let (a, b) = items.split_at(3);
            let (l1, l2) = (META + 8192, META + 12288);
            write_meta(&mut img, l1, &leaf(l1, a));
            write_meta(&mut img, l2, &leaf(l2, b));
            write_meta(
                &mut img,
                ext_root,
                &node(ext_root, 1, &[(a[0].0, l1), (b[0].0, l2)]),
            );
        } else {
            write_meta(&mut img, ext_root, &leaf(ext_root, &items));
        }
        let used =
            (tree_blocks.len() as u64 + 1) * NS as u64 + EXTENTS.iter().map(|e| e.1).sum::<u64>();
        // Superblock.
        let sb = &mut img[SB_OFFSET as usize..SB_OFFSET as usize + SB_LEN];
        put(sb, 0x20, &FSID);
        put(sb, 0x30, &SB_OFFSET.to_le_bytes());
        put(sb, 0x40, MAGIC);
        put(sb, 0x48, &GEN.to_le_bytes());
        put(sb, 0x50, &META.to_le_bytes());
        put(sb, 0x58, &SYS.to_le_bytes());
        put(sb, 0x70, &SIZE.to_le_bytes());
        put(sb, 0x78, &used.to_le_bytes());
        put(sb, 0x88, &1u64.to_le_bytes());
        put(sb, 0x90, &4096u32.to_le_bytes());
        put(sb, 0x94, &(NS as u32).to_le_bytes());
        let array = [key_bytes(key(256, KEY_CHUNK_ITEM, SYS)), sys_chunk].concat();
        put(sb, 0xA0, &(array.len() as u32).to_le_bytes());
        put(sb, 0xA4, &GEN.to_le_bytes());
        put(sb, 0xBC, &0x141u64.to_le_bytes());
        put(sb, 0xC9, &1u64.to_le_bytes());
        put(sb, 0xC9 + 8, &SIZE.to_le_bytes());
        put(sb, 0x12B, b"tiny-btrfs");
        put(sb, SYS_CHUNK_ARRAY_OFF, &array);
        set_sb_csum(&mut img);
        img
    }

    fn used_4k(map: &BlockMap) -> Vec<u64> {
        (0..map.block_count()).filter(|&b| map.is_used(b)).collect()
    }

    fn expected(split: bool) -> Vec<u64> {
        let mut want: Vec<u64> = (0..256).collect(); // the first MiB
        want.push(SYS / 4096);
        let n = if split { 4 } else { 2 };
        for p in META_PHYS {
            want.extend((0..n).map(|i| p / 4096 + i));
        }
        want.extend([
            DATA_PHYS / 4096,
            DATA_PHYS / 4096 + 1,
            (DATA_PHYS + 65536) / 4096,
        ]);
        want.sort();
        want
    }

    fn map_of(img: Vec<u8>) -> Checked<BlockMap> {
        let vol = Mem(img);
        let sb = Superblock::read(&vol).unwrap().unwrap();
        allocation_map(&vol, &sb, 4096)
    }

    #[test]
    fn extents_are_mapped_through_the_chunks() {
        for split in [false, true] {
            let img = image(split);
            let vol = Mem(img.clone());
            let sb = Superblock::read(&vol).unwrap().unwrap();
            let info = sb.info();
            assert_eq!(info.fs_type, "btrfs");
            assert_eq!(info.label, "tiny-btrfs");
            assert_eq!(info.uuid, "b7b7b7b7-b7b7-b7b7-b7b7-b7b7b7b7b7b7");
            assert_eq!(info.size, SIZE);
            let map = map_of(img).unwrap();
            assert_eq!(used_4k(&map), expected(split), "split {split}");
        }
    }

    #[test]
    fn xxh64_check_values() {
        assert_eq!(xxh64(b""), 0xEF46_DB37_51D8_E999);
        assert_eq!(xxh64(b"a"), 0xD24E_C4F1_A98C_6E5B);
        assert_eq!(xxh64(b"abc"), 0x44BC_2CF5_AD77_0999);
    }

    #[test]
    fn probe_maps_or_says_why_not() {
        let p = crate::fs::probe(&Mem(image(false)), 4096).unwrap();
        assert_eq!(p.fs.unwrap().fs_type, "btrfs");
        assert_eq!(used_4k(&p.map.unwrap()), expected(false));
        assert!(p.warning.is_none());
        let mut img = image(false);
        put(&mut img, SB_OFFSET as usize + 0x88, &3u64.to_le_bytes());
        set_sb_csum(&mut img);
        let p = crate::fs::probe(&Mem(img), 4096).unwrap();
        assert!(p.map.is_none());
        let w = p.warning.unwrap();
        assert!(
            w.starts_with("btrfs allocation data is unusable (the filesystem spans 3 devices"),
            "{w}"
        );
    }

    #[test]
    fn a_damaged_dup_copy_is_read_from_the_other() {
        let mut img = image(true);
        img[(META_PHYS[0] + 4096 + 500) as usize] ^= 1;
        assert_eq!(used_4k(&map_of(img.clone()).unwrap()), expected(true));
        img[(META_PHYS[1] + 4096 + 500) as usize] ^= 1;
        let err = map_of(img).unwrap_err();
        assert!(err.contains("checksum mismatch"), "{err}");
    }

    #[test]
    fn unsupported_filesystems_say_why() {
        let sb_at = SB_OFFSET as usize;
        let cases: [(usize, &[u8], &str); 6] = [
            (0x88, &2u64.to_le_bytes(), "spans 2 devices"),
            (0x60, &(META + 8192).to_le_bytes(), "log tree"),
            (0xC4, &3u16.to_le_bytes(), "blake2b"),
            (0xBC, &(0x141u64 | 1 << 12).to_le_bytes(), "zoned"),
            (0xBC, &(0x141u64 | 1 << 40).to_le_bytes(), "0x10000000000"),
            (0x78, &12345u64.to_le_bytes(), "superblock counts 12345"),
        ];
        for (at, bytes, want) in cases {
            let mut img = image(false);
            put(&mut img, sb_at + at, bytes);
            set_sb_csum(&mut img);
            let err = map_of(img).unwrap_err();
            assert!(err.contains(want), "{want}: {err}");
        }
        // A RAID1 data chunk in the chunk tree.
        let mut img = image(false);
        let leaf = &img[SYS as usize..SYS as usize + NS];
        let n = le_u32(leaf, 0x60) as usize;
        let last = HEADER_LEN + (n - 1) * ITEM_LEN;
        let data = HEADER_LEN + le_u32(leaf, last + KEY_LEN) as usize;
        put(
            &mut img,
            SYS as usize + data + 24,
            &(1u64 | 1 << 4).to_le_bytes(),
        );
        recrc_all(&mut img);
        let err = map_of(img).unwrap_err();
        assert!(err.contains("RAID1 profile"), "{err}");
        // A corrupt superblock.
        let mut img = image(false);
        img[sb_at + 0x100] ^= 1;
        let err = map_of(img).unwrap_err();
        assert!(err.contains("superblock: checksum mismatch"), "{err}");
    }

    /// The unsplit image with the extent tree leaf's item `from` given key `to` (and its
    /// data patched by `data`), checksum recomputed.
    fn with_extent_item(from: Key, to: Key, data: &dyn Fn(&mut [u8])) -> Vec<u8> {
        let mut img = image(false);
        let at = (META_PHYS[0] + NS as u64) as usize;
        let mut b = img[at..at + NS].to_vec();
        let n = le_u32(&b, 0x60) as usize;
        let i = (0..n)
            .find(|&i| Key::at(&b, HEADER_LEN + i * ITEM_LEN) == from)
            .unwrap();
        let o = HEADER_LEN + i * ITEM_LEN;
        put(&mut b, o, &key_bytes(to));
        let off = HEADER_LEN + le_u32(&b, o + KEY_LEN) as usize;
        let size = le_u32(&b, o + KEY_LEN + 4) as usize;
        data(&mut b[off..off + size]);
        let c = crc32c(&b[CSUM_LEN..]);
        put(&mut b, 0, &c.to_le_bytes());
        write_meta(&mut img, META + NS as u64, &b);
        img
    }

    #[test]
    fn the_extent_tree_must_agree_with_itself_and_the_trees_read() {
        let ext = |l: u64, n: u64| key(l, KEY_EXTENT_ITEM, n);
        let meta = |l: u64| key(l, KEY_METADATA_ITEM, 0);
        let bg = |l: u64, n: u64| key(l, KEY_BLOCK_GROUP_ITEM, n);
        let none = |_: &mut [u8]| {};
        let cases: Vec<(Vec<u8>, &str)> = vec![
            // The second data extent moved onto the first.
            (
                with_extent_item(ext(DATA + 65536, 4096), ext(DATA + 4096, 4096), &none),
                "overlap",
            ),
            // Not sector-aligned.
            (
                with_extent_item(
                    ext(DATA + 65536, 4096),
                    ext(DATA + 65536 + 512, 4096),
                    &none,
                ),
                "not sector-aligned",
            ),
            // The extent tree root's own item moved elsewhere.
            (
                with_extent_item(meta(META + 4096), meta(META + 20480), &none),
                "tree block 16781312 is not allocated",
            ),
            // A block group counter that disagrees.
            (
                with_extent_item(bg(DATA, 2 * MIB), bg(DATA, 2 * MIB), &|d| d[0] ^= 0x10),
                "counts 12304 bytes used, the extent tree lists 12288",
            ),
            // A block group of the wrong type.
            (
                with_extent_item(bg(DATA, 2 * MIB), bg(DATA, 2 * MIB), &|d| d[16] = 4),
                "type differs",
            ),
            // A block group that is not its chunk's range.
            (
                with_extent_item(bg(DATA, 2 * MIB), bg(DATA, MIB), &none),
                "range differs",
            ),
        ];
        for (img, want) in cases {
            let err = map_of(img).unwrap_err();
            assert!(err.contains(want), "{want}: {err}");
        }
        // A tree block newer than the superblock.
        let mut img = image(false);
        put(&mut img, SB_OFFSET as usize + 0x48, &6u64.to_le_bytes());
        set_sb_csum(&mut img);
        let err = map_of(img).unwrap_err();
        assert!(err.contains("newer than the superblock's"), "{err}");
    }

    #[test]
    fn loops_and_disorder_are_rejected() {
        let ext_root = META + 4096;
        let node_at = |img: &mut Vec<u8>, ptrs: &[(Key, u64)]| {
            write_meta(img, ext_root, &node(ext_root, 1, ptrs));
        };
        let good = image(true);
        let first =
            |img: &[u8], l: u64| Key::at(img, (META_PHYS[0] + l - META) as usize + HEADER_LEN);
        let (l1, l2) = (META + 8192, META + 12288);
        let (k1, k2) = (first(&good, l1), first(&good, l2));
        // The same leaf twice.
        let mut img = good.clone();
        node_at(&mut img, &[(k1, l1), (k2, l1)]);
        assert!(map_of(img).unwrap_err().contains("first key"));
        let mut img = good.clone();
        node_at(&mut img, &[(k1, l1), (key(k2.objectid, 0, 0), l1)]);
        assert!(map_of(img).unwrap_err().contains("first key"));
        // A node pointing at itself.
        let mut img = good.clone();
        node_at(&mut img, &[(k1, l1), (k2, ext_root)]);
        assert!(map_of(img).unwrap_err().contains("level 1, expected 0"));
        // Keys out of order in the node.
        let mut img = good.clone();
        node_at(&mut img, &[(k2, l2), (k1, l1)]);
        assert!(map_of(img).unwrap_err().contains("out of order"));
        // A stale child (generation differs).
        let mut img = good;
        let mut b = node(ext_root, 1, &[(k1, l1), (k2, l2)]);
        put(
            &mut b,
            HEADER_LEN + KEY_PTR_LEN + KEY_LEN + 8,
            &6u64.to_le_bytes(),
        );
        let c = crc32c(&b[CSUM_LEN..]);
        put(&mut b, 0, &c.to_le_bytes());
        write_meta(&mut img, ext_root, &b);
        assert!(
            map_of(img)
                .unwrap_err()
                .contains("generation 7, expected 6")
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]
        /// Mutated valid images never panic, hang or allocate wildly; with their checksums
        /// recomputed, the mutations reach every parser.
        #[test]
        fn mutated_images_never_panic(
            split in any::<bool>(),
            // (block: superblock, chunk leaf, or one of the four metadata blocks; byte; value)
            patch in proptest::collection::vec((0usize..6, 0usize..4096, any::<u8>()), 1..12),
            recrc in any::<bool>(),
        ) {
            let mut img = image(split);
            for (block, at, v) in patch {
                let base = match block {
                    0 => SB_OFFSET,
                    1 => SYS,
                    b => META_PHYS[0] + (b as u64 - 2) * 4096,
                } as usize;
                img[base + at] = v;
            }
            if recrc {
                recrc_all(&mut img);
            }
            let vol = Mem(img);
            if let Ok(Some(sb)) = Superblock::read(&vol) {
                let _ = sb.info();
                if let Ok(map) = allocation_map(&vol, &sb, 65536) {
                    prop_assert!(map.used_blocks() <= map.block_count());
                }
            }
        }

        /// Random bytes behind a btrfs magic never panic.
        #[test]
        fn random_superblocks_never_panic(
            sb in proptest::collection::vec(any::<u8>(), SB_LEN),
            recrc in any::<bool>(),
        ) {
            let mut img = vec![0u8; 2 * MIB as usize];
            put(&mut img, SB_OFFSET as usize, &sb);
            put(&mut img, SB_OFFSET as usize + 0x40, MAGIC);
            put(&mut img, SB_OFFSET as usize + 0x30, &SB_OFFSET.to_le_bytes());
            put(&mut img, SB_OFFSET as usize + 0x90, &4096u32.to_le_bytes());
            put(&mut img, SB_OFFSET as usize + 0xC4, &0u16.to_le_bytes());
            if recrc {
                set_sb_csum(&mut img);
            }
            let vol = Mem(img);
            if let Ok(Some(sb)) = Superblock::read(&vol) {
                let _ = allocation_map(&vol, &sb, 4096);
            }
        }
    }
}
