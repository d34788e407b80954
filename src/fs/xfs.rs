//! XFS (v4 and v5): superblock, allocation group free-space headers (AGF) and the
//! by-block-number free-space B+trees (bnobt).
//!
//! Layout facts used here (all big-endian), from the XFS on-disk format:
//! - The filesystem is cut into `sb_agcount` allocation groups (AGs) of `sb_agblocks` blocks;
//!   the last one holds what is left of `sb_dblocks`. Each AG starts with four sectors:
//!   superblock (a copy in AGs > 0), AGF, AGI, AGFL.
//! - Superblock (sector 0): magic `XFSB` @0, blocksize u32 @4, dblocks u64 @8, rblocks u64
//!   @16, uuid @32, logstart u64 @48 (0: external log), agblocks u32 @84, agcount u32 @88,
//!   logblocks u32 @96, versionnum u16 @100 (low 4 bits: 4 or 5), sectsize u16 @102, fname[12]
//!   @108, blocklog u8 @120, sectlog u8 @121, agblklog u8 @124, inprogress u8 @126, fdblocks
//!   u64 @144; v5: features_ro_compat u32 @212, features_incompat u32 @216, crc @224, meta_uuid
//!   @248 (used in metadata blocks instead of uuid with the META_UUID feature).
//! - An "fsblock" number (logstart) is `agno << agblklog | agbno`.
//! - AGF (sector 1 of the AG): magic `XAGF` @0, versionnum u32 @4 (1), seqno u32 @8 (the AG
//!   number), length u32 @12 (blocks in this AG), bnobt root u32 @16, bnobt levels u32 @28,
//!   freeblks u32 @52; v5: uuid @64, crc @216.
//! - bnobt blocks use the short btree header: magic u32 @0 (`ABTB` v4, `AB3B` v5), level u16
//!   @4 (0 = leaf), numrecs u16 @6, leftsib u32 @8, rightsib u32 @12 (16 bytes); v5 adds
//!   blkno u64 @16 (the block's own address in 512-byte units), lsn u64 @24, uuid @32, owner
//!   u32 @48 (the AG number), crc @52 (56 bytes). Leaves hold records (startblock u32,
//!   blockcount u32) sorted by startblock; nodes hold `maxrecs = (blocksize − header) / 12`
//!   key slots of 8 bytes, then the child pointers (AG block numbers, u32).
//! - v5 checksums are CRC-32C over the sector (superblock, AGF) or the block (btree), with the
//!   checksum field taken as zero, stored little-endian.
//!
//! What is used: everything in an AG that its bnobt does not list as free — AG headers, inode
//! chunks, the internal log, every btree block, the AGFL, file data. Every number read is
//! checked against the AG; a record out of order or past the AG, a wrong level, a loop, a
//! checksum mismatch or a free count that disagrees with the AGF makes the map unusable (the
//! caller then reads every block). The free extents are then checked against the inodes, as
//! xfs_repair does: the inode btree of each AG gives the inode chunks, and no chunk, no extent
//! of an in-use inode's data or attribute fork and no block of its block-mapping btree may be
//! listed free.

use super::{BlockMap, FsInfo};
use crate::bytes::{be_u16, be_u32, be_u64};
use crate::error::Result;
use crate::fs::check::{Checked, MapCheck, bad, within};
use crate::fs::crc32::crc32c_skipping;
use crate::fs::{uuid_at, uuid_string};
use crate::volume::Volume;
use std::collections::HashSet;

/// Superblock magic (`XFS_SB_MAGIC`, 0x58465342).
pub const MAGIC: &[u8; 4] = b"XFSB";
/// AGF magic (`XFS_AGF_MAGIC`, 0x58414746).
const AGF_MAGIC: &[u8; 4] = b"XAGF";
/// bnobt block magic, v4 (`XFS_ABTB_MAGIC`) and v5 with CRC (`XFS_ABTB_CRC_MAGIC`).
const BNOBT_MAGIC_V4: &[u8; 4] = b"ABTB";
const BNOBT_MAGIC_V5: &[u8; 4] = b"AB3B";
/// cntbt (free space by size) block magic, v4 (`XFS_ABTC_MAGIC`) and v5
/// (`XFS_ABTC_CRC_MAGIC`).
const CNTBT_MAGIC_V4: &[u8; 4] = b"ABTC";
const CNTBT_MAGIC_V5: &[u8; 4] = b"AB3C";
/// AGI magic (`XFS_AGI_MAGIC`) and AGFL magic (`XFS_AGFL_MAGIC`, v5 only).
const AGI_MAGIC: &[u8; 4] = b"XAGI";
const AGFL_MAGIC: &[u8; 4] = b"XAFL";

/// Bytes of the superblock that [`Superblock::parse`] needs (the v5 fields end at 264).
pub const SB_PARSE_LEN: usize = 512;
const SB_CRC_OFF: usize = 224;
const AGF_CRC_OFF: usize = 216;
const AGI_CRC_OFF: usize = 312;
const AGFL_CRC_OFF: usize = 32;
/// v5 AGFL header: magic, seqno, uuid, lsn, crc; the block numbers follow.
const AGFL_HDR_V5: usize = 36;
const BTREE_CRC_OFF: usize = 52;
const BTREE_HDR_V4: usize = 16;
const BTREE_HDR_V5: usize = 56;
/// Deeper than any bnobt can be (2^31 blocks per AG of 512 bytes need 7 levels).
const MAX_LEVELS: u32 = 12;
/// Smallest AG mkfs makes (`XFS_MIN_AG_BLOCKS`).
const MIN_AG_BLOCKS: u64 = 64;

/// v5 incompatible features that do not change where free space is recorded: FTYPE,
/// SPINODES, META_UUID, BIGTIME, NREXT64, EXCHRANGE, PARENT, METADIR.
const INCOMPAT_KNOWN: u32 = 0x1 | 0x2 | 0x4 | 0x8 | 0x20 | 0x40 | 0x80 | 0x100;
const INCOMPAT_META_UUID: u32 = 0x4;
const INCOMPAT_NEEDSREPAIR: u32 = 0x10;
/// v5 read-only-compatible features: FINOBT, RMAPBT, REFLINK, INOBTCNT.
const RO_COMPAT_KNOWN: u32 = 0x1 | 0x2 | 0x4 | 0x8;
const RO_COMPAT_FINOBT: u32 = 0x1;
const RO_COMPAT_RMAPBT: u32 = 0x2;
const RO_COMPAT_REFLINK: u32 = 0x4;

/// The fields of an XFS superblock that the probe and the map need.
#[derive(Debug, Clone)]
pub struct Superblock {
    version: u16,
    block_size: u64,
    sect_size: u64,
    blocklog: u8,
    sectlog: u8,
    agblklog: u8,
    dblocks: u64,
    rblocks: u64,
    agblocks: u64,
    agcount: u64,
    logstart: u64,
    logblocks: u64,
    fdblocks: u64,
    inprogress: u8,
    ro_compat: u32,
    incompat: u32,
    uuid: [u8; 16],
    meta_uuid: [u8; 16],
    label: String,
}

impl Superblock {
    /// Parses the first sector of a volume; `None` when it is not an XFS superblock (or its
    /// basic geometry is implausible).
    pub fn parse(h: &[u8]) -> Option<Superblock> {
        if h.len() < SB_PARSE_LEN || h[0..4] != *MAGIC {
            return None;
        }
        let bs = be_u32(h, 4);
        let sectsize = be_u16(h, 102);
        let dblocks = be_u64(h, 8);
        let agblocks = be_u32(h, 84);
        let agcount = be_u32(h, 88);
        if !bs.is_power_of_two()
            || !(512..=65536).contains(&bs)
            || !sectsize.is_power_of_two()
            || !(512..=32768).contains(&sectsize)
            || agblocks == 0
            || agcount == 0
            || dblocks == 0
        {
            return None;
        }
        let name = &h[108..120];
        let end = name.iter().position(|&c| c == 0).unwrap_or(name.len());
        let version = be_u16(h, 100) & 0xF;
        Some(Superblock {
            version,
            block_size: u64::from(bs),
            sect_size: u64::from(sectsize),
            blocklog: h[120],
            sectlog: h[121],
            agblklog: h[124],
            dblocks,
            rblocks: be_u64(h, 16),
            agblocks: u64::from(agblocks),
            agcount: u64::from(agcount),
            logstart: be_u64(h, 48),
            logblocks: u64::from(be_u32(h, 96)),
            fdblocks: be_u64(h, 144),
            inprogress: h[126],
            ro_compat: if version == 5 { be_u32(h, 212) } else { 0 },
            incompat: if version == 5 { be_u32(h, 216) } else { 0 },
            uuid: uuid_at(h, 32),
            meta_uuid: uuid_at(h, 248),
            label: String::from_utf8_lossy(&name[..end]).into_owned(),
        })
    }

    /// Reads the superblock of `vol`; `None` when it is not XFS.
    pub fn read(vol: &dyn Volume) -> Result<Option<Superblock>> {
        if vol.size() < SB_PARSE_LEN as u64 {
            return Ok(None);
        }
        let mut h = vec![0u8; SB_PARSE_LEN];
        vol.read_at(0, &mut h)?;
        Ok(Superblock::parse(&h))
    }

    pub fn uuid(&self) -> [u8; 16] {
        self.uuid
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn block_size(&self) -> u32 {
        self.block_size as u32
    }

    /// Bytes of the data section; `None` when the block count overflows.
    pub fn size(&self) -> Option<u64> {
        self.dblocks.checked_mul(self.block_size)
    }

    /// Used bytes as `df` counts them: data blocks minus free blocks minus an internal log.
    /// `sb_fdblocks` is exact on a cleanly unmounted filesystem (lazy counters are written
    /// back at unmount). `None` when the counters are inconsistent.
    pub fn used_bytes(&self) -> Option<u64> {
        let log = if self.logstart != 0 {
            self.logblocks
        } else {
            0
        };
        self.dblocks
            .checked_sub(self.fdblocks)
            .and_then(|u| u.checked_sub(log))
            .and_then(|u| u.checked_mul(self.block_size))
    }

    pub fn info(&self) -> FsInfo {
        FsInfo {
            fs_type: "xfs".into(),
            uuid: uuid_string(&self.uuid),
            label: self.label.clone(),
            block_size: self.block_size as u32,
            size: self.size().unwrap_or(u64::MAX),
            used_bytes: self.used_bytes().unwrap_or(0),
            version: None,
        }
    }

    /// A note for the backup when the filesystem has a realtime section: its file data lives
    /// on another device, which this volume does not include.
    pub fn realtime_note(&self) -> Option<String> {
        (self.rblocks != 0).then(|| {
            format!(
                "this XFS filesystem has a realtime section of {} blocks on a separate device; \
                 the file data stored there is not part of this volume and must be backed up \
                 separately",
                self.rblocks
            )
        })
    }

    fn crc(&self) -> bool {
        self.version == 5
    }

    /// The UUID that v5 metadata blocks carry.
    fn metadata_uuid(&self) -> [u8; 16] {
        if self.incompat & INCOMPAT_META_UUID != 0 {
            self.meta_uuid
        } else {
            self.uuid
        }
    }

    /// Blocks in AG `ag` (the last one may be shorter).
    fn ag_len(&self, ag: u64) -> u64 {
        self.agblocks.min(
            self.dblocks
                .saturating_sub(ag.saturating_mul(self.agblocks)),
        )
    }

    /// Checks everything the map relies on beyond what [`Superblock::parse`] checked.
    fn check_geometry(&self) -> Checked<()> {
        if self.version != 4 && self.version != 5 {
            return Err(bad!("superblock version {} is not 4 or 5", self.version));
        }
        if self.inprogress != 0 {
            return Err(bad!("mkfs.xfs did not finish (sb_inprogress is set)"));
        }
        if u64::from(self.blocklog) >= 64 || 1u64 << self.blocklog != self.block_size {
            return Err(bad!(
                "block log {} does not match block size {}",
                self.blocklog,
                self.block_size
            ));
        }
        if u64::from(self.sectlog) >= 64
            || 1u64 << self.sectlog != self.sect_size
            || self.sect_size > self.block_size
        {
            return Err(bad!(
                "sector size {} (log {}) is inconsistent with block size {}",
                self.sect_size,
                self.sectlog,
                self.block_size
            ));
        }
        // sb_agblklog is log2 of agblocks rounded up.
        let log_ok = self.agblklog < 32
            && 1u64 << self.agblklog >= self.agblocks
            && (self.agblklog == 0 || 1u64 << (self.agblklog - 1) < self.agblocks);
        if !(MIN_AG_BLOCKS..=1 << 31).contains(&self.agblocks) || !log_ok {
            return Err(bad!(
                "AG size {} blocks (log {}) is implausible",
                self.agblocks,
                self.agblklog
            ));
        }
        let full = (self.agcount - 1)
            .checked_mul(self.agblocks)
            .ok_or_else(|| bad!("AG count overflows"))?;
        if full >= self.dblocks || self.dblocks - full > self.agblocks {
            return Err(bad!(
                "{} AGs of {} blocks do not make {} blocks",
                self.agcount,
                self.agblocks,
                self.dblocks
            ));
        }
        if self.crc() {
            if self.incompat & INCOMPAT_NEEDSREPAIR != 0 {
                return Err(bad!("it is marked as needing xfs_repair"));
            }
            let unknown = self.incompat & !INCOMPAT_KNOWN;
            if unknown != 0 {
                return Err(bad!("unsupported incompatible features {unknown:#x}"));
            }
            let unknown = self.ro_compat & !RO_COMPAT_KNOWN;
            if unknown != 0 {
                return Err(bad!(
                    "unsupported read-only-compatible features {unknown:#x}"
                ));
            }
        }
        Ok(())
    }

    /// The internal log as a byte range, `None` with an external log.
    fn internal_log(&self) -> Checked<Option<(u64, u64)>> {
        if self.logstart == 0 {
            return Ok(None);
        }
        let ag = self.logstart >> self.agblklog;
        let agbno = self.logstart & ((1u64 << self.agblklog) - 1);
        if ag >= self.agcount
            || self.logblocks == 0
            || agbno
                .checked_add(self.logblocks)
                .is_none_or(|e| e > self.ag_len(ag))
        {
            return Err(bad!(
                "internal log at block {} (+{}) is outside its AG",
                self.logstart,
                self.logblocks
            ));
        }
        let start = (ag * self.agblocks + agbno) * self.block_size;
        Ok(Some((start, self.logblocks * self.block_size)))
    }
}

fn check_crc(what: &str, buf: &[u8], field: usize) -> Checked<()> {
    let stored = u32::from_le_bytes([buf[field], buf[field + 1], buf[field + 2], buf[field + 3]]);
    let computed = crc32c_skipping(buf, field);
    if stored != computed {
        return Err(MapCheck::Checksum {
            what: what.to_string(),
            stored,
            computed,
        });
    }
    Ok(())
}

/// Log record header magic (`XLOG_HEADER_MAGIC_NUM`).
const LOG_MAGIC: u32 = 0xFEED_BABE;
/// Basic block: the unit of log addresses.
const BB: u64 = 512;
/// How far around the head the log's cycle stamps are checked: the most log I/O that can be
/// in flight (8 in-core logs of at most 256 KiB), in basic blocks.
const LOG_WINDOW: u64 = 8 * 256 * 1024 / BB;
/// `oh_flags` bit of the operation that an unmount writes.
const XLOG_UNMOUNT_TRANS: u8 = 0x20;

/// The cycle stamp of the log block at `at`: its first word, or the cycle field of a record
/// header (whose first word is the magic).
fn log_cycle(b: &[u8], at: usize) -> u32 {
    match be_u32(b, at) {
        LOG_MAGIC => be_u32(b, at + 4),
        c => c,
    }
}

/// Checks that the internal log (`len` bytes at byte `start`) ends with an unmount record,
/// as it does after a clean unmount; otherwise it holds metadata changes that are not yet
/// in place (allocations the free-space trees do not show), and `Err` says so.
///
/// Every 512-byte basic block of the log starts with the cycle number (pass over the log) it
/// was written in. The head — where the next write goes — is the first block whose cycle is
/// lower than block 0's (found by binary search, as the kernel does), or the end when the
/// whole log has one cycle. The stamps within [`LOG_WINDOW`] on both sides of the head must
/// be exactly what a completed sequence of writes leaves (no torn or in-flight writes), and
/// the last record before the head must be a one-operation unmount record ending at the head.
/// Record header (big-endian): magic @0, cycle @4, version @8, len @12 (data bytes),
/// num_logops @40, fs uuid @304, size @320 (in-core log size: headers take
/// ⌈size / 32 KiB⌉ blocks in version 2). The operation header after it: flags u8 @9.
fn check_log_clean(vol: &dyn Volume, sb: &Superblock, start: u64, len: u64) -> Checked<()> {
    let n = len / BB;
    if n < 2 {
        return Err(bad!("the log is too small"));
    }
    let read = |first: u64, count: u64| -> Checked<Vec<u8>> {
        let mut b = vec![0u8; (count * BB) as usize];
        vol.read_at(start + first * BB, &mut b)
            .map_err(|e| within(e, "reading the log"))?;
        Ok(b)
    };
    let cycle_at = |blk: u64| -> Checked<u32> { Ok(log_cycle(&read(blk, 1)?, 0)) };
    let dirty = |why: &str| -> Checked<()> {
        Err(bad!(
            "the log needs recovery: {why}; until it is replayed (mount and unmount the \
             filesystem once) the free-space trees may miss recent allocations"
        ))
    };
    let first = cycle_at(0)?;
    if first == 0 {
        // A log never written to: nothing to replay.
        return Ok(());
    }
    let last = cycle_at(n - 1)?;
    // head: the first block of the older pass; `n` when the whole log is of one pass.
    let head = if first == last {
        n
    } else {
        // The older pass, or never written (zeros) past the head.
        if last != 0 && last.checked_add(1) != Some(first) {
            return dirty(&format!("cycles {first} and {last} at its ends"));
        }
        let (mut lo, mut hi) = (0u64, n - 1); // cycle(lo) == first, cycle(hi) == last
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if cycle_at(mid)? == first {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        hi
    };
    let expected = |blk: u64| if blk < head { first } else { last };
    // The blocks around the head, in log order from `w0`.
    let (w0, count) = if n <= 2 * LOG_WINDOW {
        (head % n, n)
    } else {
        ((head + n - LOG_WINDOW) % n, 2 * LOG_WINDOW)
    };
    let mut win = Vec::with_capacity((count * BB) as usize);
    let part = count.min(n - w0);
    win.extend(read(w0, part)?);
    if part < count {
        win.extend(read(0, count - part)?);
    }
    let blk_of = |i: u64| (w0 + i) % n;
    for i in 0..count {
        let blk = blk_of(i);
        let c = log_cycle(&win, (i * BB) as usize);
        if c != expected(blk) {
            return dirty(&format!(
                "block {blk} has cycle {c}, expected {}",
                expected(blk)
            ));
        }
    }
    // The last record header before the head, within the window.
    let head_i = if count == n { n } else { LOG_WINDOW };
    let Some(rec_i) = (0..head_i)
        .rev()
        .find(|&i| be_u32(&win, (i * BB) as usize) == LOG_MAGIC)
    else {
        return dirty("no record header before the head");
    };
    let h = &win[(rec_i * BB) as usize..((rec_i + 1) * BB) as usize];
    let version = be_u32(h, 8);
    let data_len = u64::from(be_u32(h, 12));
    let ops = be_u32(h, 40);
    let size = u64::from(be_u32(h, 320));
    let hblks = if version & 2 != 0 && size > 32768 {
        size.div_ceil(32768)
    } else {
        1
    };
    let uuid = uuid_at(h, 304);
    if uuid != sb.uuid && uuid != [0; 16] {
        return dirty("its last record belongs to another filesystem");
    }
    if ops != 1 || rec_i + hblks + data_len.div_ceil(BB) != head_i {
        return dirty("its last record is not an unmount record");
    }
    let op_i = rec_i + hblks;
    if op_i >= head_i || win[(op_i * BB) as usize + 9] & XLOG_UNMOUNT_TRANS == 0 {
        return dirty("its last record is not an unmount record");
    }
    Ok(())
}

/// Builds the allocation map of an XFS filesystem at `granularity` bytes per bit. `Err`
/// explains why the filesystem's data cannot be trusted.
pub fn allocation_map(vol: &dyn Volume, sb: &Superblock, granularity: u64) -> Checked<BlockMap> {
    sb.check_geometry()?;
    let fs_bytes = sb.size().ok_or_else(|| bad!("block count overflows"))?;
    if fs_bytes > vol.size() {
        return Err(bad!(
            "the filesystem spans {fs_bytes} bytes but the volume has only {}",
            vol.size()
        ));
    }
    if sb.crc() {
        let mut s = vec![0u8; sb.sect_size as usize];
        vol.read_at(0, &mut s)
            .map_err(|e| within(e, "reading the superblock"))?;
        check_crc("superblock", &s, SB_CRC_OFF)?;
    }
    let mut map = BlockMap::new(vol.size(), granularity);
    // Bytes past the filesystem's end are not the filesystem's to describe: keep them.
    map.mark_bytes(fs_bytes, vol.size() - fs_bytes);
    // The internal log is never in a free-space tree; marking it is a cross-check. A log
    // that was not cleanly unmounted holds allocations the free-space trees do not show yet.
    if let Some((start, len)) = sb.internal_log()? {
        check_log_clean(vol, sb, start, len)?;
        map.mark_bytes(start, len);
    }
    let mut ags = Vec::new();
    for ag in 0..sb.agcount {
        ags.push(check_ag(vol, sb, ag)?);
    }
    check_inodes(vol, sb, &ags)?;
    for (ag, a) in ags.iter().enumerate() {
        let base = ag as u64 * sb.agblocks * sb.block_size;
        let bs = sb.block_size;
        let mut used_from = 0u64;
        for &(start, count) in &a.free {
            map.mark_bytes(base + used_from * bs, (start - used_from) * bs);
            used_from = start + count;
        }
        let len = sb.ag_len(ag as u64);
        map.mark_bytes(base + used_from * bs, (len - used_from) * bs);
    }
    Ok(map)
}

/// An AG's header sectors, checked: what the map must treat as used whatever the free-space
/// trees say, and the roots of the two free-space trees.
struct AgHeaders {
    /// AGF `freeblks` and `longest`.
    freeblks: u64,
    longest: u64,
    /// (root, levels) of the bnobt and of the cntbt.
    bno: (u64, u32),
    cnt: (u64, u32),
    /// (root, levels) of the inode btree.
    inobt: (u64, u32),
    /// AG block ranges `[start, end)` that cannot be free: the header sectors, every btree
    /// root the AGF and AGI name, the blocks on the AGFL, the internal log's part in this AG.
    in_use: Vec<(u64, u64)>,
}

/// Reads sector `index` of AG `ag`.
fn read_sector(
    vol: &dyn Volume,
    sb: &Superblock,
    ag: u64,
    index: u64,
    what: &str,
) -> Checked<Vec<u8>> {
    let mut s = vec![0u8; sb.sect_size as usize];
    let at = ag * sb.agblocks * sb.block_size + index * sb.sect_size;
    vol.read_at(at, &mut s)
        .map_err(|e| within(e, format!("reading the {what} of AG {ag}")))?;
    Ok(s)
}

/// Checks a (root, levels) pair an AG header gives for one of its btrees.
fn check_root(
    what: &str,
    tree: &str,
    root: u64,
    levels: u32,
    headers: u64,
    len: u64,
) -> Checked<()> {
    if !(1..=MAX_LEVELS).contains(&levels) {
        return Err(bad!("{what}: {tree} has {levels} levels"));
    }
    if root < headers || root >= len {
        return Err(bad!("{what}: {tree} root {root} is outside the AG"));
    }
    Ok(())
}

/// The AGF or the AGI: its sector in the AG, magic, and the offsets of its CRC and UUID.
struct AgHeader {
    name: &'static str,
    sector: u64,
    magic: &'static [u8; 4],
    crc_off: usize,
    uuid_off: usize,
}

const AGF: AgHeader = AgHeader {
    name: "AGF",
    sector: 1,
    magic: AGF_MAGIC,
    crc_off: AGF_CRC_OFF,
    uuid_off: 64,
};
const AGI: AgHeader = AgHeader {
    name: "AGI",
    sector: 2,
    magic: AGI_MAGIC,
    crc_off: AGI_CRC_OFF,
    uuid_off: 296,
};

/// Reads the AGF or AGI of AG `ag` (`len` blocks) and checks its magic, CRC and UUID (v5),
/// version, AG number and length; returns it with its name for messages.
fn read_ag_header(
    vol: &dyn Volume,
    sb: &Superblock,
    ag: u64,
    len: u64,
    h: &AgHeader,
) -> Checked<(Vec<u8>, String)> {
    let buf = read_sector(vol, sb, ag, h.sector, h.name)?;
    let what = format!("{} of AG {ag}", h.name);
    if buf[0..4] != *h.magic {
        return Err(bad!("{what}: bad magic"));
    }
    if sb.crc() {
        check_crc(&what, &buf, h.crc_off)?;
        if uuid_at(&buf, h.uuid_off) != sb.metadata_uuid() {
            return Err(bad!("{what}: UUID differs from the superblock's"));
        }
    }
    let (version, seqno, length) = (be_u32(&buf, 4), be_u32(&buf, 8), be_u32(&buf, 12));
    if version != 1 || u64::from(seqno) != ag || u64::from(length) != len {
        return Err(bad!(
            "{what}: version {version}, number {seqno}, length {length} (expected 1, {ag}, \
             {len})"
        ));
    }
    Ok((buf, what))
}

/// Reads and checks the superblock copy (AGs after the first), AGF, AGI and AGFL of AG `ag`.
fn read_ag_headers(vol: &dyn Volume, sb: &Superblock, ag: u64) -> Checked<AgHeaders> {
    let len = sb.ag_len(ag);
    // The AG headers (four sectors) come first; nothing before them can be free.
    let headers = (4 * sb.sect_size).div_ceil(sb.block_size);
    let mut in_use = vec![(0, headers)];
    if ag > 0 {
        let s = read_sector(vol, sb, ag, 0, "superblock copy")?;
        let what = format!("superblock copy of AG {ag}");
        if s[0..4] != *MAGIC {
            return Err(bad!("{what}: bad magic"));
        }
        if sb.crc() {
            check_crc(&what, &s, SB_CRC_OFF)?;
        }
        // What never changes (growing the filesystem changes dblocks and agcount, and old
        // kernels did not update the copies).
        let same = be_u32(&s, 4) == sb.block_size as u32
            && u64::from(be_u32(&s, 84)) == sb.agblocks
            && uuid_at(&s, 32) == sb.uuid;
        if !same {
            return Err(bad!(
                "{what}: block size, AG size or UUID differs from the primary superblock's"
            ));
        }
    }

    let (agf, what) = read_ag_header(vol, sb, ag, len, &AGF)?;
    let bno = (u64::from(be_u32(&agf, 16)), be_u32(&agf, 28));
    let cnt = (u64::from(be_u32(&agf, 20)), be_u32(&agf, 32));
    check_root(&what, "free-space btree", bno.0, bno.1, headers, len)?;
    check_root(
        &what,
        "by-size free-space btree",
        cnt.0,
        cnt.1,
        headers,
        len,
    )?;
    let mut roots = vec![bno.0, cnt.0];
    if sb.ro_compat & RO_COMPAT_RMAPBT != 0 {
        let (root, levels) = (u64::from(be_u32(&agf, 24)), be_u32(&agf, 36));
        check_root(&what, "reverse-mapping btree", root, levels, headers, len)?;
        roots.push(root);
    }
    if sb.ro_compat & RO_COMPAT_REFLINK != 0 {
        let (root, levels) = (u64::from(be_u32(&agf, 88)), be_u32(&agf, 92));
        check_root(&what, "refcount btree", root, levels, headers, len)?;
        roots.push(root);
    }
    let freeblks = u64::from(be_u32(&agf, 52));
    let longest = u64::from(be_u32(&agf, 56));
    let (flfirst, fllast, flcount) = (
        u64::from(be_u32(&agf, 40)),
        u64::from(be_u32(&agf, 44)),
        u64::from(be_u32(&agf, 48)),
    );

    let (agi, what) = read_ag_header(vol, sb, ag, len, &AGI)?;
    let (root, levels) = (u64::from(be_u32(&agi, 20)), be_u32(&agi, 24));
    check_root(&what, "inode btree", root, levels, headers, len)?;
    roots.push(root);
    let inobt = (root, levels);
    if sb.ro_compat & RO_COMPAT_FINOBT != 0 {
        let (root, levels) = (u64::from(be_u32(&agi, 328)), be_u32(&agi, 332));
        check_root(&what, "free-inode btree", root, levels, headers, len)?;
        roots.push(root);
    }
    in_use.extend(roots.iter().map(|&r| (r, r + 1)));

    let agfl = read_sector(vol, sb, ag, 3, "AGFL")?;
    let what = format!("AGFL of AG {ag}");
    let first_entry = if sb.crc() {
        if agfl[0..4] != *AGFL_MAGIC {
            return Err(bad!("{what}: bad magic"));
        }
        check_crc(&what, &agfl, AGFL_CRC_OFF)?;
        if u64::from(be_u32(&agfl, 4)) != ag || uuid_at(&agfl, 8) != sb.metadata_uuid() {
            return Err(bad!("{what}: AG number or UUID does not match"));
        }
        AGFL_HDR_V5
    } else {
        0
    };
    let slots = (sb.sect_size as usize).saturating_sub(first_entry) as u64 / 4;
    // The chain arithmetic only once the three fields are known to fit (hostile values
    // would overflow it).
    let fits = flfirst < slots && fllast < slots && flcount <= slots;
    let chain_ok = fits && (flcount == 0 || (fllast + slots - flfirst) % slots + 1 == flcount);
    if !chain_ok {
        return Err(bad!(
            "AGF of AG {ag}: free list first {flfirst}, last {fllast}, count {flcount} do not \
             fit {slots} slots"
        ));
    }
    for i in 0..flcount {
        let slot = ((flfirst + i) % slots) as usize;
        let b = u64::from(be_u32(&agfl, first_entry + 4 * slot));
        if b < headers || b >= len {
            return Err(bad!("{what}: block {b} is outside the AG"));
        }
        in_use.push((b, b + 1));
    }

    if let Some((start, log_len)) = sb.internal_log()? {
        let ag_start = ag * sb.agblocks * sb.block_size;
        let ag_end = ag_start + len * sb.block_size;
        let end = start + log_len;
        if start < ag_end && end > ag_start {
            let s = (start.max(ag_start) - ag_start) / sb.block_size;
            let e = (end.min(ag_end) - ag_start).div_ceil(sb.block_size);
            in_use.push((s, e));
        }
    }
    Ok(AgHeaders {
        freeblks,
        longest,
        bno,
        cnt,
        inobt,
        in_use,
    })
}

/// Walks one free-space btree of AG `ag` (root, levels), depth-first with children in key
/// order, so `record` sees the leaf records in key order. Returns the blocks of the tree.
fn walk_free_tree(
    vol: &dyn Volume,
    sb: &Superblock,
    ag: u64,
    root: (u64, u32),
    magic: &[u8; 4],
    tree: &str,
    record: &mut dyn FnMut(u64, u64) -> Checked<()>,
) -> Checked<Vec<u64>> {
    walk_short_tree(vol, sb, ag, root, magic, tree, 8, 8, &mut |r| {
        record(u64::from(be_u32(r, 0)), u64::from(be_u32(r, 4)))
    })
}

/// Walks a short-form btree of AG `ag` (root, levels) whose leaf records are `rec_len`
/// bytes and whose node keys are `key_len` bytes (child pointers are u32 AG block numbers),
/// depth-first with children in key order. Returns the blocks of the tree.
#[allow(clippy::too_many_arguments)]
fn walk_short_tree(
    vol: &dyn Volume,
    sb: &Superblock,
    ag: u64,
    (root, levels): (u64, u32),
    magic: &[u8; 4],
    tree: &str,
    rec_len: usize,
    key_len: usize,
    record: &mut dyn FnMut(&[u8]) -> Checked<()>,
) -> Checked<Vec<u64>> {
    let bs = sb.block_size;
    let len = sb.ag_len(ag);
    let base = ag * sb.agblocks * bs;
    let headers = (4 * sb.sect_size).div_ceil(bs);
    let hdr_len = if sb.crc() { BTREE_HDR_V5 } else { BTREE_HDR_V4 };
    let leaf_max = (bs as usize - hdr_len) / rec_len;
    let node_max = (bs as usize - hdr_len) / (key_len + 4);
    let mut block = vec![0u8; bs as usize];
    let mut blocks = Vec::new();
    let mut nodes = HashSet::new();
    let mut stack = vec![(root, levels - 1)];
    while let Some((bno, level)) = stack.pop() {
        if blocks.len() as u64 >= len {
            return Err(bad!(
                "the {tree} of AG {ag} visits more blocks than the AG has"
            ));
        }
        blocks.push(bno);
        let what = format!("{tree} block {bno} of AG {ag}");
        vol.read_at(base + bno * bs, &mut block)
            .map_err(|e| within(e, format!("reading {what}")))?;
        if block[0..4] != *magic {
            return Err(bad!("{what}: bad magic"));
        }
        if sb.crc() {
            check_crc(&what, &block, BTREE_CRC_OFF)?;
            let daddr = (ag * sb.agblocks + bno) * (bs / 512);
            if be_u64(&block, 16) != daddr
                || uuid_at(&block, 32) != sb.metadata_uuid()
                || u64::from(be_u32(&block, 48)) != ag
            {
                return Err(bad!("{what}: address, UUID or owner does not match"));
            }
        }
        let got_level = u32::from(be_u16(&block, 4));
        let numrecs = be_u16(&block, 6) as usize;
        if got_level != level {
            return Err(bad!("{what}: level {got_level}, expected {level}"));
        }
        if level == 0 {
            if numrecs > leaf_max || (numrecs == 0 && bno != root) {
                return Err(bad!("{what}: {numrecs} records"));
            }
            for i in 0..numrecs {
                let o = hdr_len + rec_len * i;
                record(&block[o..o + rec_len]).map_err(|e| within(e, what.clone()))?;
            }
        } else {
            if numrecs == 0 || numrecs > node_max {
                return Err(bad!("{what}: {numrecs} keys"));
            }
            if !nodes.insert(bno) {
                return Err(bad!("{what}: reached twice (the tree has a loop)"));
            }
            let ptrs = hdr_len + node_max * key_len;
            for i in (0..numrecs).rev() {
                let child = u64::from(be_u32(&block, ptrs + 4 * i));
                if child < headers || child >= len {
                    return Err(bad!("{what}: child {child} is outside the AG"));
                }
                stack.push((child, level - 1));
            }
        }
    }
    Ok(blocks)
}

/// The free extent of `free` (sorted, disjoint) that overlaps AG blocks `[start, end)`.
fn free_overlap(free: &[(u64, u64)], start: u64, end: u64) -> Option<(u64, u64)> {
    let i = free.partition_point(|&(s, c)| s + c <= start);
    free.get(i).copied().filter(|&(s, _)| s < end)
}

/// What the map keeps of a checked AG.
struct CheckedAg {
    /// Free extents (start, count) in AG blocks, sorted and disjoint.
    free: Vec<(u64, u64)>,
    /// (root, levels) of the inode btree.
    inobt: (u64, u32),
}

/// Checks the AG's headers and both free-space trees against each other; returns the free
/// extents its bnobt lists (everything else in the AG is used).
fn check_ag(vol: &dyn Volume, sb: &Superblock, ag: u64) -> Checked<CheckedAg> {
    let bs = sb.block_size;
    let len = sb.ag_len(ag);
    let h = read_ag_headers(vol, sb, ag)?;
    let headers = (4 * sb.sect_size).div_ceil(bs);
    let (bno_magic, cnt_magic) = if sb.crc() {
        (BNOBT_MAGIC_V5, CNTBT_MAGIC_V5)
    } else {
        (BNOBT_MAGIC_V4, CNTBT_MAGIC_V4)
    };

    // The by-block tree: free extents strictly in order, disjoint, past the headers.
    let mut free: Vec<(u64, u64)> = Vec::new();
    let mut next_ok = headers;
    let bno_blocks = walk_free_tree(
        vol,
        sb,
        ag,
        h.bno,
        bno_magic,
        "free-space btree",
        &mut |start, count| {
            if count == 0 || start < next_ok || start + count > len {
                return Err(bad!(
                    "free extent {start}+{count} overlaps another, the AG headers, or the \
                     AG's end ({len})"
                ));
            }
            next_ok = start + count;
            free.push((start, count));
            Ok(())
        },
    )?;
    let what = format!("AG {ag}");
    let total: u64 = free.iter().map(|f| f.1).sum();
    if total != h.freeblks {
        return Err(bad!(
            "AGF of {what}: the free-space btree lists {total} free blocks, the AGF counts {}",
            h.freeblks
        ));
    }
    let longest = free.iter().map(|f| f.1).max().unwrap_or(0);
    if longest != h.longest {
        return Err(bad!(
            "AGF of {what}: the longest free extent is {longest} blocks, the AGF says {}",
            h.longest
        ));
    }

    // The by-size tree must list exactly the same extents, ordered by (length, start).
    let mut seen = 0usize;
    let mut prev: Option<(u64, u64)> = None;
    let cnt_blocks = walk_free_tree(
        vol,
        sb,
        ag,
        h.cnt,
        cnt_magic,
        "by-size free-space btree",
        &mut |start, count| {
            if prev.is_some_and(|p| (count, start) <= p) {
                return Err(bad!("free extent {start}+{count} is out of order"));
            }
            prev = Some((count, start));
            let i = free.partition_point(|f| f.0 < start);
            if free.get(i) != Some(&(start, count)) {
                return Err(bad!(
                    "free extent {start}+{count} is not in the by-block free-space btree"
                ));
            }
            seen += 1;
            Ok(())
        },
    )?;
    if seen != free.len() {
        return Err(bad!(
            "{what}: the free-space btrees disagree ({} extents by block, {seen} by size)",
            free.len()
        ));
    }

    // What is certainly in use must not be listed as free.
    let in_use = h
        .in_use
        .iter()
        .copied()
        .chain(bno_blocks.iter().chain(&cnt_blocks).map(|&b| (b, b + 1)));
    for (start, end) in in_use {
        if let Some((s, c)) = free_overlap(&free, start, end) {
            return Err(bad!(
                "{what}: free extent {s}+{c} covers blocks {start}..{end}, which its headers, \
                 btrees, free list or the log use"
            ));
        }
    }
    Ok(CheckedAg {
        free,
        inobt: h.inobt,
    })
}

/// Inode btree block magic, v4 (`XFS_IBT_MAGIC`) and v5 (`XFS_IBT_CRC_MAGIC`).
const INOBT_MAGIC_V4: &[u8; 4] = b"IABT";
const INOBT_MAGIC_V5: &[u8; 4] = b"IAB3";
/// Inode magic (`XFS_DINODE_MAGIC`, "IN").
const DINODE_MAGIC: &[u8; 2] = b"IN";
/// Block-mapping btree block magic, v4 (`XFS_BMAP_MAGIC`) and v5 (`XFS_BMAP_CRC_MAGIC`).
const BMBT_MAGIC_V4: &[u8; 4] = b"BMAP";
const BMBT_MAGIC_V5: &[u8; 4] = b"BMA3";
/// Long-form btree header: v4 24 bytes; v5 72 (crc u32 @64, owner u64 @56, blkno u64 @24,
/// uuid @40).
const LBTREE_HDR_V4: usize = 24;
const LBTREE_HDR_V5: usize = 72;
const LBTREE_CRC_OFF: usize = 64;
const INCOMPAT_SPINODES: u32 = 0x2;
const INCOMPAT_NREXT64: u32 = 0x20;
/// Inodes per inode btree record (`XFS_INODES_PER_CHUNK`).
const INODES_PER_CHUNK: u64 = 64;
/// Most bytes of inode chunks read at once.
const INODE_READ_MAX: u64 = 1 << 20;
/// `di_flags` bit of a file whose data lives on the realtime device.
const DIFLAG_REALTIME: u16 = 0x1;
/// `di_flags2` bit: 64-bit extent counters (`XFS_DIFLAG2_NREXT64`).
const DIFLAG2_NREXT64: u64 = 0x10;

/// Inode geometry from the superblock: inodesize u16 @104, inopblock u16 @106, inopblog u8
/// @123.
struct InodeGeometry {
    size: u64,
    per_block_log: u32,
}

fn inode_geometry(vol: &dyn Volume, sb: &Superblock) -> Checked<InodeGeometry> {
    let mut h = vec![0u8; SB_PARSE_LEN];
    vol.read_at(0, &mut h)
        .map_err(|e| within(e, "reading the superblock"))?;
    let size = u64::from(be_u16(&h, 104));
    let per_block = u64::from(be_u16(&h, 106));
    let log = u32::from(h[123]);
    let ok = size.is_power_of_two()
        && (256..=2048).contains(&size)
        && size <= sb.block_size
        && per_block == sb.block_size / size
        && log < 32
        && 1u64 << log == per_block
        && u32::from(sb.agblklog) + log <= 32;
    if !ok {
        return Err(bad!(
            "inode size {size}, {per_block} inodes a block (log {log}) are inconsistent"
        ));
    }
    Ok(InodeGeometry {
        size,
        per_block_log: log,
    })
}

/// Checks the free-space trees against the inodes, as xfs_repair does: every block of an
/// inode chunk, of a file's extents (data and attribute forks) and of its block-mapping
/// btree must not be listed free. Inode chunks come from each AG's inode btree (records:
/// startino u32 @0, then freecount u32 — or, with sparse inodes, holemask u16 @4, count u8,
/// freecount u8 — and the free mask u64 @8; node keys are 4 bytes).
fn check_inodes(vol: &dyn Volume, sb: &Superblock, ags: &[CheckedAg]) -> Checked<()> {
    let geo = inode_geometry(vol, sb)?;
    let magic = if sb.crc() {
        INOBT_MAGIC_V5
    } else {
        INOBT_MAGIC_V4
    };
    let sparse = sb.incompat & INCOMPAT_SPINODES != 0;
    let mut bmbt_seen = HashSet::new();
    for (ag, a) in ags.iter().enumerate() {
        let ag = ag as u64;
        let len = sb.ag_len(ag);
        let tree = "inode btree";
        let mut recs: Vec<(u64, u16, u64)> = Vec::new();
        let mut next_ok = 0u64;
        let blocks = walk_short_tree(vol, sb, ag, a.inobt, magic, tree, 16, 4, &mut |r| {
            let start = u64::from(be_u32(r, 0));
            let holemask = if sparse { be_u16(r, 4) } else { 0 };
            let free = be_u64(r, 8);
            // AG inode number `start` is at byte `start * size` of the AG.
            if start % INODES_PER_CHUNK != 0
                || start < next_ok
                || (start + INODES_PER_CHUNK) * geo.size > len * sb.block_size
            {
                return Err(bad!(
                    "inode chunk {start} is misaligned, out of order or past the AG's end"
                ));
            }
            next_ok = start + INODES_PER_CHUNK;
            recs.push((start, holemask, free));
            Ok(())
        })?;
        for &b in &blocks {
            if let Some((s, c)) = free_overlap(&a.free, b, b + 1) {
                return Err(bad!(
                    "AG {ag}: free extent {s}+{c} covers block {b} of the inode btree"
                ));
            }
        }
        // Chunks in runs of adjacent ones, read at most INODE_READ_MAX bytes at a time.
        let chunk_bytes = INODES_PER_CHUNK * geo.size;
        let base = ag * sb.agblocks * sb.block_size;
        let mut i = 0;
        let mut buf = Vec::new();
        while i < recs.len() {
            let mut j = i + 1;
            while j < recs.len()
                && recs[j].0 == recs[j - 1].0 + INODES_PER_CHUNK
                && (j + 1 - i) as u64 * chunk_bytes <= INODE_READ_MAX
            {
                j += 1;
            }
            let first = recs[i].0;
            buf.resize(((j - i) as u64 * chunk_bytes) as usize, 0);
            vol.read_at(base + first * geo.size, &mut buf)
                .map_err(|e| within(e, format!("reading inode chunk {first} of AG {ag}")))?;
            for &(start, holemask, free) in &recs[i..j] {
                let off = ((start - first) * geo.size) as usize;
                let chunk = &buf[off..off + chunk_bytes as usize];
                check_chunk(
                    vol,
                    sb,
                    &geo,
                    ags,
                    ag,
                    start,
                    holemask,
                    free,
                    chunk,
                    &mut bmbt_seen,
                )?;
            }
            i = j;
        }
    }
    Ok(())
}

/// Checks one inode chunk (64 inodes from AG inode number `start`, its bytes in `chunk`):
/// its blocks (outside sparse holes) are not free, and neither is any block its in-use
/// inodes map.
#[allow(clippy::too_many_arguments)]
fn check_chunk(
    vol: &dyn Volume,
    sb: &Superblock,
    geo: &InodeGeometry,
    ags: &[CheckedAg],
    ag: u64,
    start: u64,
    holemask: u16,
    free: u64,
    chunk: &[u8],
    bmbt_seen: &mut HashSet<u64>,
) -> Checked<()> {
    let per_bit = INODES_PER_CHUNK / 16;
    for bit in 0..16u64 {
        if holemask & (1 << bit) != 0 {
            continue;
        }
        let first = start + bit * per_bit;
        let b0 = first * geo.size / sb.block_size;
        let b1 = ((first + per_bit) * geo.size).div_ceil(sb.block_size);
        if let Some((s, c)) = free_overlap(&ags[ag as usize].free, b0, b1) {
            return Err(bad!(
                "the free-space tree of AG {ag} lists blocks {s}..{} free but they hold inodes \
                 {first}..{} of that AG",
                s + c,
                first + per_bit
            ));
        }
        for k in 0..per_bit {
            let idx = bit * per_bit + k;
            if free & (1 << idx) != 0 {
                continue;
            }
            let agino = start + idx;
            let ino = (ag << (u32::from(sb.agblklog) + geo.per_block_log)) | agino;
            let o = (idx * geo.size) as usize;
            let dinode = &chunk[o..o + geo.size as usize];
            check_inode(vol, sb, ags, ino, dinode, bmbt_seen)?;
        }
    }
    Ok(())
}

/// Checks the forks of in-use inode `ino`. Inode core (big-endian): magic @0, mode u16 @2,
/// version u8 @4, format u8 @5, NREXT64 data extent count u64 @24, nextents u32 @76 (NREXT64:
/// attribute extent count), anextents u16 @80, forkoff u8 @82 (attribute fork offset in
/// 8-byte units), aformat u8 @83, flags u16 @90; v3: flags2 u64 @120, ino u64 @152. The
/// forks start at byte 100 (v1, v2) or 176 (v3).
fn check_inode(
    vol: &dyn Volume,
    sb: &Superblock,
    ags: &[CheckedAg],
    ino: u64,
    d: &[u8],
    bmbt_seen: &mut HashSet<u64>,
) -> Checked<()> {
    if d[0..2] != *DINODE_MAGIC {
        return Err(bad!(
            "inode {ino} is in use in the inode btree but has no inode magic"
        ));
    }
    if be_u16(d, 2) == 0 {
        return Ok(());
    }
    let version = d[4];
    let v3 = version == 3;
    if sb.crc() != v3 || v3 && be_u64(d, 152) != ino {
        return Err(bad!(
            "inode {ino}: version {version} or its inode number does not match the filesystem"
        ));
    }
    let lit = if v3 { 176 } else { 100 };
    let forkoff = usize::from(d[82]) * 8;
    if lit + forkoff > d.len() {
        return Err(bad!(
            "inode {ino}: attribute fork offset {forkoff} is past the inode"
        ));
    }
    let data_len = if forkoff == 0 { d.len() - lit } else { forkoff };
    let big = v3 && sb.incompat & INCOMPAT_NREXT64 != 0 && be_u64(d, 120) & DIFLAG2_NREXT64 != 0;
    let (nextents, anextents) = if big {
        (be_u64(d, 24), u64::from(be_u32(d, 76)))
    } else {
        (u64::from(be_u32(d, 76)), u64::from(be_u16(d, 80)))
    };
    let realtime = be_u16(d, 90) & DIFLAG_REALTIME != 0;
    if !realtime {
        let fork = &d[lit..lit + data_len];
        check_fork(vol, sb, ags, ino, "data", d[5], fork, nextents, bmbt_seen)?;
    }
    if forkoff != 0 {
        let fork = &d[lit + forkoff..];
        check_fork(
            vol,
            sb,
            ags,
            ino,
            "attribute",
            d[83],
            fork,
            anextents,
            bmbt_seen,
        )?;
    }
    Ok(())
}

/// One 128-bit extent record: (startblock as an fsblock, blockcount).
fn extent(r: &[u8]) -> (u64, u64) {
    let l0 = be_u64(r, 0);
    let l1 = be_u64(r, 8);
    (((l0 & 0x1FF) << 43) | (l1 >> 21), l1 & ((1 << 21) - 1))
}

/// Checks that `count` blocks from fsblock `fsb`, used by inode `ino`, lie in one AG and
/// are not listed free.
fn check_used(
    sb: &Superblock,
    ags: &[CheckedAg],
    ino: u64,
    what: &str,
    fsb: u64,
    count: u64,
) -> Checked<()> {
    let ag = fsb >> sb.agblklog;
    let agbno = fsb & ((1u64 << sb.agblklog) - 1);
    if ag >= sb.agcount || count == 0 || agbno + count > sb.ag_len(ag) {
        return Err(bad!(
            "inode {ino}: {what} at block {fsb} (+{count}) is outside its AG"
        ));
    }
    if let Some((s, c)) = free_overlap(&ags[ag as usize].free, agbno, agbno + count) {
        let b = s.max(agbno);
        return Err(bad!(
            "the free-space tree of AG {ag} lists block {b} free (extent {s}+{c}) but inode \
             {ino} uses it ({what} {agbno}+{count})"
        ));
    }
    Ok(())
}

/// Checks a fork of inode `ino` (format 1 local, 2 extents, 3 btree; 0 device and 4 UUID
/// hold no blocks).
#[allow(clippy::too_many_arguments)]
fn check_fork(
    vol: &dyn Volume,
    sb: &Superblock,
    ags: &[CheckedAg],
    ino: u64,
    which: &str,
    format: u8,
    fork: &[u8],
    count: u64,
    bmbt_seen: &mut HashSet<u64>,
) -> Checked<()> {
    match format {
        0 | 1 | 4 => Ok(()),
        2 => {
            if count > (fork.len() / 16) as u64 {
                return Err(bad!(
                    "inode {ino}: {count} extents do not fit its {which} fork"
                ));
            }
            for i in 0..count as usize {
                let (fsb, n) = extent(&fork[16 * i..16 * i + 16]);
                check_used(sb, ags, ino, &format!("{which} extent"), fsb, n)?;
            }
            Ok(())
        }
        3 => check_bmbt(vol, sb, ags, ino, which, fork, bmbt_seen),
        f => Err(bad!(
            "inode {ino}: {which} fork format {f} is not one this check reads"
        )),
    }
}

/// Walks the block-mapping btree whose root is in `fork` (level u16 @0, numrecs u16 @2,
/// keys u64 @4, pointers u64 after the fork's `(len - 4) / 16` key slots).
fn check_bmbt(
    vol: &dyn Volume,
    sb: &Superblock,
    ags: &[CheckedAg],
    ino: u64,
    which: &str,
    fork: &[u8],
    seen: &mut HashSet<u64>,
) -> Checked<()> {
    let bs = sb.block_size as usize;
    let what = format!("inode {ino}: {which} fork btree");
    let level = u32::from(be_u16(fork, 0));
    let numrecs = be_u16(fork, 2) as usize;
    let root_max = (fork.len() - 4) / 16;
    if !(1..MAX_LEVELS).contains(&level) || numrecs == 0 || numrecs > root_max {
        return Err(bad!("{what}: root of level {level} with {numrecs} keys"));
    }
    let mut stack: Vec<(u64, u32)> = (0..numrecs)
        .rev()
        .map(|i| (be_u64(fork, 4 + root_max * 8 + 8 * i), level - 1))
        .collect();
    let (magic, hdr) = if sb.crc() {
        (BMBT_MAGIC_V5, LBTREE_HDR_V5)
    } else {
        (BMBT_MAGIC_V4, LBTREE_HDR_V4)
    };
    let max = (bs - hdr) / 16;
    let mut block = vec![0u8; bs];
    while let Some((fsb, level)) = stack.pop() {
        check_used(sb, ags, ino, &format!("{which} fork btree block"), fsb, 1)?;
        if !seen.insert(fsb) || seen.len() as u64 > sb.dblocks {
            return Err(bad!("{what}: block {fsb} is reached twice"));
        }
        let ag = fsb >> sb.agblklog;
        let agbno = fsb & ((1u64 << sb.agblklog) - 1);
        let daddr = (ag * sb.agblocks + agbno) * (sb.block_size / 512);
        vol.read_at(daddr * 512, &mut block)
            .map_err(|e| within(e, format!("reading {what} block {fsb}")))?;
        if block[0..4] != *magic {
            return Err(bad!("{what} block {fsb}: bad magic"));
        }
        if sb.crc() {
            check_crc(&format!("{what} block {fsb}"), &block, LBTREE_CRC_OFF)?;
            if be_u64(&block, 24) != daddr
                || uuid_at(&block, 40) != sb.metadata_uuid()
                || be_u64(&block, 56) != ino
            {
                return Err(bad!(
                    "{what} block {fsb}: address, UUID or owner does not match"
                ));
            }
        }
        let got = u32::from(be_u16(&block, 4));
        let n = be_u16(&block, 6) as usize;
        if got != level || n == 0 || n > max {
            return Err(bad!(
                "{what} block {fsb}: level {got} (expected {level}), {n} records"
            ));
        }
        if level == 0 {
            for i in 0..n {
                let (s, c) = extent(&block[hdr + 16 * i..hdr + 16 * i + 16]);
                check_used(sb, ags, ino, &format!("{which} extent"), s, c)?;
            }
        } else {
            let ptrs = hdr + max * 8;
            for i in (0..n).rev() {
                stack.push((be_u64(&block, ptrs + 8 * i), level - 1));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::tests::Mem;
    use proptest::prelude::*;

    const BS: u64 = 512;
    const AGBLOCKS: u64 = 64;

    fn put(img: &mut [u8], at: usize, bytes: &[u8]) {
        img[at..at + bytes.len()].copy_from_slice(bytes);
    }

    fn set_crc(buf: &mut [u8], field: usize) {
        let c = crc32c_skipping(buf, field);
        put(buf, field, &c.to_le_bytes());
    }

    fn hdr_len(v5: bool) -> usize {
        if v5 { BTREE_HDR_V5 } else { BTREE_HDR_V4 }
    }

    /// Writes a bnobt block (header, then `body`) at block `bno` of AG `ag`.
    fn write_btree_block(
        img: &mut [u8],
        v5: bool,
        ag: u64,
        bno: u64,
        level: u16,
        n: usize,
        body: &[u8],
    ) {
        let magic = if v5 { BNOBT_MAGIC_V5 } else { BNOBT_MAGIC_V4 };
        write_tree_block(img, v5, magic, ag, bno, level, n, body);
    }

    /// Writes a short-form btree block with `magic`.
    #[allow(clippy::too_many_arguments)]
    fn write_tree_block(
        img: &mut [u8],
        v5: bool,
        magic: &[u8; 4],
        ag: u64,
        bno: u64,
        level: u16,
        n: usize,
        body: &[u8],
    ) {
        let o = ((ag * AGBLOCKS + bno) * BS) as usize;
        let b = &mut img[o..o + BS as usize];
        b.fill(0);
        put(b, 0, magic);
        put(b, 4, &level.to_be_bytes());
        put(b, 6, &(n as u16).to_be_bytes());
        put(b, 8, &u32::MAX.to_be_bytes());
        put(b, 12, &u32::MAX.to_be_bytes());
        put(b, hdr_len(v5), body);
        if v5 {
            put(b, 16, &(ag * AGBLOCKS + bno).to_be_bytes());
            put(b, 32, &[0x5A; 16]);
            put(b, 48, &(ag as u32).to_be_bytes());
            set_crc(b, BTREE_CRC_OFF);
        }
    }

    /// A tiny v4 or v5 XFS image: `ags` AGs of 64 blocks of 512 bytes (the last one
    /// `last_len` blocks), an internal log in AG 0 blocks 60..64, and in each AG the free
    /// extents `free(ag)` (none may touch blocks 0..9). With `split`, each AG's bnobt has two
    /// levels: leaves at blocks 4 and 5 (the records halved between them), the root at 8.
    fn image(
        v5: bool,
        ags: u64,
        last_len: u64,
        split: bool,
        free: &dyn Fn(u64) -> Vec<(u32, u32)>,
    ) -> Vec<u8> {
        let dblocks = (ags - 1) * AGBLOCKS + last_len;
        let mut img = vec![0u8; (dblocks * BS) as usize];
        {
            let sb = &mut img[0..512];
            put(sb, 0, MAGIC);
            put(sb, 4, &(BS as u32).to_be_bytes());
            put(sb, 8, &dblocks.to_be_bytes());
            put(sb, 32, &[0x5A; 16]);
            put(sb, 48, &60u64.to_be_bytes());
            put(sb, 84, &(AGBLOCKS as u32).to_be_bytes());
            put(sb, 88, &(ags as u32).to_be_bytes());
            put(sb, 96, &4u32.to_be_bytes());
            put(
                sb,
                100,
                &(if v5 { 0xB4A5u16 } else { 0xB4A4 }).to_be_bytes(),
            );
            put(sb, 102, &512u16.to_be_bytes());
            put(sb, 108, b"tiny");
            sb[120] = 9;
            sb[121] = 9;
            sb[124] = 6;
            // 256-byte inodes, two a block.
            put(sb, 104, &256u16.to_be_bytes());
            put(sb, 106, &2u16.to_be_bytes());
            sb[123] = 1;
            put(sb, 144, &10u64.to_be_bytes());
            if v5 {
                put(sb, 216, &0x3u32.to_be_bytes());
                set_crc(sb, SB_CRC_OFF);
            }
        }
        let sb0 = img[0..512].to_vec();
        let recs_body = |r: &[(u32, u32)]| -> Vec<u8> {
            r.iter()
                .flat_map(|(s, c)| [s.to_be_bytes(), c.to_be_bytes()].concat())
                .collect()
        };
        for ag in 0..ags {
            let len = if ag == ags - 1 { last_len } else { AGBLOCKS };
            let base = (ag * AGBLOCKS * BS) as usize;
            if ag > 0 {
                put(&mut img, base, &sb0);
            }
            let recs = free(ag);
            let (root, levels) = if split && recs.len() >= 2 {
                let (a, b) = recs.split_at(recs.len() / 2);
                write_btree_block(&mut img, v5, ag, 4, 0, a.len(), &recs_body(a));
                write_btree_block(&mut img, v5, ag, 5, 0, b.len(), &recs_body(b));
                let node_max = (BS as usize - hdr_len(v5)) / 12;
                let mut body = vec![0u8; node_max * 12];
                put(&mut body, 0, &a[0].0.to_be_bytes());
                put(&mut body, 8, &b[0].0.to_be_bytes());
                put(&mut body, 8 * node_max, &4u32.to_be_bytes());
                put(&mut body, 8 * node_max + 4, &5u32.to_be_bytes());
                write_btree_block(&mut img, v5, ag, 8, 1, 2, &body);
                (8u32, 2u32)
            } else {
                write_btree_block(&mut img, v5, ag, 4, 0, recs.len(), &recs_body(&recs));
                (4, 1)
            };
            // The by-size tree: one leaf at block 6.
            let mut by_size = recs.clone();
            by_size.sort_by_key(|&(s, c)| (c, s));
            let cnt_magic = if v5 { CNTBT_MAGIC_V5 } else { CNTBT_MAGIC_V4 };
            let body = recs_body(&by_size);
            write_tree_block(&mut img, v5, cnt_magic, ag, 6, 0, by_size.len(), &body);
            let agf = &mut img[base + 512..base + 1024];
            put(agf, 0, AGF_MAGIC);
            put(agf, 4, &1u32.to_be_bytes());
            put(agf, 8, &(ag as u32).to_be_bytes());
            put(agf, 12, &(len as u32).to_be_bytes());
            put(agf, 16, &root.to_be_bytes());
            put(agf, 20, &6u32.to_be_bytes());
            put(agf, 28, &levels.to_be_bytes());
            put(agf, 32, &1u32.to_be_bytes());
            // One block on the free list (block 9, in slot 0).
            put(agf, 48, &1u32.to_be_bytes());
            let total: u32 = recs.iter().map(|r| r.1).sum();
            put(agf, 52, &total.to_be_bytes());
            let longest = recs.iter().map(|r| r.1).max().unwrap_or(0);
            put(agf, 56, &longest.to_be_bytes());
            if v5 {
                put(agf, 64, &[0x5A; 16]);
                set_crc(agf, AGF_CRC_OFF);
            }
            // AGI: the inode btree root at block 7, an empty leaf.
            let ino_magic = if v5 { INOBT_MAGIC_V5 } else { INOBT_MAGIC_V4 };
            write_tree_block(&mut img, v5, ino_magic, ag, 7, 0, 0, &[]);
            let agi = &mut img[base + 1024..base + 1536];
            put(agi, 0, AGI_MAGIC);
            put(agi, 4, &1u32.to_be_bytes());
            put(agi, 8, &(ag as u32).to_be_bytes());
            put(agi, 12, &(len as u32).to_be_bytes());
            put(agi, 20, &7u32.to_be_bytes());
            put(agi, 24, &1u32.to_be_bytes());
            if v5 {
                put(agi, 296, &[0x5A; 16]);
                set_crc(agi, AGI_CRC_OFF);
            }
            let agfl = &mut img[base + 1536..base + 2048];
            let first = if v5 { AGFL_HDR_V5 } else { 0 };
            put(agfl, first, &9u32.to_be_bytes());
            if v5 {
                put(agfl, 0, AGFL_MAGIC);
                put(agfl, 4, &(ag as u32).to_be_bytes());
                put(agfl, 8, &[0x5A; 16]);
                set_crc(agfl, AGFL_CRC_OFF);
            }
        }
        img
    }

    /// Free: AG 0 blocks 20..40 and 45..60; AG 1 10..20 and 30..len; later AGs 10..len.
    fn sample_free(ag: u64, len: u64) -> Vec<(u32, u32)> {
        match ag {
            0 => vec![(20, 20), (45, 15)],
            1 => vec![(10, 10), (30, len as u32 - 30)],
            _ => vec![(10, len as u32 - 10)],
        }
    }

    fn sample(v5: bool, split: bool) -> Vec<u8> {
        image(v5, 3, 40, split, &|ag| {
            sample_free(ag, if ag == 2 { 40 } else { 64 })
        })
    }

    /// Writes a log of four basic blocks at AG 0 blocks 60..64: `cycles[i]` stamped on
    /// block i, a record header at block `rec` (one operation, one data block) whose
    /// operation has `flags`.
    fn write_log(img: &mut [u8], cycles: [u32; 4], rec: usize, flags: u8) {
        let log = 60 * 512;
        for (i, c) in cycles.iter().enumerate() {
            let b = &mut img[log + i * 512..log + (i + 1) * 512];
            b.fill(0);
            put(b, 0, &c.to_be_bytes());
        }
        let h = &mut img[log + rec * 512..log + (rec + 1) * 512];
        let cycle = cycles[rec];
        put(h, 0, &LOG_MAGIC.to_be_bytes());
        put(h, 4, &cycle.to_be_bytes());
        put(h, 8, &2u32.to_be_bytes());
        put(h, 12, &512u32.to_be_bytes());
        put(h, 16, &(u64::from(cycle) << 32 | rec as u64).to_be_bytes());
        put(h, 40, &1u32.to_be_bytes());
        put(h, 300, &1u32.to_be_bytes());
        put(h, 304, &[0x5A; 16]);
        put(h, 320, &32768u32.to_be_bytes());
        img[log + (rec + 1) * 512 + 9] = flags;
    }

    #[test]
    fn the_internal_log_must_end_with_an_unmount_record() {
        let cases: [([u32; 4], usize, u8, Option<&str>); 7] = [
            // First pass, rest of the log zeroed: head at block 2.
            ([1, 1, 0, 0], 0, 0x20, None),
            // Second pass: head at block 2, block 3 from the first pass.
            ([2, 2, 1, 1], 0, 0x20, None),
            // The whole log in one pass: the head wraps to block 0.
            ([3, 3, 3, 3], 2, 0x20, None),
            // A commit record, not an unmount record.
            ([1, 1, 0, 0], 0, 0x02, Some("not an unmount record")),
            // A write of the current pass past the record (in flight at a crash).
            ([2, 2, 2, 1], 0, 0x20, Some("not an unmount record")),
            // Cycles that no sequence of writes leaves.
            ([5, 5, 2, 2], 0, 0x20, Some("cycles 5 and 2")),
            // A later pass over a log whose end was never written.
            ([5, 5, 0, 0], 0, 0x20, None),
        ];
        for (cycles, rec, flags, want) in cases {
            for v5 in [false, true] {
                let mut img = sample(v5, false);
                write_log(&mut img, cycles, rec, flags);
                let vol = Mem(img);
                let sb = Superblock::read(&vol).unwrap().unwrap();
                match (allocation_map(&vol, &sb, BS), want) {
                    (Ok(_), None) => {}
                    (Err(e), Some(w)) => {
                        assert!(
                            e.contains("needs recovery") && e.contains(w),
                            "{cycles:?}: {e}"
                        )
                    }
                    (r, _) => panic!("{cycles:?}: {r:?}"),
                }
            }
        }
        // A hole in the current pass before the head.
        let mut img = sample(false, false);
        write_log(&mut img, [2, 2, 1, 1], 0, 0x20);
        put(&mut img, 60 * 512 + 512, &1u32.to_be_bytes());
        let vol = Mem(img);
        let sb = Superblock::read(&vol).unwrap().unwrap();
        let err = allocation_map(&vol, &sb, BS).unwrap_err();
        assert!(err.contains("needs recovery"), "{err}");
    }

    fn used_blocks(map: &BlockMap) -> Vec<u64> {
        (0..map.block_count()).filter(|&b| map.is_used(b)).collect()
    }

    /// Asserts that `good` edited by `edit`, its CRCs then recomputed, is refused with an error
    /// that mentions `want`.
    fn assert_edit_refused(
        good: &[u8],
        sb: &Superblock,
        want: &str,
        edit: impl FnOnce(&mut Vec<u8>),
    ) {
        let mut img = good.to_vec();
        edit(&mut img);
        recrc_all(&mut img);
        let err = allocation_map(&Mem(img), sb, BS).unwrap_err();
        assert!(err.contains(want), "{want}: {err}");
    }

    fn recrc_all(img: &mut [u8]) {
        set_crc(&mut img[0..512], SB_CRC_OFF);
        for ag in 0..img.len() / (64 * 512) {
            let base = ag * 64 * 512;
            if ag > 0 {
                set_crc(&mut img[base..base + 512], SB_CRC_OFF);
            }
            set_crc(&mut img[base + 512..base + 1024], AGF_CRC_OFF);
            set_crc(&mut img[base + 1024..base + 1536], AGI_CRC_OFF);
            set_crc(&mut img[base + 1536..base + 2048], AGFL_CRC_OFF);
            for b in [4, 5, 6, 7, 8] {
                let o = base + b * 512;
                if [BNOBT_MAGIC_V5, CNTBT_MAGIC_V5, INOBT_MAGIC_V5].contains(&&[
                    img[o],
                    img[o + 1],
                    img[o + 2],
                    img[o + 3],
                ]) {
                    set_crc(&mut img[o..o + 512], BTREE_CRC_OFF);
                }
            }
        }
    }

    #[test]
    fn map_is_the_complement_of_the_free_extents() {
        for v5 in [false, true] {
            for split in [false, true] {
                let vol = Mem(sample(v5, split));
                let sb = Superblock::read(&vol).unwrap().unwrap();
                let info = sb.info();
                assert_eq!(info.fs_type, "xfs");
                assert_eq!(info.label, "tiny");
                assert_eq!(info.uuid, "5a5a5a5a-5a5a-5a5a-5a5a-5a5a5a5a5a5a");
                assert_eq!(info.size, (2 * 64 + 40) * 512);
                assert_eq!(info.used_bytes, (2 * 64 + 40 - 10 - 4) * 512);
                let map = allocation_map(&vol, &sb, BS).unwrap();
                let want: Vec<u64> = (0..20)
                    .chain(40..45)
                    .chain(60..64)
                    .chain(64..74)
                    .chain(84..94)
                    .chain(128..138)
                    .collect();
                assert_eq!(used_blocks(&map), want, "v5 {v5}, split {split}");
                // At 4 KiB granularity (8 blocks a bit) partly used groups count as used.
                let map = allocation_map(&vol, &sb, 4096).unwrap();
                assert_eq!(
                    used_blocks(&map),
                    [0, 1, 2, 5, 7, 8, 9, 10, 11, 16, 17],
                    "v5 {v5}"
                );
            }
        }
    }

    #[test]
    fn bytes_past_the_filesystem_are_kept() {
        let mut img = sample(true, false);
        img.resize(img.len() + 3000, 0xEE);
        let vol = Mem(img);
        let sb = Superblock::read(&vol).unwrap().unwrap();
        let map = allocation_map(&vol, &sb, BS).unwrap();
        assert!((168..174).all(|b| map.is_used(b)));
        assert!(!map.is_used(167));
    }

    #[test]
    fn misordered_or_looping_trees_are_rejected() {
        for v5 in [false, true] {
            let good = sample(v5, true);
            let sb = Superblock::read(&Mem(good.clone())).unwrap().unwrap();
            let node = 64 * 512 + 8 * 512;
            let ptrs = node + hdr_len(v5) + (512 - hdr_len(v5)) / 12 * 8;
            // Children in the wrong order.
            assert_edit_refused(&good, &sb, "overlaps", |img| {
                put(img, ptrs, &5u32.to_be_bytes());
                put(img, ptrs + 4, &4u32.to_be_bytes());
            });
            // The same leaf twice.
            assert_edit_refused(&good, &sb, "overlaps", |img| {
                put(img, ptrs + 4, &4u32.to_be_bytes());
            });
            // A child pointing back at the node.
            assert_edit_refused(&good, &sb, "level 1, expected 0", |img| {
                put(img, ptrs, &8u32.to_be_bytes());
            });
            // A free extent over the AG headers.
            assert_edit_refused(&good, &sb, "headers", |img| {
                put(img, 64 * 512 + 4 * 512 + hdr_len(v5), &1u32.to_be_bytes());
            });
        }
    }

    #[test]
    fn damage_is_reported() {
        let good = sample(true, false);
        let sb = Superblock::read(&Mem(good.clone())).unwrap().unwrap();
        let cases: [(usize, &str); 5] = [
            (64 * 512 + 512 + 100, "checksum"),
            (4 * 512 + 60, "checksum"),
            (64 * 512 + 512, "magic"),
            (200, "checksum"),
            (4 * 512, "magic"),
        ];
        for (at, want) in cases {
            let mut img = good.clone();
            img[at] ^= 0x40;
            let err = allocation_map(&Mem(img), &sb, BS).unwrap_err();
            assert!(err.contains(want), "byte {at}: {err}");
        }
        let mut img = good.clone();
        img.truncate(100 * 512);
        let err = allocation_map(&Mem(img), &sb, BS).unwrap_err();
        assert!(err.contains("spans"), "{err}");
        // The AGF's free count must match the tree's.
        assert_edit_refused(&good, &sb, "counts 36", |img| {
            put(img, 512 + 52, &36u32.to_be_bytes());
        });
        // Unknown incompatible features.
        let mut img = good;
        put(&mut img, 216, &0x8003u32.to_be_bytes());
        recrc_all(&mut img);
        let vol = Mem(img);
        let sb = Superblock::read(&vol).unwrap().unwrap();
        let err = allocation_map(&vol, &sb, BS).unwrap_err();
        assert!(err.contains("0x8000"), "{err}");
    }

    #[test]
    fn free_extents_over_what_is_in_use_are_rejected() {
        // (AG 0's free extents, what the error must name)
        let cases: [(Vec<(u32, u32)>, &str); 4] = [
            // Over the internal log (blocks 60..64).
            (vec![(20, 20), (45, 16)], "covers blocks 60..64"),
            // Over the inode btree root (block 7).
            (vec![(7, 1), (20, 20)], "covers blocks 7..8"),
            // Over the block on the free list (block 9).
            (vec![(9, 2), (20, 20)], "covers blocks 9..10"),
            // Over the by-size tree's root (block 6).
            (vec![(6, 1), (20, 20)], "covers blocks 6..7"),
        ];
        for (recs, want) in cases {
            for v5 in [false, true] {
                let img = image(v5, 3, 40, false, &|ag| {
                    if ag == 0 {
                        recs.clone()
                    } else {
                        sample_free(ag, if ag == 2 { 40 } else { 64 })
                    }
                });
                let vol = Mem(img);
                let sb = Superblock::read(&vol).unwrap().unwrap();
                let err = allocation_map(&vol, &sb, BS).unwrap_err();
                assert!(err.contains(want), "{want}: {err}");
            }
        }
    }

    #[test]
    fn the_free_space_btrees_and_the_agf_must_agree() {
        for v5 in [false, true] {
            let good = sample(v5, false);
            let sb = Superblock::read(&Mem(good.clone())).unwrap().unwrap();
            let leaf = 4 * 512 + hdr_len(v5);
            let cnt_leaf = 6 * 512 + hdr_len(v5);
            // A bnobt record claims 2 more blocks, the AGF agrees: the by-size tree does not.
            assert_edit_refused(&good, &sb, "not in the by-block", |img| {
                put(img, leaf + 4, &22u32.to_be_bytes());
                put(img, 512 + 52, &37u32.to_be_bytes());
                put(img, 512 + 56, &22u32.to_be_bytes());
            });
            // The AGF's longest extent.
            assert_edit_refused(&good, &sb, "longest free extent is 20", |img| {
                put(img, 512 + 56, &19u32.to_be_bytes());
            });
            // The by-size tree misses an extent.
            assert_edit_refused(&good, &sb, "2 extents by block, 1 by size", |img| {
                put(img, 6 * 512 + 6, &1u16.to_be_bytes());
            });
            // Out of order by size.
            assert_edit_refused(&good, &sb, "out of order", |img| {
                let (a, b) = (
                    img[cnt_leaf..cnt_leaf + 8].to_vec(),
                    img[cnt_leaf + 8..cnt_leaf + 16].to_vec(),
                );
                put(img, cnt_leaf, &b);
                put(img, cnt_leaf + 8, &a);
            });
            // AGI and AGFL damage, and a free list that does not fit its slots.
            for (at, want) in [
                (1024, "AGI of AG 0: bad magic"),
                (512 + 40, "free list first"),
                (64 * 512 + 1024 + 20, "inode btree root"),
            ] {
                assert_edit_refused(&good, &sb, want, |img| {
                    img[at] ^= 0x40;
                });
            }
            // A superblock copy that disagrees with the primary.
            assert_edit_refused(&good, &sb, "superblock copy of AG 2", |img| {
                img[2 * 64 * 512 + 86] ^= 1;
            });
            if v5 {
                for at in [1024 + 100, 1536 + 100, 64 * 512 + 100, 6 * 512 + 100] {
                    let mut img = good.clone();
                    img[at] ^= 1;
                    let err = allocation_map(&Mem(img), &sb, BS).unwrap_err();
                    assert!(err.contains("checksum mismatch"), "{at}: {err}");
                }
            }
        }
    }

    /// An image whose AG 1 holds one inode chunk at blocks 32..64 (AG inodes 64..128) with
    /// only inode 192 (the chunk's first) in use: a regular file in extents format whose one
    /// extent is AG 0 blocks 40..40+`count`. AG 1's free extents are `ag1_free`.
    fn image_with_inode(v5: bool, ag1_free: Vec<(u32, u32)>, count: u64) -> Vec<u8> {
        let mut img = image(v5, 3, 40, false, &|ag| match ag {
            1 => ag1_free.clone(),
            _ => sample_free(ag, if ag == 2 { 40 } else { 64 }),
        });
        let mut rec = Vec::new();
        rec.extend(64u32.to_be_bytes());
        rec.extend(63u32.to_be_bytes());
        rec.extend((!1u64).to_be_bytes());
        let magic = if v5 { INOBT_MAGIC_V5 } else { INOBT_MAGIC_V4 };
        write_tree_block(&mut img, v5, magic, 1, 7, 0, 1, &rec);
        let o = ((64 + 32) * BS) as usize;
        let d = &mut img[o..o + 256];
        put(d, 0, DINODE_MAGIC);
        put(d, 2, &0o100644u16.to_be_bytes());
        d[4] = if v5 { 3 } else { 2 };
        d[5] = 2;
        put(d, 76, &1u32.to_be_bytes());
        if v5 {
            put(d, 152, &192u64.to_be_bytes());
        }
        let lit = if v5 { 176 } else { 100 };
        // startoff 0, startblock 40, blockcount `count`.
        let l1 = (40u64 << 21) | count;
        put(d, lit + 8, &l1.to_be_bytes());
        img
    }

    #[test]
    fn free_extents_over_what_inodes_use_are_rejected() {
        for v5 in [false, true] {
            let vol = Mem(image_with_inode(v5, vec![(10, 22)], 5));
            let sb = Superblock::read(&vol).unwrap().unwrap();
            allocation_map(&vol, &sb, BS).unwrap();
            // The file's extent runs into AG 0's free extent at 45.
            let vol = Mem(image_with_inode(v5, vec![(10, 22)], 6));
            let err = allocation_map(&vol, &sb, BS).unwrap_err();
            assert!(
                err.contains("AG 0 lists block 45 free") && err.contains("inode 192 uses it"),
                "{err}"
            );
            // The inode chunk itself in a free extent.
            let vol = Mem(image_with_inode(v5, vec![(10, 10), (30, 34)], 5));
            let err = allocation_map(&vol, &sb, BS).unwrap_err();
            assert!(err.contains("hold inodes 64..68"), "{err}");
            // An in-use inode without its magic.
            let mut img = image_with_inode(v5, vec![(10, 22)], 5);
            img[(96 * BS) as usize] = 0;
            let err = allocation_map(&Mem(img), &sb, BS).unwrap_err();
            assert!(err.contains("inode 192 is in use"), "{err}");
        }
    }

    /// Turns inode 192 of [`image_with_inode`] into a btree-format file: the root in its
    /// fork points at a bmbt leaf at AG 0 block `leaf` whose one extent is AG 0 blocks
    /// 41..41+`count`.
    fn with_bmbt(img: &mut [u8], v5: bool, leaf: u64, count: u64) {
        let o = ((64 + 32) * BS) as usize;
        let lit = if v5 { 176 } else { 100 };
        let d = &mut img[o..o + 256];
        d[5] = 3;
        d[lit..].fill(0);
        let root_max = (256 - lit - 4) / 16;
        put(d, lit, &1u16.to_be_bytes());
        put(d, lit + 2, &1u16.to_be_bytes());
        put(d, lit + 4 + root_max * 8, &leaf.to_be_bytes());
        let b = &mut img[(leaf * BS) as usize..((leaf + 1) * BS) as usize];
        b.fill(0);
        put(b, 0, if v5 { BMBT_MAGIC_V5 } else { BMBT_MAGIC_V4 });
        put(b, 6, &1u16.to_be_bytes());
        let hdr = if v5 { LBTREE_HDR_V5 } else { LBTREE_HDR_V4 };
        put(b, hdr + 8, &((41u64 << 21) | count).to_be_bytes());
        if v5 {
            put(b, 24, &leaf.to_be_bytes());
            put(b, 40, &[0x5A; 16]);
            put(b, 56, &192u64.to_be_bytes());
            set_crc(b, LBTREE_CRC_OFF);
        }
    }

    #[test]
    fn free_extents_over_a_block_mapping_btree_are_rejected() {
        for v5 in [false, true] {
            let sb = Superblock::read(&Mem(sample(v5, false))).unwrap().unwrap();
            let mut img = image_with_inode(v5, vec![(10, 22)], 5);
            with_bmbt(&mut img, v5, 40, 4);
            allocation_map(&Mem(img), &sb, BS).unwrap();
            // The leaf's extent runs into the free extent at 45.
            let mut img = image_with_inode(v5, vec![(10, 22)], 5);
            with_bmbt(&mut img, v5, 40, 5);
            let err = allocation_map(&Mem(img), &sb, BS).unwrap_err();
            assert!(err.contains("lists block 45 free"), "{err}");
            // The leaf itself in free space.
            let mut img = image_with_inode(v5, vec![(10, 22)], 5);
            with_bmbt(&mut img, v5, 50, 4);
            let err = allocation_map(&Mem(img), &sb, BS).unwrap_err();
            assert!(err.contains("data fork btree block 50+1"), "{err}");
            if v5 {
                let mut img = image_with_inode(v5, vec![(10, 22)], 5);
                with_bmbt(&mut img, v5, 40, 4);
                img[40 * 512 + 100] ^= 1;
                let err = allocation_map(&Mem(img), &sb, BS).unwrap_err();
                assert!(err.contains("checksum mismatch"), "{err}");
            }
        }
    }

    #[test]
    fn probe_keeps_the_map_and_notes_a_realtime_section() {
        let mut img = sample(false, false);
        put(&mut img, 16, &1000u64.to_be_bytes());
        let p = crate::fs::probe(&Mem(img.clone()), 4096).unwrap();
        assert_eq!(p.fs.unwrap().fs_type, "xfs");
        assert!(p.map.is_some());
        assert!(
            p.warning
                .unwrap()
                .contains("realtime section of 1000 blocks")
        );
        // A damaged AGF: no map, and the reason.
        img[512] = 0;
        let p = crate::fs::probe(&Mem(img), 4096).unwrap();
        assert!(p.map.is_none());
        let w = p.warning.unwrap();
        assert!(
            w.starts_with("xfs allocation data is unusable (AGF of AG 0: bad magic)"),
            "{w}"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]
        /// Mutated valid images never panic, hang or allocate wildly; with their checksums
        /// recomputed, the mutations reach every parser.
        #[test]
        fn mutated_images_never_panic(
            v5 in any::<bool>(),
            split in any::<bool>(),
            // (AG, block: 0 superblock, 1 AGF, 2 AGI, 3 AGFL, 4 and 5 leaves, 6 by-size
            // leaf, 7 inode btree leaf, 8 node, 60..64 log; byte;
            // value)
            patch in proptest::collection::vec(
                (0u64..3, prop::sample::select(vec![0u64, 1, 2, 3, 4, 5, 6, 7, 8, 60, 61, 62, 63]), 0usize..512, any::<u8>()),
                1..12,
            ),
            recrc in any::<bool>(),
            gran in prop_oneof![Just(512u64), Just(4096), Just(65536)],
        ) {
            let mut img = sample(v5, split);
            write_log(&mut img, [2, 2, 1, 1], 0, 0x20);
            for (ag, block, at, v) in patch {
                let o = ((ag * AGBLOCKS + block) * BS) as usize + at;
                if o < img.len() {
                    img[o] = v;
                }
            }
            if v5 && recrc {
                recrc_all(&mut img);
            }
            let vol = Mem(img);
            if let Ok(Some(sb)) = Superblock::read(&vol) {
                let _ = sb.info();
                if let Ok(map) = allocation_map(&vol, &sb, gran) {
                    prop_assert!(map.used_blocks() <= map.block_count());
                }
            }
        }

        /// Random bytes behind an XFS magic never panic.
        #[test]
        fn random_superblocks_never_panic(
            mut bytes in proptest::collection::vec(any::<u8>(), 512..70_000),
        ) {
            bytes[0..4].copy_from_slice(MAGIC);
            let vol = Mem(bytes);
            if let Ok(Some(sb)) = Superblock::read(&vol) {
                let _ = allocation_map(&vol, &sb, 4096);
            }
        }
    }
}
