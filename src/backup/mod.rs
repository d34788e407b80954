//! Backup: read a volume, store what changed, commit a synthetic-full snapshot.
//!
//! A backup is three steps, one file each:
//!
//! - **plan** (`plan.rs`, [`plan`] → [`BackupPlan`]): repository format check (format 1 is
//!   read-only), mount check, volume lock, writer registration (`writers/` marker, so that a
//!   concurrent prune keeps every pack this backup may name), source probe (filesystem,
//!   allocation map, [`volume_key`]), whether to continue an interrupted backup, the parent
//!   snapshot, change tracking. It writes nothing: `backup --dry-run` prints it.
//! - **stage** (`stage.rs`): what the shared scan pipeline's workers ([`crate::scan`]: I/O
//!   loop, dispatcher, workers on every core, results back in block order) do to each run of
//!   blocks read in one request (up to 16 MiB): detect zeros, cut the other blocks into blobs
//!   by content ([`chunker`]), hash each blob, refer to it again when the writer's index holds
//!   it (the parent's, another snapshot's, a concurrent backup's), else compress the run's new
//!   blobs into frames of up to 1 MiB and append them to packs
//!   ([`crate::repo::packer::Packer`]). A blob whose pack a prune condemned is not in the
//!   writer's index: it is stored again.
//! - **commit** (`commit.rs`): results back in block order are appended to the snapshot's
//!   tree ([`crate::repo::tree::TreeWriter`], whose nodes are blobs too), and every few seconds
//!   checkpointed: packs durable and indexed, then a durable journal batch. A later run of the
//!   same volume replays the journal and continues where it stopped. At the end the tree is
//!   finished, packed and indexed, the snapshot (version 3) is written and the journal removed.
//!
//! [`backup`] is [`plan`] (taking the volume lock) followed by the stage and the commit.

pub mod chunker;
mod commit;
mod plan;
#[cfg(test)]
mod sealed_tests;
mod stage;

pub use plan::{BackupPlan, Resume, Tracking, plan};

/// Moved to [`crate::job`], shared with copies; re-exported for existing callers.
use crate::error::Result;
use crate::fs::FsInfo;
use crate::fs::disk::DiskLayout;
use crate::job::worker_threads;
use crate::progress::Progress;
use crate::repo::Repository;
use crate::repo::journal::BatchStats;
use crate::repo::packer::Packer;
use crate::repo::snapshot::SnapshotStats;
use crate::scan::{self, Scan};
use crate::source::Source;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
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
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackupReport {
    pub snapshot_id: String,
    pub parent: Option<String>,
    /// True when this run continued an interrupted backup.
    pub resumed: bool,
    /// Statistics of the whole snapshot (all runs).
    pub stats: SnapshotStats,
    /// Statistics of this run alone (`new_chunks`: frames written).
    pub this_run: BatchStats,
    /// Pack files this run wrote (data and tree blobs).
    pub packs_written: u64,
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

/// Backs up `source` into `repo`. Full the first time; incremental against the latest
/// snapshot of the same volume afterwards; resumes an interrupted backup of it.
pub fn backup(
    repo: &Repository,
    source: &Source,
    opts: &BackupOptions,
    progress: &dyn Progress,
) -> Result<BackupReport> {
    let started = Instant::now();
    let plan = plan::prepare(repo, source, opts, progress, plan::Locking::Take)?;
    run(repo, source, opts, plan, started, progress)
}

/// Runs a plan that holds the volume lock: stage and commit.
fn run(
    repo: &Repository,
    source: &Source,
    opts: &BackupOptions,
    mut plan: BackupPlan,
    started: Instant,
    progress: &dyn Progress,
) -> Result<BackupReport> {
    // Unreadable ranges: those of the journal's batches, then this run's.
    let mut replayed = Vec::new();
    let journal_path = std::mem::take(&mut plan.work.journal_path);
    let fresh = plan.journal_header(&opts.tags);
    let store =
        plan.work.store.clone().ok_or_else(|| {
            crate::error::Error::internal("backup", "a plan without a blob store")
        })?;
    let packer = Packer::new(repo, store.clone())?;
    // On object storage the writer marker and the volume lock are leases: the backup stops
    // before relying on one it could not renew in time.
    let mut fence = crate::repo::backend::Fence::default();
    if let Some(w) = &plan.work.writer {
        fence.add(w.fence_check());
    }
    if let Some(l) = &plan.work.lock {
        let l = l.clone();
        fence.add(std::sync::Arc::new(move || l.check()));
    }
    packer.set_fence(fence);
    let mut draft = commit::Draft::open(&packer, &plan, &journal_path, || fresh, &mut replayed)?;
    let start_block = draft.start_block();
    let bs = u64::from(plan.block_size);
    let size = plan.source.size;
    let unreadable = Mutex::new(replayed);
    let cancel = opts.cancel.as_deref();
    let scan = Scan {
        source,
        block_size: bs,
        start_block,
        map: plan.work.map.as_ref(),
        known: plan.work.known.as_ref(),
        threads: worker_threads(opts.threads),
        cancel,
        rescue: Some(&unreadable),
    };
    let blobs = stage::RepoBlobs {
        store: &store,
        packer: &packer,
    };
    let stage = stage::BackupStage::new(
        source,
        bs,
        plan.work.parent.as_ref(),
        &blobs,
        repo.sealer(),
        repo.config().zstd_level,
    );
    progress.start("backup", size - (start_block * bs).min(size));
    let committer = commit::Committer {
        packer: &packer,
        draft: &mut draft,
        unreadable: &unreadable,
        checkpoint_interval: opts.checkpoint_interval,
        block_size: bs,
        size,
        cancel,
    };
    let this_run = scan::run(&scan, &stage, progress, |done| {
        committer.commit(done, progress)
    });
    progress.finish();
    let (this_run, unread_blocks) = this_run?;
    // Healing is not silent: other snapshots may name the lost blobs too.
    let lost = store.unusable_count();
    if lost > 0 {
        progress.warn(&format!(
            "{lost} stored blob(s) this backup would have reused were missing or damaged \
             (their pack is missing or was set aside); their blocks were stored again, which \
             also repairs older snapshots that name the same content. Run `volback verify \
             --read-data` on the repository (docs/REPAIR.md)"
        ));
    }
    let unreadable = unreadable.into_inner().unwrap_or_else(|p| p.into_inner());
    let done = draft.finish(repo, &packer, &plan, &this_run, unreadable, started)?;
    // The snapshot is committed: the next backup of the volume may start, and prune may
    // delete what this writer did not know to be condemned.
    drop(plan.work.lock.take());
    drop(plan.work.writer.take());
    Ok(BackupReport {
        snapshot_id: done.snapshot_id,
        parent: done.parent,
        resumed: done.resumed,
        stats: done.stats,
        this_run,
        packs_written: packer.packs_written(),
        filesystem: plan.filesystem,
        layout: plan.layout,
        all_blocks: plan.all_blocks,
        unreadable: done.unreadable,
        unread_blocks,
        tracking_note: plan.work.tracking_note,
    })
}
