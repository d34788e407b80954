//! The backup's plan: everything decided before a block is read, without writing anything to
//! the repository or the source (`backup --dry-run` prints it).
//!
//! - the repository's format (a format-1 repository is read-only), the mount policy
//!   ([`crate::job::check_mounts`]) and the volume lock (one backup per volume at a time; a
//!   plan alone only checks that none is running);
//! - the writer registration (`writers/` marker, docs/GC.md): made
//!   before anything is looked up in the index, so that prune never deletes a pack this
//!   backup may refer to; the writer's index excludes the packs of the pending records it
//!   read. A plan alone registers nothing (it reads the index as such a writer would);
//! - the source probe: filesystem or partition table, allocation map, [`volume_key`];
//! - the resume decision: the journal of an interrupted backup of the volume is continued
//!   only when it was made with the same settings, the source is in the state it read
//!   ([`crate::source_state`]) and every blob it names is in the writer's index;
//! - the parent: the journal's, or the latest snapshot of the volume ([`find_parent`]);
//! - change tracking against a consistent parent: the blocks taken from it unread, without
//!   those whose parent blob is not in the writer's index ([`drop_unreusable`]).

use super::{BackupOptions, path_key, volume_key};
use crate::error::{Error, Result, chain};
use crate::fs::disk::DiskLayout;
use crate::fs::{BlockMap, FsInfo};
use crate::hash::{ChunkId, HashAlgorithm};
use crate::job::{changes_since, check_mounts, tracking_warning};
use crate::progress::Progress;
use crate::repo::backend::LockGuard;
use crate::repo::blobs::BlobStore;
use crate::repo::format::decode_records;
use crate::repo::journal::{Journal, JournalHeader};
use crate::repo::snapshot::{BlockCursor, SnapshotFile};
use crate::repo::writers::{self, WriterMarker};
use crate::repo::{Repository, check_block_size};
use crate::source::{Source, SourceInfo};
use crate::source_state::SourceState;
use serde::Serialize;
use std::path::PathBuf;

/// What a backup of a source will do, decided before any block is read: see [`plan`].
#[derive(Debug, Serialize)]
pub struct BackupPlan {
    pub source: SourceInfo,
    /// The volume's identity ([`volume_key`]): names its journal and finds its parent.
    pub volume_key: String,
    pub block_size: u32,
    pub block_count: u64,
    pub chunk_hash: HashAlgorithm,
    /// The filesystem found on the volume.
    pub filesystem: Option<FsInfo>,
    /// The partition layout, for a partitioned disk.
    pub layout: Option<DiskLayout>,
    /// True when every block is read (`--all-blocks`, or no allocation map).
    pub all_blocks: bool,
    /// Blocks the allocation map marks used (every block when `all_blocks`).
    pub used_blocks: u64,
    /// False when the source is mounted read-write (allowed by `allow_mounted`): what is read
    /// is not one point in time.
    pub consistent: bool,
    /// The snapshot this one is incremental to; `None`: a full backup.
    pub parent: Option<String>,
    pub resume: Resume,
    pub tracking: Tracking,
    /// Blocks this run reads (at most: holes of a sparse source are skipped when met), from
    /// its first block on.
    pub read_blocks: u64,
    /// Blocks this run takes from the parent unread (change tracking).
    pub reused_blocks: u64,
    /// Blocks this run skips because the allocation map marks them unused.
    pub unused_blocks: u64,
    #[serde(skip)]
    pub(super) work: Work,
}

/// What the run needs from the plan beyond what it shows.
#[derive(Debug, Default)]
pub(super) struct Work {
    /// The volume lock, held until the snapshot is committed (`None` for a plan alone).
    pub lock: Option<std::sync::Arc<dyn LockGuard>>,
    /// The key of the volume's resume journal (`journals/<stem>.journal`).
    pub journal_path: String,
    pub map: Option<BlockMap>,
    /// Blocks change tracking takes from the parent unread.
    pub known: Option<BlockMap>,
    pub parent: Option<SnapshotFile>,
    /// The writer marker (`None` for a plan alone), held until the snapshot is written.
    pub writer: Option<WriterMarker>,
    /// The index the backup refers to blobs through: the writer's (without the packs of the
    /// pending records it knows), or the reader's for a plan alone.
    pub store: Option<std::sync::Arc<BlobStore>>,
    /// The source's state, for the header of a new journal.
    pub state: Option<SourceState>,
    /// The snapshot's time when it starts afresh.
    pub time_unix: i64,
    pub time_nanos: u32,
    /// [`super::BackupReport::tracking_note`].
    pub tracking_note: Option<String>,
}

/// Whether a backup continues an interrupted one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum Resume {
    /// There is no interrupted backup of the volume: start at block 0.
    Fresh,
    /// Continue the interrupted backup: its journal covers the blocks before `from_block`.
    Continue { from_block: u64 },
    /// An interrupted backup is not continued (its journal is replaced): `reason`.
    StartOver { reason: String },
}

impl Resume {
    /// The first block the run reads.
    pub fn from_block(&self) -> u64 {
        match self {
            Resume::Continue { from_block } => *from_block,
            _ => 0,
        }
    }

    /// True when the run continues an interrupted backup.
    pub fn continues(&self) -> bool {
        matches!(self, Resume::Continue { .. })
    }
}

/// What change tracking contributes (blocks known to be unchanged since the parent are taken
/// from it without being read).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Tracking {
    /// Not tried: `reason`.
    NotUsed { reason: String },
    /// Tried, but no block is known to be unchanged; `reason` when change tracking says why.
    NothingKnown { reason: Option<String> },
    /// `unchanged_blocks` (from the first block the run reads) are taken from the parent
    /// unread; `damaged_blocks` more are unchanged but their parent blob is no longer in the
    /// writer's index (its pack condemned by a prune): they are read and stored again.
    Used {
        unchanged_blocks: u64,
        damaged_blocks: u64,
    },
}

/// Plans a backup of `source` into `repo` with `opts`, as [`super::backup`] would run it,
/// and changes nothing: no lock file, writer marker, journal, pack, index file or snapshot
/// is written, and the source is only read. Fails as the backup would before reading a block (empty or mounted source,
/// bad block size, another backup of the volume running). Warnings go to `progress`.
pub fn plan(
    repo: &Repository,
    source: &Source,
    opts: &BackupOptions,
    progress: &dyn Progress,
) -> Result<BackupPlan> {
    prepare(repo, source, opts, progress, Locking::Check)
}

/// How a plan treats the volume lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Locking {
    /// Take it and keep it in the plan (a backup).
    Take,
    /// Only fail when another backup of the volume holds it (a plan alone).
    Check,
}

/// [`plan`], taking the volume lock when `locking` says so.
pub(super) fn prepare(
    repo: &Repository,
    source: &Source,
    opts: &BackupOptions,
    progress: &dyn Progress,
    locking: Locking,
) -> Result<BackupPlan> {
    repo.require_format2("back up")?;
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

    // One backup per volume at a time. On object storage, shared by many machines, per
    // machine: two clones of one volume (same filesystem UUID, same key) on two machines are
    // two volumes there, each with its own lock and journal (docs/FORMAT.md, F4).
    let stem = match repo.backend().capabilities().file_locks {
        true => repo.sealer().journal_stem(&key),
        false => repo
            .sealer()
            .journal_stem(&format!("{}\0{key}", crate::platform::hostname())),
    };
    let lock_name = format!("volume/{stem}");
    let lock = match locking {
        Locking::Take => Some(take_lock(repo, &lock_name, &info.path)?.into()),
        Locking::Check => {
            check_lock(repo, &lock_name, &info.path)?;
            None
        }
    };

    // Registered before the index is read (resume check, parent, change tracking): every
    // pack this backup may name stays until it is done.
    let (writer, store) = match locking {
        Locking::Take => {
            let (marker, pending) = writers::register_writer(repo)?;
            (Some(marker), BlobStore::open_writer(repo, &pending)?)
        }
        // What a backup starting now would see, without registering: the same exclusions.
        Locking::Check => (
            None,
            BlobStore::open_writer(repo, &writers::read_pending(repo)?)?,
        ),
    };

    let journal_path = format!("journals/{stem}.journal");
    let state = SourceState::capture(
        source,
        probe.fs.as_ref(),
        probe.layout.as_ref(),
        map.as_ref(),
    )?;
    let expected = Expected {
        source: &info,
        volume_key: &key,
        block_size,
        block_count,
        chunk_hash,
        all_blocks,
    };
    let (resume, recorded) = decide_resume(
        repo,
        &store,
        source,
        &journal_path,
        &expected,
        &state,
        opts.restart,
        progress,
    )?;
    let (time_unix, time_nanos) = crate::time::now_unix_nanos();
    let parent = match &recorded {
        Some(h) => h.parent.clone(),
        None => find_parent(repo, &key, block_size, progress)?,
    };
    let parent_snap = match &parent {
        Some(p) => match repo.open_snapshot(p) {
            // Only a snapshot of format 2 (a tree of blobs) can be a parent: its blocks are
            // pieces of blobs this backup may refer to again.
            Ok(s) if s.version() < crate::repo::format::SNAPSHOT_TREE_VERSION => {
                progress.warn(&format!(
                    "parent snapshot {p} is of repository format 1; storing every block afresh"
                ));
                None
            }
            Ok(mut s) => {
                s.set_blobs(store.clone());
                Some(s)
            }
            Err(e) => {
                progress.warn(&format!(
                    "parent snapshot {p} is unreadable ({}); storing every block afresh",
                    chain(&e)
                ));
                None
            }
        },
        None => None,
    };

    // Change tracking: only against a consistent parent, from a consistent source.
    let start_block = resume.from_block();
    let mut tracking_note = None;
    let (tracking, known) = match (&parent_snap, &map) {
        (Some(p), Some(_)) if !opts.rehash && consistent => {
            if p.header().consistent == Some(true) {
                let base = crate::repo::reader::SnapshotVolume::new(
                    repo.open_snapshot(p.id())?.with_blobs(store.clone()),
                    repo.chunks().clone(),
                );
                let t = changes_since(source, &base, bs, &p.header().unreadable)?;
                if let Some(n) = &t.note {
                    progress.warn(&tracking_warning(n));
                }
                let checked = match &t.map {
                    Some(k) => drop_unreusable(k, p, start_block, &store, progress)?,
                    None => None,
                };
                match checked {
                    Some((k, damaged)) => {
                        let unchanged = count_known(map.as_ref(), &k, start_block);
                        let tracking = Tracking::Used {
                            unchanged_blocks: unchanged,
                            damaged_blocks: damaged,
                        };
                        (tracking, Some(k))
                    }
                    None if t.map.is_some() => (
                        Tracking::NothingKnown {
                            reason: Some(
                                "the parent snapshot's block references are unreadable".into(),
                            ),
                        },
                        None,
                    ),
                    None => (Tracking::NothingKnown { reason: t.note }, None),
                }
            } else {
                let note = "the parent snapshot was taken of a mounted volume (or by an older \
                            volback): every used block is read"
                    .to_string();
                tracking_note = Some(note.clone());
                (Tracking::NotUsed { reason: note }, None)
            }
        }
        _ => {
            let reason = if parent.is_none() {
                "no parent snapshot: a full backup"
            } else if parent_snap.is_none() {
                "the parent snapshot is unreadable"
            } else if opts.all_blocks {
                "every block is read (all blocks asked for)"
            } else if map.is_none() {
                "no allocation map: every block is read"
            } else if opts.rehash {
                "every used block is read and hashed (rehash asked for)"
            } else {
                "the source is mounted read-write"
            };
            (
                Tracking::NotUsed {
                    reason: reason.into(),
                },
                None,
            )
        }
    };

    let used_blocks = map.as_ref().map_or(block_count, |m| m.used_blocks());
    let remaining = block_count.saturating_sub(start_block);
    let mapped = map
        .as_ref()
        .map_or(remaining, |m| count_from(m, start_block));
    let reused_blocks = match &tracking {
        Tracking::Used {
            unchanged_blocks, ..
        } => *unchanged_blocks,
        _ => 0,
    };
    Ok(BackupPlan {
        source: info,
        volume_key: key,
        block_size,
        block_count,
        chunk_hash,
        filesystem: probe.fs,
        layout: probe.layout,
        all_blocks,
        used_blocks,
        consistent,
        parent,
        resume,
        tracking,
        read_blocks: mapped - reused_blocks,
        reused_blocks,
        unused_blocks: remaining - mapped,
        work: Work {
            lock,
            journal_path,
            map,
            known,
            parent: parent_snap,
            writer,
            store: Some(store),
            state: Some(state),
            time_unix,
            time_nanos,
            tracking_note,
        },
    })
}

impl BackupPlan {
    /// The header of a new journal for this plan.
    pub(super) fn journal_header(&mut self, tags: &[String]) -> JournalHeader {
        JournalHeader {
            source: self.source.clone(),
            volume_key: self.volume_key.clone(),
            block_size: self.block_size,
            block_count: self.block_count,
            chunk_hash: self.chunk_hash,
            parent: self.parent.clone(),
            all_blocks: self.all_blocks,
            time: crate::time::rfc3339(self.work.time_unix),
            time_unix: self.work.time_unix,
            time_nanos: self.work.time_nanos,
            tags: tags.to_vec(),
            source_state: self.work.state.take(),
        }
    }
}

/// Blocks of `map` from `start` on.
fn count_from(map: &BlockMap, start: u64) -> u64 {
    map.used_runs()
        .map(|r| r.end.saturating_sub(r.start.max(start)))
        .sum()
}

/// Blocks of `known` from `start` on that the scan takes unread: those `map` marks used too.
fn count_known(map: Option<&BlockMap>, known: &BlockMap, start: u64) -> u64 {
    known
        .used_runs()
        .map(|r| {
            (r.start.max(start)..r.end)
                .filter(|&b| map.is_none_or(|m| m.is_used(b)))
                .count() as u64
        })
        .sum()
}

/// Takes the lock of one volume's backups (`volume/<stem>`).
fn take_lock(repo: &Repository, lock: &str, source: &str) -> Result<Box<dyn LockGuard>> {
    repo.backend()
        .lock_exclusive(lock, &format!("another backup of {source} is running"))
        .map_err(|e| match e {
            Error::Locked { path, .. } => locked(path, source),
            e => e,
        })
}

/// Fails when a backup of the volume holds its lock; creates nothing. The lock is only
/// probed, not kept: a plan alone must not stop a backup that starts meanwhile.
fn check_lock(repo: &Repository, lock: &str, source: &str) -> Result<()> {
    match repo.backend().lock_held(lock)? {
        true => Err(locked(repo.root().to_path_buf(), source)),
        false => Ok(()),
    }
}

fn locked(path: PathBuf, source: &str) -> Error {
    Error::Locked {
        path,
        detail: format!("another backup of {source} is running"),
    }
}

/// What a resumable journal must have been made with.
struct Expected<'a> {
    source: &'a SourceInfo,
    volume_key: &'a str,
    block_size: u32,
    block_count: u64,
    chunk_hash: HashAlgorithm,
    all_blocks: bool,
}

/// How the journal header `h` differs from what this backup expects, if it does.
fn settings_differ(h: &JournalHeader, e: &Expected<'_>) -> Option<String> {
    let what = if h.source != *e.source {
        "of another source (path, kind, size or sector sizes differ)".to_string()
    } else if h.volume_key != e.volume_key {
        "of another volume".to_string()
    } else if h.block_size != e.block_size {
        format!("with {} byte blocks", h.block_size)
    } else if h.block_count != e.block_count {
        format!("of {} blocks", h.block_count)
    } else if h.chunk_hash != e.chunk_hash {
        "with another chunk hash".to_string()
    } else if h.all_blocks != e.all_blocks {
        if h.all_blocks {
            "of every block".to_string()
        } else {
            "of the used blocks only".to_string()
        }
    } else {
        return None;
    };
    Some(format!("it was a backup {what}"))
}

/// Decides whether the journal at `journal_path` is continued (see the module doc). Returns
/// the decision and, when the journal is continued, its header. Warns why a journal that
/// matches the settings is not continued.
#[allow(clippy::too_many_arguments)]
fn decide_resume(
    repo: &Repository,
    store: &BlobStore,
    source: &Source,
    journal_path: &str,
    expected: &Expected<'_>,
    state: &SourceState,
    restart: bool,
    progress: &dyn Progress,
) -> Result<(Resume, Option<JournalHeader>)> {
    let start_over = |reason: String| Ok((Resume::StartOver { reason }, None));
    let sealer = repo.sealer();
    // A sealed journal whose header or a batch before its end does not open was damaged
    // (a torn last batch is no damage): it is replaced, never resumed.
    let b = repo.backend().as_ref();
    let read = Journal::read_header(b, journal_path, sealer).and_then(|h| match h {
        Some(_) if sealer.is_encrypted() => {
            Journal::read_batches(b, journal_path, sealer, |_, _| Ok(()))
        }
        h => Ok(h),
    });
    let h = match read {
        Ok(Some(h)) => h,
        Ok(None) => return Ok((Resume::Fresh, None)),
        Err(e @ Error::Corrupt { .. }) => {
            return start_over(format!("its journal is damaged ({})", chain(&e)));
        }
        Err(e) => return Err(e),
    };
    if restart {
        return start_over("a restart was asked for".into());
    }
    if let Some(why) = settings_differ(&h, expected) {
        return start_over(why);
    }
    if let Some(p) = &h.parent
        && repo.backend().head(&format!("snapshots/{p}"))?.is_none()
    {
        return start_over(format!("its parent snapshot {p} is gone"));
    }
    // Only a journal of this very source state is resumed (see `source_state`).
    let noted = LastWarning::new(progress);
    if !crate::source_state::backup_may_resume(
        source,
        repo.backend().as_ref(),
        journal_path,
        sealer,
        &h,
        state,
        Some(store as &dyn crate::repo::blob::BlobSource),
        &noted,
    )? {
        let reason = noted.take().map_or_else(
            || "its journal is unreadable".to_string(),
            |w| {
                let w = w
                    .strip_prefix("not resuming the interrupted backup: ")
                    .unwrap_or(&w);
                w.strip_suffix("; starting over").unwrap_or(w).to_string()
            },
        );
        return start_over(reason);
    }
    // Every blob the journal names must still be usable.
    match check_journal(store, journal_path)? {
        None => start_over("its journal is unreadable".into()),
        Some(JournalCheck {
            damage: Some((id, why)),
            ..
        }) => {
            progress.warn(&format!(
                "not resuming the interrupted backup: blob {} that it stored is {why}; \
                 starting over",
                id.to_hex()
            ));
            start_over(format!("blob {} that it stored is {why}", id.to_hex()))
        }
        Some(JournalCheck {
            next_block,
            damage: None,
        }) => Ok((
            Resume::Continue {
                from_block: next_block,
            },
            Some(h),
        )),
    }
}

/// Forwards to a [`Progress`] and keeps the last warning (the reason a check refused).
struct LastWarning<'a> {
    inner: &'a dyn Progress,
    last: std::sync::Mutex<Option<String>>,
}

impl<'a> LastWarning<'a> {
    fn new(inner: &'a dyn Progress) -> Self {
        LastWarning {
            inner,
            last: std::sync::Mutex::new(None),
        }
    }

    fn take(&self) -> Option<String> {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl Progress for LastWarning<'_> {
    fn start(&self, phase: &str, total: u64) {
        self.inner.start(phase, total)
    }
    fn advance(&self, bytes: u64) {
        self.inner.advance(bytes)
    }
    fn finish(&self) {
        self.inner.finish()
    }
    fn warn(&self, message: &str) {
        self.inner.warn(message);
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(message.to_string());
    }
}

/// What [`check_journal`] found.
#[derive(Debug, PartialEq, Eq)]
struct JournalCheck {
    /// The first block the journal does not cover.
    next_block: u64,
    /// The first blob (or format-1 chunk) it names that cannot be referred to, and why.
    damage: Option<(ChunkId, String)>,
}

/// Reads the journal at `journal_path`, changing nothing: where it ends, and whether every
/// blob it names is in the writer's index (`store`). A journal naming a blob that is not (its
/// pack condemned by a prune this writer knows of, or never indexed) must not be resumed: its
/// finished blocks would be carried into the snapshot without their data. Neither is a journal
/// of format-1 references (chunks, pack slices). `None` when there is no usable journal.
fn check_journal(store: &BlobStore, journal_path: &str) -> Result<Option<JournalCheck>> {
    let mut bad: Option<(ChunkId, String)> = None;
    let mut next_block = 0u64;
    let b = store.backend().as_ref();
    let path = b.display_path(journal_path);
    let read = Journal::read_batches(b, journal_path, store.sealer(), |_, batch| {
        next_block = batch.first_block + batch.block_count;
        if bad.is_some() {
            return Ok(());
        }
        decode_records(&batch.records, batch.block_count, |r, _| {
            if bad.is_some() {
                return;
            }
            if let Some(id) = r.blob() {
                if !store.usable(&id) {
                    bad = Some((
                        id,
                        "not in the repository's index or its pack is missing".into(),
                    ));
                }
            } else if let Some(id) = r.chunk() {
                bad = Some((id, "a chunk of repository format 1".into()));
            }
        })
        .map_err(|d| Error::corrupt("journal batch", &path, d))
    })?;
    Ok(read.map(|_| JournalCheck {
        next_block,
        damage: bad,
    }))
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

/// The blocks of `known` (change tracking: unchanged since the parent, taken from it unread)
/// from `start_block` on, without those whose parent blob is not in the writer's index
/// (`store`: its pack condemned by a prune, or lost): those are read and stored again, in runs
/// like a full backup's. Returns the map and how many blocks were taken out; `None` when the
/// parent's references are unreadable (every used block is then read).
fn drop_unreusable(
    known: &BlockMap,
    parent: &SnapshotFile,
    start_block: u64,
    store: &BlobStore,
    progress: &dyn Progress,
) -> Result<Option<(BlockMap, u64)>> {
    let mut out = known.clone();
    let mut cursor = BlockCursor::new(parent);
    let mut dropped = 0u64;
    for run in known.used_runs() {
        for b in run.start.max(start_block)..run.end {
            let r = match cursor.get(b) {
                Ok(r) => r,
                Err(e) => {
                    progress.warn(&format!(
                        "parent snapshot unreadable at block {b} ({}); reading every used \
                         block",
                        chain(&e)
                    ));
                    return Ok(None);
                }
            };
            if let Some(blob) = r.and_then(|r| r.blob())
                && !store.usable(&blob)
            {
                out.unmark_bytes(b * known.granularity(), known.granularity());
                dropped += 1;
            }
        }
    }
    if dropped > 0 {
        progress.warn(&format!(
            "{dropped} unchanged blocks refer to blobs of the parent snapshot that are no longer \
             in the repository's index, or whose pack is missing or damaged: they are read and \
             stored again"
        ));
    }
    Ok(Some((out, dropped)))
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
            Err(e) => progress.warn(&format!("skipping unreadable snapshot {id}: {}", chain(&e))),
        }
    }
    // The latest, and within one second the one taken after the other (see sort_snapshots).
    crate::repo::sort_snapshots(&mut candidates);
    Ok(candidates.pop().map(|s| s.id))
}

/// `n` bytes for people: "256 KiB", "1.5 GiB".
fn human(n: u64) -> String {
    crate::bytes::human(n, true)
}

impl std::fmt::Display for BackupPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bs = u64::from(self.block_size);
        let blocks = |n: u64| format!("{n} blocks ({})", human(n.saturating_mul(bs)));
        writeln!(
            f,
            "source:   {} ({}, {})",
            self.source.path,
            self.source.kind,
            human(self.source.size)
        )?;
        if !self.consistent {
            writeln!(
                f,
                "          mounted read-write: the copy is not one point in time"
            )?;
        }
        let content = match (&self.filesystem, &self.layout) {
            (Some(fs), _) => {
                let label = if fs.label.is_empty() {
                    String::new()
                } else {
                    format!(" \"{}\"", fs.label)
                };
                format!("{} {}{label}", fs.fs_type, fs.uuid)
            }
            (None, Some(l)) => format!(
                "{} partition table {}, {} partitions",
                l.table,
                l.id,
                l.partitions.len()
            ),
            (None, None) => "no filesystem recognised".into(),
        };
        writeln!(f, "content:  {content}")?;
        let map = if self.all_blocks {
            "every block is read".to_string()
        } else {
            format!("{} in use", blocks(self.used_blocks))
        };
        writeln!(f, "blocks:   {} of {}; {map}", self.block_count, human(bs))?;
        match &self.parent {
            Some(p) => writeln!(f, "parent:   {p} (incremental backup)")?,
            None => writeln!(f, "parent:   none (full backup)")?,
        }
        match &self.resume {
            Resume::Fresh => writeln!(f, "resume:   no interrupted backup to continue")?,
            Resume::Continue { from_block } => writeln!(
                f,
                "resume:   continues the interrupted backup from block {from_block} of {}",
                self.block_count
            )?,
            Resume::StartOver { reason } => writeln!(
                f,
                "resume:   starts over (an interrupted backup is not continued: {reason})"
            )?,
        }
        match &self.tracking {
            Tracking::NotUsed { reason } => writeln!(f, "tracking: not used: {reason}")?,
            Tracking::NothingKnown { reason: Some(r) } => {
                writeln!(f, "tracking: no block known to be unchanged: {r}")?
            }
            Tracking::NothingKnown { reason: None } => {
                writeln!(f, "tracking: no block known to be unchanged")?
            }
            Tracking::Used {
                unchanged_blocks,
                damaged_blocks,
            } => {
                write!(f, "tracking: {} unchanged", blocks(*unchanged_blocks))?;
                if *damaged_blocks > 0 {
                    write!(
                        f,
                        "; {damaged_blocks} more refer to blobs no longer in the index and \
                         are read again"
                    )?;
                }
                writeln!(f)?
            }
        }
        write!(
            f,
            "this run: reads at most {}, takes {} from the parent unread, skips {} unused",
            blocks(self.read_blocks),
            self.reused_blocks,
            self.unused_blocks
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::{BackupOptions, backup};
    use crate::progress::Silent;
    use crate::repo::InitOptions;
    use std::collections::BTreeMap;
    use std::path::Path;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    /// Keeps the warnings.
    #[derive(Default)]
    struct Warnings(Mutex<Vec<String>>);

    impl Progress for Warnings {
        fn warn(&self, message: &str) {
            self.0.lock().unwrap().push(message.to_string());
        }
    }

    /// Sets the cancel flag at the first committed block.
    struct CancelAtFirstBlock(Arc<AtomicBool>);

    impl Progress for CancelAtFirstBlock {
        fn advance(&self, bytes: u64) {
            if bytes > 0 {
                self.0.store(true, Ordering::Relaxed);
            }
        }
    }

    /// Runs a backup with `every`'s options that is cancelled at its first committed block,
    /// and checks that it stopped after a checkpoint (so that a plan can continue it).
    fn interrupted_backup(repo: &Repository, source: &Source, every: &BackupOptions) {
        let flag = Arc::new(AtomicBool::new(false));
        let interrupted = BackupOptions {
            cancel: Some(flag.clone()),
            ..every.clone()
        };
        match backup(repo, source, &interrupted, &CancelAtFirstBlock(flag)) {
            Err(Error::Interrupted { checkpointed: true }) => {}
            other => panic!("the backup was not interrupted: {other:?}"),
        }
    }

    /// A file of `len` pseudo-random bytes (seeded).
    fn random_file(path: &Path, len: usize, seed: u64) {
        let mut x = seed | 1;
        let mut data = Vec::with_capacity(len);
        while data.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            data.extend_from_slice(&x.to_le_bytes());
        }
        data.truncate(len);
        std::fs::write(path, data).unwrap();
    }

    /// Every entry under `root`: kind, size, modification time and, for files, content hash.
    fn tree(root: &Path) -> BTreeMap<PathBuf, (bool, u64, std::time::SystemTime, String)> {
        let mut out = BTreeMap::new();
        let mut todo = vec![root.to_path_buf()];
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let e = e.unwrap();
                let m = std::fs::symlink_metadata(e.path()).unwrap();
                let hash = if m.is_file() {
                    blake3::hash(&std::fs::read(e.path()).unwrap())
                        .to_hex()
                        .to_string()
                } else {
                    String::new()
                };
                if m.is_dir() {
                    todo.push(e.path());
                }
                let key = e.path().strip_prefix(root).unwrap().to_path_buf();
                out.insert(key, (m.is_dir(), m.len(), m.modified().unwrap(), hash));
            }
        }
        out
    }

    fn header(e: &Expected<'_>) -> JournalHeader {
        JournalHeader {
            source: e.source.clone(),
            volume_key: e.volume_key.to_string(),
            block_size: e.block_size,
            block_count: e.block_count,
            chunk_hash: e.chunk_hash,
            parent: None,
            all_blocks: e.all_blocks,
            time: String::new(),
            time_unix: 0,
            time_nanos: 0,
            tags: Vec::new(),
            source_state: None,
        }
    }

    #[test]
    fn a_journal_of_other_settings_is_not_resumed() {
        let info = SourceInfo {
            path: "/dev/x".into(),
            kind: "block-device".into(),
            size: 1 << 30,
            logical_sector_size: 512,
            physical_sector_size: 4096,
        };
        let e = Expected {
            source: &info,
            volume_key: "k",
            block_size: 65536,
            block_count: 16384,
            chunk_hash: HashAlgorithm::Blake3,
            all_blocks: false,
        };
        assert_eq!(settings_differ(&header(&e), &e), None);
        let differs = |f: &dyn Fn(&mut JournalHeader)| {
            let mut h = header(&e);
            f(&mut h);
            settings_differ(&h, &e).expect("a difference")
        };
        assert!(differs(&|h| h.source.size += 1).contains("another source"));
        assert!(differs(&|h| h.volume_key = "other".into()).contains("another volume"));
        assert!(differs(&|h| h.block_size = 4096).contains("4096 byte blocks"));
        assert!(differs(&|h| h.block_count = 1).contains("of 1 blocks"));
        assert!(differs(&|h| h.chunk_hash = HashAlgorithm::Sha256).contains("chunk hash"));
        assert!(differs(&|h| h.all_blocks = true).contains("every block"));
        // Only the settings count: the time, tags and parent are the journal's own.
        let mut h = header(&e);
        h.time_unix = 5;
        h.tags = vec!["t".into()];
        h.parent = Some("p".into());
        assert_eq!(settings_differ(&h, &e), None);
    }

    #[test]
    fn counts_start_at_the_first_block_read() {
        let bs = 4096;
        let mut map = BlockMap::new(100 * bs, bs);
        map.mark_bytes(0, 10 * bs);
        map.mark_bytes(50 * bs, 20 * bs);
        assert_eq!(count_from(&map, 0), 30);
        assert_eq!(count_from(&map, 5), 25);
        assert_eq!(count_from(&map, 60), 10);
        assert_eq!(count_from(&map, 100), 0);
        let mut known = BlockMap::new(100 * bs, bs);
        known.mark_bytes(8 * bs, 50 * bs);
        // Blocks 8..10 and 50..58 are both used and known.
        assert_eq!(count_known(Some(&map), &known, 0), 10);
        assert_eq!(count_known(Some(&map), &known, 9), 9);
        assert_eq!(count_known(None, &known, 0), 50);
    }

    #[test]
    fn volume_key_prefers_filesystem_then_disk_then_path() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        random_file(&a, 1 << 20, 1);
        random_file(&b, 1 << 20, 2);
        let (sa, sb) = (Source::open(&a).unwrap(), Source::open(&b).unwrap());
        let path_a = path_key(&sa.info().path, 1 << 20);
        assert_eq!(volume_key(&sa, None, None), path_a);
        assert_ne!(volume_key(&sb, None, None), path_a);
        let fs = |uuid: &str| FsInfo {
            fs_type: "ext4".into(),
            version: None,
            uuid: uuid.into(),
            label: String::new(),
            block_size: 4096,
            size: 1 << 20,
            used_bytes: 0,
        };
        let layout = |id: &str| DiskLayout {
            table: "dos".into(),
            id: id.into(),
            sector_size: 512,
            partitions: Vec::new(),
        };
        // A meaningless identifier falls back to the path.
        let zero = fs("00000000-0000-0000-0000-000000000000");
        assert_eq!(volume_key(&sa, Some(&zero), None), path_a);
        assert_eq!(volume_key(&sa, None, Some(&layout("0x00000000"))), path_a);
        // A filesystem UUID or disk identifier names the volume wherever it is.
        let f = fs("3f1c2a9e-0000-4000-8000-0123456789ab");
        let by_fs = volume_key(&sa, Some(&f), None);
        assert_ne!(by_fs, path_a);
        assert_eq!(volume_key(&sb, Some(&f), None), by_fs);
        assert_eq!(
            volume_key(&sa, Some(&f), Some(&layout("0x1234abcd"))),
            by_fs
        );
        let by_disk = volume_key(&sa, Some(&zero), Some(&layout("0x1234abcd")));
        assert_ne!(by_disk, path_a);
        assert_ne!(by_disk, by_fs);
        assert_eq!(volume_key(&sb, None, Some(&layout("0x1234abcd"))), by_disk);
    }

    #[cfg(unix)]
    #[test]
    fn legacy_path_keys_match_through_their_links() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("vol.img");
        random_file(&file, 4096, 3);
        let link = dir.path().join("link.img");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        let canonical = std::fs::canonicalize(&file).unwrap();
        let canonical = canonical.to_str().unwrap();
        let link = link.to_str().unwrap();
        let key = path_key(canonical, 4096);
        assert!(legacy_path_match(&key, &path_key(link, 4096), link, 4096));
        // The recorded key must be the one of the recorded path and size.
        assert!(!legacy_path_match(&key, &path_key(link, 8192), link, 4096));
        assert!(!legacy_path_match(&key, "0123", link, 4096));
        // A canonical recorded path matches by key alone (not here).
        assert!(!legacy_path_match(&key, &key, canonical, 4096));
        let gone = dir.path().join("gone");
        let gone = gone.to_str().unwrap();
        assert!(!legacy_path_match(&key, &path_key(gone, 4096), gone, 4096));
    }

    #[test]
    fn find_parent_and_drop_unreusable() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("raw.img");
        let bs = 64 * 1024u64;
        random_file(&img, 16 * bs as usize, 4);
        let repo = Repository::init(&dir.path().join("repo"), &InitOptions::default()).unwrap();
        let source = Source::open(&img).unwrap();
        let opts = BackupOptions {
            block_size: Some(bs as u32),
            ..Default::default()
        };
        let key = volume_key(&source, None, None);
        assert_eq!(find_parent(&repo, &key, bs as u32, &Silent).unwrap(), None);
        let first = backup(&repo, &source, &opts, &Silent).unwrap();
        let second = backup(&repo, &source, &opts, &Silent).unwrap();
        assert_eq!(second.parent.as_deref(), Some(first.snapshot_id.as_str()));
        let found = find_parent(&repo, &key, bs as u32, &Silent).unwrap();
        assert_eq!(found.as_deref(), Some(second.snapshot_id.as_str()));
        assert_eq!(find_parent(&repo, &key, 4096, &Silent).unwrap(), None);
        assert_eq!(
            find_parent(&repo, "other", bs as u32, &Silent).unwrap(),
            None
        );

        let store = repo.blobs().unwrap();
        let parent = repo
            .open_snapshot(&second.snapshot_id)
            .unwrap()
            .with_blobs(store.clone());
        let mut known = BlockMap::new(16 * bs, bs);
        known.mark_bytes(0, 16 * bs);
        let w = Warnings::default();
        let (kept, dropped) = drop_unreusable(&known, &parent, 0, &store, &w)
            .unwrap()
            .unwrap();
        assert_eq!((kept.used_blocks(), dropped), (16, 0));
        assert!(w.0.lock().unwrap().is_empty());

        // The pack of block 5's blob is condemned by a prune this writer knows of: the blocks
        // that refer to it are read again.
        let lost = BlockCursor::new(&parent)
            .get(5)
            .unwrap()
            .unwrap()
            .blob()
            .unwrap();
        let pack = store.location(&lost).unwrap().pack;
        let pending = crate::repo::writers::PendingRecord {
            id: "p".into(),
            created: String::new(),
            packs: vec![pack],
            index: Vec::new(),
        };
        let writer = BlobStore::open_writer(&repo, &[pending]).unwrap();
        assert!(!writer.contains(&lost));
        let (kept, dropped) = drop_unreusable(&known, &parent, 0, &writer, &w)
            .unwrap()
            .unwrap();
        assert!(dropped >= 1);
        assert_eq!(kept.used_blocks(), 16 - dropped);
        assert!(!kept.is_used(5));
        assert!(w.0.lock().unwrap()[0].contains(&format!("{dropped} unchanged blocks")));
        // Blocks before the first one read are not checked.
        let (kept, dropped) = drop_unreusable(&known, &parent, 16, &writer, &w)
            .unwrap()
            .unwrap();
        assert_eq!((kept.used_blocks(), dropped), (16, 0));
    }

    /// Format 1 is read-only: neither a plan nor a backup is made there.
    #[test]
    fn a_format1_repository_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("raw.img");
        random_file(&img, 1 << 20, 6);
        let repo = Repository::init(&dir.path().join("repo"), &InitOptions::v1()).unwrap();
        let source = Source::open(&img).unwrap();
        let opts = BackupOptions::default();
        for e in [
            plan(&repo, &source, &opts, &Silent).unwrap_err(),
            backup(&repo, &source, &opts, &Silent).unwrap_err(),
        ] {
            assert!(e.to_string().contains("back up"), "{e}");
        }
        assert!(repo.snapshot_ids().unwrap().is_empty());
    }

    /// An interrupted backup whose packs a prune has condemned since (a pending record the
    /// next run reads) is not continued: its blobs are not in the writer's index.
    #[test]
    fn a_journal_naming_condemned_blobs_is_not_resumed() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("raw.img");
        // More than one run (16 MiB each), so that the backup stops after the first.
        random_file(&img, 40 << 20, 8);
        let repo = Repository::init(&dir.path().join("repo"), &InitOptions::default()).unwrap();
        let source = Source::open(&img).unwrap();
        let every = BackupOptions {
            threads: 1,
            checkpoint_interval: std::time::Duration::ZERO,
            ..Default::default()
        };
        interrupted_backup(&repo, &source, &every);
        let p = plan(&repo, &source, &every, &Silent).unwrap();
        assert!(
            matches!(p.resume, Resume::Continue { .. }),
            "{:?}",
            p.resume
        );
        let packs = BlobStore::open(&repo).unwrap().with_index(|i| i.packs());
        assert!(!packs.is_empty());
        crate::repo::writers::write_pending(&repo, &packs, &[]).unwrap();
        let p = plan(&repo, &source, &every, &Silent).unwrap();
        match &p.resume {
            Resume::StartOver { reason } => assert!(reason.contains("index"), "{reason}"),
            r => panic!("resumed with condemned blobs: {r:?}"),
        }
        let done = backup(&repo, &source, &every, &Silent).unwrap();
        assert!(!done.resumed);
        assert_eq!(done.this_run.new_bytes, 40 << 20, "everything stored again");
    }

    /// Two backups into one repository at once (two writers, two packers): both commit,
    /// and each snapshot reads back as its source.
    #[test]
    fn concurrent_backups_commit_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init(&dir.path().join("repo"), &InitOptions::default()).unwrap();
        let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
        random_file(&a, 20 << 20, 9);
        // b: a's content shifted by three blocks, then its own.
        let mut bytes = vec![1u8; 3 * 4096];
        bytes.extend_from_slice(&std::fs::read(&a).unwrap()[..10 << 20]);
        std::fs::write(&b, &bytes).unwrap();
        let opts = BackupOptions {
            checkpoint_interval: std::time::Duration::ZERO,
            ..Default::default()
        };
        let run = |p: &Path| {
            let repo = Repository::open(&dir.path().join("repo")).unwrap();
            let source = Source::open(p).unwrap();
            backup(&repo, &source, &opts, &Silent).unwrap().snapshot_id
        };
        let ids: Vec<String> = std::thread::scope(|s| {
            let ta = s.spawn(|| run(&a));
            let tb = s.spawn(|| run(&b));
            vec![ta.join().unwrap(), tb.join().unwrap()]
        });
        assert!(
            crate::repo::writers::live_writers(&repo)
                .unwrap()
                .is_empty()
        );
        for (id, path) in ids.iter().zip([&a, &b]) {
            use crate::volume::Volume;
            let vol = crate::repo::reader::SnapshotVolume::open(&repo, id, None).unwrap();
            let want = std::fs::read(path).unwrap();
            let mut got = vec![0u8; want.len()];
            vol.read_at(0, &mut got).unwrap();
            assert!(got == want, "snapshot {id} differs from {}", path.display());
        }
    }

    /// Counts the live writers each time the backup reports progress.
    struct WatchWriters<'a>(&'a Repository, Mutex<Vec<usize>>);

    impl Progress for WatchWriters<'_> {
        fn advance(&self, _: u64) {
            let n = crate::repo::writers::live_writers(self.0).unwrap().len();
            self.1.lock().unwrap().push(n);
        }
    }

    /// A backup is a registered writer from its plan to its snapshot, and only then; its
    /// packs are indexed and a second backup of the same content stores no data.
    #[test]
    fn a_backup_is_a_writer_until_its_snapshot_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("raw.img");
        random_file(&img, 3 << 20, 7);
        let repo = Repository::init(&dir.path().join("repo"), &InitOptions::default()).unwrap();
        let source = Source::open(&img).unwrap();
        let watch = WatchWriters(&repo, Mutex::new(Vec::new()));
        let first = backup(&repo, &source, &BackupOptions::default(), &watch).unwrap();
        let seen = watch.1.lock().unwrap().clone();
        assert!(!seen.is_empty() && seen.iter().all(|&n| n == 1), "{seen:?}");
        assert!(
            crate::repo::writers::live_writers(&repo)
                .unwrap()
                .is_empty()
        );
        assert_eq!(first.this_run.new_bytes, 3 << 20);
        assert!(first.packs_written >= 1);
        assert!(first.this_run.new_chunks >= 3, "frames of at most 1 MiB");
        // Every blob of the snapshot is in an index file (a fresh reader sees them).
        let store = crate::repo::blobs::BlobStore::open(&repo).unwrap();
        let snap = repo
            .open_snapshot(&first.snapshot_id)
            .unwrap()
            .with_blobs(store.clone());
        assert_eq!(snap.version(), crate::repo::format::SNAPSHOT_TREE_VERSION);
        snap.for_each_run(|_, r, _| {
            if let Some(b) = r.blob() {
                assert!(store.contains(&b));
            }
            Ok(())
        })
        .unwrap();
        let second = backup(&repo, &source, &BackupOptions::default(), &Silent).unwrap();
        assert_eq!(second.this_run.new_bytes, 0);
        assert_eq!(second.stats.unchanged_blocks, 768);
        assert!(
            crate::repo::writers::live_writers(&repo)
                .unwrap()
                .is_empty()
        );
    }

    /// `backup --dry-run`: a plan of a small ext4 image changes nothing and tells a full
    /// backup, an incremental one and a resumed one apart.
    #[test]
    fn plan_of_an_ext4_image_changes_nothing() {
        if std::process::Command::new("mkfs.ext4")
            .arg("-V")
            .output()
            .is_err()
        {
            eprintln!("mkfs.ext4 is not installed: skipped");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("e4.img");
        // Random bytes under the filesystem, so that every block read costs something and an
        // interrupted backup of every block is interrupted well before its end.
        random_file(&img, 96 << 20, 5);
        // Files whose blocks change tracking can vouch for (mkfs.ext4 -d copies them in).
        let content = dir.path().join("content");
        std::fs::create_dir(&content).unwrap();
        for i in 0..8 {
            random_file(&content.join(format!("f{i}")), 1 << 20, 10 + i);
        }
        // Change tracking trusts a file whose ctime lies more than 3 s before the superblock's
        // write time: mkfs writes it a minute "later" than the files were made.
        let later = crate::time::now_unix() + 60;
        let mkfs = std::process::Command::new("mkfs.ext4")
            .env("E2FSPROGS_FAKE_TIME", later.to_string())
            .args(["-q", "-F", "-E", "nodiscard", "-d"])
            .arg(&content)
            .arg(&img)
            .status()
            .unwrap();
        assert!(mkfs.success());
        let repo_dir = dir.path().join("repo");
        let repo = Repository::init(&repo_dir, &InitOptions::default()).unwrap();
        let source = Source::open(&img).unwrap();
        let image_before = tree(dir.path())
            .remove(Path::new("e4.img"))
            .expect("the image");
        let unchanged = |what: &str, before: &BTreeMap<_, _>| {
            assert_eq!(&tree(&repo_dir), before, "{what} changed the repository");
            assert_eq!(
                tree(dir.path()).remove(Path::new("e4.img")).as_ref(),
                Some(&image_before),
                "{what} changed the source"
            );
        };
        let opts = BackupOptions::default();

        let before = tree(&repo_dir);
        let p = plan(&repo, &source, &opts, &Silent).unwrap();
        unchanged("a plan of a full backup", &before);
        assert_eq!(p.parent, None);
        assert_eq!(p.resume, Resume::Fresh);
        assert!(matches!(p.tracking, Tracking::NotUsed { .. }));
        assert_eq!(p.filesystem.as_ref().unwrap().fs_type, "ext4");
        assert!(!p.all_blocks && p.used_blocks < p.block_count);
        assert_eq!(p.read_blocks, p.used_blocks);
        assert_eq!(p.read_blocks + p.unused_blocks, p.block_count);
        assert!(p.to_string().contains("full backup"), "{p}");

        let full = backup(&repo, &source, &opts, &Silent).unwrap();
        assert_eq!(full.parent, None);
        let before = tree(&repo_dir);
        let p = plan(&repo, &source, &opts, &Silent).unwrap();
        unchanged("a plan of an incremental backup", &before);
        assert_eq!(p.parent.as_deref(), Some(full.snapshot_id.as_str()));
        assert_eq!(p.resume, Resume::Fresh);
        match p.tracking {
            Tracking::Used {
                unchanged_blocks,
                damaged_blocks: 0,
            } => assert!(unchanged_blocks > 0),
            ref t => panic!("change tracking not used: {t:?}"),
        }
        assert!(p.read_blocks < p.used_blocks);
        assert!(p.to_string().contains("incremental"), "{p}");
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["parent"], full.snapshot_id.as_str());
        assert_eq!(json["resume"]["decision"], "fresh");
        assert_eq!(json["tracking"]["result"], "used");
        assert!(json.get("work").is_none());

        // An interrupted backup of every block: the plan continues it.
        let every = BackupOptions {
            all_blocks: true,
            threads: 1,
            checkpoint_interval: std::time::Duration::ZERO,
            ..Default::default()
        };
        interrupted_backup(&repo, &source, &every);
        let before = tree(&repo_dir);
        let p = plan(&repo, &source, &every, &Silent).unwrap();
        let from = match p.resume {
            Resume::Continue { from_block } => from_block,
            ref r => panic!("not resumed: {r:?}"),
        };
        assert!(from > 0 && from < p.block_count, "{from}");
        assert_eq!(p.read_blocks, p.block_count - from);
        assert!(p.to_string().contains(&format!("from block {from}")), "{p}");
        let restart = BackupOptions {
            restart: true,
            ..every.clone()
        };
        let p = plan(&repo, &source, &restart, &Silent).unwrap();
        assert!(
            matches!(p.resume, Resume::StartOver { .. }),
            "{:?}",
            p.resume
        );
        let p = plan(&repo, &source, &opts, &Silent).unwrap();
        match &p.resume {
            Resume::StartOver { reason } => assert!(reason.contains("of every block"), "{reason}"),
            r => panic!("resumed a backup of other settings: {r:?}"),
        }
        unchanged("plans of a resumed backup", &before);

        // The backup does what the plan said.
        let resumed = backup(&repo, &source, &every, &Silent).unwrap();
        assert!(resumed.resumed);
        assert_eq!(resumed.parent.as_deref(), Some(full.snapshot_id.as_str()));
    }
}
