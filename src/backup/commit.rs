//! The backup's commit side: the snapshot being written and the journal that makes it
//! resumable.
//!
//! - [`Draft`] opens the run: it replays the journal of the interrupted backup the plan
//!   continues into a new tree writer ([`TreeWriter`]: the snapshot's block map, its nodes
//!   packed as tree blobs), or starts a journal; at the end it finishes the tree, makes every
//!   pack durable and indexed ([`Packer::checkpoint`]), writes the snapshot (version 3) and
//!   removes the journal.
//! - [`Committer`] takes the scan's results in block order, appends them to the tree and
//!   every few seconds hands a [`Batch`] to the checkpointer thread: a packer checkpoint
//!   (packs durable, then an index file naming them), then a durable journal append (version
//!   4: its PART records name only indexed blobs). Each checkpoint also loads the index files
//!   other writers wrote meanwhile, so that their blobs deduplicate. A slow flush never stalls
//!   the pipeline; while one is in progress the next batch keeps growing.

use super::BackupPlan;
use super::stage::{Done, Outcome};
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::repo::Repository;
use crate::repo::format::{BlockRef, decode_records, encode_run};
use crate::repo::journal::{BatchStats, Journal, JournalHeader};
use crate::repo::packer::Packer;
use crate::repo::snapshot::{SnapshotHeader, SnapshotStats, write_tree_snapshot};
use crate::repo::tree::TreeWriter;
use crate::scan::{self, Ordered};
use crossbeam_channel::bounded;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The snapshot a run writes, and its journal.
pub(super) struct Draft<'p> {
    /// The snapshot's block map; its nodes go to the packer.
    writer: TreeWriter<'p>,
    journal: Journal,
    /// The journal's header: the time, tags and parent of the snapshot.
    header: JournalHeader,
    /// Statistics of the runs before this one (replayed from the journal).
    earlier: BatchStats,
    /// Runs the journal records, this one included when it continues an interrupted backup.
    resumes: u32,
    /// True when this run continues an interrupted backup.
    resumed: bool,
}

/// A committed snapshot.
pub(super) struct Committed {
    pub snapshot_id: String,
    pub parent: Option<String>,
    pub resumed: bool,
    pub stats: SnapshotStats,
    pub unreadable: Vec<(u64, u64)>,
}

impl<'p> Draft<'p> {
    /// Continues the interrupted backup that `plan` resumes (its journal is replayed into a new
    /// tree writer, its unreadable ranges into `unreadable`, and this run is marked in it)
    /// or starts a new journal at `journal_path`. Tree nodes go to `packer`.
    pub fn open(
        packer: &'p Packer,
        plan: &BackupPlan,
        journal_path: &str,
        fresh: impl FnOnce() -> JournalHeader,
        unreadable: &mut Vec<(u64, u64)>,
    ) -> Result<Draft<'p>> {
        let mut writer = TreeWriter::new(packer, plan.block_count);
        let mut earlier = BatchStats::default();
        let mut resumes = 0u32;
        let continues = plan.resume.continues();
        let (mut journal, header) = if continues {
            let mut replay_err = None;
            let b = packer.backend().as_ref();
            let path = b.display_path(journal_path);
            let r = Journal::resume(b, journal_path, packer.sealer(), |_, batch| {
                if batch.block_count == 0 {
                    resumes += 1;
                }
                earlier.add(&batch.stats);
                for &r in &batch.unreadable {
                    scan::push_range(unreadable, r);
                }
                let mut res = Ok(());
                decode_records(&batch.records, batch.block_count, |r, n| {
                    if res.is_ok() {
                        res = writer.push(r, n);
                    }
                })
                .map_err(|d| Error::corrupt("journal batch", &path, d))?;
                if let Err(e) = res {
                    replay_err = Some(e);
                }
                Ok(())
            })?;
            if let Some(e) = replay_err {
                return Err(e);
            }
            match r {
                Some(x) => x,
                None => {
                    return Err(Error::corrupt("journal", &path, "vanished while resuming"));
                }
            }
        } else {
            let h = fresh();
            let b = packer.backend().as_ref();
            (Journal::create(b, journal_path, &h, packer.sealer())?, h)
        };
        let start_block = writer.blocks();
        if start_block != plan.resume.from_block() {
            return Err(Error::internal(
                "backup",
                format!(
                    "the journal ends at block {start_block}, the plan resumes from block {}",
                    plan.resume.from_block()
                ),
            ));
        }
        let resumed = continues && start_block > 0 || resumes > 0;
        if continues {
            // Mark this run in the journal, so the snapshot counts its resumptions.
            packer.check_fence()?;
            journal.append(start_block, 0, &BatchStats::default(), &[], &[])?;
            resumes += 1;
        }
        Ok(Draft {
            writer,
            journal,
            header,
            earlier,
            resumes,
            resumed,
        })
    }

    /// The first block this run scans: the journal covers the blocks before it.
    pub fn start_block(&self) -> u64 {
        self.writer.blocks()
    }

    /// Writes the snapshot of all runs (this one's statistics are `this_run`): the tree's last
    /// nodes, then every pack durable and indexed, then the snapshot that names the tree, then
    /// the journal is forgotten.
    pub fn finish(
        self,
        repo: &Repository,
        packer: &Packer,
        plan: &BackupPlan,
        this_run: &BatchStats,
        unreadable: Vec<(u64, u64)>,
        started: Instant,
    ) -> Result<Committed> {
        let mut total = self.earlier;
        total.add(this_run);
        let stats = SnapshotStats {
            bytes_read: total.bytes_read,
            data_blocks: total.data_blocks,
            zero_blocks: total.zero_blocks,
            unused_blocks: total.unused_blocks,
            unchanged_blocks: total.unchanged_blocks,
            deduplicated_blocks: total.deduplicated_blocks,
            new_chunks: total.new_chunks,
            new_bytes: total.new_bytes,
            new_bytes_stored: total.new_bytes_stored,
            duration_secs: (total.duration_ms as f64 / 1000.0).max(started.elapsed().as_secs_f64()),
            resumed: self.resumes,
        };
        let header = SnapshotHeader {
            time: self.header.time,
            time_unix: self.header.time_unix,
            time_nanos: self.header.time_nanos,
            hostname: crate::platform::hostname(),
            source: plan.source.clone(),
            filesystem: plan.filesystem.clone(),
            layout: plan.layout.clone(),
            all_blocks: plan.all_blocks,
            volume_key: plan.volume_key.clone(),
            block_size: plan.block_size,
            block_count: plan.block_count,
            chunk_hash: plan.chunk_hash,
            parent: self.header.parent.clone(),
            tags: self.header.tags,
            stats: stats.clone(),
            unreadable,
            consistent: Some(plan.consistent),
            tree: None,
        };
        let root = self.writer.finish()?;
        packer.checkpoint()?;
        packer.check_fence()?;
        let snapshot_id =
            write_tree_snapshot(repo.backend().as_ref(), &header, root, repo.sealer())?;
        self.journal.remove()?;
        Ok(Committed {
            snapshot_id,
            parent: self.header.parent,
            resumed: self.resumed,
            stats,
            unreadable: header.unreadable,
        })
    }
}

/// Commits one run's results, in block order, to a [`Draft`].
pub(super) struct Committer<'a, 'p> {
    /// Made durable and indexed before each journal batch.
    pub packer: &'a Packer,
    pub draft: &'a mut Draft<'p>,
    /// Unreadable byte ranges: those of the journal's batches, then the ones the scan adds.
    pub unreadable: &'a Mutex<Vec<(u64, u64)>>,
    pub checkpoint_interval: Duration,
    pub block_size: u64,
    /// The volume's size in bytes.
    pub size: u64,
    pub cancel: Option<&'a AtomicBool>,
}

impl Committer<'_, '_> {
    /// Appends the scan's results to the snapshot and checkpoints every
    /// `checkpoint_interval`. Returns this run's statistics and the blocks taken from the
    /// parent unread.
    pub fn commit(
        self,
        done: &mut Ordered<'_, Vec<Done>>,
        progress: &dyn Progress,
    ) -> Result<(BatchStats, u64)> {
        let Committer {
            packer,
            draft,
            unreadable,
            checkpoint_interval,
            block_size: bs,
            size,
            cancel,
        } = self;
        let start_block = draft.writer.blocks();
        let block_count = size.div_ceil(bs);
        let writer = &mut draft.writer;
        let journal = &mut draft.journal;
        let (cp_tx, cp_rx) = bounded::<Batch>(0);
        std::thread::scope(|scope| {
            let checkpointer = scope.spawn(move || -> Result<()> {
                for batch in cp_rx.iter() {
                    // The batch names blobs added before it was taken: durable and indexed
                    // first. (The checkpoint also loads the index files concurrent writers
                    // wrote, so that their blobs deduplicate from now on.)
                    packer.checkpoint()?;
                    packer.check_fence()?;
                    journal.append(
                        batch.first,
                        batch.blocks,
                        &batch.stats,
                        &batch.unreadable,
                        &batch.records,
                    )?;
                }
                Ok(())
            });
            let mut run_stats = BatchStats::default();
            let mut unread = 0u64;
            let mut batch = Batch::new(start_block);
            let mut journaled = JournaledRanges::new(start_block * bs);
            let mut take_unreadable = |upto: u64| -> Vec<(u64, u64)> {
                let all = unreadable.lock().unwrap_or_else(|p| p.into_inner());
                journaled.take(&all, upto.min(size))
            };
            let mut last_checkpoint = Instant::now();
            let mut failed = false;
            let mut first_error = None;
            while let Some(d) = done.next() {
                let mut pushed = Ok(());
                for part in &d.out {
                    pushed = writer.push(part.block_ref, part.count);
                    if pushed.is_err() {
                        break;
                    }
                    batch.push(part);
                    unread += if part.unread { part.count } else { 0 };
                }
                if let Err(e) = pushed {
                    first_error = Some(e);
                    break;
                }
                progress.advance((d.count * bs).min(size - d.index * bs));
                if batch.blocks > 0
                    && (last_checkpoint.elapsed() >= checkpoint_interval
                        || batch.records.len() >= 8 << 20)
                {
                    // Hand over only if the checkpointer is idle (rendezvous channel).
                    let mut full = batch.take(done.next_block(), &mut last_checkpoint);
                    full.unreadable = take_unreadable(done.next_block() * bs);
                    let stats = full.stats;
                    match cp_tx.try_send(full) {
                        Ok(()) => run_stats.add(&stats),
                        Err(crossbeam_channel::TrySendError::Full(b)) => batch.prepend(b),
                        Err(crossbeam_channel::TrySendError::Disconnected(_)) => {
                            failed = true;
                            break;
                        }
                    }
                }
                // Stopped (Ctrl-C): commit what finished in order now, without waiting for
                // the runs already read (up to a few hundred MiB of whole runs).
                if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                    break;
                }
            }
            let next = done.next_block();
            // Whatever finished in order is kept for the next run, even after an error.
            let mut last = batch.take(next, &mut last_checkpoint);
            last.unreadable = take_unreadable(next * bs);
            run_stats.add(&last.stats);
            if last.blocks > 0 && !failed && first_error.is_none() {
                let _ = cp_tx.send(last);
            }
            drop(cp_tx);
            let cp = checkpointer
                .join()
                .unwrap_or_else(|_| Err(Error::internal("backup", "checkpoint thread panicked")));
            if let Some(e) = first_error.or_else(|| done.take_error()) {
                return Err(e);
            }
            cp?;
            if next < block_count {
                if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                    return Err(Error::Interrupted { checkpointed: true });
                }
                return Err(Error::internal(
                    "backup",
                    format!("backup stopped at block {next} of {block_count} without an error"),
                ));
            }
            Ok((run_stats, unread))
        })
    }
}

/// Which of the unreadable ranges are journaled so far: the entries of the shared list wholly
/// journaled, and the byte offset up to which ranges are journaled (a range found now may
/// extend one replayed from the journal).
#[derive(Debug)]
struct JournaledRanges {
    whole: usize,
    from: u64,
}

impl JournaledRanges {
    /// Nothing is journaled from byte `from` on.
    fn new(from: u64) -> JournaledRanges {
        JournaledRanges { whole: 0, from }
    }

    /// The parts of the ranges of `all` (sorted, merged) below byte `upto` that are not
    /// journaled yet; they are journaled from now on.
    fn take(&mut self, all: &[(u64, u64)], upto: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for &(off, len) in &all[self.whole..] {
            if off >= upto {
                break;
            }
            let (s, e) = (off.max(self.from), (off + len).min(upto));
            if s < e {
                out.push((s, e - s));
            }
        }
        while all.get(self.whole).is_some_and(|&(o, l)| o + l <= upto) {
            self.whole += 1;
        }
        self.from = self.from.max(upto);
        out
    }
}

/// Block references and statistics since the last checkpoint.
#[derive(Debug)]
struct Batch {
    first: u64,
    blocks: u64,
    stats: BatchStats,
    /// Unreadable byte ranges of the batch's blocks (set when the batch is taken).
    unreadable: Vec<(u64, u64)>,
    records: Vec<u8>,
    run: Option<(BlockRef, u64)>,
}

impl Batch {
    fn new(first: u64) -> Batch {
        Batch {
            first,
            blocks: 0,
            stats: BatchStats::default(),
            unreadable: Vec::new(),
            records: Vec::new(),
            run: None,
        }
    }

    fn push(&mut self, d: &Done) {
        let count = d.count;
        self.blocks += count;
        let s = &mut self.stats;
        s.bytes_read += d.bytes_read;
        match d.outcome {
            Outcome::Zero => s.zero_blocks += count,
            Outcome::Unused => s.unused_blocks += count,
            Outcome::Unchanged => {
                s.data_blocks += count;
                s.unchanged_blocks += count
            }
            Outcome::Deduplicated => {
                s.data_blocks += count;
                s.deduplicated_blocks += count
            }
            Outcome::New {
                raw,
                stored,
                chunks,
            } => {
                s.data_blocks += count;
                s.new_chunks += chunks;
                s.new_bytes += raw;
                s.new_bytes_stored += stored;
            }
        }
        // Consecutive zero or unused blocks, and consecutive pieces of one blob, make one
        // record.
        match (self.run, d.block_ref) {
            (Some((r, c)), b)
                if r.continues(c, &b)
                    && !matches!(b, BlockRef::Chunk(_) | BlockRef::Slice { .. }) =>
            {
                self.run = Some((r, c + count))
            }
            (_, b) => {
                self.flush_run();
                self.run = Some((b, count));
            }
        }
    }

    /// Returns the finished batch (runs flushed, duration set) and starts a new one at `next`.
    fn take(&mut self, next: u64, last: &mut Instant) -> Batch {
        self.flush_run();
        self.stats.duration_ms = last.elapsed().as_millis() as u64;
        *last = Instant::now();
        std::mem::replace(self, Batch::new(next))
    }

    /// Puts an earlier batch that could not be handed over back in front of this one.
    fn prepend(&mut self, mut earlier: Batch) {
        self.flush_run();
        earlier.blocks += self.blocks;
        earlier.stats.add(&self.stats);
        earlier.unreadable.append(&mut self.unreadable);
        earlier.records.extend_from_slice(&self.records);
        *self = earlier;
    }

    fn flush_run(&mut self) {
        if let Some((r, c)) = self.run.take() {
            encode_run(&mut self.records, r, c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::ChunkId;

    fn done(block_ref: BlockRef, outcome: Outcome, count: u64) -> Done {
        Done {
            block_ref,
            outcome,
            count,
            bytes_read: 0,
            unread: false,
        }
    }

    fn refs(b: &Batch) -> Vec<(BlockRef, u64)> {
        let mut out = Vec::new();
        decode_records(&b.records, b.blocks, |r, n| out.push((r, n))).unwrap();
        out
    }

    #[test]
    fn batch_merges_runs_and_counts_outcomes() {
        let c = BlockRef::Chunk(ChunkId([1; 32]));
        let mut b = Batch::new(10);
        b.push(&done(BlockRef::Zero, Outcome::Zero, 2));
        b.push(&done(BlockRef::Zero, Outcome::Zero, 3));
        b.push(&done(BlockRef::Unused, Outcome::Unused, 4));
        b.push(&Done::one(
            c,
            Outcome::New {
                raw: 100,
                stored: 40,
                chunks: 1,
            },
            100,
            false,
        ));
        b.push(&Done::one(c, Outcome::Deduplicated, 100, false));
        b.push(&Done::one(c, Outcome::Unchanged, 0, true));
        let mut last = Instant::now();
        let full = b.take(25, &mut last);
        assert_eq!((full.first, full.blocks), (10, 12));
        assert_eq!(
            refs(&full),
            vec![
                (BlockRef::Zero, 5),
                (BlockRef::Unused, 4),
                (c, 1),
                (c, 1),
                (c, 1)
            ]
        );
        let s = full.stats;
        assert_eq!((s.zero_blocks, s.unused_blocks, s.data_blocks), (5, 4, 3));
        assert_eq!(
            (s.new_chunks, s.new_bytes, s.new_bytes_stored),
            (1, 100, 40)
        );
        assert_eq!((s.deduplicated_blocks, s.unchanged_blocks), (1, 1));
        assert_eq!(s.bytes_read, 200);
        // The next batch starts where this one ended, empty.
        assert_eq!((b.first, b.blocks, b.records.len()), (25, 0, 0));
    }

    #[test]
    fn pieces_of_one_blob_make_one_record() {
        let (a, b) = (ChunkId([1; 32]), ChunkId([2; 32]));
        let part = |blob, index| BlockRef::Part { blob, index };
        let new = Outcome::New {
            raw: 3 * 4096,
            stored: 100,
            chunks: 1,
        };
        let mut batch = Batch::new(0);
        batch.push(&done(part(a, 0), new, 3));
        batch.push(&done(part(a, 3), Outcome::Deduplicated, 2));
        batch.push(&done(BlockRef::Zero, Outcome::Zero, 1));
        batch.push(&done(part(a, 5), Outcome::Unchanged, 1));
        batch.push(&done(part(b, 0), Outcome::Unchanged, 4));
        batch.push(&done(part(b, 5), Outcome::Unchanged, 1));
        let mut last = Instant::now();
        let full = batch.take(12, &mut last);
        assert_eq!(
            refs(&full),
            vec![
                (part(a, 0), 5),
                (BlockRef::Zero, 1),
                (part(a, 5), 1),
                (part(b, 0), 4),
                (part(b, 5), 1)
            ]
        );
        let s = full.stats;
        assert_eq!(s.data_blocks, 11);
        assert_eq!((s.unchanged_blocks, s.deduplicated_blocks), (6, 2));
        assert_eq!((s.new_chunks, s.new_bytes_stored), (1, 100));
    }

    #[test]
    fn a_batch_not_handed_over_is_prepended_to_the_next() {
        let mut b = Batch::new(0);
        b.push(&done(BlockRef::Zero, Outcome::Zero, 2));
        let mut last = Instant::now();
        let mut first = b.take(2, &mut last);
        first.unreadable = vec![(0, 512)];
        b.push(&done(BlockRef::Zero, Outcome::Zero, 3));
        b.push(&done(BlockRef::Unused, Outcome::Unused, 1));
        b.prepend(first);
        let all = b.take(6, &mut last);
        assert_eq!((all.first, all.blocks), (0, 6));
        assert_eq!(all.unreadable, vec![(0, 512)]);
        assert_eq!(all.stats.zero_blocks, 5);
        assert_eq!(all.stats.unused_blocks, 1);
        assert_eq!(
            refs(&all),
            vec![
                (BlockRef::Zero, 2),
                (BlockRef::Zero, 3),
                (BlockRef::Unused, 1)
            ]
        );
    }

    #[test]
    fn unreadable_ranges_are_journaled_once_each_part() {
        // A range replayed from the journal ends at 1000; the run started at byte 800.
        let mut all = vec![(500u64, 500u64)];
        let mut j = JournaledRanges::new(800);
        // The scan extends it and finds another.
        all[0] = (500, 700);
        all.push((2000, 100));
        assert_eq!(j.take(&all, 1100), vec![(800, 300)]);
        assert_eq!(j.take(&all, 1100), vec![]);
        assert_eq!(j.take(&all, 2050), vec![(1100, 100), (2000, 50)]);
        assert_eq!(j.take(&all, 5000), vec![(2050, 50)]);
        assert_eq!(j.take(&all, 6000), vec![]);
    }
}
