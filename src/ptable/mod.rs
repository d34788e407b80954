//! Partition table backup and restore (`volback ptable dump|restore`) in `sfdisk --dump`
//! text, which `sfdisk` itself reads back.
//!
//! - [`dump`] probes a disk's table (no filesystem detection) and renders it as a
//!   [`Script`].
//! - [`plan_restore`] checks the target (not mounted, a device or a regular file, large
//!   enough, same sector size) and computes every sector to write; [`restore`] writes them,
//!   flushes, then probes the target again and compares the table with the plan.
//!
//! Restore writes the structures itself, no `sfdisk` needed at run time:
//!
//! - MBR: sector 0 keeps its boot code (bytes 0–439); the disk signature, the four entries and
//!   0x55AA are written. Logical partitions get a chain of EBRs: the first at the start of the
//!   extended partition, each next one in the first sector after the logical partition that
//!   precedes it on disk. A GPT header left over at LBA 1 or at the last LBA is zeroed so that
//!   no tool mistakes the disk for GPT.
//! - GPT: a protective MBR (boot code kept), both headers and both entry arrays with their
//!   CRC32s: primary header at LBA 1 and array at LBA 2, backup array before the backup header
//!   at the last LBA. Missing GUIDs (disk, partitions) are generated.
//!
//! After a restore onto a block device the kernel still has the old partition list until it
//! rereads it (`partx -u DISK` or `blockdev --rereadpt DISK`).

pub mod script;

pub use script::{Script, ScriptPartition};

use crate::error::{Error, IoContext, Result};
use crate::platform::{self, ObjectKind};
use crate::probe::guid::{self, Guid};
use crate::probe::{self, ProbeOptions, TableKind, gpt, mbr};
use crate::source::Source;
use std::path::{Path, PathBuf};

/// A dumped partition table.
#[derive(Debug, Clone)]
pub struct Dump {
    pub script: Script,
    /// `sfdisk --dump` text.
    pub text: String,
    /// Problems found while reading the table (a damaged backup GPT header…).
    pub warnings: Vec<String>,
}

/// Reads the partition table of `src`.
pub fn dump(src: &Source) -> Result<Dump> {
    let report = probe::probe_source(src, &ProbeOptions { filesystems: false })?;
    let (script, mut warnings) =
        Script::from_report(&report).map_err(|e| Error::NoPartitionTable {
            path: src.path().to_path_buf(),
            detail: crate::error::chain(&e),
        })?;
    let mut all = report.warnings.clone();
    if let Some(t) = &report.partition_table {
        for p in &t.partitions {
            all.extend(
                p.warnings
                    .iter()
                    .map(|w| format!("partition {}: {w}", p.number)),
            );
        }
    }
    all.append(&mut warnings);
    Ok(Dump {
        text: script.render(),
        script,
        warnings: all,
    })
}

/// Parses a script file's text; `path` names it in errors.
pub fn parse_script(text: &str, path: &Path) -> Result<Script> {
    Script::parse(text).map_err(|(line, e)| Error::BadPartitionScript {
        path: path.to_path_buf(),
        line: (line > 0).then_some(line),
        detail: crate::error::chain(&e),
    })
}

/// What a restore will write, computed and checked before the target is opened for writing.
#[derive(Debug, Clone)]
pub struct RestorePlan {
    pub target: PathBuf,
    pub target_kind: ObjectKind,
    pub sector_size: u64,
    pub disk_sectors: u64,
    /// The table that will be on the target: the script with generated GUIDs filled in and
    /// types, GUIDs and attributes in canonical form.
    pub table: Script,
    /// Sectors to write: (byte offset, bytes).
    pub writes: Vec<(u64, Vec<u8>)>,
    pub warnings: Vec<String>,
}

impl RestorePlan {
    pub fn bytes_to_write(&self) -> u64 {
        self.writes.iter().map(|(_, b)| b.len() as u64).sum()
    }
}

/// What a restore did.
#[derive(Debug, Clone)]
pub struct RestoreReport {
    pub bytes_written: u64,
    pub partitions: usize,
}

enum Problem {
    /// The script itself is wrong.
    Script(String),
    /// The target cannot hold it.
    TooSmall(String),
}

fn refuse(target: &Path, reason: String) -> Error {
    Error::UnsafeTarget {
        path: target.to_path_buf(),
        reason,
    }
}

/// Checks that `target` can receive the table in `script` (read from `script_path`) and
/// computes what to write.
pub fn plan_restore(target: &Path, script: &Script, script_path: &Path) -> Result<RestorePlan> {
    if let Some(m) = platform::mount_point_of(target).ctx("check the mounts of", target)? {
        return Err(refuse(
            target,
            if m.point == "swap" {
                "it (or a partition of it) is in use as swap".into()
            } else {
                format!(
                    "it (or a partition of it) is mounted at {}; unmount it first",
                    m.point
                )
            },
        ));
    }
    let file = platform::open_read_only(target).ctx("open", target)?;
    let g = platform::geometry(&file).ctx("read the geometry of", target)?;
    if g.kind == ObjectKind::Other {
        return Err(refuse(
            target,
            "it is not a block device or a regular file".into(),
        ));
    }
    let ss = u64::from(g.logical_sector_size.max(512));
    if let Some(s) = script.sector_size
        && u64::from(s) != ss
    {
        return Err(refuse(
            target,
            format!(
                "the table is for {s}-byte sectors but the target has {ss}-byte sectors \
                 (every start and size would mean something else)"
            ),
        ));
    }
    let disk_sectors = g.size / ss;
    if disk_sectors < 3 {
        return Err(refuse(target, format!("it is only {} bytes long", g.size)));
    }
    let read = |lba: u64| -> Result<Vec<u8>> {
        let mut b = vec![0u8; ss as usize];
        let mut done = 0;
        while done < b.len() {
            let n = platform::read_at(&file, &mut b[done..], lba * ss + done as u64)
                .ctx("read", target)?;
            if n == 0 {
                break;
            }
            done += n;
        }
        Ok(b)
    };
    let sector0 = read(0)?;
    let mut warnings = Vec::new();
    let laid_out = match script.label {
        TableKind::Dos => dos_layout(script, ss, disk_sectors, &sector0, &mut warnings),
        TableKind::Gpt => gpt_layout(script, ss, disk_sectors, &sector0, &mut warnings),
    };
    let (mut writes, table) = match laid_out {
        Ok(x) => x,
        Err(Problem::Script(detail)) => {
            return Err(Error::BadPartitionScript {
                path: script_path.to_path_buf(),
                line: None,
                detail,
            });
        }
        Err(Problem::TooSmall(why)) => {
            return Err(refuse(
                target,
                format!("it is too small ({disk_sectors} sectors of {ss} bytes): {why}"),
            ));
        }
    };
    if script.label == TableKind::Dos {
        // A GPT left over from an earlier table would still be found by some tools.
        let last = disk_sectors - 1;
        for lba in [1, last] {
            if read(lba)?[0..8] == gpt::SIGNATURE && !writes.iter().any(|(l, _)| *l == lba) {
                warnings.push(format!("zeroing an old GPT header at LBA {lba}"));
                writes.push((lba, vec![0u8; ss as usize]));
            }
        }
    }
    writes.sort_by_key(|(l, _)| *l);
    Ok(RestorePlan {
        target: target.to_path_buf(),
        target_kind: g.kind,
        sector_size: ss,
        disk_sectors,
        table,
        writes: writes.into_iter().map(|(lba, b)| (lba * ss, b)).collect(),
        warnings,
    })
}

/// Writes the planned table, flushes it to stable storage, and checks it by probing the
/// target again.
pub fn restore(plan: &RestorePlan) -> Result<RestoreReport> {
    let file = platform::open_write_existing(&plan.target).ctx("open for writing", &plan.target)?;
    let mut written = 0u64;
    for (offset, data) in &plan.writes {
        platform::write_all_at(&file, data, *offset).map_err(|e| Error::IoAt {
            op: "write the partition table to",
            path: plan.target.clone(),
            offset: *offset,
            source: e,
        })?;
        written += data.len() as u64;
    }
    file.sync_all().ctx("flush", &plan.target)?;
    drop(file);
    let src = Source::open(&plan.target)?;
    let report = probe::probe(
        &src,
        plan.sector_size as u32,
        src.geometry().physical_sector_size,
        &ProbeOptions { filesystems: false },
    )?;
    let problem = match Script::from_report(&report) {
        Ok((mut got, _)) => {
            got.device = None;
            let mut want = plan.table.clone();
            want.device = None;
            (got != want).then(|| {
                format!(
                    "reading it back gives\n{}\ninstead of\n{}",
                    got.render(),
                    want.render()
                )
            })
        }
        Err(e) => Some(format!("reading it back fails: {e}")),
    };
    if let Some(detail) = problem {
        return Err(Error::corrupt(
            "the partition table just written",
            &plan.target,
            detail,
        ));
    }
    Ok(RestoreReport {
        bytes_written: written,
        partitions: plan.table.partitions.len(),
    })
}

/// A partition with its numbers checked.
struct Span {
    number: u32,
    start: u64,
    end: u64, // exclusive
}

fn overlaps(spans: &mut [Span]) -> Option<String> {
    spans.sort_by_key(|s| s.start);
    spans.windows(2).find_map(|w| {
        (w[1].start < w[0].end).then(|| {
            format!(
                "partitions {} and {} overlap (sectors {}..{} and {}..{})",
                w[0].number, w[1].number, w[0].start, w[0].end, w[1].start, w[1].end
            )
        })
    })
}

fn check_span(p: &ScriptPartition, disk_sectors: u64) -> std::result::Result<Span, Problem> {
    if p.size == 0 {
        return Err(Problem::Script(format!(
            "partition {} has size 0",
            p.number
        )));
    }
    let end = p
        .start
        .checked_add(p.size)
        .ok_or_else(|| Problem::Script(format!("partition {} is impossibly large", p.number)))?;
    if end > disk_sectors {
        return Err(Problem::TooSmall(format!(
            "partition {} ends at sector {}",
            p.number,
            end - 1
        )));
    }
    Ok(Span {
        number: p.number,
        start: p.start,
        end,
    })
}

type Layout = (Vec<(u64, Vec<u8>)>, Script);

fn dos_layout(
    script: &Script,
    ss: u64,
    disk_sectors: u64,
    sector0: &[u8],
    warnings: &mut Vec<String>,
) -> std::result::Result<Layout, Problem> {
    let script_err = |s: String| Problem::Script(s);
    let disk_signature = match &script.label_id {
        Some(id) => {
            let h = id.trim().trim_start_matches("0x").trim_start_matches("0X");
            u32::from_str_radix(h, 16)
                .map_err(|_| script_err(format!("label-id {id:?} is not a 32-bit hex number")))?
        }
        None => {
            let g = Guid::random();
            u32::from_le_bytes([g.0[0], g.0[1], g.0[2], g.0[3]])
        }
    };
    let mut table = script.clone();
    table.label_id = Some(format!("0x{disk_signature:08x}"));
    table.sector_size = Some(ss as u32);
    table.first_lba = None;
    table.last_lba = None;
    table.table_length = None;
    let mut primaries: [Option<(usize, u8)>; 4] = [None; 4];
    let mut logicals: Vec<(usize, u8)> = Vec::new();
    for (i, p) in script.partitions.iter().enumerate() {
        let kind = guid::parse_mbr_type(&p.type_id).ok_or_else(|| {
            script_err(format!(
                "partition {}: type {:?} is not an MBR type byte",
                p.number, p.type_id
            ))
        })?;
        if p.uuid.is_some() || p.name.is_some() || p.attrs.is_some() {
            warnings.push(format!(
                "partition {}: an MBR has no partition UUID, name or attributes; ignored",
                p.number
            ));
        }
        let t = &mut table.partitions[i];
        t.type_id = format!("{kind:x}");
        t.uuid = None;
        t.name = None;
        t.attrs = None;
        if p.start == 0 {
            return Err(script_err(format!(
                "partition {} starts at sector 0, where the MBR is",
                p.number
            )));
        }
        if p.start > u64::from(u32::MAX) || p.size > u64::from(u32::MAX) {
            return Err(script_err(format!(
                "partition {} is beyond what an MBR can describe (32-bit sector numbers)",
                p.number
            )));
        }
        check_span(p, disk_sectors)?;
        match p.number {
            1..=4 => primaries[p.number as usize - 1] = Some((i, kind)),
            _ => logicals.push((i, kind)),
        }
    }
    logicals.sort_by_key(|(i, _)| script.partitions[*i].number);
    for (k, (i, _)) in logicals.iter().enumerate() {
        let n = script.partitions[*i].number;
        if n != 5 + k as u32 {
            return Err(script_err(format!(
                "logical partitions must be numbered 5, 6, 7… without gaps; found {n} where {} \
                 was expected",
                5 + k
            )));
        }
    }
    let exts: Vec<usize> = primaries
        .iter()
        .flatten()
        .filter(|(_, k)| mbr::is_extended(*k))
        .map(|(i, _)| *i)
        .collect();
    if exts.len() > 1 {
        return Err(script_err("more than one extended partition".to_string()));
    }
    if !logicals.is_empty() && exts.is_empty() {
        return Err(script_err(
            "logical partitions (5 and up) need an extended partition (type 5, f or 85)".into(),
        ));
    }
    let mut spans: Vec<Span> = primaries
        .iter()
        .flatten()
        .map(|(i, _)| check_span(&script.partitions[*i], disk_sectors))
        .collect::<std::result::Result<_, _>>()?;
    if let Some(e) = overlaps(&mut spans) {
        return Err(script_err(e));
    }
    let mut writes = Vec::new();
    // Sector 0.
    let mut s0 = sector0.to_vec();
    let mut m = mbr::Mbr {
        disk_signature,
        entries: [mbr::Entry::default(); 4],
    };
    for (slot, e) in primaries.iter().enumerate() {
        if let Some((i, kind)) = e {
            let p = &script.partitions[*i];
            m.entries[slot] =
                mbr::Entry::new(*kind, p.bootable, p.start as u32, p.size as u32, p.start);
        }
    }
    m.encode_into(&mut s0[..mbr::MBR_LEN]);
    writes.push((0u64, s0));
    // The EBR chain.
    if let Some(&ext_i) = exts.first() {
        let ext = &script.partitions[ext_i];
        let ext_end = ext.start + ext.size;
        let mut lspans: Vec<Span> = Vec::new();
        for (i, _) in &logicals {
            let p = &script.partitions[*i];
            let s = check_span(p, disk_sectors)?;
            if s.start <= ext.start || s.end > ext_end {
                return Err(script_err(format!(
                    "logical partition {} (sectors {}..{}) is not inside the extended partition \
                     {} (sectors {}..{}) after its first sector",
                    p.number, s.start, s.end, ext.number, ext.start, ext_end
                )));
            }
            lspans.push(s);
        }
        let mut sorted: Vec<Span> = lspans
            .iter()
            .map(|s| Span {
                number: s.number,
                start: s.start,
                end: s.end,
            })
            .collect();
        if let Some(e) = overlaps(&mut sorted) {
            return Err(script_err(e));
        }
        // EBR sector of each logical partition, in chain order.
        let mut ebrs = Vec::with_capacity(lspans.len());
        for (k, s) in lspans.iter().enumerate() {
            let ebr = if k == 0 {
                ext.start
            } else {
                sorted
                    .iter()
                    .filter(|o| o.end <= s.start)
                    .map(|o| o.end)
                    .max()
                    .unwrap_or(ext.start + 1)
                    .max(ext.start + 1)
            };
            if ebr >= s.start {
                return Err(script_err(format!(
                    "there is no free sector before logical partition {} for its extended boot \
                     record",
                    s.number
                )));
            }
            ebrs.push(ebr);
        }
        for (k, (i, kind)) in logicals.iter().enumerate() {
            let p = &script.partitions[*i];
            let ebr = ebrs[k];
            let mut rec = mbr::Mbr {
                disk_signature: 0,
                entries: [mbr::Entry::default(); 4],
            };
            rec.entries[0] = mbr::Entry::new(
                *kind,
                p.bootable,
                (p.start - ebr) as u32,
                p.size as u32,
                p.start,
            );
            if let Some((j, _)) = logicals.get(k + 1) {
                let next = &script.partitions[*j];
                let next_ebr = ebrs[k + 1];
                rec.entries[1] = mbr::Entry::new(
                    mbr::TYPE_EXTENDED,
                    false,
                    (next_ebr - ext.start) as u32,
                    (next.start + next.size - next_ebr) as u32,
                    next_ebr,
                );
            }
            let mut sector = vec![0u8; ss as usize];
            rec.encode_into(&mut sector[..mbr::MBR_LEN]);
            writes.push((ebr, sector));
        }
        if logicals.is_empty() {
            // An empty extended partition: a blank first EBR ends the chain.
            writes.push((ext.start, vec![0u8; ss as usize]));
        }
    }
    Ok((writes, table))
}

fn gpt_layout(
    script: &Script,
    ss: u64,
    disk_sectors: u64,
    sector0: &[u8],
    warnings: &mut Vec<String>,
) -> std::result::Result<Layout, Problem> {
    let script_err = |s: String| Problem::Script(s);
    let count = script.table_length.unwrap_or(gpt::DEFAULT_ENTRY_COUNT);
    if u64::from(count) * u64::from(gpt::ENTRY_LEN) > gpt::MAX_ARRAY_BYTES {
        return Err(script_err(format!("table-length {count} is too large")));
    }
    let array_sectors = (u64::from(count) * u64::from(gpt::ENTRY_LEN)).div_ceil(ss);
    let min_first = 2 + array_sectors;
    let max_last = disk_sectors
        .checked_sub(2 + array_sectors)
        .filter(|&l| l >= min_first)
        .ok_or_else(|| Problem::TooSmall("a GPT does not fit".into()))?;
    let first = script.first_lba.unwrap_or(min_first);
    let last = script.last_lba.unwrap_or(max_last);
    if first < min_first {
        return Err(script_err(format!(
            "first-lba {first} overlaps the partition entry array ({count} entries end at LBA {})",
            min_first - 1
        )));
    }
    if last > max_last {
        return Err(Problem::TooSmall(format!(
            "the table's last usable LBA is {last}, which needs {} sectors",
            last + 2 + array_sectors
        )));
    }
    if first > last {
        return Err(script_err(format!(
            "first-lba {first} is after last-lba {last}"
        )));
    }
    let disk_guid = match &script.label_id {
        Some(id) => {
            Guid::parse(id).ok_or_else(|| script_err(format!("label-id {id:?} is not a GUID")))?
        }
        None => Guid::random(),
    };
    let mut table = script.clone();
    table.label_id = Some(disk_guid.to_string());
    table.first_lba = Some(first);
    table.last_lba = Some(last);
    table.table_length = Some(count);
    table.sector_size = Some(ss as u32);
    let mut entries = Vec::new();
    let mut spans = Vec::new();
    for (i, p) in script.partitions.iter().enumerate() {
        if p.number > count {
            return Err(script_err(format!(
                "partition {} does not fit a table of {count} entries (table-length)",
                p.number
            )));
        }
        let type_guid = guid::parse_gpt_type(&p.type_id).ok_or_else(|| {
            script_err(format!(
                "partition {}: type {:?} is not a GPT type GUID",
                p.number, p.type_id
            ))
        })?;
        let unique_guid = match &p.uuid {
            Some(u) => Guid::parse(u).ok_or_else(|| {
                script_err(format!("partition {}: uuid {u:?} is not a GUID", p.number))
            })?,
            None => Guid::random(),
        };
        let attributes = match &p.attrs {
            Some(a) => gpt::attrs_from_string(a)
                .map_err(|e| script_err(format!("partition {}: {e}", p.number)))?,
            None => 0,
        };
        if p.bootable {
            warnings.push(format!(
                "partition {}: GPT has no boot flag (use attrs=\"LegacyBIOSBootable\"); ignored",
                p.number
            ));
        }
        let s = check_span(p, disk_sectors)?;
        if s.start < first || s.end - 1 > last {
            if s.end - 1 > max_last {
                return Err(Problem::TooSmall(format!(
                    "partition {} ends at sector {}, past the last usable LBA {max_last}",
                    p.number,
                    s.end - 1
                )));
            }
            return Err(script_err(format!(
                "partition {} (sectors {}..={}) is outside the usable LBAs {first}..={last}",
                p.number,
                s.start,
                s.end - 1
            )));
        }
        let name = p.name.clone().unwrap_or_default();
        let t = &mut table.partitions[i];
        t.type_id = type_guid.to_string();
        t.uuid = Some(unique_guid.to_string());
        t.name = Some(name.clone()).filter(|n| !n.is_empty());
        t.attrs = Some(gpt::attrs_to_string(attributes)).filter(|a| !a.is_empty());
        t.bootable = false;
        entries.push((
            p.number - 1,
            gpt::Entry {
                type_guid,
                unique_guid,
                first_lba: s.start,
                last_lba: s.end - 1,
                attributes,
                name,
            },
        ));
        spans.push(s);
    }
    if let Some(e) = overlaps(&mut spans) {
        return Err(script_err(e));
    }
    let mut writes = gpt::encode_table(&gpt::NewTable {
        sector_size: ss,
        disk_sectors,
        disk_guid,
        first_usable_lba: first,
        last_usable_lba: last,
        entry_count: count,
        entries,
    })
    .map_err(|e| script_err(e.to_string()))?;
    // Protective MBR: one 0xEE entry from LBA 1 to the end (capped at 32 bits), CHS start
    // 0/0/2 and end 0xFFFFFF as libfdisk writes them; boot code and disk signature of the old
    // sector 0 are kept.
    let mut s0 = sector0.to_vec();
    let old_signature = mbr::Mbr::parse(&s0).map_or(0, |m| m.disk_signature);
    let covered = (disk_sectors - 1).min(u64::from(u32::MAX));
    let mut pmbr = mbr::Mbr {
        disk_signature: old_signature,
        entries: [mbr::Entry::default(); 4],
    };
    pmbr.entries[0] = mbr::Entry {
        boot: 0,
        chs_first: [0x00, 0x02, 0x00],
        kind: mbr::TYPE_GPT_PROTECTIVE,
        chs_last: [0xFF, 0xFF, 0xFF],
        start: 1,
        sectors: covered as u32,
    };
    pmbr.encode_into(&mut s0[..mbr::MBR_LEN]);
    writes.push((0, s0));
    Ok((writes, table))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::tests::Mem;

    fn apply(img: &mut [u8], writes: &[(u64, Vec<u8>)], ss: u64) {
        for (lba, b) in writes {
            let o = (*lba * ss) as usize;
            img[o..o + b.len()].copy_from_slice(b);
        }
    }

    fn layout_and_probe(text: &str, sectors: u64) -> (Script, Script) {
        let script = Script::parse(text).unwrap();
        let mut img = vec![0u8; (sectors * 512) as usize];
        let mut w = Vec::new();
        let (writes, table) = match script.label {
            TableKind::Dos => dos_layout(&script, 512, sectors, &img[..512], &mut w),
            TableKind::Gpt => gpt_layout(&script, 512, sectors, &img[..512], &mut w),
        }
        .unwrap_or_else(|p| match p {
            Problem::Script(s) | Problem::TooSmall(s) => panic!("{s}"),
        });
        apply(&mut img, &writes, 512);
        let r = probe::probe(&Mem(img), 512, 512, &ProbeOptions::default()).unwrap();
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        let (mut got, _) = Script::from_report(&r).unwrap();
        got.device = None;
        let mut want = table;
        want.device = None;
        (got, want)
    }

    #[test]
    fn dos_layout_reads_back() {
        let (got, want) = layout_and_probe(
            "label: dos
label-id: 0x57350c0b
unit: sectors

1 : start=2048, size=16384, type=83, bootable
2 : start=18432, size=8192, type=7
3 : start=26624, size=104448, type=5
5 : start=28672, size=8192, type=83
6 : start=38912, size=8192, type=82
7 : start=49152, size=100, type=b
",
            131072,
        );
        assert_eq!(got, want);
    }

    #[test]
    fn gpt_layout_reads_back() {
        let (got, want) = layout_and_probe(
            "label: gpt
label-id: 28986345-F6AB-234F-AC77-F1FF90598E5C
unit: sectors
first-lba: 2048
last-lba: 131038

1 : start=2048, size=16384, type=L, name=\"root \\x22fs\\x22\"
4 : start=26624, size=8192, type=0657fd6d-a4ab-43c4-84e5-0933c84b4f4f, attrs=\"RequiredPartition GUID:60\"
",
            131072,
        );
        assert_eq!(got, want);
        assert_eq!(got.partitions[0].name.as_deref(), Some("root \"fs\""));
        assert!(got.partitions[1].uuid.is_some());
    }

    #[test]
    fn impossible_tables_are_refused() {
        let cases = [
            (
                "label: dos\n1 : start=2048, size=100, type=83\n2 : start=2100, size=100, type=83\n",
                "overlap",
            ),
            (
                "label: dos\n5 : start=2048, size=100, type=83\n",
                "extended",
            ),
            ("label: dos\n1 : start=2048, size=100, type=zz\n", "type"),
            ("label: gpt\n1 : start=10, size=100, type=L\n", "usable"),
            (
                "label: gpt\n200 : start=4000, size=100, type=L\n",
                "entries",
            ),
            (
                "label: dos\n1 : start=2048, size=1000000, type=83\n",
                "ends at",
            ),
        ];
        for (text, needle) in cases {
            let s = Script::parse(text).unwrap();
            let mut w = Vec::new();
            let img = vec![0u8; 512];
            let r = match s.label {
                TableKind::Dos => dos_layout(&s, 512, 8192, &img, &mut w),
                TableKind::Gpt => gpt_layout(&s, 512, 8192, &img, &mut w),
            };
            match r {
                Err(Problem::Script(e)) | Err(Problem::TooSmall(e)) => {
                    assert!(e.contains(needle), "{text}: {e}")
                }
                Ok(_) => panic!("accepted: {text}"),
            }
        }
    }
}
