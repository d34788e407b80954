//! Verify of a format-2 repository.
//!
//! Always: every index file decodes; every indexed pack exists (a pack condemned by a pending
//! record may be gone); every snapshot's tree is readable (nodes decode and match their ids,
//! read through the blob store) and every data blob it names is indexed in a pack that exists.
//! With `read_data`, every pack file (of the snapshots checked, or all indexed packs) is read
//! whole: its BLAKE3 equals its name, its table parses and agrees with the index, every frame
//! decodes and every blob's content hashes to its id. Nothing is moved or repaired: a pack
//! holds many blobs, and a later backup stores again whatever a bad blob held only once the
//! blob is dropped from the index (by a prune, after `forget` of the snapshots that need it).

use super::{Problem, VerifyOptions, VerifyReport, thread_count};
use crate::error::{Error, IoContext, Result, chain};
use crate::hash::{ChunkId, HashAlgorithm};
use crate::platform;
use crate::progress::Progress;
use crate::prune::{mark, plan, sweep};
use crate::repo::Repository;
use crate::repo::blob::BlobEntry;
use crate::repo::blobs::BlobStore;
use crate::repo::fsio;
use crate::repo::index::{IndexFile, list_index_files};
use crate::repo::pack::{read_frame_raw, read_pack_table};
use crate::repo::writers;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// At most this many (snapshot, offset) pairs are listed per problem.
const MAX_AFFECTED: usize = 1000;

/// Verifies a format-2 repository (module doc).
pub(super) fn verify(
    repo: &Repository,
    ids: &[String],
    opts: &VerifyOptions,
    progress: &dyn Progress,
) -> Result<VerifyReport> {
    let mut report = VerifyReport::default();
    let hash = repo.config().chunk_hash;

    // Index files.
    let mut tables: HashMap<ChunkId, Vec<BlobEntry>> = HashMap::new();
    let mut named_by: HashMap<ChunkId, String> = HashMap::new();
    let mut files = list_index_files(repo)?;
    files.sort();
    for f in &files {
        match IndexFile::read(&repo.index_dir().join(f)) {
            Ok(idx) => {
                for (pack, entries) in idx.packs {
                    named_by.entry(pack).or_insert_with(|| f.clone());
                    tables.entry(pack).or_insert(entries);
                }
            }
            Err(e) => report.problems.push(Problem {
                detail: format!("index file {f}: {}", chain(&e)),
                ..Problem::default()
            }),
        }
        report.index_files_checked += 1;
    }
    let condemned: HashSet<ChunkId> = writers::read_pending(repo)?
        .into_iter()
        .flat_map(|r| r.packs)
        .collect();

    // Packs present; blobs usable (in a pack that exists).
    let mut usable: HashSet<ChunkId> = HashSet::new();
    let mut packs: Vec<ChunkId> = tables.keys().copied().collect();
    packs.sort_by(|a, b| a.0.cmp(&b.0));
    let mut present: Vec<ChunkId> = Vec::new();
    for p in &packs {
        let path = sweep::pack_path(repo, p);
        match std::fs::symlink_metadata(&path) {
            Ok(_) => {
                present.push(*p);
                usable.extend(tables[p].iter().map(|e| e.id));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if !condemned.contains(p) {
                    report.problems.push(Problem {
                        pack: Some(p.to_hex()),
                        detail: format!(
                            "pack {p} is missing (named by index file {}; expected at {})",
                            named_by.get(p).map_or("?", |s| s.as_str()),
                            path.display()
                        ),
                        ..Problem::default()
                    });
                }
            }
            Err(e) => report.problems.push(Problem {
                pack: Some(p.to_hex()),
                detail: chain(&Error::io("inspect", &path, e)),
                ..Problem::default()
            }),
        }
    }
    // Condemned packs still on disk serve readers until deleted.
    for p in &condemned {
        if tables.contains_key(p) {
            continue;
        }
        if let Ok(t) = read_pack_table(&sweep::pack_path(repo, p), p) {
            usable.extend(t.iter().map(|e| e.id));
        }
    }

    // Snapshots: trees and the blobs they name.
    let mut snap_ids: Vec<String> = if ids.is_empty() {
        repo.snapshot_ids()?
    } else {
        ids.to_vec()
    };
    snap_ids.sort();
    let store: Arc<BlobStore> = BlobStore::open(repo)?;
    let mut seen_nodes: HashSet<ChunkId> = HashSet::new();
    let mut referenced: HashSet<ChunkId> = HashSet::new();
    // Bad blob -> index of its problem.
    let mut bad: HashMap<ChunkId, usize> = HashMap::new();
    progress.start("verify trees", snap_ids.len() as u64);
    for id in &snap_ids {
        progress.advance(1);
        let snap = match repo.open_snapshot(id) {
            Ok(s) => s,
            Err(e) => {
                report.problems.push(Problem::snapshot(id, &e));
                continue;
            }
        };
        report.snapshots_checked += 1;
        let mut names = HashSet::new();
        if let Err(e) = mark::mark_snapshot(&snap, &*store, &mut seen_nodes, &mut names) {
            report.problems.push(Problem::snapshot(id, &e));
        }
        for b in &names {
            if referenced.insert(*b) {
                report.chunks_checked += 1;
            }
            if !usable.contains(b) && !bad.contains_key(b) {
                report.problems.push(Problem {
                    blob: Some(b.to_hex()),
                    snapshot: Some(id.clone()),
                    detail: format!(
                        "blob {b}, named by snapshot {}, is in no index file or its pack is \
                         missing",
                        &id[..12.min(id.len())]
                    ),
                    ..Problem::default()
                });
                bad.insert(*b, report.problems.len() - 1);
            }
        }
    }
    progress.finish();
    drop(seen_nodes);

    // Pack files.
    let to_read: Vec<ChunkId> = if !opts.read_data {
        Vec::new()
    } else if ids.is_empty() {
        present.clone()
    } else {
        present
            .iter()
            .filter(|p| tables[*p].iter().any(|e| referenced.contains(&e.id)))
            .copied()
            .collect()
    };
    report.packs_checked = if opts.read_data {
        to_read.len() as u64
    } else {
        present.len() as u64
    };
    let total: u64 = to_read
        .iter()
        .map(|p| plan::pack_file_len(&tables[p]))
        .sum();
    progress.start("verify packs", total);
    let results = check_packs(repo, &to_read, &tables, hash, thread_count(opts), progress);
    progress.finish();
    for r in results {
        report.bytes_checked += r.bytes;
        for (blob, detail) in r.problems {
            report.problems.push(Problem {
                pack: Some(r.pack.to_hex()),
                blob: blob.map(|b| b.to_hex()),
                detail,
                ..Problem::default()
            });
            if let Some(b) = blob
                && referenced.contains(&b)
            {
                bad.entry(b).or_insert(report.problems.len() - 1);
            }
        }
    }

    // Where the bad blobs are used: a second pass over the snapshots that need it.
    if !bad.is_empty() {
        for id in &snap_ids {
            let Ok(mut snap) = repo.open_snapshot(id) else {
                continue;
            };
            snap.set_blobs(store.clone());
            let bs = u64::from(snap.header().block_size);
            let _ = snap.for_each_run(|first, r, n| {
                if let Some(b) = r.blob()
                    && let Some(&p) = bad.get(&b)
                {
                    let list = &mut report.problems[p].affected;
                    for k in 0..n.min(MAX_AFFECTED as u64) {
                        if list.len() >= MAX_AFFECTED {
                            break;
                        }
                        list.push((id.clone(), (first + k) * bs));
                    }
                }
                Ok(())
            });
        }
    }
    Ok(report)
}

/// What reading one pack found: (blob, detail) per problem.
struct PackResult {
    pack: ChunkId,
    bytes: u64,
    problems: Vec<(Option<ChunkId>, String)>,
}

/// Reads the packs `packs` in parallel ([`check_pack`]).
fn check_packs(
    repo: &Repository,
    packs: &[ChunkId],
    tables: &HashMap<ChunkId, Vec<BlobEntry>>,
    hash: HashAlgorithm,
    threads: usize,
    progress: &dyn Progress,
) -> Vec<PackResult> {
    if packs.is_empty() {
        return Vec::new();
    }
    let per = packs.len().div_ceil(threads.max(1));
    std::thread::scope(|s| {
        let handles: Vec<_> = packs
            .chunks(per)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .map(|p| {
                            let r = check_pack(repo, p, &tables[p], hash);
                            progress.advance(r.bytes);
                            r
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| {
                h.join().unwrap_or_else(|_| {
                    vec![PackResult {
                        pack: ChunkId([0; 32]),
                        bytes: 0,
                        problems: vec![(None, "internal error: a worker thread panicked".into())],
                    }]
                })
            })
            .collect()
    })
}

/// The BLAKE3 of the whole file `file` of `len` bytes.
fn file_blake3(file: &std::fs::File, path: &std::path::Path, len: u64) -> Result<ChunkId> {
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        platform::read_exact_at(file, &mut buf[..n], off).ctx("read", path)?;
        h.update(&buf[..n]);
        off += n as u64;
    }
    Ok(ChunkId(*h.finalize().as_bytes()))
}

/// Sort key of a table entry, to compare a pack's table with the index.
fn entry_key(e: &BlobEntry) -> (u32, u32, [u8; 32], u8, u32, u32) {
    (
        e.frame_offset,
        e.raw_offset,
        e.id.0,
        e.kind.code(),
        e.frame_len,
        e.raw_len,
    )
}

/// Reads pack `pack` whole (module doc, `read_data`).
fn check_pack(
    repo: &Repository,
    pack: &ChunkId,
    indexed: &[BlobEntry],
    hash: HashAlgorithm,
) -> PackResult {
    let path = sweep::pack_path(repo, pack);
    let mut r = PackResult {
        pack: *pack,
        bytes: 0,
        problems: Vec::new(),
    };
    let file = match fsio::open_regular(&path, false, "open") {
        Ok(f) => f,
        Err(e) => {
            r.problems.push((None, chain(&e)));
            return r;
        }
    };
    let len = match file.metadata() {
        Ok(m) => m.len(),
        Err(e) => {
            r.problems.push((None, chain(&Error::io("stat", &path, e))));
            return r;
        }
    };
    match file_blake3(&file, &path, len) {
        Ok(h) if h == *pack => {}
        Ok(h) => r.problems.push((
            None,
            format!(
                "pack file {} hashes to {h}, not to its name (damaged)",
                path.display()
            ),
        )),
        Err(e) => {
            r.problems.push((None, chain(&e)));
            return r;
        }
    }
    r.bytes = len;
    // The frames to read: the pack's own table when it parses, else the index's entries.
    let entries: Vec<BlobEntry> = match read_pack_table(&path, pack) {
        Ok(table) => {
            let mut a: Vec<_> = table.iter().map(entry_key).collect();
            let mut b: Vec<_> = indexed.iter().map(entry_key).collect();
            a.sort_unstable();
            b.sort_unstable();
            if a != b {
                r.problems.push((
                    None,
                    format!(
                        "pack {pack}: its table ({} entries) disagrees with the index ({} entries)",
                        a.len(),
                        b.len()
                    ),
                ));
            }
            table
        }
        Err(e) => {
            r.problems.push((None, chain(&e)));
            indexed.to_vec()
        }
    };
    for (_, (_, idx)) in plan::frames(&entries) {
        let first = &entries[idx[0]];
        let raw = match read_frame_raw(&file, &path, first) {
            Ok(raw) => raw,
            Err(e) => {
                for &i in &idx {
                    r.problems.push((
                        Some(entries[i].id),
                        format!(
                            "blob {} ({}): {}",
                            entries[i].id,
                            entries[i].kind.name(),
                            chain(&e)
                        ),
                    ));
                }
                continue;
            }
        };
        for &i in &idx {
            let e = &entries[i];
            let start = e.raw_offset as usize;
            let content = raw.get(start..start + e.raw_len as usize);
            let ok = content.is_some_and(|c| hash.hash(c) == e.id);
            if !ok {
                r.problems.push((
                    Some(e.id),
                    format!(
                        "blob {} ({}) in pack {pack} at frame offset {}: content does not match \
                         its id",
                        e.id,
                        e.kind.name(),
                        e.frame_offset
                    ),
                ));
            }
        }
    }
    r
}
