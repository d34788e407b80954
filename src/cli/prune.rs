//! `volback prune REPO [--max-unused PERCENT] [--max-repack SIZE] [--dry-run] [--json]`
//! (also run by `forget --prune`).

use super::Ctx;
use super::args::PruneArgs;
use super::display::plural;
use super::display::{CliProgress, human_bytes};
use super::report::print_json;
use anyhow::Result;
use std::process::ExitCode;
use volback::prune::{PruneOptions, PruneReport, prune};
use volback::repo::Repository;

/// Prunes the repository and prints what was removed and repacked.
pub fn run(a: PruneArgs, ctx: &Ctx) -> Result<ExitCode> {
    let repository = super::password::open(&a.repo, &a.password)?;
    run_on(&repository, a, ctx)
}

/// Prunes `repository`, already open (`forget --prune` keeps the one it opened: one
/// password prompt).
pub fn run_on(repository: &Repository, a: PruneArgs, ctx: &Ctx) -> Result<ExitCode> {
    let progress = CliProgress::new(ctx.quiet || a.json);
    let r = prune(
        repository,
        &PruneOptions {
            dry_run: a.dry_run,
            max_unused_percent: a.opts.max_unused,
            max_repack: a.opts.max_repack,
            assume_removed: a.assume_removed.clone(),
        },
        &progress,
    )?;
    if a.json {
        print_json(&r)?;
    } else {
        print_text(&r);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_text(r: &PruneReport) {
    let (pack, packs, blob, blobs) = match r.format {
        1 => ("chunk file", "chunk files", "chunk", "chunks"),
        _ => ("pack", "packs", "blob", "blobs"),
    };
    println!(
        "{}, {}: {} in use, {} unused",
        plural(r.snapshots as u64, "snapshot", "snapshots"),
        plural(r.journals as u64, "unfinished backup", "unfinished backups"),
        plural(r.blobs_live, blob, blobs),
        plural(r.blobs_dead, blob, blobs),
    );
    if r.dry_run {
        println!(
            "dry run: would delete {} ({}), of which {} repacked first (copying {}), \
             freeing {}; nothing was changed",
            plural(r.packs_deleted, pack, packs),
            human_bytes(r.bytes_deleted),
            plural(r.packs_repacked, pack, packs),
            human_bytes(r.bytes_repacked),
            human_bytes(r.bytes_reclaimable),
        );
    } else {
        println!(
            "deleted {} ({}), repacked {} ({} written)",
            plural(r.packs_deleted, pack, packs),
            human_bytes(r.bytes_deleted),
            plural(r.packs_repacked, pack, packs),
            human_bytes(r.bytes_repacked),
        );
        if r.orphans_deleted > 0 {
            println!(
                "  of which {} left by interrupted backups",
                plural(r.orphans_deleted, pack, packs)
            );
        }
        if r.packs_rescued > 0 {
            println!(
                "kept {} a backup started using meanwhile",
                plural(r.packs_rescued, pack, packs)
            );
        }
    }
    if !r.deferred.is_empty() {
        println!(
            "{} wait for running backups to finish: run prune again afterwards to delete them",
            plural(r.packs_deferred, pack, packs)
        );
    }
    println!(
        "{}: {} -> {} ({} -> {}) in {:.1} s",
        packs,
        r.packs_before,
        r.packs_after,
        human_bytes(r.bytes_before),
        human_bytes(r.bytes_after),
        r.duration_secs
    );
}
