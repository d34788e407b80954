//! What is on a volume (`volback probe`): the partition table — MBR with its extended and
//! logical partitions, or GPT with its backup header — and the format of the whole volume or
//! of each partition (filesystem, swap, LVM2 physical volume, LUKS container) with its UUID,
//! label, size and used bytes.
//!
//! Probing reads only the sectors it needs through [`Volume::read_at`] and trusts nothing it
//! reads: every count and offset is bounded, GPT checksums are verified, EBR chains are
//! walked with loop detection and a cap. Damage never aborts a probe; it becomes a warning in
//! the [`ProbeReport`] (the whole report, or the partition it concerns). Only an I/O error on
//! the first sector is an error.
//!
//! The JSON form of [`ProbeReport`] is a stable interface, documented in `docs/PROBE.md`;
//! [`SCHEMA_VERSION`] changes when a field changes meaning or disappears.
//!
//! - [`mbr`], [`gpt`]: the two partition table formats (read and write).
//! - [`disk`]: the allocation map of a whole volume, composed from its partitions' maps.
//! - [`guid`]: GUID byte order and partition type names.
//!
//! Layering: `probe` sits above [`crate::fs`]. The formats a volume can hold are recognised
//! by one table, [`crate::fs::detect`], which backup uses too; `fs` never refers to `probe`.
//! [`crc32`] (GPT's checksum, also the filesystems') lives in `fs` and is re-exported here.

pub mod disk;
pub mod gpt;
pub mod guid;
pub mod mbr;

pub use crate::fs::crc32;
use crate::fs::detect;
pub use crate::fs::detect::Filesystem;

use crate::error::Result;
use crate::source::Source;
use crate::volume::Volume;
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// Version of the JSON schema of [`ProbeReport`].
pub const SCHEMA_VERSION: u32 = 1;

/// What to probe.
#[derive(Debug, Clone, Copy)]
pub struct ProbeOptions {
    /// Detect the format of the volume or of each partition (otherwise only the table).
    pub filesystems: bool,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        ProbeOptions { filesystems: true }
    }
}

/// Everything a probe found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeReport {
    /// [`SCHEMA_VERSION`].
    pub schema: u32,
    /// The volume probed (a path).
    pub source: String,
    /// Size in bytes.
    pub size: u64,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    /// `None` when the volume has no partition table.
    pub partition_table: Option<PartitionTable>,
    /// The format of the whole volume, when it has no partition table.
    pub filesystem: Option<Filesystem>,
    /// Problems with the volume or its partition table (partition problems are in the
    /// partition).
    pub warnings: Vec<String>,
}

/// Kind of partition table, named as `sfdisk` and `blkid` name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TableKind {
    /// MBR ("DOS") partition table.
    Dos,
    Gpt,
}

impl TableKind {
    pub fn name(self) -> &'static str {
        match self {
            TableKind::Dos => "dos",
            TableKind::Gpt => "gpt",
        }
    }
}

/// A partition table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionTable {
    #[serde(rename = "type")]
    pub kind: TableKind,
    /// Disk identifier: `0x1234abcd` (MBR disk signature) or the GPT disk GUID.
    pub id: String,
    /// Sector size the table is expressed in.
    pub sector_size: u32,
    /// Sectors of the volume in that size.
    pub sectors: u64,
    /// GPT details (`None` for MBR).
    pub gpt: Option<GptInfo>,
    /// Partitions in table order: MBR primaries by slot, then logical partitions in chain
    /// order; GPT entries by slot.
    pub partitions: Vec<Partition>,
}

/// GPT header details.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GptInfo {
    /// "1.0".
    pub revision: String,
    pub first_usable_lba: u64,
    pub last_usable_lba: u64,
    pub entries_lba: u64,
    pub entry_count: u32,
    pub entry_size: u32,
    pub primary: HeaderCheck,
    pub backup: HeaderCheck,
    /// "protective" (one 0xEE entry), "hybrid" (0xEE beside other entries) or "missing".
    pub protective_mbr: String,
}

/// The state of one GPT header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderCheck {
    pub lba: u64,
    pub status: HeaderStatus,
    /// Why, when not ok.
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeaderStatus {
    /// Present, checksums good, (backup:) agrees with the primary.
    Ok,
    /// No header there.
    Missing,
    /// A header whose checksum, entry array or fields are wrong.
    Corrupt,
    /// A valid backup that disagrees with the primary.
    Mismatch,
}

/// MBR role of a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MbrRole {
    Primary,
    Extended,
    Logical,
}

/// One partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partition {
    /// 1-based: MBR slot (1–4) or logical number (5…), GPT entry slot + 1.
    pub number: u32,
    /// The device name the kernel gives it (`/dev/sda1`, `/dev/loop0p1`, `disk.img1`).
    pub node: String,
    /// First byte.
    pub start: u64,
    /// Bytes.
    pub size: u64,
    pub start_sector: u64,
    pub size_sectors: u64,
    /// MBR type byte in hexadecimal without leading zeros (`83`, `7`), or the GPT type GUID
    /// in upper case — as `sfdisk` prints them.
    #[serde(rename = "type")]
    pub type_id: String,
    /// Name of the type, for common types.
    pub type_name: Option<String>,
    /// MBR only.
    pub role: Option<MbrRole>,
    /// MBR boot indicator 0x80.
    pub bootable: bool,
    /// GPT unique partition GUID; for MBR the `blkid` PARTUUID (`<disk signature>-<number>`).
    pub uuid: Option<String>,
    /// GPT partition name.
    pub name: Option<String>,
    /// GPT attribute bits.
    pub attributes: Option<u64>,
    /// GPT attributes as `sfdisk` prints them (`RequiredPartition LegacyBIOSBootable GUID:60`).
    pub attrs: Option<String>,
    /// The format found in the partition.
    pub filesystem: Option<Filesystem>,
    /// Problems with this partition.
    pub warnings: Vec<String>,
}

impl Partition {
    /// Last sector (inclusive); the start sector for an empty partition.
    pub fn end_sector(&self) -> u64 {
        self.start_sector + self.size_sectors.saturating_sub(1)
    }
}

/// A byte range of another volume, as a volume (a partition of a disk).
pub struct Slice<'a> {
    inner: &'a dyn Volume,
    start: u64,
    len: u64,
}

impl<'a> Slice<'a> {
    /// The bytes `[start, start+len)` of `inner`, clipped to its end.
    pub fn new(inner: &'a dyn Volume, start: u64, len: u64) -> Slice<'a> {
        let start = start.min(inner.size());
        let len = len.min(inner.size() - start);
        Slice { inner, start, len }
    }
}

impl Volume for Slice<'_> {
    fn size(&self) -> u64 {
        self.len
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        crate::volume::check_read(self.len, offset, buf.len(), || self.describe())?;
        self.inner.read_at(self.start + offset, buf)
    }

    fn next_data(&self, offset: u64, end: u64) -> Result<Option<Range<u64>>> {
        let end = end.min(self.len);
        if offset >= end {
            return Ok(None);
        }
        Ok(self
            .inner
            .next_data(self.start + offset, self.start + end)?
            .map(|r| r.start - self.start..r.end - self.start))
    }

    fn describe(&self) -> String {
        format!(
            "{} (bytes {}..{})",
            self.inner.describe(),
            self.start,
            self.start + self.len
        )
    }
}

/// The name of partition `number` of `disk`, by the rule `sfdisk` and the kernel follow:
/// a `p` between a name ending in a digit and the number (`/dev/loop0p1`, `/dev/nvme0n1p2`),
/// `-part` for `/dev/disk/by-id|by-path` names, nothing otherwise (`/dev/sda1`).
pub fn partition_node(disk: &str, number: u32) -> String {
    if disk.starts_with("/dev/disk/by-id/") || disk.starts_with("/dev/disk/by-path/") {
        return format!("{disk}-part{number}");
    }
    if disk.ends_with(|c: char| c.is_ascii_digit()) {
        format!("{disk}p{number}")
    } else {
        format!("{disk}{number}")
    }
}

/// Probes an opened source with its own geometry.
pub fn probe_source(src: &Source, opts: &ProbeOptions) -> Result<ProbeReport> {
    let g = src.geometry();
    probe(src, g.logical_sector_size, g.physical_sector_size, opts)
}

/// Probes `vol`, whose logical sectors are `logical_sector_size` bytes.
pub fn probe(
    vol: &dyn Volume,
    logical_sector_size: u32,
    physical_sector_size: u32,
    opts: &ProbeOptions,
) -> Result<ProbeReport> {
    let ss = u64::from(logical_sector_size.max(512));
    let mut report = ProbeReport {
        schema: SCHEMA_VERSION,
        source: vol.describe(),
        size: vol.size(),
        logical_sector_size,
        physical_sector_size,
        partition_table: None,
        filesystem: None,
        warnings: Vec::new(),
    };
    if vol.size() < 512 {
        report
            .warnings
            .push(format!("the volume is only {} bytes long", vol.size()));
        return Ok(report);
    }
    if !vol.size().is_multiple_of(ss) {
        report.warnings.push(format!(
            "the size is not a multiple of the {ss}-byte sector size; the last {} bytes are \
             outside every sector",
            vol.size() % ss
        ));
    }
    let mut table = read_table(vol, ss, &mut report.warnings)?;
    if let Some(t) = table.as_mut() {
        for p in &mut t.partitions {
            p.node = partition_node(&report.source, p.number);
        }
        check_ranges(t, vol.size());
        if opts.filesystems {
            for p in &mut t.partitions {
                if p.role == Some(MbrRole::Extended) || p.size == 0 || p.start >= vol.size() {
                    continue;
                }
                let slice = Slice::new(vol, p.start, p.size);
                match detect::detect(&slice) {
                    Ok(d) => {
                        p.filesystem = d.filesystem;
                        p.warnings.extend(d.warnings);
                    }
                    Err(e) => p.warnings.push(format!("cannot read the partition: {e}")),
                }
            }
        }
    } else if opts.filesystems {
        let d = detect::detect(vol)?;
        report.filesystem = d.filesystem;
        report.warnings.extend(d.warnings);
    }
    report.partition_table = table;
    Ok(report)
}

/// Warnings for partitions that end past the volume, lie outside their container or the GPT
/// usable range, or overlap.
fn check_ranges(t: &mut PartitionTable, volume_size: u64) {
    let sectors = t.sectors;
    let usable = t
        .gpt
        .as_ref()
        .map(|g| g.first_usable_lba..g.last_usable_lba.saturating_add(1));
    let ext = t
        .partitions
        .iter()
        .find(|p| p.role == Some(MbrRole::Extended))
        .map(|p| {
            (
                p.number,
                p.start_sector..p.start_sector.saturating_add(p.size_sectors),
            )
        });
    for p in &mut t.partitions {
        let end = p.start_sector.saturating_add(p.size_sectors);
        if end > sectors {
            p.warnings.push(format!(
                "ends at sector {}, past the end of the volume ({sectors} sectors, {volume_size} \
                 bytes): truncated disk or damaged table",
                end - 1
            ));
        }
        if let Some(u) = &usable
            && p.size_sectors > 0
            && (p.start_sector < u.start || end > u.end)
        {
            p.warnings.push(format!(
                "lies outside the GPT's usable sectors {}..={}",
                u.start,
                u.end.saturating_sub(1)
            ));
        }
        if p.role == Some(MbrRole::Logical)
            && let Some((n, r)) = &ext
            && (p.start_sector < r.start || end > r.end)
        {
            p.warnings
                .push(format!("lies outside its extended partition {n}"));
        }
    }
    // Overlaps (the extended partition legitimately contains the logical ones).
    let mut order: Vec<usize> = (0..t.partitions.len())
        .filter(|&i| t.partitions[i].role != Some(MbrRole::Extended) && t.partitions[i].size > 0)
        .collect();
    order.sort_by_key(|&i| t.partitions[i].start_sector);
    let mut furthest: Option<(u64, u32)> = None;
    for i in order {
        let p = &t.partitions[i];
        let end = p.start_sector.saturating_add(p.size_sectors);
        if let Some((fend, fnum)) = furthest
            && p.start_sector < fend
        {
            let msg = format!("overlaps partition {fnum}");
            t.partitions[i].warnings.push(msg);
        }
        if furthest.is_none_or(|(fend, _)| end > fend) {
            furthest = Some((end, t.partitions[i].number));
        }
    }
    // Byte fields clipped to u64.
    for p in &mut t.partitions {
        p.start = p.start_sector.saturating_mul(u64::from(t.sector_size));
        p.size = p.size_sectors.saturating_mul(u64::from(t.sector_size));
    }
}

fn read_sector(vol: &dyn Volume, ss: u64, lba: u64) -> Result<Option<Vec<u8>>> {
    let Some(o) = lba
        .checked_mul(ss)
        .filter(|o| o.checked_add(ss).is_some_and(|e| e <= vol.size()))
    else {
        return Ok(None);
    };
    let mut b = vec![0u8; ss as usize];
    vol.read_at(o, &mut b)?;
    Ok(Some(b))
}

fn has_gpt_signature(vol: &dyn Volume, ss: u64) -> Result<bool> {
    Ok(read_sector(vol, ss, 1)?.is_some_and(|s| s[0..8] == gpt::SIGNATURE))
}

/// Finds the partition table, if any.
fn read_table(
    vol: &dyn Volume,
    ss: u64,
    warnings: &mut Vec<String>,
) -> Result<Option<PartitionTable>> {
    let mut s0 = vec![0u8; 512];
    vol.read_at(0, &mut s0)?;
    let mbr = mbr::Mbr::parse(&s0);
    let protective = mbr.as_ref().is_some_and(mbr::Mbr::has_protective_entry);
    if protective {
        return Ok(Some(gpt_table(vol, ss, mbr.as_ref(), warnings)?));
    }
    let dos = mbr
        .as_ref()
        .filter(|m| m.looks_like_table() && !detect::is_volume_boot_record(&s0));
    if has_gpt_signature(vol, ss)? || (ss == 512 && has_gpt_signature(vol, 4096)?) {
        if dos.is_some() {
            warnings.push(
                "a GPT header is present at LBA 1 but the MBR has no protective entry: the GPT \
                 is ignored (left over from an earlier table?)"
                    .into(),
            );
        } else {
            // No protective MBR: a GPT only if one of its headers is valid.
            let mut gpt_warnings = Vec::new();
            let t = gpt_table(vol, ss, mbr.as_ref(), &mut gpt_warnings)?;
            let usable = t.gpt.as_ref().is_some_and(|g| {
                g.primary.status == HeaderStatus::Ok || g.backup.status == HeaderStatus::Ok
            });
            if usable {
                warnings.append(&mut gpt_warnings);
                return Ok(Some(t));
            }
            warnings.push(format!(
                "a damaged GPT header is at LBA 1 ({}) and there is no protective MBR; ignored",
                t.gpt
                    .as_ref()
                    .and_then(|g| g.primary.detail.as_deref())
                    .unwrap_or("unusable")
            ));
        }
    }
    Ok(dos.map(|m| dos_table(vol, ss, m, warnings)))
}

fn dos_table(
    vol: &dyn Volume,
    ss: u64,
    m: &mbr::Mbr,
    warnings: &mut Vec<String>,
) -> PartitionTable {
    let mut parts = Vec::new();
    let mut extended_done = false;
    let part =
        |number: u32, start: u64, sectors: u64, kind: u8, boot: u8, role: MbrRole| Partition {
            number,
            node: String::new(),
            start: 0,
            size: 0,
            start_sector: start,
            size_sectors: sectors,
            type_id: format!("{kind:x}"),
            type_name: guid::mbr_type_name(kind).map(str::to_string),
            role: Some(role),
            bootable: boot == mbr::BOOT_ACTIVE,
            uuid: Some(format!("{:08x}-{number:02x}", m.disk_signature)),
            name: None,
            attributes: None,
            attrs: None,
            filesystem: None,
            warnings: if boot == 0 || boot == mbr::BOOT_ACTIVE {
                Vec::new()
            } else {
                vec![format!("boot indicator is 0x{boot:02x} (not 0x00 or 0x80)")]
            },
        };
    let mut logicals = Vec::new();
    for (i, e) in m.entries.iter().enumerate() {
        if !e.is_used() {
            continue;
        }
        let number = i as u32 + 1;
        if mbr::is_extended(e.kind) {
            parts.push(part(
                number,
                e.start.into(),
                e.sectors.into(),
                e.kind,
                e.boot,
                MbrRole::Extended,
            ));
            if extended_done {
                warnings.push(format!(
                    "partition {number} is a second extended partition; only the first one's \
                     logical partitions are read"
                ));
                continue;
            }
            extended_done = true;
            let (l, w) = mbr::walk_ebr_chain(vol, ss, e.start.into(), e.sectors.into());
            warnings.extend(w);
            logicals = l;
        } else {
            parts.push(part(
                number,
                e.start.into(),
                e.sectors.into(),
                e.kind,
                e.boot,
                MbrRole::Primary,
            ));
        }
    }
    for (i, l) in logicals.iter().enumerate() {
        parts.push(part(
            5 + i as u32,
            l.start,
            l.sectors,
            l.kind,
            l.boot,
            MbrRole::Logical,
        ));
    }
    PartitionTable {
        kind: TableKind::Dos,
        id: format!("0x{:08x}", m.disk_signature),
        sector_size: ss as u32,
        sectors: vol.size() / ss,
        gpt: None,
        partitions: parts,
    }
}

fn check(lba: u64, s: &gpt::HeaderState) -> HeaderCheck {
    match s {
        gpt::HeaderState::Valid { .. } => HeaderCheck {
            lba,
            status: HeaderStatus::Ok,
            detail: None,
        },
        gpt::HeaderState::Missing(d) => HeaderCheck {
            lba,
            status: HeaderStatus::Missing,
            detail: Some(d.clone()),
        },
        gpt::HeaderState::Corrupt(d) => HeaderCheck {
            lba,
            status: HeaderStatus::Corrupt,
            detail: Some(d.clone()),
        },
    }
}

fn gpt_table(
    vol: &dyn Volume,
    mut ss: u64,
    m: Option<&mbr::Mbr>,
    warnings: &mut Vec<String>,
) -> Result<PartitionTable> {
    let mut primary = gpt::read_header_at(vol, ss, 1);
    if ss == 512 && primary.valid().is_none() {
        let p4 = gpt::read_header_at(vol, 4096, 1);
        if p4.valid().is_some() {
            warnings.push(
                "the GPT is written for 4096-byte sectors although the volume reports 512-byte \
                 sectors; reading it with 4096-byte sectors"
                    .into(),
            );
            ss = 4096;
            primary = p4;
        }
    }
    let sectors = vol.size() / ss;
    let last = sectors.saturating_sub(1);
    let mut backup_lba = last;
    if let Some((h, _)) = primary.valid()
        && h.alternate_lba != last
    {
        if h.alternate_lba > 1 && h.alternate_lba < sectors {
            backup_lba = h.alternate_lba;
            warnings.push(format!(
                "the backup GPT header is at LBA {}, not at the last LBA {last}: the disk grew \
                 since the table was written (`sfdisk --relocate gpt-bak-std` moves it)",
                h.alternate_lba
            ));
        } else {
            warnings.push(format!(
                "the GPT puts its backup header at LBA {} but the volume has only {sectors} \
                 sectors: the disk was truncated or the table belongs to a larger disk",
                h.alternate_lba
            ));
        }
    }
    let backup = gpt::read_header_at(vol, ss, backup_lba);
    let primary_check = check(1, &primary);
    let mut backup_check = check(backup_lba, &backup);
    if let (Some((p, _)), Some((b, _))) = (primary.valid(), backup.valid()) {
        let d = gpt::header_mismatches(p, b);
        if !d.is_empty() {
            backup_check.status = HeaderStatus::Mismatch;
            backup_check.detail = Some(format!("differs from the primary in: {}", d.join(", ")));
        }
    }
    let chosen = match (primary.valid(), backup.valid()) {
        (Some(p), _) => Some(p),
        (None, Some(b)) => {
            warnings.push(format!(
                "the primary GPT header is {}; using the backup header at LBA {backup_lba}",
                primary_check.detail.as_deref().unwrap_or("unusable")
            ));
            Some(b)
        }
        (None, None) => None,
    };
    if chosen.is_some() {
        match backup_check.status {
            HeaderStatus::Ok => {}
            HeaderStatus::Missing | HeaderStatus::Corrupt if primary.valid().is_some() => {
                warnings.push(format!(
                    "the backup GPT header at LBA {backup_lba} is {}: {}",
                    if backup_check.status == HeaderStatus::Missing {
                        "missing"
                    } else {
                        "corrupt"
                    },
                    backup_check.detail.as_deref().unwrap_or("")
                ));
            }
            HeaderStatus::Mismatch => warnings.push(format!(
                "the backup GPT header at LBA {backup_lba} {}",
                backup_check
                    .detail
                    .as_deref()
                    .unwrap_or("differs from the primary")
            )),
            _ => {}
        }
    } else {
        warnings.push(format!(
            "no usable GPT header: primary at LBA 1 {}; backup at LBA {backup_lba} {}",
            primary_check.detail.as_deref().unwrap_or("unusable"),
            backup_check.detail.as_deref().unwrap_or("unusable")
        ));
    }
    let protective_mbr = match m {
        None => {
            warnings.push("the GPT has no protective MBR".into());
            "missing"
        }
        Some(m) => {
            let others = m
                .entries
                .iter()
                .filter(|e| e.is_used() && e.kind != mbr::TYPE_GPT_PROTECTIVE)
                .count();
            if !m.has_protective_entry() {
                warnings.push("the GPT has no protective MBR".into());
                "missing"
            } else if others > 0 {
                "hybrid"
            } else {
                "protective"
            }
        }
    };
    let Some((h, array)) = chosen else {
        return Ok(PartitionTable {
            kind: TableKind::Gpt,
            id: String::new(),
            sector_size: ss as u32,
            sectors,
            gpt: Some(GptInfo {
                revision: String::new(),
                first_usable_lba: 0,
                last_usable_lba: 0,
                entries_lba: 0,
                entry_count: 0,
                entry_size: 0,
                primary: primary_check,
                backup: backup_check,
                protective_mbr: protective_mbr.into(),
            }),
            partitions: Vec::new(),
        });
    };
    let mut parts = Vec::new();
    for (slot, e) in gpt::parse_entries(array, h.entry_size) {
        let mut w = Vec::new();
        let size_sectors = if e.last_lba >= e.first_lba {
            e.last_lba - e.first_lba + 1
        } else {
            w.push(format!(
                "ends (LBA {}) before it starts (LBA {})",
                e.last_lba, e.first_lba
            ));
            0
        };
        let reserved_bits = e.attributes & 0x0000_FFFF_FFFF_FFF8;
        if reserved_bits != 0 {
            w.push(format!(
                "has reserved attribute bits set (0x{reserved_bits:016x}), which a `sfdisk` \
                 dump cannot carry"
            ));
        }
        let attrs = gpt::attrs_to_string(e.attributes);
        parts.push(Partition {
            number: slot + 1,
            node: String::new(),
            start: 0,
            size: 0,
            start_sector: e.first_lba,
            size_sectors,
            type_id: e.type_guid.to_string(),
            type_name: guid::gpt_type_name(&e.type_guid).map(str::to_string),
            role: None,
            bootable: false,
            uuid: Some(e.unique_guid.to_string()),
            name: Some(e.name.clone()).filter(|n| !n.is_empty()),
            attributes: Some(e.attributes),
            attrs: Some(attrs).filter(|a| !a.is_empty()),
            filesystem: None,
            warnings: w,
        });
    }
    Ok(PartitionTable {
        kind: TableKind::Gpt,
        id: h.disk_guid.to_string(),
        sector_size: ss as u32,
        sectors,
        gpt: Some(GptInfo {
            revision: format!("{}.{}", h.revision >> 16, h.revision & 0xFFFF),
            first_usable_lba: h.first_usable_lba,
            last_usable_lba: h.last_usable_lba,
            entries_lba: h.entries_lba,
            entry_count: h.entry_count,
            entry_size: h.entry_size,
            primary: primary_check,
            backup: backup_check,
            protective_mbr: protective_mbr.into(),
        }),
        partitions: parts,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) use crate::fs::tests::Mem;

    fn entry(kind: u8, start: u32, sectors: u32, abs: u64) -> mbr::Entry {
        mbr::Entry::new(kind, false, start, sectors, abs)
    }

    fn write_mbr(img: &mut [u8], sector: u64, sig: u32, entries: &[mbr::Entry]) {
        let mut m = mbr::Mbr {
            disk_signature: sig,
            entries: [mbr::Entry::default(); 4],
        };
        m.entries[..entries.len()].copy_from_slice(entries);
        m.encode_into(&mut img[sector as usize * 512..(sector as usize + 1) * 512]);
    }

    #[test]
    fn dos_with_logical_partitions() {
        let mut img = vec![0u8; 4096 * 512];
        write_mbr(
            &mut img,
            0,
            0x1234abcd,
            &[entry(0x83, 64, 100, 64), entry(0x05, 200, 3000, 200)],
        );
        write_mbr(
            &mut img,
            200,
            0,
            &[entry(0x83, 8, 50, 208), entry(0x05, 100, 58, 300)],
        );
        write_mbr(&mut img, 300, 0, &[entry(0x82, 8, 50, 308)]);
        let r = probe(&Mem(img), 512, 512, &ProbeOptions::default()).unwrap();
        let t = r.partition_table.unwrap();
        assert_eq!(t.kind, TableKind::Dos);
        assert_eq!(t.id, "0x1234abcd");
        let got: Vec<(u32, u64, u64, &str)> = t
            .partitions
            .iter()
            .map(|p| (p.number, p.start_sector, p.size_sectors, p.type_id.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (1, 64, 100, "83"),
                (2, 200, 3000, "5"),
                (5, 208, 50, "83"),
                (6, 308, 50, "82")
            ]
        );
        assert_eq!(t.partitions[0].node, "mem1");
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    }

    #[test]
    fn partition_past_the_end_is_a_warning() {
        let mut img = vec![0u8; 1024 * 512];
        write_mbr(&mut img, 0, 1, &[entry(0x83, 64, 100_000, 64)]);
        let r = probe(&Mem(img), 512, 512, &ProbeOptions::default()).unwrap();
        let p = &r.partition_table.unwrap().partitions[0];
        assert!(p.warnings[0].contains("past the end"), "{:?}", p.warnings);
    }

    #[test]
    fn node_names_follow_the_kernel() {
        assert_eq!(partition_node("/dev/sda", 1), "/dev/sda1");
        assert_eq!(partition_node("/dev/loop0", 5), "/dev/loop0p5");
        assert_eq!(partition_node("/dev/nvme0n1", 2), "/dev/nvme0n1p2");
        assert_eq!(
            partition_node("/dev/disk/by-id/ata-X", 3),
            "/dev/disk/by-id/ata-X-part3"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// Random bytes in the places every parser looks never panic or hang.
        #[test]
        fn random_volumes_never_panic(
            patches in proptest::collection::vec((0usize..(80 * 1024), any::<u8>()), 0..400),
            len in 0usize..(80 * 1024),
            protective in any::<bool>(),
            fs_at_zero in 0u8..6,
        ) {
            let mut img = vec![0u8; len.max(600)];
            img[510] = 0x55;
            img[511] = 0xAA;
            if protective {
                img[446 + 4] = 0xEE;
                img[446 + 12] = 1;
            }
            let magic: &[u8] = match fs_at_zero {
                0 => b"\xEB\x3C\x90MSDOS5.0",
                1 => b"\xEB\x52\x90NTFS    ",
                2 => b"\xEB\x76\x90EXFAT   ",
                3 => b"XFSB",
                4 => b"LUKS\xBA\xBE\x00\x02",
                _ => b"",
            };
            img[..magic.len()].copy_from_slice(magic);
            if img.len() > 1024 + 0x3A {
                img[1024 + 0x38] = 0x53;
                img[1024 + 0x39] = 0xEF;
            }
            if img.len() > 65536 + 0x48 {
                img[65536 + 0x40..65536 + 0x48].copy_from_slice(b"_BHRfS_M");
                img[65536 + 0x30..65536 + 0x38].copy_from_slice(&65536u64.to_le_bytes());
            }
            if img.len() > 4096 {
                img[4086..4096].copy_from_slice(b"SWAPSPACE2");
            }
            if img.len() > 1024 {
                img[512..520].copy_from_slice(b"EFI PART");
            }
            for (o, v) in patches {
                if o < img.len() {
                    img[o] = v;
                }
            }
            let _ = probe(&Mem(img), 512, 512, &ProbeOptions::default());
        }
    }
}
