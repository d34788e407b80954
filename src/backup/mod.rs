//! Backup: read a volume, store what changed, commit a synthetic-full snapshot.
//!
//! The pipeline has three stages connected by bounded channels:
//!
//! ```text
//!  reader ──jobs──▶ workers (N) ──results──▶ committer (this thread)
//!    ▲                  │
//!    └──── buffers ◀────┘   (a fixed pool: memory does not grow with the volume)
//! ```
//!
//! - The reader walks the volume in block order, skips holes without reading them, reads each
//!   block into a pooled buffer and attaches the parent snapshot's reference for that block.
//! - Workers detect zero blocks, hash, compare with the parent, check the chunk store, and
//!   compress and store new chunks. They use every core.
//! - The committer puts results back in block order, appends them to the snapshot being
//!   written, and every few seconds checkpoints: `syncfs`, then a durable journal batch.
//!   A later run of the same volume replays the journal and continues where it stopped.

use crate::buffer::AlignedBuf;
use crate::error::{Error, Result};
use crate::fs::disk::DiskLayout;
use crate::fs::{BlockMap, FsInfo};
use crate::hash::ChunkId;
use crate::progress::Progress;
use crate::repo::chunks::Encoder;
use crate::repo::format::{BlockRef, decode_records, encode_run};
use crate::repo::journal::{BatchStats, Journal, JournalHeader};
use crate::repo::snapshot::{
    BlockCursor, SnapshotFile, SnapshotHeader, SnapshotStats, SnapshotWriter,
};
use crate::repo::{Repository, check_block_size};
use crate::source::Source;
use crate::volume::{Volume, is_zero};
use crossbeam_channel::{Receiver, Sender, bounded};
use std::collections::BTreeMap;
use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Options of one backup.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// Block size; `None` uses the repository's default.
    pub block_size: Option<u32>,
    pub tags: Vec<String>,
    /// How often progress is made durable for resuming.
    pub checkpoint_interval: Duration,
    /// Worker threads; 0 means one per core.
    pub threads: usize,
    /// Discard the journal of an interrupted backup instead of resuming it.
    pub restart: bool,
    /// Read every block, ignoring the filesystem's allocation map (forensic copies).
    pub all_blocks: bool,
    /// Back up a volume even though it is mounted read-write.
    pub allow_mounted: bool,
    /// Set to stop the backup early (Ctrl-C); finished work is checkpointed.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl Default for BackupOptions {
    fn default() -> Self {
        BackupOptions {
            block_size: None,
            tags: Vec::new(),
            checkpoint_interval: Duration::from_secs(5),
            threads: 0,
            restart: false,
            all_blocks: false,
            allow_mounted: false,
            cancel: None,
        }
    }
}

/// What a backup did.
#[derive(Debug, Clone)]
pub struct BackupReport {
    pub snapshot_id: String,
    pub parent: Option<String>,
    /// True when this run continued an interrupted backup.
    pub resumed: bool,
    /// Statistics of the whole snapshot (all runs).
    pub stats: SnapshotStats,
    /// Statistics of this run alone.
    pub this_run: BatchStats,
    /// The filesystem found on the volume.
    pub filesystem: Option<FsInfo>,
    /// The partition layout, for a partitioned disk.
    pub layout: Option<DiskLayout>,
    /// True when every block was read.
    pub all_blocks: bool,
}

/// The identity of a volume, used to find the parent of its next backup and its journal:
/// the filesystem's type and UUID when one was recognised, or the partition table's disk
/// identifier (GPT disk GUID, MBR signature) for a partitioned disk, so that a volume is found
/// again when its device path changes; else the source path; always with the size.
pub fn volume_key(source: &Source, fs: Option<&FsInfo>, layout: Option<&DiskLayout>) -> String {
    let info = source.info();
    let mut h = blake3::Hasher::new();
    let meaningful = |id: &str| id.bytes().any(|b| b.is_ascii_hexdigit() && b != b'0');
    let id = |s: &str| s.trim_start_matches("0x").to_string();
    match (fs, layout) {
        (Some(f), _) if meaningful(&f.uuid) => {
            h.update(b"volback volume key v1 fs\0");
            h.update(f.fs_type.as_bytes());
            h.update(b"\0");
            h.update(f.uuid.as_bytes());
        }
        (_, Some(l)) if meaningful(&id(&l.id)) => {
            h.update(b"volback volume key v1 disk\0");
            h.update(l.table.as_bytes());
            h.update(b"\0");
            h.update(l.id.as_bytes());
        }
        _ => {
            h.update(b"volback volume key v1 path\0");
            h.update(info.path.as_bytes());
        }
    }
    h.update(b"\0");
    h.update(&info.size.to_le_bytes());
    hex::encode(&h.finalize().as_bytes()[..16])
}

enum JobKind {
    /// `count` blocks that are holes in the source: not read, stored as zero.
    Hole,
    /// `count` blocks the filesystem does not use: not read, stored as unused.
    Unused,
    /// One block read into a pool buffer (`len` valid bytes).
    Data {
        buf: AlignedBuf,
        len: usize,
        parent: Option<ChunkId>,
    },
}

struct Job {
    index: u64,
    count: u64,
    kind: JobKind,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Zero,
    Unused,
    Unchanged,
    Deduplicated,
    New { raw: u64, stored: u64 },
}

struct Done {
    index: u64,
    count: u64,
    block_ref: BlockRef,
    outcome: Outcome,
    bytes_read: u64,
}

/// Backs up `source` into `repo`. Full the first time; incremental against the latest
/// snapshot of the same volume afterwards; resumes an interrupted backup of it.
pub fn backup(
    repo: &Repository,
    source: &Source,
    opts: &BackupOptions,
    progress: &dyn Progress,
) -> Result<BackupReport> {
    let started = Instant::now();
    let info = source.info();
    if info.size == 0 {
        return Err(Error::BadSource {
            path: source.path().to_path_buf(),
            detail: "it is empty (0 bytes)".into(),
        });
    }
    if !opts.allow_mounted {
        let mounted = crate::platform::mount_point_of(source.path())
            .map_err(|e| Error::io("check mounts of", source.path(), e))?;
        if let Some(m) = mounted.filter(|m| !m.read_only) {
            return Err(Error::BadSource {
                path: source.path().to_path_buf(),
                detail: format!(
                    "it is mounted read-write at {}: its blocks change while they are read. \
                     Back up a snapshot of it instead (lvcreate --snapshot, then back up the \
                     snapshot device), or freeze it (fsfreeze --freeze {}) and pass \
                     --allow-mounted, or pass --allow-mounted to accept an inconsistent copy",
                    m.point, m.point
                ),
            });
        }
    }
    let block_size = opts.block_size.unwrap_or(repo.config().block_size);
    check_block_size(block_size)?;
    let bs = block_size as u64;
    let block_count = info.size.div_ceil(bs);
    let chunk_hash = repo.config().chunk_hash;
    let probe = crate::fs::disk::map_volume(source, source.geometry().logical_sector_size, bs)?;
    for w in &probe.warnings {
        progress.warn(w);
    }
    let map = if opts.all_blocks { None } else { probe.map };
    let all_blocks = map.is_none();
    let key = volume_key(source, probe.fs.as_ref(), probe.layout.as_ref());

    // One backup per volume at a time.
    let lock_path = repo.journals_dir().join(format!("{key}.lock"));
    let lock = File::create(&lock_path).map_err(|e| Error::io("create", &lock_path, e))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            return Err(Error::Locked {
                path: repo.root().to_path_buf(),
                detail: format!("another backup of {} is running", info.path),
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(Error::io("lock", &lock_path, e)),
    }

    let journal_path = repo.journals_dir().join(format!("{key}.journal"));
    let mut resumable = match Journal::read_header(&journal_path)? {
        Some(h) => {
            h.source == info
                && h.volume_key == key
                && h.block_size == block_size
                && h.block_count == block_count
                && h.chunk_hash == chunk_hash
                && h.all_blocks == all_blocks
                && h.parent
                    .as_ref()
                    .is_none_or(|p| repo.snapshots_dir().join(p).exists())
        }
        None => false,
    };
    if opts.restart {
        resumable = false;
    }

    let mut writer = SnapshotWriter::create(&repo.tmp_dir())?;
    let mut total = BatchStats::default();
    let mut resumes = 0u32;
    let (mut journal, jheader) = if resumable {
        let mut replay_err = None;
        let r = Journal::resume(&journal_path, |_, batch| {
            if batch.block_count == 0 {
                resumes += 1;
            }
            total.add(&batch.stats);
            let mut res = Ok(());
            decode_records(&batch.records, batch.block_count, |r, n| {
                if res.is_ok() {
                    res = writer.push(r, n);
                }
            })
            .map_err(|d| Error::corrupt("journal batch", &journal_path, d))?;
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
                return Err(Error::corrupt(
                    "journal",
                    &journal_path,
                    "vanished while resuming",
                ));
            }
        }
    } else {
        let now = crate::time::now_unix();
        let parent = find_parent(repo, &key, block_size, progress)?;
        let h = JournalHeader {
            source: info.clone(),
            volume_key: key.clone(),
            block_size,
            block_count,
            chunk_hash,
            parent,
            all_blocks,
            time: crate::time::rfc3339(now),
            time_unix: now,
            tags: opts.tags.clone(),
        };
        (Journal::create(&journal_path, &h)?, h)
    };
    let start_block = writer.blocks();
    let resumed = resumable && start_block > 0 || resumes > 0;
    if resumable {
        // Mark this run in the journal, so the snapshot counts its resumptions.
        journal.append(start_block, 0, &BatchStats::default(), &[])?;
        resumes += 1;
    }

    let parent_snap = match &jheader.parent {
        Some(p) => match repo.open_snapshot(p) {
            Ok(s) => Some(s),
            Err(e) => {
                progress.warn(&format!(
                    "parent snapshot {p} is unreadable ({e}); storing every block afresh"
                ));
                None
            }
        },
        None => None,
    };

    let threads = if opts.threads == 0 {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    } else {
        opts.threads
    };
    let run = Pipeline {
        repo,
        source,
        block_size: bs,
        block_count,
        threads,
        parent: parent_snap.as_ref(),
        map: map.as_ref(),
        cancel: opts.cancel.clone(),
        checkpoint_interval: opts.checkpoint_interval,
        zstd_level: repo.config().zstd_level,
    };
    progress.start("backup", info.size - (start_block * bs).min(info.size));
    let this_run = run.execute(start_block, &mut writer, &mut journal, progress);
    progress.finish();
    let this_run = this_run?;
    total.add(&this_run);

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
        resumed: resumes,
    };
    let header = SnapshotHeader {
        time: jheader.time.clone(),
        time_unix: jheader.time_unix,
        hostname: crate::platform::hostname(),
        source: info,
        filesystem: probe.fs.clone(),
        layout: probe.layout.clone(),
        all_blocks,
        volume_key: key,
        block_size,
        block_count,
        chunk_hash,
        parent: jheader.parent.clone(),
        tags: jheader.tags.clone(),
        stats: stats.clone(),
        unreadable: Vec::new(),
    };
    // Chunks first, then the snapshot that names them, then forget the journal.
    repo.sync_chunks()?;
    let snapshot_id = writer.finish(&header, &repo.snapshots_dir())?;
    journal.remove()?;
    drop(lock);
    Ok(BackupReport {
        snapshot_id,
        parent: jheader.parent,
        resumed,
        stats,
        this_run,
        filesystem: probe.fs,
        layout: probe.layout,
        all_blocks,
    })
}

/// The latest snapshot of the volume `key` with the same block size.
fn find_parent(
    repo: &Repository,
    key: &str,
    block_size: u32,
    progress: &dyn Progress,
) -> Result<Option<String>> {
    let mut candidates = Vec::new();
    for id in repo.snapshot_ids()? {
        match repo.open_snapshot(&id) {
            Ok(s) => {
                let h = s.header();
                if h.volume_key == key
                    && h.block_size == block_size
                    && h.chunk_hash == repo.config().chunk_hash
                {
                    candidates.push(crate::repo::SnapshotEntry {
                        id,
                        header: h.clone(),
                    });
                }
            }
            Err(e) => progress.warn(&format!("skipping unreadable snapshot {id}: {e}")),
        }
    }
    // The latest, and within one second the one taken after the other (see sort_snapshots).
    crate::repo::sort_snapshots(&mut candidates);
    Ok(candidates.pop().map(|s| s.id))
}

struct Pipeline<'a> {
    repo: &'a Repository,
    source: &'a Source,
    block_size: u64,
    block_count: u64,
    threads: usize,
    parent: Option<&'a SnapshotFile>,
    map: Option<&'a BlockMap>,
    cancel: Option<Arc<AtomicBool>>,
    checkpoint_interval: Duration,
    zstd_level: i32,
}

impl Pipeline<'_> {
    fn cancelled(&self) -> bool {
        self.cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
    }

    fn execute(
        &self,
        start_block: u64,
        writer: &mut SnapshotWriter,
        journal: &mut Journal,
        progress: &dyn Progress,
    ) -> Result<BatchStats> {
        // Enough buffers for the workers to chew on one staged read while the reader fetches
        // the next (see `read_blocks`).
        let pool_size = self.threads * 3 + 2 * staging_blocks(self.block_size) as usize;
        let (free_tx, free_rx) = bounded::<AlignedBuf>(pool_size);
        for _ in 0..pool_size {
            free_tx
                .send(AlignedBuf::new(self.block_size as usize))
                .map_err(|_| Error::InvalidArgument("buffer pool closed".into()))?;
        }
        let (job_tx, job_rx) = bounded::<Job>(self.threads * 2);
        let (done_tx, done_rx) = bounded::<Result<Done>>(pool_size + self.threads * 2 + 4);
        let stop = AtomicBool::new(false);

        std::thread::scope(|scope| {
            let stop = &stop;
            {
                let done_tx = done_tx.clone();
                let free_rx = free_rx.clone();
                scope.spawn(move || {
                    if let Err(e) = self.read_blocks(start_block, &job_tx, &free_rx, stop, progress)
                    {
                        stop.store(true, Ordering::Relaxed);
                        let _ = done_tx.send(Err(e));
                    }
                });
            }
            for _ in 0..self.threads {
                let job_rx = job_rx.clone();
                let done_tx = done_tx.clone();
                let free_tx = free_tx.clone();
                scope.spawn(move || self.work(&job_rx, &done_tx, &free_tx, stop));
            }
            drop(done_tx);
            drop(job_rx);
            let r = self.commit(start_block, &done_rx, writer, journal, progress);
            // Unblock the other stages, whatever happened.
            stop.store(true, Ordering::Relaxed);
            while free_rx.try_recv().is_ok() {}
            drop(free_rx);
            while done_rx.try_recv().is_ok() {}
            // Keep draining until every sender is gone so no thread stays blocked on send.
            for _ in done_rx.iter() {}
            r
        })
    }

    /// Reader stage: an I/O loop (this thread) that walks the volume, emits hole and unused
    /// runs, and reads runs of data blocks into staging buffers; and a dispatcher thread that
    /// splits staged runs into per-block jobs with the parent's references. Two threads keep a
    /// read in flight while the previous run is handed out.
    fn read_blocks(
        &self,
        start_block: u64,
        jobs: &Sender<Job>,
        free: &Receiver<AlignedBuf>,
        stop: &AtomicBool,
        progress: &dyn Progress,
    ) -> Result<()> {
        const STAGING_BUFFERS: usize = 3;
        let bs = self.block_size;
        let size = self.source.size();
        let max_run = staging_blocks(bs);
        let (staged_tx, staged_rx) = bounded::<(u64, u64, AlignedBuf)>(STAGING_BUFFERS);
        let (empty_tx, empty_rx) = bounded::<AlignedBuf>(STAGING_BUFFERS);
        for _ in 0..STAGING_BUFFERS {
            let _ = empty_tx.send(AlignedBuf::new((max_run * bs) as usize));
        }
        std::thread::scope(|scope| {
            let dispatcher = scope.spawn(move || {
                let mut parent = self.parent.map(BlockCursor::new);
                let mut parent_failed = false;
                for (first, end, staging) in staged_rx.iter() {
                    for block in first..end {
                        let Ok(mut buf) = free.recv() else {
                            return;
                        };
                        let off = ((block - first) * bs) as usize;
                        let len = ((block * bs + bs).min(size) - block * bs) as usize;
                        buf[..len].copy_from_slice(&staging[off..off + len]);
                        let parent_ref = match parent.as_mut() {
                            Some(c) if !parent_failed => match c.get(block) {
                                Ok(Some(BlockRef::Chunk(id))) => Some(id),
                                Ok(_) => None,
                                Err(e) => {
                                    parent_failed = true;
                                    progress.warn(&format!(
                                        "parent snapshot unreadable from block {block} on \
                                         ({e}); comparing with stored chunks instead"
                                    ));
                                    None
                                }
                            },
                            _ => None,
                        };
                        let job = Job {
                            index: block,
                            count: 1,
                            kind: JobKind::Data {
                                buf,
                                len,
                                parent: parent_ref,
                            },
                        };
                        if jobs.send(job).is_err() {
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
                let mut index = start_block;
                // Read-ahead of the blocks the map says will be read, for buffered reads: the
                // kernel's own read-ahead stops at every skipped (unused) block. Direct reads
                // bypass the page cache, where read-ahead would be wasted.
                const PREFETCH_WINDOW: u64 = 32 << 20;
                let window_blocks = (PREFETCH_WINDOW / bs).max(1);
                let mut prefetched = start_block;
                while index < self.block_count {
                    if !self.source.uses_direct_io() && prefetched < index + window_blocks / 2 {
                        let from = prefetched.max(index);
                        let to = (index + window_blocks).min(self.block_count);
                        let mut b = from;
                        while b < to {
                            if self.map.is_some_and(|m| !m.is_used(b)) {
                                b += 1;
                                continue;
                            }
                            let run = b;
                            while b < to && self.map.is_none_or(|m| m.is_used(b)) {
                                b += 1;
                            }
                            let s = run * bs;
                            let e = (b * bs).min(size);
                            crate::platform::prefetch(self.source.file(), s, e - s);
                        }
                        prefetched = to;
                    }
                    if stop.load(Ordering::Relaxed) || self.cancelled() {
                        return Ok(());
                    }
                    let start = index * bs;
                    let end = (start + bs).min(size);
                    if let Some(map) = self.map
                        && !map.is_used(index)
                    {
                        let mut until = index + 1;
                        while until < self.block_count && !map.is_used(until) {
                            until += 1;
                        }
                        let job = Job {
                            index,
                            count: until - index,
                            kind: JobKind::Unused,
                        };
                        if jobs.send(job).is_err() {
                            return Ok(());
                        }
                        index = until;
                        continue;
                    }
                    if !extents_done && extent.as_ref().is_none_or(|e| e.end <= start) {
                        extent = self.source.next_data(start, size)?;
                        if extent.is_none() {
                            extents_done = true;
                        }
                    }
                    let hole_until = match &extent {
                        None => self.block_count,
                        Some(e) if e.start >= end => e.start / bs,
                        Some(_) => index,
                    };
                    if hole_until > index {
                        let job = Job {
                            index,
                            count: hole_until - index,
                            kind: JobKind::Hole,
                        };
                        if jobs.send(job).is_err() {
                            return Ok(());
                        }
                        index = hole_until;
                        continue;
                    }
                    // A run of consecutive blocks that all need reading, in one request
                    // (fewer, larger reads: what O_DIRECT needs to reach the device's speed).
                    let mut run_end = index + 1;
                    let data_end = extent.as_ref().map_or(size, |e| e.end);
                    while run_end < self.block_count
                        && run_end - index < max_run
                        && run_end * bs < data_end
                        && self.map.is_none_or(|m| m.is_used(run_end))
                    {
                        run_end += 1;
                    }
                    let Ok(mut staging) = empty_rx.recv() else {
                        return Ok(());
                    };
                    let run_bytes = ((run_end * bs).min(size) - start) as usize;
                    self.source.read_bulk(start, &mut staging, run_bytes)?;
                    if staged_tx.send((index, run_end, staging)).is_err() {
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

    /// Worker stage.
    fn work(
        &self,
        jobs: &Receiver<Job>,
        done: &Sender<Result<Done>>,
        free: &Sender<AlignedBuf>,
        stop: &AtomicBool,
    ) {
        let hash = self.repo.config().chunk_hash;
        let store = self.repo.chunks();
        let mut encoder = match Encoder::new(self.zstd_level) {
            Ok(e) => e,
            Err(e) => {
                stop.store(true, Ordering::Relaxed);
                let _ = done.send(Err(e));
                return;
            }
        };
        for job in jobs.iter() {
            let result = match job.kind {
                JobKind::Hole => Ok(Done {
                    index: job.index,
                    count: job.count,
                    block_ref: BlockRef::Zero,
                    outcome: Outcome::Zero,
                    bytes_read: 0,
                }),
                JobKind::Unused => Ok(Done {
                    index: job.index,
                    count: job.count,
                    block_ref: BlockRef::Unused,
                    outcome: Outcome::Unused,
                    bytes_read: 0,
                }),
                JobKind::Data { buf, len, parent } => {
                    let r = (|| {
                        let data = &buf[..len];
                        if is_zero(data) {
                            return Ok((BlockRef::Zero, Outcome::Zero));
                        }
                        let id = hash.hash(data);
                        // The parent's chunk must still be there: a lost chunk is stored
                        // again instead of being carried into the new snapshot.
                        if parent == Some(id) && store.exists(&id)? {
                            return Ok((BlockRef::Chunk(id), Outcome::Unchanged));
                        }
                        if parent != Some(id) && store.is_present(&id)? {
                            return Ok((BlockRef::Chunk(id), Outcome::Deduplicated));
                        }
                        let enc = encoder.encode(data);
                        store.put(&id, &enc)?;
                        Ok((
                            BlockRef::Chunk(id),
                            Outcome::New {
                                raw: len as u64,
                                stored: enc.len() as u64,
                            },
                        ))
                    })();
                    let _ = free.send(buf);
                    r.map(|(block_ref, outcome)| Done {
                        index: job.index,
                        count: 1,
                        block_ref,
                        outcome,
                        bytes_read: len as u64,
                    })
                }
            };
            let failed = result.is_err();
            if failed {
                stop.store(true, Ordering::Relaxed);
            }
            if done.send(result).is_err() || failed {
                return;
            }
        }
    }

    /// Committer stage: order results, append them, hand batches to the checkpointer.
    ///
    /// Checkpoints (`syncfs`, then a journal append) run on their own thread so that a slow
    /// flush never stalls the pipeline; while one is in progress the next batch keeps growing.
    fn commit(
        &self,
        start_block: u64,
        done: &Receiver<Result<Done>>,
        writer: &mut SnapshotWriter,
        journal: &mut Journal,
        progress: &dyn Progress,
    ) -> Result<BatchStats> {
        let bs = self.block_size;
        let size = self.source.size();
        let (cp_tx, cp_rx) = bounded::<Batch>(0);
        std::thread::scope(|scope| {
            let checkpointer = scope.spawn(move || -> Result<()> {
                for batch in cp_rx.iter() {
                    self.repo.sync_chunks()?;
                    journal.append(batch.first, batch.blocks, &batch.stats, &batch.records)?;
                }
                Ok(())
            });
            let mut pending: BTreeMap<u64, Done> = BTreeMap::new();
            let mut next = start_block;
            let mut run_stats = BatchStats::default();
            let mut batch = Batch::new(start_block);
            let mut last_checkpoint = Instant::now();
            let mut first_error: Option<Error> = None;

            for item in done.iter() {
                match item {
                    Ok(d) => {
                        pending.insert(d.index, d);
                    }
                    Err(e) => {
                        first_error.get_or_insert(e);
                        continue;
                    }
                }
                while let Some(d) = pending.remove(&next) {
                    writer.push(d.block_ref, d.count)?;
                    batch.push(&d);
                    progress.advance((d.count * bs).min(size - next * bs));
                    next += d.count;
                }
                if first_error.is_none()
                    && batch.blocks > 0
                    && (last_checkpoint.elapsed() >= self.checkpoint_interval
                        || batch.records.len() >= 8 << 20)
                {
                    // Hand over only if the checkpointer is idle (rendezvous channel).
                    let full = batch.take(next, &mut last_checkpoint);
                    let stats = full.stats;
                    match cp_tx.try_send(full) {
                        Ok(()) => run_stats.add(&stats),
                        Err(crossbeam_channel::TrySendError::Full(b)) => batch.prepend(b),
                        Err(crossbeam_channel::TrySendError::Disconnected(_)) => break,
                    }
                }
            }
            // Whatever finished in order is kept for the next run, even after an error.
            let last = batch.take(next, &mut last_checkpoint);
            run_stats.add(&last.stats);
            if last.blocks > 0 {
                let _ = cp_tx.send(last);
            }
            drop(cp_tx);
            let cp = checkpointer.join().unwrap_or_else(|_| {
                Err(Error::InvalidArgument("checkpoint thread panicked".into()))
            });
            if let Some(e) = first_error {
                return Err(e);
            }
            cp?;
            if next < self.block_count {
                if self.cancelled() {
                    return Err(Error::Interrupted { checkpointed: true });
                }
                return Err(Error::InvalidArgument(format!(
                    "backup stopped at block {next} of {} without an error",
                    self.block_count
                )));
            }
            Ok(run_stats)
        })
    }
}

/// Blocks the reader fetches in one request (4 MiB worth, at least one block).
fn staging_blocks(block_size: u64) -> u64 {
    ((4u64 << 20) / block_size).max(1)
}

/// Block references and statistics since the last checkpoint.
struct Batch {
    first: u64,
    blocks: u64,
    stats: BatchStats,
    records: Vec<u8>,
    run: Option<(BlockRef, u64)>,
}

impl Batch {
    fn new(first: u64) -> Batch {
        Batch {
            first,
            blocks: 0,
            stats: BatchStats::default(),
            records: Vec::new(),
            run: None,
        }
    }

    fn push(&mut self, d: &Done) {
        self.blocks += d.count;
        let s = &mut self.stats;
        s.bytes_read += d.bytes_read;
        match d.outcome {
            Outcome::Zero => s.zero_blocks += d.count,
            Outcome::Unused => s.unused_blocks += d.count,
            Outcome::Unchanged => {
                s.data_blocks += 1;
                s.unchanged_blocks += 1
            }
            Outcome::Deduplicated => {
                s.data_blocks += 1;
                s.deduplicated_blocks += 1
            }
            Outcome::New { raw, stored } => {
                s.data_blocks += 1;
                s.new_chunks += 1;
                s.new_bytes += raw;
                s.new_bytes_stored += stored;
            }
        }
        match (self.run, d.block_ref) {
            (Some((r, c)), b) if r == b && !matches!(b, BlockRef::Chunk(_)) => {
                self.run = Some((r, c + d.count))
            }
            (_, b) => {
                self.flush_run();
                if matches!(b, BlockRef::Chunk(_)) {
                    encode_run(&mut self.records, b, d.count);
                } else {
                    self.run = Some((b, d.count));
                }
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
        earlier.records.extend_from_slice(&self.records);
        *self = earlier;
    }

    fn flush_run(&mut self) {
        if let Some((r, c)) = self.run.take() {
            encode_run(&mut self.records, r, c);
        }
    }
}
