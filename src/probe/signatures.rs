//! Filesystem and volume signatures: which format a volume holds, with its UUID, label, size
//! and used bytes where its superblock says so cheaply.
//!
//! Every detector reads a few sectors at fixed places, checks magic numbers and the sanity of
//! the fields it uses, and never trusts a length or an offset it read without a bound. Names
//! (`type`) are those of `blkid`, so that scripts can compare the two.
//!
//! | type          | where                 | magic / check                                        |
//! |---------------|-----------------------|------------------------------------------------------|
//! | crypto_LUKS   | byte 0                | `LUKS\xBA\xBE`, version (u16 BE at 6) 1 or 2         |
//! | LVM2_member   | sector 0–3            | `LABELONE` (label), `LVM2 001` at +24                |
//! | xfs           | byte 0                | `XFSB`, big-endian superblock                        |
//! | ntfs          | byte 3                | `NTFS    ` OEM id, sane BPB                          |
//! | exfat         | byte 3                | `EXFAT   ` OEM id, sane shifts                       |
//! | vfat          | byte 0                | jump instruction, sane BPB, 0x55AA or FAT id string  |
//! | btrfs         | byte 65536 + 0x40     | `_BHRfS_M`, bytenr field = 65536                     |
//! | ext2/3/4      | byte 1024 + 0x38      | 0xEF53 (see [`crate::fs::ext`])                      |
//! | swap          | page size − 10        | `SWAPSPACE2` (v1), page sizes 4 KiB to 64 KiB        |

use super::Filesystem;
use super::guid::uuid_string;
use crate::bytes::{
    be_u16 as u16_be, be_u32 as u32_be, le_u16 as u16_le, le_u32 as u32_le, le_u64 as u64_le,
};
use crate::error::Result;
use crate::fs::{btrfs, ext, xfs};
use crate::volume::Volume;

/// LUKS (1 and 2) header magic at byte 0.
pub const LUKS_MAGIC: &[u8; 6] = b"LUKS\xBA\xBE";
/// LVM2 physical volume label id, in one of the first four sectors.
pub const LVM_LABEL_ID: &[u8; 8] = b"LABELONE";
pub const LVM_TYPE_2: &[u8; 8] = b"LVM2 001";
/// XFS superblock magic (`XFS_SB_MAGIC`, 0x58465342).
pub const XFS_MAGIC: &[u8; 4] = xfs::MAGIC;
pub const NTFS_OEM: &[u8; 8] = b"NTFS    ";
pub const EXFAT_OEM: &[u8; 8] = b"EXFAT   ";
/// btrfs primary superblock offset and magic (at 0x40 in the superblock).
pub const BTRFS_SB_OFFSET: u64 = btrfs::SB_OFFSET;
pub const BTRFS_MAGIC: &[u8; 8] = btrfs::MAGIC;
/// Linux swap v1 magic, in the last 10 bytes of the first page.
pub const SWAP_MAGIC_V1: &[u8; 10] = b"SWAPSPACE2";
/// Page sizes tried for swap (x86 4 KiB up to 64 KiB on some arm64/ppc64 kernels).
pub const SWAP_PAGE_SIZES: [u64; 5] = [4096, 8192, 16384, 32768, 65536];

/// Bytes read from the start of a volume for the detectors that look there.
const HEAD_LEN: u64 = 4096;
/// Largest FAT or exFAT directory span scanned for a volume label.
const DIR_SCAN_LIMIT: u64 = 1 << 20;
/// Largest FAT or exFAT allocation bitmap read to count used clusters (a FAT16 FAT is at most
/// 128 KiB; 16 MiB of exFAT bitmap covers 128 Mi clusters). Beyond it, used bytes are not
/// reported.
const COUNT_LIMIT: u64 = 16 << 20;

fn arr16(b: &[u8], o: usize) -> [u8; 16] {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[o..o + 16]);
    a
}

/// A NUL-terminated (or full-length) byte string; `None` when empty.
fn cstr(b: &[u8]) -> Option<String> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    let s = String::from_utf8_lossy(&b[..end]).into_owned();
    (!s.is_empty()).then_some(s)
}

fn utf16le(b: &[u8]) -> String {
    let units: Vec<u16> = b
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16_lossy(&units)
}

fn nonzero_uuid(b: &[u8; 16]) -> Option<String> {
    (b != &[0; 16]).then(|| uuid_string(b))
}

/// Reads `len` bytes at `offset` when the volume has them; `None` when it is too small.
fn read_opt(vol: &dyn Volume, offset: u64, len: u64) -> Result<Option<Vec<u8>>> {
    if offset.checked_add(len).is_none_or(|e| e > vol.size()) {
        return Ok(None);
    }
    let mut b = vec![0u8; len as usize];
    vol.read_at(offset, &mut b)?;
    Ok(Some(b))
}

fn fs(fs_type: &str, usage: &str) -> Filesystem {
    Filesystem {
        fs_type: fs_type.into(),
        usage: usage.into(),
        version: None,
        uuid: None,
        label: None,
        block_size: None,
        size: None,
        used_bytes: None,
    }
}

/// What [`detect`] found.
#[derive(Debug, Clone, Default)]
pub struct Detection {
    pub filesystem: Option<Filesystem>,
    pub warnings: Vec<String>,
}

/// Detects the format of `vol`. Several signatures at once (a stale superblock that a later
/// `mkfs` did not wipe) give the first in priority order — the formats that overwrite
/// sector 0 before those that leave it — and a warning naming the others.
pub fn detect(vol: &dyn Volume) -> Result<Detection> {
    let head_len = vol.size().min(HEAD_LEN);
    let mut head = vec![0u8; head_len as usize];
    vol.read_at(0, &mut head)?;
    let mut found: Vec<Filesystem> = Vec::new();
    let mut warnings = Vec::new();
    type Detector = fn(&dyn Volume, &[u8]) -> Result<Option<Filesystem>>;
    let detectors: [(&str, Detector); 9] = [
        ("LUKS", luks),
        ("LVM2", lvm2),
        ("XFS", xfs),
        ("NTFS", ntfs),
        ("exFAT", exfat),
        ("FAT", fat),
        ("btrfs", btrfs),
        ("ext", ext_fs),
        ("swap", swap),
    ];
    for (name, d) in detectors {
        match d(vol, &head) {
            Ok(Some(f)) => found.push(f),
            Ok(None) => {}
            Err(e) => warnings.push(format!("while checking for {name}: {e}")),
        }
    }
    let mut it = found.into_iter();
    let first = it.next();
    let others: Vec<String> = it.map(|f| f.fs_type).collect();
    if let Some(f) = &first {
        if !others.is_empty() {
            warnings.push(format!(
                "also carries {} signature{} (left over from an earlier format?); reporting {}",
                others.join(", "),
                if others.len() > 1 { "s" } else { "" },
                f.fs_type
            ));
        }
        if let Some(size) = f.size
            && size > vol.size()
        {
            warnings.push(format!(
                "the {} filesystem spans {size} bytes but the volume has only {} (truncated?)",
                f.fs_type,
                vol.size()
            ));
        }
    }
    Ok(Detection {
        filesystem: first,
        warnings,
    })
}

/// Whether sector 0 (`head`) is a filesystem boot sector (FAT, NTFS, exFAT) rather than a
/// partition table: those also end in 0x55AA.
pub fn is_volume_boot_record(vol: &dyn Volume, head: &[u8]) -> bool {
    head.len() >= 512
        && (head[3..11] == *NTFS_OEM && ntfs_bpb(head).is_some()
            || head[3..11] == *EXFAT_OEM && exfat_geometry(head).is_some()
            || fat_bpb(vol, head).is_some())
}

// ---------------------------------------------------------------------------------------------
// LUKS

fn luks(_vol: &dyn Volume, h: &[u8]) -> Result<Option<Filesystem>> {
    if h.len() < 512 || h[0..6] != *LUKS_MAGIC {
        return Ok(None);
    }
    // phdr: magic[6], version u16 BE @6, uuid[40] @168 (both versions); LUKS2 also has
    // label[48] @24.
    let version = u16_be(h, 6);
    if version != 1 && version != 2 {
        return Ok(None);
    }
    let mut f = fs("crypto_LUKS", "crypto");
    f.version = Some(version.to_string());
    f.uuid = cstr(&h[168..208]);
    if version == 2 {
        f.label = cstr(&h[24..72]);
    }
    Ok(Some(f))
}

// ---------------------------------------------------------------------------------------------
// LVM2

fn lvm2(_vol: &dyn Volume, h: &[u8]) -> Result<Option<Filesystem>> {
    // label_header: id[8] "LABELONE", sector_xl u64, crc_xl u32, offset_xl u32, type[8].
    // pv_header at label + offset_xl: pv_uuid[32] (ASCII), device_size_xl u64.
    for sector in 0..4usize {
        let o = sector * 512;
        if h.len() < o + 512 {
            break;
        }
        let l = &h[o..o + 512];
        if l[0..8] != *LVM_LABEL_ID || l[24..32] != *LVM_TYPE_2 {
            continue;
        }
        if u64_le(l, 8) != sector as u64 {
            continue;
        }
        let pv = u32_le(l, 20) as usize;
        if !(32..=512 - 40).contains(&pv) {
            continue;
        }
        let id = &l[pv..pv + 32];
        if !id.iter().all(|c| c.is_ascii_alphanumeric()) {
            continue;
        }
        let id = String::from_utf8_lossy(id);
        let mut uuid = String::new();
        for (i, c) in id.chars().enumerate() {
            // 6-4-4-4-4-4-6 as LVM and blkid print it.
            if [6, 10, 14, 18, 22, 26].contains(&i) {
                uuid.push('-');
            }
            uuid.push(c);
        }
        let mut f = fs("LVM2_member", "raid");
        f.version = Some("LVM2 001".into());
        f.uuid = Some(uuid);
        let size = u64_le(l, pv + 32);
        f.size = (size > 0).then_some(size);
        return Ok(Some(f));
    }
    Ok(None)
}

// ---------------------------------------------------------------------------------------------
// XFS

fn xfs(_vol: &dyn Volume, h: &[u8]) -> Result<Option<Filesystem>> {
    // The superblock fields are parsed by the XFS allocation map's module.
    let Some(sb) = xfs::Superblock::parse(h) else {
        return Ok(None);
    };
    let mut f = fs("xfs", "filesystem");
    f.uuid = nonzero_uuid(&sb.uuid());
    f.label = Some(sb.label().to_string()).filter(|l| !l.is_empty());
    f.block_size = Some(sb.block_size());
    f.size = sb.size();
    f.used_bytes = sb.used_bytes();
    Ok(Some(f))
}

// ---------------------------------------------------------------------------------------------
// NTFS

struct NtfsBpb {
    sector: u64,
    cluster: u64,
    total_sectors: u64,
    mft_lcn: u64,
    record: u64,
}

fn ntfs_bpb(h: &[u8]) -> Option<NtfsBpb> {
    // BPB: bytes/sector u16 @0x0B, sectors/cluster u8 @0x0D (> 0x80: 2^(256-n)), reserved
    // sectors, FAT count, root entries, sectors16, sectors/FAT all zero; total sectors u64
    // @0x28, $MFT LCN u64 @0x30, clusters per MFT record i8 @0x40 (negative: 2^-n bytes),
    // serial u64 @0x48.
    let sector = u64::from(u16_le(h, 0x0B));
    if !sector.is_power_of_two() || !(256..=4096).contains(&sector) {
        return None;
    }
    let spc = h[0x0D];
    let spc: u64 = if spc <= 0x80 {
        u64::from(spc)
    } else {
        1u64.checked_shl(256 - u32::from(spc))?
    };
    if spc == 0 || !spc.is_power_of_two() {
        return None;
    }
    if u16_le(h, 0x0E) != 0 || h[0x10] != 0 || u16_le(h, 0x11) != 0 || u16_le(h, 0x13) != 0 {
        return None;
    }
    if u16_le(h, 0x16) != 0 || u32_le(h, 0x20) != 0 {
        return None;
    }
    let cluster = sector * spc;
    if cluster > 2 << 20 {
        return None;
    }
    let cpr = h[0x40] as i8;
    let record = if cpr > 0 {
        cluster * cpr as u64
    } else {
        1u64.checked_shl(u32::from(cpr.unsigned_abs()))?
    };
    if !(256..=65536).contains(&record) {
        return None;
    }
    Some(NtfsBpb {
        sector,
        cluster,
        total_sectors: u64_le(h, 0x28),
        mft_lcn: u64_le(h, 0x30),
        record,
    })
}

fn ntfs(vol: &dyn Volume, h: &[u8]) -> Result<Option<Filesystem>> {
    if h.len() < 512 || h[3..11] != *NTFS_OEM {
        return Ok(None);
    }
    let Some(b) = ntfs_bpb(h) else {
        return Ok(None);
    };
    let mut f = fs("ntfs", "filesystem");
    f.uuid = Some(format!("{:016X}", u64_le(h, 0x48)));
    f.block_size = Some(b.cluster as u32);
    f.size = b.total_sectors.checked_mul(b.sector);
    f.label = ntfs_label(vol, &b)?;
    Ok(Some(f))
}

/// The volume name: attribute 0x60 ($VOLUME_NAME) of MFT record 3 ($Volume).
fn ntfs_label(vol: &dyn Volume, b: &NtfsBpb) -> Result<Option<String>> {
    const VOLUME_RECORD: u64 = 3;
    const ATTR_VOLUME_NAME: u32 = 0x60;
    const ATTR_END: u32 = 0xFFFF_FFFF;
    let Some(off) = b
        .mft_lcn
        .checked_mul(b.cluster)
        .and_then(|o| o.checked_add(VOLUME_RECORD * b.record))
    else {
        return Ok(None);
    };
    let Some(mut r) = read_opt(vol, off, b.record)? else {
        return Ok(None);
    };
    // Record header: "FILE", update sequence offset u16 @4 and count u16 @6, first attribute
    // offset u16 @0x14. The last two bytes of every 512-byte stride hold the update sequence
    // number; the real bytes are in the update sequence array.
    if &r[0..4] != b"FILE" {
        return Ok(None);
    }
    let usa = u16_le(&r, 4) as usize;
    let usa_count = u16_le(&r, 6) as usize;
    if usa_count == 0 || usa + usa_count * 2 > r.len() || (usa_count - 1) * 512 > r.len() {
        return Ok(None);
    }
    let usn = [r[usa], r[usa + 1]];
    for i in 1..usa_count {
        let end = i * 512;
        if r[end - 2..end] != usn {
            return Ok(None);
        }
        let (a, c) = (r[usa + 2 * i], r[usa + 2 * i + 1]);
        r[end - 2] = a;
        r[end - 1] = c;
    }
    let mut a = u16_le(&r, 0x14) as usize;
    for _ in 0..64 {
        if a + 8 > r.len() {
            break;
        }
        let ty = u32_le(&r, a);
        let len = u32_le(&r, a + 4) as usize;
        if ty == ATTR_END || len < 24 || a + len > r.len() {
            break;
        }
        // Resident attribute: non-resident flag @8 = 0, value length u32 @0x10, value
        // offset u16 @0x14.
        if ty == ATTR_VOLUME_NAME && r[a + 8] == 0 {
            let vlen = u32_le(&r, a + 0x10) as usize;
            let voff = u16_le(&r, a + 0x14) as usize;
            if voff + vlen > len {
                return Ok(None);
            }
            let s = utf16le(&r[a + voff..a + voff + vlen]);
            return Ok((!s.is_empty()).then_some(s));
        }
        a += len;
    }
    Ok(None)
}

// ---------------------------------------------------------------------------------------------
// exFAT

struct ExfatGeometry {
    sector: u64,
    cluster: u64,
    fat_offset: u64,
    heap_offset: u64,
    cluster_count: u64,
    root_cluster: u32,
    volume_length: u64,
}

fn exfat_geometry(h: &[u8]) -> Option<ExfatGeometry> {
    // Main boot sector: MustBeZero @11..64, VolumeLength u64 @0x48, FatOffset u32 @0x50,
    // FatLength @0x54, ClusterHeapOffset @0x58, ClusterCount @0x5C, FirstClusterOfRoot @0x60,
    // VolumeSerialNumber @0x64, FileSystemRevision u16 @0x68, BytesPerSectorShift @0x6C,
    // SectorsPerClusterShift @0x6D, NumberOfFats @0x6E.
    if h[11..64].iter().any(|&b| b != 0) {
        return None;
    }
    let bps_shift = u32::from(h[0x6C]);
    let spc_shift = u32::from(h[0x6D]);
    if !(9..=12).contains(&bps_shift) || bps_shift + spc_shift > 25 || !(1..=2).contains(&h[0x6E]) {
        return None;
    }
    let sector = 1u64 << bps_shift;
    let cluster_count = u64::from(u32_le(h, 0x5C));
    let root_cluster = u32_le(h, 0x60);
    if root_cluster < 2 || u64::from(root_cluster) > cluster_count + 1 {
        return None;
    }
    Some(ExfatGeometry {
        sector,
        cluster: sector << spc_shift,
        fat_offset: u64::from(u32_le(h, 0x50)) * sector,
        heap_offset: u64::from(u32_le(h, 0x58)) * sector,
        cluster_count,
        root_cluster,
        volume_length: u64_le(h, 0x48),
    })
}

impl ExfatGeometry {
    fn cluster_offset(&self, c: u32) -> u64 {
        self.heap_offset + u64::from(c - 2) * self.cluster
    }

    /// The next cluster of a chain from the FAT; `None` at the end or on a bad entry.
    fn next(&self, vol: &dyn Volume, c: u32) -> Result<Option<u32>> {
        let Some(b) = read_opt(vol, self.fat_offset + u64::from(c) * 4, 4)? else {
            return Ok(None);
        };
        let n = u32_le(&b, 0);
        Ok((n >= 2 && u64::from(n) <= self.cluster_count + 1).then_some(n))
    }

    /// Reads up to `limit` bytes of the cluster chain starting at `first`.
    fn read_chain(&self, vol: &dyn Volume, first: u32, limit: u64) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut c = Some(first);
        let mut steps = 0u64;
        while let Some(cl) = c {
            if out.len() as u64 >= limit || steps > limit / 512 + 1 {
                break;
            }
            steps += 1;
            let take = self.cluster.min(limit - out.len() as u64);
            match read_opt(vol, self.cluster_offset(cl), take)? {
                Some(b) => out.extend_from_slice(&b),
                None => break,
            }
            c = self.next(vol, cl)?;
        }
        Ok(out)
    }
}

fn exfat(vol: &dyn Volume, h: &[u8]) -> Result<Option<Filesystem>> {
    if h.len() < 512 || h[3..11] != *EXFAT_OEM {
        return Ok(None);
    }
    let Some(g) = exfat_geometry(h) else {
        return Ok(None);
    };
    let mut f = fs("exfat", "filesystem");
    let serial = u32_le(h, 0x64);
    f.uuid = Some(format!("{:04X}-{:04X}", serial >> 16, serial & 0xFFFF));
    f.version = Some(format!("{}.{}", h[0x69], h[0x68]));
    f.block_size = Some(g.cluster as u32);
    f.size = g.volume_length.checked_mul(g.sector);
    // Root directory entries (32 bytes): 0x83 volume label (count @1, UTF-16LE @2),
    // 0x81 allocation bitmap (first cluster u32 @20, length u64 @24), 0x00 end.
    let dir = g.read_chain(vol, g.root_cluster, DIR_SCAN_LIMIT.min(g.cluster * 64))?;
    let mut bitmap = None;
    for e in dir.chunks_exact(32) {
        match e[0] {
            0x00 => break,
            0x83 => {
                let n = usize::from(e[1]).min(11);
                let s = utf16le(&e[2..2 + 2 * n]);
                f.label = (!s.is_empty()).then_some(s);
            }
            0x81 if bitmap.is_none() && e[1] & 1 == 0 => {
                bitmap = Some((u32_le(e, 20), u64_le(e, 24)));
            }
            _ => {}
        }
    }
    if let Some((first, len)) = bitmap {
        let need = g.cluster_count.div_ceil(8);
        if first >= 2 && len >= need && need <= COUNT_LIMIT {
            let bits = g.read_chain(vol, first, need)?;
            if bits.len() as u64 == need {
                let mut used: u64 = bits.iter().map(|b| u64::from(b.count_ones())).sum();
                // Bits past the cluster count in the last byte are not clusters.
                let tail = g.cluster_count % 8;
                if tail != 0 {
                    let last = bits[bits.len() - 1];
                    used -= u64::from((last >> tail).count_ones());
                }
                f.used_bytes = Some(used * g.cluster);
            }
        }
    }
    Ok(Some(f))
}

// ---------------------------------------------------------------------------------------------
// FAT12/16/32

struct FatBpb {
    sector: u64,
    cluster: u64,
    reserved: u64,
    fats: u64,
    fat_sectors: u64,
    root_entries: u64,
    total_sectors: u64,
    clusters: u64,
    /// 12, 16 or 32.
    bits: u32,
}

fn fat_bpb(_vol: &dyn Volume, h: &[u8]) -> Option<FatBpb> {
    // BPB: jump @0 (EB xx 90 or E9), bytes/sector u16 @0x0B, sectors/cluster @0x0D, reserved
    // sectors u16 @0x0E, FAT count @0x10, root entries u16 @0x11, total sectors u16 @0x13
    // (or u32 @0x20), media @0x15, sectors/FAT u16 @0x16 (0 on FAT32: u32 @0x24).
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
    let sector = u64::from(u16_le(h, 0x0B));
    let spc = u64::from(h[0x0D]);
    let reserved = u64::from(u16_le(h, 0x0E));
    let fats = u64::from(h[0x10]);
    let root_entries = u64::from(u16_le(h, 0x11));
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
    let total16 = u64::from(u16_le(h, 0x13));
    let total_sectors = if total16 != 0 {
        total16
    } else {
        u64::from(u32_le(h, 0x20))
    };
    let fat16_len = u64::from(u16_le(h, 0x16));
    let fat_sectors = if fat16_len != 0 {
        fat16_len
    } else {
        u64::from(u32_le(h, 0x24))
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
    } else if clusters < 4085 {
        12
    } else {
        16
    };
    // The FAT must be big enough for its clusters.
    let fat_bytes = fat_sectors * sector;
    if (clusters + 2) * u64::from(bits) / 8 > fat_bytes {
        return None;
    }
    Some(FatBpb {
        sector,
        cluster: sector * spc,
        reserved,
        fats,
        fat_sectors,
        root_entries,
        total_sectors,
        clusters,
        bits,
    })
}

impl FatBpb {
    fn fat_offset(&self) -> u64 {
        self.reserved * self.sector
    }

    fn root_dir_offset(&self) -> u64 {
        (self.reserved + self.fats * self.fat_sectors) * self.sector
    }

    fn data_offset(&self) -> u64 {
        self.root_dir_offset() + (self.root_entries * 32).div_ceil(self.sector) * self.sector
    }

    fn cluster_offset(&self, c: u64) -> u64 {
        self.data_offset() + (c - 2) * self.cluster
    }

    /// FAT entry `c` (FAT32 only: 28 bits).
    fn fat32_next(&self, vol: &dyn Volume, c: u64) -> Result<Option<u64>> {
        let Some(b) = read_opt(vol, self.fat_offset() + c * 4, 4)? else {
            return Ok(None);
        };
        let n = u64::from(u32_le(&b, 0) & 0x0FFF_FFFF);
        Ok((n >= 2 && n < self.clusters + 2).then_some(n))
    }

    /// The root directory bytes (at most [`DIR_SCAN_LIMIT`]).
    fn root_dir(&self, vol: &dyn Volume, h: &[u8]) -> Result<Vec<u8>> {
        if self.bits != 32 {
            let len = (self.root_entries * 32).min(DIR_SCAN_LIMIT);
            return Ok(read_opt(vol, self.root_dir_offset(), len)?.unwrap_or_default());
        }
        let mut out = Vec::new();
        let mut c = Some(u64::from(u32_le(h, 0x2C)));
        while let Some(cl) = c {
            if cl < 2 || cl >= self.clusters + 2 || out.len() as u64 >= DIR_SCAN_LIMIT {
                break;
            }
            let take = self.cluster.min(DIR_SCAN_LIMIT - out.len() as u64);
            match read_opt(vol, self.cluster_offset(cl), take)? {
                Some(b) => {
                    let end = b.chunks_exact(32).any(|e| e[0] == 0);
                    out.extend_from_slice(&b);
                    if end {
                        break;
                    }
                }
                None => break,
            }
            c = self.fat32_next(vol, cl)?;
        }
        Ok(out)
    }

    /// Free clusters: FAT32's FSInfo count when plausible, otherwise by reading the first
    /// FAT (only when it is small enough to be cheap).
    fn free_clusters(&self, vol: &dyn Volume, h: &[u8]) -> Result<Option<u64>> {
        if self.bits == 32 {
            // FSInfo: lead signature "RRaA" @0, "rrAa" @484, free count u32 @488.
            let fsinfo = u64::from(u16_le(h, 0x30));
            if fsinfo != 0
                && fsinfo < self.reserved
                && let Some(s) = read_opt(vol, fsinfo * self.sector, 512)?
                && &s[0..4] == b"RRaA"
                && &s[484..488] == b"rrAa"
            {
                let free = u64::from(u32_le(&s, 488));
                if free <= self.clusters {
                    return Ok(Some(free));
                }
            }
        }
        let need = ((self.clusters + 2) * u64::from(self.bits)).div_ceil(8);
        if need > COUNT_LIMIT {
            return Ok(None);
        }
        let mut free = 0u64;
        let mut buf = vec![0u8; (1 << 20).min(need) as usize];
        // Read in pieces whose length is a multiple of 3 bytes (two FAT12 entries) and 4.
        let piece = (buf.len() as u64 / 12).max(1) * 12;
        let mut first_entry = 0u64;
        let mut pos = 0u64;
        while pos < need {
            let n = piece.min(need - pos) as usize;
            let Some(b) = read_opt(vol, self.fat_offset() + pos, n as u64)? else {
                return Ok(None);
            };
            buf[..n].copy_from_slice(&b);
            let entries = (n as u64 * 8) / u64::from(self.bits);
            for i in 0..entries {
                let e = first_entry + i;
                if e < 2 || e >= self.clusters + 2 {
                    continue;
                }
                let v: u32 = match self.bits {
                    12 => {
                        let o = (i * 3 / 2) as usize;
                        if o + 1 >= n {
                            continue;
                        }
                        let w = u16_le(&buf, o);
                        u32::from(if i % 2 == 0 { w & 0xFFF } else { w >> 4 })
                    }
                    16 => u32::from(u16_le(&buf, (i * 2) as usize)),
                    _ => u32_le(&buf, (i * 4) as usize) & 0x0FFF_FFFF,
                };
                if v == 0 {
                    free += 1;
                }
            }
            first_entry += entries;
            pos += n as u64;
        }
        Ok(Some(free))
    }
}

fn fat(vol: &dyn Volume, h: &[u8]) -> Result<Option<Filesystem>> {
    let Some(b) = fat_bpb(vol, h) else {
        return Ok(None);
    };
    let mut f = fs("vfat", "filesystem");
    f.version = Some(format!("FAT{}", b.bits));
    f.block_size = Some(b.cluster as u32);
    f.size = Some(b.total_sectors * b.sector);
    // Extended BPB: boot signature 0x29 then serial u32 and label[11]; @0x26 on FAT12/16,
    // @0x42 on FAT32.
    let ebpb = if b.bits == 32 { 0x42 } else { 0x26 };
    let mut boot_label = None;
    if h[ebpb] == 0x29 || h[ebpb] == 0x28 {
        let serial = u32_le(h, ebpb + 1);
        f.uuid = Some(format!("{:04X}-{:04X}", serial >> 16, serial & 0xFFFF));
        if h[ebpb] == 0x29 {
            let l = String::from_utf8_lossy(&h[ebpb + 5..ebpb + 16])
                .trim_end()
                .to_string();
            if !l.is_empty() && l != "NO NAME" {
                boot_label = Some(l);
            }
        }
    }
    // The label in the root directory wins (as for Windows and blkid): an entry with the
    // volume-label attribute (0x08) that is not a long-name entry (0x0F) nor deleted (0xE5).
    let dir = b.root_dir(vol, h)?;
    let mut dir_label = None;
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
            dir_label = Some(l);
        }
        break;
    }
    f.label = dir_label.or(boot_label);
    if let Some(free) = b.free_clusters(vol, h)? {
        f.used_bytes = Some((b.clusters - free) * b.cluster);
    }
    Ok(Some(f))
}

// ---------------------------------------------------------------------------------------------
// btrfs

fn btrfs(vol: &dyn Volume, _h: &[u8]) -> Result<Option<Filesystem>> {
    // The superblock fields are parsed by the btrfs allocation map's module.
    let Some(sb) = btrfs::Superblock::read(vol)? else {
        return Ok(None);
    };
    let mut f = fs("btrfs", "filesystem");
    f.uuid = nonzero_uuid(&sb.fsid());
    f.label = Some(sb.label().to_string()).filter(|l| !l.is_empty());
    f.block_size = Some(sb.sector_size());
    f.size = Some(sb.size());
    f.used_bytes = sb.used_bytes();
    Ok(Some(f))
}

// ---------------------------------------------------------------------------------------------
// ext2/3/4

fn ext_fs(vol: &dyn Volume, _h: &[u8]) -> Result<Option<Filesystem>> {
    let Some(sb) = ext::Superblock::read(vol)? else {
        return Ok(None);
    };
    let i = sb.info();
    let mut f = fs(&i.fs_type, "filesystem");
    f.uuid = Some(i.uuid).filter(|u| u != "00000000-0000-0000-0000-000000000000");
    f.label = Some(i.label).filter(|l| !l.is_empty());
    f.block_size = Some(i.block_size);
    f.size = Some(i.size);
    f.used_bytes = Some(i.used_bytes);
    Ok(Some(f))
}

// ---------------------------------------------------------------------------------------------
// swap

fn swap(vol: &dyn Volume, h: &[u8]) -> Result<Option<Filesystem>> {
    // swap_header v1 at 1024 (native byte order): version u32, last_page u32, nr_badpages
    // u32, uuid[16] @1036, volume_name[16] @1052; magic in the last 10 bytes of the page.
    for ps in SWAP_PAGE_SIZES {
        let magic = if ps <= h.len() as u64 {
            h[(ps - 10) as usize..ps as usize].to_vec()
        } else {
            match read_opt(vol, ps - 10, 10)? {
                Some(b) => b,
                None => break,
            }
        };
        if magic != SWAP_MAGIC_V1 {
            continue;
        }
        if h.len() < 1068 {
            return Ok(None);
        }
        let (version, last_page) = if u32_le(h, 1024) == 1 {
            (1, u64::from(u32_le(h, 1028)))
        } else if u32_be(h, 1024) == 1 {
            (1, u64::from(u32_be(h, 1028)))
        } else {
            return Ok(None);
        };
        let mut f = fs("swap", "other");
        f.version = Some(format!("{version}"));
        f.uuid = nonzero_uuid(&arr16(h, 1036));
        f.label = cstr(&h[1052..1068]);
        f.block_size = Some(ps as u32);
        f.size = Some((last_page + 1) * ps);
        return Ok(Some(f));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::tests::Mem;
    use proptest::prelude::*;

    fn put(img: &mut [u8], at: usize, bytes: &[u8]) {
        if at + bytes.len() <= img.len() {
            img[at..at + bytes.len()].copy_from_slice(bytes);
        }
    }

    /// A volume whose bytes are random except for the magic and the fields a detector
    /// validates, set to plausible values so that the detector goes past its checks and reads
    /// further structures (MFT records, root directories, FATs, bitmaps) that are random too.
    fn plausible(kind: usize, img: &mut [u8], small: &[u32]) {
        let s = |i: usize| small[i % small.len()];
        match kind {
            0 => {
                put(img, 0, LUKS_MAGIC);
                put(img, 6, &(1 + (s(0) % 2) as u16).to_be_bytes());
            }
            1 => {
                let sec = (s(0) % 4) as usize * 512;
                put(img, sec, LVM_LABEL_ID);
                put(img, sec + 8, &((sec / 512) as u64).to_le_bytes());
                put(img, sec + 20, &(32 + s(1) % 480).to_le_bytes());
                put(img, sec + 24, LVM_TYPE_2);
            }
            2 => {
                put(img, 0, XFS_MAGIC);
                put(img, 4, &(512u32 << (s(0) % 8)).to_be_bytes());
                put(img, 102, &(512u16 << (s(1) % 4)).to_be_bytes());
            }
            3 => {
                put(img, 3, NTFS_OEM);
                put(img, 0x0B, &512u16.to_le_bytes());
                img[0x0D] = 1 << (s(0) % 8);
                for r in [0x0E..0x14, 0x16..0x18, 0x20..0x24] {
                    img[r].fill(0);
                }
                put(img, 0x30, &u64::from(s(1) % 64).to_le_bytes());
                img[0x40] = 0xF6; // 1 KiB records
                let mft = (s(1) % 64) as usize * 512 * img[0x0D] as usize + 3 * 1024;
                put(img, mft, b"FILE");
                put(img, mft + 4, &(s(2) as u16 % 1024).to_le_bytes());
                put(img, mft + 6, &(s(3) as u16 % 4).to_le_bytes());
            }
            4 => {
                put(img, 3, EXFAT_OEM);
                img[11..64].fill(0);
                img[0x6C] = 9 + (s(0) % 4) as u8;
                img[0x6D] = (s(1) % 4) as u8;
                img[0x6E] = 1;
                put(img, 0x50, &(s(2) % 64).to_le_bytes());
                put(img, 0x58, &(s(3) % 128).to_le_bytes());
                put(img, 0x5C, &(s(4) % 100_000).to_le_bytes());
                put(img, 0x60, &(2 + s(5) % 16).to_le_bytes());
            }
            5 => {
                put(img, 0, &[0xEB, 0x3C, 0x90]);
                put(img, 0x0B, &512u16.to_le_bytes());
                img[0x0D] = 1 << (s(0) % 8);
                put(img, 0x0E, &(1 + s(1) as u16 % 64).to_le_bytes());
                img[0x10] = 1 + (s(2) % 2) as u8;
                img[0x15] = 0xF8;
                if s(3) % 2 == 0 {
                    put(img, 0x16, &0u16.to_le_bytes());
                    put(img, 0x11, &0u16.to_le_bytes());
                    put(img, 0x24, &(1 + s(4) % 512).to_le_bytes());
                }
                put(img, 510, &[0x55, 0xAA]);
            }
            6 => {
                put(img, 65536 + 0x40, BTRFS_MAGIC);
                put(img, 65536 + 0x30, &BTRFS_SB_OFFSET.to_le_bytes());
                put(img, 65536 + 0x90, &(512u32 << (s(0) % 8)).to_le_bytes());
            }
            7 => {
                put(img, 1024 + 0x38, &0xEF53u16.to_le_bytes());
                put(img, 1024 + 0x18, &(s(0) % 3).to_le_bytes());
            }
            _ => {
                let ps = SWAP_PAGE_SIZES[(s(0) % 5) as usize] as usize;
                put(img, ps - 10, SWAP_MAGIC_V1);
                put(img, 1024, &1u32.to_le_bytes());
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]
        /// Every detector on random structures never panics, hangs or allocates beyond its
        /// caps; what it reports stays within what it read.
        #[test]
        fn detectors_survive_random_structures(
            kind in 0usize..9,
            seed in proptest::collection::vec(any::<u8>(), 1024),
            small in proptest::collection::vec(any::<u32>(), 6),
            len in 512usize..(200 * 1024),
        ) {
            let mut img: Vec<u8> = seed.iter().cycle().take(len).copied().collect();
            plausible(kind, &mut img, &small);
            if let Ok(d) = detect(&Mem(img))
                && let Some(f) = d.filesystem
            {
                prop_assert!(f.label.map_or(0, |l| l.len()) <= 1024);
            }
        }
    }

    #[test]
    fn lvm_uuid_is_grouped_like_blkid() {
        let mut img = vec![0u8; 4096];
        put(&mut img, 512, LVM_LABEL_ID);
        put(&mut img, 520, &1u64.to_le_bytes());
        put(&mut img, 532, &32u32.to_le_bytes());
        put(&mut img, 536, LVM_TYPE_2);
        put(&mut img, 544, b"VawsyYAX9Wq0CocT19jlOmKuNjTp0yyq");
        let d = detect(&Mem(img)).unwrap();
        let f = d.filesystem.unwrap();
        assert_eq!(f.fs_type, "LVM2_member");
        assert_eq!(
            f.uuid.as_deref(),
            Some("VawsyY-AX9W-q0Co-cT19-jlOm-KuNj-Tp0yyq")
        );
    }
}
