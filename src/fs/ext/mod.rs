//! ext2/3/4: superblock, group descriptors and block bitmaps.
//!
//! Layout facts used here (all little-endian), from the ext4 on-disk format:
//! - The superblock is 1024 bytes at byte 1024. Magic 0xEF53 at 0x38.
//! - Block size = 1024 << s_log_block_size (0x18). Blocks count: lo 0x04, hi 0x150 (64BIT).
//!   s_first_data_block 0x14, s_blocks_per_group 0x20, s_free_blocks_count lo 0x0C / hi 0x158,
//!   s_feature_compat 0x5C, s_feature_incompat 0x60, s_feature_ro_compat 0x64, s_uuid 0x68,
//!   s_volume_name 0x78, s_reserved_gdt_blocks 0xCE, s_desc_size 0xFE, s_first_meta_bg 0x104,
//!   s_backup_bgs 0x24C (SPARSE_SUPER2).
//! - Group descriptors follow the superblock's block (block first_data_block + 1); each is 32
//!   bytes, or s_desc_size with 64BIT. Fields: block bitmap lo 0x00 / hi 0x20, inode bitmap
//!   lo 0x04 / hi 0x24, inode table lo 0x08 / hi 0x28, flags 0x12 (BLOCK_UNINIT = 2).
//!   With META_BG, groups from s_first_meta_bg × (descriptors per block) on have their
//!   descriptor block at the start of their meta group.
//! - A group with BLOCK_UNINIT has no bitmap on disk; its used blocks are its superblock backup
//!   and descriptor blocks and any bitmap or inode table placed in it (flex_bg).
//!
//! Further fields for validation: s_journal_inum 0xE0, s_checksum_type 0x175,
//! s_checksum_seed 0x270, s_checksum 0x3FC; descriptor bg_free_blocks_count lo 0x0C / hi 0x2C,
//! bg_block_bitmap_csum lo 0x18 / hi 0x38, bg_checksum 0x1E (checksums: [`csum`]).
//!
//! Nothing read is trusted before it is checked ([`for_each_used`], docs/ALLOCATION.md "ext:
//! validation before trusting"): checksums, locations and overlaps of every structure, free
//! counts against bitmaps, the filesystem's own blocks and journal marked used, and every
//! block of every inode in use marked used (the bitmaps checked against the inodes). A failed
//! check makes the map unusable (the caller then reads every block, saying why).
//!
//! [`changes`] finds the blocks that cannot have changed since an earlier state of the same
//! filesystem, from its inodes and extent trees ([`inode`]).

pub mod changes;
mod csum;
mod inode;

use super::{BlockMap, FsInfo};
use crate::bytes::{le_u16 as u16_at, le_u32 as u32_at};
use crate::error::Result;
use crate::fs::check::{Checked, MapCheck, bad, within};
use crate::volume::Volume;

const SB_OFFSET: u64 = 1024;
const SB_LEN: usize = 1024;
const MAGIC: u16 = 0xEF53;

const COMPAT_HAS_JOURNAL: u32 = 0x4;
const COMPAT_SPARSE_SUPER2: u32 = 0x200;
const INCOMPAT_RECOVER: u32 = 0x4;
const INCOMPAT_EXTENTS: u32 = 0x40;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_META_BG: u32 = 0x10;
const INCOMPAT_CSUM_SEED: u32 = 0x2000;
const INCOMPAT_INLINE_DATA: u32 = 0x8000;
const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;
const RO_COMPAT_GDT_CSUM: u32 = 0x10;
const RO_COMPAT_BIGALLOC: u32 = 0x200;
const RO_COMPAT_METADATA_CSUM: u32 = 0x400;
const BG_INODE_UNINIT: u16 = 0x1;
const BG_BLOCK_UNINIT: u16 = 0x2;

/// The fields of an ext superblock that the map needs.
#[derive(Debug, Clone)]
pub struct Superblock {
    block_size: u64,
    blocks_count: u64,
    free_blocks: u64,
    first_data_block: u64,
    blocks_per_group: u64,
    compat: u32,
    incompat: u32,
    ro_compat: u32,
    desc_size: u64,
    reserved_gdt: u64,
    first_meta_bg: u64,
    backup_bgs: [u64; 2],
    uuid: [u8; 16],
    label: String,
    inodes_per_group: u64,
    /// Bytes per inode slot in the inode tables (128 with revision 0).
    inode_size: u64,
    /// First inode number not reserved for the filesystem's own use.
    first_ino: u64,
    /// Last time the superblock was written (Unix seconds).
    wtime: i64,
    /// Inodes the superblock names (journal, quota files, orphan file…): their blocks change
    /// without their timestamps changing.
    special_inodes: Vec<u64>,
    /// s_journal_inum (0: no journal inside the filesystem).
    journal_inum: u64,
    /// How descriptors and bitmaps are checksummed.
    scheme: csum::Scheme,
    /// Why the superblock itself cannot be trusted (metadata_csum mismatch, unknown checksum
    /// type), found while reading it.
    damage: Option<String>,
}

impl Superblock {
    /// Reads and sanity-checks the superblock; `None` when the volume is not ext2/3/4 (or its
    /// superblock is implausible).
    pub fn read(vol: &dyn Volume) -> Result<Option<Superblock>> {
        if vol.size() < SB_OFFSET + SB_LEN as u64 {
            return Ok(None);
        }
        let mut b = vec![0u8; SB_LEN];
        vol.read_at(SB_OFFSET, &mut b)?;
        if u16_at(&b, 0x38) != MAGIC {
            return Ok(None);
        }
        let log = u32_at(&b, 0x18);
        if log > 6 {
            return Ok(None);
        }
        let block_size = 1024u64 << log;
        let incompat = u32_at(&b, 0x60);
        let is64 = incompat & INCOMPAT_64BIT != 0;
        let mut blocks_count = u32_at(&b, 0x04) as u64;
        let mut free_blocks = u32_at(&b, 0x0C) as u64;
        if is64 {
            blocks_count |= (u32_at(&b, 0x150) as u64) << 32;
            free_blocks |= (u32_at(&b, 0x158) as u64) << 32;
        }
        let desc_size = if is64 { u16_at(&b, 0xFE) as u64 } else { 32 };
        let blocks_per_group = u32_at(&b, 0x20) as u64;
        let first_data_block = u32_at(&b, 0x14) as u64;
        if blocks_count == 0
            || blocks_per_group == 0
            || blocks_per_group > block_size * 8
            || first_data_block >= blocks_count
            || !(32..=1024).contains(&desc_size)
            || !desc_size.is_power_of_two()
        {
            return Ok(None);
        }
        let rev = u32_at(&b, 0x4C);
        let (inode_size, first_ino) = if rev == 0 {
            (128, 11)
        } else {
            (u16_at(&b, 0x58) as u64, u32_at(&b, 0x54) as u64)
        };
        // s_journal_inum, s_snapshot_inum, s_usr/grp_quota_inum, s_prj_quota_inum,
        // s_orphan_file_inum.
        let special_inodes = [0xE0, 0x180, 0x240, 0x244, 0x26C, 0x280]
            .iter()
            .map(|&o| u32_at(&b, o) as u64)
            .filter(|&i| i != 0)
            .collect();
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[0x68..0x78]);
        let name = &b[0x78..0x88];
        let end = name.iter().position(|&c| c == 0).unwrap_or(name.len());
        let ro_compat = u32_at(&b, 0x64);
        let mut damage = None;
        let scheme = if ro_compat & RO_COMPAT_METADATA_CSUM != 0 {
            if b[0x175] != 1 {
                damage = Some(format!("unknown metadata checksum type {}", b[0x175]));
            } else if !csum::superblock_ok(&b) {
                damage = Some("superblock checksum mismatch".into());
            }
            let explicit = (incompat & INCOMPAT_CSUM_SEED != 0).then(|| u32_at(&b, 0x270));
            csum::Scheme::Crc32c(csum::Scheme::seed(&uuid, explicit))
        } else if ro_compat & RO_COMPAT_GDT_CSUM != 0 {
            csum::Scheme::Crc16(uuid)
        } else {
            csum::Scheme::None
        };
        Ok(Some(Superblock {
            block_size,
            blocks_count,
            free_blocks: free_blocks.min(blocks_count),
            first_data_block,
            blocks_per_group,
            compat: u32_at(&b, 0x5C),
            incompat,
            ro_compat,
            desc_size,
            reserved_gdt: u16_at(&b, 0xCE) as u64,
            first_meta_bg: u32_at(&b, 0x104) as u64,
            backup_bgs: [u32_at(&b, 0x24C) as u64, u32_at(&b, 0x250) as u64],
            uuid,
            label: String::from_utf8_lossy(&name[..end]).into_owned(),
            inodes_per_group: u32_at(&b, 0x28) as u64,
            inode_size,
            first_ino,
            wtime: u32_at(&b, 0x30) as i64 | (b[0x274] as i64) << 32,
            special_inodes,
            journal_inum: u32_at(&b, 0xE0) as u64,
            scheme,
            damage,
        }))
    }

    /// "ext4" when extents or 64-bit are on, "ext3" with a journal, "ext2" otherwise.
    pub fn fs_type(&self) -> &'static str {
        if self.incompat & (INCOMPAT_EXTENTS | INCOMPAT_64BIT) != 0 {
            "ext4"
        } else if self.compat & COMPAT_HAS_JOURNAL != 0 {
            "ext3"
        } else {
            "ext2"
        }
    }

    pub fn info(&self) -> FsInfo {
        let u = &self.uuid;
        let uuid = format!(
            "{}-{}-{}-{}-{}",
            hex::encode(&u[0..4]),
            hex::encode(&u[4..6]),
            hex::encode(&u[6..8]),
            hex::encode(&u[8..10]),
            hex::encode(&u[10..16])
        );
        FsInfo {
            fs_type: self.fs_type().into(),
            version: None,
            uuid,
            label: self.label.clone(),
            block_size: self.block_size as u32,
            size: self.blocks_count * self.block_size,
            used_bytes: (self.blocks_count - self.free_blocks) * self.block_size,
        }
    }

    fn group_count(&self) -> u64 {
        (self.blocks_count - self.first_data_block).div_ceil(self.blocks_per_group)
    }

    fn group_first_block(&self, g: u64) -> u64 {
        self.first_data_block + g * self.blocks_per_group
    }

    fn descs_per_block(&self) -> u64 {
        self.block_size / self.desc_size
    }

    /// Whether group `g` holds a superblock backup.
    fn has_super(&self, g: u64) -> bool {
        if g == 0 {
            return true;
        }
        if self.compat & COMPAT_SPARSE_SUPER2 != 0 {
            return g == self.backup_bgs[0] || g == self.backup_bgs[1];
        }
        if self.ro_compat & RO_COMPAT_SPARSE_SUPER == 0 {
            return true;
        }
        if g == 1 {
            return true;
        }
        [3u64, 5, 7].iter().any(|&p| {
            let mut x = p;
            while x < g {
                x = x.saturating_mul(p);
            }
            x == g
        })
    }

    fn meta_bg(&self) -> bool {
        self.incompat & INCOMPAT_META_BG != 0
    }

    /// Block holding the descriptor of group `g`.
    fn desc_block(&self, g: u64) -> u64 {
        let dpb = self.descs_per_block();
        let index = g / dpb;
        if self.meta_bg() && index >= self.first_meta_bg {
            let first = index * dpb;
            self.group_first_block(first) + u64::from(self.has_super(first))
        } else {
            self.first_data_block + 1 + index
        }
    }

    /// Blocks at the start of group `g` taken by the superblock backup and descriptors
    /// (an over-estimate is harmless: it only makes the backup read a little more).
    fn super_area_blocks(&self, g: u64) -> u64 {
        if !self.has_super(g) {
            // A META_BG descriptor block may still live here.
            return u64::from(self.meta_bg());
        }
        let dpb = self.descs_per_block();
        let gdt = if self.meta_bg() {
            self.first_meta_bg.min(self.group_count().div_ceil(dpb)) + 1
        } else {
            self.group_count().div_ceil(dpb)
        };
        1 + gdt + self.reserved_gdt
    }
}

struct Desc {
    block_bitmap: u64,
    inode_bitmap: u64,
    inode_table: u64,
    flags: u16,
    /// Inode slots at the end of the group's table never used (kept with group checksums).
    itable_unused: u64,
    /// bg_free_blocks_count (lo 0x0C, hi 0x2C).
    free_blocks: u64,
    /// False when the descriptor's group checksum (gdt_csum or metadata_csum) is wrong.
    checksum_ok: bool,
    /// The block bitmap checksum recorded (metadata_csum).
    bitmap_csum: (u16, Option<u16>),
    /// The inode bitmap checksum recorded (metadata_csum).
    inode_bitmap_csum: (u16, Option<u16>),
}

/// Reads group descriptors, one descriptor block cached at a time.
struct DescReader<'a> {
    vol: &'a dyn Volume,
    sb: &'a Superblock,
    cached: Option<(u64, Vec<u8>)>,
}

impl DescReader<'_> {
    fn get(&mut self, g: u64) -> Checked<Desc> {
        let sb = self.sb;
        let blk = sb.desc_block(g);
        if blk >= sb.blocks_count {
            return Err(bad!("descriptor block {blk} of group {g} is past the end"));
        }
        if self.cached.as_ref().is_none_or(|(b, _)| *b != blk) {
            let mut buf = vec![0u8; sb.block_size as usize];
            self.vol
                .read_at(blk * sb.block_size, &mut buf)
                .map_err(|e| within(e, format!("reading descriptor block {blk}")))?;
            self.cached = Some((blk, buf));
        }
        let Some((_, buf)) = self.cached.as_ref() else {
            return Err(bad!("descriptor cache empty"));
        };
        let off = ((g % sb.descs_per_block()) * sb.desc_size) as usize;
        let d = &buf[off..off + sb.desc_size as usize];
        let hi = |o: usize| -> u64 {
            if sb.desc_size >= 64 {
                (u32_at(d, o) as u64) << 32
            } else {
                0
            }
        };
        let hi16 = |o: usize| -> u64 {
            if sb.desc_size >= 64 {
                (u16_at(d, o) as u64) << 16
            } else {
                0
            }
        };
        let checksum_ok = sb
            .scheme
            .descriptor(g, d)
            .is_none_or(|c| c == u16_at(d, csum::BG_CHECKSUM));
        Ok(Desc {
            free_blocks: u16_at(d, 0x0C) as u64 | hi16(0x2C),
            checksum_ok,
            bitmap_csum: csum::Scheme::recorded_bitmap_csum(d),
            inode_bitmap_csum: csum::Scheme::recorded_inode_bitmap_csum(d),
            block_bitmap: u32_at(d, 0x00) as u64 | hi(0x20),
            inode_bitmap: u32_at(d, 0x04) as u64 | hi(0x24),
            inode_table: u32_at(d, 0x08) as u64 | hi(0x28),
            flags: u16_at(d, 0x12),
            itable_unused: u16_at(d, 0x1C) as u64 | hi16(0x32),
        })
    }
}

/// What a run of used blocks holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Used {
    /// The filesystem's own structures: boot block and superblock, descriptors, bitmaps,
    /// inode tables.
    Metadata,
    /// Blocks the block bitmaps mark used (file data, directories, extent trees, journal…).
    Allocated,
}

/// One bit per filesystem block.
pub(crate) struct Bits(Vec<u64>);

impl Bits {
    pub(crate) fn new(n: u64) -> Bits {
        Bits(vec![0; n.div_ceil(64) as usize])
    }

    pub(crate) fn set_run(&mut self, start: u64, len: u64) {
        let (mut b, end) = (start, start + len);
        while b < end {
            let w = (b / 64) as usize;
            if b.is_multiple_of(64) && end - b >= 64 {
                self.0[w] = !0;
                b += 64;
            } else {
                self.0[w] |= 1 << (b % 64);
                b += 1;
            }
        }
    }

    fn clear_run(&mut self, start: u64, len: u64) {
        for b in start..start + len {
            self.0[(b / 64) as usize] &= !(1 << (b % 64));
        }
    }

    pub(crate) fn get(&self, b: u64) -> bool {
        self.0[(b / 64) as usize] & (1 << (b % 64)) != 0
    }

    /// The first clear bit in `start..start + len`.
    fn first_clear(&self, start: u64, len: u64) -> Option<u64> {
        let (mut b, end) = (start, start + len);
        while b < end {
            if b.is_multiple_of(64) && end - b >= 64 && self.0[(b / 64) as usize] == !0 {
                b += 64;
            } else if !self.get(b) {
                return Some(b);
            } else {
                b += 1;
            }
        }
        None
    }
}

/// Builds the allocation map of an ext2/3/4 filesystem at `granularity` bytes per bit.
/// `Err` explains why the filesystem's data cannot be trusted.
pub fn allocation_map(vol: &dyn Volume, sb: &Superblock, granularity: u64) -> Checked<BlockMap> {
    let bs = sb.block_size;
    let fs_bytes = check_fits(vol, sb)?;
    let mut map = BlockMap::new(vol.size(), granularity);
    // Bytes past the filesystem's end are not the filesystem's to describe: keep them.
    map.mark_bytes(fs_bytes, vol.size() - fs_bytes);
    for_each_used(vol, sb, |_, first, count| {
        map.mark_bytes(first * bs, count * bs)
    })?;
    Ok(map)
}

/// The filesystem's size in bytes, checked against the volume's.
fn check_fits(vol: &dyn Volume, sb: &Superblock) -> Checked<u64> {
    if sb.incompat & INCOMPAT_RECOVER != 0 {
        // Committed transactions still in the journal may allocate blocks that the on-disk
        // bitmaps show as free (their data is already in place with data=ordered); replay
        // after restore would point at zeros. A frozen filesystem (fsfreeze, LVM snapshot)
        // has its journal flushed and this flag clear.
        return Err(bad!(
            "the journal needs recovery (the filesystem is mounted or was not cleanly \
                    unmounted); freeze it or run e2fsck first to get a map"
        ));
    }
    let fs_bytes = sb
        .blocks_count
        .checked_mul(sb.block_size)
        .ok_or_else(|| bad!("block count overflows"))?;
    if fs_bytes > vol.size() {
        return Err(bad!(
            "the filesystem spans {fs_bytes} bytes but the volume has only {}",
            vol.size()
        ));
    }
    if sb.inode_size < 128 || sb.inode_size > sb.block_size || !sb.inode_size.is_power_of_two() {
        return Err(bad!("inode size {} is implausible", sb.inode_size));
    }
    Ok(fs_bytes)
}

impl Superblock {
    /// Blocks of one group's inode table.
    fn itable_blocks(&self) -> u64 {
        (self.inodes_per_group * self.inode_size).div_ceil(self.block_size)
    }

    /// Whether descriptors carry checksums (and with them a trustworthy `itable_unused`).
    fn group_checksums(&self) -> bool {
        self.ro_compat & (RO_COMPAT_GDT_CSUM | RO_COMPAT_METADATA_CSUM) != 0
    }
}

/// Which of the filesystem's own structures a run of blocks holds (for messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Meta {
    Superblock,
    Descriptors,
    BlockBitmap,
    InodeBitmap,
    InodeTable,
    Journal,
}

impl Meta {
    fn name(self) -> &'static str {
        match self {
            Meta::Superblock => "superblock",
            Meta::Descriptors => "descriptor or reserved GDT blocks",
            Meta::BlockBitmap => "block bitmap",
            Meta::InodeBitmap => "inode bitmap",
            Meta::InodeTable => "inode table",
            Meta::Journal => "journal",
        }
    }
}

/// A run of blocks that the filesystem's own structures occupy, with its owner group.
#[derive(Debug, Clone, Copy)]
struct MetaRun {
    start: u64,
    len: u64,
    what: Meta,
    group: u64,
}

impl MetaRun {
    fn end(&self) -> u64 {
        self.start + self.len
    }

    fn describe(&self) -> String {
        match self.what {
            Meta::Journal => format!("the journal (block {})", self.start),
            w => format!(
                "the {} of group {} (block {})",
                w.name(),
                self.group,
                self.start
            ),
        }
    }
}

/// The most indirect or extent tree blocks read to find the journal's blocks.
const MAX_JOURNAL_TREE: u64 = 1 << 16;

impl Superblock {
    /// The superblock backup, descriptor blocks and reserved GDT blocks inside group `g`,
    /// exactly where e2fsprogs (`ext2fs_super_and_bgd_loc2`) puts them: a superblock copy
    /// opens each group that has one; without META_BG (or before s_first_meta_bg) the whole
    /// descriptor table and the reserved GDT blocks follow it; with META_BG a meta group's
    /// descriptor block sits in its first, second and last group, after a superblock copy.
    fn group_layout(&self, g: u64, out: &mut Vec<MetaRun>) {
        let first = self.group_first_block(g);
        let has_super = self.has_super(g);
        let mut push = |start: u64, len: u64, what: Meta| {
            let len = len.min(self.blocks_count.saturating_sub(start));
            if len > 0 {
                out.push(MetaRun {
                    start,
                    len,
                    what,
                    group: g,
                });
            }
        };
        if has_super {
            push(first, 1, Meta::Superblock);
        }
        let dpb = self.descs_per_block();
        if !self.meta_bg() || g / dpb < self.first_meta_bg {
            if has_super {
                let old = if self.meta_bg() {
                    self.first_meta_bg
                } else {
                    self.group_count().div_ceil(dpb) + self.reserved_gdt
                };
                push(first + 1, old, Meta::Descriptors);
            }
        } else if [0, 1, dpb - 1].contains(&(g % dpb)) {
            push(first + u64::from(has_super), 1, Meta::Descriptors);
        }
    }

    /// Why the filesystem's map cannot be trusted before any descriptor is read.
    fn precheck(&self) -> Checked<()> {
        if let Some(why) = &self.damage {
            return Err(MapCheck::Inconsistent(why.clone()));
        }
        if self.ro_compat & RO_COMPAT_BIGALLOC != 0 {
            // Bitmaps count clusters, not blocks.
            return Err(bad!("bigalloc is not supported"));
        }
        if self.inodes_per_group == 0 {
            return Err(bad!("zero inodes per group"));
        }
        if !self.blocks_per_group.is_multiple_of(8) {
            return Err(bad!(
                "{} blocks per group is not a whole number of bitmap bytes",
                self.blocks_per_group
            ));
        }
        Ok(())
    }
}

/// The blocks of the journal inode (data and extent tree or indirect blocks), merged into
/// runs; empty without an internal journal.
fn journal_runs(
    vol: &dyn Volume,
    sb: &Superblock,
    descs: &mut DescReader<'_>,
) -> Checked<Vec<(u64, u64)>> {
    let ino = sb.journal_inum;
    if sb.compat & COMPAT_HAS_JOURNAL == 0 || ino == 0 {
        return Ok(Vec::new());
    }
    let group = (ino - 1) / sb.inodes_per_group;
    if group >= sb.group_count() {
        return Err(bad!("journal inode {ino} does not exist"));
    }
    let d = descs.get(group)?;
    let index = (ino - 1) % sb.inodes_per_group;
    let mut slot = vec![0u8; sb.inode_size as usize];
    let at = d
        .inode_table
        .checked_mul(sb.block_size)
        .and_then(|b| b.checked_add(index * sb.inode_size))
        .filter(|&a| a + sb.inode_size <= sb.blocks_count * sb.block_size)
        .ok_or_else(|| bad!("journal inode {ino} lies outside the filesystem"))?;
    vol.read_at(at, &mut slot)
        .map_err(|e| within(e, format!("reading journal inode {ino}")))?;
    let inode = inode::Inode(&slot);
    if inode.mode() & inode::S_IFMT != inode::S_IFREG || !inode.in_use() {
        return Err(bad!("journal inode {ino} holds no journal"));
    }
    let mut blocks: Vec<(u64, u64)> = Vec::new();
    if inode.flags() & inode::FL_EXTENTS != 0 {
        inode::walk_extents(vol, sb, inode.root(), MAX_JOURNAL_TREE, &mut |n| match n {
            inode::Node::Block(b) => blocks.push((b, 1)),
            inode::Node::Extent(e) => blocks.push((e.start, e.len)),
        })
    } else {
        inode::walk_block_map(vol, sb, inode.root(), MAX_JOURNAL_TREE, &mut |b| {
            blocks.push((b, 1))
        })
    }
    .map_err(|e| within(e, format!("journal inode {ino}")))?;
    if blocks.is_empty() {
        return Err(bad!("journal inode {ino} has no blocks"));
    }
    blocks.sort_unstable();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (start, len) in blocks {
        match runs.last_mut() {
            Some((s, l)) if *s + *l == start => *l += len,
            Some((s, l)) if *s + *l > start => {
                return Err(bad!(
                    "journal inode {ino} names block {start} twice (also at {s}+{l})"
                ));
            }
            _ => runs.push((start, len)),
        }
    }
    Ok(runs)
}

/// Checks that no two of the filesystem's own structures share a block; `runs` ends up sorted
/// by start and free of overlaps.
fn check_disjoint(runs: &mut [MetaRun]) -> Checked<()> {
    runs.sort_unstable_by_key(|r| (r.start, r.len));
    let mut reach: Option<&MetaRun> = None;
    for r in runs.iter() {
        if let Some(prev) = reach
            && prev.end() > r.start
        {
            return Err(bad!("{} and {} overlap", prev.describe(), r.describe()));
        }
        reach = Some(r);
    }
    Ok(())
}

/// Set bits among the first `bits` of `bitmap`.
fn count_set(bitmap: &[u8], bits: u64) -> u64 {
    let whole = (bits / 8) as usize;
    let mut n: u64 = bitmap[..whole].iter().map(|b| b.count_ones() as u64).sum();
    if !bits.is_multiple_of(8) {
        n += (bitmap[whole] & ((1u8 << (bits % 8)) - 1)).count_ones() as u64;
    }
    n
}

/// Calls `f(kind, first_block, count)` for every run of blocks the filesystem uses (runs may
/// overlap and come in any order). `Err` explains why the filesystem's data cannot be
/// trusted.
///
/// Nothing is trusted before it is checked (docs/ALLOCATION.md, "ext: validation before
/// trusting"): the superblock and descriptor checksums, every structure's location (inside
/// the filesystem, not overlapping another), each block bitmap's checksum, its free count
/// against the descriptor's, the filesystem's own blocks (superblocks, descriptors,
/// reserved GDT blocks, bitmaps, inode tables, journal) marked used in it, and every block an
/// inode in use names marked used and none of those (the inode tables and extent trees are
/// read for this; `f` may have been called before an `Err`).
pub(crate) fn for_each_used(
    vol: &dyn Volume,
    sb: &Superblock,
    mut f: impl FnMut(Used, u64, u64),
) -> Checked<()> {
    check_fits(vol, sb)?;
    sb.precheck()?;
    let bs = sb.block_size;
    // Everything up to the first group (boot sector, superblock) is always kept.
    f(Used::Metadata, 0, sb.first_data_block + 1);
    let groups = sb.group_count();
    let itable_blocks = sb.itable_blocks();
    let mut descs = DescReader {
        vol,
        sb,
        cached: None,
    };
    let check = |what: &str, blk: u64, len: u64, g: u64| -> Checked<()> {
        if blk < sb.first_data_block || blk.checked_add(len).is_none_or(|e| e > sb.blocks_count) {
            return Err(bad!(
                "group {g}: {what} at block {blk} (+{len}) is outside the filesystem"
            ));
        }
        Ok(())
    };

    // Pass 1: metadata of every group (wherever flex_bg placed it) and the superblock areas.
    let mut meta: Vec<MetaRun> = Vec::new();
    for g in 0..groups {
        let d = descs.get(g)?;
        if !d.checksum_ok {
            return Err(bad!("group {g}: descriptor checksum mismatch"));
        }
        check("block bitmap", d.block_bitmap, 1, g)?;
        check("inode bitmap", d.inode_bitmap, 1, g)?;
        check("inode table", d.inode_table, itable_blocks, g)?;
        for (start, len, what) in [
            (d.block_bitmap, 1, Meta::BlockBitmap),
            (d.inode_bitmap, 1, Meta::InodeBitmap),
            (d.inode_table, itable_blocks, Meta::InodeTable),
        ] {
            meta.push(MetaRun {
                start,
                len,
                what,
                group: g,
            });
        }
        sb.group_layout(g, &mut meta);
        // A generous estimate of the same areas, kept in the map whatever the checks say.
        let first = sb.group_first_block(g);
        let area = sb
            .super_area_blocks(g)
            .min(sb.blocks_count.saturating_sub(first));
        f(Used::Metadata, first, area);
        f(Used::Metadata, sb.desc_block(g), 1);
    }
    // Locations first: a journal inode found through a misplaced inode table is noise.
    check_disjoint(&mut meta)?;
    for (start, len) in journal_runs(vol, sb, &mut descs)? {
        meta.push(MetaRun {
            start,
            len,
            what: Meta::Journal,
            group: 0,
        });
    }
    check_disjoint(&mut meta)?;
    for r in &meta {
        f(Used::Metadata, r.start, r.len);
    }

    // Pass 2: the block bitmaps of initialised groups. Without group checksums BLOCK_UNINIT
    // means nothing (the kernel and e2fsck read the bitmap then too).
    let honour_uninit = sb.group_checksums();
    let mut bitmap = vec![0u8; bs as usize];
    let mut window = Window::new(0, sb.blocks_count);
    for g in 0..groups {
        let d = descs.get(g)?;
        let first = sb.group_first_block(g);
        let in_group = sb.blocks_per_group.min(sb.blocks_count - first);
        let end = first + in_group;
        let from = meta.partition_point(|r| r.end() <= first);
        let own = || meta[from..].iter().take_while(|r| r.start < end);
        if honour_uninit && d.flags & BG_BLOCK_UNINIT != 0 {
            // No bitmap: the group holds nothing but metadata, and its descriptor must say so
            // (a group that holds data but claims otherwise would drop that data).
            let used: u64 = own().map(|r| r.end().min(end) - r.start.max(first)).sum();
            if in_group - used != d.free_blocks {
                return Err(bad!(
                    "group {g}: uninitialised, but its descriptor counts {} free blocks of {}, \
                     not {}",
                    d.free_blocks,
                    in_group,
                    in_group - used
                ));
            }
            continue;
        }
        read_block_bitmap(vol, sb, g, &d, &mut bitmap)?;
        let free = in_group - count_set(&bitmap, in_group);
        if free != d.free_blocks {
            return Err(bad!(
                "group {g}: its descriptor counts {} free blocks, its bitmap {free}",
                d.free_blocks
            ));
        }
        // The filesystem's own blocks in this group must be marked used.
        for r in own() {
            for b in r.start.max(first)..r.end().min(end) {
                let i = b - first;
                if bitmap[(i / 8) as usize] & (1 << (i % 8)) == 0 {
                    return Err(bad!(
                        "group {g}: the block bitmap marks block {b} of {} free",
                        r.describe()
                    ));
                }
            }
        }
        bitmap_runs(&bitmap, in_group, |start, len| {
            f(Used::Allocated, first + start, len);
            window.set(first + start, len);
        });
    }

    // Pass 3: every block an inode uses must be marked used, and not be the filesystem's own
    // (e2fsck pass 1 against pass 5): bitmaps with consistent checksums and counts can still
    // mark a file's blocks free. One window of blocks at a time keeps memory bounded.
    loop {
        for r in &meta {
            window.clear(r.start, r.len);
        }
        check_inodes(vol, sb, &mut descs, &meta, &window)?;
        let next = window.lo + window.len;
        if next >= sb.blocks_count {
            return Ok(());
        }
        window = Window::new(next, sb.blocks_count);
        for g in 0..groups {
            let d = descs.get(g)?;
            let first = sb.group_first_block(g);
            let in_group = sb.blocks_per_group.min(sb.blocks_count - first);
            if (honour_uninit && d.flags & BG_BLOCK_UNINIT != 0)
                || first + in_group <= window.lo
                || first >= window.lo + window.len
            {
                continue;
            }
            read_block_bitmap(vol, sb, g, &d, &mut bitmap)?;
            bitmap_runs(&bitmap, in_group, |start, len| {
                window.set(first + start, len)
            });
        }
    }
}

/// Reads group `g`'s block bitmap into `bitmap` (one block) and checks its checksum.
fn read_block_bitmap(
    vol: &dyn Volume,
    sb: &Superblock,
    g: u64,
    d: &Desc,
    bitmap: &mut [u8],
) -> Checked<()> {
    vol.read_at(d.block_bitmap * sb.block_size, bitmap)
        .map_err(|e| within(e, format!("reading block bitmap of group {g}")))?;
    if !sb
        .scheme
        .bitmap_ok(d.bitmap_csum, &bitmap[..(sb.blocks_per_group / 8) as usize])
    {
        return Err(bad!("group {g}: block bitmap checksum mismatch"));
    }
    Ok(())
}

/// Calls `visit(start, len)` for every run of set bits among the first `bits` of `bitmap`.
fn bitmap_runs(bitmap: &[u8], bits: u64, mut visit: impl FnMut(u64, u64)) {
    let mut i = 0u64;
    while i < bits {
        let byte = bitmap[(i / 8) as usize];
        if byte == 0 && i.is_multiple_of(8) {
            i += 8;
            continue;
        }
        if byte & (1 << (i % 8)) == 0 {
            i += 1;
            continue;
        }
        let start = i;
        while i < bits && bitmap[(i / 8) as usize] & (1 << (i % 8)) != 0 {
            i += 1;
        }
        visit(start, i - start);
    }
}

/// Filesystem blocks checked against the inodes per pass over the inode tables (one bit
/// each: 64 MiB, 2 TiB of 4 KiB blocks).
const WINDOW_BLOCKS: u64 = 1 << 29;

/// Inode table bytes read at a time.
const ITABLE_CHUNK: u64 = 1 << 20;

/// The most extent tree or indirect blocks one inode may have before the map is refused
/// (all inodes together may have no more than the filesystem has blocks).
const MAX_FILE_TREE: u64 = 1 << 24;

/// The resize inode: its blocks are the reserved GDT blocks and their backups.
const RESIZE_INO: u64 = 7;

/// Blocks `lo..lo + len` of the filesystem, one bit each: set when the block bitmaps mark
/// the block used and it holds no structure of the filesystem's own.
struct Window {
    lo: u64,
    len: u64,
    bits: Bits,
}

impl Window {
    fn new(lo: u64, blocks: u64) -> Window {
        let len = (blocks - lo).min(WINDOW_BLOCKS);
        Window {
            lo,
            len,
            bits: Bits::new(len),
        }
    }

    /// `start..start + len` clipped to the window, relative to its start.
    fn clip(&self, start: u64, len: u64) -> Option<(u64, u64)> {
        let s = start.max(self.lo);
        let e = start.saturating_add(len).min(self.lo + self.len);
        (s < e).then(|| (s - self.lo, e - s))
    }

    fn set(&mut self, start: u64, len: u64) {
        if let Some((s, l)) = self.clip(start, len) {
            self.bits.set_run(s, l);
        }
    }

    fn clear(&mut self, start: u64, len: u64) {
        if let Some((s, l)) = self.clip(start, len) {
            self.bits.clear_run(s, l);
        }
    }

    /// The first block of `start..start + len` inside the window that is not usable by a
    /// file.
    fn first_unusable(&self, start: u64, len: u64) -> Option<u64> {
        let (s, l) = self.clip(start, len)?;
        self.bits.first_clear(s, l).map(|b| b + self.lo)
    }
}

/// Checks every block that an inode in use names (extent tree or indirect blocks, data,
/// extended-attribute block) against `window`: `Err` names the first inode using a block
/// the bitmaps mark free or that holds the filesystem's own structures (`meta`, sorted).
fn check_inodes(
    vol: &dyn Volume,
    sb: &Superblock,
    descs: &mut DescReader<'_>,
    meta: &[MetaRun],
    window: &Window,
) -> Checked<()> {
    let (bs, ipg, isz) = (sb.block_size, sb.inodes_per_group, sb.inode_size);
    let ibm_bytes = ipg.div_ceil(8);
    if ibm_bytes > bs {
        return Err(bad!("{ipg} inodes per group do not fit one bitmap block"));
    }
    let per_chunk = (ITABLE_CHUNK / isz).max(1);
    let mut table = vec![0u8; (per_chunk * isz) as usize];
    let mut ibm = vec![0u8; bs as usize];
    let inline = sb.incompat & INCOMPAT_INLINE_DATA != 0;
    let is64 = sb.incompat & INCOMPAT_64BIT != 0;
    let journal = (sb.compat & COMPAT_HAS_JOURNAL != 0).then_some(sb.journal_inum);
    // Tree and indirect blocks (and block-mapped data blocks) of all inodes together: a
    // healthy filesystem has no more of them than blocks, so hostile trees that name the
    // same blocks over and over cannot make the walk long.
    let mut budget = sb.blocks_count;
    let damage = |descs: &mut DescReader<'_>, ino: u64, b: u64| -> MapCheck {
        let i = meta.partition_point(|r| r.end() <= b);
        if let Some(r) = meta.get(i).filter(|r| r.start <= b) {
            return bad!("inode {ino} uses block {b}, which holds {}", r.describe());
        }
        let g = b.saturating_sub(sb.first_data_block) / sb.blocks_per_group;
        let uninit = descs
            .get(g)
            .is_ok_and(|d| sb.group_checksums() && d.flags & BG_BLOCK_UNINIT != 0);
        bad!(
            "block bitmap marks block {b} free{} but inode {ino} uses it",
            if uninit {
                format!(" (group {g} is uninitialised)")
            } else {
                String::new()
            }
        )
    };
    for g in 0..sb.group_count() {
        let d = descs.get(g)?;
        let slots = if !sb.group_checksums() {
            ipg
        } else if d.flags & BG_INODE_UNINIT != 0 {
            0
        } else {
            ipg.saturating_sub(d.itable_unused)
        };
        if slots == 0 {
            continue;
        }
        vol.read_at(d.inode_bitmap * bs, &mut ibm)
            .map_err(|e| within(e, format!("reading inode bitmap of group {g}")))?;
        if !sb
            .scheme
            .bitmap_ok(d.inode_bitmap_csum, &ibm[..(ipg / 8) as usize])
        {
            return Err(bad!("group {g}: inode bitmap checksum mismatch"));
        }
        let mut done = 0u64;
        while done < slots {
            let count = per_chunk.min(slots - done);
            let bytes = (count * isz) as usize;
            vol.read_at(d.inode_table * bs + done * isz, &mut table[..bytes])
                .map_err(|e| within(e, format!("reading inode table of group {g}")))?;
            for (k, slot) in table[..bytes].chunks_exact(isz as usize).enumerate() {
                let idx = done + k as u64;
                let ino = g * ipg + idx + 1;
                let node = inode::Inode(slot);
                let marked = ibm[(idx / 8) as usize] & (1 << (idx % 8)) != 0;
                // In use as e2fsck sees it: a mode and a link; an inode with both whose
                // bitmap bit is clear still counts unless it was deleted (dtime set).
                if node.mode() == 0 || node.links() == 0 || (!marked && node.dtime() != 0) {
                    continue;
                }
                if ino == RESIZE_INO || Some(ino) == journal {
                    // Their blocks are checked as the filesystem's own above.
                    continue;
                }
                let acl = node.file_acl(is64);
                if acl != 0 {
                    if acl < sb.first_data_block || acl >= sb.blocks_count {
                        return Err(bad!(
                            "inode {ino}: extended-attribute block {acl} is outside the \
                             filesystem"
                        ));
                    }
                    if let Some(b) = window.first_unusable(acl, 1) {
                        return Err(damage(descs, ino, b));
                    }
                }
                let flags = node.flags();
                let has_blocks = match node.mode() & inode::S_IFMT {
                    inode::S_IFREG | inode::S_IFDIR => true,
                    // A fast symlink keeps its target in i_block.
                    inode::S_IFLNK => flags & inode::FL_EXTENTS != 0 || node.size() >= 60,
                    // Devices keep their numbers in i_block; fifos and sockets have nothing.
                    _ => false,
                };
                if !has_blocks || (inline && flags & inode::FL_INLINE_DATA != 0) {
                    continue;
                }
                let mut bad = None;
                let mut spent = 0u64;
                let mut check = |start: u64, len: u64, counted: bool| {
                    spent += u64::from(counted);
                    if bad.is_none() {
                        bad = window.first_unusable(start, len);
                    }
                };
                let limit = budget.min(MAX_FILE_TREE);
                if flags & inode::FL_EXTENTS != 0 {
                    inode::walk_extents(vol, sb, node.root(), limit, &mut |n| match n {
                        inode::Node::Block(b) => check(b, 1, true),
                        inode::Node::Extent(e) => check(e.start, e.len, false),
                    })
                } else {
                    inode::walk_block_map(vol, sb, node.root(), limit, &mut |b| check(b, 1, true))
                }
                .map_err(|e| within(e, format!("inode {ino}")))?;
                budget = budget.saturating_sub(spent);
                if let Some(b) = bad {
                    return Err(damage(descs, ino, b));
                }
            }
            done += count;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use crate::fs::tests::Mem;

    /// A plausible superblock header for a 4 MiB, 1 KiB-block filesystem.
    fn base_image() -> Vec<u8> {
        let mut img = vec![0u8; 4 << 20];
        let sb = &mut img[1024..2048];
        sb[0x04..0x08].copy_from_slice(&4096u32.to_le_bytes()); // blocks
        sb[0x14..0x18].copy_from_slice(&1u32.to_le_bytes()); // first data block
        sb[0x18..0x1C].copy_from_slice(&0u32.to_le_bytes()); // 1 KiB blocks
        sb[0x20..0x24].copy_from_slice(&8192u32.to_le_bytes()); // blocks per group
        sb[0x28..0x2C].copy_from_slice(&256u32.to_le_bytes()); // inodes per group
        sb[0x38..0x3A].copy_from_slice(&MAGIC.to_le_bytes());
        img
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// Random superblock and descriptor bytes never panic, hang or allocate wildly: the
        /// result is a map, an error string, or "not ext".
        #[test]
        fn hostile_superblocks_and_descriptors(
            sb_patch in proptest::collection::vec((0usize..1024, any::<u8>()), 0..40),
            gd_patch in proptest::collection::vec((0usize..1024, any::<u8>()), 0..40),
        ) {
            let mut img = base_image();
            for (o, v) in sb_patch { img[1024 + o] = v; }
            for (o, v) in gd_patch { img[2048 + o] = v; }
            let vol = Mem(img);
            if let Ok(Some(sb)) = Superblock::read(&vol) {
                let _ = allocation_map(&vol, &sb, 65536);
            }
        }
    }

    /// A real 4 MiB ext4 (1 KiB blocks, one group, metadata_csum, 64-byte descriptors, a
    /// journal): tests/fixtures/make-ext4-tracking.sh.
    fn fixture() -> Vec<u8> {
        zstd::decode_all(
            &include_bytes!("../../../tests/fixtures/ext4-tracking-current.img.zst")[..],
        )
        .expect("fixture decompresses")
    }

    /// Group 0's descriptor (block 2) in the fixture.
    const GD: usize = 2048;

    fn map_of(img: &[u8]) -> Checked<BlockMap> {
        let vol = Mem(img.to_vec());
        let sb = Superblock::read(&vol).unwrap().unwrap();
        allocation_map(&vol, &sb, 1024)
    }

    fn put_u16(img: &mut [u8], at: usize, v: u16) {
        img[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn put_u32(img: &mut [u8], at: usize, v: u32) {
        img[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    /// Recomputes the fixture's block bitmap, descriptor and superblock checksums, so that
    /// only the damage a test made on purpose remains.
    fn reseal(img: &mut [u8]) {
        let sb = Superblock::read(&Mem(img.to_vec())).unwrap().unwrap();
        let csum::Scheme::Crc32c(seed) = sb.scheme else {
            panic!("the fixture has metadata_csum");
        };
        let bb = u32_at(img, GD) as usize * 1024;
        let c = crate::fs::crc32::crc32c_update(seed, &img[bb..bb + 1024]);
        put_u16(img, GD + 0x18, c as u16);
        put_u16(img, GD + 0x38, (c >> 16) as u16);
        let d = sb.scheme.descriptor(0, &img[GD..GD + 64]).unwrap();
        put_u16(img, GD + csum::BG_CHECKSUM, d);
        let c = crate::fs::crc32::crc32c_update(!0, &img[1024..1024 + csum::SB_CHECKSUM]);
        put_u32(img, 1024 + csum::SB_CHECKSUM, c);
    }

    fn expect_err(img: &[u8], needle: &str) {
        let err = map_of(img).expect_err("damage must not give a map");
        assert!(err.contains(needle), "{err:?} does not mention {needle:?}");
    }

    /// [`expect_err`] on `img` edited by `edit`, its checksums then made consistent again.
    fn expect_err_resealed(img: &[u8], needle: &str, edit: impl FnOnce(&mut Vec<u8>)) {
        let mut img = img.to_vec();
        edit(&mut img);
        reseal(&mut img);
        expect_err(&img, needle);
    }

    #[test]
    fn the_intact_fixture_is_trusted_and_resealing_changes_nothing() {
        let img = fixture();
        let map = map_of(&img).unwrap();
        let mut again = img.clone();
        reseal(&mut again);
        assert!(again == img, "reseal must reproduce the real checksums");
        // The journal (inode 8) and the inode table are in the map.
        assert!(map.used_blocks() > 1024 + 32);
    }

    #[test]
    fn every_checksum_is_checked() {
        let img = fixture();
        // s_free_blocks_count: not used by the map, but covered by the superblock checksum.
        let mut a = img.clone();
        a[1024 + 0x0C] ^= 1;
        expect_err(&a, "superblock checksum mismatch");
        // bg_free_inodes_count.
        let mut b = img.clone();
        b[GD + 0x0E] ^= 1;
        expect_err(&b, "descriptor checksum mismatch");
        // One bit of the block bitmap.
        let mut c = img.clone();
        let bb = u32_at(&img, GD) as usize * 1024;
        c[bb + 1000] ^= 0x10;
        expect_err(&c, "block bitmap checksum mismatch");
    }

    #[test]
    fn damage_behind_valid_checksums_is_found() {
        let img = fixture();
        let bb = u32_at(&img, GD) as usize;
        let itable = u32_at(&img, GD + 8) as usize;
        let free = u16_at(&img, GD + 0x0C);

        // A free count that disagrees with the bitmap.
        expect_err_resealed(&img, "free blocks", |a| {
            put_u16(a, GD + 0x0C, free + 1);
        });

        // The block bitmap at the superblock, or inside the inode table.
        for (at, what) in [(1, "superblock"), (itable as u32 + 3, "inode table")] {
            expect_err_resealed(&img, what, |b| {
                put_u32(b, GD, at);
            });
        }

        // An inode table block marked free (with a matching free count).
        expect_err_resealed(&img, "inode table", |c| {
            let bit = itable + 2 - 1; // bit i is block first_data_block + i
            c[bb * 1024 + bit / 8] &= !(1 << (bit % 8));
            put_u16(c, GD + 0x0C, free + 1);
        });

        // A group in use claiming to be uninitialised.
        expect_err_resealed(&img, "uninitialised", |d| {
            let flags = u16_at(&img, GD + 0x12);
            put_u16(d, GD + 0x12, flags | BG_BLOCK_UNINIT);
        });

        // The journal inode's first extent moved onto the inode table.
        let mut e = img.clone();
        let slot = itable * 1024 + 7 * 256;
        let ext_start = slot + 0x28 + 12 + 8;
        assert_eq!(
            u16_at(&img, slot + 0x28),
            0xF30A,
            "journal inode has an extent root"
        );
        put_u32(&mut e, ext_start, itable as u32 + 1);
        expect_err(&e, "overlap");
    }

    /// A file's block marked free, with the free count and every checksum made consistent
    /// (red team A): only reading the inodes can tell, and it must.
    #[test]
    fn a_file_block_marked_free_behind_consistent_counts_is_found() {
        let img = fixture();
        let bb = u32_at(&img, GD) as usize;
        let itable = u32_at(&img, GD + 8) as usize;
        // The root directory (inode 2, slot 1): an extent tree whose first extent is data.
        let slot = itable * 1024 + 256;
        assert_eq!(u16_at(&img, slot + 0x28), 0xF30A, "root has an extent root");
        let data = u32_at(&img, slot + 0x28 + 12 + 8) as usize;
        let mut a = img.clone();
        let bit = data - 1;
        a[bb * 1024 + bit / 8] &= !(1 << (bit % 8));
        put_u16(&mut a, GD + 0x0C, u16_at(&img, GD + 0x0C) + 1);
        reseal(&mut a);
        expect_err(&a, &format!("marks block {data} free but inode 2 uses it"));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Random bytes anywhere in the first MiB of a real metadata_csum filesystem (its
        /// superblock, descriptors, bitmaps, inode table, journal, files): either the map is
        /// refused or it still holds every block the intact filesystem's map holds. Never a
        /// smaller map.
        #[test]
        fn damage_never_shrinks_the_map(
            patches in proptest::collection::vec((0usize..(1 << 20), any::<u8>()), 1..12),
        ) {
            let img = fixture();
            let intact = map_of(&img).unwrap();
            let mut bad = img.clone();
            for (at, v) in patches { bad[at] ^= v | 1; }
            if let Ok(map) = map_of(&bad) {
                for b in 0..intact.block_count() {
                    prop_assert!(!intact.is_used(b) || map.is_used(b), "block {} dropped", b);
                }
            }
        }
    }

    #[test]
    fn descriptor_pointing_past_the_end_is_rejected() {
        let mut img = base_image();
        // group 0 descriptor at block 2 (byte 2048): block bitmap far away
        img[2048..2052].copy_from_slice(&1_000_000u32.to_le_bytes());
        let vol = Mem(img);
        let sb = Superblock::read(&vol).unwrap().unwrap();
        let err = allocation_map(&vol, &sb, 65536).unwrap_err();
        assert!(err.contains("outside the filesystem"), "{err}");
    }
}
