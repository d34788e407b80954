//! `volback stats REPO [SNAPSHOT] [--json]`. Placeholder: the prune helper replaces the body.

use super::Ctx;
use super::args::StatsArgs;
use anyhow::Result;
use std::process::ExitCode;

/// Prints what the repository, or one snapshot, stores.
pub fn run(a: StatsArgs, ctx: &Ctx) -> Result<ExitCode> {
    let _ = (a, ctx);
    anyhow::bail!("stats: not implemented yet")
}
