//! `volback prune REPO [--max-unused PERCENT] [--max-repack SIZE] [--dry-run] [--json]`
//! (also run by `forget --prune`). Placeholder: the prune helper replaces the body.

use super::Ctx;
use super::args::PruneArgs;
use anyhow::Result;
use std::process::ExitCode;

/// Prunes the repository and prints what was removed and repacked.
pub fn run(a: PruneArgs, ctx: &Ctx) -> Result<ExitCode> {
    let _ = (
        &a.repo,
        &a.opts,
        a.dry_run,
        a.json,
        &a.assume_removed,
        ctx.quiet,
    );
    anyhow::bail!("prune: not implemented yet")
}
