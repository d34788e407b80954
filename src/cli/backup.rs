//! `volback backup SOURCE REPO`: full the first time, incremental afterwards.

use super::Ctx;
use super::args::{BackupArgs, block_size_arg};
use super::display::{CliProgress, human_bytes, print_filesystem, print_volume};
use super::report::{BackupJson, print_json};
use anyhow::Result;
use std::process::ExitCode;
use std::time::Duration;
use volback::backup::{BackupOptions, BackupReport, backup, plan};
use volback::source::Source;

/// Backs up `a.source` into `a.repo`; exit code 3 when some ranges could not be read.
pub fn run(a: BackupArgs, ctx: &Ctx) -> Result<ExitCode> {
    if a.snapshot == super::args::SnapshotKind::Vss {
        volback::platform::vss_available()?;
    }
    let repository = super::password::open(&a.repo, &a.password)?;
    let src = Source::open(&a.source)?;
    let opts = BackupOptions {
        block_size: block_size_arg(a.block_size)?,
        tags: a.tags,
        checkpoint_interval: Duration::from_secs_f64(a.checkpoint_secs.clamp(0.0, 3600.0)),
        threads: a.threads,
        restart: a.restart,
        all_blocks: a.all_blocks,
        allow_mounted: a.allow_mounted,
        rehash: a.rehash,
        cancel: Some(ctx.cancel.clone()),
    };
    let progress = CliProgress::new(ctx.quiet);
    if a.dry_run {
        let plan = plan(&repository, &src, &opts, &progress)?;
        if a.json {
            print_json(&plan)?;
        } else {
            print!("{plan}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let r = backup(&repository, &src, &opts, &progress)?;
    if a.json {
        print_json(&BackupJson::new(&r))?;
    } else {
        print_text(&r, src.geometry().size, repository.config().block_size);
    }
    Ok(warn_unreadable(&r))
}

/// The text report of a backup of a `volume_size`-byte volume in blocks of `block_size`.
fn print_text(r: &BackupReport, volume_size: u64, block_size: u32) {
    let kind = match (&r.parent, r.resumed) {
        (_, true) => "resumed",
        (Some(_), false) => "incremental",
        (None, false) => "full",
    };
    println!("snapshot {} ({kind})", r.snapshot_id);
    if let Some(p) = &r.parent {
        println!("  parent          {p}");
    }
    print_filesystem(r.filesystem.as_ref(), r.all_blocks, "read");
    if let Some(l) = &r.layout {
        println!("  partitions      {} table {}", l.table, l.id);
        for p in &l.partitions {
            let what = match (&p.filesystem, p.role.as_deref()) {
                (_, Some("extended")) => "extended partition".to_string(),
                (Some(fs), _) => format!(
                    "{} {}{}",
                    fs.fs_type,
                    fs.uuid,
                    if p.all_blocks {
                        " (all blocks read)"
                    } else {
                        ""
                    }
                ),
                (None, _) => "unknown content (all blocks read)".to_string(),
            };
            println!(
                "    #{:<3} {:>10} at {:>10}  {what}",
                p.number,
                human_bytes(p.size),
                human_bytes(p.start)
            );
        }
    }
    let s = &r.stats;
    print_volume(
        volume_size,
        s.data_blocks + s.zero_blocks + s.unused_blocks,
        block_size as u64,
        r.this_run.bytes_read,
    );
    if r.unread_blocks > 0 {
        println!(
            "  not read        {} blocks unchanged since the parent (ext4 inodes)",
            r.unread_blocks
        );
    }
    println!(
        "  new data        {} in {}, {} stored ({})",
        human_bytes(r.this_run.new_bytes),
        super::display::plural(r.this_run.new_chunks, "frame", "frames"),
        human_bytes(r.this_run.new_bytes_stored),
        super::display::plural(r.packs_written, "new pack", "new packs")
    );
    println!(
        "  blocks          {} data ({} unchanged, {} deduplicated), {} zero, {} unused",
        s.data_blocks, s.unchanged_blocks, s.deduplicated_blocks, s.zero_blocks, s.unused_blocks
    );
    println!("  time            {:.1} s", s.duration_secs);
}

/// Names the ranges that could not be read (stored as zeros); exit code 3 when there are any.
fn warn_unreadable(r: &BackupReport) -> ExitCode {
    if r.unreadable.is_empty() {
        return ExitCode::SUCCESS;
    }
    let bytes: u64 = r.unreadable.iter().map(|&(_, len)| len).sum();
    eprintln!(
        "volback: warning: {} bytes in {} ranges could not be read and were stored as \
         zeros (recorded in the snapshot as `unreadable`):",
        bytes,
        r.unreadable.len()
    );
    for (off, len) in r.unreadable.iter().take(20) {
        eprintln!("  offset {off}, {len} bytes");
    }
    if r.unreadable.len() > 20 {
        eprintln!("  … and {} more", r.unreadable.len() - 20);
    }
    ExitCode::from(3)
}
