//! `volback stats REPO [SNAPSHOT] [--json]`.

use super::Ctx;
use super::args::StatsArgs;
use super::display::{CliProgress, human_bytes};
use super::report::print_json;
use anyhow::Result;
use std::process::ExitCode;
use volback::stats::{StatsReport, stats};

/// Prints what the repository, or one snapshot, stores.
pub fn run(a: StatsArgs, ctx: &Ctx) -> Result<ExitCode> {
    let repository = super::password::open(&a.repo, &a.password)?;
    let progress = CliProgress::new(ctx.quiet || a.json);
    let id = match &a.snapshot {
        Some(s) => Some(repository.resolve_warn(s, &progress)?),
        None => None,
    };
    let r = stats(&repository, id.as_deref(), &progress)?;
    if a.json {
        print_json(&r)?;
    } else {
        print_text(&r);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_text(r: &StatsReport) {
    let (packs, blobs) = match r.format {
        1 => ("chunk files", "chunks"),
        _ => ("packs", "blobs"),
    };
    println!("repository format   {}", r.format);
    println!("snapshots           {}", r.snapshots);
    if r.journals > 0 {
        println!("unfinished backups  {}", r.journals);
    }
    println!(
        "stored              {} in {} {packs}",
        human_bytes(r.stored_bytes),
        r.packs
    );
    if r.format >= 2 {
        println!("{blobs:<20}{} ({} index files)", r.blobs, r.index_files);
    }
    println!(
        "in use              {} {blobs}, {} unused ({})",
        r.live_blobs,
        r.dead_blobs,
        human_bytes(r.dead_bytes)
    );
    println!("prune would free    {}", human_bytes(r.reclaimable_bytes));
    if r.pending_records > 0 {
        println!(
            "pending deletions   {} (waiting for running backups)",
            r.pending_records
        );
    }
    if let Some(s) = &r.snapshot {
        println!("snapshot            {}", s.id);
        println!("  volume size       {}", human_bytes(s.logical_size));
        println!(
            "  references        {} {blobs}: {} ({} stored)",
            s.blobs,
            human_bytes(s.referenced_bytes),
            human_bytes(s.referenced_stored_bytes)
        );
        println!(
            "  only here         {} {blobs}: {} ({} stored; freed by forget + prune)",
            s.unique_blobs,
            human_bytes(s.unique_bytes),
            human_bytes(s.unique_stored_bytes)
        );
    }
}
