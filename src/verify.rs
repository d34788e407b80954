//! Verify: check snapshots and the chunks they refer to.
//!
//! Without `read_data`, every snapshot file is checked (checksums of header, directory and
//! every manifest segment) and every referenced chunk must exist with a consistent header.
//! With `read_data`, every referenced chunk is also read, decompressed and re-hashed. Each
//! chunk is checked once, however many snapshots share it; a bad chunk is reported with every
//! snapshot and block offset it affects.
//!
//! A chunk file found damaged (bad header, length, compressed data or content hash) is moved
//! aside, renamed to `<id>.bad` ([`ChunkStore::quarantine`], never deleted), as Proxmox
//! Backup Server does: the chunk then counts as missing, so the next backup of a source that
//! still holds the data stores it again, and since chunks are content-addressed that repairs
//! every snapshot referring to it (docs/REPAIR.md). A missing chunk needs nothing moved; a
//! chunk that cannot be read for another reason (an I/O error) is left where it is.
//!
//! Format 2 repositories are checked by [`v2`]: index files, packs, snapshot trees, and with
//! `read_data` every pack file byte.

use crate::error::{Error, Result, chain};
use crate::hash::ChunkId;
use crate::progress::Progress;
use crate::repo::Repository;
use crate::repo::chunks::{ChunkHealth, ChunkStore};
use crate::repo::format::BlockRef;
use std::collections::HashMap;
use std::path::PathBuf;

mod v2;

/// Options of a verification.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    pub read_data: bool,
    /// Worker threads; 0 means one per core.
    pub threads: usize,
}

/// A problem found.
#[derive(Debug, Clone, Default)]
pub struct Problem {
    /// The bad chunk, or `None` for a problem with a snapshot file itself.
    pub chunk: Option<String>,
    /// Format 2: the bad pack, if the problem is one of a pack file.
    pub pack: Option<String>,
    /// Format 2: the bad or missing blob.
    pub blob: Option<String>,
    /// The snapshot whose file is bad (when `chunk` is `None`).
    pub snapshot: Option<String>,
    pub detail: String,
    /// (snapshot id, byte offset) of every block that refers to the bad chunk.
    pub affected: Vec<(String, u64)>,
}

impl Problem {
    /// The snapshot file `id` could not be read: `e`.
    fn snapshot(id: &str, e: &Error) -> Problem {
        Problem {
            snapshot: Some(id.to_string()),
            detail: chain(e),
            ..Problem::default()
        }
    }
}

/// What a verification found.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    pub snapshots_checked: usize,
    /// Chunks (format 1) or blobs (format 2) checked.
    pub chunks_checked: u64,
    /// Format 2: pack files checked (read whole with `read_data`, else their presence).
    pub packs_checked: u64,
    /// Format 2: index files read.
    pub index_files_checked: u64,
    pub bytes_checked: u64,
    pub problems: Vec<Problem>,
}

/// Above this many good chunks, stop remembering them (bounded memory); they may then be
/// checked again when another snapshot refers to them.
const MAX_REMEMBERED: usize = 4 << 20;

#[derive(Clone)]
enum Status {
    Good,
    Bad(usize),
}

/// Verifies the given snapshots (all when `ids` is empty).
pub fn verify(
    repo: &Repository,
    ids: &[String],
    opts: &VerifyOptions,
    progress: &dyn Progress,
) -> Result<VerifyReport> {
    match repo.format_version() {
        1 => verify_v1(repo, ids, opts, progress),
        _ => v2::verify(repo, ids, opts, progress),
    }
}

/// The worker threads `opts` asks for.
fn thread_count(opts: &VerifyOptions) -> usize {
    if opts.threads == 0 {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    } else {
        opts.threads
    }
}

/// Format 1: snapshots and chunk files.
fn verify_v1(
    repo: &Repository,
    ids: &[String],
    opts: &VerifyOptions,
    progress: &dyn Progress,
) -> Result<VerifyReport> {
    let ids: Vec<String> = if ids.is_empty() {
        let mut all = repo.snapshot_ids()?;
        all.sort();
        all
    } else {
        ids.to_vec()
    };
    let threads = thread_count(opts);
    let mut report = VerifyReport::default();
    let mut seen: HashMap<ChunkId, Status> = HashMap::new();
    let store = repo.chunks();

    for id in &ids {
        let Some(snap) = open_snapshot(repo, id, &mut report) else {
            continue;
        };
        let bs = snap.header().block_size as u64;
        progress.start(
            &format!("verify {}", &id[..12.min(id.len())]),
            snap.header().source.size,
        );
        for seg in 0..snap.segment_count() {
            let refs = match snap.segment(seg) {
                Ok(r) => r,
                Err(e) => {
                    report.problems.push(Problem::snapshot(id, &e));
                    break;
                }
            };
            let base = seg as u64 * crate::repo::format::SEGMENT_BLOCKS;
            // Chunks of this segment not checked yet, each once.
            let mut todo: Vec<ChunkId> = Vec::new();
            // Per pack to check: its slices (index, content hash, length).
            let mut slices: HashMap<ChunkId, Vec<Slice>> = HashMap::new();
            {
                let mut queued = std::collections::HashSet::new();
                let size = snap.header().source.size;
                for (i, r) in refs.iter().enumerate() {
                    let Some(c) = r.chunk() else { continue };
                    if seen.contains_key(&c) {
                        continue;
                    }
                    if queued.insert(c) {
                        todo.push(c);
                    }
                    if let BlockRef::Slice { hash, index, .. } = *r {
                        let start = (base + i as u64) * bs;
                        let len = size.saturating_sub(start).min(bs);
                        slices.entry(c).or_default().push(Slice {
                            index,
                            hash,
                            len,
                            block_size: bs,
                        });
                    }
                }
            }
            let results = check_chunks(store, &todo, &slices, opts.read_data, threads);
            for (c, r) in todo.iter().zip(results) {
                report.chunks_checked += 1;
                match r {
                    Ok(n) => {
                        report.bytes_checked += n;
                        if seen.len() < MAX_REMEMBERED {
                            seen.insert(*c, Status::Good);
                        }
                    }
                    Err(e) => {
                        report.problems.push(Problem {
                            chunk: Some(c.to_hex()),
                            detail: chain(&e),
                            ..Problem::default()
                        });
                        seen.insert(*c, Status::Bad(report.problems.len() - 1));
                    }
                }
            }
            for (i, r) in refs.iter().enumerate() {
                if let Some(c) = r.chunk()
                    && let Some(Status::Bad(p)) = seen.get(&c)
                {
                    report.problems[*p]
                        .affected
                        .push((id.clone(), (base + i as u64) * bs));
                }
            }
            progress.advance(refs.len() as u64 * bs);
        }
        progress.finish();
    }
    Ok(report)
}

/// Moves the damaged chunk `id` aside and returns the problem to report, saying where it went
/// (or why it could not be moved).
fn set_aside(
    store: &ChunkStore,
    id: &ChunkId,
    what: String,
    path: PathBuf,
    detail: String,
) -> Error {
    let detail = match store.quarantine(id) {
        Ok(Some(dest)) => format!(
            "{detail}; moved aside to {}: the next backup of a source that still holds this \
             data stores it again",
            dest.display()
        ),
        Ok(None) => detail,
        Err(e) => format!("{detail}; could not be moved aside: {}", chain(&e)),
    };
    Error::Corrupt { what, path, detail }
}

/// A block stored in a pack, as a snapshot names it.
struct Slice {
    index: u8,
    hash: ChunkId,
    len: u64,
    block_size: u64,
}

/// Opens snapshot `id` and counts it as checked; when it cannot be read, records the problem
/// in `report` instead and returns None (verify goes on with the next one).
fn open_snapshot(
    repo: &Repository,
    id: &str,
    report: &mut VerifyReport,
) -> Option<crate::repo::snapshot::SnapshotFile> {
    match repo.open_snapshot(id) {
        Ok(s) => {
            report.snapshots_checked += 1;
            Some(s)
        }
        Err(e) => {
            report.problems.push(Problem::snapshot(id, &e));
            None
        }
    }
}

/// Checks chunks in parallel; returns per chunk the bytes checked or the problem. With
/// `read_data`, the content of every slice in `slices` is also checked against its hash.
fn check_chunks(
    store: &ChunkStore,
    ids: &[ChunkId],
    slices: &HashMap<ChunkId, Vec<Slice>>,
    read_data: bool,
    threads: usize,
) -> Vec<Result<u64>> {
    let check = |id: &ChunkId, buf: &mut Vec<u8>| -> Result<u64> {
        if read_data {
            match store.get_into(id, buf) {
                Ok(()) => {}
                Err(Error::Corrupt { what, path, detail }) => {
                    return Err(set_aside(store, id, what, path, detail));
                }
                Err(e) => return Err(e),
            }
            for s in slices.get(id).into_iter().flatten() {
                let piece = crate::repo::format::pack_slice(buf, s.index, s.block_size, s.len);
                let detail = match piece {
                    None => format!(
                        "pack holds {} bytes, too few for slice {}",
                        buf.len(),
                        s.index
                    ),
                    Some(p) => {
                        let h = store.hash_algorithm().hash(p);
                        if h == s.hash {
                            continue;
                        }
                        format!(
                            "slice {} hashes to {h}, the snapshot says {}",
                            s.index, s.hash
                        )
                    }
                };
                return Err(Error::corrupt(
                    format!("chunk {id}"),
                    store.path(id),
                    detail,
                ));
            }
            Ok(buf.len() as u64)
        } else {
            match store.check_cheap(id)? {
                ChunkHealth::Good => Ok(0),
                ChunkHealth::Missing => Err(Error::MissingChunk {
                    id: id.to_hex(),
                    path: store.path(id),
                }),
                ChunkHealth::Damaged(d) => Err(set_aside(
                    store,
                    id,
                    format!("chunk {id}"),
                    store.path(id),
                    d,
                )),
            }
        }
    };
    parallel_map(ids, threads, check, || {
        Err(Error::internal("verify", "a worker thread panicked"))
    })
}

/// Applies `work` to every item of `items`, split into `threads` parts checked by one scoped
/// thread each, and returns the results in order. Every thread gets its own scratch state
/// `S::default()` (a reused buffer, say). A thread that panics yields the one result
/// `on_panic()` for its whole part, so the caller still reports a problem.
fn parallel_map<T: Sync, S: Default, R: Send>(
    items: &[T],
    threads: usize,
    work: impl Fn(&T, &mut S) -> R + Sync,
    on_panic: impl Fn() -> R,
) -> Vec<R> {
    if items.is_empty() {
        return Vec::new();
    }
    let per = items.len().div_ceil(threads.max(1));
    let work = &work;
    std::thread::scope(|s| {
        let handles: Vec<_> = items
            .chunks(per)
            .map(|part| {
                s.spawn(move || {
                    let mut state = S::default();
                    part.iter()
                        .map(|item| work(item, &mut state))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|_| vec![on_panic()]))
            .collect()
    })
}
