//! exFAT: the boot sector, the FAT, the root directory and the allocation bitmap.
//!
//! Layout facts used here (all little-endian), from Microsoft's exFAT specification:
//! - Main boot region: sectors 0–11 (boot sector, 8 extended boot sectors, OEM parameters,
//!   reserved, boot checksum); the backup boot region is sectors 12–23. Boot sector: OEM id
//!   `EXFAT   ` at 3, bytes 11–63 zero, VolumeLength u64 @0x48 (sectors), FatOffset u32 @0x50,
//!   FatLength u32 @0x54, ClusterHeapOffset u32 @0x58 (all in sectors), ClusterCount u32
//!   @0x5C, FirstClusterOfRootDirectory u32 @0x60, VolumeSerialNumber u32 @0x64,
//!   FileSystemRevision u16 @0x68 (minor, major), VolumeFlags u16 @0x6A (bit 0: ActiveFat),
//!   BytesPerSectorShift u8 @0x6C (9–12), SectorsPerClusterShift u8 @0x6D (sector + cluster
//!   shifts ≤ 25), NumberOfFats u8 @0x6E (1, or 2 for TexFAT).
//! - FAT: a u32 per cluster, clusters numbered from 2; 2..=ClusterCount+1 = next cluster,
//!   0xFFFFFFF7 bad, 0xFFFFFFFF end of chain. Chains are used by the root directory and by
//!   every file without the NoFatChain flag; the allocation bitmap's entry has no such flag.
//! - Root directory: 32-byte entries; type @0 (0x00 end, bit 7 in use): 0x81 allocation bitmap
//!   (BitmapFlags @1, bit 0: for the second FAT; FirstCluster u32 @20; DataLength u64 @24),
//!   0x83 volume label (character count @1, UTF-16LE @2, at most 11 characters).
//! - Allocation bitmap: bit `i` (least significant first) is cluster `i + 2`, set when in use.
//!
//! - Boot checksum: sector 11 of each boot region repeats a u32 computed over sectors 0–10,
//!   skipping VolumeFlags (bytes 106, 107) and PercentInUse (byte 112) of the boot sector: for
//!   each byte, `sum = sum.rotate_right(1) + byte`.
//! - Up-case table entry (0x82): FirstCluster u32 @20, DataLength u64 @24.
//!
//! The map keeps everything before the cluster heap (both boot regions, the FAT alignment,
//! the FATs), the clusters the bitmap marks, and everything after the heap. Every offset,
//! count and cluster number is checked against the volume; a broken chain or an implausible
//! layout makes the map unusable (the caller then reads every block). Before the bitmap is
//! trusted, both boot regions must carry a valid and equal checksum, and the bitmap must mark
//! its own clusters, the up-case table's, the root directory's and every file's used.
//! - File entry set: 0x85 (FileAttributes u16 @4, 0x10 directory), then a stream extension
//!   0xC0 (GeneralSecondaryFlags @1, bit 1 NoFatChain; FirstCluster u32 @20; DataLength u64
//!   @24).

use super::alloc::{self, PIECE, Required, UsedRuns, with_used_bytes};
use super::{BlockMap, FsInfo};
use crate::bytes::{le_u16 as u16_at, le_u32 as u32_at, le_u64 as u64_at};
use crate::error::Result;
use crate::fs::check::{Checked, bad};

use crate::volume::Volume;

/// The OEM id at byte 3 of the boot sector.
pub const EXFAT_OEM: &[u8; 8] = b"EXFAT   ";

/// Largest root directory span scanned for the label and the bitmap entry.
const DIR_SCAN_LIMIT: u64 = 1 << 20;
/// The two boot regions: 24 sectors.
const BOOT_REGIONS_SECTORS: u64 = 24;
const ENTRY_BITMAP: u8 = 0x81;
const ENTRY_UPCASE: u8 = 0x82;
const ENTRY_LABEL: u8 = 0x83;
const FAT_BAD: u32 = 0xFFFF_FFF7;
const FAT_END: u32 = 0xFFFF_FFFF;
/// Sectors of one boot region; the last holds the checksum.
const BOOT_REGION_SECTORS: u64 = 12;
/// Bytes of the boot sector left out of the checksum: VolumeFlags and PercentInUse.
const CHECKSUM_SKIPPED: [usize; 3] = [106, 107, 112];
/// Longest root directory chain checked against the bitmap (clusters).
const ROOT_CHAIN_LIMIT: u64 = 1 << 16;
/// Most directory bytes read to check files' clusters against the bitmap; past it the rest
/// of the files go unchecked.
const DIR_WALK_LIMIT: u64 = 256 << 20;
const ENTRY_FILE: u8 = 0x85;
const ENTRY_STREAM: u8 = 0xC0;
const ATTR_DIRECTORY: u16 = 0x10;
const FLAG_NO_FAT_CHAIN: u8 = 0x02;

/// The fields of an exFAT boot sector that the map needs.
#[derive(Debug, Clone)]
pub struct BootSector {
    pub sector: u64,
    pub cluster: u64,
    /// Bytes.
    pub fat_offset: u64,
    /// Bytes of one FAT.
    pub fat_length: u64,
    /// Bytes.
    pub heap_offset: u64,
    pub cluster_count: u64,
    pub root_cluster: u32,
    /// Sectors.
    pub volume_length: u64,
    pub serial: u32,
    /// FileSystemRevision as (major, minor).
    pub revision: (u8, u8),
    pub fats: u64,
    /// The FAT and bitmap in use (VolumeFlags bit 0).
    pub active_fat: u64,
}

impl BootSector {
    /// Parses sector 0; `None` when it is not a plausible exFAT boot sector.
    pub fn parse(h: &[u8]) -> Option<BootSector> {
        if h.len() < 512 || h[3..11] != *EXFAT_OEM || h[11..64].iter().any(|&b| b != 0) {
            return None;
        }
        let bps_shift = u32::from(h[0x6C]);
        let spc_shift = u32::from(h[0x6D]);
        let fats = u64::from(h[0x6E]);
        if !(9..=12).contains(&bps_shift) || bps_shift + spc_shift > 25 || !(1..=2).contains(&fats)
        {
            return None;
        }
        let sector = 1u64 << bps_shift;
        let cluster_count = u64::from(u32_at(h, 0x5C));
        let root_cluster = u32_at(h, 0x60);
        if root_cluster < 2 || u64::from(root_cluster) > cluster_count + 1 {
            return None;
        }
        Some(BootSector {
            sector,
            cluster: sector << spc_shift,
            fat_offset: u64::from(u32_at(h, 0x50)) * sector,
            fat_length: u64::from(u32_at(h, 0x54)) * sector,
            heap_offset: u64::from(u32_at(h, 0x58)) * sector,
            cluster_count,
            root_cluster,
            volume_length: u64_at(h, 0x48),
            serial: u32_at(h, 0x64),
            revision: (h[0x69], h[0x68]),
            fats,
            active_fat: u64::from(u16_at(h, 0x6A) & 1),
        })
    }

    /// Reads and parses sector 0 of `vol`.
    pub fn read(vol: &dyn Volume) -> Result<Option<BootSector>> {
        Ok(super::alloc::boot_sector(vol)?.and_then(|h| BootSector::parse(&h)))
    }

    /// The serial number as `blkid` prints it (`XXXX-XXXX`).
    pub fn uuid(&self) -> String {
        format!("{:04X}-{:04X}", self.serial >> 16, self.serial & 0xFFFF)
    }

    /// The revision as `blkid` prints it ("1.0").
    pub fn version(&self) -> String {
        format!("{}.{}", self.revision.0, self.revision.1)
    }

    /// Bytes the filesystem spans, when that fits in a u64.
    pub fn size(&self) -> Option<u64> {
        self.volume_length.checked_mul(self.sector)
    }

    fn in_range(&self, c: u32) -> bool {
        c >= 2 && u64::from(c) <= self.cluster_count + 1
    }

    /// First byte of cluster `c` (in range: the heap's end is checked to fit).
    fn cluster_offset(&self, c: u32) -> u64 {
        self.heap_offset + u64::from(c - 2) * self.cluster
    }

    /// The FAT entry of cluster `c` in the active FAT.
    fn fat_entry(&self, vol: &dyn Volume, c: u32) -> Checked<u32> {
        let mut b = [0u8; 4];
        let at = self.fat_offset + self.active_fat * self.fat_length + u64::from(c) * 4;
        alloc::read(vol, at, &mut b, "FAT entry")?;
        Ok(u32_at(&b, 0))
    }

    /// Checks that the regions lie in order inside the filesystem and the filesystem inside
    /// the volume; returns the end of the cluster heap.
    fn check_layout(&self, vol: &dyn Volume) -> Checked<u64> {
        let size = self.size().filter(|&s| s <= vol.size()).ok_or_else(|| {
            bad!(
                "the filesystem spans {} sectors of {} bytes but the volume has only {} bytes",
                self.volume_length,
                self.sector,
                vol.size()
            )
        })?;
        let fats_end = self.fat_offset + self.fats * self.fat_length;
        let heap_end = self.heap_offset + self.cluster_count * self.cluster;
        if self.fat_offset < BOOT_REGIONS_SECTORS * self.sector
            || self.fat_length < (self.cluster_count + 2) * 4
            || fats_end > self.heap_offset
            || heap_end > size
        {
            return Err(bad!(
                "the regions do not fit: FATs at {}+{}×{}, heap at {} of {} clusters of {} \
                 bytes, {size} bytes in all",
                self.fat_offset,
                self.fats,
                self.fat_length,
                self.heap_offset,
                self.cluster_count,
                self.cluster
            ));
        }
        if self.active_fat >= self.fats {
            return Err(bad!("the active FAT is the second of one"));
        }
        Ok(heap_end)
    }

    /// Reads the root directory (at most [`DIR_SCAN_LIMIT`] bytes) for the label and the
    /// active allocation bitmap's (first cluster, length).
    pub fn root(&self, vol: &dyn Volume) -> Checked<Root> {
        let mut root = Root::default();
        let mut c = self.root_cluster;
        let mut read = 0u64;
        // The scan limit bounds the walk, a loop included.
        while read < DIR_SCAN_LIMIT {
            let take = self.cluster.min(DIR_SCAN_LIMIT - read);
            let mut b = vec![0u8; take as usize];
            alloc::read(vol, self.cluster_offset(c), &mut b, "root directory")?;
            read += take;
            for e in b.chunks_exact(32) {
                match e[0] {
                    0x00 => return Ok(root),
                    ENTRY_LABEL => {
                        let n = usize::from(e[1]).min(11);
                        let units: Vec<u16> = e[2..2 + 2 * n]
                            .chunks_exact(2)
                            .map(|c| u16::from_le_bytes([c[0], c[1]]))
                            .collect();
                        let s = String::from_utf16_lossy(&units);
                        root.label = (!s.is_empty()).then_some(s);
                    }
                    ENTRY_BITMAP
                        if root.bitmap.is_none() && u64::from(e[1] & 1) == self.active_fat =>
                    {
                        root.bitmap = Some((u32_at(e, 20), u64_at(e, 24)));
                    }
                    ENTRY_UPCASE if root.upcase.is_none() => {
                        root.upcase = Some((u32_at(e, 20), u64_at(e, 24)));
                    }
                    _ => {}
                }
            }
            let next = self.fat_entry(vol, c)?;
            if !self.in_range(next) {
                break;
            }
            c = next;
        }
        Ok(root)
    }

    /// The first `count` clusters of the chain starting at `first` (of `what`), each a
    /// cluster of the volume, none twice, none bad.
    fn chain(&self, vol: &dyn Volume, first: u32, count: u64, what: &str) -> Checked<Vec<u32>> {
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut c = first;
        while (out.len() as u64) < count {
            if !self.in_range(c) {
                return Err(bad!(
                    "{what}'s chain reaches cluster {c:#x} after {} clusters",
                    out.len()
                ));
            }
            if !seen.insert(c) {
                return Err(bad!("{what}'s chain loops at cluster {c}"));
            }
            out.push(c);
            if (out.len() as u64) < count {
                let next = self.fat_entry(vol, c)?;
                if next == FAT_BAD {
                    return Err(bad!("{what}'s chain hits bad cluster {c}"));
                }
                c = next;
            }
        }
        Ok(out)
    }

    /// The root directory's clusters (at most [`ROOT_CHAIN_LIMIT`]): its chain up to the
    /// end-of-chain entry, which must come after clusters of the volume only.
    fn root_chain(&self, vol: &dyn Volume) -> Checked<Vec<u32>> {
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut c = self.root_cluster;
        while (out.len() as u64) < ROOT_CHAIN_LIMIT {
            if !self.in_range(c) {
                return Err(bad!(
                    "the root directory's chain reaches {c:#x} after {} clusters",
                    out.len()
                ));
            }
            if !seen.insert(c) {
                return Err(bad!("the root directory's chain loops at cluster {c}"));
            }
            out.push(c);
            c = self.fat_entry(vol, c)?;
            if c == FAT_END {
                break;
            }
        }
        Ok(out)
    }

    /// Checks the main and the backup boot region: sector 11 of each repeats the checksum of
    /// sectors 0–10, and both checksums are equal (the backup is never rewritten, the main
    /// region only in the fields the checksum skips).
    fn check_boot_regions(&self, vol: &dyn Volume) -> Checked<()> {
        let len = (BOOT_REGION_SECTORS * self.sector) as usize;
        let mut sums = [0u32; 2];
        for (i, name) in ["main", "backup"].into_iter().enumerate() {
            let mut b = vec![0u8; len];
            alloc::read(vol, i as u64 * len as u64, &mut b, "boot region")?;
            let body = len - self.sector as usize;
            let sum = boot_checksum(&b[..body]);
            if b[body..].chunks_exact(4).any(|c| u32_at(c, 0) != sum) {
                return Err(bad!(
                    "the {name} boot region's checksum sector does not hold its checksum                      {sum:#010x}"
                ));
            }
            sums[i] = sum;
        }
        if sums[0] != sums[1] {
            return Err(bad!(
                "the main and backup boot regions differ (checksums {:#010x} and {:#010x})",
                sums[0],
                sums[1]
            ));
        }
        Ok(())
    }

    /// The clusters the filesystem's own structures hold: the allocation bitmap, the up-case
    /// table, the root directory. Units are bitmap bits (cluster − 2).
    fn system_clusters(&self, vol: &dyn Volume, root: &Root) -> Checked<Required> {
        let mut req = Required::default();
        let (bm, bm_len) = root
            .bitmap
            .ok_or_else(|| bad!("the root directory has no allocation bitmap entry"))?;
        let (up, up_len) = root
            .upcase
            .ok_or_else(|| bad!("the root directory has no up-case table entry"))?;
        let parts = [
            (
                "the allocation bitmap",
                self.chain(
                    vol,
                    bm,
                    bm_len
                        .min(self.cluster_count.div_ceil(8))
                        .div_ceil(self.cluster),
                    "the allocation bitmap",
                )?,
            ),
            (
                "the up-case table",
                self.chain(
                    vol,
                    up,
                    up_len.div_ceil(self.cluster).max(1),
                    "the up-case table",
                )?,
            ),
            ("the root directory", self.root_chain(vol)?),
        ];
        for (what, clusters) in parts {
            for c in clusters {
                req.add(u64::from(c - 2), 1, what);
            }
        }
        Ok(req)
    }

    /// Adds the clusters of every file and directory to `req`, walking the directory tree from
    /// the root (at most [`DIR_WALK_LIMIT`] bytes of directories): each file entry set's
    /// stream extension gives the first cluster and the length; with NoFatChain the clusters
    /// are contiguous, otherwise they follow the FAT.
    fn file_clusters(&self, vol: &dyn Volume, req: &mut Required) -> Checked<()> {
        let mut queue = vec![self.root_chain(vol)?];
        let mut read = 0u64;
        let max_dir = DIR_WALK_LIMIT / self.cluster;
        while let Some(dir) = queue.pop() {
            let mut data = Vec::new();
            for &c in &dir {
                if read >= DIR_WALK_LIMIT {
                    return Ok(());
                }
                let mut b = vec![0u8; self.cluster as usize];
                alloc::read(vol, self.cluster_offset(c), &mut b, "a directory")?;
                read += self.cluster;
                data.extend_from_slice(&b);
            }
            let mut i = 0;
            while i + 64 <= data.len() {
                let (e, x) = (&data[i..i + 32], &data[i + 32..i + 64]);
                if e[0] == 0 {
                    break;
                }
                i += 32;
                let (first, len) = (u32_at(x, 20), u64_at(x, 24));
                if e[0] != ENTRY_FILE || x[0] != ENTRY_STREAM || first == 0 || len == 0 {
                    continue;
                }
                let n = len.div_ceil(self.cluster);
                let is_dir = u16_at(e, 4) & ATTR_DIRECTORY != 0;
                let clusters = if x[1] & FLAG_NO_FAT_CHAIN != 0 {
                    if !self.in_range(first) || u64::from(first) - 2 + n > self.cluster_count {
                        return Err(bad!(
                            "a file's {n} contiguous clusters from {first} leave the heap"
                        ));
                    }
                    req.add(u64::from(first) - 2, n, "a file's data");
                    if !is_dir {
                        continue;
                    }
                    (first..).take(n.min(max_dir) as usize).collect()
                } else {
                    let chain = self.chain(vol, first, n, "a file")?;
                    for &c in &chain {
                        req.add(u64::from(c) - 2, 1, "a file's data");
                    }
                    chain
                };
                if is_dir {
                    queue.push(clusters);
                }
            }
        }
        Ok(())
    }

    /// Walks the allocation bitmap (its cluster chain from the FAT), feeding the used
    /// clusters to `used` and checking that it marks the `required` ones used. At most
    /// `limit` bytes of bitmap are read.
    fn walk_bitmap(
        &self,
        vol: &dyn Volume,
        root: &Root,
        used: &mut UsedRuns,
        required: Option<&Required>,
        limit: u64,
    ) -> Checked<()> {
        let (first, len) = root
            .bitmap
            .ok_or_else(|| bad!("the root directory has no allocation bitmap entry"))?;
        let need = self.cluster_count.div_ceil(8);
        if len < need {
            return Err(bad!(
                "the allocation bitmap holds {len} bytes for {} clusters",
                self.cluster_count
            ));
        }
        if need > limit {
            return Err(bad!(
                "the allocation bitmap of {need} bytes is over the {limit}-byte limit"
            ));
        }
        let mut buf = vec![0u8; PIECE.min(self.cluster).min(need) as usize];
        let mut c = first;
        let mut pos = 0u64;
        // One step per cluster of `need` bytes, each cluster at most once.
        let mut seen = std::collections::HashSet::new();
        loop {
            if !self.in_range(c) {
                return Err(bad!(
                    "the allocation bitmap's chain reaches cluster {c:#x} after {pos} bytes"
                ));
            }
            if !seen.insert(c) {
                return Err(bad!("the allocation bitmap's chain loops at cluster {c}"));
            }
            let in_cluster = self.cluster.min(need - pos);
            let mut done = 0u64;
            while done < in_cluster {
                let n = (buf.len() as u64).min(in_cluster - done) as usize;
                alloc::read(
                    vol,
                    self.cluster_offset(c) + done,
                    &mut buf[..n],
                    "allocation bitmap",
                )?;
                let at = pos + done;
                used.bitmap(at * 8, &buf[..n], self.cluster_count - at * 8);
                if let Some(req) = required {
                    req.check_bitmap(
                        at * 8,
                        &buf[..n],
                        self.cluster_count - at * 8,
                        "the allocation bitmap",
                    )?;
                }
                done += n as u64;
            }
            pos += in_cluster;
            if pos >= need {
                return Ok(());
            }
            let next = self.fat_entry(vol, c)?;
            if next == FAT_BAD {
                return Err(bad!("the allocation bitmap's chain hits bad cluster {c}"));
            }
            c = next;
        }
    }

    /// Clusters in use according to the allocation bitmap, reading at most `limit` bytes of
    /// it.
    pub fn used_clusters(&self, vol: &dyn Volume, root: &Root, limit: u64) -> Checked<u64> {
        let mut used = UsedRuns::new(None, 0, self.cluster);
        self.walk_bitmap(vol, root, &mut used, None, limit)?;
        Ok(used.finish())
    }
}

/// What the root directory says.
#[derive(Debug, Clone, Default)]
pub struct Root {
    pub label: Option<String>,
    /// The active allocation bitmap: first cluster and length in bytes.
    pub bitmap: Option<(u32, u64)>,
    /// The up-case table: first cluster and length in bytes.
    pub upcase: Option<(u32, u64)>,
}

/// The boot checksum of `b` (sectors 0 to 10 of a boot region).
fn boot_checksum(b: &[u8]) -> u32 {
    b.iter().enumerate().fold(0u32, |sum, (i, &x)| {
        if CHECKSUM_SKIPPED.contains(&i) {
            sum
        } else {
            sum.rotate_right(1).wrapping_add(u32::from(x))
        }
    })
}

/// Builds the allocation map of an exFAT volume at `granularity` bytes per bit, with the
/// number of clusters in use. `Err` explains why the filesystem's data cannot be trusted.
pub fn allocation_map(
    vol: &dyn Volume,
    boot: &BootSector,
    root: &Root,
    granularity: u64,
) -> Checked<(BlockMap, u64)> {
    let heap_end = boot.check_layout(vol)?;
    // Validation before trusting the bitmap (which must mark `required` used, checked in the
    // walk).
    boot.check_boot_regions(vol)?;
    let mut required = boot.system_clusters(vol, root)?;
    boot.file_clusters(vol, &mut required)?;
    required.sort();
    let mut map = BlockMap::new(vol.size(), granularity);
    // Main and backup boot regions, FAT alignment, the FATs, heap alignment.
    map.mark_bytes(0, boot.heap_offset);
    // Past the last cluster (and past the filesystem).
    map.mark_bytes(heap_end, vol.size() - heap_end);
    let mut used = UsedRuns::new(Some(&mut map), boot.heap_offset, boot.cluster);
    boot.walk_bitmap(vol, root, &mut used, Some(&required), u64::MAX)?;
    let n = used.finish();
    Ok((map, n))
}

/// Recognises exFAT on `vol`: its description and its allocation map (or why there is none).
pub fn probe(vol: &dyn Volume, granularity: u64) -> Result<Option<(FsInfo, Checked<BlockMap>)>> {
    let Some(boot) = BootSector::read(vol)? else {
        return Ok(None);
    };
    let size = boot.size().unwrap_or(u64::MAX);
    let root = boot.check_layout(vol).and_then(|_| boot.root(vol));
    let label = root
        .as_ref()
        .ok()
        .and_then(|r| r.label.clone())
        .unwrap_or_default();
    let map = root.and_then(|r| allocation_map(vol, &boot, &r, granularity));
    let info = FsInfo {
        fs_type: "exfat".into(),
        version: Some(boot.version()),
        uuid: boot.uuid(),
        label,
        block_size: boot.cluster as u32,
        size,
        used_bytes: 0, // set from the bitmap
    };
    Ok(Some(with_used_bytes(info, map, boot.cluster)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::tests::{Mem, assert_refused, refusal};
    use proptest::prelude::*;

    const SECTOR: usize = 512;
    const CLUSTER: usize = 4096;
    /// FAT at sector 32, heap at sector 64, 500 clusters: 2 MiB + 32 KiB.
    const FAT: usize = 32 * SECTOR;
    const HEAP: usize = 64 * SECTOR;
    const CLUSTERS: usize = 500;

    fn put(img: &mut [u8], at: usize, bytes: &[u8]) {
        img[at..at + bytes.len()].copy_from_slice(bytes);
    }

    fn cluster(c: usize) -> usize {
        HEAP + (c - 2) * CLUSTER
    }

    fn set_fat(img: &mut [u8], c: usize, v: u32) {
        put(img, FAT + 4 * c, &v.to_le_bytes());
    }

    /// Writes both boot regions' checksum sectors, the backup region a copy of the main one.
    fn seal(img: &mut [u8]) {
        let body = 11 * SECTOR;
        let sum = boot_checksum(&img[..body]);
        for i in 0..SECTOR / 4 {
            put(img, body + 4 * i, &sum.to_le_bytes());
        }
        img.copy_within(0..12 * SECTOR, 12 * SECTOR);
    }

    /// Bitmap in cluster 2, root directory in clusters 3 then 5 (a chain), up-case table in
    /// cluster 4, label "vb".
    fn image() -> Vec<u8> {
        let len = HEAP + CLUSTERS * CLUSTER + 2 * SECTOR;
        let mut img = vec![0u8; len];
        put(&mut img, 0, &[0xEB, 0x76, 0x90]);
        put(&mut img, 3, EXFAT_OEM);
        put(&mut img, 0x48, &(((len / SECTOR) - 1) as u64).to_le_bytes());
        put(&mut img, 0x50, &((FAT / SECTOR) as u32).to_le_bytes());
        put(&mut img, 0x54, &8u32.to_le_bytes());
        put(&mut img, 0x58, &((HEAP / SECTOR) as u32).to_le_bytes());
        put(&mut img, 0x5C, &(CLUSTERS as u32).to_le_bytes());
        put(&mut img, 0x60, &3u32.to_le_bytes());
        put(&mut img, 0x64, &0xFB83_9433u32.to_le_bytes());
        put(&mut img, 0x68, &[0, 1]);
        img[0x6C] = 9;
        img[0x6D] = 3;
        img[0x6E] = 1;
        put(&mut img, 510, &[0x55, 0xAA]);
        set_fat(&mut img, 2, u32::MAX);
        set_fat(&mut img, 3, 5);
        set_fat(&mut img, 4, u32::MAX);
        set_fat(&mut img, 5, u32::MAX);
        // Root: the first cluster full of unused entries of another type, then in cluster 5
        // the label and the bitmap entries.
        for e in (0..CLUSTER).step_by(32) {
            img[cluster(3) + e] = 0x05; // deleted file entry
        }
        let r = cluster(5);
        img[r] = ENTRY_LABEL;
        img[r + 1] = 2;
        put(&mut img, r + 2, &[b'v', 0, b'b', 0]);
        img[r + 32] = ENTRY_BITMAP;
        put(&mut img, r + 32 + 20, &2u32.to_le_bytes());
        put(
            &mut img,
            r + 32 + 24,
            &((CLUSTERS / 8 + 1) as u64).to_le_bytes(),
        );
        img[r + 64] = ENTRY_UPCASE;
        put(&mut img, r + 64 + 20, &4u32.to_le_bytes());
        put(&mut img, r + 64 + 24, &2048u64.to_le_bytes());
        // In use: clusters 2 to 5, 104 and 105.
        let b = cluster(2);
        img[b] = 0b0000_1111;
        img[b + 12] = 0xC0; // bits 102 and 103: clusters 104 and 105
        seal(&mut img);
        img
    }

    #[test]
    fn bitmap_clusters_and_the_boot_regions_are_marked() {
        let vol = Mem(image());
        let (info, map) = probe(&vol, 4096).unwrap().unwrap();
        let map = map.unwrap();
        assert_eq!(info.label, "vb");
        assert_eq!(info.uuid, "FB83-9433");
        assert_eq!(info.version.as_deref(), Some("1.0"));
        assert_eq!(info.used_bytes, 6 * 4096);
        // Heap at byte 32 KiB (block 8): cluster c is block 8 + c − 2.
        let used: Vec<u64> = (0..map.block_count()).filter(|&b| map.is_used(b)).collect();
        let want: Vec<u64> = (0..8)
            .chain([8, 9, 10, 11])
            .chain([110, 111])
            .chain([508])
            .collect();
        assert_eq!(used, want);
    }

    #[test]
    fn a_looping_or_short_bitmap_chain_is_refused() {
        let mut img = image();
        // The bitmap needs 63 bytes: one cluster; make it claim more than the volume holds.
        let r = cluster(5) + 32;
        put(&mut img, r + 20, &700u32.to_le_bytes());
        assert_refused(probe, img, "chain");
    }

    #[test]
    fn a_bitmap_marking_system_clusters_free_is_refused() {
        for (bits, want) in [
            (0b1110, "the allocation bitmap free (bit 0)"),
            (0b1011, "the up-case table free (bit 2)"),
            (0b0111, "the root directory free (bit 3)"),
        ] {
            let mut img = image();
            img[cluster(2)] = bits;
            let err = refusal(probe, img);
            assert!(err.contains(want), "{err}");
        }
    }

    #[test]
    fn a_broken_boot_checksum_is_refused() {
        let mut img = image();
        // Boot code (covered by the checksum) in the main region.
        img[200] ^= 1;
        assert_refused(probe, img, "main boot region");
        let mut img = image();
        img[12 * SECTOR + 200] ^= 1;
        assert_refused(probe, img, "backup boot region");
        // VolumeFlags and PercentInUse are left out of the checksum.
        let mut img = image();
        img[106] = 2;
        img[112] = 42;
        assert!(probe(&Mem(img), 4096).unwrap().unwrap().1.is_ok());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// Mutated boot sectors, FATs, directories and bitmaps never panic, hang or allocate
        /// wildly.
        #[test]
        fn mutated_volumes_never_panic(
            patches in proptest::collection::vec((0usize..4, 0usize..512, any::<u8>()), 0..32),
        ) {
            let mut img = image();
            for (area, o, v) in patches {
                let base = [0, FAT, cluster(5), cluster(2)][area];
                img[base + o] = v;
            }
            let _ = probe(&Mem(img), 65536);
        }

        #[test]
        fn random_boot_sectors_never_panic(mut b in proptest::collection::vec(any::<u8>(), 512)) {
            b[3..11].copy_from_slice(EXFAT_OEM);
            b[11..64].fill(0);
            if let Some(boot) = BootSector::parse(&b) {
                let vol = Mem(vec![0; 1 << 16]);
                if let Ok(root) = boot.root(&vol) {
                    let _ = allocation_map(&vol, &boot, &root, 4096);
                }
            }
        }
    }
}
