//! `volback probe SOURCE [--json]`: what is on a disk, partition or image.

use super::args::ProbeArgs;
use super::display::human_bytes;
use anyhow::Result;
use std::path::Path;
use std::process::ExitCode;
use volback::probe::{self, Filesystem, HeaderCheck, HeaderStatus, ProbeOptions, ProbeReport};
use volback::source::Source;

/// Opens a disk, partition or image read-only, with a message that fits `probe` and `ptable`.
pub(super) fn open(path: &Path) -> Result<Source> {
    if path.is_dir() {
        anyhow::bail!(
            "{} is a directory, not a disk, partition or image file",
            path.display()
        );
    }
    Ok(Source::open(path)?)
}

/// `volback probe SOURCE [--json]`; without SOURCE, [`list`].
pub fn run(ProbeArgs { source, json }: ProbeArgs) -> Result<ExitCode> {
    let Some(source) = source else {
        return list(json);
    };
    let src = open(&source)?;
    let report = probe::probe_source(&src, &ProbeOptions::default())?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(ExitCode::SUCCESS)
}

/// `volback probe` without a source: every disk and volume of the machine
/// ([`volback::platform::list_devices`]) with its size and what is on it (partition table or
/// filesystem); one that cannot be opened or probed says why (as root or Administrator, all
/// can).
fn list(json: bool) -> Result<ExitCode> {
    let mut rows = vec![vec!["device".into(), "size".into(), "content".into()]];
    let mut reports = Vec::new();
    for (path, size) in volback::platform::list_devices() {
        let content = match Source::open(Path::new(&path))
            .map_err(anyhow::Error::from)
            .and_then(|s| Ok(probe::probe_source(&s, &ProbeOptions::default())?))
        {
            Ok(r) => {
                let what = match (&r.partition_table, &r.filesystem) {
                    (Some(t), _) => format!(
                        "{} partition table, {} partitions",
                        t.kind.name(),
                        t.partitions.len()
                    ),
                    (None, Some(f)) => f.fs_type.clone(),
                    (None, None) => "nothing recognised".into(),
                };
                reports.push(serde_json::to_value(&r)?);
                what
            }
            Err(e) => format!("cannot probe: {e:#}"),
        };
        rows.push(vec![path, human_bytes(size), content]);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else if rows.len() == 1 {
        println!("no disks or volumes found");
    } else {
        print!("{}", table(&rows, &[false, true, false]));
    }
    Ok(ExitCode::SUCCESS)
}

/// Columns padded to their widest cell; `right[i]` right-aligns column i.
fn table(rows: &[Vec<String>], right: &[bool]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let width: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c > 0 {
                line.push_str("  ");
            }
            let pad = width[c] - cell.chars().count();
            if right.get(c).copied().unwrap_or(false) {
                line.push_str(&" ".repeat(pad));
                line.push_str(cell);
            } else {
                line.push_str(cell);
                if c + 1 < r.len() {
                    line.push_str(&" ".repeat(pad));
                }
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn fs_columns(f: Option<&Filesystem>) -> Vec<String> {
    let Some(f) = f else {
        return vec![
            "-".into(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
        ];
    };
    let kind = match &f.version {
        Some(v) if f.fs_type == "vfat" => format!("vfat ({v})"),
        Some(v) if f.fs_type == "crypto_LUKS" => format!("crypto_LUKS {v}"),
        _ => f.fs_type.clone(),
    };
    vec![
        kind,
        f.label.clone().unwrap_or_default(),
        f.uuid.clone().unwrap_or_default(),
        f.size.map(human_bytes).unwrap_or_default(),
        f.used_bytes.map(human_bytes).unwrap_or_default(),
    ]
}

fn header_text(h: &HeaderCheck) -> String {
    let s = match h.status {
        HeaderStatus::Ok => "ok",
        HeaderStatus::Missing => "missing",
        HeaderStatus::Corrupt => "corrupt",
        HeaderStatus::Mismatch => "mismatch",
    };
    format!("LBA {} {s}", h.lba)
}

/// The human form: `sfdisk -l` and `blkid` together.
fn render(r: &ProbeReport) -> String {
    let mut s = String::new();
    let ss = u64::from(r.logical_sector_size.max(1));
    s.push_str(&format!(
        "Disk {}: {}, {} bytes, {} sectors\n",
        r.source,
        human_bytes(r.size),
        r.size,
        r.size / ss
    ));
    s.push_str(&format!(
        "Sector size (logical/physical): {} bytes / {} bytes\n",
        r.logical_sector_size, r.physical_sector_size
    ));
    let mut warnings: Vec<String> = r.warnings.clone();
    match &r.partition_table {
        None => {
            s.push_str("Disklabel type: none\n");
            match &r.filesystem {
                None => s.push_str("\nNo partition table and no recognised format.\n"),
                Some(f) => {
                    s.push('\n');
                    let mut rows = vec![vec![
                        "Device".to_string(),
                        "Type".into(),
                        "Label".into(),
                        "UUID".into(),
                        "Size".into(),
                        "Used".into(),
                    ]];
                    let mut row = vec![r.source.clone()];
                    row.extend(fs_columns(Some(f)));
                    rows.push(row);
                    s.push_str(&table(&rows, &[false, false, false, false, true, true]));
                }
            }
        }
        Some(t) => {
            s.push_str(&format!("Disklabel type: {}\n", t.kind.name()));
            s.push_str(&format!("Disk identifier: {}\n", t.id));
            if let Some(g) = &t.gpt {
                if g.entry_count > 0 {
                    s.push_str(&format!(
                        "GPT: revision {}, {} entries of {} bytes at LBA {}, usable sectors \
                         {}-{}\n",
                        g.revision,
                        g.entry_count,
                        g.entry_size,
                        g.entries_lba,
                        g.first_usable_lba,
                        g.last_usable_lba
                    ));
                }
                s.push_str(&format!(
                    "GPT headers: primary {}, backup {}; {} MBR\n",
                    header_text(&g.primary),
                    header_text(&g.backup),
                    g.protective_mbr
                ));
            }
            if t.partitions.is_empty() {
                s.push_str("\nNo partitions.\n");
            } else {
                let dos = t.kind == probe::TableKind::Dos;
                let named = t.partitions.iter().any(|p| p.name.is_some());
                let mut head = vec!["Device".to_string()];
                if dos {
                    head.push("Boot".into());
                }
                head.extend(["Start", "End", "Sectors", "Size", "Type"].map(String::from));
                if named {
                    head.push("Name".into());
                }
                let mut rows = vec![head];
                for p in &t.partitions {
                    let mut row = vec![p.node.clone()];
                    if dos {
                        row.push(if p.bootable { "*" } else { "" }.into());
                    }
                    row.extend([
                        p.start_sector.to_string(),
                        p.end_sector().to_string(),
                        p.size_sectors.to_string(),
                        human_bytes(p.size),
                        match &p.type_name {
                            Some(n) if dos => format!("{n} ({})", p.type_id),
                            Some(n) => n.clone(),
                            None => p.type_id.clone(),
                        },
                    ]);
                    if named {
                        row.push(p.name.clone().unwrap_or_default());
                    }
                    rows.push(row);
                    warnings.extend(
                        p.warnings
                            .iter()
                            .map(|w| format!("partition {}: {w}", p.number)),
                    );
                }
                let mut right = vec![false];
                if dos {
                    right.push(false);
                }
                right.extend([true, true, true, true, false]);
                s.push('\n');
                s.push_str(&table(&rows, &right));
                let mut rows = vec![
                    ["Device", "Format", "Label", "UUID", "Size", "Used"]
                        .map(String::from)
                        .to_vec(),
                ];
                for p in t
                    .partitions
                    .iter()
                    .filter(|p| p.role != Some(probe::MbrRole::Extended))
                {
                    let mut row = vec![p.node.clone()];
                    row.extend(fs_columns(p.filesystem.as_ref()));
                    rows.push(row);
                }
                s.push('\n');
                s.push_str(&table(&rows, &[false, false, false, false, true, true]));
            }
        }
    }
    if !warnings.is_empty() {
        s.push('\n');
        for w in warnings {
            s.push_str(&format!("warning: {w}\n"));
        }
    }
    s
}
