//! Backup: read a volume, store what changed, commit a synthetic-full snapshot.
//!
//! The volume is read by the shared scan pipeline ([`crate::scan`]: I/O loop, dispatcher,
//! workers on every core, results back in block order):
//!
//! - The reader walks the volume in block order, skips holes and unused blocks without reading
//!   them, reads each block into a pooled buffer and attaches the parent snapshot's reference
//!   for that block (the stage's hint).
//! - Workers detect zero blocks, hash, compare with the parent, check the chunk store, and
//!   compress and store new chunks.
//! - A chunk already in the repository is referred to again only when it passes the cheap
//!   check ([`ChunkStore::check_cheap`], cached per chunk): the parent's chunk or pack, the
//!   chunks of blocks that change tracking takes unread (checked before the scan, see
//!   [`drop_unreusable`]), a deduplicated chunk, an existing pack. A missing or damaged chunk
//!   is stored again, which also repairs the older snapshots that refer to it
//!   (docs/REPAIR.md).
//! - The committer puts results back in block order, appends them to the snapshot being
//!   written, and every few seconds checkpoints: `syncfs`, then a durable journal batch.
//!   A later run of the same volume replays the journal and continues where it stopped.

use crate::error::{Error, Result};
use crate::fs::disk::DiskLayout;
use crate::fs::{BlockMap, FsInfo};
use crate::hash::ChunkId;
use crate::progress::Progress;
use crate::repo::chunks::{ChunkHealth, ChunkStore, Encoder};
use crate::repo::format::{BlockRef, MAX_PACK_BLOCKS, decode_records, encode_run};
use crate::repo::journal::{BatchStats, Journal, JournalHeader};
use crate::repo::snapshot::{
    BlockCursor, SnapshotFile, SnapshotHeader, SnapshotStats, SnapshotWriter,
};
use crate::repo::{Repository, check_block_size};
use crate::scan::{self, Input, Scan, Stage};
use crate::source::Source;
use crate::volume::{Volume, is_zero};
use crossbeam_channel::bounded;
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
    /// Read and hash every used block, also those change tracking knows to be unchanged
    /// since the parent snapshot.
    pub rehash: bool,
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
            rehash: false,
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
    /// Byte ranges (offset, length) that stayed unreadable and were stored as zeros (this
    /// run; a resumed run does not know those of the runs before it).
    pub unreadable: Vec<(u64, u64)>,
    /// Blocks that change tracking found unchanged since the parent snapshot: taken from
    /// it without being read (this run).
    pub unread_blocks: u64,
    /// Why change tracking was not used, when it could have been.
    pub tracking_note: Option<String>,
}

/// The identity of a volume, used to find the parent of its next backup and its journal:
/// the filesystem's type and UUID when one was recognised, or the partition table's disk
/// identifier (GPT disk GUID, MBR signature) for a partitioned disk, so that a volume is found
/// again when its device path changes; else the source path (canonical: see [`Source::open`]);
/// always with the size.
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
        _ => return path_key(&info.path, info.size),
    }
    h.update(b"\0");
    h.update(&info.size.to_le_bytes());
    hex::encode(&h.finalize().as_bytes()[..16])
}

/// The [`volume_key`] of a volume known by its path alone.
fn path_key(path: &str, size: u64) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"volback volume key v1 path\0");
    h.update(path.as_bytes());
    h.update(b"\0");
    h.update(&size.to_le_bytes());
    hex::encode(&h.finalize().as_bytes()[..16])
}

/// True when a snapshot whose header has `recorded_key` for the volume at `recorded_path`
/// is of the volume `key` because its key was made from a path that was not canonical
/// (older versions recorded the path as given, made absolute) and that path now resolves
/// to the same file or device.
fn legacy_path_match(key: &str, recorded_key: &str, recorded_path: &str, size: u64) -> bool {
    if recorded_key != path_key(recorded_path, size) {
        return false;
    }
    match std::fs::canonicalize(recorded_path) {
        Ok(c) => {
            let c = c.to_string_lossy();
            c != recorded_path && path_key(&c, size) == key
        }
        Err(_) => false,
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Zero,
    Unused,
    Unchanged,
    Deduplicated,
    /// Stored now: `raw` bytes of content, `stored` bytes and `chunks` chunk files written
    /// (a pack counts on its first block, its other blocks add 0 and 0).
    New {
        raw: u64,
        stored: u64,
        chunks: u64,
    },
}

/// A worker's result for `count` blocks with one reference (a job yields one or, for a run
/// of blocks, several).
struct Done {
    block_ref: BlockRef,
    outcome: Outcome,
    count: u64,
    bytes_read: u64,
    /// Taken from the parent by change tracking, without reading.
    unread: bool,
}

impl Done {
    fn one(block_ref: BlockRef, outcome: Outcome, bytes_read: u64, unread: bool) -> Done {
        Done {
            block_ref,
            outcome,
            count: 1,
            bytes_read,
            unread,
        }
    }
}

/// Blocks this backup stored in packs, by content hash, so that a block met again elsewhere
/// in the volume refers to the stored copy. Bounded: past [`PACKED_INDEX_MAX`] entries new
/// blocks are no longer remembered (their duplicates are then stored again).
#[derive(Default)]
struct PackedIndex {
    slices: std::sync::Mutex<std::collections::HashMap<ChunkId, (ChunkId, u8)>>,
}

/// About 30 MiB of index at most.
const PACKED_INDEX_MAX: usize = 1 << 19;

impl PackedIndex {
    fn get(&self, id: &ChunkId) -> Option<(ChunkId, u8)> {
        self.slices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .copied()
    }

    fn insert(&self, id: ChunkId, pack: ChunkId, index: u8) {
        let mut m = self.slices.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() < PACKED_INDEX_MAX {
            m.entry(id).or_insert((pack, index));
        }
    }
}

/// Verdicts of the cheap check of existing chunks ([`ChunkStore::check_cheap`]) that the
/// backup would reuse, so that a pack many blocks refer to is checked once. Bounded: emptied
/// when [`VERDICTS_MAX`] chunks are remembered (they are then checked again).
#[derive(Default)]
struct Verdicts {
    good: std::sync::Mutex<std::collections::HashMap<ChunkId, bool>>,
    /// Checks that found a chunk missing or damaged (each chunk counted once while its
    /// verdict is remembered).
    failed: std::sync::atomic::AtomicU64,
}

/// About 12 MiB of verdicts at most.
const VERDICTS_MAX: usize = 1 << 18;

impl Verdicts {
    /// True when chunk `id` may be referred to again: it passes the cheap check.
    fn reusable(&self, store: &ChunkStore, id: &ChunkId) -> Result<bool> {
        if let Some(&v) = self.lock().get(id) {
            return Ok(v);
        }
        let good = store.check_cheap(id)? == ChunkHealth::Good;
        if !good {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        self.set(*id, good);
        Ok(good)
    }

    /// Records a verdict (a chunk just stored is good).
    fn set(&self, id: ChunkId, good: bool) {
        let mut m = self.lock();
        if m.len() >= VERDICTS_MAX {
            m.clear();
        }
        m.insert(id, good);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<ChunkId, bool>> {
        self.good.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The blocks of `known` (change tracking: unchanged since the parent, taken from it unread)
/// from `start_block` on, without those whose parent chunk fails the cheap check (missing or
/// damaged): those are read and stored again, so that a damaged chunk is not inherited, and
/// stored in runs like a full backup's, so that a lost pack is rewritten whole (which repairs
/// the older snapshots that refer to it too). Each distinct chunk is checked once.
fn drop_unreusable(
    known: &BlockMap,
    parent: &SnapshotFile,
    start_block: u64,
    store: &ChunkStore,
    verdicts: &Verdicts,
    progress: &dyn Progress,
) -> Result<Option<BlockMap>> {
    let mut out = known.clone();
    let mut cursor = BlockCursor::new(parent);
    let mut dropped = 0u64;
    for run in known.used_runs() {
        for b in run.start.max(start_block)..run.end {
            let r = match cursor.get(b) {
                Ok(r) => r,
                Err(e) => {
                    progress.warn(&format!(
                        "parent snapshot unreadable at block {b} ({e}); reading every used \
                         block"
                    ));
                    return Ok(None);
                }
            };
            if let Some(c) = r.and_then(|r| r.chunk())
                && !verdicts.reusable(store, &c)?
            {
                out.unmark_bytes(b * known.granularity(), known.granularity());
                dropped += 1;
            }
        }
    }
    if dropped > 0 {
        progress.warn(&format!(
            "{dropped} unchanged blocks refer to chunks of the parent snapshot that are missing \
             or damaged: they are read and stored again"
        ));
    }
    Ok(Some(out))
}

/// Worker threads for `requested` (0: one per core).
pub fn worker_threads(requested: usize) -> usize {
    if requested == 0 {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    } else {
        requested
    }
}

/// Change tracking against `base`, an earlier state of `source` (parent snapshot, copy):
/// the blocks known to be unchanged, with `avoid` ranges (offset, length) taken out. `None`
/// when nothing is known; a note says why a recognised filesystem was not tracked.
pub fn track_changes(
    source: &Source,
    base: &dyn Volume,
    block_size: u64,
    avoid: &[(u64, u64)],
    progress: &dyn Progress,
) -> Result<Option<BlockMap>> {
    let u = crate::probe::disk::unchanged_volume(
        source,
        base,
        source.geometry().logical_sector_size,
        block_size,
    )?;
    if let Some(n) = &u.note {
        progress.warn(&format!("{n}; reading every used block"));
    }
    Ok(u.map.map(|mut m| {
        for &(off, len) in avoid {
            m.unmark_bytes(off, len);
        }
        m
    }))
}

/// Checks how `source` is mounted. A source mounted read-write is refused (its blocks change
/// while they are read) unless `allow_mounted`. Returns whether the source is consistent: not
/// mounted read-write, so what is read is one point in time (change tracking trusts only
/// such snapshots and copies).
pub fn check_mounts(source: &Source, allow_mounted: bool) -> Result<bool> {
    let mounted = crate::platform::mount_point_of(source.path())
        .map_err(|e| Error::io("check mounts of", source.path(), e))?;
    let Some(m) = mounted.filter(|m| !m.read_only) else {
        return Ok(true);
    };
    if allow_mounted {
        return Ok(false);
    }
    Err(Error::BadSource {
        path: source.path().to_path_buf(),
        detail: format!(
            "it is mounted read-write at {}: its blocks change while they are read. \
             Back up a snapshot of it instead (lvcreate --snapshot, then back up the \
             snapshot device), or freeze it (fsfreeze --freeze {}) and pass \
             --allow-mounted, or pass --allow-mounted to accept an inconsistent copy",
            m.point, m.point
        ),
    })
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
    let consistent = check_mounts(source, opts.allow_mounted)?;
    let block_size = opts.block_size.unwrap_or(repo.config().block_size);
    check_block_size(block_size)?;
    let bs = block_size as u64;
    let block_count = info.size.div_ceil(bs);
    let chunk_hash = repo.config().chunk_hash;
    let probe = crate::probe::disk::map_volume(source, source.geometry().logical_sector_size, bs)?;
    for w in &probe.warnings {
        progress.warn(w);
    }
    let map = if opts.all_blocks { None } else { probe.map };
    let all_blocks = map.is_none();
    let key = volume_key(source, probe.fs.as_ref(), probe.layout.as_ref());

    // One backup per volume at a time.
    let lock_path = repo.journals_dir().join(format!("{key}.lock"));
    let lock: File = repo.volume_lock_file(&lock_path)?;
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
    let state = crate::source_state::SourceState::capture(
        source,
        probe.fs.as_ref(),
        probe.layout.as_ref(),
        map.as_ref(),
    )?;
    let mut resumable = match Journal::read_header(&journal_path)? {
        Some(h) if !opts.restart => {
            h.source == info
                && h.volume_key == key
                && h.block_size == block_size
                && h.block_count == block_count
                && h.chunk_hash == chunk_hash
                && h.all_blocks == all_blocks
                && h.parent
                    .as_ref()
                    .is_none_or(|p| repo.snapshots_dir().join(p).exists())
                // Only a journal of this very source state is resumed (see `source_state`).
                && crate::source_state::backup_may_resume(
                    source,
                    &journal_path,
                    &h,
                    &state,
                    progress,
                )?
                // Every chunk the journal names must still be there and sane.
                && journal_chunks_intact(repo, &journal_path, progress)?
        }
        _ => false,
    };
    if opts.restart {
        resumable = false;
    }

    let mut writer = SnapshotWriter::create(&repo.tmp_dir())?;
    let mut total = BatchStats::default();
    let mut resumes = 0u32;
    // Unreadable ranges: those of the journal's batches, then this run's.
    let mut replayed_unreadable: Vec<(u64, u64)> = Vec::new();
    let (mut journal, jheader) = if resumable {
        let mut replay_err = None;
        let r = Journal::resume(&journal_path, |_, batch| {
            if batch.block_count == 0 {
                resumes += 1;
            }
            total.add(&batch.stats);
            for &r in &batch.unreadable {
                scan::push_range(&mut replayed_unreadable, r);
            }
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
            source_state: Some(state),
        };
        (Journal::create(&journal_path, &h)?, h)
    };
    let start_block = writer.blocks();
    let resumed = resumable && start_block > 0 || resumes > 0;
    if resumable {
        // Mark this run in the journal, so the snapshot counts its resumptions.
        journal.append(start_block, 0, &BatchStats::default(), &[], &[])?;
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

    // Change tracking: only against a consistent parent, from a consistent source.
    let mut tracking_note = None;
    let known = match (&parent_snap, &map) {
        (Some(parent), Some(_)) if !opts.rehash && consistent => {
            if parent.header().consistent == Some(true) {
                let base = crate::repo::reader::SnapshotVolume::new(
                    repo.open_snapshot(parent.id())?,
                    repo.chunks().clone(),
                );
                track_changes(source, &base, bs, &parent.header().unreadable, progress)?
            } else {
                tracking_note = Some(
                    "the parent snapshot was taken of a mounted volume (or by an older \
                     volback): every used block is read"
                        .to_string(),
                );
                None
            }
        }
        _ => None,
    };

    let threads = worker_threads(opts.threads);
    progress.start("backup", info.size - (start_block * bs).min(info.size));
    let unreadable = std::sync::Mutex::new(replayed_unreadable);
    let this_run = run_backup(
        repo,
        source,
        &unreadable,
        map.as_ref(),
        known.as_ref(),
        parent_snap.as_ref(),
        opts,
        threads,
        bs,
        start_block,
        &mut writer,
        &mut journal,
        progress,
    );
    progress.finish();
    let (this_run, unread_blocks) = this_run?;
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
        unreadable: unreadable.into_inner().unwrap_or_else(|p| p.into_inner()),
        consistent: Some(consistent),
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
        unreadable: header.unreadable,
        unread_blocks,
        tracking_note,
    })
}

/// Whether every chunk that the journal at `journal_path` names passes the cheap check
/// ([`crate::repo::chunks::ChunkStore::check_cheap`]). A journal naming a chunk that is
/// missing or damaged (deleted, truncated, moved aside by `verify`) must not be resumed: its
/// finished blocks would be carried into the snapshot without their data. Warns why not.
fn journal_chunks_intact(
    repo: &Repository,
    journal_path: &std::path::Path,
    progress: &dyn Progress,
) -> Result<bool> {
    use crate::repo::chunks::ChunkHealth;
    // Consecutive blocks of one pack name the same chunk: check each run of them once.
    let mut last: Option<ChunkId> = None;
    let mut bad: Option<(ChunkId, String)> = None;
    let mut failure: Option<Error> = None;
    let read = Journal::read_batches(journal_path, |_, batch| {
        if bad.is_some() || failure.is_some() {
            return Ok(());
        }
        decode_records(&batch.records, batch.block_count, |r, _| {
            let Some(id) = r.chunk() else { return };
            if bad.is_some() || failure.is_some() || last == Some(id) {
                return;
            }
            last = Some(id);
            match repo.chunks().check_cheap(&id) {
                Ok(ChunkHealth::Good) => {}
                Ok(ChunkHealth::Missing) => bad = Some((id, "missing".into())),
                Ok(ChunkHealth::Damaged(why)) => bad = Some((id, why)),
                Err(e) => failure = Some(e),
            }
        })
        .map_err(|d| Error::corrupt("journal batch", journal_path, d))
    })?;
    if let Some(e) = failure {
        return Err(e);
    }
    if read.is_none() {
        return Ok(false);
    }
    Ok(match bad {
        Some((id, why)) => {
            progress.warn(&format!(
                "not resuming the interrupted backup: chunk {} that it stored is {why}; \
                 starting over",
                id.to_hex()
            ));
            false
        }
        None => true,
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
                let same_volume = h.volume_key == key
                    || legacy_path_match(key, &h.volume_key, &h.source.path, h.source.size);
                if same_volume
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

/// The backup's work on each block (the read side is [`crate::scan`]).
struct BackupStage<'a> {
    repo: &'a Repository,
    source: &'a Source,
    block_size: u64,
    parent: Option<&'a SnapshotFile>,
    zstd_level: i32,
    packed: PackedIndex,
    verdicts: Verdicts,
}

impl BackupStage<'_> {
    /// Classifies one block read from the source against the parent and the repository:
    /// zero, unchanged, deduplicated, or `None` when its content must be stored (its hash
    /// is returned with it).
    fn classify(
        &self,
        data: &[u8],
        parent: Option<BlockRef>,
    ) -> Result<std::result::Result<(BlockRef, Outcome), ChunkId>> {
        if is_zero(data) {
            return Ok(Ok((BlockRef::Zero, Outcome::Zero)));
        }
        let store = self.repo.chunks();
        let id = self.repo.config().chunk_hash.hash(data);
        // The parent's chunk (or pack) must still be there and pass the cheap check: a lost
        // or damaged chunk is stored again instead of being carried into the new snapshot.
        if let Some(p) = parent.filter(|p| p.content_hash() == Some(id))
            && let Some(c) = p.chunk()
            && self.verdicts.reusable(store, &c)?
        {
            return Ok(Ok((p, Outcome::Unchanged)));
        }
        if store.is_present(&id)? {
            return Ok(Ok((BlockRef::Chunk(id), Outcome::Deduplicated)));
        }
        if let Some((pack, index)) = self.packed.get(&id) {
            let r = BlockRef::Slice {
                hash: id,
                pack,
                index,
            };
            return Ok(Ok((r, Outcome::Deduplicated)));
        }
        Ok(Err(id))
    }

    /// Stores one block read from the source (or compares it with the parent's).
    fn data(&self, encoder: &mut Encoder, data: &[u8], parent: Option<BlockRef>) -> Result<Done> {
        let bytes_read = data.len() as u64;
        let (block_ref, outcome) = match self.classify(data, parent)? {
            Ok(known) => known,
            Err(id) => {
                let enc = encoder.encode(data);
                self.repo.chunks().put(&id, &enc)?;
                let outcome = Outcome::New {
                    raw: bytes_read,
                    stored: enc.len() as u64,
                    chunks: 1,
                };
                (BlockRef::Chunk(id), outcome)
            }
        };
        Ok(Done::one(block_ref, outcome, bytes_read, false))
    }

    /// Stores a run of consecutive blocks read in one request: the blocks that must be
    /// stored go into one pack chunk, compressed together (a lone one becomes a plain chunk).
    fn run(
        &self,
        encoder: &mut Encoder,
        index: u64,
        data: &[u8],
        hints: Vec<Option<BlockRef>>,
    ) -> Result<Vec<Done>> {
        let bs = self.block_size as usize;
        let mut out = Vec::with_capacity(hints.len());
        // Blocks to store: (position in the run, content hash), first occurrence only.
        let mut fresh: Vec<(usize, ChunkId)> = Vec::new();
        // Position in `out` of each block that waits for the pack, with its slot in `fresh`.
        let mut waiting: Vec<(usize, usize)> = Vec::new();
        for (i, hint) in hints.into_iter().enumerate() {
            let Some(block) = data.get(i * bs..((i + 1) * bs).min(data.len())) else {
                return Err(Error::InvalidArgument(format!(
                    "run at block {index} is shorter than its {} blocks",
                    i + 1
                )));
            };
            match self.classify(block, hint)? {
                Ok((r, outcome)) => out.push(Done::one(r, outcome, block.len() as u64, false)),
                Err(id) => {
                    let slot = match fresh.iter().position(|(_, h)| *h == id) {
                        Some(slot) => slot,
                        None => {
                            fresh.push((i, id));
                            fresh.len() - 1
                        }
                    };
                    waiting.push((out.len(), slot));
                    out.push(Done::one(
                        BlockRef::Zero,
                        Outcome::Zero,
                        block.len() as u64,
                        false,
                    ));
                }
            }
        }
        if fresh.is_empty() {
            return Ok(out);
        }
        let block = |i: usize| &data[i * bs..((i + 1) * bs).min(data.len())];
        if fresh.len() == 1 {
            let (i, id) = fresh[0];
            let enc = encoder.encode(block(i));
            self.repo.chunks().put(&id, &enc)?;
            let mut first = true;
            for &(pos, _) in &waiting {
                out[pos].block_ref = BlockRef::Chunk(id);
                out[pos].outcome = if std::mem::take(&mut first) {
                    Outcome::New {
                        raw: block(i).len() as u64,
                        stored: enc.len() as u64,
                        chunks: 1,
                    }
                } else {
                    Outcome::Deduplicated
                };
            }
            return Ok(out);
        }
        // The pack's content: the fresh blocks in order, without copying when they are the
        // run's first blocks back to back (the common case of a full backup).
        let contiguous = fresh.iter().enumerate().all(|(k, &(i, _))| k == i);
        let content: std::borrow::Cow<'_, [u8]> = if contiguous {
            let (last, _) = fresh[fresh.len() - 1];
            std::borrow::Cow::Borrowed(&data[..(last * bs + block(last).len())])
        } else {
            let mut v = Vec::with_capacity(fresh.len() * bs);
            for &(i, _) in &fresh {
                v.extend_from_slice(block(i));
            }
            std::borrow::Cow::Owned(v)
        };
        let store = self.repo.chunks();
        let pack = self.repo.config().chunk_hash.hash(&content);
        // The same pack may be stored already: the same run of an identical volume, or of
        // this volume after its parent lost the pack. A damaged pack file is replaced, which
        // repairs the snapshots that refer to it.
        let (stored, chunks) = if store.is_present(&pack)? {
            (0, 0)
        } else {
            let enc = encoder.encode(&content);
            store.put(&pack, &enc)?;
            self.verdicts.set(pack, true);
            (enc.len() as u64, 1)
        };
        let existed = chunks == 0;
        for (slot, &(_, id)) in fresh.iter().enumerate() {
            self.packed.insert(id, pack, slot as u8);
        }
        let mut stored_once = vec![false; fresh.len()];
        let mut first = true;
        for &(pos, slot) in &waiting {
            let (i, id) = fresh[slot];
            out[pos].block_ref = BlockRef::Slice {
                hash: id,
                pack,
                index: slot as u8,
            };
            out[pos].outcome = if existed || std::mem::replace(&mut stored_once[slot], true) {
                Outcome::Deduplicated
            } else {
                let first = std::mem::take(&mut first);
                Outcome::New {
                    raw: block(i).len() as u64,
                    stored: if first { stored } else { 0 },
                    chunks: if first { chunks } else { 0 },
                }
            };
        }
        Ok(out)
    }
}

impl<'a> Stage for BackupStage<'a> {
    /// The parent snapshot's reference for the block.
    type Hint = Option<BlockRef>;
    /// The parent's references, streamed; set when they became unreadable.
    type Hints = (Option<BlockCursor<'a>>, bool);
    type Worker = Encoder;
    type Out = Vec<Done>;

    fn hints(&self) -> Self::Hints {
        (self.parent.map(BlockCursor::new), false)
    }

    fn whole_runs(&self) -> Option<u64> {
        // Packs hold at most MAX_PACK_BLOCKS blocks (a one-byte index); a pack of one block
        // is a plain chunk, and runs of one block would only make read requests smaller.
        let n = (u64::from(self.repo.config().pack_size) / self.block_size).min(MAX_PACK_BLOCKS);
        (n > 1).then_some(n)
    }

    fn hint(
        &self,
        hints: &mut Self::Hints,
        block: u64,
        progress: &dyn Progress,
    ) -> Option<BlockRef> {
        let (cursor, failed) = hints;
        match cursor.as_mut() {
            Some(c) if !*failed => match c.get(block) {
                Ok(r) => r,
                Err(e) => {
                    *failed = true;
                    progress.warn(&format!(
                        "parent snapshot unreadable from block {block} on ({e}); comparing \
                         with stored chunks instead"
                    ));
                    None
                }
            },
            _ => None,
        }
    }

    fn worker(&self) -> Result<Encoder> {
        Encoder::new(self.zstd_level)
    }

    fn process(
        &self,
        encoder: &mut Encoder,
        index: u64,
        count: u64,
        input: Input<Option<BlockRef>>,
    ) -> Result<Vec<Done>> {
        let run = |block_ref, outcome| Done {
            block_ref,
            outcome,
            count,
            bytes_read: 0,
            unread: false,
        };
        Ok(vec![match input {
            Input::Hole => run(BlockRef::Zero, Outcome::Zero),
            Input::Unused => run(BlockRef::Unused, Outcome::Unused),
            Input::Data { buf, hint } => self.data(encoder, &buf, hint)?,
            Input::Run { buf, hints } => return self.run(encoder, index, &buf, hints),
            Input::Known { hint } => match hint {
                Some(r)
                    if let Some(c) = r.chunk()
                        && self.verdicts.reusable(self.repo.chunks(), &c)? =>
                {
                    Done::one(r, Outcome::Unchanged, 0, true)
                }
                Some(BlockRef::Zero) => Done::one(BlockRef::Zero, Outcome::Zero, 0, true),
                // The parent does not hold the block after all (or its chunk is missing or
                // damaged since `drop_unreusable` checked it): read it.
                other => {
                    let start = index * self.block_size;
                    let len = self.block_size.min(self.source.size() - start) as usize;
                    let mut data = vec![0u8; len];
                    self.source.read_at(start, &mut data)?;
                    self.data(encoder, &data, other)?
                }
            },
        }])
    }
}

/// Runs the scan from `start_block` and commits its results: appends them to the snapshot
/// being written, and every few seconds hands a batch to the checkpointer.
///
/// Checkpoints (`syncfs`, then a journal append) run on their own thread so that a slow flush
/// never stalls the pipeline; while one is in progress the next batch keeps growing.
#[allow(clippy::too_many_arguments)]
fn run_backup(
    repo: &Repository,
    source: &Source,
    unreadable: &std::sync::Mutex<Vec<(u64, u64)>>,
    map: Option<&BlockMap>,
    known: Option<&BlockMap>,
    parent: Option<&SnapshotFile>,
    opts: &BackupOptions,
    threads: usize,
    block_size: u64,
    start_block: u64,
    writer: &mut SnapshotWriter,
    journal: &mut Journal,
    progress: &dyn Progress,
) -> Result<(BatchStats, u64)> {
    let cancel = opts.cancel.as_deref();
    let cancelled = || cancel.is_some_and(|c| c.load(Ordering::Relaxed));
    let verdicts = Verdicts::default();
    let checked_known = match (known, parent) {
        (Some(k), Some(p)) => {
            drop_unreusable(k, p, start_block, repo.chunks(), &verdicts, progress)?
        }
        _ => None,
    };
    let known = checked_known.as_ref();
    let scan = Scan {
        source,
        block_size,
        start_block,
        map,
        known,
        threads,
        cancel,
        rescue: Some(unreadable),
    };
    let block_count = scan.block_count();
    let stage = BackupStage {
        repo,
        source,
        block_size,
        parent,
        zstd_level: repo.config().zstd_level,
        packed: PackedIndex::default(),
        verdicts,
    };
    let bs = block_size;
    let size = source.size();
    let result = scan::run(&scan, &stage, progress, |done| {
        let (cp_tx, cp_rx) = bounded::<Batch>(0);
        std::thread::scope(|scope| {
            let checkpointer = scope.spawn(move || -> Result<()> {
                for batch in cp_rx.iter() {
                    repo.sync_chunks()?;
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
            // The unreadable ranges journaled so far: entries of the shared list wholly
            // journaled, and the byte offset up to which ranges are journaled (a range found
            // now may extend one replayed from the journal).
            let mut journaled = (0usize, start_block * bs);
            let mut take_unreadable = |upto: u64| -> Vec<(u64, u64)> {
                let all = unreadable.lock().unwrap_or_else(|p| p.into_inner());
                let upto = upto.min(size);
                let (ref mut whole, ref mut from) = journaled;
                let mut out = Vec::new();
                for &(off, len) in &all[*whole..] {
                    if off >= upto {
                        break;
                    }
                    let (s, e) = (off.max(*from), (off + len).min(upto));
                    if s < e {
                        out.push((s, e - s));
                    }
                }
                while all.get(*whole).is_some_and(|&(o, l)| o + l <= upto) {
                    *whole += 1;
                }
                *from = (*from).max(upto);
                out
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
                    && (last_checkpoint.elapsed() >= opts.checkpoint_interval
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
            let cp = checkpointer.join().unwrap_or_else(|_| {
                Err(Error::InvalidArgument("checkpoint thread panicked".into()))
            });
            if let Some(e) = first_error.or_else(|| done.take_error()) {
                return Err(e);
            }
            cp?;
            if next < block_count {
                if cancelled() {
                    return Err(Error::Interrupted { checkpointed: true });
                }
                return Err(Error::InvalidArgument(format!(
                    "backup stopped at block {next} of {block_count} without an error"
                )));
            }
            Ok((run_stats, unread))
        })
    });
    // Healing is not silent: damage found in the repository is named, so that the user runs
    // `verify` (other snapshots may refer to chunks no source holds any more).
    let failed = stage.verdicts.failed.load(Ordering::Relaxed);
    if failed > 0 {
        progress.warn(&format!(
            "{failed} existing chunk(s) that this backup would have reused were missing or \
             damaged; their blocks were stored again (this also repairs older snapshots that \
             refer to the same content). Run `volback verify --read-data` on the repository \
             (docs/REPAIR.md)"
        ));
    }
    result
}

/// Block references and statistics since the last checkpoint.
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
                s.data_blocks += 1;
                s.unchanged_blocks += 1
            }
            Outcome::Deduplicated => {
                s.data_blocks += 1;
                s.deduplicated_blocks += 1
            }
            Outcome::New {
                raw,
                stored,
                chunks,
            } => {
                s.data_blocks += 1;
                s.new_chunks += chunks;
                s.new_bytes += raw;
                s.new_bytes_stored += stored;
            }
        }
        match (self.run, d.block_ref) {
            (Some((r, c)), b) if r == b && !b.is_data() => self.run = Some((r, c + count)),
            (_, b) => {
                self.flush_run();
                if b.is_data() {
                    encode_run(&mut self.records, b, count);
                } else {
                    self.run = Some((b, count));
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
