//! The one table of formats a volume can hold, and the one rule that picks among them. Both
//! `volback probe` ([`detect`]) and backup ([`crate::fs::probe`], through [`map`]) use it.
//!
//! Every recogniser reads a few sectors at fixed places, checks magic numbers and the sanity
//! of the fields it uses, and never trusts a length or an offset it read without a bound.
//! Names (`type`) are those of `blkid`, so that scripts can compare the two.
//!
//! [`RECOGNISERS`], in priority order:
//!
//! | type          | where                 | magic / check                                        | map |
//! |---------------|-----------------------|------------------------------------------------------|-----|
//! | ext2/3/4      | byte 1024 + 0x38      | 0xEF53 (see [`crate::fs::ext`])                      | yes |
//! | xfs           | byte 0                | `XFSB`, big-endian superblock                        | yes |
//! | btrfs         | byte 65536 + 0x40     | `_BHRfS_M`, bytenr field = 65536                     | yes |
//! | ntfs          | byte 3                | `NTFS    ` OEM id, sane BPB                          | yes |
//! | exfat         | byte 3                | `EXFAT   ` OEM id, sane shifts                       | yes |
//! | vfat          | byte 0                | jump instruction, sane BPB, 0x55AA or FAT id string  | yes |
//! | crypto_LUKS   | byte 0                | `LUKS\xBA\xBE`, version (u16 BE at 6) 1 or 2         | no  |
//! | LVM2_member   | sector 0–3            | `LABELONE` (label), `LVM2 001` at +24                | no  |
//! | swap          | page size − 10        | `SWAPSPACE2` (v1), page sizes 4 KiB to 64 KiB        | no  |
//!
//! **The rule**: the volume's format is the first recogniser in this order that matches. A
//! volume can carry several signatures (a superblock that a later `mkfs` did not overwrite);
//! `probe` reports the first and names the others in a warning. Backup cannot tell which one is
//! live, and a map made from a stale superblock would leave the live filesystem's data unread:
//! it reads every block of such a volume, with a warning naming both. A format without a map
//! (LUKS, LVM2, swap) is read whole.
//! An I/O error while recognising is a warning in `probe` (the next recogniser is tried) and
//! an error in backup.

use super::{Probe, uuid_at, uuid_string};
use super::{btrfs, exfat, ext, fat, ntfs, xfs};
use crate::bytes::{be_u16 as u16_be, be_u32 as u32_be, le_u32 as u32_le, le_u64 as u64_le};
use crate::error::Result;
use crate::volume::Volume;
use serde::{Deserialize, Serialize};

/// LUKS (1 and 2) header magic at byte 0.
pub const LUKS_MAGIC: &[u8; 6] = b"LUKS\xBA\xBE";
/// LVM2 physical volume label id, in one of the first four sectors.
pub const LVM_LABEL_ID: &[u8; 8] = b"LABELONE";
pub const LVM_TYPE_2: &[u8; 8] = b"LVM2 001";
/// XFS superblock magic (`XFS_SB_MAGIC`, 0x58465342).
pub const XFS_MAGIC: &[u8; 4] = xfs::MAGIC;
pub use super::exfat::EXFAT_OEM;
pub use super::ntfs::NTFS_OEM;
/// btrfs primary superblock offset and magic (at 0x40 in the superblock).
pub const BTRFS_SB_OFFSET: u64 = btrfs::SB_OFFSET;
pub const BTRFS_MAGIC: &[u8; 8] = btrfs::MAGIC;
/// Linux swap v1 magic, in the last 10 bytes of the first page.
pub const SWAP_MAGIC_V1: &[u8; 10] = b"SWAPSPACE2";
/// Page sizes tried for swap (x86 4 KiB up to 64 KiB on some arm64/ppc64 kernels).
pub const SWAP_PAGE_SIZES: [u64; 5] = [4096, 8192, 16384, 32768, 65536];

/// Bytes read from the start of a volume for the detectors that look there.
const HEAD_LEN: u64 = 4096;
/// Largest FAT or allocation bitmap (NTFS, exFAT) read to count used clusters (a FAT16 FAT is
/// at most 128 KiB; 16 MiB of bitmap covers 128 Mi clusters). Beyond it, used bytes are not
/// reported.
const COUNT_LIMIT: u64 = 16 << 20;

/// A NUL-terminated (or full-length) byte string; `None` when empty.
fn cstr(b: &[u8]) -> Option<String> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    let s = String::from_utf8_lossy(&b[..end]).into_owned();
    (!s.is_empty()).then_some(s)
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

/// A filesystem or other recognised format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filesystem {
    /// `blkid` TYPE: ext2, ext3, ext4, xfs, btrfs, ntfs, vfat, exfat, swap, LVM2_member,
    /// crypto_LUKS.
    #[serde(rename = "type")]
    pub fs_type: String,
    /// `blkid` USAGE: filesystem, crypto, raid, other.
    pub usage: String,
    /// FAT12/FAT16/FAT32, LUKS 1/2, swap 1, LVM2 001, exFAT revision.
    pub version: Option<String>,
    pub uuid: Option<String>,
    pub label: Option<String>,
    /// Allocation unit (block, cluster, page) in bytes.
    pub block_size: Option<u32>,
    /// Bytes the format says it spans.
    pub size: Option<u64>,
    /// Bytes the format reports as used, where its superblock says so cheaply.
    pub used_bytes: Option<u64>,
}

/// What [`detect`] found.
#[derive(Debug, Clone, Default)]
pub struct Detection {
    pub filesystem: Option<Filesystem>,
    pub warnings: Vec<String>,
}

/// Describes the format of a volume (given its first [`HEAD_LEN`] bytes) when it matches.
type Describe = fn(&dyn Volume, &[u8]) -> Result<Option<Filesystem>>;
/// Builds the allocation map of a volume at a granularity when the format matches.
type Map = fn(&dyn Volume, u64) -> Result<Option<Probe>>;

/// One format of [`RECOGNISERS`].
pub struct Recogniser {
    /// As warnings name it ("while checking for NTFS").
    pub name: &'static str,
    describe: Describe,
    /// `None`: no allocation map, every block is read.
    map: Option<Map>,
}

/// The formats, in priority order (see the module documentation for the rule).
pub static RECOGNISERS: [Recogniser; 9] = [
    Recogniser {
        name: "ext",
        describe: ext_fs,
        map: Some(|vol, g| {
            Ok(ext::Superblock::read(vol)?
                .map(|sb| Probe::mapped(sb.info(), ext::allocation_map(vol, &sb, g))))
        }),
    },
    Recogniser {
        name: "XFS",
        describe: xfs,
        map: Some(|vol, g| {
            Ok(xfs::Superblock::read(vol)?.map(|sb| {
                let mut p = Probe::mapped(sb.info(), xfs::allocation_map(vol, &sb, g));
                p.warning = p.warning.or(sb.realtime_note());
                p
            }))
        }),
    },
    Recogniser {
        name: "btrfs",
        describe: btrfs,
        map: Some(|vol, g| {
            Ok(btrfs::Superblock::read(vol)?
                .map(|sb| Probe::mapped(sb.info(), btrfs::allocation_map(vol, &sb, g))))
        }),
    },
    Recogniser {
        name: "NTFS",
        describe: ntfs,
        map: Some(|vol, g| Ok(ntfs::probe(vol, g)?.map(|(i, m)| Probe::mapped(i, m)))),
    },
    Recogniser {
        name: "exFAT",
        describe: exfat,
        map: Some(|vol, g| Ok(exfat::probe(vol, g)?.map(|(i, m)| Probe::mapped(i, m)))),
    },
    Recogniser {
        name: "FAT",
        describe: fat,
        map: Some(|vol, g| Ok(fat::probe(vol, g)?.map(|(i, m)| Probe::mapped(i, m)))),
    },
    Recogniser {
        name: "LUKS",
        describe: luks,
        map: None,
    },
    Recogniser {
        name: "LVM2",
        describe: lvm2,
        map: None,
    },
    Recogniser {
        name: "swap",
        describe: swap,
        map: None,
    },
];

/// The first [`HEAD_LEN`] bytes of `vol` (fewer when it is shorter).
fn head(vol: &dyn Volume) -> Result<Vec<u8>> {
    let mut head = vec![0u8; vol.size().min(HEAD_LEN) as usize];
    vol.read_at(0, &mut head)?;
    Ok(head)
}

/// Describes the format of `vol`: the first match of [`RECOGNISERS`], and warnings naming the
/// stale signatures that also match and the recognisers that could not read what they need.
pub fn detect(vol: &dyn Volume) -> Result<Detection> {
    let head = head(vol)?;
    let mut found: Vec<Filesystem> = Vec::new();
    let mut warnings = Vec::new();
    for r in &RECOGNISERS {
        match (r.describe)(vol, &head) {
            Ok(Some(f)) => found.push(f),
            Ok(None) => {}
            Err(e) => warnings.push(format!("while checking for {}: {e}", r.name)),
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

/// Backup's use of the table: the allocation map of `vol` at `granularity` bytes per bit, by
/// the first recogniser that matches; later ones are not tried. A match without a map (LUKS,
/// LVM2, swap), like no match, gives no filesystem and no map.
pub fn map(vol: &dyn Volume, granularity: u64) -> Result<Probe> {
    let none = Probe {
        fs: None,
        map: None,
        warning: None,
    };
    let mut head_bytes = None;
    for (i, r) in RECOGNISERS.iter().enumerate() {
        match r.map {
            Some(map) => {
                if let Some(p) = map(vol, granularity)? {
                    return Ok(unless_ambiguous(vol, p, &RECOGNISERS[i + 1..]));
                }
            }
            None => {
                let h = match &head_bytes {
                    Some(h) => h,
                    None => head_bytes.insert(head(vol)?),
                };
                if (r.describe)(vol, h)?.is_some() {
                    return Ok(none);
                }
            }
        }
    }
    Ok(none)
}

/// `p`, the map of the first recogniser that matched, unless one of the `later` recognisers
/// matches too. Then the volume carries two signatures and nothing on it says which one is
/// live: a map made from the stale one would leave the live filesystem's data unread, so the
/// map is dropped (every block is read) and the warning names both. A later recogniser that
/// cannot read what it needs does not count as a match.
fn unless_ambiguous(vol: &dyn Volume, p: Probe, later: &[Recogniser]) -> Probe {
    if p.map.is_none() {
        return p;
    }
    let Ok(h) = head(vol) else { return p };
    let also: Vec<String> = later
        .iter()
        .filter_map(|r| (r.describe)(vol, &h).ok().flatten())
        .map(|f| f.fs_type)
        .collect();
    if also.is_empty() {
        return p;
    }
    let fs_type = p.fs.as_ref().map_or("filesystem", |f| f.fs_type.as_str());
    let warning = format!(
        "the {fs_type} volume also carries {} signature{} (left over from an earlier format?); \
         which one is live cannot be told, so every block is read (remove the stale signature \
         with `wipefs` to back up only used blocks)",
        also.join(", "),
        if also.len() > 1 { "s" } else { "" }
    );
    Probe {
        fs: p.fs,
        map: None,
        warning: Some(match p.warning {
            Some(w) => format!("{w}; {warning}"),
            None => warning,
        }),
    }
}

/// Whether sector 0 (`head`) is a filesystem boot sector (FAT, NTFS, exFAT) rather than a
/// partition table: those also end in 0x55AA.
pub fn is_volume_boot_record(head: &[u8]) -> bool {
    head.len() >= 512
        && (ntfs::BootSector::parse(head).is_some()
            || exfat::BootSector::parse(head).is_some()
            || fat::Bpb::parse(head).is_some())
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
// NTFS (boot sector and MFT parsing: [`crate::fs::ntfs`])

fn ntfs(vol: &dyn Volume, h: &[u8]) -> Result<Option<Filesystem>> {
    let Some(b) = ntfs::BootSector::parse(h) else {
        return Ok(None);
    };
    let mut f = fs("ntfs", "filesystem");
    f.uuid = Some(b.uuid());
    f.block_size = Some(b.cluster_size as u32);
    f.size = Some(b.size());
    // The label is attribute 0x60 of MFT record 3; used clusters are counted in $Bitmap.
    if let Ok(mft) = ntfs::Mft::open(vol, &b) {
        f.label = mft.label(vol).ok().flatten();
        f.used_bytes = mft
            .used_clusters(vol, COUNT_LIMIT)
            .ok()
            .map(|n| n * b.cluster_size);
    }
    Ok(Some(f))
}

// ---------------------------------------------------------------------------------------------
// exFAT (boot sector, directory and bitmap parsing: [`crate::fs::exfat`])

fn exfat(vol: &dyn Volume, h: &[u8]) -> Result<Option<Filesystem>> {
    let Some(b) = exfat::BootSector::parse(h) else {
        return Ok(None);
    };
    let mut f = fs("exfat", "filesystem");
    f.uuid = Some(b.uuid());
    f.version = Some(b.version());
    f.block_size = Some(b.cluster as u32);
    f.size = b.size();
    // The label and the allocation bitmap are found in the root directory.
    if let Ok(root) = b.root(vol) {
        f.label = root.label.clone();
        f.used_bytes = b
            .used_clusters(vol, &root, COUNT_LIMIT)
            .ok()
            .map(|n| n * b.cluster);
    }
    Ok(Some(f))
}

// ---------------------------------------------------------------------------------------------
// FAT12/16/32 (BPB, FAT and root directory parsing: [`crate::fs::fat`])

fn fat(vol: &dyn Volume, h: &[u8]) -> Result<Option<Filesystem>> {
    let Some(b) = fat::Bpb::parse(h) else {
        return Ok(None);
    };
    let mut f = fs("vfat", "filesystem");
    f.version = Some(b.version());
    f.block_size = Some(b.cluster as u32);
    f.size = Some(b.size());
    f.uuid = b.uuid();
    f.label = b.label(vol);
    // FAT32's FSInfo count when plausible, otherwise counted in a FAT small enough to read.
    let free = match b.fsinfo_free(vol) {
        Some(free) => Some(free),
        None => b.count_free(vol, COUNT_LIMIT).ok(),
    };
    f.used_bytes = free.map(|free| (b.clusters - free) * b.cluster);
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
        f.uuid = nonzero_uuid(&uuid_at(h, 1036));
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
    use crate::fs::tests::Mem;
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

    /// A FAT12 boot sector (a stale one, as an earlier `mkfs.vfat` leaves it).
    fn fat_boot_sector(img: &mut [u8]) {
        put(img, 0, &[0xEB, 0x3C, 0x90]);
        put(img, 3, b"mkfs.fat");
        put(img, 0x0B, &512u16.to_le_bytes());
        img[0x0D] = 4;
        put(img, 0x0E, &1u16.to_le_bytes());
        img[0x10] = 2;
        put(img, 0x11, &64u16.to_le_bytes());
        put(img, 0x13, &4096u16.to_le_bytes());
        img[0x15] = 0xF8;
        put(img, 0x16, &3u16.to_le_bytes());
        put(img, 0x36, b"FAT12   ");
        put(img, 510, &[0x55, 0xAA]);
    }

    /// A real ext4 whose unused boot block still holds a FAT boot sector: both signatures
    /// match; the first in table order (ext4) is the format probe reports, naming the other;
    /// backup reads every block, since a map from the stale one would lose data.
    #[test]
    fn two_signatures_first_in_table_order_wins() {
        let mut img = zstd::decode_all(
            &include_bytes!("../../tests/fixtures/ext4-tracking-current.img.zst")[..],
        )
        .unwrap();
        fat_boot_sector(&mut img);
        let vol = Mem(img.clone());
        assert!(
            fat(&vol, &img[..4096]).unwrap().is_some(),
            "the FAT signature matches"
        );

        let d = detect(&vol).unwrap();
        assert_eq!(d.filesystem.unwrap().fs_type, "ext4");
        assert!(
            d.warnings
                .iter()
                .any(|w| w.starts_with("also carries vfat signature")),
            "{:?}",
            d.warnings
        );

        // Backup cannot tell which signature is live: no map, every block is read.
        let p = map(&vol, 4096).unwrap();
        assert_eq!(p.fs.unwrap().fs_type, "ext4");
        let w = p.warning.unwrap();
        assert!(p.map.is_none() && w.contains("also carries vfat"), "{w}");

        // Without the ext4 superblock, the FAT boot sector alone is the format.
        img[1024..2048].fill(0);
        let d = detect(&Mem(img)).unwrap();
        assert_eq!(d.filesystem.unwrap().fs_type, "vfat");
    }

    /// Formats without a map are recognised by backup too, and read whole.
    #[test]
    fn a_format_without_a_map_gives_no_map() {
        let mut img = vec![0u8; 8192];
        put(&mut img, 0, LUKS_MAGIC);
        put(&mut img, 6, &2u16.to_be_bytes());
        let vol = Mem(img);
        assert_eq!(
            detect(&vol).unwrap().filesystem.unwrap().fs_type,
            "crypto_LUKS"
        );
        let p = map(&vol, 4096).unwrap();
        assert!(p.fs.is_none() && p.map.is_none() && p.warning.is_none());
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
