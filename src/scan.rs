//! Scan: the read side shared by `backup`, `copy`, `export` and copy verification.
//!
//! A scan walks a volume in block order and hands every block to parallel workers, reading
//! only what must be read:
//!
//! ```text
//!  I/O loop ──staged runs──▶ dispatcher ──jobs──▶ workers (N) ──results──▶ commit (caller)
//!     │ (hole and unused runs) ──────────────────▶ jobs
//!     ▲                                                  │
//!     └─ staging buffers (3 × 4 MiB) ◀─ dispatcher       └─ block buffers back to a fixed pool
//! ```
//!
//! - The **I/O loop** skips blocks the allocation map marks unused, blocks change tracking
//!   knows to be unchanged since the caller's base ([`Scan::known`]), and holes that
//!   [`Volume::next_data`] reports (sparse files, unstored snapshot blocks) without reading
//!   them, and reads runs of consecutive blocks in one request of up to 4 MiB (16 MiB for
//!   stages that take whole runs: [`whole_run_blocks`]) ([`ScanSource::read_bulk`]:
//!   `O_DIRECT` for sources that support it).
//! - The **dispatcher** copies each block of a staged run into a buffer from a fixed pool and
//!   attaches the caller's per-block hint (a backup's parent reference), streamed in order.
//! - **Workers** run the caller's [`Stage::process`] (hash, compress, store…) on every core.
//! - The caller's **commit** function receives the results back in block order through
//!   [`Ordered`].
//!
//! Memory is bounded by the pool, whatever the volume size: a result that keeps its block's
//! data ([`BlockBuf`]) holds a pool buffer, which returns to the pool when dropped.

use crate::buffer::AlignedBuf;
use crate::error::{Error, Result};
use crate::fs::BlockMap;
use crate::progress::Progress;
use crate::source::Source;
use crate::volume::Volume;
use crossbeam_channel::{Receiver, Sender, bounded};
use std::collections::BTreeMap;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering};

/// A volume a scan can read: any [`Volume`], with optional fast paths for bulk reads.
pub trait ScanSource: Volume {
    /// Reads `len` bytes at `offset` into `buf` (which holds at least `len` rounded up to the
    /// buffer alignment) for a sequential pass.
    fn read_bulk(&self, offset: u64, buf: &mut AlignedBuf, len: usize) -> Result<()> {
        self.read_at(offset, &mut buf[..len])
    }

    /// True while bulk reads bypass the page cache (read-ahead hints are then pointless).
    fn direct_io(&self) -> bool {
        false
    }

    /// Hints that `[offset, offset + len)` will be read soon.
    fn prefetch(&self, _offset: u64, _len: u64) {}

    /// The unit in which unreadable ranges are retried and recorded.
    fn sector_size(&self) -> u64 {
        512
    }
}

impl ScanSource for Source {
    fn read_bulk(&self, offset: u64, buf: &mut AlignedBuf, len: usize) -> Result<()> {
        Source::read_bulk(self, offset, buf, len)
    }

    fn direct_io(&self) -> bool {
        self.uses_direct_io()
    }

    fn prefetch(&self, offset: u64, len: u64) {
        crate::platform::prefetch(self.file(), offset, len)
    }

    fn sector_size(&self) -> u64 {
        u64::from(self.geometry().logical_sector_size.max(512))
    }
}

impl ScanSource for dyn Volume + '_ {}

/// One block's bytes in a pool buffer; the buffer goes back to the pool when this is dropped.
pub struct BlockBuf {
    buf: Option<AlignedBuf>,
    len: usize,
    home: Sender<AlignedBuf>,
}

impl Deref for BlockBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.buf {
            Some(b) => &b[..self.len],
            None => &[],
        }
    }
}

impl Drop for BlockBuf {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            // The pool channel has room for every buffer; if the scan is over it is gone and
            // the buffer is simply freed.
            let _ = self.home.try_send(b);
        }
    }
}

/// What a worker receives for a job.
pub enum Input<H> {
    /// `count` blocks that read as zeros without being read (holes of the source).
    Hole,
    /// `count` blocks the allocation map marks unused: not read.
    Unused,
    /// One block that was read, with the stage's hint for it.
    Data { buf: BlockBuf, hint: H },
    /// `count` consecutive blocks that were read in one request, with the stage's hint for
    /// each: only for stages whose [`Stage::whole_runs`] says so.
    Run { buf: BlockBuf, hints: Vec<H> },
    /// Blocks that change tracking knows to equal the base's (not read), with the stage's
    /// hint for each: one block per job, or a whole run of them (at most
    /// [`Stage::whole_runs`] blocks) for stages that take whole runs.
    Known { hints: Vec<H> },
}

/// The caller's work on each block.
pub trait Stage: Sync {
    /// Per-block information the dispatcher attaches to data blocks, in block order.
    type Hint: Send;
    /// The dispatcher's state for producing hints (created on the dispatcher thread).
    type Hints;
    /// Per-worker state.
    type Worker;
    /// A worker's result for one job.
    type Out: Send;

    fn hints(&self) -> Self::Hints;

    /// `Some(n)` when the stage wants each run of consecutive blocks read in one request as
    /// one [`Input::Run`] job of at most `n` blocks (and at most [`whole_run_blocks`]) instead
    /// of one job per block, and runs of known blocks as one [`Input::Known`] job: it can
    /// then treat neighbouring blocks together (a backup cuts them into blobs).
    fn whole_runs(&self) -> Option<u64> {
        None
    }

    /// The hint for data or known block `block`; called in increasing block order.
    fn hint(&self, hints: &mut Self::Hints, block: u64, progress: &dyn Progress) -> Self::Hint;

    fn worker(&self) -> Result<Self::Worker>;

    /// Processes `count` blocks starting at `index` (`count` is 1 for [`Input::Data`]).
    fn process(
        &self,
        worker: &mut Self::Worker,
        index: u64,
        count: u64,
        input: Input<Self::Hint>,
    ) -> Result<Self::Out>;
}

/// A worker's result, with the blocks it covers.
pub struct Done<O> {
    pub index: u64,
    pub count: u64,
    pub out: O,
}

/// What to scan.
pub struct Scan<'a, S: ?Sized> {
    pub source: &'a S,
    pub block_size: u64,
    /// First block to read (a resumed run starts after its finished blocks).
    pub start_block: u64,
    /// Blocks the filesystem uses; `None` reads every block (holes are still skipped).
    pub map: Option<&'a BlockMap>,
    /// Used blocks known to hold what the caller's base (parent snapshot, copy) holds: not
    /// read, handed to the stage as [`Input::Known`].
    pub known: Option<&'a BlockMap>,
    /// Worker threads (at least one).
    pub threads: usize,
    /// Set to stop early; the blocks finished in order so far are still committed.
    pub cancel: Option<&'a AtomicBool>,
    /// `Some`: a read that fails on a bad sector is retried sector by sector; sectors that
    /// stay unreadable read as zeros and their ranges (offset, length) are added here.
    /// `None`: such a read ends the scan with its error.
    pub rescue: Option<&'a std::sync::Mutex<Vec<(u64, u64)>>>,
}

impl<S: ScanSource + ?Sized> Scan<'_, S> {
    pub fn block_count(&self) -> u64 {
        self.source.size().div_ceil(self.block_size)
    }

    fn cancelled(&self) -> bool {
        self.cancel.is_some_and(|c| c.load(Ordering::Relaxed))
    }
}

/// Worker results in block order, as the commit function sees them.
///
/// Iteration ends when every block was delivered, or early when the scan stopped (an error,
/// cancellation); [`Ordered::take_error`] then tells the first error of the other stages.
pub struct Ordered<'c, O> {
    rx: &'c Receiver<Result<Done<O>>>,
    pending: BTreeMap<u64, Done<O>>,
    next: u64,
    error: Option<Error>,
}

impl<O> Ordered<'_, O> {
    /// The first block not delivered yet.
    pub fn next_block(&self) -> u64 {
        self.next
    }

    /// The first error of the reader or a worker, if one happened.
    pub fn take_error(&mut self) -> Option<Error> {
        self.error.take()
    }
}

impl<O> Iterator for Ordered<'_, O> {
    type Item = Done<O>;

    fn next(&mut self) -> Option<Done<O>> {
        loop {
            if let Some(d) = self.pending.remove(&self.next) {
                self.next += d.count;
                return Some(d);
            }
            match self.rx.recv() {
                Ok(Ok(d)) => {
                    self.pending.insert(d.index, d);
                }
                Ok(Err(e)) => {
                    self.error.get_or_insert(e);
                }
                Err(_) => return None,
            }
        }
    }
}

/// Appends byte range `r` (offset, length) to a list in increasing order, merging it with the
/// last range when they touch.
pub fn push_range(list: &mut Vec<(u64, u64)>, r: (u64, u64)) {
    match list.last_mut() {
        Some(last) if last.0 + last.1 == r.0 => last.1 += r.1,
        _ => list.push(r),
    }
}

/// Blocks the reader fetches in one request (4 MiB worth, at least one block).
pub fn staging_blocks(block_size: u64) -> u64 {
    ((4u64 << 20) / block_size).max(1)
}

/// Largest request for stages that take whole runs: 16 MiB (fewer run ends, where a backup
/// must cut a blob), less when many workers would make the staging buffers (3 + 2 per worker,
/// see `read_blocks`) exceed [`WHOLE_RUN_BUDGET`]; never less than [`staging_blocks`].
pub fn whole_run_blocks(block_size: u64, threads: usize) -> u64 {
    let buffers = 3 + 2 * threads.max(1) as u64;
    let bytes = (WHOLE_RUN_BUDGET / buffers).clamp(4 << 20, 16 << 20);
    (bytes / block_size).max(1)
}

/// Memory the staging buffers of a whole-run scan aim to stay under (256 MiB; with 4 MiB
/// requests at least, many-core machines may use more: 4 MiB per buffer).
const WHOLE_RUN_BUDGET: u64 = 256 << 20;

/// Runs a scan: reader and workers on their own threads, `commit` on this one. `commit` gets
/// the results in block order and returns what the scan returns; when it returns early the
/// other stages are stopped.
pub fn run<S, St, R>(
    scan: &Scan<'_, S>,
    stage: &St,
    progress: &dyn Progress,
    commit: impl FnOnce(&mut Ordered<'_, St::Out>) -> Result<R>,
) -> Result<R>
where
    S: ScanSource + ?Sized,
    St: Stage,
{
    if scan.block_size == 0 || scan.threads == 0 {
        return Err(Error::InvalidArgument(
            "a scan needs a block size and at least one worker".into(),
        ));
    }
    let block_size = usize::try_from(scan.block_size)
        .map_err(|_| Error::InvalidArgument("block size too large".into()))?;
    // Enough buffers for the workers to chew on one staged read while the reader fetches
    // the next. Whole runs travel in their staging buffers and need no pool.
    let pool_size = if stage.whole_runs().is_some() {
        1
    } else {
        scan.threads * 3 + 2 * staging_blocks(scan.block_size) as usize
    };
    let (free_tx, free_rx) = bounded::<AlignedBuf>(pool_size);
    for _ in 0..pool_size {
        free_tx
            .send(AlignedBuf::new(block_size))
            .map_err(|_| Error::internal("scan", "the buffer pool closed while being filled"))?;
    }
    let (job_tx, job_rx) = bounded::<(u64, u64, Input<St::Hint>)>(scan.threads * 2);
    let (done_tx, done_rx) = bounded::<Result<Done<St::Out>>>(pool_size + scan.threads * 2 + 4);
    let stop = AtomicBool::new(false);

    std::thread::scope(|s| {
        let stop = &stop;
        {
            let done_tx = done_tx.clone();
            let free_rx = free_rx.clone();
            let free_tx = free_tx.clone();
            s.spawn(move || {
                if let Err(e) =
                    read_blocks(scan, stage, &job_tx, &free_rx, &free_tx, stop, progress)
                {
                    stop.store(true, Ordering::Relaxed);
                    let _ = done_tx.send(Err(e));
                }
            });
        }
        for _ in 0..scan.threads {
            let job_rx = job_rx.clone();
            let done_tx = done_tx.clone();
            s.spawn(move || work(stage, &job_rx, &done_tx, stop));
        }
        drop(done_tx);
        drop(job_rx);
        drop(free_tx);
        let mut ordered = Ordered {
            rx: &done_rx,
            pending: BTreeMap::new(),
            next: scan.start_block,
            error: None,
        };
        let r = commit(&mut ordered);
        // Unblock the other stages, whatever happened: results still in flight are dropped
        // (their buffers go back to the pool) until every sender is gone.
        stop.store(true, Ordering::Relaxed);
        drop(ordered);
        for _ in done_rx.iter() {}
        drop(free_rx);
        r
    })
}

/// Worker stage.
fn work<St: Stage>(
    stage: &St,
    jobs: &Receiver<(u64, u64, Input<St::Hint>)>,
    done: &Sender<Result<Done<St::Out>>>,
    stop: &AtomicBool,
) {
    let mut worker = match stage.worker() {
        Ok(w) => w,
        Err(e) => {
            stop.store(true, Ordering::Relaxed);
            let _ = done.send(Err(e));
            return;
        }
    };
    for (index, count, input) in jobs.iter() {
        if stop.load(Ordering::Relaxed) {
            continue;
        }
        let result = stage
            .process(&mut worker, index, count, input)
            .map(|out| Done { index, count, out });
        let failed = result.is_err();
        if failed {
            stop.store(true, Ordering::Relaxed);
        }
        if done.send(result).is_err() || failed {
            return;
        }
    }
}

/// Reader stage: an I/O loop (this thread) that walks the volume, emits hole and unused runs,
/// and reads runs of data blocks into staging buffers; and a dispatcher thread that splits
/// staged runs into per-block jobs with their hints. Two threads keep a read in flight while
/// the previous run is handed out.
fn read_blocks<S, St>(
    scan: &Scan<'_, S>,
    stage: &St,
    jobs: &Sender<(u64, u64, Input<St::Hint>)>,
    free: &Receiver<AlignedBuf>,
    free_home: &Sender<AlignedBuf>,
    stop: &AtomicBool,
    progress: &dyn Progress,
) -> Result<()>
where
    S: ScanSource + ?Sized,
    St: Stage,
{
    // Three staging buffers keep a read in flight while the previous run is handed out; a
    // stage that takes whole runs holds up to two per worker besides.
    let staging_buffers = 3 + if stage.whole_runs().is_some() {
        2 * scan.threads
    } else {
        0
    };
    let bs = scan.block_size;
    let size = scan.source.size();
    let block_count = scan.block_count();
    let staging = staging_blocks(bs);
    let max_run = stage
        .whole_runs()
        .map_or(staging, |n| n.clamp(1, whole_run_blocks(bs, scan.threads)));
    // A staged run: blocks read into a staging buffer, or (`None`) known blocks.
    let (staged_tx, staged_rx) = bounded::<(u64, u64, Option<AlignedBuf>)>(staging_buffers + 1);
    let (empty_tx, empty_rx) = bounded::<AlignedBuf>(staging_buffers);
    for _ in 0..staging_buffers {
        let _ = empty_tx.send(AlignedBuf::new((max_run * bs) as usize));
    }
    std::thread::scope(|s| {
        let dispatcher = s.spawn(move || {
            let mut hints = stage.hints();
            for (first, end, staging) in staged_rx.iter() {
                let Some(staging) = staging else {
                    if stage.whole_runs().is_some() {
                        let hints = (first..end)
                            .map(|block| stage.hint(&mut hints, block, progress))
                            .collect();
                        if jobs
                            .send((first, end - first, Input::Known { hints }))
                            .is_err()
                        {
                            return;
                        }
                        continue;
                    }
                    for block in first..end {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        let hints = vec![stage.hint(&mut hints, block, progress)];
                        if jobs.send((block, 1, Input::Known { hints })).is_err() {
                            return;
                        }
                    }
                    continue;
                };
                if stage.whole_runs().is_some() {
                    // The staging buffer itself is the job's buffer; it comes back here (to
                    // `empty_tx`) when the worker drops it.
                    let hints = (first..end)
                        .map(|block| stage.hint(&mut hints, block, progress))
                        .collect();
                    let buf = BlockBuf {
                        len: ((end * bs).min(size) - first * bs) as usize,
                        buf: Some(staging),
                        home: empty_tx.clone(),
                    };
                    if jobs
                        .send((first, end - first, Input::Run { buf, hints }))
                        .is_err()
                    {
                        return;
                    }
                    continue;
                }
                for block in first..end {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let Ok(mut buf) = free.recv() else {
                        return;
                    };
                    let off = ((block - first) * bs) as usize;
                    let len = ((block * bs + bs).min(size) - block * bs) as usize;
                    buf[..len].copy_from_slice(&staging[off..off + len]);
                    let hint = stage.hint(&mut hints, block, progress);
                    let buf = BlockBuf {
                        buf: Some(buf),
                        len,
                        home: free_home.clone(),
                    };
                    if jobs.send((block, 1, Input::Data { buf, hint })).is_err() {
                        return;
                    }
                }
                // The I/O loop may be done already; the staged runs still count.
                let _ = empty_tx.send(staging);
            }
        });
        // `staged_tx` moves into the I/O loop and is dropped when it ends, which ends the
        // dispatcher.
        let io = move || -> Result<()> {
            let mut extent: Option<std::ops::Range<u64>> = None;
            let mut extents_done = false;
            let mut index = scan.start_block;
            // Read-ahead of the blocks the map says will be read, for buffered reads: the
            // kernel's own read-ahead stops at every skipped (unused) block. Direct reads
            // bypass the page cache, where read-ahead would be wasted.
            const PREFETCH_WINDOW: u64 = 32 << 20;
            let window_blocks = (PREFETCH_WINDOW / bs).max(1);
            let mut prefetched = scan.start_block;
            // Longest gap of known blocks read through (whole-run stages only): 256 KiB.
            let bridge = match stage.whole_runs() {
                Some(_) => ((256 << 10) / bs).max(1),
                None => 0,
            };
            let mapped = |b: u64| scan.map.is_none_or(|m| m.is_used(b));
            let known = |b: u64| mapped(b) && scan.known.is_some_and(|k| k.is_used(b));
            // Blocks to read.
            let used = |b: u64| mapped(b) && !known(b);
            while index < block_count {
                if !scan.source.direct_io() && prefetched < index + window_blocks / 2 {
                    let from = prefetched.max(index);
                    let to = (index + window_blocks).min(block_count);
                    let mut b = from;
                    while b < to {
                        if !used(b) {
                            b += 1;
                            continue;
                        }
                        let run = b;
                        while b < to && used(b) {
                            b += 1;
                        }
                        let s = run * bs;
                        let e = (b * bs).min(size);
                        scan.source.prefetch(s, e - s);
                    }
                    prefetched = to;
                }
                if stop.load(Ordering::Relaxed) || scan.cancelled() {
                    return Ok(());
                }
                let start = index * bs;
                let end = (start + bs).min(size);
                if known(index) {
                    let mut until = index + 1;
                    while until < block_count && until - index < max_run && known(until) {
                        until += 1;
                    }
                    if staged_tx.send((index, until, None)).is_err() {
                        return Ok(());
                    }
                    index = until;
                    continue;
                }
                if !mapped(index) {
                    let mut until = index + 1;
                    while until < block_count && !mapped(until) {
                        until += 1;
                    }
                    if jobs.send((index, until - index, Input::Unused)).is_err() {
                        return Ok(());
                    }
                    index = until;
                    continue;
                }
                if !extents_done && extent.as_ref().is_none_or(|e| e.end <= start) {
                    extent = scan.source.next_data(start, size)?;
                    if extent.is_none() {
                        extents_done = true;
                    }
                    // Short holes between data are read through like short gaps of known
                    // blocks: they read as zeros, which the stage stores as zero blocks,
                    // as it does holes.
                    while let Some(e) = extent.as_mut()
                        && bridge > 0
                        && e.end < size
                    {
                        match scan.source.next_data(e.end, size)? {
                            Some(next) if next.start - e.end <= bridge * bs => e.end = next.end,
                            _ => break,
                        }
                    }
                }
                let hole_until = match &extent {
                    None => block_count,
                    Some(e) if e.start >= end => e.start / bs,
                    Some(_) => index,
                };
                if hole_until > index {
                    if jobs.send((index, hole_until - index, Input::Hole)).is_err() {
                        return Ok(());
                    }
                    index = hole_until;
                    continue;
                }
                // A run of consecutive blocks that all need reading, in one request (fewer,
                // larger reads: what O_DIRECT needs to reach the device's speed).
                let mut run_end = index + 1;
                let data_end = extent.as_ref().map_or(size, |e| e.end);
                let fits = |b: u64| b < block_count && b - index < max_run && b * bs < data_end;
                while fits(run_end) {
                    if used(run_end) {
                        run_end += 1;
                        continue;
                    }
                    // A short gap of known blocks before more blocks to read is read through:
                    // one request instead of two (with O_DIRECT each small request waits for
                    // the device alone). The stage finds the gap's blobs unchanged.
                    let mut gap_end = run_end;
                    while gap_end - run_end < bridge && fits(gap_end) && known(gap_end) {
                        gap_end += 1;
                    }
                    if gap_end == run_end || !fits(gap_end) || !used(gap_end) {
                        break;
                    }
                    run_end = gap_end;
                }
                let Ok(mut staging) = empty_rx.recv() else {
                    return Ok(());
                };
                let run_bytes = ((run_end * bs).min(size) - start) as usize;
                if let Err(e) = scan.source.read_bulk(start, &mut staging, run_bytes) {
                    let Some(found) = scan.rescue.filter(|_| e.is_media_error()) else {
                        return Err(e);
                    };
                    let sector = scan.source.sector_size();
                    let bad = rescue(scan.source, start, &mut staging[..run_bytes], sector)?;
                    for &(off, len) in &bad {
                        progress.warn(&format!(
                            "unreadable: {len} bytes at offset {off} of {} ({}); stored as zeros",
                            scan.source.describe(),
                            crate::error::chain(&e)
                        ));
                    }
                    let mut all = found.lock().unwrap_or_else(|p| p.into_inner());
                    for r in bad {
                        push_range(&mut all, r);
                    }
                }
                if staged_tx.send((index, run_end, Some(staging))).is_err() {
                    return Ok(());
                }
                index = run_end;
            }
            Ok(())
        };
        let r = io();
        // Drops `staged_tx`, which the closure holds: the dispatcher then ends.
        drop(io);
        if r.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        let _ = dispatcher.join();
        r
    })
}

/// Reads `buf` (the bytes at `start`) again sector by sector, each sector up to twice, after
/// a bulk read failed on a bad sector (ddrescue's way). Sectors that stay unreadable become
/// zeros; returns their merged ranges (offset, length). Errors other than bad sectors (the
/// device went away…) end the scan.
fn rescue<S: ScanSource + ?Sized>(
    source: &S,
    start: u64,
    buf: &mut [u8],
    sector: u64,
) -> Result<Vec<(u64, u64)>> {
    const ATTEMPTS: usize = 2;
    let sector = sector.max(1) as usize;
    let mut bad: Vec<(u64, u64)> = Vec::new();
    let mut off = 0usize;
    while off < buf.len() {
        let n = sector.min(buf.len() - off);
        let piece = &mut buf[off..off + n];
        let pos = start + off as u64;
        let mut ok = false;
        for _ in 0..ATTEMPTS {
            match source.read_at(pos, piece) {
                Ok(()) => {
                    ok = true;
                    break;
                }
                Err(e) if e.is_media_error() => {}
                Err(e) => return Err(e),
            }
        }
        if !ok {
            piece.fill(0);
            push_range(&mut bad, (pos, n as u64));
        }
        off += n;
    }
    Ok(bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::Silent;

    /// A volume of `size` bytes where byte `i` is `(i / 7) as u8`, with a hole in
    /// `[hole.0, hole.1)`.
    struct Pattern {
        size: u64,
        hole: (u64, u64),
    }

    impl Volume for Pattern {
        fn size(&self) -> u64 {
            self.size
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
            for (i, b) in buf.iter_mut().enumerate() {
                let x = offset + i as u64;
                *b = if (self.hole.0..self.hole.1).contains(&x) {
                    0
                } else {
                    (x / 7) as u8
                };
            }
            Ok(())
        }
        fn next_data(&self, offset: u64, end: u64) -> Result<Option<std::ops::Range<u64>>> {
            let end = end.min(self.size);
            if offset >= end {
                return Ok(None);
            }
            if offset < self.hole.0 {
                return Ok(Some(offset..self.hole.0.min(end)));
            }
            let s = offset.max(self.hole.1);
            Ok((s < end).then_some(s..end))
        }
        fn describe(&self) -> String {
            "pattern".into()
        }
    }

    /// Sums each job's bytes; `whole`: takes runs as one job.
    #[derive(Default)]
    struct Sum {
        whole: bool,
    }

    impl Stage for Sum {
        type Hint = u64;
        type Hints = u64;
        type Worker = ();
        type Out = (u8, u64);
        fn hints(&self) -> u64 {
            0
        }
        fn hint(&self, calls: &mut u64, block: u64, _: &dyn Progress) -> u64 {
            *calls += 1;
            block
        }
        fn worker(&self) -> Result<()> {
            Ok(())
        }
        fn whole_runs(&self) -> Option<u64> {
            self.whole.then_some(7)
        }
        fn process(
            &self,
            _: &mut (),
            index: u64,
            count: u64,
            input: Input<u64>,
        ) -> Result<(u8, u64)> {
            Ok(match input {
                Input::Hole => (0, 0),
                Input::Run { buf, hints } => {
                    assert!(self.whole);
                    assert_eq!(hints, (index..index + count).collect::<Vec<_>>());
                    (2, buf.iter().map(|&b| b as u64).sum())
                }
                Input::Unused => (1, 0),
                Input::Data { buf, hint } => {
                    assert_eq!(hint, index);
                    (2, buf.iter().map(|&b| b as u64).sum())
                }
                Input::Known { hints } => {
                    assert_eq!(hints, (index..index + count).collect::<Vec<_>>());
                    assert!(self.whole || count == 1);
                    (3, 0)
                }
            })
        }
    }

    /// Every block arrives once, in order, with the right kind and content; unused, known and
    /// hole blocks are not read; a resumed scan starts at its first block.
    #[test]
    fn blocks_arrive_in_order_with_holes_and_unused_runs() {
        let bs = 4096u64;
        let vol = Pattern {
            size: 200 * bs + 100,
            hole: (50 * bs, 120 * bs + 10),
        };
        let mut map = BlockMap::new(vol.size, bs);
        map.mark_bytes(0, 10 * bs);
        map.mark_bytes(20 * bs, 181 * bs);
        // Known: a run inside used blocks, one straddling unused ones. (A hole run that
        // starts before a known block covers it: holes read as zeros anyway.)
        let mut known = BlockMap::new(vol.size, bs);
        known.mark_bytes(150 * bs, 2000 * bs);
        known.mark_bytes(5 * bs, 10 * bs);
        known.unmark_bytes(170 * bs, 1);
        for start in [0u64, 7, 150] {
            let scan = Scan {
                source: &vol as &dyn Volume,
                block_size: bs,
                start_block: start,
                map: Some(&map),
                known: Some(&known),
                threads: 3,
                cancel: None,
                rescue: None,
            };
            for whole in [false, true] {
                let got = run(&scan, &Sum { whole }, &Silent, |ordered| {
                    let mut v = Vec::new();
                    for d in ordered.by_ref() {
                        v.push((d.index, d.count, d.out));
                    }
                    assert!(ordered.take_error().is_none());
                    Ok(v)
                })
                .unwrap();
                let mut next = start;
                for (index, count, (kind, sum)) in got {
                    assert_eq!(index, next);
                    next += count;
                    for b in index..index + count {
                        let expect_kind = if !map.is_used(b) {
                            1
                        } else if known.is_used(b) {
                            3
                        } else if (50..120).contains(&b) {
                            0
                        } else {
                            2
                        };
                        assert_eq!(kind, expect_kind, "block {b}");
                    }
                    if kind == 2 {
                        assert!(whole || count == 1);
                        assert!(count <= if whole { 7 } else { 1 });
                        let len = (vol.size.min((index + count) * bs) - index * bs) as usize;
                        let mut buf = vec![0u8; len];
                        vol.read_at(index * bs, &mut buf).unwrap();
                        assert_eq!(sum, buf.iter().map(|&b| b as u64).sum::<u64>());
                    }
                }
                assert_eq!(next, 201);
            }
        }
    }

    /// Counts its reads.
    struct Counting {
        inner: Pattern,
        reads: std::sync::atomic::AtomicUsize,
    }

    impl Volume for Counting {
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
            self.reads.fetch_add(1, Ordering::Relaxed);
            self.inner.read_at(offset, buf)
        }
        fn next_data(&self, offset: u64, end: u64) -> Result<Option<std::ops::Range<u64>>> {
            self.inner.next_data(offset, end)
        }
        fn describe(&self) -> String {
            "counting".into()
        }
    }

    /// A stage taking runs of up to 4096 blocks, reporting per block what it got.
    struct Blocks;

    impl Stage for Blocks {
        type Hint = u64;
        type Hints = ();
        type Worker = ();
        type Out = Vec<(u64, u8, u64)>;
        fn hints(&self) {}
        fn hint(&self, _: &mut (), block: u64, _: &dyn Progress) -> u64 {
            block
        }
        fn worker(&self) -> Result<()> {
            Ok(())
        }
        fn whole_runs(&self) -> Option<u64> {
            Some(4096)
        }
        fn process(
            &self,
            _: &mut (),
            index: u64,
            count: u64,
            input: Input<u64>,
        ) -> Result<Self::Out> {
            let bs = 4096usize;
            Ok(match input {
                Input::Hole => (index..index + count).map(|b| (b, 0, 0)).collect(),
                Input::Unused => (index..index + count).map(|b| (b, 1, 0)).collect(),
                Input::Known { .. } => (index..index + count).map(|b| (b, 3, 0)).collect(),
                Input::Run { buf, hints } => {
                    assert_eq!(hints, (index..index + count).collect::<Vec<_>>());
                    (0..count as usize)
                        .map(|i| {
                            let end = ((i + 1) * bs).min(buf.len());
                            let sum = buf[i * bs..end].iter().map(|&b| b as u64).sum();
                            (index + i as u64, 2, sum)
                        })
                        .collect()
                }
                Input::Data { .. } => unreachable!("whole runs only"),
            })
        }
    }

    /// A whole-run stage gets short gaps of known blocks and short holes read through, in
    /// one request with the blocks around them (the gap's content read, the hole's as
    /// zeros); long gaps, unused blocks and long holes still split requests.
    #[test]
    fn short_gaps_of_known_blocks_and_holes_are_read_through() {
        let bs = 4096u64;
        let vol = Counting {
            inner: Pattern {
                size: 400 * bs,
                hole: (10 * bs, 12 * bs),
            },
            reads: Default::default(),
        };
        let mut map = BlockMap::new(vol.size(), bs);
        map.mark_bytes(0, 400 * bs);
        map.unmark_bytes(300 * bs, bs);
        let mut known = BlockMap::new(vol.size(), bs);
        known.mark_bytes(20 * bs, 3 * bs); // short: read through
        known.mark_bytes(100 * bs, 100 * bs); // long: not read
        let scan = Scan {
            source: &vol as &dyn Volume,
            block_size: bs,
            start_block: 0,
            map: Some(&map),
            known: Some(&known),
            threads: 2,
            cancel: None,
            rescue: None,
        };
        let got = run(&scan, &Blocks, &Silent, |ordered| {
            let mut v = Vec::new();
            for d in ordered.by_ref() {
                v.extend(d.out);
            }
            assert!(ordered.take_error().is_none());
            Ok(v)
        })
        .unwrap();
        assert_eq!(got.len(), 400);
        for (b, kind, sum) in got {
            let expect = if b == 300 {
                1
            } else if (100..200).contains(&b) {
                3
            } else {
                2
            };
            assert_eq!(kind, expect, "block {b}");
            if kind == 2 {
                let mut buf = vec![0u8; bs as usize];
                vol.inner.read_at(b * bs, &mut buf).unwrap();
                assert_eq!(sum, buf.iter().map(|&x| x as u64).sum::<u64>(), "block {b}");
            }
        }
        // 0..100 (through the hole and the short known gap), 200..300, 301..400.
        assert_eq!(vol.reads.load(Ordering::Relaxed), 3);
    }

    /// Whole runs reach 16 MiB with few workers and shrink to 4 MiB with many, so that the
    /// staging buffers stay bounded.
    #[test]
    fn whole_runs_are_large_but_bounded() {
        assert_eq!(whole_run_blocks(4096, 2), 4096);
        assert_eq!(whole_run_blocks(4096, 1), 4096);
        assert_eq!(whole_run_blocks(16 << 20, 2), 1);
        assert_eq!(whole_run_blocks(32 << 20, 2), 1);
        for threads in [1, 2, 8, 64, 1024] {
            let n = whole_run_blocks(4096, threads);
            assert!((1024..=4096).contains(&n), "{threads}: {n}");
            let buffers = 3 + 2 * threads as u64;
            assert!(n * 4096 * buffers <= (256 << 20).max(buffers * (4 << 20)));
        }
    }

    /// EIO; ERROR_CRC on Windows.
    #[cfg(unix)]
    const MEDIA_ERROR: i32 = 5;
    #[cfg(windows)]
    const MEDIA_ERROR: i32 = 23;

    /// A volume whose bytes in `bad` cannot be read (EIO), like a disk with bad sectors.
    struct Failing {
        inner: Pattern,
        bad: std::ops::Range<u64>,
    }

    impl Volume for Failing {
        fn size(&self) -> u64 {
            self.inner.size
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
            let end = offset + buf.len() as u64;
            if offset < self.bad.end && end > self.bad.start {
                return Err(Error::IoAt {
                    op: "read",
                    path: "failing".into(),
                    offset,
                    source: std::io::Error::from_raw_os_error(MEDIA_ERROR),
                });
            }
            self.inner.read_at(offset, buf)
        }
        fn describe(&self) -> String {
            "failing".into()
        }
    }

    /// With `rescue`, a bad range costs only its sectors: they read as zeros and are
    /// reported; everything else arrives intact. Without it, the scan fails.
    #[test]
    fn bad_sectors_are_rescued_sector_by_sector() {
        let bs = 65536u64;
        let vol = Failing {
            inner: Pattern {
                size: 40 * bs + 1000,
                hole: (0, 0),
            },
            bad: 300_000..301_000,
        };
        let found = std::sync::Mutex::new(Vec::new());
        let mut scan = Scan {
            source: &vol as &dyn Volume,
            block_size: bs,
            start_block: 0,
            map: None,
            known: None,
            threads: 2,
            cancel: None,
            rescue: Some(&found),
        };
        let sums = run(&scan, &Sum::default(), &Silent, |ordered| {
            Ok(ordered.map(|d| (d.index, d.out)).collect::<Vec<_>>())
        })
        .unwrap();
        assert_eq!(sums.len(), 41);
        let first_bad = 300_000 / 512 * 512;
        let end_bad = 301_000u64.div_ceil(512) * 512;
        assert_eq!(
            *found.lock().unwrap(),
            vec![(first_bad, end_bad - first_bad)]
        );
        for (index, (kind, sum)) in sums {
            assert_eq!(kind, 2);
            let start = index * bs;
            let end = (start + bs).min(vol.inner.size);
            let expect: u64 = (start..end)
                .filter(|x| !(first_bad..end_bad).contains(x))
                .map(|x| (x / 7) as u8 as u64)
                .sum();
            assert_eq!(sum, expect, "block {index}");
        }
        scan.rescue = None;
        let r = run(&scan, &Sum::default(), &Silent, |ordered| {
            let n = ordered.by_ref().count();
            Ok((n, ordered.take_error()))
        })
        .unwrap();
        assert!(
            r.1.is_some_and(|e| e.is_media_error()),
            "the scan must fail"
        );
    }
}
