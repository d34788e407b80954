//! The real paths — backup, resume, restore, verify, forget, prune — on a plain and on an
//! encrypted repository (objects sealed, blob ids keyed, chunker seeded), and what an
//! encrypted repository must never hold: plaintext of the volume or of its metadata.

use crate::backup::{BackupOptions, backup};
use crate::error::Error;
use crate::forget::{ForgetRequest, forget};
use crate::progress::{Progress, Silent};
use crate::prune::{PruneOptions, prune};
use crate::repo::reader::SnapshotVolume;
use crate::repo::{InitOptions, Repository};
use crate::restore::{RestoreOptions, plan_restore, restore};
use crate::source::Source;
use crate::verify::{VerifyOptions, VerifyReport, verify};
use crate::volume::Volume;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// `n` pseudo-random bytes from `seed`.
fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    v
}

/// A volume image: random data, a run of zeros, text (compressible), the first MiB again
/// (deduplicated), more random data (more than two 16 MiB runs in all, so that a backup can
/// be interrupted after the first); not a multiple of the block size.
fn image(seed: u64) -> Vec<u8> {
    let mut v = noise(seed, 3 << 20);
    v.extend_from_slice(&vec![0u8; 1 << 20]);
    let mut text = b"The quick brown fox jumps over the lazy dog. ".repeat(30_000);
    text.truncate(328 * 4096);
    v.extend_from_slice(&text);
    let first: Vec<u8> = v[..1 << 20].to_vec();
    v.extend_from_slice(&first);
    v.extend_from_slice(&noise(seed + 1, (30 << 20) + 1234));
    v
}

struct Fixture {
    dir: tempfile::TempDir,
    sealed: bool,
}

impl Fixture {
    fn new(sealed: bool) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let opts = InitOptions {
            pack_size: 1 << 20,
            ..InitOptions::default()
        };
        drop(Repository::init(&dir.path().join("repo"), &opts).unwrap());
        Fixture { dir, sealed }
    }

    /// The repository, opened as a command would (sealed when the fixture is).
    fn repo(&self) -> Repository {
        let r = Repository::open(&self.dir.path().join("repo")).unwrap();
        if self.sealed {
            r.encrypted_for_tests()
        } else {
            r
        }
    }

    fn img(&self) -> PathBuf {
        self.dir.path().join("vol.img")
    }
}

fn opts() -> BackupOptions {
    BackupOptions {
        threads: 2,
        checkpoint_interval: std::time::Duration::ZERO,
        ..Default::default()
    }
}

/// Restores snapshot `id` into a new file through the real restore and returns its bytes.
fn restored(repo: &Repository, id: &str, dir: &Path) -> Vec<u8> {
    let vol = SnapshotVolume::open(repo, id, None).unwrap();
    let target = dir.join(format!("restored-{}", &id[..8]));
    let plan = plan_restore(&target, vol.size(), &[]).unwrap();
    restore(&vol, &plan, &RestoreOptions::default(), &Silent).unwrap();
    let bytes = std::fs::read(&target).unwrap();
    std::fs::remove_file(&target).unwrap();
    bytes
}

fn verify_all(repo: &Repository) -> VerifyReport {
    verify(
        repo,
        &[],
        &VerifyOptions {
            read_data: true,
            threads: 2,
        },
        &Silent,
    )
    .unwrap()
}

fn assert_clean(repo: &Repository) {
    let r = verify_all(repo);
    assert!(r.problems.is_empty(), "{:#?}", r.problems);
    assert!(r.packs_checked > 0 && r.bytes_checked > 0);
}

/// Every regular file under `root`.
fn files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(root).unwrap().flatten() {
        let t = e.file_type().unwrap();
        if t.is_dir() {
            out.extend(files(&e.path()));
        } else if t.is_file() {
            out.push(e.path());
        }
    }
    out.sort();
    out
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

fn full_cycle(sealed: bool) {
    let f = Fixture::new(sealed);
    let data = image(1);
    std::fs::write(f.img(), &data).unwrap();
    let repo = f.repo();
    // One worker: frames land in packs in one order, so which packs the forget below leaves
    // partly dead (repacked) or wholly dead (deleted) does not depend on thread timing.
    let opts = || BackupOptions {
        threads: 1,
        ..opts()
    };

    // Full backup, read back through restore; verify authenticates everything.
    let first = backup(&repo, &Source::open(&f.img()).unwrap(), &opts(), &Silent).unwrap();
    assert!(first.stats.deduplicated_blocks >= 128, "{:?}", first.stats);
    assert!(restored(&repo, &first.snapshot_id, f.dir.path()) == data);
    assert_clean(&repo);

    // An incremental backup after a change.
    let mut changed = data.clone();
    changed[(1 << 20) + 5000..(1 << 20) + 5000 + 70_000].copy_from_slice(&noise(9, 70_000));
    std::fs::write(f.img(), &changed).unwrap();
    let second = backup(&repo, &Source::open(&f.img()).unwrap(), &opts(), &Silent).unwrap();
    assert_eq!(second.parent.as_deref(), Some(first.snapshot_id.as_str()));
    assert!(second.this_run.new_bytes < 1 << 20, "{:?}", second.this_run);
    assert!(restored(&repo, &second.snapshot_id, f.dir.path()) == changed);

    // An interrupted backup, resumed from its journal.
    let mut third_data = changed.clone();
    third_data[..1 << 20].copy_from_slice(&noise(11, 1 << 20));
    third_data[6 << 20..(6 << 20) + 100_000].copy_from_slice(&noise(12, 100_000));
    std::fs::write(f.img(), &third_data).unwrap();
    let flag = Arc::new(AtomicBool::new(false));
    let cancelled = BackupOptions {
        cancel: Some(flag.clone()),
        threads: 1,
        ..opts()
    };
    let src = Source::open(&f.img()).unwrap();
    match backup(&repo, &src, &cancelled, &CancelAtFirstBlock(flag)) {
        Err(Error::Interrupted { checkpointed: true }) => {}
        other => panic!("the backup was not interrupted: {other:?}"),
    }
    let journals = files(&repo.journals_dir());
    let journal = journals
        .iter()
        .find(|p| p.extension().is_some_and(|e| e == "journal"))
        .expect("a journal");
    let journal_bytes = std::fs::read(journal).unwrap();
    // Stats and settings of the journal are not in the clear when sealed.
    assert_eq!(
        journal_bytes.windows(10).any(|w| w == b"block_size"),
        !sealed
    );
    // Prune's mark reads the sealed journal: its blobs are live.
    let live = crate::prune::mark::mark(&repo, &*repo.blobs().unwrap(), &Silent).unwrap();
    assert_eq!((live.snapshots, live.journals), (2, 1));
    let third = backup(&repo, &src, &opts(), &Silent).unwrap();
    assert!(third.resumed, "the interrupted backup was continued");
    assert!(restored(&repo, &third.snapshot_id, f.dir.path()) == third_data);
    assert_clean(&repo);

    // Nothing of the volume or of the metadata in the clear.
    let all = files(repo.root());
    if sealed {
        no_plaintext(&all, &[&data, &changed, &third_data], &repo);
    }

    // Forget the first two, prune (repacks partly dead packs), the last one still reads.
    let r = forget(
        &repo,
        &ForgetRequest {
            snapshots: vec![first.snapshot_id.clone(), second.snapshot_id.clone()],
            ..ForgetRequest::default()
        },
        &Silent,
    )
    .unwrap();
    assert_eq!(r.removed, 2);
    let p = prune(
        &repo,
        &PruneOptions {
            max_unused_percent: 0.0,
            ..PruneOptions::default()
        },
        &Silent,
    )
    .unwrap();
    assert!(p.packs_deleted > 0, "{p:#?}");
    assert!(p.packs_repacked > 0, "{p:#?}");
    let again = f.repo();
    assert_clean(&again);
    assert!(restored(&again, &third.snapshot_id, f.dir.path()) == third_data);
    let p = prune(&again, &PruneOptions::default(), &Silent).unwrap();
    assert_eq!((p.packs_deleted, p.packs_repacked), (0, 0), "{p:#?}");
    if sealed {
        no_plaintext(&files(again.root()), &[&third_data], &again);
        // The same repository read without its keys: no snapshot opens.
        let plain = Repository::open(again.root()).unwrap();
        assert!(plain.open_snapshot(&third.snapshot_id).is_err());
    }
}

/// No file of the repository holds 32 consecutive bytes of any volume's random or text
/// parts, a plain chunk, index, snapshot or tree magic, or a JSON key of the metadata; blob
/// ids are keyed.
fn no_plaintext(all: &[PathBuf], volumes: &[&Vec<u8>], repo: &Repository) {
    let mut needles: Vec<Vec<u8>> = Vec::new();
    for v in volumes {
        for at in [0usize, 1 << 20, 3 << 20, (4 << 20) + 777, v.len() - 40] {
            let piece = &v[at..at + 32];
            if piece.iter().any(|&b| b != 0) {
                needles.push(piece.to_vec());
            }
        }
    }
    for magic in [
        &b"VBCK"[..],
        b"VBINDEX\n",
        b"VBSNAP\r\n",
        b"VBTN",
        b"\"hostname\"",
        b"\"packs\"",
        b"\"knows\"",
        b"volume_key",
    ] {
        needles.push(magic.to_vec());
    }
    // A plain (unkeyed) blob id of the first block would betray the content.
    let first_block = &volumes[0][..4096];
    let unkeyed = *blake3::hash(first_block).as_bytes();
    assert_ne!(repo.sealer().blob_id(first_block).0, unkeyed);
    needles.push(unkeyed.to_vec());
    let mut checked = 0;
    for p in all {
        let name = p.file_name().unwrap().to_string_lossy();
        if name == "config" || name.ends_with(".lock") || name == "lock" {
            continue;
        }
        let bytes = std::fs::read(p).unwrap();
        for n in &needles {
            assert!(
                !bytes.windows(n.len()).any(|w| w == &n[..]),
                "{} holds plaintext {:?}",
                p.display(),
                String::from_utf8_lossy(&n[..n.len().min(16)])
            );
        }
        checked += 1;
    }
    assert!(checked > 5, "{checked} files checked");
}

#[test]
fn plain_backup_restore_verify_forget_prune() {
    full_cycle(false);
}

#[test]
fn encrypted_backup_restore_verify_forget_prune() {
    full_cycle(true);
}

/// Encrypted: a changed byte anywhere is found, and the error names the object.
#[test]
fn tampering_is_detected_and_named() {
    let f = Fixture::new(true);
    let data = image(3);
    std::fs::write(f.img(), &data).unwrap();
    let repo = f.repo();
    let done = backup(&repo, &Source::open(&f.img()).unwrap(), &opts(), &Silent).unwrap();
    assert_clean(&repo);
    let id = done.snapshot_id;
    let flip = |p: &Path, at: usize| {
        let mut b = std::fs::read(p).unwrap();
        b[at] ^= 0x20;
        std::fs::write(p, &b).unwrap();
    };

    // A frame of a data pack: verify --read-data names the pack and the frame's offset.
    let store = repo.blobs().unwrap();
    let packs = store.with_index(|i| i.packs());
    let (pack, entry) = packs
        .iter()
        .find_map(|p| {
            let entries = store.with_index(|i| i.pack_entries(p).map(|e| e.to_vec()))?;
            let e = entries
                .into_iter()
                .find(|e| e.kind == crate::repo::blob::BlobKind::Data)?;
            Some((*p, e))
        })
        .unwrap();
    let path = store.pack_path(&pack);
    let original = std::fs::read(&path).unwrap();
    flip(&path, entry.frame_offset as usize + 100);
    // Reading the blob through the store names the pack and the authentication failure.
    let fresh = f.repo();
    let e = crate::repo::blob::BlobSource::blob(
        &*fresh.blobs().unwrap(),
        &entry.id,
        crate::repo::blob::BlobKind::Data,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains(&pack.to_hex()) && e.contains("authentication failed"),
        "{e}"
    );
    drop(fresh);
    let r = verify_all(&repo);
    let problem = r
        .problems
        .iter()
        .find(|p| p.detail.contains("authentication failed"))
        .unwrap_or_else(|| panic!("{:#?}", r.problems));
    assert!(
        problem.detail.contains(&pack.to_hex()),
        "{}",
        problem.detail
    );
    assert!(
        problem
            .detail
            .contains(&format!("frame at offset {}", entry.frame_offset)),
        "{}",
        problem.detail
    );
    // (verify set the damaged pack aside; put it back as it was for the next checks.)
    let aside: Vec<PathBuf> = files(&repo.packs_dir())
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(".bad"))
        .collect();
    for a in aside {
        std::fs::remove_file(a).unwrap();
    }
    std::fs::write(&path, &original).unwrap();

    // A snapshot file, renamed to its new hash: opening it names the snapshot.
    let snap_path = repo.snapshots_dir().join(&id);
    let mut s = std::fs::read(&snap_path).unwrap();
    s[50] ^= 1;
    let bad_id = blake3::hash(&s).to_hex().to_string();
    std::fs::write(repo.snapshots_dir().join(&bad_id), &s).unwrap();
    let e = repo.open_snapshot(&bad_id).unwrap_err().to_string();
    assert!(
        e.contains(&format!("snapshot {bad_id}")) && e.contains("authentication failed"),
        "{e}"
    );
    let r = verify(
        &repo,
        std::slice::from_ref(&bad_id),
        &VerifyOptions::default(),
        &Silent,
    )
    .unwrap();
    assert!(
        r.problems
            .iter()
            .any(|p| p.snapshot.as_deref() == Some(&bad_id[..])),
        "{:#?}",
        r.problems
    );
    std::fs::remove_file(repo.snapshots_dir().join(&bad_id)).unwrap();

    // An index file, renamed to its new hash: verify names it.
    let index_files = crate::repo::index::list_index_files(&repo).unwrap();
    let ipath = repo.index_dir().join(&index_files[0]);
    let mut ib = std::fs::read(&ipath).unwrap();
    ib[60] ^= 1;
    let bad_index = blake3::hash(&ib).to_hex().to_string();
    std::fs::write(repo.index_dir().join(&bad_index), &ib).unwrap();
    let r = verify_all(&f.repo());
    assert!(
        r.problems
            .iter()
            .any(|p| p.detail.contains(&format!("index file {bad_index}"))
                && p.detail.contains("authentication failed")),
        "{:#?}",
        r.problems
    );
    std::fs::remove_file(repo.index_dir().join(&bad_index)).unwrap();
    assert_clean(&f.repo());

    // Another repository's keys open nothing.
    let mut other = Repository::open(repo.root()).unwrap();
    other.set_sealer_for_tests(crate::repo::seal::testing::encrypted("not this one"));
    assert!(other.open_snapshot(&id).is_err());
    assert!(other.blobs().is_err(), "index files do not open");
}
