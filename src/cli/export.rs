//! `volback export REPO SNAPSHOT OUT`: a snapshot written as a copy.

use super::Ctx;
use super::args::ExportArgs;
use super::copy::options;
use super::display::CliProgress;
use super::report::print_copy;
use anyhow::{Result, bail};
use std::ffi::OsStr;
use std::process::ExitCode;
use volback::open::{self, Target};

/// Writes the snapshot as plain image files with a SHA-256 per block.
pub fn run(a: ExportArgs, ctx: &Ctx) -> Result<ExitCode> {
    if a.format.is_none() {
        bail!("--format is required (raw, bin, vhd, vhd-dynamic, vhdx, qcow2)");
    }
    let args = [a.repo.as_os_str(), OsStr::new(&a.snapshot)];
    let Target::Snapshot { repository, id, .. } = open::identify_with(
        &args,
        &super::password::source(&a.password)?,
        &CliProgress::new(true),
    )?
    else {
        bail!(
            "{} {} does not name a snapshot",
            a.repo.display(),
            a.snapshot
        );
    };
    let opts = options(
        a.format,
        a.block_size,
        a.slice_size,
        a.threads,
        a.checkpoint_secs,
        ctx,
    )?;
    let progress = CliProgress::new(ctx.quiet);
    let report = volback::copy::export(&repository, &id, &a.out, &opts, &progress)?;
    print_copy(&report, a.json, Some(&id))?;
    Ok(ExitCode::SUCCESS)
}
