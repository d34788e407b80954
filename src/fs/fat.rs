//! FAT12, FAT16 and FAT32: the BIOS parameter block, the file allocation table and the root
//! directory.
//!
//! Layout facts used here (all little-endian), from Microsoft's FAT specification:
//! - Boot sector: jump instruction @0 (`EB xx 90` or `E9`), bytes/sector u16 @0x0B,
//!   sectors/cluster u8 @0x0D, reserved sectors u16 @0x0E, FAT count u8 @0x10, root directory
//!   entries u16 @0x11 (0 on FAT32), total sectors u16 @0x13 (0: u32 @0x20), media u8 @0x15,
//!   sectors per FAT u16 @0x16 (0 on FAT32: u32 @0x24). FAT32 only: extended flags u16 @0x28
//!   (bit 7: only one FAT is active, bits 0–3: which), root directory cluster u32 @0x2C,
//!   FSInfo sector u16 @0x30. Extended BPB (signature 0x29 or 0x28, then serial u32 and, with
//!   0x29, label[11]) @0x26 on FAT12/16, @0x42 on FAT32.
//! - Regions in order: reserved sectors (boot sector, FSInfo and the backup boot sector on
//!   FAT32), the FATs, the fixed root directory (FAT12/16: entries × 32 bytes, rounded up to a
//!   sector), then the data clusters, numbered from 2. The type follows from the cluster
//!   count: FAT12 below 4085, FAT16 below 65525, FAT32 when sectors per FAT (u16) is 0.
//! - FAT entry of cluster `c`: 12, 16 or 28 (of 32) bits. 0 = free, 2..=max = next cluster,
//!   bad cluster 0xFF7 / 0xFFF7 / 0x0FFFFFF7, end of chain from 0xFF8 / 0xFFF8 /
//!   0x0FFFFFF8. FAT12 packs two entries in three bytes (even entry: low 12 bits of the u16 at
//!   `c × 3 / 2`, odd entry: its high 12 bits).
//! - Directory entry (32 bytes): name[11] @0 (0x00: end, 0xE5: deleted, 0x05: a name starting
//!   with 0xE5), attributes @11 (0x08 volume label, 0x0F long-name part).
//!
//! The map keeps everything before the data clusters, every cluster whose entry in the active
//! FAT is not zero (bad clusters excepted: they hold nothing and may not even be readable), and
//! everything after the last cluster. The FAT is trusted only when it looks sound: every copy
//! equal to the active one (unless FAT32 mirroring is off), FAT\[0\] carrying the media byte,
//! every entry free, bad, end of chain or a cluster of the volume, and the FAT32 root
//! directory's chain allocated. Anything else makes the map unusable (the caller then reads
//! every block).

use super::alloc::{self, PIECE, UsedRuns, with_used_bytes};
use super::exfat::EXFAT_OEM;
use super::ntfs::NTFS_OEM;
use super::{BlockMap, FsInfo};
use crate::bytes::{le_u16 as u16_at, le_u32 as u32_at};
use crate::error::Result;
use crate::fs::check::{Checked, bad};
use crate::volume::Volume;

/// Largest root directory span scanned for the volume label.
const DIR_SCAN_LIMIT: u64 = 1 << 20;
/// Highest cluster counts of FAT12 and FAT16 (more would collide with the marker values).
const FAT12_MAX_CLUSTERS: u64 = 4084;
const FAT16_MAX_CLUSTERS: u64 = 65524;
const FAT32_MAX_CLUSTERS: u64 = 0x0FFF_FFF5;
/// FSInfo signatures.
const FSINFO_LEAD: &[u8; 4] = b"RRaA";
const FSINFO_STRUCT: &[u8; 4] = b"rrAa";

/// The BIOS parameter block of a FAT volume.
#[derive(Debug, Clone)]
pub struct Bpb {
    pub sector: u64,
    pub cluster: u64,
    pub reserved: u64,
    pub fats: u64,
    pub fat_sectors: u64,
    pub root_entries: u64,
    pub total_sectors: u64,
    /// Data clusters (numbered 2 to `clusters + 1`).
    pub clusters: u64,
    /// 12, 16 or 32.
    pub bits: u32,
    /// The media descriptor, repeated in the low byte of FAT\[0\].
    media: u8,
    /// FAT32: first cluster of the root directory.
    root_cluster: u64,
    /// FAT32: FSInfo sector (0: none).
    fsinfo: u64,
    /// FAT32: the only active FAT when mirroring is off.
    active_fat: Option<u64>,
    serial: Option<u32>,
    boot_label: Option<String>,
}

impl Bpb {
    /// Parses sector 0; `None` when it is not a plausible FAT boot sector.
    pub fn parse(h: &[u8]) -> Option<Bpb> {
        if h.len() < 512 {
            return None;
        }
        let jump_ok = (h[0] == 0xEB && h[2] == 0x90) || h[0] == 0xE9;
        let id_ok = &h[0x36..0x39] == b"FAT" || &h[0x52..0x57] == b"FAT32";
        let sig_ok = h[510] == 0x55 && h[511] == 0xAA;
        if !jump_ok || !(sig_ok || id_ok) {
            return None;
        }
        if h[3..11] == *NTFS_OEM || h[3..11] == *EXFAT_OEM {
            return None;
        }
        let sector = u64::from(u16_at(h, 0x0B));
        let spc = u64::from(h[0x0D]);
        let reserved = u64::from(u16_at(h, 0x0E));
        let fats = u64::from(h[0x10]);
        let root_entries = u64::from(u16_at(h, 0x11));
        let media = h[0x15];
        if !matches!(sector, 512 | 1024 | 2048 | 4096)
            || spc == 0
            || !spc.is_power_of_two()
            || reserved == 0
            || !(1..=4).contains(&fats)
            || !(media == 0xF0 || media >= 0xF8)
        {
            return None;
        }
        let total16 = u64::from(u16_at(h, 0x13));
        let total_sectors = if total16 != 0 {
            total16
        } else {
            u64::from(u32_at(h, 0x20))
        };
        let fat16_len = u64::from(u16_at(h, 0x16));
        let fat_sectors = if fat16_len != 0 {
            fat16_len
        } else {
            u64::from(u32_at(h, 0x24))
        };
        if total_sectors == 0 || fat_sectors == 0 {
            return None;
        }
        let root_sectors = (root_entries * 32).div_ceil(sector);
        let meta = reserved + fats * fat_sectors + root_sectors;
        let data = total_sectors.checked_sub(meta)?;
        let clusters = data / spc;
        let bits = if fat16_len == 0 {
            if root_entries != 0 {
                return None;
            }
            32
        } else if clusters <= FAT12_MAX_CLUSTERS {
            12
        } else {
            16
        };
        // The FAT must be big enough for its clusters.
        let fat_bytes = fat_sectors * sector;
        if (clusters + 2) * u64::from(bits) / 8 > fat_bytes {
            return None;
        }
        let ebpb = if bits == 32 { 0x42 } else { 0x26 };
        let (mut serial, mut boot_label) = (None, None);
        if h[ebpb] == 0x29 || h[ebpb] == 0x28 {
            serial = Some(u32_at(h, ebpb + 1));
            if h[ebpb] == 0x29 {
                let l = String::from_utf8_lossy(&h[ebpb + 5..ebpb + 16])
                    .trim_end()
                    .to_string();
                if !l.is_empty() && l != "NO NAME" {
                    boot_label = Some(l);
                }
            }
        }
        let (root_cluster, fsinfo, active_fat) = if bits == 32 {
            let flags = u16_at(h, 0x28);
            (
                u64::from(u32_at(h, 0x2C)),
                u64::from(u16_at(h, 0x30)),
                (flags & 0x80 != 0).then_some(u64::from(flags & 0x0F)),
            )
        } else {
            (0, 0, None)
        };
        Some(Bpb {
            sector,
            cluster: sector * spc,
            reserved,
            fats,
            fat_sectors,
            root_entries,
            total_sectors,
            clusters,
            bits,
            media,
            root_cluster,
            fsinfo,
            active_fat,
            serial,
            boot_label,
        })
    }

    /// Reads and parses sector 0 of `vol`.
    pub fn read(vol: &dyn Volume) -> Result<Option<Bpb>> {
        Ok(super::alloc::boot_sector(vol)?.and_then(|h| Bpb::parse(&h)))
    }

    /// "FAT12", "FAT16" or "FAT32", as `blkid` calls the version.
    pub fn version(&self) -> String {
        format!("FAT{}", self.bits)
    }

    /// The serial number as `blkid` prints it (`XXXX-XXXX`); `None` without an extended BPB.
    pub fn uuid(&self) -> Option<String> {
        self.serial
            .map(|s| format!("{:04X}-{:04X}", s >> 16, s & 0xFFFF))
    }

    /// Bytes the filesystem spans (at most 2^32 sectors of 4 KiB: no overflow).
    pub fn size(&self) -> u64 {
        self.total_sectors * self.sector
    }

    /// Index of the FAT the filesystem reads.
    fn active_fat(&self) -> u64 {
        self.active_fat.unwrap_or(0)
    }

    fn fat_offset(&self, index: u64) -> u64 {
        (self.reserved + index * self.fat_sectors) * self.sector
    }

    fn root_dir_offset(&self) -> u64 {
        (self.reserved + self.fats * self.fat_sectors) * self.sector
    }

    /// First byte of cluster 2.
    fn data_offset(&self) -> u64 {
        self.root_dir_offset() + (self.root_entries * 32).div_ceil(self.sector) * self.sector
    }

    fn in_range(&self, c: u64) -> bool {
        (2..self.clusters + 2).contains(&c)
    }

    /// The FAT32 entry of cluster `c` (its low 28 bits) in the active FAT.
    fn fat32_entry(&self, vol: &dyn Volume, c: u64) -> Checked<u32> {
        let mut b = [0u8; 4];
        alloc::read(
            vol,
            self.fat_offset(self.active_fat()) + c * 4,
            &mut b,
            "FAT entry",
        )?;
        Ok(u32_at(&b, 0) & 0x0FFF_FFFF)
    }

    /// The next cluster of a FAT32 chain; `None` at its end or on a bad entry.
    fn fat32_next(&self, vol: &dyn Volume, c: u64) -> Checked<Option<u64>> {
        let n = u64::from(self.fat32_entry(vol, c)?);
        Ok(self.in_range(n).then_some(n))
    }

    /// Bytes of a FAT that hold entries (clusters 0 to `clusters + 1`).
    fn fat_bytes_used(&self) -> u64 {
        ((self.clusters + 2) * u64::from(self.bits)).div_ceil(8)
    }

    /// Checks that every FAT copy equals the active one over the bytes holding entries (as
    /// `fsck.fat` compares them). FAT32 with mirroring turned off keeps the others stale on
    /// purpose: not compared.
    fn check_copies(&self, vol: &dyn Volume) -> Checked<()> {
        if self.active_fat.is_some() || self.fats < 2 {
            return Ok(());
        }
        let need = self.fat_bytes_used();
        let mut a = vec![0u8; PIECE.min(need) as usize];
        let mut b = a.clone();
        let mut pos = 0u64;
        while pos < need {
            let n = PIECE.min(need - pos) as usize;
            alloc::read(vol, self.fat_offset(0) + pos, &mut a[..n], "FAT 1")?;
            for k in 1..self.fats {
                alloc::read(vol, self.fat_offset(k) + pos, &mut b[..n], "a FAT copy")?;
                if let Some(i) = (0..n).find(|&i| a[i] != b[i]) {
                    return Err(bad!(
                        "FAT 1 and FAT {} differ at byte {}",
                        k + 1,
                        pos + i as u64
                    ));
                }
            }
            pos += n as u64;
        }
        Ok(())
    }

    /// Checks that FAT\[0\] holds the media byte with every other bit set.
    fn check_media(&self, vol: &dyn Volume) -> Checked<()> {
        let mut b = [0u8; 4];
        alloc::read(vol, self.fat_offset(self.active_fat()), &mut b, "FAT[0]")?;
        let (v, want) = match self.bits {
            12 => (
                u32::from(u16_at(&b, 0)) & 0xFFF,
                0xF00 | u32::from(self.media),
            ),
            16 => (u32::from(u16_at(&b, 0)), 0xFF00 | u32::from(self.media)),
            _ => (
                u32_at(&b, 0) & 0x0FFF_FFFF,
                0x0FFF_FF00 | u32::from(self.media),
            ),
        };
        if v != want {
            return Err(bad!(
                "FAT[0] is {v:#x}, not {want:#x} for media byte {:#04x}",
                self.media
            ));
        }
        Ok(())
    }

    /// Checks that FAT32's root directory is an allocated chain of clusters of the volume,
    /// without a loop.
    fn check_root_chain(&self, vol: &dyn Volume) -> Checked<()> {
        if self.bits != 32 {
            return Ok(());
        }
        let (bad, eoc) = self.markers();
        let mut c = self.root_cluster;
        // A chain longer than the clusters loops.
        for _ in 0..=self.clusters {
            if !self.in_range(c) {
                return Err(bad!(
                    "the root directory's chain reaches cluster {c:#x}, outside the clusters"
                ));
            }
            let v = self.fat32_entry(vol, c)?;
            if v == 0 || v == bad {
                return Err(bad!(
                    "the root directory's cluster {c} is marked {} in the FAT",
                    if v == 0 { "free" } else { "bad" }
                ));
            }
            if v >= eoc {
                return Ok(());
            }
            c = u64::from(v);
        }
        Err(bad!("the root directory's chain loops"))
    }

    /// The root directory bytes (at most [`DIR_SCAN_LIMIT`]), up to its end marker.
    fn root_dir(&self, vol: &dyn Volume) -> Checked<Vec<u8>> {
        if self.bits != 32 {
            let mut b = vec![0u8; (self.root_entries * 32).min(DIR_SCAN_LIMIT) as usize];
            alloc::read(vol, self.root_dir_offset(), &mut b, "root directory")?;
            return Ok(b);
        }
        let mut out = Vec::new();
        let mut c = Some(self.root_cluster).filter(|&c| self.in_range(c));
        while let Some(cl) = c {
            if out.len() as u64 >= DIR_SCAN_LIMIT {
                break;
            }
            let take = self.cluster.min(DIR_SCAN_LIMIT - out.len() as u64);
            let mut b = vec![0u8; take as usize];
            alloc::read(
                vol,
                self.data_offset() + (cl - 2) * self.cluster,
                &mut b,
                "root directory",
            )?;
            let end = b.chunks_exact(32).any(|e| e[0] == 0);
            out.extend_from_slice(&b);
            if end {
                break;
            }
            c = self.fat32_next(vol, cl)?;
        }
        Ok(out)
    }

    /// The volume label: the root directory's label entry, else the boot sector's (as
    /// Windows and `blkid` read it).
    pub fn label(&self, vol: &dyn Volume) -> Option<String> {
        let dir = self.root_dir(vol).unwrap_or_default();
        for e in dir.chunks_exact(32) {
            if e[0] == 0 {
                break;
            }
            if e[0] == 0xE5 || e[11] & 0x3F == 0x0F || e[11] & 0x08 == 0 {
                continue;
            }
            let mut raw = e[0..11].to_vec();
            if raw[0] == 0x05 {
                raw[0] = 0xE5;
            }
            let l = String::from_utf8_lossy(&raw).trim_end().to_string();
            if !l.is_empty() {
                return Some(l);
            }
            break;
        }
        self.boot_label.clone()
    }

    /// FAT32's FSInfo free-cluster count, when present and plausible (it is only a hint).
    pub fn fsinfo_free(&self, vol: &dyn Volume) -> Option<u64> {
        if self.bits != 32 || self.fsinfo == 0 || self.fsinfo >= self.reserved {
            return None;
        }
        let mut s = vec![0u8; 512];
        alloc::read(vol, self.fsinfo * self.sector, &mut s, "FSInfo").ok()?;
        if &s[0..4] != FSINFO_LEAD || &s[484..488] != FSINFO_STRUCT {
            return None;
        }
        let free = u64::from(u32_at(&s, 488));
        (free <= self.clusters).then_some(free)
    }

    /// Calls `f(cluster, entry)` for every data cluster, in order, with its entry in the
    /// active FAT (FAT32: the low 28 bits). Reads the FAT in pieces; refuses a FAT bigger
    /// than `limit` bytes.
    fn walk_fat(
        &self,
        vol: &dyn Volume,
        limit: u64,
        mut f: impl FnMut(u64, u32) -> Checked<()>,
    ) -> Checked<()> {
        let bits = u64::from(self.bits);
        let need = self.fat_bytes_used();
        if need > limit {
            return Err(bad!(
                "the FAT of {need} bytes is over the {limit}-byte limit"
            ));
        }
        if self.active_fat() >= self.fats {
            return Err(bad!(
                "the active FAT is number {} of {}",
                self.active_fat(),
                self.fats
            ));
        }
        let fat = self.fat_offset(self.active_fat());
        // A multiple of 3 bytes (two FAT12 entries) and of 4 (one FAT32 entry).
        let piece = PIECE / 12 * 12;
        let mut buf = vec![0u8; piece.min(need) as usize];
        let mut pos = 0u64;
        while pos < need {
            let n = piece.min(need - pos) as usize;
            alloc::read(vol, fat + pos, &mut buf[..n], "FAT")?;
            let b = &buf[..n];
            let first = pos * 8 / bits;
            let count = n as u64 * 8 / bits;
            for i in 0..count {
                let c = first + i;
                if !self.in_range(c) {
                    continue;
                }
                let at = match self.bits {
                    12 => i * 3 / 2,
                    16 => i * 2,
                    _ => i * 4,
                } as usize;
                let v = match (self.bits, b.get(at..at + 4), b.get(at..at + 2)) {
                    (12, _, Some(w)) => {
                        let w = u16_at(w, 0);
                        u32::from(if i % 2 == 0 { w & 0xFFF } else { w >> 4 })
                    }
                    (16, _, Some(w)) => u32::from(u16_at(w, 0)),
                    (32, Some(w), _) => u32_at(w, 0) & 0x0FFF_FFFF,
                    _ => return Err(bad!("FAT entry of cluster {c} is cut short")),
                };
                f(c, v)?;
            }
            pos += n as u64;
        }
        Ok(())
    }

    /// Free clusters counted in the active FAT (reading at most `limit` bytes of it).
    pub fn count_free(&self, vol: &dyn Volume, limit: u64) -> Checked<u64> {
        let mut free = 0u64;
        self.walk_fat(vol, limit, |_, v| {
            free += u64::from(v == 0);
            Ok(())
        })?;
        Ok(free)
    }

    /// The bad-cluster marker and the first end-of-chain value.
    fn markers(&self) -> (u32, u32) {
        match self.bits {
            12 => (0xFF7, 0xFF8),
            16 => (0xFFF7, 0xFFF8),
            _ => (0x0FFF_FFF7, 0x0FFF_FFF8),
        }
    }
}

/// Builds the allocation map of a FAT volume at `granularity` bytes per bit, with the number
/// of clusters in use. `Err` explains why the filesystem's data cannot be trusted.
pub fn allocation_map(vol: &dyn Volume, bpb: &Bpb, granularity: u64) -> Checked<(BlockMap, u64)> {
    let max = match bpb.bits {
        12 => FAT12_MAX_CLUSTERS,
        16 => FAT16_MAX_CLUSTERS,
        _ => FAT32_MAX_CLUSTERS,
    };
    if bpb.clusters > max {
        return Err(bad!(
            "{} clusters are too many for {}",
            bpb.clusters,
            bpb.version()
        ));
    }
    if bpb.size() > vol.size() {
        return Err(bad!(
            "the filesystem spans {} bytes but the volume has only {}",
            bpb.size(),
            vol.size()
        ));
    }
    if bpb.bits == 32 && !bpb.in_range(bpb.root_cluster) {
        return Err(bad!(
            "the root directory starts at cluster {}, outside the clusters",
            bpb.root_cluster
        ));
    }
    // Validation before trusting the FAT (the entries themselves are checked in the walk).
    if bpb.active_fat() >= bpb.fats {
        return Err(bad!(
            "the active FAT is number {} of {}",
            bpb.active_fat(),
            bpb.fats
        ));
    }
    bpb.check_media(vol)?;
    bpb.check_copies(vol)?;
    bpb.check_root_chain(vol)?;
    let data = bpb.data_offset();
    // `Bpb::parse` checked that the metadata and the clusters fit in the total sectors.
    let data_end = data + bpb.clusters * bpb.cluster;
    let mut map = BlockMap::new(vol.size(), granularity);
    // Boot sector, FSInfo, backup boot sector, every FAT copy, the FAT12/16 root directory.
    map.mark_bytes(0, data);
    // Sectors after the last whole cluster and anything past the filesystem.
    map.mark_bytes(data_end, vol.size() - data_end);
    let (bad, eoc) = bpb.markers();
    let mut used = UsedRuns::new(Some(&mut map), data, bpb.cluster);
    bpb.walk_fat(vol, u64::MAX, |c, v| {
        if v == 0 || v == bad {
            return Ok(());
        }
        if v < eoc && !bpb.in_range(u64::from(v)) {
            return Err(bad!(
                "the FAT entry of cluster {c} is {v:#x}, outside the {} clusters",
                bpb.clusters
            ));
        }
        used.add(c - 2, 1);
        Ok(())
    })?;
    let n = used.finish();
    Ok((map, n))
}

/// Recognises FAT12/16/32 on `vol`: its description and its allocation map (or why there is
/// none).
pub fn probe(vol: &dyn Volume, granularity: u64) -> Result<Option<(FsInfo, Checked<BlockMap>)>> {
    let Some(bpb) = Bpb::read(vol)? else {
        return Ok(None);
    };
    let map = allocation_map(vol, &bpb, granularity);
    let info = FsInfo {
        fs_type: "vfat".into(),
        version: Some(bpb.version()),
        uuid: bpb.uuid().unwrap_or_default(),
        label: bpb.label(vol).unwrap_or_default(),
        block_size: bpb.cluster as u32,
        size: bpb.size(),
        used_bytes: 0, // set from the FAT
    };
    Ok(Some(with_used_bytes(info, map, bpb.cluster)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::tests::{Mem, assert_refused};
    use proptest::prelude::*;

    fn put(img: &mut [u8], at: usize, bytes: &[u8]) {
        img[at..at + bytes.len()].copy_from_slice(bytes);
    }

    /// A 2 MiB FAT12 volume: 512-byte sectors, 4 sectors per cluster, 1 reserved sector, two
    /// FATs of 3 sectors, 64 root entries (4 sectors); data from sector 11.
    fn fat12() -> Vec<u8> {
        let mut img = vec![0u8; 2 << 20];
        put(&mut img, 0, &[0xEB, 0x3C, 0x90]);
        put(&mut img, 3, b"mkfs.fat");
        put(&mut img, 0x0B, &512u16.to_le_bytes());
        img[0x0D] = 4;
        put(&mut img, 0x0E, &1u16.to_le_bytes());
        img[0x10] = 2;
        put(&mut img, 0x11, &64u16.to_le_bytes());
        put(&mut img, 0x13, &4096u16.to_le_bytes());
        img[0x15] = 0xF8;
        put(&mut img, 0x16, &3u16.to_le_bytes());
        img[0x26] = 0x29;
        put(&mut img, 0x27, &0x1234_ABCDu32.to_le_bytes());
        put(&mut img, 0x2B, b"BOOTLABEL  ");
        put(&mut img, 0x36, b"FAT12   ");
        put(&mut img, 510, &[0x55, 0xAA]);
        // Root directory label entry.
        let root = 7 * 512;
        put(&mut img, root, b"DIRLABEL   ");
        img[root + 11] = 0x08;
        // FAT[0]: the media byte; FAT[1]: end of chain.
        set12(&mut img, 0, 0xFF8);
        set12(&mut img, 1, 0xFFF);
        img
    }

    /// Sets FAT12 entry `c` in both FATs.
    fn set12(img: &mut [u8], c: usize, v: u16) {
        for fat in [512, 512 + 3 * 512] {
            let o = fat + c * 3 / 2;
            let w = u16::from_le_bytes([img[o], img[o + 1]]);
            let w = if c.is_multiple_of(2) {
                (w & 0xF000) | v
            } else {
                (w & 0x000F) | (v << 4)
            };
            put(img, o, &w.to_le_bytes());
        }
    }

    #[test]
    fn fat12_chains_are_marked_and_bad_clusters_are_not() {
        let mut img = fat12();
        // A chain 2 -> 3 -> 4 -> end, cluster 10 alone, cluster 11 bad.
        set12(&mut img, 2, 3);
        set12(&mut img, 3, 4);
        set12(&mut img, 4, 0xFFF);
        set12(&mut img, 10, 0xFF8);
        set12(&mut img, 11, 0xFF7);
        let vol = Mem(img);
        let (info, map) = probe(&vol, 2048).unwrap().unwrap();
        let map = map.unwrap();
        assert_eq!(info.version.as_deref(), Some("FAT12"));
        assert_eq!(info.uuid, "1234-ABCD");
        assert_eq!(info.label, "DIRLABEL");
        assert_eq!(info.used_bytes, 4 * 2048);
        // 4096 sectors − 11 of metadata = 1021 clusters of 2 KiB from byte 5632, ending at
        // byte 2 096 640: blocks 0..=2 hold metadata, cluster c spans bytes
        // 5632 + (c − 2) × 2048 (two blocks), block 1023 holds the last 512 bytes.
        let used: Vec<u64> = (0..map.block_count()).filter(|&b| map.is_used(b)).collect();
        let want: Vec<u64> = vec![0, 1, 2, 3, 4, 5, 10, 11, 1023];
        assert_eq!(used, want);
    }

    #[test]
    fn out_of_range_entries_are_refused() {
        let mut img = fat12();
        set12(&mut img, 5, 0xFF0);
        assert_refused(probe, img, "outside");
    }

    #[test]
    fn differing_fat_copies_are_refused() {
        let mut img = fat12();
        set12(&mut img, 2, 0xFFF);
        // Cluster 3 allocated in the second FAT only.
        put(&mut img, 512 + 3 * 512 + 4, &[0xFF, 0x0F]);
        assert_refused(probe, img, "FAT 1 and FAT 2 differ at byte 4");
    }

    #[test]
    fn a_fat_without_the_media_byte_is_refused() {
        let mut img = fat12();
        img[0x15] = 0xF0;
        assert_refused(probe, img, "media byte 0xf0");
    }

    #[test]
    fn a_free_fat32_root_directory_is_refused() {
        let mut img = fat12();
        // The same layout as FAT32 (the cluster count is not checked against the type here).
        put(&mut img, 0x16, &0u16.to_le_bytes());
        put(&mut img, 0x11, &0u16.to_le_bytes());
        put(&mut img, 0x24, &8u32.to_le_bytes());
        put(&mut img, 0x28, &0u16.to_le_bytes());
        put(&mut img, 0x2C, &2u32.to_le_bytes());
        for fat in [512, 512 + 8 * 512] {
            put(
                &mut img,
                fat,
                &[0xF8, 0xFF, 0xFF, 0x0F, 0xFF, 0xFF, 0xFF, 0x0F],
            );
            img[fat + 8..fat + 8 * 512].fill(0);
        }
        let bpb = Bpb::read(&Mem(img.clone())).unwrap().unwrap();
        assert_eq!(bpb.bits, 32);
        let err = allocation_map(&Mem(img.clone()), &bpb, 4096).unwrap_err();
        assert!(
            err.contains("root directory's cluster 2 is marked free"),
            "{err}"
        );
        for fat in [512, 512 + 8 * 512] {
            put(&mut img, fat + 8, &[0xFF, 0xFF, 0xFF, 0x0F]);
        }
        assert!(allocation_map(&Mem(img), &bpb, 4096).is_ok());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// Mutated boot sectors and FATs never panic, hang or allocate wildly.
        #[test]
        fn mutated_volumes_never_panic(
            patches in proptest::collection::vec((0usize..(11 * 512), any::<u8>()), 0..40),
            fat32 in any::<bool>(),
        ) {
            let mut img = fat12();
            if fat32 {
                put(&mut img, 0x16, &0u16.to_le_bytes());
                put(&mut img, 0x11, &0u16.to_le_bytes());
                put(&mut img, 0x24, &8u32.to_le_bytes());
            }
            for (o, v) in patches {
                img[o] = v;
            }
            let _ = probe(&Mem(img), 65536);
        }

        #[test]
        fn random_boot_sectors_never_panic(b in proptest::collection::vec(any::<u8>(), 512)) {
            if let Some(bpb) = Bpb::parse(&b) {
                let _ = allocation_map(&Mem(vec![0; 1 << 16]), &bpb, 4096);
            }
        }
    }
}
