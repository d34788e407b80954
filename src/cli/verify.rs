//! `volback verify REPO [SNAPSHOT]` and `volback verify COPY`.

use super::Ctx;
use super::args::VerifyArgs;
use super::display::{CliProgress, human_bytes};
use super::report::{VerifyJson, print_json};
use anyhow::{Context, Result};
use std::ffi::OsStr;
use std::path::Path;
use std::process::ExitCode;
use volback::copy::VerifyCopyOptions;
use volback::open::{self, Target};
use volback::verify::{Problem, VerifyOptions, verify};

/// Checks a repository (all snapshots, or one), or a copy; exit code 1 when anything is bad.
pub fn run(a: VerifyArgs, ctx: &Ctx) -> Result<ExitCode> {
    let quiet_progress = CliProgress::new(true);
    let (repository, ids) = match &a.snapshot {
        Some(s) => match open::identify_with(
            &[a.repo.as_os_str(), OsStr::new(s)],
            &super::password::source(&a.password)?,
            &quiet_progress,
        )? {
            Target::Snapshot { repository, id, .. } => (repository, vec![id]),
            other => anyhow::bail!("REPO SNAPSHOT named a {}", other.kind()),
        },
        None => {
            if let Ok(Target::Copy { path, .. }) = open::identify(&[&a.repo], &quiet_progress) {
                return verify_copy(&path, &a, ctx);
            }
            (super::password::open(&a.repo, &a.password)?, Vec::new())
        }
    };
    let progress = CliProgress::new(ctx.quiet);
    let r = verify(
        &repository,
        &ids,
        &VerifyOptions {
            read_data: a.read_data,
            threads: a.threads,
        },
        &progress,
    )?;
    if a.json {
        print_json(&VerifyJson::new(&r))?;
    } else {
        for p in &r.problems {
            print_problem(p);
        }
        let objects = if repository.format_version() >= 2 {
            format!(
                "{} blobs, {} packs, {} index files",
                r.chunks_checked, r.packs_checked, r.index_files_checked
            )
        } else {
            format!("{} chunks", r.chunks_checked)
        };
        println!(
            "checked {} snapshots, {objects}{}: {}",
            r.snapshots_checked,
            if a.read_data {
                format!(" ({} re-hashed)", human_bytes(r.bytes_checked))
            } else {
                String::new()
            },
            if r.problems.is_empty() {
                "no problems".to_string()
            } else {
                format!("{} problems", r.problems.len())
            }
        );
    }
    Ok(if r.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// One problem, and per snapshot, in the order found, its first offset and how many more
/// blocks it affects (a pack's damage reaches all of its blocks).
fn print_problem(p: &Problem) {
    match (&p.chunk, &p.pack, &p.blob, &p.snapshot) {
        (Some(c), ..) => println!("BAD chunk {c}: {}", p.detail),
        (None, Some(pk), _, _) => println!("BAD pack {pk}: {}", p.detail),
        (None, None, Some(b), _) => println!("BAD blob {b}: {}", p.detail),
        (None, None, None, Some(s)) => println!("BAD snapshot {s}: {}", p.detail),
        _ => println!("BAD: {}", p.detail),
    }
    const SHOW: usize = 20;
    let mut groups: Vec<(&str, u64, u64, usize)> = Vec::new();
    for (s, off) in &p.affected {
        match groups.iter_mut().find(|g| g.0 == s.as_str()) {
            Some(g) => {
                g.2 = g.2.max(*off);
                g.3 += 1;
            }
            None => groups.push((s, *off, *off, 1)),
        }
    }
    for &(s, first, last, n) in groups.iter().take(SHOW) {
        let s = &s[..12.min(s.len())];
        if n == 1 {
            println!("    affects snapshot {s} at offset {first}");
        } else {
            println!(
                "    affects snapshot {s} at offset {first} and {} more blocks up to offset {last}",
                n - 1
            );
        }
    }
    if groups.len() > SHOW {
        println!("    … and {} more snapshots", groups.len() - SHOW);
    }
}

/// `volback verify COPY`: every block against its SHA-256.
fn verify_copy(copy: &Path, a: &VerifyArgs, ctx: &Ctx) -> Result<ExitCode> {
    let progress = CliProgress::new(ctx.quiet);
    let r = volback::copy::verify(
        copy,
        &VerifyCopyOptions {
            threads: a.threads,
            cancel: Some(ctx.cancel.clone()),
        },
        &progress,
    )
    .with_context(|| format!("cannot verify copy {}", copy.display()))?;
    if a.json {
        print_json(&r)?;
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
