//! `volback init REPO`: create a repository.

use super::args::{InitArgs, block_size_arg};
use super::display::human_bytes;
use anyhow::{Context, Result};
use std::process::ExitCode;
use volback::repo::{InitOptions, Repository};

/// `volback init REPO [--hash H] [--zstd-level N] [--block-size S] [--pack-size S]`.
pub fn run(a: InitArgs) -> Result<ExitCode> {
    let mut opts = InitOptions {
        chunk_hash: a.hash,
        zstd_level: a.zstd_level,
        ..InitOptions::default()
    };
    if let Some(bs) = block_size_arg(a.block_size)? {
        opts.block_size = bs;
    }
    if let Some(ps) = a.pack_size {
        opts.pack_size = u32::try_from(ps).context("pack size too large")?;
    }
    let r = Repository::init(&a.repo, &opts)?;
    println!(
        "created repository {} at {} ({} chunks, {} blocks, zstd {})",
        r.config().id,
        a.repo.display(),
        r.config().chunk_hash.name(),
        human_bytes(r.config().block_size as u64),
        r.config().zstd_level
    );
    Ok(ExitCode::SUCCESS)
}
