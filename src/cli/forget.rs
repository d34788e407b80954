//! `volback forget REPO [SNAPSHOT...] [--keep-* N] [--dry-run] [--prune] [--json]`.

use super::Ctx;
use super::args::{ForgetArgs, PruneArgs};
use super::display::CliProgress;
use super::report::print_json;
use anyhow::Result;
use std::process::ExitCode;
use volback::forget::{self, Action, ForgetReport, ForgetRequest, Policy};

/// Forgets, prints what was decided, and runs `prune` afterwards with `--prune`.
pub fn run(a: ForgetArgs, ctx: &Ctx) -> Result<ExitCode> {
    let request = ForgetRequest {
        snapshots: a.snapshots.clone(),
        policy: Policy {
            // Absent means 0: the policy keeps none by this rule.
            keep_last: a.keep_last.unwrap_or(0),
            keep_hourly: a.keep_hourly.unwrap_or(0),
            keep_daily: a.keep_daily.unwrap_or(0),
            keep_weekly: a.keep_weekly.unwrap_or(0),
            keep_monthly: a.keep_monthly.unwrap_or(0),
            keep_yearly: a.keep_yearly.unwrap_or(0),
            keep_within: a.keep_within,
            keep_tags: a.keep_tags.clone(),
        },
        source: a.source.clone(),
        volume_key: a.volume_key.clone(),
        dry_run: a.dry_run,
    };
    if request.snapshots.is_empty() && request.policy.is_empty() {
        // A usage error (exit code 2), worded as the library words it.
        eprintln!("volback: error: nothing to forget: name snapshots or give a --keep-* rule");
        return Ok(ExitCode::from(2));
    }
    let repository = super::password::open(&a.repo, &a.password)?;
    let report = forget::forget(&repository, &request, &CliProgress::new(ctx.quiet))?;
    if a.json {
        print_json(&report)?;
    } else {
        print_report(&report, a.prune);
    }
    if !a.prune {
        return Ok(ExitCode::SUCCESS);
    }
    let prune = PruneArgs {
        repo: a.repo,
        opts: a.prune_opts,
        dry_run: a.dry_run,
        json: a.json,
        password: a.password,
        assume_removed: match a.dry_run {
            true => report.removed_ids(),
            false => Vec::new(),
        },
    };
    super::prune::run_on(&repository, prune, ctx)
}

/// The table: one line per snapshot, a blank line between volumes, then a summary.
fn print_report(report: &ForgetReport, prune_follows: bool) {
    if report.snapshots.is_empty() {
        println!("no snapshots");
        return;
    }
    println!(
        "{:<12}  {:<20}  {:<6}  {:<24}  source",
        "id", "time", "action", "reasons"
    );
    let mut volume: Option<&Option<String>> = None;
    for d in &report.snapshots {
        if volume.is_some_and(|v| v != &d.volume_key) {
            println!();
        }
        volume = Some(&d.volume_key);
        let reasons: Vec<String> = d.reasons.iter().map(|r| r.to_string()).collect();
        let action = match d.action {
            Action::Keep => "keep",
            Action::Remove => "remove",
        };
        println!(
            "{:<12}  {:<20}  {:<6}  {:<24}  {}",
            &d.id[..12.min(d.id.len())],
            d.time.as_deref().unwrap_or("?"),
            action,
            reasons.join(","),
            d.source.as_deref().unwrap_or("? (unreadable snapshot)")
        );
    }
    let n = |k: usize| match k {
        1 => "1 snapshot".to_string(),
        k => format!("{k} snapshots"),
    };
    match report.dry_run {
        true => println!(
            "dry run: would remove {}, keep {}; nothing was changed",
            n(report.removed),
            n(report.kept)
        ),
        false if report.kept == 0 => println!("removed {}", n(report.removed)),
        false => println!("removed {}, kept {}", n(report.removed), n(report.kept)),
    }
    if report.removed > 0 && !prune_follows && !report.dry_run {
        println!("their data stays in the repository until `volback prune`");
    }
}
