//! Prune: delete what no snapshot needs (docs/GC.md).
//!
//! Format 2, in order:
//! 1. take `REPO/prune.lock` exclusively (try: a second prune fails with [`Error::Locked`]);
//! 2. finish the pending records of earlier prunes ([`sweep::finish_records`]);
//! 3. load the index files and mark the live blobs ([`mark`]);
//! 4. plan: fully dead packs are condemned, partly dead ones repacked ([`plan`]);
//! 5. repack ([`repack`]): new packs durable and indexed first;
//! 6. write the compacted index, then the pending record, then delete the old index files;
//! 7. delete the condemned packs once every running backup knows the record (else it is
//!    deferred to the next prune), rescuing any pack that holds a live blob found nowhere else;
//! 8. delete unindexed packs (crash leftovers) when no backup runs, and stale `.tmp-*` files.
//!
//! A dry run does 1, 3 and 4 and reports; it writes nothing.
//!
//! Format 1 (chunk files; no backup can write such a repository any more): chunk files named
//! by no snapshot and no journal are deleted, after checking that no older volback is backing
//! up into it (every `journals/*.lock` can be locked).
//!
//! Crash tests: the environment variable `VOLBACK_TEST_ABORT_AT=<point>` makes prune call
//! [`std::process::abort`] when it reaches `<point>`, one of:
//! `mark` (live set computed, nothing written), `repack-pack` (after each repacked pack's
//! blobs were queued, new packs possibly unindexed), `repack-index` (new packs durable and
//! indexed), `compact-index` (compacted index written, no record yet), `pending-written`
//! (record durable, old index files still there), `old-index-deleted` (old index files
//! deleted), `rescue` (after an index file rescued a condemned pack), `pack-deleted` (after
//! each condemned pack deletion), `pending-removed` (after a record was removed), `orphans`
//! (after each unindexed pack deletion); format 1: `mark`, and `pack-deleted` after each chunk
//! file deletion.

pub mod mark;
pub mod plan;
pub mod repack;
pub mod sweep;

use crate::error::{Error, Result};
use crate::hash::ChunkId;
use crate::progress::Progress;
use crate::repo::Repository;
use crate::repo::backend::LockGuard;
use crate::repo::blobs::BlobStore;
use crate::repo::fsio;
use crate::repo::writers;
use plan::{Plan, PlanLimits};
use serde::Serialize;
use std::collections::HashSet;
use std::time::Instant;

/// Options of a prune.
#[derive(Debug, Clone)]
pub struct PruneOptions {
    /// Report what would be deleted and repacked; write nothing.
    pub dry_run: bool,
    /// Dead bytes tolerated in partly used packs, as a percentage of all pack bytes.
    pub max_unused_percent: f64,
    /// Most bytes copied by repacking (`None`: no limit).
    pub max_repack: Option<u64>,
    /// Dry run only: snapshots (full ids) to treat as already forgotten, so that
    /// `forget --dry-run --prune` shows what the prune after the forget would free.
    pub assume_removed: Vec<String>,
}

impl Default for PruneOptions {
    fn default() -> Self {
        PruneOptions {
            dry_run: false,
            max_unused_percent: 5.0,
            max_repack: None,
            assume_removed: Vec::new(),
        }
    }
}

impl PruneOptions {
    fn limits(&self) -> PlanLimits {
        PlanLimits {
            max_unused_percent: self.max_unused_percent,
            max_repack: self.max_repack.unwrap_or(u64::MAX),
        }
    }
}

/// What a prune did (or, in a dry run, would do).
#[derive(Debug, Clone, Default, Serialize)]
pub struct PruneReport {
    /// Repository format (1: chunk files, 2: packs).
    pub format: u32,
    pub dry_run: bool,
    pub snapshots: usize,
    pub journals: usize,
    /// Pack files (format 1: chunk files) and their bytes before and after.
    pub packs_before: u64,
    pub packs_after: u64,
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// Indexed blobs (format 1: chunk files) in use and unused when marked.
    pub blobs_live: u64,
    pub blobs_dead: u64,
    /// Packs (format 1: chunk files) deleted, with their bytes: condemned now or by an earlier
    /// prune, repacked ones once deleted, and unindexed leftovers.
    pub packs_deleted: u64,
    pub bytes_deleted: u64,
    /// Packs whose live blobs were copied into new packs, and the bytes written for them.
    pub packs_repacked: u64,
    pub bytes_repacked: u64,
    /// Condemned packs kept because a live blob was found in them and nowhere else.
    pub packs_rescued: u64,
    /// Unindexed packs (crash leftovers) among `packs_deleted`.
    pub orphans_deleted: u64,
    pub temp_files_removed: u64,
    /// Pending records waiting for running backups (their packs are deleted by a later prune).
    pub deferred: Vec<String>,
    /// Packs whose deletion is deferred.
    pub packs_deferred: u64,
    /// Dry run: bytes the plan would free.
    pub bytes_reclaimable: u64,
    pub duration_secs: f64,
}

/// The crash-test hook (module doc): aborts the process at the point named by
/// `VOLBACK_TEST_ABORT_AT`.
#[derive(Debug, Default)]
pub struct AbortPoint(Option<String>);

impl AbortPoint {
    /// Reads `VOLBACK_TEST_ABORT_AT`.
    pub fn from_env() -> Self {
        AbortPoint(std::env::var("VOLBACK_TEST_ABORT_AT").ok())
    }

    /// Aborts the process when `point` is the one asked for.
    pub fn at(&self, point: &str) {
        if self.0.as_deref() == Some(point) {
            std::process::abort();
        }
    }
}

/// Takes `REPO/prune.lock` exclusively, without waiting.
pub fn lock_prune(repo: &Repository) -> Result<Box<dyn LockGuard>> {
    repo.backend()
        .lock_exclusive("prune", "another prune is running")
}

/// Prunes `repo`.
pub fn prune(
    repo: &Repository,
    opts: &PruneOptions,
    progress: &dyn Progress,
) -> Result<PruneReport> {
    let started = Instant::now();
    let _lock = match lock_prune(repo) {
        Ok(l) => Some(l),
        // A dry run writes nothing: it also works where the lock file cannot be created.
        Err(Error::Io { source, .. })
            if opts.dry_run
                && matches!(
                    source.kind(),
                    std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
                ) =>
        {
            None
        }
        Err(e) => return Err(e),
    };
    let abort = AbortPoint::from_env();
    // On object storage the prune lock is a lease: checked before each step that deletes
    // or condemns, so a prune that could not renew it stops before another may start.
    let fence = || match &_lock {
        Some(l) => l.check(),
        None => Ok(()),
    };
    let mut report = match repo.format_version() {
        1 => prune_v1(repo, opts, progress, &abort)?,
        _ => prune_v2(repo, opts, progress, &abort, &fence)?,
    };
    report.dry_run = opts.dry_run;
    report.duration_secs = started.elapsed().as_secs_f64();
    Ok(report)
}

/// The live set of `repo` now, trees read through a fresh reader's store (index files and
/// pending packs as they are now).
fn remark(repo: &Repository, progress: &dyn Progress) -> Result<HashSet<ChunkId>> {
    let store = BlobStore::open(repo)?;
    Ok(mark::mark(repo, &*store, progress)?.ids)
}

fn prune_v2(
    repo: &Repository,
    opts: &PruneOptions,
    progress: &dyn Progress,
    abort: &AbortPoint,
    fence: &dyn Fn() -> Result<()>,
) -> Result<PruneReport> {
    let mut report = PruneReport {
        format: 2,
        ..PruneReport::default()
    };
    let (before, _) = sweep::list_pack_files(repo, None)?;
    report.packs_before = before.len() as u64;
    report.bytes_before = before.iter().map(|p| p.1).sum();

    // 2. Records of earlier prunes.
    let pending = writers::read_pending(repo)?;
    if !opts.dry_run {
        fence()?;
        let done = sweep::finish_records(repo, &pending, &mut || remark(repo, progress), abort)?;
        add_sweep(&mut report, &done);
    }
    let pending = writers::read_pending(repo)?;
    let pending_packs: HashSet<ChunkId> = pending.iter().flat_map(|r| r.packs.clone()).collect();

    // 3. Index and live set.
    let mut index = sweep::load_index(repo)?;
    index.tables.retain(|p, _| !pending_packs.contains(p));
    let store = BlobStore::open(repo)?;
    let skip: HashSet<String> = match opts.dry_run {
        true => opts.assume_removed.iter().cloned().collect(),
        false => HashSet::new(),
    };
    let live = mark::mark_except(repo, &*store, progress, &skip)?;
    drop(store);
    report.snapshots = live.snapshots;
    report.journals = live.journals;
    abort.at("mark");

    // Packs the index names but that are gone (lost, or set aside by verify): never planned
    // or read. Dropped from the index when every live blob they held is in another pack (a
    // backup stored it again); kept in it otherwise, so that what was lost stays named.
    // The listing of step 1 rather than a look at each pack (on object storage, a request
    // per pack): step 2 deletes only condemned packs, which the index no longer names.
    let present: HashSet<ChunkId> = before.iter().map(|p| p.0).collect();
    let missing: Vec<ChunkId> = index
        .tables
        .keys()
        .filter(|p| !present.contains(*p))
        .copied()
        .collect();
    let mut kept_missing: Vec<(ChunkId, Vec<crate::repo::blob::BlobEntry>)> = Vec::new();
    let mut gone = 0usize;
    if !missing.is_empty() {
        let mut tables: Vec<(ChunkId, Vec<crate::repo::blob::BlobEntry>)> = missing
            .iter()
            .filter_map(|p| index.tables.remove_entry(p))
            .collect();
        let elsewhere: HashSet<ChunkId> = index
            .tables
            .values()
            .flat_map(|t| t.iter().map(|e| e.id))
            .collect();
        for (p, t) in tables.drain(..) {
            if t.iter()
                .any(|e| live.ids.contains(&e.id) && !elsewhere.contains(&e.id))
            {
                kept_missing.push((p, t));
            } else {
                gone += 1;
            }
        }
    }

    // 4. Plan.
    let plan = plan::plan(
        index.tables.iter().map(|(p, e)| (p, &e[..])),
        &live.ids,
        &opts.limits(),
        repo.sealer().overhead() as u64,
    );
    report.blobs_live = plan.live_blobs;
    report.blobs_dead = plan.dead_blobs;
    if opts.dry_run {
        // As a real run counts them: repacked packs are deleted too.
        let repacked: HashSet<&ChunkId> = plan.repack.iter().collect();
        report.packs_deleted = (plan.condemn.len() + plan.repack.len()) as u64;
        report.bytes_deleted = plan.condemned_bytes
            + plan
                .usage
                .iter()
                .filter(|u| repacked.contains(&u.pack))
                .map(|u| u.size)
                .sum::<u64>();
        report.packs_repacked = plan.repack.len() as u64;
        report.bytes_repacked = plan.repack_live_bytes;
        report.bytes_reclaimable = plan.reclaimed_bytes();
        report.packs_deferred = pending_packs.len() as u64;
        report.deferred = pending.iter().map(|r| r.id.clone()).collect();
        // Repacked packs are replaced by about as many new ones as their live bytes fill.
        let new_packs = plan
            .repack_live_bytes
            .div_ceil(u64::from(repo.config().pack_size).max(1));
        report.packs_after = (report.packs_before + new_packs).saturating_sub(report.packs_deleted);
        report.bytes_after = report.bytes_before.saturating_sub(plan.reclaimed_bytes());
        return Ok(report);
    }

    // 5. Repack.
    let mut condemned: Vec<ChunkId> = plan.condemn.clone();
    if !plan.repack.is_empty() {
        let mut wanted = wanted_blobs(&index, &plan, &live.ids);
        let r = repack::repack(
            repo,
            &index.tables,
            &plan.repack,
            &mut wanted,
            progress,
            abort,
        )?;
        report.packs_repacked = r.done.len() as u64;
        report.bytes_repacked = r.bytes_written;
        condemned.extend(r.done);
    }

    // 6. Compacted index, record, old index files.
    let condemned_set: HashSet<ChunkId> = condemned.iter().copied().collect();
    let compact = !condemned.is_empty() || index.files.len() > 1 || gone > 0;
    index.tables.extend(kept_missing);
    if compact {
        let written = sweep::write_compacted(repo, &index.tables, &condemned_set)?;
        abort.at("compact-index");
        // A compacted file identical to an old one has its name: it stays.
        let old: Vec<String> = index
            .files
            .iter()
            .filter(|f| !written.contains(f))
            .cloned()
            .collect();
        fence()?;
        let id = writers::write_pending(repo, &condemned, &old)?;
        abort.at("pending-written");
        sweep::delete_index_files(repo, &old)?;
        abort.at("old-index-deleted");
        // 7. This record, now or by a later prune.
        let rec = writers::read_pending(repo)?
            .into_iter()
            .filter(|r| r.id == id)
            .collect::<Vec<_>>();
        fence()?;
        let done = sweep::finish_records(repo, &rec, &mut || remark(repo, progress), abort)?;
        add_sweep(&mut report, &done);
    }

    // 8. Leftovers of crashed writers.
    fence()?;
    let o = sweep::remove_orphans(repo, abort)?;
    report.packs_deleted += o.packs_deleted;
    report.bytes_deleted += o.bytes_deleted;
    report.orphans_deleted = o.packs_deleted;
    report.temp_files_removed = o.temp_files_removed;

    let rest = writers::read_pending(repo)?;
    report.deferred = rest.iter().map(|r| r.id.clone()).collect();
    report.packs_deferred = rest.iter().map(|r| r.packs.len() as u64).sum();
    let (after, _) = sweep::list_pack_files(repo, None)?;
    report.packs_after = after.len() as u64;
    report.bytes_after = after.iter().map(|p| p.1).sum();
    Ok(report)
}

/// Live blobs of the packs to repack that no pack staying holds: what the repack copies.
fn wanted_blobs(
    index: &sweep::IndexState,
    plan: &Plan,
    live: &HashSet<ChunkId>,
) -> HashSet<ChunkId> {
    let going: HashSet<&ChunkId> = plan.repack.iter().chain(&plan.condemn).collect();
    let mut wanted: HashSet<ChunkId> = plan
        .repack
        .iter()
        .filter_map(|p| index.tables.get(p))
        .flatten()
        .map(|e| e.id)
        .filter(|id| live.contains(id))
        .collect();
    for (p, entries) in &index.tables {
        if going.contains(p) {
            continue;
        }
        for e in entries {
            wanted.remove(&e.id);
        }
    }
    wanted
}

fn add_sweep(report: &mut PruneReport, s: &sweep::SweepOutcome) {
    report.packs_deleted += s.packs_deleted;
    report.bytes_deleted += s.bytes_deleted;
    report.packs_rescued += s.packs_rescued;
}

/// Format 1: deletes the chunk files no snapshot and no journal names.
fn prune_v1(
    repo: &Repository,
    opts: &PruneOptions,
    progress: &dyn Progress,
    abort: &AbortPoint,
) -> Result<PruneReport> {
    let mut report = PruneReport {
        format: 1,
        ..PruneReport::default()
    };
    // An older volback may still back up into this repository: it holds its volume's lock.
    let mut _locks = Vec::new();
    for name in mark::journal_paths(repo)? {
        let lock = repo.root().join(name).with_extension("lock");
        let Ok(f) = fsio::open_regular(&lock, false, "open") else {
            continue;
        };
        if f.try_lock().is_err() {
            return Err(Error::Locked {
                path: repo.root().to_path_buf(),
                detail: format!("{} is held: a backup is running", lock.display()),
            });
        }
        _locks.push(f);
    }
    let skip: HashSet<String> = match opts.dry_run {
        true => opts.assume_removed.iter().cloned().collect(),
        false => HashSet::new(),
    };
    let live = mark::mark_except(repo, &mark::NoBlobs("prune"), progress, &skip)?;
    report.snapshots = live.snapshots;
    report.journals = live.journals;
    abort.at("mark");
    let store = repo.chunks();
    let started = std::time::SystemTime::now();
    let before = (!opts.dry_run).then_some(started);
    let (files, temps) = sweep::list_id_files(store.dir(), before)?;
    report.temp_files_removed += temps as u64;
    for (id, len) in files {
        report.packs_before += 1;
        report.bytes_before += len;
        if live.ids.contains(&id) {
            report.blobs_live += 1;
            continue;
        }
        report.blobs_dead += 1;
        report.packs_deleted += 1;
        report.bytes_deleted += len;
        if !opts.dry_run {
            sweep::remove_if_present(&store.path(&id))?;
            abort.at("pack-deleted");
        }
    }
    report.packs_after = report.packs_before - report.packs_deleted;
    report.bytes_after = report.bytes_before - report.bytes_deleted;
    report.bytes_reclaimable = report.bytes_deleted;
    Ok(report)
}

#[cfg(test)]
pub(crate) mod tests;
