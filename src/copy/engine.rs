//! The update engine: scan a volume, hash every block, rewrite the blocks of the copy whose
//! SHA-256 differs from the one recorded, journal progress, and write the new hash list.
//!
//! A new copy is an update of an empty copy (every block compares with the hash of zeros),
//! so copy, update and export all run here.

use super::format::*;
use super::hashes::{Hash, HashList, HashListHeader, HashListWriter, sha256, zero_hash};
use super::journal::{Journal, Replay};
use super::meta::{CopyMeta, CopyPaths, CopyState, CopyStats, HashesRef};
use crate::error::{Error, Result};
use crate::fs::BlockMap;
use crate::image::ImageWriter;
use crate::progress::Progress;
use crate::scan::{self, BlockBuf, Input, Scan, ScanSource, Stage};
use crate::volume::is_zero;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Blocks past the last finished one that a run may modify before recording more progress:
/// 1 GiB of the volume (what a resumed run rewrites unconditionally, at most).
pub const HORIZON_BYTES: u64 = 1 << 30;

/// What a worker found in one job.
pub enum Hashed {
    /// `count` hole blocks (read as zeros, not read).
    Hole,
    /// `count` blocks the filesystem does not use (not read; zeros in the copy).
    Unused,
    /// One block that was read and is all zeros.
    Zero,
    /// One block of data: its SHA-256, and its bytes when the stage keeps them.
    Data { hash: Hash, buf: Option<BlockBuf> },
    /// One block change tracking knows to be what the copy holds (not read).
    Known,
}

/// Workers: zero detection and SHA-256 (on every core).
pub struct HashStage {
    /// Keep each data block's bytes for the committer (to write them).
    pub keep_data: bool,
}

impl Stage for HashStage {
    type Hint = ();
    type Hints = ();
    type Worker = ();
    type Out = Hashed;

    fn hints(&self) {}

    fn hint(&self, _: &mut (), _: u64, _: &dyn Progress) {}

    fn worker(&self) -> Result<()> {
        Ok(())
    }

    fn process(&self, _: &mut (), _: u64, _: u64, input: Input<()>) -> Result<Hashed> {
        Ok(match input {
            Input::Hole => Hashed::Hole,
            Input::Unused => Hashed::Unused,
            Input::Known { .. } => Hashed::Known,
            Input::Run { .. } => {
                return Err(crate::error::Error::internal(
                    "copy",
                    "a multi-block job reached a per-block stage",
                ));
            }
            Input::Data { buf, .. } => {
                if is_zero(&buf) {
                    Hashed::Zero
                } else {
                    Hashed::Data {
                        hash: sha256(&buf),
                        buf: self.keep_data.then_some(buf),
                    }
                }
            }
        })
    }
}

/// The hash of zeros for full blocks and for the last (possibly short) block.
#[derive(Clone, Copy)]
pub struct ZeroHashes {
    full: Hash,
    last: Hash,
    block_count: u64,
}

impl ZeroHashes {
    pub fn new(size: u64, block_size: u64) -> ZeroHashes {
        let block_count = size.div_ceil(block_size);
        let last_len = size - (block_count.saturating_sub(1)) * block_size;
        ZeroHashes {
            full: zero_hash(block_size),
            last: zero_hash(last_len),
            block_count,
        }
    }

    pub fn of(&self, block: u64) -> Hash {
        if block + 1 == self.block_count {
            self.last
        } else {
            self.full
        }
    }
}

/// Settings of one run.
pub struct RunSettings<'a> {
    pub threads: usize,
    pub checkpoint_interval: Duration,
    pub cancel: Option<&'a AtomicBool>,
}

/// One run of an update (new copy, update, or the continuation of an interrupted one).
pub struct Run<'a, S: ?Sized> {
    pub paths: &'a CopyPaths,
    /// Metadata in state `Updating`.
    pub meta: CopyMeta,
    pub source: &'a S,
    pub map: Option<&'a BlockMap>,
    /// Used blocks change tracking knows to hold what `base` says (not read); only with a
    /// base and a run that starts afresh.
    pub known: Option<&'a BlockMap>,
    pub writer: Box<dyn ImageWriter>,
    pub journal: Journal,
    pub replay: Replay,
    /// The hash list the data files held before the update; `None`: they held zeros. Owned,
    /// so that it is closed before the new list replaces it (Windows refuses to rename over
    /// an open file).
    pub base: Option<HashList>,
    pub settings: RunSettings<'a>,
}

/// What a run did: this run's statistics and those of the whole update.
pub struct RunResult {
    pub meta: CopyMeta,
    pub this_run: CopyStats,
    pub total: CopyStats,
    /// Blocks change tracking found unchanged, not read (this run).
    pub unread_blocks: u64,
}

/// Blocks finished since the last journal record.
struct Batch {
    first: u64,
    hashes: Vec<u8>,
    stats: CopyStats,
}

/// The committer's state.
struct Committer<'a> {
    writer: Box<dyn ImageWriter>,
    journal: &'a mut Journal,
    batch: Batch,
    horizon: u64,
    horizon_blocks: u64,
    /// A run of consecutive blocks to turn into zeros, not issued yet.
    zero_run: Option<(u64, u64)>,
    block_size: u64,
    size: u64,
    run_stats: CopyStats,
    last_checkpoint: Instant,
    /// Blocks change tracking found unchanged (not read) in this run.
    unread: u64,
}

impl Committer<'_> {
    fn flush_zero_run(&mut self) -> Result<()> {
        if let Some((a, b)) = self.zero_run.take() {
            let start = a * self.block_size;
            let end = (b * self.block_size).min(self.size);
            self.writer.write_zeroes(start, end - start)?;
        }
        Ok(())
    }

    /// Makes the batch durable: data, then a journal record that also moves the horizon to
    /// `next + horizon_blocks`.
    fn checkpoint(&mut self, next: u64) -> Result<()> {
        self.flush_zero_run()?;
        self.writer.sync()?;
        let horizon = next.saturating_add(self.horizon_blocks).max(self.horizon);
        self.journal.append(
            self.batch.first,
            horizon,
            &self.batch.stats,
            &self.batch.hashes,
        )?;
        self.run_stats.add(&self.batch.stats);
        self.batch = Batch {
            first: next,
            hashes: Vec::new(),
            stats: CopyStats::default(),
        };
        self.horizon = horizon;
        self.last_checkpoint = Instant::now();
        Ok(())
    }

    /// Called before block `b` is modified: it must be below the horizon.
    fn before_modifying(&mut self, b: u64) -> Result<()> {
        if b >= self.horizon {
            self.checkpoint(b)?;
        }
        Ok(())
    }
}

impl<S: ScanSource + ?Sized> Run<'_, S> {
    /// Runs the update to its end and finishes the copy (hash list, metadata, journal removed).
    pub fn execute(self, progress: &dyn Progress) -> Result<RunResult> {
        let Run {
            paths,
            mut meta,
            source,
            map,
            known,
            writer,
            mut journal,
            replay,
            base,
            settings,
        } = self;
        let bs = meta.block_size as u64;
        let size = meta.size;
        let block_count = meta.block_count;
        let start = replay.done;
        let zeros = ZeroHashes::new(size, bs);
        // Blocks that an interrupted run may have modified: their content is unknown.
        let forced_end = replay.horizon.max(start);
        let horizon_blocks = (HORIZON_BYTES / bs).max(1);
        let first_horizon = forced_end.max(start.saturating_add(horizon_blocks));
        // A run starts with a record of no blocks that sets its horizon.
        journal.append(start, first_horizon, &CopyStats::default(), &[])?;

        let mut c = Committer {
            writer,
            journal: &mut journal,
            batch: Batch {
                first: start,
                hashes: Vec::new(),
                stats: CopyStats::default(),
            },
            horizon: first_horizon,
            horizon_blocks,
            zero_run: None,
            block_size: bs,
            size,
            run_stats: CopyStats::default(),
            last_checkpoint: Instant::now(),
            unread: 0,
        };
        let cancelled = || settings.cancel.is_some_and(|x| x.load(Ordering::Relaxed));
        let scan = Scan {
            source,
            block_size: bs,
            start_block: start,
            map,
            // What the copy holds is only known when no earlier run touched it.
            known: known.filter(|_| base.is_some() && forced_end == 0 && start == 0),
            threads: settings.threads,
            cancel: settings.cancel,
            rescue: None,
        };
        if start < block_count {
            progress.start("copy", size - (start * bs).min(size));
            let mut base_cursor = base.as_ref().map(|b| b.cursor());
            let stage = HashStage { keep_data: true };
            let scanned = scan::run(&scan, &stage, progress, |done| {
                let mut failure = None;
                for d in done.by_ref() {
                    let r = (|| -> Result<()> {
                        for b in d.index..d.index + d.count {
                            let len = ((b + 1) * bs).min(size) - b * bs;
                            let (new, data): (Hash, Option<&[u8]>) = match &d.out {
                                Hashed::Hole => {
                                    c.batch.stats.zero_blocks += 1;
                                    (zeros.of(b), None)
                                }
                                Hashed::Unused => {
                                    c.batch.stats.unused_blocks += 1;
                                    (zeros.of(b), None)
                                }
                                Hashed::Zero => {
                                    c.batch.stats.zero_blocks += 1;
                                    c.batch.stats.bytes_read += len;
                                    (zeros.of(b), None)
                                }
                                Hashed::Data { hash, buf } => {
                                    c.batch.stats.data_blocks += 1;
                                    c.batch.stats.bytes_read += len;
                                    (*hash, buf.as_deref())
                                }
                                Hashed::Known => {
                                    let Some(cur) = base_cursor.as_mut() else {
                                        return Err(Error::internal(
                                            "copy",
                                            "change tracking without a base",
                                        ));
                                    };
                                    let old = cur.get(b)?;
                                    if old == zeros.of(b) {
                                        c.batch.stats.zero_blocks += 1;
                                    } else {
                                        c.batch.stats.data_blocks += 1;
                                    }
                                    c.unread += 1;
                                    (old, None)
                                }
                            };
                            let old = if b < forced_end {
                                None
                            } else {
                                match base_cursor.as_mut() {
                                    Some(cur) => Some(cur.get(b)?),
                                    None => Some(zeros.of(b)),
                                }
                            };
                            if old == Some(new) {
                                c.batch.stats.unchanged_blocks += 1;
                            } else {
                                c.before_modifying(b)?;
                                match data {
                                    Some(bytes) => {
                                        c.flush_zero_run()?;
                                        c.writer.write_at(b * bs, bytes)?;
                                        c.batch.stats.blocks_written += 1;
                                        c.batch.stats.bytes_written += bytes.len() as u64;
                                    }
                                    None => {
                                        c.zero_run = match c.zero_run {
                                            Some((a, e)) if e == b => Some((a, b + 1)),
                                            Some(_) => {
                                                c.flush_zero_run()?;
                                                Some((b, b + 1))
                                            }
                                            None => Some((b, b + 1)),
                                        };
                                        c.batch.stats.blocks_zeroed += 1;
                                    }
                                }
                            }
                            c.batch.hashes.extend_from_slice(&new);
                            if c.batch.hashes.len() as u64 >= RECORD_MAX_BLOCKS * HASH_LEN as u64 {
                                c.checkpoint(b + 1)?;
                            }
                        }
                        progress.advance((d.count * bs).min(size - d.index * bs));
                        if c.last_checkpoint.elapsed() >= settings.checkpoint_interval {
                            c.checkpoint(d.index + d.count)?;
                        }
                        Ok(())
                    })();
                    if let Err(e) = r {
                        failure = Some(e);
                        break;
                    }
                }
                Ok((failure, done.take_error(), done.next_block()))
            });
            progress.finish();
            let (commit_error, scan_error, next) = scanned?;
            if let Some(e) = commit_error {
                // A write or journal failure: what is recorded stays valid; the rest is redone.
                return Err(e);
            }
            // Keep what finished in order, even after a read error or Ctrl-C.
            if !c.batch.hashes.is_empty() {
                let next_done = c.batch.first + (c.batch.hashes.len() / HASH_LEN) as u64;
                c.checkpoint(next_done)?;
            }
            if let Some(e) = scan_error {
                return Err(e);
            }
            if next < block_count {
                if cancelled() {
                    return Err(Error::Interrupted { checkpointed: true });
                }
                return Err(Error::internal(
                    "copy",
                    format!("the copy stopped at block {next} of {block_count} without an error"),
                ));
            }
        }
        let Committer {
            writer,
            run_stats,
            unread,
            ..
        } = c;
        writer.finish()?;
        drop(base);

        // The new hash list: the records' hashes, in order.
        let header = HashListHeader {
            size,
            block_size: meta.block_size,
            block_count,
        };
        let mut w = HashListWriter::create_in(&paths.dir, header)?;
        journal.for_each_record(block_count, |r| w.push(r.hashes))?;
        let name = paths.hashes_name();
        let sha = w.finish(&paths.file(&name))?;
        let mut total = replay.stats;
        total.add(&run_stats);
        meta.state = CopyState::Complete;
        meta.hashes = Some(HashesRef { name, sha256: sha });
        meta.update = None;
        meta.updated = crate::time::rfc3339(crate::time::now_unix());
        meta.stats = Some(total);
        meta.store(paths)?;
        journal.remove()?;
        Ok(RunResult {
            meta,
            this_run: run_stats,
            total,
            unread_blocks: unread,
        })
    }
}
