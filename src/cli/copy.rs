//! `volback copy SOURCE DEST` and `volback copy --update SOURCE DEST`.

use super::Ctx;
use super::args::{CopyArgs, block_size_arg};
use super::display::CliProgress;
use super::report::print_copy;
use anyhow::{Result, bail};
use std::process::ExitCode;
use std::time::Duration;
use volback::copy::{CopyFormat, CopyOptions};
use volback::source::Source;

/// The library's options for `copy`, `copy --update` and `export`.
pub(super) fn options(
    format: Option<CopyFormat>,
    block_size: Option<u64>,
    slice_size: Option<u64>,
    threads: usize,
    checkpoint_secs: f64,
    ctx: &Ctx,
) -> Result<CopyOptions> {
    Ok(CopyOptions {
        format: format.unwrap_or(CopyFormat::Raw),
        block_size: block_size_arg(block_size)?,
        slice_size,
        threads,
        checkpoint_interval: Duration::from_secs_f64(checkpoint_secs.clamp(0.0, 3600.0)),
        cancel: Some(ctx.cancel.clone()),
        ..CopyOptions::default()
    })
}

/// Copies a volume to plain image files, or brings an existing copy up to date.
pub fn run(a: CopyArgs, ctx: &Ctx) -> Result<ExitCode> {
    let mut opts = options(
        a.format,
        a.block_size,
        a.slice_size,
        a.threads,
        a.checkpoint_secs,
        ctx,
    )?;
    opts.all_blocks = a.all_blocks;
    opts.allow_mounted = a.allow_mounted;
    opts.rehash = a.rehash;
    let src = Source::open(&a.source)?;
    let progress = CliProgress::new(ctx.quiet);
    let report = if a.update {
        if a.slice_size.is_some() {
            bail!("--slice-size applies to new copies; an update keeps the copy's files");
        }
        if let Some(f) = a.format
            && let Some(existing) = volback::copy::existing_format(&a.dest)
            && existing != f
        {
            bail!(
                "{} is a {existing} copy, not {f}; an update keeps the copy's format",
                a.dest.display(),
            );
        }
        volback::copy::update(&src, &a.dest, &opts, &progress)?
    } else {
        if a.format.is_none() {
            bail!("--format is required for a new copy (raw, bin, vhd, vhd-dynamic, vhdx, qcow2)");
        }
        volback::copy::copy(&src, &a.dest, &opts, &progress)?
    };
    print_copy(&report, a.json, None)?;
    Ok(ExitCode::SUCCESS)
}
