//! NTFS: the boot sector, MFT records with their multi-sector fixups, and the `$Bitmap` file.
//!
//! Layout facts used here (all little-endian), from the NTFS on-disk format as the ntfs-3g and
//! Linux drivers document it:
//! - Boot sector: OEM id `NTFS    ` at 3; BPB bytes/sector u16 @0x0B, sectors/cluster u8
//!   @0x0D (above 0x80: 2^(256−n)), the FAT-only fields (reserved sectors @0x0E, FAT count
//!   @0x10, root entries @0x11, sectors16 @0x13, sectors/FAT @0x16, sectors32 @0x20) all
//!   zero; total sectors u64 @0x28 (the volume less its last sector, which holds the backup
//!   boot sector), `$MFT` LCN u64 @0x30, `$MFTMirr` LCN u64 @0x38, clusters per MFT record
//!   i8 @0x40 (negative: 2^−n bytes), serial number u64 @0x48.
//! - MFT record ("file record"): `FILE` @0; update sequence array offset u16 @4 and count u16
//!   @6; flags u16 @0x16 (1 = in use); bytes in use u32 @0x18; first attribute offset u16
//!   @0x14; record number u32 @0x2C (NTFS 3.1 headers, update sequence array at 0x30). The
//!   record is written in 512-byte strides whose last two bytes are replaced by the update
//!   sequence number; the array (number, then one saved pair per stride) gives them back. A
//!   stride whose last two bytes differ from the number was torn by an interrupted write.
//! - Attribute: type u32 @0, length u32 @4, non-resident u8 @8, name length (UTF-16 units) u8
//!   @9. Resident: value length u32 @0x10, value offset u16 @0x14. Non-resident: lowest VCN
//!   u64 @0x10, highest VCN u64 @0x18, runlist offset u16 @0x20, allocated size u64 @0x28,
//!   data size u64 @0x30, initialised size u64 @0x38. Type 0xFFFFFFFF ends the list.
//! - Runlist: a header byte (low nibble: bytes of the run length, high nibble: bytes of the
//!   LCN delta; 0 ends the list), the length (unsigned), the delta from the previous run's LCN
//!   (signed; absent for a sparse run).
//! - `$MFT` is record 0 (its unnamed `$DATA` locates every other record), `$Volume` record 3
//!   (label: resident attribute 0x60, UTF-16LE), `$Bitmap` record 6: its unnamed `$DATA` has
//!   one bit per cluster, least significant bit first, set when the cluster is in use.
//!
//! Every cluster number, length and size read from disk is checked against the cluster
//! count and the volume before use; a violation, a torn record or an attribute list makes the
//! map unusable (the caller then reads every block) instead of trusting it.
//!
//! `$Bitmap` is trusted only once it agrees with the rest of the filesystem: every cluster of
//! the filesystem's own files (the non-resident attributes of MFT records 0–15: `$MFT`,
//! `$MFTMirr`, `$LogFile`, `$AttrDef`, the root directory, `$Bitmap`, `$Boot`, `$Secure`,
//! `$UpCase`, `$Extend`…) must be marked used, the first MFT records must equal their copies in
//! `$MFTMirr`, and `$MFT`'s own record bitmap must mark the system records in use. A `$Bitmap`
//! zeroed or overwritten fails the first check; a damaged MFT start fails the second.

use super::alloc::{self, PIECE, Required, UsedRuns, with_used_bytes};
use super::{BlockMap, FsInfo};
use crate::bytes::{le_u16 as u16_at, le_u32 as u32_at, le_u64 as u64_at};
use crate::error::Result;
use crate::fs::check::{Checked, bad, within};

use crate::volume::Volume;

/// The OEM id at byte 3 of the boot sector.
pub const NTFS_OEM: &[u8; 8] = b"NTFS    ";

/// MFT records the map reads.
const RECORD_MFT: u64 = 0;
const RECORD_MFTMIRR: u64 = 1;
const RECORD_VOLUME: u64 = 3;
const RECORD_BITMAP: u64 = 6;
const RECORD_BADCLUS: u64 = 8;
/// The system files, records 0 to 15 (12–15 are reserved: checked only when readable).
const SYSTEM_NAMES: [&str; 16] = [
    "$MFT",
    "$MFTMirr",
    "$LogFile",
    "$Volume",
    "$AttrDef",
    "the root directory",
    "$Bitmap",
    "$Boot",
    "$BadClus",
    "$Secure",
    "$UpCase",
    "$Extend",
    "MFT record 12",
    "MFT record 13",
    "MFT record 14",
    "MFT record 15",
];
/// Records 0 to 11 always exist on NTFS 1.2 and later.
const REQUIRED_RECORDS: u64 = 12;
/// `$MFTMirr` copies at least the first four records.
const MIRROR_RECORDS: u64 = 4;
/// Attribute types.
const ATTR_ATTRIBUTE_LIST: u32 = 0x20;
const ATTR_VOLUME_NAME: u32 = 0x60;
const ATTR_DATA: u32 = 0x80;
const ATTR_BITMAP: u32 = 0xB0;
const ATTR_END: u32 = 0xFFFF_FFFF;
/// Multi-sector fixups protect strides of 512 bytes whatever the sector size.
const FIXUP_STRIDE: usize = 512;
const RECORD_IN_USE: u16 = 0x1;
/// The `$Boot` file: the first 8 KiB of the volume (boot sector and boot code).
const BOOT_FILE_LEN: u64 = 8192;

/// The fields of an NTFS boot sector that the map needs.
#[derive(Debug, Clone)]
pub struct BootSector {
    pub sector_size: u64,
    pub cluster_size: u64,
    /// Sectors of the filesystem (the backup boot sector follows them).
    pub total_sectors: u64,
    pub mft_lcn: u64,
    pub mirror_lcn: u64,
    pub record_size: u64,
    pub serial: u64,
}

impl BootSector {
    /// Parses sector 0; `None` when it is not a plausible NTFS boot sector.
    pub fn parse(h: &[u8]) -> Option<BootSector> {
        if h.len() < 512 || h[3..11] != *NTFS_OEM {
            return None;
        }
        let sector = u64::from(u16_at(h, 0x0B));
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
        if u16_at(h, 0x0E) != 0 || h[0x10] != 0 || u16_at(h, 0x11) != 0 || u16_at(h, 0x13) != 0 {
            return None;
        }
        if u16_at(h, 0x16) != 0 || u32_at(h, 0x20) != 0 {
            return None;
        }
        let cluster = sector.checked_mul(spc)?;
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
        let total_sectors = u64_at(h, 0x28);
        total_sectors.checked_mul(sector)?;
        Some(BootSector {
            sector_size: sector,
            cluster_size: cluster,
            total_sectors,
            mft_lcn: u64_at(h, 0x30),
            mirror_lcn: u64_at(h, 0x38),
            record_size: record,
            serial: u64_at(h, 0x48),
        })
    }

    /// Reads and parses sector 0 of `vol`.
    pub fn read(vol: &dyn Volume) -> Result<Option<BootSector>> {
        Ok(super::alloc::boot_sector(vol)?.and_then(|h| BootSector::parse(&h)))
    }

    /// Clusters of the filesystem.
    pub fn clusters(&self) -> u64 {
        self.total_sectors / (self.cluster_size / self.sector_size)
    }

    /// Bytes the filesystem spans (without the backup boot sector), as `blkid` counts them.
    pub fn size(&self) -> u64 {
        // Checked by `parse`.
        self.total_sectors * self.sector_size
    }

    /// The serial number as `blkid` prints it (16 upper-case hex digits).
    pub fn uuid(&self) -> String {
        format!("{:016X}", self.serial)
    }
}

/// Applies the update sequence array of a multi-sector protected record in place, checking
/// that every stride carries the update sequence number.
pub fn apply_fixups(r: &mut [u8]) -> Checked<()> {
    if r.len() < FIXUP_STRIDE || !r.len().is_multiple_of(FIXUP_STRIDE) {
        return Err(bad!("a {}-byte record cannot carry fixups", r.len()));
    }
    let usa = usize::from(u16_at(r, 4));
    let count = usize::from(u16_at(r, 6));
    let strides = r.len() / FIXUP_STRIDE;
    // The array lies in the first stride, before its protected last two bytes.
    if count != strides + 1 || !usa.is_multiple_of(2) || usa < 8 || usa + 2 * count > 510 {
        return Err(bad!(
            "update sequence array at {usa} with {count} entries does not fit a {}-byte \
             record",
            r.len()
        ));
    }
    let usn = [r[usa], r[usa + 1]];
    for i in 1..count {
        let end = i * FIXUP_STRIDE;
        if r[end - 2..end] != usn {
            return Err(bad!(
                "stride {i} does not end in the update sequence number (torn write)"
            ));
        }
        r[end - 2] = r[usa + 2 * i];
        r[end - 1] = r[usa + 2 * i + 1];
    }
    Ok(())
}

/// A run of a non-resident attribute: `len` clusters from virtual cluster `vcn` stored at
/// logical cluster `lcn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub vcn: u64,
    pub lcn: u64,
    pub len: u64,
}

/// Decodes a runlist of a metadata file on a volume of `clusters` clusters. Sparse runs, runs
/// outside the volume and more virtual clusters than the volume has are refused (metadata
/// files are never sparse, and a file cannot be bigger than its volume).
pub fn decode_runlist(b: &[u8], clusters: u64) -> Checked<Vec<Run>> {
    decode(b, clusters, false)
}

/// Decodes the runlist of any file's attribute: sparse runs (compressed and sparse files) are
/// skipped, and the virtual clusters may outnumber the volume's; every allocated run must lie
/// inside the volume.
fn decode_file_runlist(b: &[u8], clusters: u64) -> Checked<Vec<Run>> {
    decode(b, clusters, true)
}

fn decode(b: &[u8], clusters: u64, sparse_ok: bool) -> Checked<Vec<Run>> {
    let mut runs = Vec::new();
    let mut pos = 0usize;
    let mut vcn = 0u64;
    let mut lcn = 0i64;
    loop {
        let Some(&h) = b.get(pos) else {
            return Err(bad!("the runlist has no end marker"));
        };
        if h == 0 {
            return Ok(runs);
        }
        let len_bytes = usize::from(h & 0x0F);
        let off_bytes = usize::from(h >> 4);
        if !(1..=8).contains(&len_bytes) || off_bytes > 8 {
            return Err(bad!("runlist header byte {h:#04x} is invalid"));
        }
        let field = |at: usize, n: usize| -> Checked<&[u8]> {
            b.get(at..at + n)
                .ok_or_else(|| bad!("the runlist runs past its attribute"))
        };
        let len = le_unsigned(field(pos + 1, len_bytes)?);
        if off_bytes == 0 && sparse_ok {
            pos += 1 + len_bytes;
            vcn = vcn
                .checked_add(len)
                .ok_or_else(|| bad!("the runlist overflows at VCN {vcn}"))?;
            continue;
        }
        if off_bytes == 0 {
            return Err(bad!("sparse run at VCN {vcn} in a metadata file"));
        }
        let delta = le_signed(field(pos + 1 + len_bytes, off_bytes)?);
        pos += 1 + len_bytes + off_bytes;
        lcn = lcn
            .checked_add(delta)
            .filter(|&l| l >= 0)
            .ok_or_else(|| bad!("run at VCN {vcn} has a negative LCN"))?;
        let start = lcn as u64;
        if len == 0 || start.checked_add(len).is_none_or(|e| e > clusters) {
            return Err(bad!(
                "run at VCN {vcn} (LCN {start}, {len} clusters) lies outside the {clusters} \
                 clusters of the volume"
            ));
        }
        runs.push(Run {
            vcn,
            lcn: start,
            len,
        });
        vcn = vcn
            .checked_add(len)
            .filter(|&v| sparse_ok || v <= clusters)
            .ok_or_else(|| bad!("the runlist maps more than the {clusters} clusters"))?;
    }
}

fn le_unsigned(b: &[u8]) -> u64 {
    b.iter()
        .rev()
        .fold(0u64, |acc, &x| (acc << 8) | u64::from(x))
}

fn le_signed(b: &[u8]) -> i64 {
    let v = le_unsigned(b);
    let bits = 8 * b.len() as u32;
    if bits == 0 || bits == 64 {
        return v as i64;
    }
    // Sign-extend from the top bit of the field.
    let shift = 64 - bits;
    ((v << shift) as i64) >> shift
}

/// One attribute of a record.
struct Attr<'a> {
    ty: u32,
    b: &'a [u8],
}

impl<'a> Attr<'a> {
    fn non_resident(&self) -> bool {
        self.b[8] != 0
    }

    fn unnamed(&self) -> bool {
        self.b[9] == 0
    }

    /// The runlist of a non-resident attribute (sparse runs refused) on a volume of
    /// `clusters` clusters.
    fn runs(&self, clusters: u64) -> Checked<Vec<Run>> {
        let at = usize::from(u16_at(self.b, 0x20));
        decode_runlist(self.b.get(at..).unwrap_or_default(), clusters)
    }

    fn resident_value(&self) -> Checked<&'a [u8]> {
        let b = self.b;
        let len = u32_at(b, 0x10) as usize;
        let off = usize::from(u16_at(b, 0x14));
        off.checked_add(len)
            .and_then(|end| b.get(off..end))
            .ok_or_else(|| bad!("resident value of attribute {:#x} overflows it", self.ty))
    }
}

/// A data attribute's content.
enum Data<'a> {
    Resident(&'a [u8]),
    NonResident {
        runs: Vec<Run>,
        /// Bytes of data (initialised: the map refuses anything less).
        size: u64,
    },
}

/// An MFT record with its fixups applied.
pub struct Record {
    bytes: Vec<u8>,
    number: u64,
}

impl Record {
    /// Checks the record header, applies fixups and checks that it is record `number` in use.
    fn parse(mut bytes: Vec<u8>, number: u64) -> Checked<Record> {
        if bytes.len() < 64 || &bytes[0..4] != b"FILE" {
            return Err(bad!("MFT record {number} has no FILE signature"));
        }
        apply_fixups(&mut bytes).map_err(|e| within(e, format!("MFT record {number}")))?;
        if u16_at(&bytes, 0x16) & RECORD_IN_USE == 0 {
            return Err(bad!("MFT record {number} is not in use"));
        }
        // NTFS 3.1 headers (array at 0x30 or later) carry their own number.
        if u16_at(&bytes, 4) >= 0x30 && u64::from(u32_at(&bytes, 0x2C)) != number {
            return Err(bad!(
                "MFT record {number} says it is record {}",
                u32_at(&bytes, 0x2C)
            ));
        }
        Ok(Record { bytes, number })
    }

    /// The attributes, each checked to lie inside the used part of the record.
    fn attributes(&self) -> Checked<Vec<Attr<'_>>> {
        let r = &self.bytes;
        let n = self.number;
        let used = (u32_at(r, 0x18) as usize).min(r.len());
        let mut a = usize::from(u16_at(r, 0x14));
        let mut out = Vec::new();
        // Each attribute takes at least 24 bytes, so the walk ends.
        loop {
            if a + 8 > used {
                return Err(bad!("MFT record {n}: attribute list has no end marker"));
            }
            let ty = u32_at(r, a);
            if ty == ATTR_END {
                return Ok(out);
            }
            let len = u32_at(r, a + 4) as usize;
            if len < 24 || !len.is_multiple_of(8) || a + len > used {
                return Err(bad!(
                    "MFT record {n}: attribute {ty:#x} at {a} has a bad length {len}"
                ));
            }
            let b = &r[a..a + len];
            if b[8] != 0 && len < 0x40 {
                return Err(bad!(
                    "MFT record {n}: non-resident attribute {ty:#x} is too short"
                ));
            }
            out.push(Attr { ty, b });
            a += len;
        }
    }

    /// The unnamed `$DATA` attribute of a metadata file on a volume of `clusters` clusters.
    fn data(&self, clusters: u64, cluster_size: u64) -> Checked<Data<'_>> {
        let n = self.number;
        let attrs = self.attributes()?;
        let Some(a) = attrs.iter().find(|a| a.ty == ATTR_DATA && a.unnamed()) else {
            return Err(if attrs.iter().any(|a| a.ty == ATTR_ATTRIBUTE_LIST) {
                bad!("MFT record {n}: $DATA is in extension records (attribute list)")
            } else {
                bad!("MFT record {n} has no $DATA attribute")
            });
        };
        if !a.non_resident() {
            return Ok(Data::Resident(a.resident_value()?));
        }
        let b = a.b;
        let lowest = u64_at(b, 0x10);
        let highest = u64_at(b, 0x18);
        let data_size = u64_at(b, 0x30);
        let initialised = u64_at(b, 0x38);
        if lowest != 0 {
            return Err(bad!(
                "MFT record {n}: $DATA starts at VCN {lowest} (continued from elsewhere)"
            ));
        }
        let runs = a
            .runs(clusters)
            .map_err(|e| within(e, format!("MFT record {n}")))?;
        let mapped = runs.last().map_or(0, |r| r.vcn + r.len);
        if highest.checked_add(1) != Some(mapped) {
            return Err(bad!(
                "MFT record {n}: $DATA ends at VCN {highest} but its runs map {mapped} clusters"
            ));
        }
        // `mapped` <= clusters, and the volume holds clusters × cluster size bytes.
        if data_size > mapped * cluster_size || initialised < data_size {
            return Err(bad!(
                "MFT record {n}: $DATA of {data_size} bytes ({initialised} initialised) does \
                 not match its {mapped} clusters"
            ));
        }
        Ok(Data::NonResident {
            runs,
            size: data_size,
        })
    }
}

/// Reads `buf.len()` bytes at `offset` of a non-resident attribute.
fn read_runs(
    vol: &dyn Volume,
    runs: &[Run],
    cluster: u64,
    offset: u64,
    buf: &mut [u8],
    what: &str,
) -> Checked<()> {
    let mut done = 0usize;
    while done < buf.len() {
        let pos = offset + done as u64;
        let vcn = pos / cluster;
        let run = runs
            .iter()
            .find(|r| r.vcn <= vcn && vcn < r.vcn + r.len)
            .ok_or_else(|| bad!("{what}: byte {pos} is not mapped"))?;
        let left = (run.vcn + run.len) * cluster - pos;
        let n = left.min((buf.len() - done) as u64) as usize;
        let disk = (run.lcn + (vcn - run.vcn)) * cluster + pos % cluster;
        alloc::read(vol, disk, &mut buf[done..done + n], what)?;
        done += n;
    }
    Ok(())
}

/// The master file table: where its records are.
pub struct Mft {
    boot: BootSector,
    runs: Vec<Run>,
}

impl Mft {
    /// Reads record 0 (`$MFT`) at the LCN the boot sector gives, and its `$DATA` runlist.
    pub fn open(vol: &dyn Volume, boot: &BootSector) -> Checked<Mft> {
        let clusters = boot.clusters();
        if boot.mft_lcn >= clusters {
            return Err(bad!(
                "$MFT at cluster {} is outside the {clusters} clusters",
                boot.mft_lcn
            ));
        }
        let mut b = vec![0u8; boot.record_size as usize];
        alloc::read(
            vol,
            boot.mft_lcn * boot.cluster_size,
            &mut b,
            "MFT record 0",
        )?;
        let rec = Record::parse(b, RECORD_MFT)?;
        let runs = match rec.data(clusters, boot.cluster_size)? {
            Data::NonResident { runs, .. } => runs,
            Data::Resident(_) => return Err(bad!("$MFT's $DATA is resident")),
        };
        if runs.first().map(|r| r.lcn) != Some(boot.mft_lcn) {
            return Err(bad!(
                "$MFT's $DATA does not start where the boot sector says"
            ));
        }
        Ok(Mft {
            boot: boot.clone(),
            runs,
        })
    }

    /// Reads the raw bytes of MFT record `n`.
    fn raw_record(&self, vol: &dyn Volume, n: u64) -> Checked<Vec<u8>> {
        let size = self.boot.record_size;
        let mut b = vec![0u8; size as usize];
        read_runs(
            vol,
            &self.runs,
            self.boot.cluster_size,
            n * size,
            &mut b,
            &format!("MFT record {n}"),
        )?;
        Ok(b)
    }

    /// Reads MFT record `n`.
    fn record(&self, vol: &dyn Volume, n: u64) -> Checked<Record> {
        Record::parse(self.raw_record(vol, n)?, n)
    }

    /// The clusters of the filesystem's own files: `$Boot`'s first 8 KiB, `$MFT`'s runs and
    /// every run of a non-resident attribute of MFT records 0 to 15 (but `$BadClus`'s `$Bad`
    /// stream, which is sparse and names clusters that may not be readable). Records 0 to 11
    /// must be readable and sound; the reserved records 12 to 15 are skipped when not.
    fn system_clusters(&self, vol: &dyn Volume) -> Checked<Required> {
        let clusters = self.boot.clusters();
        let mut req = Required::default();
        req.add(0, BOOT_FILE_LEN.div_ceil(self.boot.cluster_size), "$Boot");
        for r in &self.runs {
            req.add(r.lcn, r.len, "$MFT");
        }
        for (n, name) in (0u64..).zip(SYSTEM_NAMES) {
            let found = self.record(vol, n).and_then(|rec| {
                let mut runs = Vec::new();
                for a in rec.attributes()? {
                    if !a.non_resident() || (n == RECORD_BADCLUS && !a.unnamed()) {
                        continue;
                    }
                    let what = format!("{name} (attribute {:#x})", a.ty);
                    let r = a
                        .runs(clusters)
                        .map_err(|e| within(e, format!("MFT record {n}, attribute {:#x}", a.ty)))?;
                    runs.extend(r.into_iter().map(|r| (r, what.clone())));
                }
                Ok(runs)
            });
            match found {
                Ok(runs) => runs
                    .iter()
                    .for_each(|(r, what)| req.add(r.lcn, r.len, what)),
                Err(e) if n < REQUIRED_RECORDS => return Err(e),
                Err(_) => {}
            }
        }
        Ok(req)
    }

    /// The clusters of every file: the runs of each non-resident attribute of every MFT
    /// record in use after the system records (extension records included, so attribute
    /// lists need not be followed). An in-use record that is torn or otherwise unsound, or a
    /// run outside the volume, is damage.
    fn file_clusters(&self, vol: &dyn Volume, req: &mut Required) -> Checked<()> {
        let (clusters, cluster) = (self.boot.clusters(), self.boot.cluster_size);
        let size_rec = self.boot.record_size;
        let records = match self.record(vol, RECORD_MFT)?.data(clusters, cluster)? {
            Data::NonResident { size, .. } => size / size_rec,
            Data::Resident(_) => return Err(bad!("$MFT's $DATA is resident")),
        };
        let per_piece = (PIECE / size_rec).max(1);
        let mut buf = vec![0u8; (per_piece.min(records) * size_rec) as usize];
        let mut n = SYSTEM_NAMES.len() as u64;
        while n < records {
            let count = per_piece.min(records - n);
            let piece = &mut buf[..(count * size_rec) as usize];
            read_runs(vol, &self.runs, cluster, n * size_rec, piece, "the MFT")?;
            for b in piece.chunks_exact(size_rec as usize) {
                // Never used (zeros, or not yet a record) or not in use: no clusters.
                if &b[0..4] == b"FILE" && u16_at(b, 0x16) & RECORD_IN_USE != 0 {
                    let rec = Record::parse(b.to_vec(), n)?;
                    for a in rec.attributes()? {
                        if !a.non_resident() {
                            continue;
                        }
                        let at = usize::from(u16_at(a.b, 0x20));
                        let runs = decode_file_runlist(a.b.get(at..).unwrap_or_default(), clusters)
                            .map_err(|e| {
                                within(e, format!("MFT record {n}, attribute {:#x}", a.ty))
                            })?;
                        for r in runs {
                            req.add_record(r.lcn, r.len, n);
                        }
                    }
                }
                n += 1;
            }
        }
        Ok(())
    }

    /// Checks that the first records of `$MFT` equal their copies in `$MFTMirr` (as ntfs-3g
    /// does before it mounts): both with their fixups applied, over the bytes in use.
    fn check_mirror(&self, vol: &dyn Volume) -> Checked<()> {
        let (clusters, cluster) = (self.boot.clusters(), self.boot.cluster_size);
        let rec = self.record(vol, RECORD_MFTMIRR)?;
        let Data::NonResident { runs, size } = rec.data(clusters, cluster)? else {
            return Err(bad!("$MFTMirr's $DATA is resident"));
        };
        if runs.first().map(|r| r.lcn) != Some(self.boot.mirror_lcn) {
            return Err(bad!(
                "$MFTMirr's $DATA does not start where the boot sector says"
            ));
        }
        let size_rec = self.boot.record_size;
        let count = MIRROR_RECORDS.min(size / size_rec);
        if count == 0 {
            return Err(bad!("$MFTMirr holds {size} bytes, less than a record"));
        }
        for n in 0..count {
            let mut main = self.raw_record(vol, n)?;
            let mut copy = vec![0u8; size_rec as usize];
            read_runs(vol, &runs, cluster, n * size_rec, &mut copy, "$MFTMirr")?;
            apply_fixups(&mut main).map_err(|e| within(e, format!("MFT record {n}")))?;
            apply_fixups(&mut copy).map_err(|e| within(e, format!("$MFTMirr record {n}")))?;
            let used = (u32_at(&main, 0x18) as usize).min(main.len());
            if main[..used] != copy[..used] {
                return Err(bad!("MFT record {n} differs from its copy in $MFTMirr"));
            }
        }
        Ok(())
    }

    /// Checks `$MFT`'s own `$BITMAP` (one bit per record, set when in use): it covers every
    /// record and marks records 0 to 11 in use.
    fn check_record_bitmap(&self, vol: &dyn Volume) -> Checked<()> {
        let (clusters, cluster) = (self.boot.clusters(), self.boot.cluster_size);
        let rec = self.record(vol, RECORD_MFT)?;
        let attrs = rec.attributes()?;
        let a = attrs
            .iter()
            .find(|a| a.ty == ATTR_BITMAP && a.unnamed())
            .ok_or_else(|| bad!("$MFT has no $BITMAP attribute"))?;
        let records = match rec.data(clusters, cluster)? {
            Data::NonResident { size, .. } => size / self.boot.record_size,
            Data::Resident(_) => return Err(bad!("$MFT's $DATA is resident")),
        };
        let mut head = [0u8; 2];
        let bits = if a.non_resident() {
            let runs = a.runs(clusters).map_err(|e| within(e, "$MFT's $BITMAP"))?;
            read_runs(vol, &runs, cluster, 0, &mut head, "$MFT's $BITMAP")?;
            u64_at(a.b, 0x30).saturating_mul(8)
        } else {
            let v = a.resident_value()?;
            let n = v.len().min(2);
            head[..n].copy_from_slice(&v[..n]);
            v.len() as u64 * 8
        };
        if bits < records {
            return Err(bad!("$MFT's $BITMAP has {bits} bits for {records} records"));
        }
        if head[0] != 0xFF || head[1] & 0x0F != 0x0F {
            return Err(bad!(
                "$MFT's $BITMAP marks system records free ({:#04x} {:#04x})",
                head[0],
                head[1]
            ));
        }
        Ok(())
    }

    /// The volume label (`$VOLUME_NAME` of `$Volume`); `None` when it is empty.
    pub fn label(&self, vol: &dyn Volume) -> Checked<Option<String>> {
        let rec = self.record(vol, RECORD_VOLUME)?;
        let attrs = rec.attributes()?;
        let Some(a) = attrs
            .iter()
            .find(|a| a.ty == ATTR_VOLUME_NAME && !a.non_resident())
        else {
            return Ok(None);
        };
        let units: Vec<u16> = a
            .resident_value()?
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        let s = String::from_utf16_lossy(&units);
        Ok((!s.is_empty()).then_some(s))
    }

    /// Walks `$Bitmap`, feeding the used clusters to `used` and checking that it marks the
    /// `required` clusters used. At most `limit` bytes of bitmap are read; a bigger bitmap is
    /// an error.
    fn walk_bitmap(
        &self,
        vol: &dyn Volume,
        used: &mut UsedRuns,
        required: Option<&Required>,
        limit: u64,
    ) -> Checked<()> {
        let clusters = self.boot.clusters();
        let cluster = self.boot.cluster_size;
        let need = clusters.div_ceil(8);
        if need > limit {
            return Err(bad!(
                "$Bitmap of {need} bytes is over the {limit}-byte limit"
            ));
        }
        let rec = self.record(vol, RECORD_BITMAP)?;
        match rec.data(clusters, cluster)? {
            Data::Resident(v) => {
                if (v.len() as u64) < need {
                    return Err(bad!(
                        "$Bitmap holds {} bytes for {clusters} clusters",
                        v.len()
                    ));
                }
                used.bitmap(0, v, clusters);
                if let Some(req) = required {
                    req.check_bitmap(0, v, clusters, "$Bitmap")?;
                }
            }
            Data::NonResident { runs, size } => {
                if size < need {
                    return Err(bad!("$Bitmap holds {size} bytes for {clusters} clusters"));
                }
                let mut buf = vec![0u8; PIECE.min(need) as usize];
                let mut pos = 0u64;
                while pos < need {
                    let n = PIECE.min(need - pos) as usize;
                    read_runs(vol, &runs, cluster, pos, &mut buf[..n], "$Bitmap")?;
                    used.bitmap(pos * 8, &buf[..n], clusters - pos * 8);
                    if let Some(req) = required {
                        req.check_bitmap(pos * 8, &buf[..n], clusters - pos * 8, "$Bitmap")?;
                    }
                    pos += n as u64;
                }
            }
        }
        Ok(())
    }

    /// `$Bitmap` itself: one bit a cluster from cluster 0, least significant bit first,
    /// `clusters / 8` bytes rounded up, reading at most `limit` bytes. What Windows reports
    /// through `FSCTL_GET_VOLUME_BITMAP` is compared with it
    /// ([`crate::platform::windevice::first_bitmap_difference`]).
    pub fn bitmap(&self, vol: &dyn Volume, limit: u64) -> Checked<Vec<u8>> {
        let clusters = self.boot.clusters();
        let need = clusters.div_ceil(8);
        if need > limit {
            return Err(bad!(
                "$Bitmap of {need} bytes is over the {limit}-byte limit"
            ));
        }
        let rec = self.record(vol, RECORD_BITMAP)?;
        match rec.data(clusters, self.boot.cluster_size)? {
            Data::Resident(v) => match v.get(..need as usize) {
                Some(b) => Ok(b.to_vec()),
                None => Err(bad!(
                    "$Bitmap holds {} bytes for {clusters} clusters",
                    v.len()
                )),
            },
            Data::NonResident { runs, size } => {
                if size < need {
                    return Err(bad!("$Bitmap holds {size} bytes for {clusters} clusters"));
                }
                let mut buf = vec![0u8; need as usize];
                read_runs(vol, &runs, self.boot.cluster_size, 0, &mut buf, "$Bitmap")?;
                Ok(buf)
            }
        }
    }

    /// Clusters in use according to `$Bitmap`, reading at most `limit` bytes of it.
    pub fn used_clusters(&self, vol: &dyn Volume, limit: u64) -> Checked<u64> {
        let mut used = UsedRuns::new(None, 0, self.boot.cluster_size);
        self.walk_bitmap(vol, &mut used, None, limit)?;
        Ok(used.finish())
    }
}

/// Builds the allocation map of an NTFS volume at `granularity` bytes per bit, with the
/// number of clusters in use. `Err` explains why the filesystem's data cannot be trusted.
pub fn allocation_map(vol: &dyn Volume, mft: &Mft, granularity: u64) -> Checked<(BlockMap, u64)> {
    let boot = &mft.boot;
    // Fits: total sectors × sector size does (checked by `BootSector::parse`).
    let fs_bytes = boot.clusters() * boot.cluster_size;
    if fs_bytes > vol.size() {
        return Err(bad!(
            "the filesystem spans {fs_bytes} bytes but the volume has only {}",
            vol.size()
        ));
    }
    // Validation before trusting $Bitmap: the system files are sound and agree with their
    // mirror, and (in the walk) $Bitmap marks every one of their clusters used.
    let mut required = mft.system_clusters(vol)?;
    mft.check_mirror(vol)?;
    mft.check_record_bitmap(vol)?;
    mft.file_clusters(vol, &mut required)?;
    required.sort();
    let mut map = BlockMap::new(vol.size(), granularity);
    // The backup boot sector and whatever follows the last cluster.
    map.mark_bytes(fs_bytes, vol.size() - fs_bytes);
    // $Boot and the system files are in the bitmap too (checked); kept whatever it says.
    map.mark_bytes(0, BOOT_FILE_LEN);
    for (first, count) in required.runs() {
        map.mark_bytes(first * boot.cluster_size, count * boot.cluster_size);
    }
    let mut used = UsedRuns::new(Some(&mut map), 0, boot.cluster_size);
    mft.walk_bitmap(vol, &mut used, Some(&required), u64::MAX)?;
    let n = used.finish();
    if n == 0 {
        return Err(bad!("$Bitmap marks no cluster in use"));
    }
    Ok((map, n))
}

/// Recognises NTFS on `vol`: its description and its allocation map (or why there is none).
pub fn probe(vol: &dyn Volume, granularity: u64) -> Result<Option<(FsInfo, Checked<BlockMap>)>> {
    let Some(boot) = BootSector::read(vol)? else {
        return Ok(None);
    };
    let size = boot.size();
    let mft = Mft::open(vol, &boot);
    let label = mft
        .as_ref()
        .ok()
        .and_then(|m| m.label(vol).ok().flatten())
        .unwrap_or_default();
    let map = mft.and_then(|m| allocation_map(vol, &m, granularity));
    let info = FsInfo {
        fs_type: "ntfs".into(),
        version: None,
        uuid: boot.uuid(),
        label,
        block_size: boot.cluster_size as u32,
        size,
        used_bytes: 0, // set from $Bitmap
    };
    Ok(Some(with_used_bytes(info, map, boot.cluster_size)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::tests::{Mem, assert_refused, refusal};
    use proptest::prelude::*;

    const CLUSTER: usize = 4096;
    const RECORD: usize = 1024;
    const CLUSTERS: usize = 256;
    const MFT_LCN: usize = 4;
    const BITMAP_LCN: usize = 20;
    const MIRROR_LCN: usize = 21;

    fn put(img: &mut [u8], at: usize, bytes: &[u8]) {
        img[at..at + bytes.len()].copy_from_slice(bytes);
    }

    /// Writes record `n` at `at` with `attrs` (already laid out) and fixups applied.
    fn write_record(img: &mut [u8], at: usize, n: u32, attrs: &[u8]) {
        let mut r = vec![0u8; RECORD];
        put(&mut r, 0, b"FILE");
        put(&mut r, 4, &0x30u16.to_le_bytes());
        put(&mut r, 6, &3u16.to_le_bytes());
        put(&mut r, 0x14, &0x38u16.to_le_bytes());
        put(&mut r, 0x16, &1u16.to_le_bytes());
        put(&mut r, 0x2C, &n.to_le_bytes());
        put(&mut r, 0x38, attrs);
        let end = 0x38 + attrs.len();
        put(&mut r, end, &ATTR_END.to_le_bytes());
        put(&mut r, 0x18, &((end + 8) as u32).to_le_bytes());
        put(&mut r, 0x1C, &(RECORD as u32).to_le_bytes());
        // Update sequence number 0x0007; save the last two bytes of each stride.
        put(&mut r, 0x30, &[7, 0]);
        for i in 1..3 {
            let e = i * 512;
            let saved = [r[e - 2], r[e - 1]];
            put(&mut r, 0x30 + 2 * i, &saved);
            put(&mut r, e - 2, &[7, 0]);
        }
        put(img, at, &r);
    }

    /// A non-resident unnamed $DATA attribute with `runlist`, covering `clusters` clusters
    /// and `size` bytes.
    fn nonresident_data(runlist: &[u8], clusters: u64, size: u64) -> Vec<u8> {
        let len = (0x40 + runlist.len() + 1).div_ceil(8) * 8;
        let mut a = vec![0u8; len];
        put(&mut a, 0, &ATTR_DATA.to_le_bytes());
        put(&mut a, 4, &(len as u32).to_le_bytes());
        a[8] = 1;
        put(&mut a, 0x18, &(clusters - 1).to_le_bytes());
        put(&mut a, 0x20, &0x40u16.to_le_bytes());
        put(&mut a, 0x28, &(clusters * CLUSTER as u64).to_le_bytes());
        put(&mut a, 0x30, &size.to_le_bytes());
        put(&mut a, 0x38, &size.to_le_bytes());
        put(&mut a, 0x40, runlist);
        a
    }

    fn resident(ty: u32, value: &[u8]) -> Vec<u8> {
        let len = (0x18 + value.len()).div_ceil(8) * 8;
        let mut a = vec![0u8; len];
        put(&mut a, 0, &ty.to_le_bytes());
        put(&mut a, 4, &(len as u32).to_le_bytes());
        put(&mut a, 0x10, &(value.len() as u32).to_le_bytes());
        put(&mut a, 0x14, &0x18u16.to_le_bytes());
        put(&mut a, 0x18, value);
        a
    }

    /// A 1 MiB NTFS-like volume: 256 clusters of 4 KiB, the MFT (4 clusters, records 0..15)
    /// at cluster 4, a non-resident $Bitmap at cluster 20, $MFTMirr at cluster 21, label "vb".
    fn image() -> Vec<u8> {
        let mut img = vec![0u8; CLUSTERS * CLUSTER + 512];
        put(&mut img, 3, NTFS_OEM);
        put(&mut img, 0x0B, &512u16.to_le_bytes());
        img[0x0D] = 8;
        put(&mut img, 0x28, &((CLUSTERS * 8) as u64).to_le_bytes());
        put(&mut img, 0x30, &(MFT_LCN as u64).to_le_bytes());
        put(&mut img, 0x38, &(MIRROR_LCN as u64).to_le_bytes());
        img[0x40] = 0xF6;
        put(&mut img, 0x48, &0x0123_4567_89AB_CDEFu64.to_le_bytes());
        let mft = MFT_LCN * CLUSTER;
        // $MFT: one run of 4 clusters at LCN 4.
        let mut rec0 = nonresident_data(&[0x11, 4, MFT_LCN as u8, 0], 4, 4 * CLUSTER as u64);
        rec0.extend(resident(ATTR_BITMAP, &[0xFF, 0xFF, 0, 0, 0, 0, 0, 0]));
        write_record(&mut img, mft, 0, &rec0);
        let mirror = nonresident_data(&[0x11, 1, MIRROR_LCN as u8, 0], 1, CLUSTER as u64);
        write_record(&mut img, mft + RECORD, 1, &mirror);
        for n in [2, 4, 5, 7, 8, 9, 10, 11, 12, 13, 14, 15] {
            write_record(&mut img, mft + n * RECORD, n as u32, &[]);
        }
        let name: Vec<u8> = "vb".encode_utf16().flat_map(u16::to_le_bytes).collect();
        write_record(
            &mut img,
            mft + 3 * RECORD,
            3,
            &resident(ATTR_VOLUME_NAME, &name),
        );
        let bm = nonresident_data(&[0x11, 1, BITMAP_LCN as u8, 0], 1, (CLUSTERS / 8) as u64);
        write_record(&mut img, mft + 6 * RECORD, 6, &bm);
        img.copy_within(mft..mft + 4 * RECORD, MIRROR_LCN * CLUSTER);
        // Used: clusters 0..8 (boot, MFT), 20 (bitmap), 21 (mirror), 100..=131.
        let b = BITMAP_LCN * CLUSTER;
        img[b] = 0xFF;
        img[b + 2] = 0x30;
        img[b + 12] = 0xF0;
        img[b + 13..b + 16].fill(0xFF);
        img[b + 16] = 0x0F;
        img
    }

    #[test]
    fn bitmap_clusters_and_the_tail_are_marked() {
        let vol = Mem(image());
        let (info, map) = probe(&vol, 4096).unwrap().unwrap();
        let map = map.unwrap();
        assert_eq!(info.label, "vb");
        assert_eq!(info.uuid, "0123456789ABCDEF");
        assert_eq!(info.block_size, 4096);
        assert_eq!(info.used_bytes, (8 + 2 + 32) * 4096);
        let used: Vec<u64> = (0..map.block_count()).filter(|&b| map.is_used(b)).collect();
        let mut want: Vec<u64> = (0..8).chain([20, 21]).chain(100..132).collect();
        want.push(256); // the backup boot sector
        assert_eq!(used, want);
    }

    #[test]
    fn a_bitmap_marking_system_files_free_is_refused() {
        let mut zeroed = image();
        zeroed[BITMAP_LCN * CLUSTER..BITMAP_LCN * CLUSTER + 32].fill(0);
        let err = refusal(probe, zeroed);
        assert_eq!(err.to_string(), "$Bitmap marks $Boot free (bit 0)");
        let mut no_mirror = image();
        no_mirror[BITMAP_LCN * CLUSTER + 2] = 0x10;
        assert_refused(probe, no_mirror, "$MFTMirr (attribute 0x80) free (bit 21)");
    }

    /// The bitmap Windows would give (`FSCTL_GET_VOLUME_BITMAP`, synthesised here from the
    /// cluster layout the test image was built with) agrees with volback's own reading of
    /// `$Bitmap`; one cluster marked differently is found.
    #[test]
    fn volume_bitmap_from_windows_agrees_with_our_bitmap_reader() {
        use crate::platform::windevice::{first_bitmap_difference, parse_volume_bitmap};
        let vol = Mem(image());
        let boot = BootSector::read(&vol).unwrap().unwrap();
        let mft = Mft::open(&vol, &boot).unwrap();
        let own = mft.bitmap(&vol, 1 << 20).unwrap();
        let clusters = boot.clusters();
        let mut windows = vec![0u8; 16 + clusters.div_ceil(8) as usize];
        windows[8..16].copy_from_slice(&(clusters as i64).to_le_bytes());
        for lcn in (0..8).chain([20, 21]).chain(100..132) {
            windows[16 + lcn / 8] |= 1 << (lcn % 8);
        }
        let parsed = parse_volume_bitmap(&windows).unwrap();
        assert_eq!(first_bitmap_difference(&parsed, &own), None);
        // Asked from LCN 64 (a later call of FSCTL_GET_VOLUME_BITMAP).
        let mut later = (64i64).to_le_bytes().to_vec();
        later.extend_from_slice(&((clusters - 64) as i64).to_le_bytes());
        later.extend_from_slice(&windows[16 + 8..]);
        let parsed = parse_volume_bitmap(&later).unwrap();
        assert_eq!(first_bitmap_difference(&parsed, &own), None);
        windows[16 + 14] ^= 0x04;
        let parsed = parse_volume_bitmap(&windows).unwrap();
        assert_eq!(first_bitmap_difference(&parsed, &own), Some(114));
    }

    #[test]
    fn a_mirror_that_differs_is_refused() {
        let mut img = image();
        // A byte inside record 3's attributes (the label), in the copy only.
        img[MIRROR_LCN * CLUSTER + 3 * RECORD + 0x38 + 0x18] = b'x';
        assert_refused(probe, img, "MFT record 3 differs");
    }

    #[test]
    fn a_damaged_system_record_is_refused() {
        let mut img = image();
        img[MFT_LCN * CLUSTER + 10 * RECORD..][..4].fill(0);
        assert_refused(probe, img.clone(), "MFT record 10");
        // The reserved records 12 to 15 may be anything.
        img = image();
        img[MFT_LCN * CLUSTER + 13 * RECORD..][..RECORD].fill(0);
        assert!(probe(&Mem(img), 4096).unwrap().unwrap().1.is_ok());
    }

    #[test]
    fn a_record_bitmap_marking_system_records_free_is_refused() {
        let mut img = image();
        let rec0 = MFT_LCN * CLUSTER;
        // The resident $BITMAP value follows the 0x48-byte $DATA attribute: offset 0x38 + 0x48
        // + 0x18.
        img[rec0 + 0x38 + 0x48 + 0x18] = 0x7F;
        img.copy_within(rec0..rec0 + RECORD, MIRROR_LCN * CLUSTER);
        assert_refused(probe, img, "$MFT's $BITMAP marks system records free");
    }

    #[test]
    fn torn_bitmap_record_is_refused() {
        let mut img = image();
        let at = MFT_LCN * CLUSTER + 6 * RECORD + 1022;
        img[at] ^= 0xFF;
        assert_refused(probe, img, "torn");
    }

    #[test]
    fn bitmap_run_outside_the_volume_is_refused() {
        let mut img = image();
        let bm = nonresident_data(&[0x21, 1, 0x00, 0x7F, 0], 1, 32);
        write_record(&mut img, MFT_LCN * CLUSTER + 6 * RECORD, 6, &bm);
        assert_refused(probe, img, "outside");
    }

    #[test]
    fn runlists_decode_signed_deltas() {
        // 2 clusters at 0x100, then 3 clusters at 0x100 - 0x10.
        let runs = decode_runlist(&[0x21, 2, 0x00, 0x01, 0x11, 3, 0xF0, 0], 1000).unwrap();
        assert_eq!(
            runs,
            vec![
                Run {
                    vcn: 0,
                    lcn: 0x100,
                    len: 2
                },
                Run {
                    vcn: 2,
                    lcn: 0xF0,
                    len: 3
                }
            ]
        );
        assert!(decode_runlist(&[0x01, 2, 0], 1000).is_err(), "sparse");
        assert!(decode_runlist(&[0x11, 2, 5], 1000).is_err(), "no end");
        assert!(
            decode_runlist(&[0x11, 2, 0x80, 0], 1000).is_err(),
            "negative"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// Mutated boot sectors, MFT records and bitmaps never panic, hang or allocate wildly.
        #[test]
        fn mutated_volumes_never_panic(
            patches in proptest::collection::vec(
                (0usize..4, 0usize..RECORD, any::<u8>()), 0..24),
        ) {
            let mut img = image();
            for (area, o, v) in patches {
                let base = match area {
                    0 => 0,
                    1 => MFT_LCN * CLUSTER,
                    2 => MFT_LCN * CLUSTER + 6 * RECORD,
                    _ => MFT_LCN * CLUSTER + 3 * RECORD,
                };
                img[base + o] = v;
            }
            let _ = probe(&Mem(img), 65536);
        }

        #[test]
        fn random_runlists_never_panic(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_runlist(&b, 1 << 40);
        }

        #[test]
        fn random_records_never_panic(mut b in proptest::collection::vec(any::<u8>(), 1024)) {
            // A valid header and fixups, so that the attribute walk sees random attributes.
            b[0..4].copy_from_slice(b"FILE");
            b[4..8].copy_from_slice(&[0x30, 0, 3, 0]);
            b[0x16] |= 1;
            b[0x2C..0x30].copy_from_slice(&6u32.to_le_bytes());
            b[0x30..0x32].copy_from_slice(&[9, 9]);
            b[510..512].copy_from_slice(&[9, 9]);
            b[1022..1024].copy_from_slice(&[9, 9]);
            if let Ok(r) = Record::parse(b, 6) {
                let _ = r.data(1000, 4096);
            }
        }
    }
}
