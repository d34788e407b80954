//! Reports: the JSON objects the commands print with `--json` (serialized, never assembled by
//! hand), and the text report of a copy or export. The JSON keys are an interface: scripts
//! and the integration tests read them.
//!
//! Library reports whose fields are the JSON keys derive `Serialize` themselves
//! ([`volback::copy::CopyReport`], [`volback::copy::VerifyCopyReport`],
//! [`volback::mount::AttachedFiles`]); the structs here cover what differs: keys taken from
//! nested library structs, and values computed for display.

use crate::cli::display::{human_bytes, print_filesystem, print_volume};
use serde::Serialize;
#[cfg(target_os = "linux")]
use std::path::{Path, PathBuf};
use volback::backup::BackupReport;
use volback::copy::CopyReport;
use volback::fs::FsInfo;
use volback::fs::disk::DiskLayout;
use volback::repo::SnapshotEntry;
use volback::repo::snapshot::SnapshotStats;
use volback::verify::{Problem, VerifyReport};

/// Prints `value` as one line of JSON on standard output.
pub fn print_json<T: Serialize + ?Sized>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}

/// `backup --json`.
#[derive(Serialize)]
pub struct BackupJson<'a> {
    snapshot: &'a str,
    parent: Option<&'a str>,
    resumed: bool,
    filesystem: Option<&'a FsInfo>,
    layout: Option<&'a DiskLayout>,
    all_blocks: bool,
    unreadable: &'a [(u64, u64)],
    bytes_read: u64,
    unread_blocks: u64,
    new_chunks: u64,
    new_bytes: u64,
    new_bytes_stored: u64,
    stats: &'a SnapshotStats,
}

impl<'a> BackupJson<'a> {
    pub fn new(r: &'a BackupReport) -> Self {
        BackupJson {
            snapshot: &r.snapshot_id,
            parent: r.parent.as_deref(),
            resumed: r.resumed,
            filesystem: r.filesystem.as_ref(),
            layout: r.layout.as_ref(),
            all_blocks: r.all_blocks,
            unreadable: &r.unreadable,
            bytes_read: r.this_run.bytes_read,
            unread_blocks: r.unread_blocks,
            new_chunks: r.this_run.new_chunks,
            new_bytes: r.this_run.new_bytes,
            new_bytes_stored: r.this_run.new_bytes_stored,
            stats: &r.stats,
        }
    }
}

/// One element of `snapshots --json`.
#[derive(Serialize)]
pub struct SnapshotJson<'a> {
    id: &'a str,
    time: &'a str,
    source: &'a str,
    size: u64,
    parent: Option<&'a str>,
    block_size: u32,
    hostname: &'a str,
    tags: &'a [String],
    /// The volume's identity (`forget --volume-key`).
    volume_key: &'a str,
    stored_bytes: u64,
    stats: &'a SnapshotStats,
}

impl<'a> SnapshotJson<'a> {
    pub fn new(s: &'a SnapshotEntry) -> Self {
        let h = &s.header;
        SnapshotJson {
            id: &s.id,
            time: &h.time,
            source: &h.source.path,
            size: h.source.size,
            parent: h.parent.as_deref(),
            block_size: h.block_size,
            hostname: &h.hostname,
            tags: &h.tags,
            volume_key: &h.volume_key,
            stored_bytes: h.stats.new_bytes_stored,
            stats: &h.stats,
        }
    }
}

/// `verify --json` of a repository.
#[derive(Serialize)]
pub struct VerifyJson<'a> {
    snapshots_checked: usize,
    chunks_checked: u64,
    bytes_checked: u64,
    #[serde(skip_serializing_if = "is_zero")]
    packs_checked: u64,
    #[serde(skip_serializing_if = "is_zero")]
    index_files_checked: u64,
    problems: Vec<ProblemJson<'a>>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Serialize)]
struct ProblemJson<'a> {
    chunk: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pack: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    blob: Option<&'a str>,
    snapshot: Option<&'a str>,
    detail: &'a str,
    affected: Vec<AffectedJson<'a>>,
}

#[derive(Serialize)]
struct AffectedJson<'a> {
    snapshot: &'a str,
    offset: u64,
}

impl<'a> VerifyJson<'a> {
    pub fn new(r: &'a VerifyReport) -> Self {
        let problem = |p: &'a Problem| ProblemJson {
            chunk: p.chunk.as_deref(),
            pack: p.pack.as_deref(),
            blob: p.blob.as_deref(),
            snapshot: p.snapshot.as_deref(),
            detail: &p.detail,
            affected: p
                .affected
                .iter()
                .map(|(snapshot, offset)| AffectedJson {
                    snapshot,
                    offset: *offset,
                })
                .collect(),
        };
        VerifyJson {
            snapshots_checked: r.snapshots_checked,
            chunks_checked: r.chunks_checked,
            bytes_checked: r.bytes_checked,
            packs_checked: r.packs_checked,
            index_files_checked: r.index_files_checked,
            problems: r.problems.iter().map(problem).collect(),
        }
    }
}

/// `copy --json` and `export --json`: the library's report and the exported snapshot.
#[derive(Serialize)]
pub struct CopyJson<'a> {
    #[serde(flatten)]
    report: &'a CopyReport,
    snapshot: Option<&'a str>,
}

/// `mount --json`.
#[cfg(target_os = "linux")]
#[derive(Serialize)]
pub struct MountJson<'a> {
    pub source: &'a str,
    pub view: &'a Path,
    pub images: Vec<MountImageJson<'a>>,
    pub files: &'a [volback::mount::AttachedFiles],
}

/// One image file of a mounted view.
#[cfg(target_os = "linux")]
#[derive(Serialize)]
pub struct MountImageJson<'a> {
    pub path: PathBuf,
    pub start: u64,
    pub size: u64,
    pub filesystem: Option<&'a str>,
}

/// The report of `copy`, `copy --update` and `export` (`snapshot`: the exported snapshot's
/// id), as JSON or text.
pub fn print_copy(r: &CopyReport, json: bool, snapshot: Option<&str>) -> anyhow::Result<()> {
    if json {
        return print_json(&CopyJson {
            report: r,
            snapshot,
        });
    }
    let s = &r.this_run;
    let kind = match (r.update, r.resumed) {
        (_, true) => "resumed",
        (true, false) => "update",
        (false, false) => "new copy",
    };
    println!(
        "{} {} ({}, {} file{}) — {kind}",
        if snapshot.is_some() {
            "exported to"
        } else {
            "copy"
        },
        r.dest.display(),
        r.format,
        r.files.len(),
        if r.files.len() == 1 { "" } else { "s" }
    );
    if let Some(id) = snapshot {
        println!("  snapshot        {id}");
    }
    print_filesystem(r.filesystem.as_ref(), r.all_blocks, "copied");
    print_volume(r.size, r.block_count, r.block_size as u64, s.bytes_read);
    if r.unread_blocks > 0 {
        println!(
            "  not read        {} blocks unchanged since the last update (ext4 inodes)",
            r.unread_blocks
        );
    }
    println!(
        "  written         {} blocks ({}), {} zeroed, {} unchanged",
        s.blocks_written,
        human_bytes(s.bytes_written),
        s.blocks_zeroed,
        s.unchanged_blocks
    );
    println!(
        "  blocks          {} data, {} zero, {} unused",
        s.data_blocks, s.zero_blocks, s.unused_blocks
    );
    println!("  time            {:.1} s", r.duration_secs);
    Ok(())
}
