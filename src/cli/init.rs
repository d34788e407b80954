//! `volback init REPO`: create a repository (encrypted unless `--no-encryption`).

use super::args::{InitArgs, block_size_arg};
use super::display::human_bytes;
use super::password;
use anyhow::{Context, Result};
use std::process::ExitCode;
use volback::repo::{EncryptionInit, InitOptions, Repository};

/// `volback init REPO [--hash H] [--zstd-level N] [--block-size S] [--pack-size S]
/// [--no-encryption | password and --kdf-* options]`.
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
    if !a.no_encryption {
        // Checked before asking for a password: no typing twice to learn the directory is
        // taken.
        Repository::check_new_location(&a.repo)?;
        let kdf = a.kdf.params()?;
        kdf.check()
            .map_err(|e| anyhow::anyhow!("key derivation parameters: {e}"))?;
        opts.encryption = Some(EncryptionInit {
            password: password::init_password(&a.password, &a.repo)?,
            kdf,
        });
    }
    let r = Repository::init(&a.repo, &opts)?;
    println!(
        "created repository {} at {} ({}, {} chunks, {} blocks, zstd {})",
        r.config().id,
        a.repo.display(),
        if r.is_encrypted() {
            "encrypted"
        } else {
            "plain"
        },
        r.config().chunk_hash.name(),
        human_bytes(r.config().block_size as u64),
        r.config().zstd_level
    );
    if let Some(slot) = r.current_slot() {
        println!(
            "key slot {slot}: without a password that opens a key slot the data cannot be \
             read; keep the password safe (`volback key add` adds another)"
        );
    }
    Ok(ExitCode::SUCCESS)
}
