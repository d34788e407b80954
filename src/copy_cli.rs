//! `volback copy`, `copy --update`, `export`, and the copy forms of `restore` and `verify`:
//! argument handling and display (the work is in `volback::copy`).

use crate::display::{CliProgress, human_bytes};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;
use volback::copy::{CopyFormat, CopyMeta, CopyOptions, CopyReport, VerifyCopyOptions};
use volback::repo::Repository;
use volback::restore::{RestoreOptions, plan_restore, restore};
use volback::source::Source;
use volback::volume::Volume;

/// Test hook: milliseconds to pause after each block a copy writes, so that the integration
/// tests can interrupt a run at a chosen point. Not for production use.
pub const PACE_ENV: &str = "VOLBACK_TEST_COPY_PACE_MS";

/// Options shared by `copy` and `export`, as given on the command line.
pub struct Common {
    pub format: Option<CopyFormat>,
    pub slice_size: Option<u64>,
    pub block_size: Option<u32>,
    pub threads: usize,
    pub checkpoint_secs: f64,
    pub json: bool,
    pub quiet: bool,
}

impl Common {
    fn options(&self, cancel: Arc<AtomicBool>) -> CopyOptions {
        let pace = std::env::var(PACE_ENV)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_millis);
        CopyOptions {
            format: self.format.unwrap_or(CopyFormat::Raw),
            block_size: self.block_size,
            slice_size: self.slice_size,
            threads: self.threads,
            checkpoint_interval: Duration::from_secs_f64(self.checkpoint_secs.clamp(0.0, 3600.0)),
            cancel: Some(cancel),
            ..CopyOptions::default()
        }
    }
}

/// How `copy` reads its source.
pub struct SourceFlags {
    pub all_blocks: bool,
    pub allow_mounted: bool,
    pub rehash: bool,
}

/// `volback copy [--update] SOURCE DEST`.
pub fn copy(
    source: &Path,
    dest: &Path,
    update: bool,
    flags: SourceFlags,
    common: &Common,
    cancel: Arc<AtomicBool>,
) -> Result<ExitCode> {
    let mut opts = common.options(cancel);
    opts.all_blocks = flags.all_blocks;
    opts.allow_mounted = flags.allow_mounted;
    opts.rehash = flags.rehash;
    let src = Source::open(source)?;
    let progress = CliProgress::new(common.quiet);
    let report = if update {
        if common.slice_size.is_some() {
            bail!("--slice-size applies to new copies; an update keeps the copy's files");
        }
        if let Some(f) = common.format
            && let Some(paths) = volback::copy::locate(dest)
            && let Ok(meta) = CopyMeta::load(&paths)
            && meta.container != f
        {
            bail!(
                "{} is a {} copy, not {f}; an update keeps the copy's format",
                dest.display(),
                meta.container
            );
        }
        volback::copy::update(&src, dest, &opts, &progress)?
    } else {
        if common.format.is_none() {
            bail!("--format is required for a new copy (raw, bin, vhd, vhd-dynamic, vhdx, qcow2)");
        }
        volback::copy::copy(&src, dest, &opts, &progress)?
    };
    print_report(&report, common.json, None);
    Ok(ExitCode::SUCCESS)
}

/// `volback export REPO SNAPSHOT OUT`.
pub fn export(
    repo: &Path,
    snapshot: &str,
    out: &Path,
    common: &Common,
    cancel: Arc<AtomicBool>,
) -> Result<ExitCode> {
    if common.format.is_none() {
        bail!("--format is required (raw, bin, vhd, vhd-dynamic, vhdx, qcow2)");
    }
    let repository = Repository::open(repo)?;
    let id = repository.resolve_warn(snapshot, &CliProgress::new(true))?;
    let opts = common.options(cancel);
    let progress = CliProgress::new(common.quiet);
    let report = volback::copy::export(&repository, &id, out, &opts, &progress)?;
    print_report(&report, common.json, Some(&id));
    Ok(ExitCode::SUCCESS)
}

fn print_report(r: &CopyReport, json: bool, snapshot: Option<&str>) {
    let s = &r.this_run;
    if json {
        let v = serde_json::json!({
            "copy": r.dest,
            "metadata": r.metadata,
            "format": r.format,
            "files": r.files,
            "snapshot": snapshot,
            "size": r.size,
            "block_size": r.block_size,
            "block_count": r.block_count,
            "filesystem": r.filesystem,
            "all_blocks": r.all_blocks,
            "update": r.update,
            "resumed": r.resumed,
            "bytes_read": s.bytes_read,
            "data_blocks": s.data_blocks,
            "zero_blocks": s.zero_blocks,
            "unused_blocks": s.unused_blocks,
            "blocks_written": s.blocks_written,
            "blocks_zeroed": s.blocks_zeroed,
            "bytes_written": s.bytes_written,
            "unchanged_blocks": s.unchanged_blocks,
            "unread_blocks": r.unread_blocks,
            "stats": r.stats,
            "duration_secs": r.duration_secs,
        });
        println!("{v}");
        return;
    }
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
    if let Some(fs) = &r.filesystem {
        println!(
            "  filesystem      {} {} {}, {} used{}",
            fs.fs_type,
            fs.uuid,
            if fs.label.is_empty() {
                "(no label)"
            } else {
                &fs.label
            },
            human_bytes(fs.used_bytes),
            if r.all_blocks {
                " (all blocks copied)"
            } else {
                ""
            }
        );
    }
    println!(
        "  volume          {} in {} blocks of {}",
        human_bytes(r.size),
        r.block_count,
        human_bytes(r.block_size as u64)
    );
    println!("  read            {}", human_bytes(s.bytes_read));
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
}

/// `volback restore COPY TARGET`.
pub fn restore_copy(
    copy: &Path,
    target: &Path,
    verify: bool,
    only_changed: bool,
    threads: usize,
    quiet: bool,
    cancel: Arc<AtomicBool>,
) -> Result<ExitCode> {
    let opened = volback::copy::open_copy(copy)?;
    let paths = &opened.paths;
    // Never write over the copy itself.
    let mut protected: Vec<PathBuf> = vec![paths.meta()];
    if opened.meta.container == CopyFormat::Bin {
        protected.push(paths.dir.clone());
    }
    protected.extend(opened.meta.files.iter().map(|f| paths.file(&f.name)));
    if let Some(h) = &opened.meta.hashes {
        protected.push(paths.file(&h.name));
    }
    let volume = &opened.volume;
    let plan = plan_restore(target, volume.size(), &protected)?;
    let opts = RestoreOptions {
        threads,
        verify,
        cancel: Some(cancel),
        only_changed,
    };
    let progress = CliProgress::new(quiet);
    let r = restore(volume, &plan, &opts, &progress)?;
    let what = format!("copy {}", paths.dest().display());
    crate::display::print_restore(&what, &plan.target, &r, &opts);
    Ok(ExitCode::SUCCESS)
}

/// `volback verify COPY`.
pub fn verify_copy(
    copy: &Path,
    threads: usize,
    json: bool,
    quiet: bool,
    cancel: Arc<AtomicBool>,
) -> Result<ExitCode> {
    let progress = CliProgress::new(quiet);
    let r = volback::copy::verify(
        copy,
        &VerifyCopyOptions {
            threads,
            cancel: Some(cancel),
        },
        &progress,
    )
    .with_context(|| format!("cannot verify copy {}", copy.display()))?;
    if json {
        let bad: Vec<_> = r
            .bad
            .iter()
            .map(|b| serde_json::json!({"block": b.index, "offset": b.offset, "length": b.length}))
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "copy": r.dest,
                "format": r.format,
                "blocks_checked": r.blocks_checked,
                "bytes_read": r.bytes_read,
                "bad_blocks": r.bad_blocks,
                "bad": bad,
            })
        );
    } else {
        for b in &r.bad {
            println!(
                "BAD block {} at offset {} ({} bytes): content does not match its SHA-256",
                b.index, b.offset, b.length
            );
        }
        if r.bad_blocks > r.bad.len() as u64 {
            println!(
                "… and {} more bad blocks",
                r.bad_blocks - r.bad.len() as u64
            );
        }
        println!(
            "checked copy {}: {} blocks, {} read: {}",
            r.dest.display(),
            r.blocks_checked,
            human_bytes(r.bytes_read),
            if r.bad_blocks == 0 {
                "no problems".to_string()
            } else {
                format!("{} bad blocks", r.bad_blocks)
            }
        );
    }
    Ok(if r.bad_blocks == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
