//! Verify of a format-2 repository.
//!
//! Always: every index file decodes; every indexed pack exists (a pack condemned by a pending
//! record may be gone); every snapshot's tree is readable (nodes decode and match their ids,
//! read through the blob store) and every data blob it names is indexed in a pack that exists.
//! With `read_data`, every pack file (of the snapshots checked, or all indexed packs) is read
//! whole: its BLAKE3 equals its name, its table parses and agrees with the index, every frame
//! decodes and every blob's content hashes to its id. In an encrypted repository every object
//! read (index files, pending records, snapshots, tree nodes, pack tables, frames) is also
//! authenticated, and blob ids are keyed: a failure is a problem naming the object. Nothing is moved or repaired: a pack
//! holds many blobs, and a later backup stores again whatever a bad blob held only once the
//! blob is dropped from the index (by a prune, after `forget` of the snapshots that need it).

use super::{Problem, VerifyOptions, VerifyReport, open_snapshot, parallel_map, thread_count};
use crate::error::{Error, Result, chain};
use crate::hash::ChunkId;
use crate::progress::Progress;
use crate::prune::{mark, plan, sweep};
use crate::repo::Repository;
use crate::repo::blob::{BlobEntry, BlobKind, BlobSource};
use crate::repo::blobs::BlobStore;
use crate::repo::index::{IndexFile, list_index_files};
use crate::repo::pack::{FrameEncoder, read_frame_raw, read_pack_table};
use crate::repo::seal::Sealer;
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
    let sealer = repo.sealer();

    // Index files.
    let mut tables: HashMap<ChunkId, Vec<BlobEntry>> = HashMap::new();
    let mut named_by: HashMap<ChunkId, String> = HashMap::new();
    let mut files = list_index_files(repo)?;
    files.sort();
    for f in &files {
        match IndexFile::read(repo.backend().as_ref(), &format!("index/{f}"), sealer) {
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
    packs.sort_by_key(|a| a.0);
    let mut present: Vec<ChunkId> = Vec::new();
    // Missing packs: a problem only when a snapshot needs a blob found nowhere else (judged
    // after the snapshots are read): a pack lost or set aside whose blobs a later backup
    // stored again is healed.
    let mut missing: Vec<ChunkId> = Vec::new();
    // One listing of the packs, not a look at each (a request per pack on object storage).
    let stored: HashSet<ChunkId> = sweep::list_pack_files(repo, None)?
        .0
        .into_iter()
        .map(|p| p.0)
        .collect();
    for p in &packs {
        if stored.contains(p) {
            present.push(*p);
            usable.extend(tables[p].iter().map(|e| e.id));
        } else if !condemned.contains(p) {
            missing.push(*p);
        }
    }
    // Condemned packs still on disk serve readers until deleted.
    for p in &condemned {
        if tables.contains_key(p) {
            continue;
        }
        if let Ok(t) = read_pack_table(repo.backend().as_ref(), p, sealer) {
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
    // The repository's reader store; when it cannot open (a damaged index file, reported
    // above), the index files that could be read.
    let store: Arc<dyn BlobSource> = match BlobStore::open(repo) {
        Ok(s) => s,
        Err(_) => Arc::new(TableSource::new(repo, &tables)),
    };
    let mut seen_nodes: HashSet<ChunkId> = HashSet::new();
    let mut referenced: HashSet<ChunkId> = HashSet::new();
    // Bad blob -> index of its problem.
    let mut bad: HashMap<ChunkId, usize> = HashMap::new();
    progress.start("verify trees", snap_ids.len() as u64);
    for id in &snap_ids {
        progress.advance(1);
        let Some(snap) = open_snapshot(repo, id, &mut report) else {
            continue;
        };
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
    for p in &missing {
        let needed = tables[p]
            .iter()
            .any(|e| referenced.contains(&e.id) && !usable.contains(&e.id));
        if needed {
            report.problems.push(Problem {
                pack: Some(p.to_hex()),
                detail: format!(
                    "pack {p} is missing (named by index file {}; expected at {})",
                    named_by.get(p).map_or("?", |s| s.as_str()),
                    sweep::pack_path(repo, p).display()
                ),
                ..Problem::default()
            });
        }
    }

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
        .map(|p| plan::pack_file_len(&tables[p], sealer.overhead() as u64))
        .sum();
    progress.start("verify packs", total);
    let results = check_packs(repo, &to_read, &tables, thread_count(opts), progress);
    progress.finish();
    let damaged: Vec<(ChunkId, HashSet<ChunkId>)> = results
        .iter()
        .filter(|r| !r.problems.is_empty() && !condemned.contains(&r.pack))
        .map(|r| (r.pack, r.problems.iter().filter_map(|(b, _)| *b).collect()))
        .collect();
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

    // Damaged packs: their good blobs are copied into a new pack, then the pack is set aside
    // (`<id>.bad`), so that the next backup stores the bad blobs' blocks again.
    for (pack, bad_blobs) in &damaged {
        match salvage(repo, pack, &tables[pack], bad_blobs) {
            Ok(note) => report.problems.push(Problem {
                pack: Some(pack.to_hex()),
                detail: note,
                ..Problem::default()
            }),
            Err(e) => report.problems.push(Problem {
                pack: Some(pack.to_hex()),
                detail: format!("pack {pack} could not be set aside: {}", chain(&e)),
                ..Problem::default()
            }),
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

/// Copies the blobs of damaged pack `pack` that still read back right (those not in
/// `bad`, checked again) into a new pack, indexes it, and renames the pack to `<id>.bad`
/// (`<id>.bad.N` when taken) without deleting it. Registers as a writer meanwhile, so that
/// a prune does not take the new pack for a leftover. Returns what was done.
fn salvage(
    repo: &Repository,
    pack: &ChunkId,
    indexed: &[BlobEntry],
    bad: &HashSet<ChunkId>,
) -> Result<String> {
    let path = sweep::pack_path(repo, pack);
    let sealer = repo.sealer();
    let (_marker, pending) = writers::register_writer(repo)?;
    let store = BlobStore::open_writer(repo, &pending)?;
    let packer = crate::repo::packer::Packer::new(repo, store)?;
    let mut encoder = FrameEncoder::new(repo.config().zstd_level, sealer)?;
    let b = repo.backend().as_ref();
    // Something that is not a regular file in the pack's place is reported, never moved.
    b.head(&crate::repo::backend::pack_key(pack))?;
    let entries = read_pack_table(b, pack, sealer).unwrap_or_else(|_| indexed.to_vec());
    let mut saved = 0u64;
    for e in entries.iter().filter(|e| !bad.contains(&e.id)) {
        let Ok(raw) = read_frame_raw(b, pack, e, sealer) else {
            continue;
        };
        let start = e.raw_offset as usize;
        let Some(content) = raw.get(start..start + e.raw_len as usize) else {
            continue;
        };
        if sealer.blob_id(content) != e.id {
            continue;
        }
        let frame = encoder.encode(content)?;
        packer.add_frame(frame, e.raw_len, &[(e.id, e.kind, 0, e.raw_len)])?;
        saved += 1;
    }
    packer.checkpoint()?;
    let aside = b
        .set_aside(&crate::repo::backend::pack_key(pack))?
        .ok_or_else(|| Error::io("rename", &path, std::io::ErrorKind::NotFound.into()))?;
    Ok(format!(
        "pack {pack} set aside as {} ({saved} good blobs copied to a new pack; the next \
         backup stores the blocks of the damaged ones again)",
        b.display_path(&aside).display()
    ))
}

/// Blobs read through the index files that could be read.
struct TableSource {
    backend: Arc<dyn crate::repo::backend::WriteBackend>,
    sealer: Sealer,
    locations: HashMap<ChunkId, (ChunkId, BlobEntry)>,
}

impl TableSource {
    fn new(repo: &Repository, tables: &HashMap<ChunkId, Vec<BlobEntry>>) -> Self {
        let mut locations = HashMap::new();
        for (p, entries) in tables {
            for e in entries {
                locations.entry(e.id).or_insert((*p, *e));
            }
        }
        TableSource {
            backend: repo.backend().clone(),
            sealer: repo.sealer().clone(),
            locations,
        }
    }
}

impl BlobSource for TableSource {
    fn blob(&self, id: &ChunkId, _: BlobKind) -> Result<Arc<Vec<u8>>> {
        let missing = || Error::MissingChunk {
            id: id.to_hex(),
            path: self.backend.display_path("packs"),
        };
        let (pack, e) = self.locations.get(id).ok_or_else(missing)?;
        let path = self
            .backend
            .display_path(&crate::repo::backend::pack_key(pack));
        let raw = read_frame_raw(self.backend.as_ref(), pack, e, &self.sealer)?;
        let start = e.raw_offset as usize;
        let content = raw
            .get(start..start + e.raw_len as usize)
            .filter(|c| self.sealer.blob_id(c) == *id)
            .ok_or_else(|| {
                Error::corrupt(format!("blob {id}"), &path, "content does not match its id")
            })?;
        Ok(Arc::new(content.to_vec()))
    }
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
    threads: usize,
    progress: &dyn Progress,
) -> Vec<PackResult> {
    let check = |p: &ChunkId, _: &mut ()| {
        let r = check_pack(repo, p, &tables[p]);
        progress.advance(r.bytes);
        r
    };
    parallel_map(packs, threads, check, || PackResult {
        pack: ChunkId([0; 32]),
        bytes: 0,
        problems: vec![(None, "internal error: a worker thread panicked".into())],
    })
}

/// The BLAKE3 of the whole object `key` of `b`, of `len` bytes.
fn file_blake3(b: &dyn crate::repo::backend::ReadBackend, key: &str, len: u64) -> Result<ChunkId> {
    let mut h = blake3::Hasher::new();
    let step = if b.capabilities().cheap_ranged_reads {
        1 << 20
    } else {
        8 << 20
    };
    let mut buf = vec![0u8; step.min(len as usize)];
    let mut off = 0u64;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        b.get_range(key, off, &mut buf[..n])?;
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
fn check_pack(repo: &Repository, pack: &ChunkId, indexed: &[BlobEntry]) -> PackResult {
    let path = sweep::pack_path(repo, pack);
    let sealer = repo.sealer();
    let mut r = PackResult {
        pack: *pack,
        bytes: 0,
        problems: Vec::new(),
    };
    let b = repo.backend().as_ref();
    let key = crate::repo::backend::pack_key(pack);
    let len = match b.head(&key) {
        Ok(Some(m)) => m.size,
        Ok(None) => {
            let e = Error::io("open", &path, std::io::ErrorKind::NotFound.into());
            r.problems.push((None, chain(&e)));
            return r;
        }
        Err(e) => {
            r.problems.push((None, chain(&e)));
            return r;
        }
    };
    match file_blake3(b, &key, len) {
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
    let entries: Vec<BlobEntry> = match read_pack_table(b, pack, sealer) {
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
        let raw = match read_frame_raw(b, pack, first, sealer) {
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
            let ok = content.is_some_and(|c| sealer.blob_id(c) == e.id);
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

#[cfg(test)]
mod tests {
    use super::super::{VerifyOptions, verify};
    use crate::progress::Silent;
    use crate::prune::tests::{assert_clean, fxs, packs, put_blobs, snapshot};
    use crate::repo::Repository;

    fn run(repo: &Repository, read_data: bool) -> super::VerifyReport {
        verify(
            repo,
            &[],
            &VerifyOptions {
                read_data,
                threads: 2,
            },
            &Silent,
        )
        .unwrap()
    }

    #[test]
    fn a_clean_repository_verifies() {
        for f in fxs() {
            let ids = put_blobs(&f.repo, &[1, 2, 3], 2);
            snapshot(&f.repo, &ids);
            assert_clean(&f.repo);
            let r = run(&f.repo, true);
            assert_eq!(r.snapshots_checked, 1);
            assert_eq!(r.packs_checked, 2);
            assert!(r.chunks_checked >= 4, "3 data blobs and a tree node");
            assert!(r.bytes_checked > 0);
        }
    }

    #[test]
    fn a_damaged_pack_is_reported_with_its_blobs_and_snapshot() {
        for f in fxs() {
            let ids = put_blobs(&f.repo, &[1, 2, 3], 1);
            let s = snapshot(&f.repo, &ids);
            let data_pack = packs(&f.repo)
                .into_iter()
                .find(|p| {
                    crate::repo::pack::read_pack_table(
                        f.repo.backend().as_ref(),
                        p,
                        f.repo.sealer(),
                    )
                    .unwrap()
                    .len()
                        == 3
                })
                .unwrap();
            let path = crate::prune::sweep::pack_path(&f.repo, &data_pack);
            let mut bytes = std::fs::read(&path).unwrap();
            bytes[40] ^= 0xff; // inside the first frame
            std::fs::write(&path, &bytes).unwrap();
            assert!(
                run(&f.repo, false).problems.is_empty(),
                "cheap check reads no data"
            );
            let r = run(&f.repo, true);
            assert!(!r.problems.is_empty());
            let p = &r.problems[0];
            assert_eq!(p.pack.as_deref(), Some(&data_pack.to_hex()[..]));
            assert!(p.detail.contains("hashes to"), "{}", p.detail);
            let blob_problem = r
                .problems
                .iter()
                .find(|p| p.blob.as_deref() == Some(&ids[0].to_hex()[..]))
                .expect("the blob of the damaged frame is named");
            assert_eq!(blob_problem.affected, vec![(s.clone(), 0)]);
        }
    }

    #[test]
    fn missing_packs_and_unindexed_blobs_are_reported() {
        for f in fxs() {
            let ids = put_blobs(&f.repo, &[1, 2], 1);
            snapshot(&f.repo, &ids);
            for p in packs(&f.repo) {
                let path = crate::prune::sweep::pack_path(&f.repo, &p);
                let t = crate::repo::pack::read_pack_table(
                    f.repo.backend().as_ref(),
                    &p,
                    f.repo.sealer(),
                )
                .unwrap();
                if t.len() == 2 {
                    std::fs::remove_file(path).unwrap();
                }
            }
            let r = run(&f.repo, false);
            assert!(
                r.problems.iter().any(|p| p.detail.contains("is missing")),
                "{:#?}",
                r.problems
            );
            assert!(
                r.problems
                    .iter()
                    .any(|p| p.blob.as_deref() == Some(&ids[1].to_hex()[..])),
                "{:#?}",
                r.problems
            );
            // Without index files, the tree itself cannot be read.
            for f2 in crate::repo::index::list_index_files(&f.repo).unwrap() {
                std::fs::remove_file(f.repo.index_dir().join(f2)).unwrap();
            }
            let r = run(&f.repo, false);
            assert!(
                r.problems.iter().any(|p| p.snapshot.is_some()),
                "{:#?}",
                r.problems
            );
        }
    }

    #[test]
    fn a_damaged_index_file_is_reported() {
        for f in fxs() {
            let ids = put_blobs(&f.repo, &[1], 1);
            snapshot(&f.repo, &ids);
            let files = crate::repo::index::list_index_files(&f.repo).unwrap();
            let path = f.repo.index_dir().join(&files[0]);
            let mut b = std::fs::read(&path).unwrap();
            b[20] ^= 1;
            std::fs::write(&path, &b).unwrap();
            let r = run(&f.repo, false);
            assert!(
                r.problems
                    .iter()
                    .any(|p| p.detail.contains(&format!("index file {}", files[0]))),
                "{:#?}",
                r.problems
            );
        }
    }
}
