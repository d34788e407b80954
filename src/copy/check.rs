//! `verify` of a copy: metadata, hash list checksum, data files, and every block against its
//! SHA-256, read through the shared scan pipeline.

use super::engine::{HashStage, Hashed, ZeroHashes};
use super::{CopyFormat, open_base, open_copy, reader, threads};
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::scan::{self, Scan};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

/// Options of [`verify`].
#[derive(Debug, Clone, Default)]
pub struct VerifyCopyOptions {
    /// Worker threads; 0 means one per core.
    pub threads: usize,
    pub cancel: Option<Arc<AtomicBool>>,
}

/// A block whose content does not match its recorded SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BadBlock {
    #[serde(rename = "block")]
    pub index: u64,
    pub offset: u64,
    pub length: u64,
}

/// What [`verify`] found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct VerifyCopyReport {
    #[serde(rename = "copy")]
    pub dest: PathBuf,
    pub format: Option<CopyFormat>,
    pub blocks_checked: u64,
    pub bytes_read: u64,
    /// Number of bad blocks.
    pub bad_blocks: u64,
    /// The first bad blocks (at most [`MAX_REPORTED`]).
    pub bad: Vec<BadBlock>,
}

/// Most bad blocks listed in a [`VerifyCopyReport`].
pub const MAX_REPORTED: usize = 1000;

/// Checks a whole copy: the metadata, the hash list against its checksum, every data file's
/// presence and size, and every block against its SHA-256 (holes against the hash of zeros).
pub fn verify(
    path: &Path,
    opts: &VerifyCopyOptions,
    progress: &dyn Progress,
) -> Result<VerifyCopyReport> {
    let opened = open_copy(path)?;
    let (paths, meta) = (&opened.paths, &opened.meta);
    // The whole hash list against its checksum.
    let list = open_base(paths, meta)?;
    let inner = reader::open_data(paths, meta)?;
    let bs = meta.block_size as u64;
    let size = meta.size;
    let zeros = ZeroHashes::new(size, bs);
    let scan = Scan {
        known: None,
        source: inner.as_ref(),
        block_size: bs,
        start_block: 0,
        map: None,
        threads: threads(opts.threads),
        cancel: opts.cancel.as_deref(),
        rescue: None,
    };
    let mut report = VerifyCopyReport {
        dest: paths.dest(),
        format: Some(meta.container),
        ..VerifyCopyReport::default()
    };
    progress.start("verify", size);
    let r = scan::run(&scan, &HashStage { keep_data: false }, progress, |done| {
        let mut cursor = list.cursor();
        for d in done.by_ref() {
            for b in d.index..d.index + d.count {
                let len = ((b + 1) * bs).min(size) - b * bs;
                let got = match &d.out {
                    Hashed::Hole | Hashed::Unused => zeros.of(b),
                    Hashed::Zero => {
                        report.bytes_read += len;
                        zeros.of(b)
                    }
                    Hashed::Data { hash, .. } => {
                        report.bytes_read += len;
                        *hash
                    }
                    // Verification never uses change tracking.
                    Hashed::Known => {
                        return Err(Error::internal(
                            "copy verification",
                            "met a block it did not read",
                        ));
                    }
                };
                report.blocks_checked += 1;
                if got != cursor.get(b)? {
                    report.bad_blocks += 1;
                    if report.bad.len() < MAX_REPORTED {
                        report.bad.push(BadBlock {
                            index: b,
                            offset: b * bs,
                            length: len,
                        });
                    }
                }
            }
            progress.advance((d.count * bs).min(size - d.index * bs));
        }
        if let Some(e) = done.take_error() {
            return Err(e);
        }
        if done.next_block() < meta.block_count {
            return Err(Error::Interrupted {
                checkpointed: false,
            });
        }
        Ok(())
    });
    progress.finish();
    r?;
    Ok(report)
}
