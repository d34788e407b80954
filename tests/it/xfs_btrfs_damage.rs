//! Damaged but repairable XFS and btrfs allocation metadata (issue 11, item 2): a map built
//! from it must never be smaller than the filesystem's real allocation. Filesystems made by
//! `mkfs.xfs` / `mkfs.btrfs` and filled through a loop mount are damaged on purpose (with and
//! without recomputing the checksums, so that the cross-checks and not only the CRCs are
//! exercised); each backup must either warn and read every block (its restore then equals the
//! damaged source bit for bit) or keep every block the undamaged filesystem used.

use crate::util::*;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use volback::volume::Volume;

const XFS_SIZE: u64 = 300 * MIB;
const BTRFS_SIZE: u64 = 160 * MIB;
/// Granularity of the reference map of the undamaged filesystem.
const GRAIN: u64 = 4096;

/// CRC-32C (Castagnoli, reflected), bit by bit: what XFS v5 and btrfs use.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn read_bytes(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    File::open(path)
        .and_then(|f| f.read_exact_at(&mut b, offset))
        .unwrap_or_else(|e| panic!("read {} at {offset}: {e}", path.display()));
    b
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// An image file as a [`Volume`], to ask the library for the undamaged filesystem's map.
struct FileVolume(File, u64);

impl Volume for FileVolume {
    fn size(&self) -> u64 {
        self.1
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> volback::error::Result<()> {
        self.0
            .read_exact_at(buf, offset)
            .map_err(|e| volback::Error::io("read", "image", e))
    }
    fn describe(&self) -> String {
        "image".into()
    }
}

/// The used block runs (in [`GRAIN`] units) of the filesystem in `img`; panics when the
/// library gives no map (the undamaged filesystem must map).
fn used_runs(img: &Path) -> Vec<std::ops::Range<u64>> {
    let f = File::open(img).unwrap();
    let size = f.metadata().unwrap().len();
    let probe = volback::fs::probe(&FileVolume(f, size), GRAIN).unwrap();
    let map = probe
        .map
        .unwrap_or_else(|| panic!("no map of the undamaged image: {:?}", probe.warning));
    map.used_runs().collect()
}

/// Makes a filesystem in a new image, writes files through a loop mount and deletes a third
/// of them (several free extents with used space between them). Returns the image.
fn make_fs(t: &TestDir, fs: &str, seed: u64) -> PathBuf {
    let img = t.join(&format!("{fs}.img"));
    let size = if fs == "xfs" { XFS_SIZE } else { BTRFS_SIZE };
    sparse_file(&img, size);
    let lo = Loop::attach(&img, false);
    match fs {
        "xfs" => run_ok("mkfs.xfs", &["-q", "-f", p(&lo.dev)]),
        _ => run_ok(
            "mkfs.btrfs",
            &["-q", "-f", "-m", "dup", "-d", "single", p(&lo.dev)],
        ),
    };
    let m = Mount::new(&lo.dev, &t.join(&format!("{fs}-mnt")), None);
    let mut rng = Rng::new(seed);
    let mut files = Vec::new();
    for i in 0..60 {
        let dir = m.dir.join(format!("d{}", i % 4));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join(format!("f{i:02}"));
        let len = (16 * KIB + rng.below(400 * KIB)) as usize;
        std::fs::write(&f, rng.bytes(len)).unwrap();
        files.push(f);
    }
    run_ok("sync", &["-f", p(&m.dir)]);
    for f in files.iter().step_by(3) {
        std::fs::remove_file(f).unwrap();
    }
    run_ok("sync", &["-f", p(&m.dir)]);
    m.unmount();
    drop(lo);
    img
}

/// Backs `img` up into `repo` and restores it to `out`: (every block read?, stderr).
/// A repository in `t` holding a backup of the undamaged `img` (which must map), and the
/// blocks `img` uses.
fn clean_baseline(t: &TestDir, img: &Path) -> (PathBuf, Vec<std::ops::Range<u64>>) {
    let repo = t.join("repo");
    init_repo(&repo, &[]);
    let clean = backup_and_restore(img, &repo, &t.join("clean.img"));
    assert!(!clean.0, "the undamaged filesystem must map: {}", clean.1);
    (repo, used_runs(img))
}

fn backup_and_restore(img: &Path, repo: &Path, out: &Path) -> (bool, String) {
    let r = volback_ok(&["backup", "--json", p(img), p(repo)]);
    let d = r.json();
    restore(repo, jstr(&d, "/snapshot"), out);
    (d["all_blocks"] == true, r.stderr)
}

/// The property: either the backup warned and read every block (the restore equals the
/// damaged source bit for bit), or every block the undamaged filesystem used holds in the
/// restore what it holds in the damaged source.
fn assert_nothing_lost(
    what: &str,
    damaged: &Path,
    restored: &Path,
    (all_blocks, stderr): (bool, String),
    used: &[std::ops::Range<u64>],
) {
    if all_blocks {
        assert!(
            stderr.contains("allocation data is unusable") && stderr.contains("every block"),
            "{what}: every block read without saying why: {stderr}"
        );
        assert_eq!(
            sha256_file(damaged),
            sha256_file(restored),
            "{what}: the restore differs from the damaged source"
        );
        return;
    }
    let (a, b) = (File::open(damaged).unwrap(), File::open(restored).unwrap());
    let mut x = vec![0u8; MIB as usize];
    let mut y = vec![0u8; MIB as usize];
    for run in used {
        let (mut at, end) = (run.start * GRAIN, run.end * GRAIN);
        while at < end {
            let n = (end - at).min(MIB) as usize;
            a.read_exact_at(&mut x[..n], at).unwrap();
            b.read_exact_at(&mut y[..n], at).unwrap();
            assert!(
                x[..n] == y[..n],
                "{what}: a map was trusted and bytes {at}..{} that the filesystem uses were \
                 lost (stderr: {stderr})",
                at + n as u64
            );
            at += n as u64;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// XFS

/// XFS geometry read from the primary superblock.
struct Xfs {
    block: u64,
    sect: u64,
    agblocks: u64,
    agcount: u64,
}

impl Xfs {
    fn read(img: &Path) -> Xfs {
        let sb = read_bytes(img, 0, 512);
        assert_eq!(&sb[0..4], b"XFSB");
        assert_eq!(
            u16::from_be_bytes([sb[100], sb[101]]) & 0xF,
            5,
            "v5 expected"
        );
        Xfs {
            block: u64::from(be32(&sb, 4)),
            sect: u64::from(u16::from_be_bytes([sb[102], sb[103]])),
            agblocks: u64::from(be32(&sb, 84)),
            agcount: u64::from(be32(&sb, 88)),
        }
    }

    /// Byte offset of sector `i` (1 AGF, 2 AGI, 3 AGFL) of AG `ag`.
    fn sector(&self, ag: u64, i: u64) -> u64 {
        ag * self.agblocks * self.block + i * self.sect
    }

    fn block_at(&self, ag: u64, bno: u64) -> u64 {
        (ag * self.agblocks + bno) * self.block
    }

    /// (bnobt root, cntbt root) of AG `ag`, both single leaves on these small filesystems.
    fn roots(&self, img: &Path, ag: u64) -> (u64, u64) {
        let agf = read_bytes(img, self.sector(ag, 1), 64);
        assert_eq!(be32(&agf, 28), 1, "a one-level bnobt expected");
        (u64::from(be32(&agf, 16)), u64::from(be32(&agf, 20)))
    }

    /// Recomputes the CRC of the metadata at `offset`: an AG header sector or a btree block.
    fn recrc(&self, img: &Path, offset: u64, kind: XfsMeta) {
        let (len, field) = match kind {
            XfsMeta::Sb => (self.sect, 224),
            XfsMeta::Agf => (self.sect, 216),
            XfsMeta::Agi => (self.sect, 312),
            XfsMeta::Agfl => (self.sect, 32),
            XfsMeta::Btree => (self.block, 52),
        };
        let mut b = read_bytes(img, offset, len as usize);
        b[field..field + 4].fill(0);
        write_at(img, offset + field as u64, &crc32c(&b).to_le_bytes());
    }
}

#[derive(Clone, Copy, Debug)]
enum XfsMeta {
    Sb,
    Agf,
    Agi,
    Agfl,
    Btree,
}

fn xfs_ready() -> bool {
    require_root_loop_and(&["mkfs.xfs"], false)
}

/// The AG with the most free extents (at least two: one preceded by used space).
fn fragmented_ag(x: &Xfs, img: &Path) -> (u64, Vec<(u32, u32)>) {
    (0..x.agcount)
        .map(|ag| {
            let leaf = read_bytes(img, x.block_at(ag, x.roots(img, ag).0), x.block as usize);
            let n = u16::from_be_bytes([leaf[6], leaf[7]]) as usize;
            let recs = (0..n)
                .map(|i| (be32(&leaf, 56 + 8 * i), be32(&leaf, 60 + 8 * i)))
                .collect::<Vec<_>>();
            (ag, recs)
        })
        .max_by_key(|(_, r)| r.len())
        .filter(|(_, r)| r.len() >= 2)
        .expect("an AG with two free extents")
}

/// A bnobt record of the most fragmented AG is stretched back over the used blocks before
/// it: with a stale CRC, with the leaf's CRC recomputed (the AGF's free count disagrees), and
/// with the AGF's free count and longest extent changed to match (only the by-size tree
/// disagrees). Each backup must warn and read every block.
#[test]
fn xfs_free_space_claiming_used_blocks_is_not_trusted() {
    if !xfs_ready() {
        return;
    }
    let t = TestDir::new();
    let img = make_fs(&t, "xfs", 110);
    let (repo, used) = clean_baseline(&t, &img);

    let x = Xfs::read(&img);
    let (ag, recs) = fragmented_ag(&x, &img);
    let (bno_root, _) = x.roots(&img, ag);
    let leaf_at = x.block_at(ag, bno_root);
    // Record 1 starts after used blocks that follow record 0: claim them free.
    let (s0, c0) = recs[0];
    let (s1, c1) = recs[1];
    let new_start = s0 + c0 + 1;
    assert!(
        new_start < s1,
        "used blocks between the first two free extents"
    );
    let grow = s1 - new_start;
    let agf_at = x.sector(ag, 1);
    let agf = read_bytes(&img, agf_at, 64);
    let freeblks = be32(&agf, 52) + grow;
    let longest = be32(&agf, 56).max(c1 + grow);

    let cases: [(&str, bool, bool, &str); 3] = [
        ("stale CRC", false, false, "checksum mismatch"),
        ("AGF free count", true, false, "the AGF counts"),
        (
            "by-size tree",
            true,
            true,
            "not in the by-block free-space btree",
        ),
    ];
    for (name, recrc, fix_agf, want) in cases {
        let damaged = t.join("damaged.img");
        std::fs::copy(&img, &damaged).unwrap();
        let rec = leaf_at + 56 + 8;
        write_at(&damaged, rec, &new_start.to_be_bytes());
        write_at(&damaged, rec + 4, &(c1 + grow).to_be_bytes());
        if recrc {
            x.recrc(&damaged, leaf_at, XfsMeta::Btree);
        }
        if fix_agf {
            write_at(&damaged, agf_at + 52, &freeblks.to_be_bytes());
            write_at(&damaged, agf_at + 56, &longest.to_be_bytes());
            x.recrc(&damaged, agf_at, XfsMeta::Agf);
        }
        let out = t.join("restored.img");
        let outcome = backup_and_restore(&damaged, &repo, &out);
        assert!(
            outcome.0,
            "{name}: a damaged map was trusted: {}",
            outcome.1
        );
        assert!(
            outcome.1.contains("xfs allocation data is unusable") && outcome.1.contains(want),
            "{name}: {}",
            outcome.1
        );
        assert_nothing_lost(name, &damaged, &out, outcome, &used);
    }

    // A free count raised alone, with its CRC recomputed.
    let damaged = t.join("damaged.img");
    std::fs::copy(&img, &damaged).unwrap();
    write_at(&damaged, agf_at + 52, &freeblks.to_be_bytes());
    x.recrc(&damaged, agf_at, XfsMeta::Agf);
    let out = t.join("restored.img");
    let outcome = backup_and_restore(&damaged, &repo, &out);
    assert!(outcome.1.contains("the AGF counts"), "{}", outcome.1);
    assert_nothing_lost("AGF count alone", &damaged, &out, outcome, &used);
}

/// The records (start, count) of a one-leaf free-space btree whose leaf is at byte `at`.
fn leaf_records(img: &Path, at: u64, block: u64) -> Vec<(u32, u32)> {
    let leaf = read_bytes(img, at, block as usize);
    let n = u16::from_be_bytes([leaf[6], leaf[7]]) as usize;
    (0..n)
        .map(|i| (be32(&leaf, 56 + 8 * i), be32(&leaf, 60 + 8 * i)))
        .collect()
}

/// Writes `recs` as the records of the one-leaf free-space btree at byte `at`.
fn write_leaf_records(img: &Path, at: u64, recs: &[(u32, u32)]) {
    write_at(img, at + 6, &(recs.len() as u16).to_be_bytes());
    let body: Vec<u8> = recs
        .iter()
        .flat_map(|(s, c)| [s.to_be_bytes(), c.to_be_bytes()].concat())
        .collect();
    write_at(img, at + 56, &body);
}

/// The data extents (AG, AG block, count) of inode `ino`, as `xfs_db bmap` prints them
/// ("data offset 0 startblock 12345 (1/4153) count 3072 flag 0").
fn xfs_db_bmap(img: &Path, ino: u64) -> Vec<(u64, u64, u64)> {
    let out = run_ok(
        "xfs_db",
        &["-r", "-c", &format!("inode {ino}"), "-c", "bmap", p(img)],
    );
    out.stdout
        .lines()
        .filter_map(|l| {
            let l = l.strip_prefix("data offset ")?;
            let (_, rest) = l.split_once('(')?;
            let (agbno, rest) = rest.split_once(')')?;
            let (ag, bno) = agbno.split_once('/')?;
            let count = rest.split_whitespace().nth(1)?;
            Some((ag.parse().ok()?, bno.parse().ok()?, count.parse().ok()?))
        })
        .collect()
}

/// The red-team repro, made deterministic: a free extent of the bnobt and the cntbt is
/// widened back over a file's data, and the AGF (free count, longest extent) and the
/// superblock's free count are adjusted to match with every checksum recomputed, so that
/// the free-space trees, the AGF and the superblock all agree (the kernel mounts it and
/// xfs_repair keeps the file). Only the inodes disagree: the backup must warn, name the
/// inode, read every block, and restore bit for bit.
#[test]
fn xfs_free_space_over_a_files_data_is_not_trusted() {
    if !require_root_loop_and(&["mkfs.xfs", "xfs_db"], false) {
        return;
    }
    let t = TestDir::new();
    let img = t.join("xfs.img");
    sparse_file(&img, 512 * MIB);
    let lo = Loop::attach(&img, false);
    run_ok("mkfs.xfs", &["-q", "-f", p(&lo.dev)]);
    let m = Mount::new(&lo.dev, &t.join("xfs-mnt"), None);
    let mut rng = Rng::new(0x0B_0B7);
    let mut inodes = Vec::new();
    for i in 0..16 {
        let f = m.dir.join(format!("f{i:02}"));
        std::fs::write(&f, rng.bytes((12 * MIB) as usize)).unwrap();
        inodes.push(std::os::unix::fs::MetadataExt::ino(
            &std::fs::metadata(&f).unwrap(),
        ));
    }
    run_ok("sync", &["-f", p(&m.dir)]);
    m.unmount();
    drop(lo);
    let (repo, used) = clean_baseline(&t, &img);

    // A file extent followed, in its AG, by a free extent: that free extent is stretched
    // back to the file extent's start.
    let x = Xfs::read(&img);
    let (ino, ag, start, recs, i) = inodes
        .iter()
        .flat_map(|&ino| {
            xfs_db_bmap(&img, ino)
                .into_iter()
                .map(move |(ag, bno, _)| (ino, ag, bno))
        })
        .find_map(|(ino, ag, bno)| {
            let agf = read_bytes(&img, x.sector(ag, 1), 64);
            if be32(&agf, 28) != 1 || be32(&agf, 32) != 1 {
                return None;
            }
            let recs = leaf_records(&img, x.block_at(ag, x.roots(&img, ag).0), x.block);
            let i = recs.iter().position(|&(s, _)| u64::from(s) > bno)?;
            Some((ino, ag, bno as u32, recs, i))
        })
        .expect("a file extent with free space after it in its AG");
    let (bno_root, cnt_root) = x.roots(&img, ag);
    let grow = recs[i].0 - start;
    let mut widened = recs.clone();
    widened[i] = (start, recs[i].1 + grow);
    let mut by_size = widened.clone();
    by_size.sort_by_key(|&(s, c)| (c, s));

    let damaged = t.join("damaged.img");
    std::fs::copy(&img, &damaged).unwrap();
    write_leaf_records(&damaged, x.block_at(ag, bno_root), &widened);
    x.recrc(&damaged, x.block_at(ag, bno_root), XfsMeta::Btree);
    write_leaf_records(&damaged, x.block_at(ag, cnt_root), &by_size);
    x.recrc(&damaged, x.block_at(ag, cnt_root), XfsMeta::Btree);
    let agf_at = x.sector(ag, 1);
    let agf = read_bytes(&damaged, agf_at, 64);
    let longest = widened.iter().map(|r| r.1).max().unwrap();
    write_at(
        &damaged,
        agf_at + 52,
        &(be32(&agf, 52) + grow).to_be_bytes(),
    );
    write_at(&damaged, agf_at + 56, &longest.to_be_bytes());
    x.recrc(&damaged, agf_at, XfsMeta::Agf);
    let sb = read_bytes(&damaged, 0, 512);
    let fdblocks = u64::from_be_bytes(sb[144..152].try_into().unwrap()) + u64::from(grow);
    write_at(&damaged, 144, &fdblocks.to_be_bytes());
    x.recrc(&damaged, 0, XfsMeta::Sb);

    let out = t.join("restored.img");
    let outcome = backup_and_restore(&damaged, &repo, &out);
    assert!(
        outcome.0,
        "free space over inode {ino}'s data (AG {ag} block {start}) was trusted: {}",
        outcome.1
    );
    assert!(
        outcome.1.contains("xfs allocation data is unusable")
            && outcome
                .1
                .contains(&format!("the free-space tree of AG {ag} lists block"))
            && outcome.1.contains("but inode"),
        "{}",
        outcome.1
    );
    assert_nothing_lost("free space over a file", &damaged, &out, outcome, &used);
}

/// Random bytes of AG headers and free-space tree blocks, half of them with the checksum
/// recomputed: never a smaller map that drops data.
#[test]
fn xfs_random_damage_to_allocation_metadata_never_drops_data() {
    if !xfs_ready() {
        return;
    }
    let t = TestDir::new();
    let img = make_fs(&t, "xfs", 111);
    let repo = t.join("repo");
    init_repo(&repo, &[]);
    let used = used_runs(&img);
    let x = Xfs::read(&img);
    let mut rng = Rng::new(0x5EED_0011);
    let mut fell_back = 0;
    for case in 0..10 {
        let damaged = t.join("damaged.img");
        std::fs::copy(&img, &damaged).unwrap();
        let ag = rng.below(x.agcount);
        let (bno, cnt) = x.roots(&img, ag);
        let (at, len, kind) = match rng.below(5) {
            0 => (x.sector(ag, 1), 64, XfsMeta::Agf),
            1 => (x.sector(ag, 2), 40, XfsMeta::Agi),
            2 => (x.sector(ag, 3), 64, XfsMeta::Agfl),
            3 => (x.block_at(ag, bno), 128, XfsMeta::Btree),
            _ => (x.block_at(ag, cnt), 128, XfsMeta::Btree),
        };
        let recrc = case % 2 == 0;
        let mut hits = Vec::new();
        for _ in 0..1 + rng.below(3) {
            let o = at + rng.below(len);
            let v = rng.below(256) as u8;
            write_at(&damaged, o, &[v]);
            hits.push((o - at, v));
        }
        if recrc {
            x.recrc(&damaged, at, kind);
        }
        let what = format!("case {case}: AG {ag} {kind:?} bytes {hits:?}, CRC recomputed {recrc}");
        let out = t.join("restored.img");
        let outcome = backup_and_restore(&damaged, &repo, &out);
        eprintln!("{what}: every block {}", outcome.0);
        fell_back += u32::from(outcome.0);
        assert_nothing_lost(&what, &damaged, &out, outcome, &used);
    }
    assert!(fell_back > 0, "no case was caught: the damage is too weak");
}

// ---------------------------------------------------------------------------------------------
// btrfs

const BTRFS_SB: u64 = 64 * KIB;
const NODE_HEADER: usize = 101;
const ITEM: usize = 25;

fn btrfs_ready() -> bool {
    require_root_loop_and(&["mkfs.btrfs", "btrfs"], false)
}

/// The extent tree's blocks (logical addresses, leaves and nodes) as `btrfs inspect-internal`
/// lists them.
fn extent_tree_blocks(img: &Path) -> Vec<(u64, bool)> {
    let dump = run_ok(
        "btrfs",
        &["inspect-internal", "dump-tree", "-t", "extent", p(img)],
    );
    let blocks: Vec<(u64, bool)> = dump
        .stdout
        .lines()
        .filter_map(|l| {
            let leaf = l.starts_with("leaf ");
            let rest = l
                .strip_prefix("leaf ")
                .or_else(|| l.strip_prefix("node "))?;
            Some((rest.split_whitespace().next()?.parse().ok()?, leaf))
        })
        .collect();
    assert!(!blocks.is_empty(), "no extent tree in {}", dump.stdout);
    blocks
}

/// Every physical copy of the tree block at `logical` (both copies with DUP metadata),
/// found by its header: this filesystem's fsid and its own address.
fn btrfs_copies(img: &Path, logical: u64, nodesize: usize) -> Vec<u64> {
    let sb = read_bytes(img, BTRFS_SB, 4096);
    let fsid = &sb[0x20..0x30];
    let data = std::fs::read(img).unwrap();
    let copies: Vec<u64> = (0..data.len() - nodesize)
        .step_by(4096)
        .filter(|&o| &data[o + 0x20..o + 0x30] == fsid && le64(&data, o + 0x30) == logical)
        .map(|o| o as u64)
        .collect();
    assert!(!copies.is_empty(), "tree block {logical} not found");
    copies
}

fn nodesize(img: &Path) -> usize {
    le32(&read_bytes(img, BTRFS_SB, 4096), 0x94) as usize
}

/// A change to a tree block's bytes.
type Patch<'a> = dyn Fn(&mut [u8]) + 'a;

/// Applies `f` to the tree block at each physical copy, then (with `recrc`) recomputes its
/// CRC-32C.
fn patch_tree_block(img: &Path, copies: &[u64], ns: usize, recrc: bool, f: &Patch<'_>) {
    for &at in copies {
        let mut b = read_bytes(img, at, ns);
        f(&mut b);
        if recrc {
            let c = crc32c(&b[32..]);
            b[0..4].copy_from_slice(&c.to_le_bytes());
        }
        write_at(img, at, &b);
    }
}

/// An extent tree leaf that understates a data extent (its length key made one sector),
/// with a stale and with a recomputed CRC: the backup must warn and read every block.
#[test]
fn btrfs_damaged_extent_tree_leaf_is_not_trusted() {
    if !btrfs_ready() {
        return;
    }
    let t = TestDir::new();
    let img = make_fs(&t, "btrfs", 120);
    let (repo, used) = clean_baseline(&t, &img);
    let ns = nodesize(&img);
    // The leaf holding the first data extent (EXTENT_ITEM longer than a node).
    let (leaf, copies, slot) = extent_tree_blocks(&img)
        .into_iter()
        .filter(|b| b.1)
        .find_map(|(logical, _)| {
            let copies = btrfs_copies(&img, logical, ns);
            let b = read_bytes(&img, copies[0], ns);
            let n = le32(&b, 0x60) as usize;
            let slot = (0..n).find(|&i| {
                let o = NODE_HEADER + i * ITEM;
                b[o + 8] == 168 && le64(&b, o + 9) > ns as u64
            })?;
            Some((logical, copies, slot))
        })
        .expect("a data extent item");
    // Its length made one sector; or (the free-space tree's cross-check) its start moved by a
    // sector, which keeps every count: the extent now covers a sector that is free or another
    // extent's, and its first sector is no longer allocated.
    let shorten = |b: &mut [u8]| {
        let o = NODE_HEADER + slot * ITEM + 9;
        b[o..o + 8].copy_from_slice(&4096u64.to_le_bytes());
    };
    let shift = |b: &mut [u8]| {
        let o = NODE_HEADER + slot * ITEM;
        let moved = le64(b, o) + 4096;
        b[o..o + 8].copy_from_slice(&moved.to_le_bytes());
    };
    let cases: [(&str, bool, &Patch<'_>, &str); 3] = [
        ("stale CRC", false, &shorten, "checksum mismatch"),
        ("recomputed CRC", true, &shorten, "the superblock counts"),
        ("extent moved", true, &shift, "allocation data is unusable"),
    ];
    for (name, recrc, patch, want) in cases {
        let damaged = t.join("damaged.img");
        std::fs::copy(&img, &damaged).unwrap();
        patch_tree_block(&damaged, &copies, ns, recrc, patch);
        let out = t.join("restored.img");
        let outcome = backup_and_restore(&damaged, &repo, &out);
        eprintln!("{name}: {}", outcome.1.trim());
        assert!(
            outcome.0,
            "{name}: leaf {leaf} damaged, map trusted: {}",
            outcome.1
        );
        assert!(
            outcome.1.contains("btrfs allocation data is unusable") && outcome.1.contains(want),
            "{name}: {}",
            outcome.1
        );
        assert_nothing_lost(name, &damaged, &out, outcome, &used);
    }
}

/// Random bytes of extent tree blocks (every copy), half of them with the checksum
/// recomputed: never a smaller map that drops data.
#[test]
fn btrfs_random_damage_to_the_extent_tree_never_drops_data() {
    if !btrfs_ready() {
        return;
    }
    let t = TestDir::new();
    let img = make_fs(&t, "btrfs", 121);
    let repo = t.join("repo");
    init_repo(&repo, &[]);
    let used = used_runs(&img);
    let ns = nodesize(&img);
    let blocks: Vec<(u64, Vec<u64>, usize)> = extent_tree_blocks(&img)
        .into_iter()
        .map(|(logical, _)| {
            let copies = btrfs_copies(&img, logical, ns);
            let n = le32(&read_bytes(&img, copies[0], ns), 0x60) as usize;
            (logical, copies, n)
        })
        .collect();
    let mut rng = Rng::new(0x5EED_0012);
    let mut fell_back = 0;
    for case in 0..10 {
        let damaged = t.join("damaged.img");
        std::fs::copy(&img, &damaged).unwrap();
        let (logical, copies, n) = &blocks[rng.below(blocks.len() as u64) as usize];
        let recrc = case % 2 == 0;
        // Mostly the keys and item headers; sometimes the node header or the item data.
        let hits: Vec<(usize, u8)> = (0..1 + rng.below(3))
            .map(|_| {
                let o = match rng.below(4) {
                    0 => 32 + rng.below(NODE_HEADER as u64 - 32) as usize,
                    1 => rng.below(ns as u64 - NODE_HEADER as u64) as usize + NODE_HEADER,
                    _ => NODE_HEADER + rng.below((n * ITEM).max(1) as u64) as usize,
                };
                (o, rng.below(256) as u8)
            })
            .collect();
        patch_tree_block(&damaged, copies, ns, recrc, &|b| {
            for &(o, v) in &hits {
                b[o] = v;
            }
        });
        let what = format!("case {case}: block {logical} bytes {hits:?}, CRC recomputed {recrc}");
        let out = t.join("restored.img");
        let outcome = backup_and_restore(&damaged, &repo, &out);
        eprintln!("{what}: every block {}", outcome.0);
        fell_back += u32::from(outcome.0);
        assert_nothing_lost(&what, &damaged, &out, outcome, &used);
    }
    assert!(fell_back > 0, "no case was caught: the damage is too weak");
}
