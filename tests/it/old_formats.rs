//! Files in the formats of older versions, built here byte by byte from docs/FORMAT.md (not
//! by the current writers, so that a writer change cannot hide a reader change): snapshot
//! version 1 (no SLICE records), resume journals version 1 (no SLICE records, no unreadable
//! list) and 2 (no unreadable list), and a whole repository of format 1 (chunk files, a
//! version 2 snapshot). The current readers must read them as documented, refuse a version
//! from the future with `Error::UnsupportedVersion`, and refuse to back up into a format-1
//! repository, which stays readable (and verifiable: damaged chunks are still moved aside).

use crate::util::*;
use std::path::Path;
use volback::Error;
use volback::hash::ChunkId;
use volback::repo::format::BlockRef;
use volback::repo::journal::{BatchStats, Journal};
use volback::repo::seal::Sealer;
use volback::repo::snapshot::SnapshotFile;

/// Old repositories are plain.
fn plain() -> Sealer {
    Sealer::plain(volback::hash::HashAlgorithm::Blake3)
}

const BLOCK_SIZE: u32 = 4096;

fn id(byte: u8) -> [u8; 32] {
    [byte; 32]
}

/// Block-reference records (FORMAT.md §4.2).
#[derive(Default)]
struct Records(Vec<u8>);

impl Records {
    fn run(mut self, tag: u8, n: u32) -> Self {
        self.0.push(tag);
        self.0.extend_from_slice(&n.to_le_bytes());
        self
    }
    fn zero(self, n: u32) -> Self {
        self.run(0, n)
    }
    fn unused(self, n: u32) -> Self {
        self.run(1, n)
    }
    fn chunk(mut self, c: [u8; 32]) -> Self {
        self.0.push(2);
        self.0.extend_from_slice(&c);
        self
    }
    fn slice(mut self, hash: [u8; 32], pack: [u8; 32], k: u8) -> Self {
        self.0.push(3);
        self.0.extend_from_slice(&hash);
        self.0.extend_from_slice(&pack);
        self.0.push(k);
        self
    }
}

/// A snapshot file of one segment (FORMAT.md §4) with the given preamble version; returns
/// its bytes and id. The header holds the fields of §4.1 that the first versions wrote.
fn snapshot_bytes(version: u32, records: &[u8], block_count: u64, size: u64) -> (Vec<u8>, String) {
    let header = serde_json::json!({
        "time": "2024-01-02T03:04:05Z",
        "time_unix": 1_704_164_645,
        "hostname": "old-host",
        "source": {
            "path": "/dev/old", "kind": "block-device", "size": size,
            "logical_sector_size": 512, "physical_sector_size": 4096
        },
        "filesystem": null,
        "all_blocks": false,
        "volume_key": "0123456789abcdef0123456789abcdef",
        "block_size": BLOCK_SIZE,
        "block_count": block_count,
        "chunk_hash": "blake3",
        "parent": null,
        "tags": ["old"],
        "stats": {
            "bytes_read": 12288, "data_blocks": 3, "zero_blocks": 2, "unused_blocks": 2,
            "unchanged_blocks": 0, "deduplicated_blocks": 0, "new_chunks": 2,
            "new_bytes": 8192, "new_bytes_stored": 100, "duration_secs": 1.5, "resumed": 0
        },
        "unreadable": []
    });
    let header = serde_json::to_vec(&header).unwrap();
    let segment = zstd::encode_all(records, 3).unwrap();
    let mut preamble = b"VBSNAP\r\n".to_vec();
    preamble.extend_from_slice(&version.to_le_bytes());
    let header_offset = 12 + segment.len() as u64;
    let mut directory = Vec::new();
    directory.extend_from_slice(&12u64.to_le_bytes());
    directory.extend_from_slice(&(segment.len() as u32).to_le_bytes());
    directory.extend_from_slice(&(block_count as u32).to_le_bytes());
    directory.extend_from_slice(blake3::hash(&segment).as_bytes());
    let mut trailer = Vec::new();
    trailer.extend_from_slice(&header_offset.to_le_bytes());
    trailer.extend_from_slice(&(header.len() as u32).to_le_bytes());
    trailer.extend_from_slice(&1u32.to_le_bytes());
    trailer.extend_from_slice(&(header_offset + header.len() as u64).to_le_bytes());
    trailer.extend_from_slice(&0u64.to_le_bytes());
    let mut h = blake3::Hasher::new();
    h.update(&preamble);
    h.update(&header);
    h.update(&directory);
    h.update(&trailer);
    let checksum = h.finalize();
    trailer.extend_from_slice(checksum.as_bytes());
    let mut file = preamble;
    file.extend_from_slice(&segment);
    file.extend_from_slice(&header);
    file.extend_from_slice(&directory);
    file.extend_from_slice(&trailer);
    (file, checksum.to_hex().to_string())
}

/// Every run of the snapshot: (first block, reference, count).
fn runs(snap: &SnapshotFile) -> Vec<(u64, BlockRef, u64)> {
    let mut out = Vec::new();
    snap.for_each_run(|first, r, n| {
        out.push((first, r, n));
        Ok(())
    })
    .unwrap();
    out
}

#[test]
fn snapshot_version_1_is_read() {
    let t = TestDir::new();
    let records = Records::default()
        .zero(2)
        .chunk(id(0xA1))
        .unused(2)
        .chunk(id(0xB2))
        .chunk(id(0xA1));
    let size = 7 * BLOCK_SIZE as u64 - 100;
    let (bytes, sid) = snapshot_bytes(1, &records.0, 7, size);
    let path = t.join(&sid);
    std::fs::write(&path, &bytes).unwrap();

    let snap = SnapshotFile::open(&path, Some(&sid)).unwrap();
    assert_eq!(snap.id(), sid);
    let h = snap.header();
    assert_eq!(h.block_count, 7);
    assert_eq!(h.block_size, BLOCK_SIZE);
    assert_eq!(h.source.size, size);
    assert_eq!(h.tags, ["old"]);
    assert_eq!(h.stats.data_blocks, 3);
    // Fields added since are absent and take their documented defaults.
    assert!(h.filesystem.is_none() && h.layout.is_none());
    assert_eq!(h.consistent, None);
    let (a, b) = (ChunkId(id(0xA1)), ChunkId(id(0xB2)));
    let got: Vec<(u64, BlockRef)> = runs(&snap)
        .into_iter()
        .flat_map(|(first, r, n)| (first..first + n).map(move |i| (i, r)))
        .collect();
    assert_eq!(
        got,
        [
            (0, BlockRef::Zero),
            (1, BlockRef::Zero),
            (2, BlockRef::Chunk(a)),
            (3, BlockRef::Unused),
            (4, BlockRef::Unused),
            (5, BlockRef::Chunk(b)),
            (6, BlockRef::Chunk(a)),
        ]
    );

    // The version is covered by the checksum: the same file called version 2 is damaged.
    let mut v2 = bytes.clone();
    v2[8..12].copy_from_slice(&2u32.to_le_bytes());
    let p2 = t.join("relabelled");
    std::fs::write(&p2, &v2).unwrap();
    assert!(SnapshotFile::open(&p2, Some(&sid)).is_err());
}

#[test]
fn snapshot_version_2_with_slices_is_read() {
    let t = TestDir::new();
    let records = Records::default()
        .slice(id(0x11), id(0xFE), 0)
        .slice(id(0x22), id(0xFE), 1)
        .zero(1);
    let (bytes, sid) = snapshot_bytes(2, &records.0, 3, 3 * BLOCK_SIZE as u64);
    let path = t.join(&sid);
    std::fs::write(&path, &bytes).unwrap();
    let snap = SnapshotFile::open(&path, Some(&sid)).unwrap();
    let r = runs(&snap);
    assert_eq!(
        r[0],
        (
            0,
            BlockRef::Slice {
                hash: ChunkId(id(0x11)),
                pack: ChunkId(id(0xFE)),
                index: 0
            },
            1
        )
    );
    assert_eq!(r.last().unwrap(), &(2, BlockRef::Zero, 1));
}

#[test]
fn snapshot_of_a_future_version_is_unsupported() {
    let t = TestDir::new();
    // Version 3 is format 2's (a tree instead of segments); 9 is from the future.
    let (bytes, sid) = snapshot_bytes(9, &Records::default().zero(1).0, 1, 4096);
    let path = t.join(&sid);
    std::fs::write(&path, &bytes).unwrap();
    match SnapshotFile::open(&path, Some(&sid)) {
        Err(Error::UnsupportedVersion { found: 9, .. }) => {}
        other => panic!(
            "expected UnsupportedVersion, got {:?}",
            other.map(|s| s.id().to_string())
        ),
    }
}

/// A batch to write: first block, count, the ten statistics, unreadable ranges, records.
type BatchSpec<'a> = (u64, u64, [u64; 10], &'a [(u64, u64)], &'a [u8]);

/// A resume journal (FORMAT.md §5) of `version` with a header as the first versions wrote it
/// (no `source_state`) and the given batches (first block, count, stats, unreadable, records);
/// the unreadable list is written only from version 3.
fn journal_bytes(version: u32, batches: &[BatchSpec]) -> Vec<u8> {
    let header = serde_json::json!({
        "source": {
            "path": "/dev/old", "kind": "block-device", "size": 40960,
            "logical_sector_size": 512, "physical_sector_size": 4096
        },
        "volume_key": "0123456789abcdef0123456789abcdef",
        "block_size": BLOCK_SIZE,
        "block_count": 10,
        "chunk_hash": "blake3",
        "parent": null,
        "all_blocks": false,
        "time": "2024-01-02T03:04:05Z",
        "time_unix": 1_704_164_645,
        "tags": []
    });
    let json = serde_json::to_vec(&header).unwrap();
    let mut out = b"VBJRNL\r\n".to_vec();
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(blake3::hash(&json).as_bytes());
    for (first, count, stats, unreadable, records) in batches {
        let mut payload = Vec::new();
        payload.extend_from_slice(&first.to_le_bytes());
        payload.extend_from_slice(&count.to_le_bytes());
        for s in stats {
            payload.extend_from_slice(&s.to_le_bytes());
        }
        if version >= 3 {
            payload.extend_from_slice(&(unreadable.len() as u32).to_le_bytes());
            for (o, l) in *unreadable {
                payload.extend_from_slice(&o.to_le_bytes());
                payload.extend_from_slice(&l.to_le_bytes());
            }
        }
        payload.extend_from_slice(records);
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&payload);
        out.extend_from_slice(blake3::hash(&payload).as_bytes());
    }
    out
}

/// (first block, count, stats, unreadable, records) of every valid batch.
type Seen = Vec<(u64, u64, BatchStats, Vec<(u64, u64)>, Vec<u8>)>;

/// The local backend of the directory holding `path`, and the file's name in it.
fn at(path: &Path) -> (volback::repo::backend::local::LocalDir, String) {
    let dir = path.parent().unwrap();
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    (volback::repo::backend::local::LocalDir::new(dir), name)
}

fn read_journal(path: &Path) -> Seen {
    let mut seen = Vec::new();
    let header = Journal::read_batches(&at(path).0, &at(path).1, &plain(), |_, b| {
        seen.push((
            b.first_block,
            b.block_count,
            b.stats,
            b.unreadable,
            b.records,
        ));
        Ok(())
    })
    .unwrap()
    .expect("a usable journal");
    assert_eq!(header.block_count, 10);
    assert_eq!(
        header.source_state, None,
        "old journals record no source state"
    );
    seen
}

fn old_journal_is_read_and_continued_in_its_layout(version: u32) {
    let t = TestDir::new();
    let path = t.join("old.journal");
    let first = Records::default().zero(2).chunk(id(0xA1));
    let second = if version >= 2 {
        Records::default().slice(id(0x11), id(0xFE), 0).unused(1)
    } else {
        Records::default().chunk(id(0xB2)).unused(1)
    };
    let stats = [4096, 1, 2, 0, 0, 1, 4096, 50, 10, 0];
    let mut bytes = journal_bytes(
        version,
        &[
            (0, 3, stats, &[], &first.0),
            (3, 2, [0, 1, 0, 0, 0, 0, 0, 0, 1, 1], &[], &second.0),
        ],
    );
    let valid = bytes.len() as u64;
    // A torn batch after the valid ones.
    bytes.extend_from_slice(&[200, 0, 0, 0, 1, 2, 3]);
    std::fs::write(&path, &bytes).unwrap();

    let seen = read_journal(&path);
    assert_eq!(seen.len(), 2, "version {version}");
    assert_eq!((seen[0].0, seen[0].1), (0, 3));
    assert_eq!(seen[0].2.bytes_read, 4096);
    assert_eq!(seen[0].2.new_bytes_stored, 50);
    assert!(seen[0].3.is_empty(), "no unreadable list before version 3");
    assert_eq!(seen[0].4, first.0);
    assert_eq!((seen[1].0, seen[1].1), (3, 2));
    assert_eq!(seen[1].2.unused_blocks, 1);
    assert_eq!(seen[1].4, second.0);

    // Continuing it cuts the torn tail and appends in the journal's own layout (its
    // unreadable ranges are dropped: the layout has no room for them).
    let (mut j, _) = Journal::resume(&at(&path).0, &at(&path).1, &plain(), |_, _| Ok(()))
        .unwrap()
        .unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), valid);
    let third = Records::default().zero(5);
    j.append(5, 5, &BatchStats::default(), &[(20480, 512)], &third.0)
        .unwrap();
    drop(j);
    let seen = read_journal(&path);
    assert_eq!(seen.len(), 3, "version {version}");
    assert_eq!((seen[2].0, seen[2].1), (5, 5));
    assert!(seen[2].3.is_empty());
    assert_eq!(seen[2].4, third.0);
    assert_eq!(&std::fs::read(&path).unwrap()[8..12], version.to_le_bytes());
}

#[test]
fn journal_version_1_is_read_and_continued() {
    old_journal_is_read_and_continued_in_its_layout(1);
}

#[test]
fn journal_version_2_is_read_and_continued() {
    old_journal_is_read_and_continued_in_its_layout(2);
}

#[test]
fn journals_of_a_future_version_are_unsupported() {
    let t = TestDir::new();
    let path = t.join("future.journal");
    // Version 4 is format 2's; 9 is from the future.
    std::fs::write(&path, journal_bytes(9, &[])).unwrap();
    assert!(matches!(
        Journal::read_batches(&at(&path).0, &at(&path).1, &plain(), |_, _| Ok(())),
        Err(Error::UnsupportedVersion { found: 9, .. })
    ));
    // Not resumable: the header reads as no usable journal.
    assert!(
        Journal::read_header(&at(&path).0, &at(&path).1, &plain())
            .unwrap()
            .is_none()
    );

    // The journal of a copy (FORMAT.md "Copies"): only version 1 exists.
    let copy_journal = t.join("copy.volback-copy.journal");
    let mut b = b"VBCPJRNL".to_vec();
    b.extend_from_slice(&2u32.to_le_bytes());
    b.extend_from_slice(&2u32.to_le_bytes());
    b.extend_from_slice(b"{}");
    b.extend_from_slice(&[0; 32]);
    std::fs::write(&copy_journal, &b).unwrap();
    assert!(matches!(
        volback::copy::journal::Journal::open(&copy_journal),
        Err(Error::UnsupportedVersion { found: 2, .. })
    ));
}

/// A chunk file (FORMAT.md §3) holding `content` raw; returns its id (BLAKE3 of the content).
fn write_chunk(repo: &Path, content: &[u8]) -> String {
    let id = blake3_hex(content);
    let mut b = b"VBCK".to_vec();
    b.extend_from_slice(&[1, 0, 0, 0]);
    b.extend_from_slice(&(content.len() as u32).to_le_bytes());
    b.extend_from_slice(&(content.len() as u32).to_le_bytes());
    b.extend_from_slice(content);
    let dir = repo.join("chunks").join(&id[..2]);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(&id), b).unwrap();
    id
}

fn hex32(h: &str) -> [u8; 32] {
    hex::decode(h).unwrap().try_into().unwrap()
}

/// A format-1 repository made by hand (FORMAT.md §1-§4): five blocks of 4 KiB — a plain
/// chunk, a zero block, another plain chunk, and two blocks in one pack chunk (SLICE
/// records). Returns the volume's bytes, the snapshot id and the second chunk's id.
pub(crate) fn format1_repository(repo: &Path) -> (Vec<u8>, String, String) {
    for d in ["snapshots", "chunks", "journals", "tmp"] {
        std::fs::create_dir_all(repo.join(d)).unwrap();
    }
    let bs = BLOCK_SIZE as usize;
    let mut rng = Rng::new(3000);
    let mut volume = rng.bytes(5 * bs);
    volume[bs..2 * bs].fill(0);
    let a = write_chunk(repo, &volume[..bs]);
    let b = write_chunk(repo, &volume[2 * bs..3 * bs]);
    let pack = write_chunk(repo, &volume[3 * bs..]);
    let records = Records::default()
        .chunk(hex32(&a))
        .zero(1)
        .chunk(hex32(&b))
        .slice(hex32(&blake3_hex(&volume[3 * bs..4 * bs])), hex32(&pack), 0)
        .slice(hex32(&blake3_hex(&volume[4 * bs..])), hex32(&pack), 1);
    let (bytes, sid) = snapshot_bytes(2, &records.0, 5, 5 * bs as u64);
    std::fs::write(repo.join("snapshots").join(&sid), bytes).unwrap();
    let config = serde_json::json!({
        "format": "volback-repository",
        "version": 1,
        "id": "0123456789abcdef0123456789abcdef",
        "created": "2024-01-02T03:04:05Z",
        "chunk_hash": "blake3",
        "compression": "zstd",
        "zstd_level": 3,
        "block_size": BLOCK_SIZE,
        "pack_size": 4_194_304
    });
    std::fs::write(repo.join("config"), serde_json::to_vec(&config).unwrap()).unwrap();
    (volume, sid, b)
}

/// A format-1 repository is read as before (snapshots, restore, export, verify), a backup
/// into it is refused with a clear message and changes nothing, and `verify --read-data`
/// still moves a damaged chunk aside as `chunks/XX/<id>.bad`.
#[test]
fn format_1_repository_is_readable_and_read_only() {
    let t = TestDir::new();
    let repo = t.join("repo");
    let (volume, sid, b) = format1_repository(&repo);
    let r = p(&repo);
    assert_eq!(snapshot_ids(&repo), vec![sid.clone()]);
    let out = t.join("out.img");
    restore(&repo, "latest", &out);
    assert_eq!(std::fs::read(&out).unwrap(), volume);
    let exported = t.join("export.img");
    volback_ok(&["export", r, &sid[..12], p(&exported), "--format", "raw"]);
    assert_eq!(std::fs::read(&exported).unwrap(), volume);
    volback_ok(&["verify", "--read-data", r]).stdout_has(&["no problems"]);

    let src = t.join("src.img");
    random_file(&src, MIB, 3001);
    volback_code(&["backup", p(&src), r], 1).stderr_has(&["format 1", "read-only"]);
    assert_eq!(
        snapshot_ids(&repo),
        vec![sid.clone()],
        "the refused backup wrote a snapshot"
    );
    assert!(
        !repo.join("packs").exists(),
        "the refused backup made format-2 directories"
    );

    // A flipped byte in the second chunk's payload: moved aside, named, restore fails.
    let chunk = repo.join("chunks").join(&b[..2]).join(&b);
    let mut bytes = std::fs::read(&chunk).unwrap();
    bytes[16 + 100] ^= 0x55;
    std::fs::write(&chunk, &bytes).unwrap();
    volback_code(&["verify", "--read-data", r], 1).stdout_has(&[&b, &sid[..12]]);
    assert!(!chunk.exists(), "the damaged chunk is still in place");
    assert_eq!(
        std::fs::read(chunk.with_file_name(format!("{b}.bad"))).unwrap(),
        bytes,
        "the damaged chunk is kept as <id>.bad"
    );
    let _ = std::fs::remove_file(&out);
    volback_code(&["restore", r, &sid, p(&out)], 1).stderr_has(&[&b[..12]]);
    assert!(!out.exists(), "a failed restore left its file");
}
