//! Copies: a volume as plain files that standard tools open (a sparse raw image, sliced
//! `<start>.<length>.copydata.bin` files, VHD, VHDX, qcow2), plus a metadata file with the
//! volume description and one SHA-256 per block. The format is in docs/FORMAT.md, "Copies".
//!
//! ```text
//! DEST                          raw image (or DEST.000, DEST.001, … with --slice-size)
//! DEST.volback-copy.json        metadata: volume, block size, data files, state
//! DEST.volback-copy.sha256      hash list: one SHA-256 per block (binary, streamed)
//! DEST.volback-copy.journal     only while a copy or update is unfinished
//!
//! DEST/                         BIN copy: a directory
//!   0.1073741824.copydata.bin   slices named by volume byte offset and length
//!   volback-copy.json, volback-copy.sha256, volback-copy.journal
//! ```
//!
//! - [`copy`] reads a source like `backup` does (the shared [`crate::scan`] pipeline: the
//!   allocation map, holes skipped, `O_DIRECT` staged reads, hashing on every core) and writes
//!   only its non-zero used blocks; the rest stays holes (or unallocated image blocks).
//! - [`update`] ("copy --update") hashes every block of the source again and rewrites only the
//!   blocks whose SHA-256 differs from the recorded one; blocks that became zero or unused are
//!   zeroed (holes punched). A new copy is the same run against an empty copy.
//! - [`export`] writes a copy from a repository snapshot.
//! - [`open`] gives a complete copy as a [`Volume`] that checks every block against its
//!   SHA-256 as it reads it (restore, mount, serve); [`verify`] checks a whole copy.
//!
//! Crash safety: the metadata says `updating` (durably) before the first data write, and
//! readers refuse such a copy. The run journals its progress every few seconds (the blocks
//! finished, their new hashes, and a horizon past which nothing is modified before the next
//! record), so `copy --update` continues an interrupted run instead of starting over. At the
//! end the new hash list and then the metadata (`complete`) are written atomically (temporary
//! file, fsync, rename, directory fsync) and the journal is removed.

mod check;
mod engine;
pub mod files;
pub mod format;
pub mod hashes;
pub mod journal;
mod locate;
pub mod meta;
mod reader;

pub use check::{BadBlock, MAX_REPORTED, VerifyCopyOptions, VerifyCopyReport, verify};
pub use locate::{CopyInfo, existing_format};
pub use meta::{CopyFormat, CopyMeta, CopyPaths, CopyState, CopyStats};
pub use reader::CopyVolume;

use engine::{Run, RunSettings};
use files::FileSet;
use format::*;
use hashes::{HashList, HashListHeader};
use journal::{Journal, JournalHeader, Replay};
use meta::{SnapshotOrigin, UpdateBase, UpdateRef, bad_copy};

use crate::error::{Error, IoContext, Result};
use crate::fs::disk::DiskLayout;
use crate::fs::{BlockMap, FsInfo};
use crate::image::ImageWriter;
use crate::progress::Progress;
use crate::repo::Repository;
use crate::scan::ScanSource;
use crate::source::{Source, SourceInfo};
use crate::source_state::{Expected, SampleCheck, SourceState};
use crate::volume::Volume;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

/// Options of `copy`, `copy --update` and `export`.
#[derive(Debug, Clone)]
pub struct CopyOptions {
    /// Format of a new copy (an update keeps the copy's format).
    pub format: CopyFormat,
    /// Block size of a new copy (default: 256 KiB, or the snapshot's for an export).
    pub block_size: Option<u32>,
    /// Split raw and BIN copies into files of this many bytes (a multiple of the block size).
    pub slice_size: Option<u64>,
    /// Copy every block, also those the filesystem does not use.
    pub all_blocks: bool,
    /// Read a source that is mounted read-write.
    pub allow_mounted: bool,
    /// Read and hash every used block, also those change tracking knows to be unchanged
    /// since the copy was last written.
    pub rehash: bool,
    /// Worker threads; 0 means one per core.
    pub threads: usize,
    /// How often progress is made durable for resuming.
    pub checkpoint_interval: Duration,
    pub cancel: Option<Arc<AtomicBool>>,
}

impl Default for CopyOptions {
    fn default() -> Self {
        CopyOptions {
            format: CopyFormat::Raw,
            block_size: None,
            slice_size: None,
            all_blocks: false,
            allow_mounted: false,
            rehash: false,
            threads: 0,
            checkpoint_interval: Duration::from_secs(5),
            cancel: None,
        }
    }
}

/// What a copy, update or export did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CopyReport {
    /// The copy (the path users pass to restore, verify, mount).
    #[serde(rename = "copy")]
    pub dest: PathBuf,
    /// Its metadata file.
    pub metadata: PathBuf,
    pub format: CopyFormat,
    /// Data files, in volume order.
    pub files: Vec<PathBuf>,
    pub size: u64,
    pub block_size: u32,
    pub block_count: u64,
    pub filesystem: Option<FsInfo>,
    pub all_blocks: bool,
    /// True when the copy existed before (an update).
    pub update: bool,
    /// True when this run continued an interrupted one.
    pub resumed: bool,
    /// Statistics of this run.
    #[serde(flatten)]
    pub this_run: CopyStats,
    /// Statistics of the whole copy or update (all runs of a resumed one).
    pub stats: CopyStats,
    /// Blocks change tracking found unchanged since the copy was last written: kept without
    /// being read (this run).
    pub unread_blocks: u64,
    pub duration_secs: f64,
}

/// Finds the copy that `path` names (a BIN directory, a single-file copy's data file, or a
/// metadata file); `None` when there is none.
pub fn locate(path: &Path) -> Option<CopyPaths> {
    CopyPaths::locate(path)
}

/// The volume description a new copy records.
struct Described {
    source: SourceInfo,
    filesystem: Option<FsInfo>,
    layout: Option<DiskLayout>,
    all_blocks: bool,
    snapshot: Option<SnapshotOrigin>,
    /// See [`CopyMeta::consistent`].
    consistent: Option<bool>,
}

impl CopyPaths {
    /// The path that names this copy for users: the BIN directory, or the (first) data file's
    /// base name.
    pub fn dest(&self) -> PathBuf {
        match self.base.strip_suffix(BASE_SUFFIX) {
            Some(name) if self.dir == Path::new(".") => PathBuf::from(name),
            Some(name) => self.dir.join(name),
            None => self.dir.clone(),
        }
    }
}

fn threads(requested: usize) -> usize {
    crate::job::worker_threads(requested)
}

fn now() -> String {
    crate::time::rfc3339(crate::time::now_unix())
}

fn hash_header(meta: &CopyMeta) -> HashListHeader {
    HashListHeader {
        size: meta.size,
        block_size: meta.block_size,
        block_count: meta.block_count,
    }
}

/// Takes the copy's lock (on its first data file): exclusive for writers, shared for readers.
fn lock(paths: &CopyPaths, meta: &CopyMeta, exclusive: bool) -> Result<File> {
    let path = paths.file(&meta.files[0].name);
    let f = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(bad_copy(
                &paths.meta(),
                format!("data file {} is missing", path.display()),
            ));
        }
        Err(e) => return Err(Error::io("open", &path, e)),
    };
    let r = if exclusive {
        f.try_lock()
    } else {
        f.try_lock_shared()
    };
    match r {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::CopyInUse { path: paths.dest() }),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::io("lock", &path, e)),
    }
}

/// Takes the writer's lock of an existing copy. `None` when the data files of an interrupted
/// new copy were never created (they are created, then locked, when it starts over).
fn lock_for_update(paths: &CopyPaths, meta: &CopyMeta) -> Result<Option<File>> {
    match lock(paths, meta, true) {
        Ok(f) => Ok(Some(f)),
        Err(Error::BadCopy { .. })
            if meta.state == CopyState::Updating
                && meta
                    .update
                    .as_ref()
                    .is_some_and(|u| u.base == UpdateBase::Zeros) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Refuses to write a copy whose data files include the source itself.
fn refuse_source_as_data(source: &Source, paths: &CopyPaths, meta: &CopyMeta) -> Result<()> {
    let Ok(src_id) = crate::platform::object_id(source.file()) else {
        return Ok(());
    };
    for f in &meta.files {
        let path = paths.file(&f.name);
        if let Ok(file) = File::open(&path)
            && crate::platform::object_id(&file).ok() == Some(src_id)
        {
            return Err(Error::InvalidArgument(format!(
                "{} is the source being read; a copy is never written onto its source",
                path.display()
            )));
        }
    }
    Ok(())
}

/// Creates the data files of a copy in state `Updating` (empty: every block reads as zeros).
fn create_data(paths: &CopyPaths, meta: &CopyMeta) -> Result<Box<dyn ImageWriter>> {
    match meta.container.image() {
        None => Ok(Box::new(FileSet::create(paths, &meta.files)?)),
        Some(format) => {
            let path = paths.file(&meta.files[0].name);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("remove", &path, e)),
            }
            let w = crate::image::create(
                format,
                &path,
                meta.size,
                &crate::image::CreateOptions::default(),
            )?;
            crate::platform::sync_dir(&paths.dir).ctx("flush directory", &paths.dir)?;
            Ok(w)
        }
    }
}

/// Opens the data files of an existing copy for writing.
fn open_data_for_update(paths: &CopyPaths, meta: &CopyMeta) -> Result<Box<dyn ImageWriter>> {
    match meta.container.image() {
        None => Ok(Box::new(FileSet::open(paths, &meta.files, true)?)),
        Some(format) => {
            let path = reader::image_path(paths, meta)?;
            crate::image::open_for_update(format, &path, meta.size)
        }
    }
}

/// Opens the hash list the data files held before an update, checking its checksum.
fn open_base(paths: &CopyPaths, meta: &CopyMeta) -> Result<HashList> {
    let h = meta
        .hashes
        .as_ref()
        .ok_or_else(|| bad_copy(&paths.meta(), "no hash list"))?;
    let list = HashList::open(&paths.file(&h.name), hash_header(meta))?;
    if !list.checksum()?.eq_ignore_ascii_case(&h.sha256) {
        return Err(bad_copy(
            &paths.meta(),
            format!(
                "hash list {} does not match its checksum in the metadata (damaged)",
                list.path().display()
            ),
        ));
    }
    Ok(list)
}

/// Checks that nothing is in the way of a new copy at `dest`.
fn check_new_dest(
    dest: &Path,
    paths: &CopyPaths,
    format: CopyFormat,
    files: &[meta::DataFile],
) -> Result<()> {
    if let Some(existing) =
        CopyPaths::locate(dest).or_else(|| paths.meta().is_file().then(|| paths.clone()))
    {
        return Err(match CopyMeta::load(&existing) {
            Ok(m) if m.state == CopyState::Updating => Error::IncompleteCopy {
                path: existing.dest(),
            },
            _ => Error::InvalidArgument(format!(
                "{} is already a copy; pass --update to update it in place",
                dest.display()
            )),
        });
    }
    if format == CopyFormat::Bin {
        if dest.exists() {
            let empty =
                dest.is_dir() && std::fs::read_dir(dest).ctx("list", dest)?.next().is_none();
            if !empty {
                return Err(Error::InvalidArgument(format!(
                    "{} exists and is not an empty directory",
                    dest.display()
                )));
            }
        }
        return Ok(());
    }
    for f in files {
        let p = paths.file(&f.name);
        if p.exists() {
            return Err(Error::InvalidArgument(format!(
                "{} exists; remove it first or choose another destination",
                p.display()
            )));
        }
    }
    Ok(())
}

/// Starts a new copy at `dest` from `source` and runs it to the end.
#[allow(clippy::too_many_arguments)]
fn start_new<S: ScanSource + ?Sized>(
    source: &S,
    map: Option<&BlockMap>,
    state: Option<&SourceState>,
    described: Described,
    dest: &Path,
    block_size: u32,
    opts: &CopyOptions,
    progress: &dyn Progress,
) -> Result<CopyReport> {
    let started = Instant::now();
    crate::repo::check_block_size(block_size)?;
    let size = source.size();
    let format = opts.format;
    if let Some(s) = opts.slice_size
        && (s == 0 || !s.is_multiple_of(block_size as u64))
    {
        return Err(Error::InvalidArgument(format!(
            "the slice size ({s}) must be a non-zero multiple of the block size ({block_size})"
        )));
    }
    let paths = CopyPaths::for_dest(dest, format)?;
    let dest_name = dest
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::InvalidArgument(format!("{} has no file name", dest.display())))?;
    let files = files::layout(format, dest_name, size, opts.slice_size)?;
    check_new_dest(dest, &paths, format, &files)?;
    if format == CopyFormat::Bin && !dest.exists() {
        std::fs::create_dir(dest).ctx("create directory", dest)?;
        if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
            crate::platform::sync_dir(parent).ctx("flush directory", parent)?;
        }
    }
    let id = crate::repo::fsio::random_hex(16);
    let time = now();
    let meta = CopyMeta {
        format: META_FORMAT.into(),
        version: META_VERSION_V1,
        state: CopyState::Updating,
        container: format,
        size,
        block_size,
        block_count: size.div_ceil(block_size as u64),
        source: described.source,
        filesystem: described.filesystem,
        layout: described.layout,
        all_blocks: described.all_blocks,
        snapshot: described.snapshot,
        files,
        hashes: None,
        update: Some(UpdateRef {
            journal: paths.journal_name(),
            id,
            base: UpdateBase::Zeros,
        }),
        created: time.clone(),
        updated: time,
        stats: None,
        consistent: described.consistent,
    };
    // Metadata first: from here on the destination is a copy in state `updating`.
    meta.store(&paths)?;
    run_fresh(
        &paths, meta, None, source, map, state, opts, false, started, progress,
    )
}

/// Creates the data files and the journal of a copy in state `Updating` with base zeros, and
/// runs it from block 0.
#[allow(clippy::too_many_arguments)]
fn run_fresh<S: ScanSource + ?Sized>(
    paths: &CopyPaths,
    meta: CopyMeta,
    lock_held: Option<File>,
    source: &S,
    map: Option<&BlockMap>,
    state: Option<&SourceState>,
    opts: &CopyOptions,
    update: bool,
    started: Instant,
    progress: &dyn Progress,
) -> Result<CopyReport> {
    let u = meta
        .update
        .clone()
        .ok_or_else(|| bad_copy(&paths.meta(), "no update in progress"))?;
    let writer = create_data(paths, &meta)?;
    let _lock = match lock_held {
        Some(l) => l,
        None => lock(paths, &meta, true)?,
    };
    let journal = Journal::create(
        &paths.file(&u.journal),
        &journal_header(&meta, &u, None, state),
    )?;
    let run = new_run(paths, meta, source, map, writer, journal, opts);
    finish_report(paths, run.execute(progress)?, update, false, started)
}

fn journal_header(
    meta: &CopyMeta,
    u: &UpdateRef,
    base_sha256: Option<String>,
    state: Option<&SourceState>,
) -> JournalHeader {
    JournalHeader {
        id: u.id.clone(),
        base: u.base,
        base_sha256,
        size: meta.size,
        block_size: meta.block_size,
        block_count: meta.block_count,
        source_state: state.cloned(),
    }
}

/// Why the interrupted run of `journal` (header `h`) must not be continued from `source`,
/// now in state `now` (`None`: a snapshot, which cannot change): its recorded source state
/// differs, or a sample of the blocks it finished no longer holds what it wrote.
fn resume_refusal<S: ScanSource + ?Sized>(
    journal: &Journal,
    h: &JournalHeader,
    source: &S,
    now: Option<&SourceState>,
) -> Result<Option<String>> {
    let Some(now) = now else {
        return Ok(None);
    };
    if let Some(why) = crate::source_state::resume_refusal(h.source_state.as_ref(), now) {
        return Ok(Some(why));
    }
    let zeros = engine::ZeroHashes::new(h.size, h.block_size as u64);
    let mut sample = SampleCheck::new();
    let mut b = 0u64;
    journal.for_each_record(h.block_count, |r| {
        for hash in r.hashes.chunks_exact(HASH_LEN) {
            // Zero hashes are also those of unused blocks (zeroed, whatever the source held).
            if hash != zeros.of(b).as_slice()
                && let Ok(hash) = <[u8; 32]>::try_from(hash)
            {
                sample.offer(b, Expected::Hash(hash));
            }
            b += 1;
        }
        Ok(())
    })?;
    Ok(sample
        .first_mismatch(source, h.block_size as u64, hashes::sha256)
        .map(|b| {
            format!(
                "the source changed since it started (block {b}, finished before the \
                 interruption, holds other data now)"
            )
        }))
}

/// A run from the start (no replay) onto data files that held zeros (no base), with nothing
/// known unchanged; callers that resume or have a base set those fields.
fn new_run<'a, S: ?Sized>(
    paths: &'a CopyPaths,
    meta: CopyMeta,
    source: &'a S,
    map: Option<&'a BlockMap>,
    writer: Box<dyn ImageWriter>,
    journal: Journal,
    opts: &'a CopyOptions,
) -> Run<'a, S> {
    Run {
        paths,
        meta,
        source,
        map,
        known: None,
        writer,
        journal,
        replay: Replay::default(),
        base: None,
        settings: settings(opts),
    }
}

fn settings(opts: &CopyOptions) -> RunSettings<'_> {
    RunSettings {
        threads: threads(opts.threads),
        checkpoint_interval: opts.checkpoint_interval,
        cancel: opts.cancel.as_deref(),
    }
}

fn finish_report(
    paths: &CopyPaths,
    r: engine::RunResult,
    update: bool,
    resumed: bool,
    started: Instant,
) -> Result<CopyReport> {
    let m = &r.meta;
    Ok(CopyReport {
        dest: paths.dest(),
        metadata: paths.meta(),
        format: m.container,
        files: m.files.iter().map(|f| paths.file(&f.name)).collect(),
        size: m.size,
        block_size: m.block_size,
        block_count: m.block_count,
        filesystem: m.filesystem.clone(),
        all_blocks: m.all_blocks,
        update,
        resumed,
        this_run: r.this_run,
        stats: r.total,
        unread_blocks: r.unread_blocks,
        duration_secs: started.elapsed().as_secs_f64(),
    })
}

/// Updates an existing copy in place from `source`, or continues an interrupted copy or
/// update of it.
#[allow(clippy::too_many_arguments)]
fn continue_update<S: ScanSource + ?Sized>(
    paths: &CopyPaths,
    mut meta: CopyMeta,
    lock_held: Option<File>,
    source: &S,
    map: Option<&BlockMap>,
    known: Option<&BlockMap>,
    state: Option<&SourceState>,
    opts: &CopyOptions,
    progress: &dyn Progress,
) -> Result<CopyReport> {
    let started = Instant::now();
    let journal_path = |u: &UpdateRef| paths.file(&u.journal);
    match (meta.state, meta.update.clone()) {
        (CopyState::Complete, _) => {
            let old = open_base(paths, &meta)?;
            let _lock = lock_held;
            let writer = open_data_for_update(paths, &meta)?;
            let u = UpdateRef {
                journal: paths.journal_name(),
                id: crate::repo::fsio::random_hex(16),
                base: UpdateBase::Hashes,
            };
            let base_sha = meta.hashes.as_ref().map(|h| h.sha256.clone());
            // Journal first, then the metadata says `updating`, then data is written.
            let journal = Journal::create(
                &journal_path(&u),
                &journal_header(&meta, &u, base_sha, state),
            )?;
            meta.state = CopyState::Updating;
            meta.update = Some(u);
            meta.updated = now();
            meta.store(paths)?;
            let run = Run {
                known,
                base: Some(old),
                ..new_run(paths, meta, source, map, writer, journal, opts)
            };
            finish_report(paths, run.execute(progress)?, true, false, started)
        }
        (CopyState::Updating, Some(u)) => {
            // Set when the source changed since the interrupted run started.
            let mut changed = false;
            let existing = match Journal::open(&journal_path(&u)) {
                Ok(Some((j, h, r)))
                    if h == journal_header(
                        &meta,
                        &u,
                        h.base_sha256.clone(),
                        h.source_state.as_ref(),
                    ) =>
                {
                    match resume_refusal(&j, &h, source, state)? {
                        None => Some((j, r)),
                        Some(why) => {
                            changed = true;
                            let what = if u.base == UpdateBase::Zeros {
                                "starting the copy over"
                            } else {
                                "rewriting every block of the copy"
                            };
                            progress
                                .warn(&format!("not resuming the interrupted run: {why}; {what}"));
                            None
                        }
                    }
                }
                Ok(Some(_)) => {
                    progress.warn("the copy's journal belongs to another run; starting over");
                    None
                }
                Ok(None) => None,
                Err(e) => {
                    progress.warn(&format!(
                        "the copy's journal is unusable ({}); starting over",
                        crate::error::chain(&e)
                    ));
                    None
                }
            };
            let update = meta.hashes.is_some();
            // What the run resumes or starts over with; the lock is held until it is done.
            let (_lock, writer, journal, replay, old, update, resumed) = match (u.base, existing) {
                (UpdateBase::Zeros, None) => {
                    return run_fresh(
                        paths, meta, lock_held, source, map, state, opts, update, started, progress,
                    );
                }
                (base, Some((journal, replay))) => {
                    let held = match lock_held {
                        Some(l) => l,
                        None => lock(paths, &meta, true)?,
                    };
                    let writer = open_data_for_update(paths, &meta)?;
                    let mut replay = replay;
                    let needs_base = base == UpdateBase::Hashes
                        && replay.done < meta.block_count
                        && replay.horizon < meta.block_count;
                    let old = if needs_base {
                        match open_base(paths, &meta) {
                            Ok(l) => Some(l),
                            Err(e) => {
                                progress.warn(&format!(
                                    "{}; rewriting every remaining block of the copy",
                                    crate::error::chain(&e)
                                ));
                                replay.horizon = meta.block_count;
                                None
                            }
                        }
                    } else {
                        None
                    };
                    (Some(held), writer, journal, replay, old, update, true)
                }
                (UpdateBase::Hashes, None) => {
                    // The journal is written before the metadata says `updating`; without
                    // it (or after the source changed), which blocks the copy holds is
                    // unknown: rewrite them all.
                    if !changed {
                        progress
                            .warn("the copy's update journal is missing; rewriting every block");
                    }
                    let writer = open_data_for_update(paths, &meta)?;
                    let journal = Journal::create(
                        &journal_path(&u),
                        &journal_header(
                            &meta,
                            &u,
                            meta.hashes.as_ref().map(|h| h.sha256.clone()),
                            state,
                        ),
                    )?;
                    let replay = Replay {
                        horizon: meta.block_count,
                        ..Replay::default()
                    };
                    (lock_held, writer, journal, replay, None, true, !changed)
                }
            };
            let run = Run {
                replay,
                base: old,
                ..new_run(paths, meta, source, map, writer, journal, opts)
            };
            finish_report(paths, run.execute(progress)?, update, resumed, started)
        }
        (CopyState::Updating, None) => Err(bad_copy(&paths.meta(), "no update in progress")),
    }
}

/// What is on `source` (filesystem, or partition layout for a whole disk) and its allocation
/// map at `block_size` (`None` with `all_blocks`): the same map a backup uses.
fn probe_source(
    source: &Source,
    block_size: u32,
    all_blocks: bool,
    progress: &dyn Progress,
) -> Result<(Option<FsInfo>, Option<DiskLayout>, Option<BlockMap>)> {
    let probe = crate::probe::disk::map_volume(
        source,
        source.geometry().logical_sector_size,
        block_size as u64,
    )?;
    for w in &probe.warnings {
        progress.warn(w);
    }
    let map = if all_blocks { None } else { probe.map };
    Ok((probe.fs, probe.layout, map))
}

/// Refuses an empty or (unless allowed) read-write mounted source; returns whether it is
/// consistent (see [`crate::job::check_mounts`]).
fn check_source(source: &Source, opts: &CopyOptions) -> Result<bool> {
    if source.size() == 0 {
        return Err(Error::BadSource {
            path: source.path().to_path_buf(),
            detail: "it is empty (0 bytes)".into(),
        });
    }
    crate::job::check_mounts(source, opts.allow_mounted)
}

/// Copies `source` to a new copy at `dest` (`volback copy`).
pub fn copy(
    source: &Source,
    dest: &Path,
    opts: &CopyOptions,
    progress: &dyn Progress,
) -> Result<CopyReport> {
    let consistent = check_source(source, opts)?;
    let block_size = opts.block_size.unwrap_or(crate::repo::DEFAULT_BLOCK_SIZE);
    crate::repo::check_block_size(block_size)?;
    let (fs, layout, map) = probe_source(source, block_size, opts.all_blocks, progress)?;
    let all_blocks = map.is_none();
    let state = SourceState::capture(source, fs.as_ref(), layout.as_ref(), map.as_ref())?;
    let described = Described {
        source: source.info(),
        filesystem: fs,
        layout,
        all_blocks,
        snapshot: None,
        consistent: Some(consistent),
    };
    start_new(
        source,
        map.as_ref(),
        Some(&state),
        described,
        dest,
        block_size,
        opts,
        progress,
    )
}

/// Updates the copy at `dest` in place from `source`, rewriting only the blocks that changed
/// (`volback copy --update`); continues an interrupted copy or update.
pub fn update(
    source: &Source,
    dest: &Path,
    opts: &CopyOptions,
    progress: &dyn Progress,
) -> Result<CopyReport> {
    let paths = CopyPaths::locate(dest).ok_or_else(|| Error::BadCopy {
        path: dest.to_path_buf(),
        detail: format!(
            "it is not a volback copy (no metadata file {}{BASE_SUFFIX}{META_EXT} beside it, \
             nor {BASE_IN_DIR}{META_EXT} in it)",
            dest.display()
        ),
    })?;
    let meta = CopyMeta::load(&paths)?;
    // Under the lock, the metadata cannot change any more.
    let lock_held = lock_for_update(&paths, &meta)?;
    let mut meta = CopyMeta::load(&paths)?;
    let consistent = check_source(source, opts)?;
    if source.size() != meta.size {
        return Err(Error::InvalidArgument(format!(
            "{} holds {} bytes but the copy {} holds {}: a copy is updated from a volume of \
             the same size",
            source.path().display(),
            source.size(),
            paths.dest().display(),
            meta.size
        )));
    }
    if let Some(bs) = opts.block_size
        && bs != meta.block_size
    {
        return Err(Error::InvalidArgument(format!(
            "the copy has blocks of {} bytes; an update cannot change that",
            meta.block_size
        )));
    }
    refuse_source_as_data(source, &paths, &meta)?;
    let all_blocks = meta.all_blocks || opts.all_blocks;
    let (fs, layout, map) = probe_source(source, meta.block_size, all_blocks, progress)?;
    let state = SourceState::capture(source, fs.as_ref(), layout.as_ref(), map.as_ref())?;
    // Change tracking against what the copy holds: only for a complete copy of one point in
    // time, from a source that is one too.
    let known = if map.is_some()
        && !opts.rehash
        && consistent
        && meta.state == CopyState::Complete
        && meta.consistent == Some(true)
    {
        let base = reader::open_data(&paths, &meta)?;
        crate::job::track_changes(source, &*base, meta.block_size as u64, &[], progress)?
    } else {
        None
    };
    meta.source = source.info();
    meta.filesystem = fs;
    meta.layout = layout;
    meta.all_blocks = map.is_none();
    meta.consistent = Some(consistent);
    continue_update(
        &paths,
        meta,
        lock_held,
        source,
        map.as_ref(),
        known.as_ref(),
        Some(&state),
        opts,
        progress,
    )
}

/// Writes snapshot `snapshot_id` of `repo` as a new copy at `dest` (`volback export`); an
/// interrupted export of the same snapshot to `dest` is continued.
pub fn export(
    repo: &Repository,
    snapshot_id: &str,
    dest: &Path,
    opts: &CopyOptions,
    progress: &dyn Progress,
) -> Result<CopyReport> {
    let volume = crate::repo::reader::SnapshotVolume::open(repo, snapshot_id, None)?;
    let header = volume.snapshot().header().clone();
    let source: &dyn Volume = &volume;
    if let Some(paths) = CopyPaths::locate(dest)
        && let Ok(meta) = CopyMeta::load(&paths)
        && meta.state == CopyState::Updating
        && meta.snapshot.as_ref().is_some_and(|s| s.id == snapshot_id)
        && meta.size == header.source.size
    {
        let lock_held = lock_for_update(&paths, &meta)?;
        let meta = CopyMeta::load(&paths)?;
        return continue_update(
            &paths, meta, lock_held, source, None, None, None, opts, progress,
        );
    }
    let block_size = opts.block_size.unwrap_or(header.block_size);
    let root = std::path::absolute(repo.root()).unwrap_or_else(|_| repo.root().to_path_buf());
    let described = Described {
        source: header.source.clone(),
        filesystem: header.filesystem.clone(),
        layout: header.layout.clone(),
        all_blocks: header.all_blocks,
        snapshot: Some(SnapshotOrigin {
            repository: root.to_string_lossy().into_owned(),
            id: snapshot_id.to_string(),
        }),
        consistent: header.consistent,
    };
    start_new(
        source, None, None, described, dest, block_size, opts, progress,
    )
}

/// A complete copy, opened for reading.
pub struct OpenedCopy {
    pub paths: CopyPaths,
    pub meta: CopyMeta,
    /// Every block read is checked against its SHA-256.
    pub volume: CopyVolume,
}

/// Opens the complete copy that `path` names (see [`locate`]): checks the metadata, the hash
/// list's header and length, and that every data file is there with its size. Refuses a copy
/// whose copy or update did not finish.
pub fn open_copy(path: &Path) -> Result<OpenedCopy> {
    let paths = CopyPaths::locate(path).ok_or_else(|| Error::BadCopy {
        path: path.to_path_buf(),
        detail: "it is not a volback copy (no copy metadata found)".into(),
    })?;
    let meta = CopyMeta::load(&paths)?;
    if meta.state != CopyState::Complete {
        return Err(Error::IncompleteCopy { path: paths.dest() });
    }
    // Under the shared lock no update starts; read the metadata again in case one finished
    // in between.
    let lock = lock(&paths, &meta, false)?;
    let meta = CopyMeta::load(&paths)?;
    if meta.state != CopyState::Complete {
        return Err(Error::IncompleteCopy { path: paths.dest() });
    }
    let h = meta
        .hashes
        .as_ref()
        .ok_or_else(|| bad_copy(&paths.meta(), "no hash list"))?;
    let hashes = HashList::open(&paths.file(&h.name), hash_header(&meta))?;
    let inner = reader::open_data(&paths, &meta)?;
    let volume = CopyVolume::new(&paths, &meta, inner, hashes, lock);
    Ok(OpenedCopy {
        paths,
        meta,
        volume,
    })
}

/// Opens the complete copy that `path` names as a [`Volume`] (raw, BIN, VHD, VHDX or qcow2),
/// every block checked against its SHA-256 as it is read. For `mount`, `serve`, `restore`.
pub fn open(path: &Path) -> Result<Box<dyn Volume>> {
    Ok(Box::new(open_copy(path)?.volume))
}
