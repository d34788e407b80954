//! Damaged but repairable allocation data on NTFS, FAT12/16/32 and exFAT (issue 11, item 2):
//! volumes made by their mkfs and filled through their real drivers (ntfs-3g, mtools,
//! exfat-fuse), then damaged. A backup must either warn and read every block (the restore is
//! the damaged source, bit for bit) or keep every block the undamaged volume used, with the
//! damaged source's bytes: never a smaller map that drops data the repair tool would keep.

use crate::util::*;
use std::collections::BTreeMap;
use std::path::Path;
use volback::volume::Volume;

/// Block size of the backups (the map's granularity).
const BS: u64 = 16 * KIB;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Ntfs,
    Fat12,
    Fat16,
    Fat32,
    Exfat,
}

impl Kind {
    fn size(self) -> u64 {
        match self {
            Kind::Fat12 => 4 * MIB,
            Kind::Fat32 => 34 * MIB,
            _ => 16 * MIB,
        }
    }

    fn tools(self) -> &'static [&'static str] {
        match self {
            Kind::Ntfs => &["mkntfs", "ntfs-3g", "ntfsfix"],
            Kind::Exfat => &["mkfs.exfat", "mount.exfat-fuse", "fsck.exfat"],
            _ => &["mkfs.vfat", "fsck.vfat", "mcopy", "mmd", "fusefat"],
        }
    }

    /// mkfs over random bytes, then files written through the filesystem's driver; returns
    /// the files' SHA-256 by path.
    fn build(self, img: &Path, t: &TestDir, seed: u64) -> BTreeMap<String, String> {
        random_file(img, self.size(), seed);
        let i = p(img);
        match self {
            Kind::Ntfs => run_ok("mkntfs", &["-Q", "-F", "-q", i]),
            Kind::Fat12 => run_ok("mkfs.vfat", &["-F", "12", i]),
            Kind::Fat16 => run_ok("mkfs.vfat", &["-F", "16", i]),
            Kind::Fat32 => run_ok("mkfs.vfat", &["-F", "32", "-s", "1", i]),
            Kind::Exfat => run_ok("mkfs.exfat", &[i]),
        };
        let mut rng = Rng::new(seed);
        let budget = self.size() / 2;
        let mut files = Vec::new();
        let mut total = 0;
        while total < budget {
            let len = match rng.below(3) {
                0 => rng.below(4 * KIB),
                _ => rng.below(budget / 4),
            }
            .min(budget - total + 1);
            total += len;
            let dir = ["", "Dir-A/"][files.len() % 2];
            files.push((
                format!("{dir}File-{:02}.bin", files.len()),
                rng.bytes(len as usize),
            ));
        }
        match self {
            Kind::Ntfs | Kind::Exfat => {
                let lo = Loop::attach(img, false);
                let prog = if self == Kind::Ntfs {
                    "ntfs-3g"
                } else {
                    "mount.exfat-fuse"
                };
                let m = Mount::with_command(prog, &[p(&lo.dev), p(&t.join("fill.mnt"))]);
                std::fs::create_dir_all(m.dir.join("Dir-A")).unwrap();
                for (n, d) in &files {
                    std::fs::write(m.dir.join(n), d).unwrap();
                }
                m.unmount();
            }
            _ => {
                run_ok("mmd", &["-i", i, "::/Dir-A"]);
                let local = t.join("staged-file");
                for (n, d) in &files {
                    std::fs::write(&local, d).unwrap();
                    run_ok("mcopy", &["-i", i, p(&local), &format!("::/{n}")]);
                }
            }
        }
        files
            .iter()
            .map(|(n, d)| (n.to_lowercase(), sha256_bytes(d)))
            .collect()
    }
}

/// Skips (or fails under CI) without root, loop devices, FUSE or the tools of `kinds`.
fn require(kinds: &[Kind]) -> bool {
    let tools: Vec<&str> = kinds.iter().flat_map(|k| k.tools()).copied().collect();
    require_root_loop_and(&tools, true)
}

/// An image in memory, for the library's map of an undamaged volume.
struct Bytes(Vec<u8>);

impl Volume for Bytes {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> volback::Result<()> {
        let o = offset as usize;
        buf.copy_from_slice(&self.0[o..o + buf.len()]);
        Ok(())
    }

    fn describe(&self) -> String {
        "image in memory".into()
    }
}

/// The blocks (of [`BS`]) the undamaged image uses, by its allocation map, which must exist.
fn used_blocks(image: &[u8]) -> Vec<bool> {
    let probe = volback::fs::probe(&Bytes(image.to_vec()), BS).unwrap();
    let map = probe
        .map
        .unwrap_or_else(|| panic!("the undamaged image has no map: {:?}", probe.warning));
    (0..map.block_count()).map(|b| map.is_used(b)).collect()
}

/// Backs up `img` and restores it; returns the backup's report and stderr and the restored
/// bytes.
fn round_trip(img: &Path, repo: &Path, t: &TestDir) -> (serde_json::Value, String, Vec<u8>) {
    let r = volback_ok(&["backup", "--json", "--block-size", "16K", p(img), p(repo)]);
    let j = r.json();
    let out = t.join("restored.img");
    let _ = std::fs::remove_file(&out);
    restore(repo, jstr(&j, "/snapshot"), &out);
    let restored = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    (j, r.stderr, restored)
}

/// The property: a fallback restores the damaged source bit for bit; a map keeps every block
/// the undamaged volume used with the damaged source's bytes. Returns whether it fell back.
fn check_never_drops(damaged: &[u8], used: &[bool], img: &Path, repo: &Path, t: &TestDir) -> bool {
    let (j, stderr, restored) = round_trip(img, repo, t);
    assert_eq!(restored.len(), damaged.len());
    if j["all_blocks"] == true {
        assert!(
            restored == damaged,
            "a fallback must restore the source bit for bit"
        );
        return true;
    }
    for (b, (x, y)) in damaged
        .chunks(BS as usize)
        .zip(restored.chunks(BS as usize))
        .enumerate()
    {
        assert!(
            !used[b] || x == y,
            "block {b}, used before the damage, was dropped by the map of the damaged \
             volume ({j}; {stderr})"
        );
    }
    false
}

/// Every file's SHA-256 (paths in lower case) through a read-only mount of `img`.
fn mounted_hashes(kind: Kind, img: &Path, t: &TestDir) -> BTreeMap<String, String> {
    let dir = t.join("check.mnt");
    let (lo, m) = match kind {
        Kind::Ntfs | Kind::Exfat => {
            let lo = Loop::attach(img, true);
            let prog = if kind == Kind::Ntfs {
                "ntfs-3g"
            } else {
                "mount.exfat-fuse"
            };
            let m = Mount::with_command(prog, &["-o", "ro", p(&lo.dev), p(&dir)]);
            (Some(lo), m)
        }
        _ => (
            None,
            Mount::with_command("fusefat", &["-o", "ro", p(img), p(&dir)]),
        ),
    };
    let got = tree_hashes(&m.dir);
    m.unmount();
    drop(lo);
    got.into_iter()
        .map(|(k, v)| (k.to_lowercase(), v))
        .collect()
}

fn le(b: &[u8], at: usize, n: usize) -> u64 {
    b[at..at + n]
        .iter()
        .rev()
        .fold(0, |acc, &x| (acc << 8) | u64::from(x))
}

/// NTFS layout facts of an image made by mkntfs: (cluster size, byte offset of the MFT,
/// record size, byte range of `$Bitmap`'s data). mkntfs writes the first 16 records
/// contiguously and `$Bitmap` in one run.
fn ntfs_layout(b: &[u8]) -> (u64, u64, u64, std::ops::Range<u64>) {
    let cluster = le(b, 0x0B, 2) * u64::from(b[0x0D]);
    let mft = le(b, 0x30, 8) * cluster;
    let rec = match b[0x40] as i8 {
        n if n > 0 => cluster * n as u64,
        n => 1 << n.unsigned_abs(),
    };
    // Record 6, attribute 0x80 (non-resident): the first run of its runlist.
    let r = (mft + 6 * rec) as usize;
    let mut a = r + le(b, r + 0x14, 2) as usize;
    while le(b, a, 4) != 0x80 {
        a += le(b, a + 4, 4) as usize;
    }
    let runs = a + le(b, a + 0x20, 2) as usize;
    let (len_bytes, off_bytes) = (usize::from(b[runs] & 0x0F), usize::from(b[runs] >> 4));
    let lcn = le(b, runs + 1 + len_bytes, off_bytes);
    let size = le(b, a + 0x30, 8);
    (cluster, mft, rec, lcn * cluster..lcn * cluster + size)
}

/// FAT layout facts: (byte range of the FATs, bytes per FAT).
fn fat_layout(b: &[u8]) -> (std::ops::Range<u64>, u64) {
    let sector = le(b, 0x0B, 2);
    let reserved = le(b, 0x0E, 2);
    let fats = u64::from(b[0x10]);
    let per = match le(b, 0x16, 2) {
        0 => le(b, 0x24, 4),
        n => n,
    } * sector;
    let start = reserved * sector;
    (start..start + fats * per, per)
}

/// exFAT layout facts: (byte range of the FAT, byte range of the allocation bitmap, byte
/// range of the root directory's first cluster). mkfs.exfat writes each in one piece.
fn exfat_layout(b: &[u8]) -> [std::ops::Range<u64>; 3] {
    let sector = 1u64 << b[0x6C];
    let cluster = sector << b[0x6D];
    let fat = le(b, 0x50, 4) * sector..(le(b, 0x50, 4) + le(b, 0x54, 4)) * sector;
    let heap = le(b, 0x58, 4) * sector;
    let at = |c: u64| heap + (c - 2) * cluster;
    let root = at(le(b, 0x60, 4));
    let entry = (root..root + cluster)
        .step_by(32)
        .find(|&e| b[e as usize] == 0x81)
        .expect("the root directory holds the allocation bitmap entry") as usize;
    let bitmap = at(le(b, entry + 20, 4));
    [
        fat,
        bitmap..bitmap + le(b, entry + 24, 8),
        root..root + cluster,
    ]
}

/// Issue 11's reproduction: `$Bitmap` zeroed. The backup warns and reads every block; the
/// restore keeps every file that `ntfsfix` keeps on a copy of the damaged source.
#[test]
fn ntfs_zeroed_bitmap_falls_back_to_every_block() {
    if !require(&[Kind::Ntfs]) {
        return;
    }
    let t = TestDir::new();
    let img = t.join("ntfs.img");
    let files = Kind::Ntfs.build(&img, &t, 1101);
    let mut b = std::fs::read(&img).unwrap();
    let (_, _, _, bitmap) = ntfs_layout(&b);
    b[bitmap.start as usize..bitmap.end as usize].fill(0);
    std::fs::write(&img, &b).unwrap();

    let repo = t.join("repo");
    init_repo(&repo, &[]);
    let (j, stderr, restored) = round_trip(&img, &repo, &t);
    assert!(
        stderr.contains("ntfs allocation data is unusable")
            && stderr.contains("$Bitmap marks $Boot free")
            && stderr.contains("reading every block"),
        "{stderr}"
    );
    assert_eq!(j["all_blocks"], true, "{j}");
    assert_eq!(ju64(&j, "/bytes_read"), b.len() as u64);
    assert!(
        restored == b,
        "the restore is the damaged source, bit for bit"
    );

    // ntfsfix on copies of the damaged source and of the restore: the same files survive,
    // and they are the files written.
    let fixed_src = t.join("fixed-source.img");
    let fixed_out = t.join("fixed-restore.img");
    std::fs::write(&fixed_src, &b).unwrap();
    std::fs::write(&fixed_out, &restored).unwrap();
    run_ok("ntfsfix", &[p(&fixed_src)]);
    run_ok("ntfsfix", &[p(&fixed_out)]);
    let kept = mounted_hashes(Kind::Ntfs, &fixed_src, &t);
    assert_eq!(mounted_hashes(Kind::Ntfs, &fixed_out, &t), kept);
    assert_eq!(kept, files);
}

/// One bit of `$Bitmap` cleared: the first cluster of a file's data, found by its content.
/// The system files are all marked, but the file's record claims the cluster: the backup
/// warns and reads every block.
#[test]
fn ntfs_bitmap_missing_a_file_cluster_falls_back_to_every_block() {
    if !require(&[Kind::Ntfs]) {
        return;
    }
    let t = TestDir::new();
    let img = t.join("ntfs.img");
    Kind::Ntfs.build(&img, &t, 1111);
    // One more file of 64 KiB of random bytes: its first cluster is unique on the volume.
    let content = Rng::new(1112).bytes(64 * KIB as usize);
    let lo = Loop::attach(&img, false);
    let m = Mount::with_command("ntfs-3g", &[p(&lo.dev), p(&t.join("one.mnt"))]);
    std::fs::write(m.dir.join("marker.bin"), &content).unwrap();
    m.unmount();
    drop(lo);
    let mut b = std::fs::read(&img).unwrap();
    let (cluster, _, _, bitmap) = ntfs_layout(&b);
    let at = (0..b.len() as u64 / cluster)
        .find(|&c| {
            let o = (c * cluster) as usize;
            b[o..o + cluster as usize] == content[..cluster as usize]
        })
        .expect("the marker file's first cluster is on the volume");
    let byte = (bitmap.start + at / 8) as usize;
    assert_ne!(b[byte] & (1 << (at % 8)), 0, "the cluster is marked used");
    b[byte] &= !(1 << (at % 8));
    std::fs::write(&img, &b).unwrap();

    let repo = t.join("repo");
    init_repo(&repo, &[]);
    let (j, stderr, restored) = round_trip(&img, &repo, &t);
    assert!(
        stderr.contains("$Bitmap marks an attribute of MFT record")
            && stderr.contains(&format!("free (bit {at})")),
        "{stderr}"
    );
    assert_eq!(j["all_blocks"], true, "{j}");
    assert!(
        restored == b,
        "the restore is the damaged source, bit for bit"
    );
}

/// The first FAT zeroed (FAT12, FAT16, FAT32): every file looks deleted there and its media
/// byte is gone. The backup warns and reads every block; `fsck.vfat -a` then takes the second
/// FAT, on the restore as on the source, and every file is back.
#[test]
fn fat_copy_damage_falls_back_to_every_block() {
    let kinds = [Kind::Fat12, Kind::Fat16, Kind::Fat32];
    if !require(&kinds) {
        return;
    }
    let t = TestDir::new();
    let repo = t.join("repo");
    init_repo(&repo, &[]);
    for (i, kind) in kinds.into_iter().enumerate() {
        let img = t.join("fat.img");
        let files = kind.build(&img, &t, 1200 + i as u64);
        let mut b = std::fs::read(&img).unwrap();
        let (fats, per) = fat_layout(&b);
        b[fats.start as usize..(fats.start + per) as usize].fill(0);
        std::fs::write(&img, &b).unwrap();
        let (j, stderr, restored) = round_trip(&img, &repo, &t);
        assert!(
            stderr.contains("FAT[0] is 0x0") && stderr.contains("reading every block"),
            "{kind:?}: {stderr}"
        );
        assert_eq!(j["all_blocks"], true, "{kind:?}: {j}");
        assert!(
            restored == b,
            "{kind:?}: the restore is the source, bit for bit"
        );
        let fixed = t.join("fixed.img");
        std::fs::write(&fixed, &restored).unwrap();
        let _ = run_program("fsck.vfat", &["-a", "-w", p(&fixed)]);
        assert_eq!(mounted_hashes(kind, &fixed, &t), files, "{kind:?}");
    }
}

/// exFAT: the allocation bitmap zeroed, then (on a fresh volume) one byte of the main boot
/// region's boot code changed so that its checksum fails. Each backup warns and reads every
/// block.
#[test]
fn exfat_zeroed_bitmap_or_bad_boot_checksum_falls_back_to_every_block() {
    if !require(&[Kind::Exfat]) {
        return;
    }
    let t = TestDir::new();
    let repo = t.join("repo");
    init_repo(&repo, &[]);
    let img = t.join("exfat.img");
    let files = Kind::Exfat.build(&img, &t, 1301);
    let good = std::fs::read(&img).unwrap();
    let [_, bitmap, _] = exfat_layout(&good);
    let mut zeroed = good.clone();
    zeroed[bitmap.start as usize..bitmap.end as usize].fill(0);
    let mut checksum = good.clone();
    checksum[300] ^= 0x5A;
    for (b, why) in [
        (
            &zeroed,
            "the allocation bitmap marks the allocation bitmap free",
        ),
        (&checksum, "the main boot region's checksum"),
    ] {
        std::fs::write(&img, b).unwrap();
        let (j, stderr, restored) = round_trip(&img, &repo, &t);
        assert!(
            stderr.contains(why) && stderr.contains("reading every block"),
            "{stderr}"
        );
        assert_eq!(j["all_blocks"], true, "{j}");
        assert!(&restored == b, "the restore is the source, bit for bit");
    }
    // The files are still there on the restore of the zeroed bitmap (exfat-fuse reads files
    // without the bitmap).
    std::fs::write(&img, &zeroed).unwrap();
    let (_, _, restored) = round_trip(&img, &repo, &t);
    std::fs::write(&img, &restored).unwrap();
    assert_eq!(mounted_hashes(Kind::Exfat, &img, &t), files);
}

/// Damage `b` at random inside `areas`: a few runs of random bytes, or (every other case on
/// average) of zeros only, the damage that makes a map drop data.
fn damage(rng: &mut Rng, b: &mut [u8], areas: &[std::ops::Range<u64>]) {
    let area = &areas[rng.below(areas.len() as u64) as usize];
    let zeros_only = rng.below(2) == 0;
    for _ in 0..1 + rng.below(4) {
        let max = if rng.below(2) == 0 { 16 } else { 4096 };
        let len = 1 + rng.below(max);
        let len = len.min(area.end - area.start);
        let at = (area.start + rng.below(area.end - area.start - len + 1)) as usize;
        if zeros_only || rng.below(3) == 0 {
            b[at..at + len as usize].fill(0);
        } else {
            rng.fill(&mut b[at..at + len as usize]);
        }
    }
}

/// The property for one filesystem: `cases` random damages of `areas(image)`, each backed up
/// and restored; returns how many fell back.
fn property(
    kind: Kind,
    seed: u64,
    cases: u64,
    areas: impl Fn(&[u8]) -> Vec<std::ops::Range<u64>>,
) -> u64 {
    let t = TestDir::new();
    let repo = t.join("repo");
    init_repo(&repo, &[]);
    let img = t.join("fs.img");
    kind.build(&img, &t, seed);
    let good = std::fs::read(&img).unwrap();
    let used = used_blocks(&good);
    let areas = areas(&good);
    let mut rng = Rng::new(seed);
    let mut fell_back = 0;
    for _ in 0..cases {
        let mut b = good.clone();
        damage(&mut rng, &mut b, &areas);
        std::fs::write(&img, &b).unwrap();
        fell_back += u64::from(check_never_drops(&b, &used, &img, &repo, &t));
    }
    fell_back
}

#[test]
fn ntfs_random_metadata_damage_never_drops_used_blocks() {
    if !require(&[Kind::Ntfs]) {
        return;
    }
    let fell_back = property(Kind::Ntfs, 1401, 12, |b| {
        let (cluster, mft, rec, bitmap) = ntfs_layout(b);
        let mirror = le(b, 0x38, 8) * cluster;
        vec![bitmap, mft..mft + 16 * rec, mirror..mirror + 4 * rec]
    });
    assert!(
        fell_back > 0,
        "no case fell back: the damage is too weak to test anything"
    );
}

#[test]
fn fat_random_metadata_damage_never_drops_used_blocks() {
    let kinds = [Kind::Fat12, Kind::Fat16, Kind::Fat32];
    if !require(&kinds) {
        return;
    }
    let mut fell_back = 0;
    for (i, kind) in kinds.into_iter().enumerate() {
        fell_back += property(kind, 1501 + i as u64, 4, |b| {
            // The first half of each copy, where the files' entries are.
            let (fats, per) = fat_layout(b);
            (fats.start..fats.end)
                .step_by(per as usize)
                .map(|f| f..f + per / 2)
                .collect()
        });
    }
    assert!(
        fell_back > 0,
        "no case fell back: the damage is too weak to test anything"
    );
}

#[test]
fn exfat_random_metadata_damage_never_drops_used_blocks() {
    if !require(&[Kind::Exfat]) {
        return;
    }
    let fell_back = property(Kind::Exfat, 1601, 12, |b| {
        let sector = 1u64 << b[0x6C];
        let [fat, bitmap, root] = exfat_layout(b);
        // The boot regions without the boot sector's first 120 bytes (which would make the
        // volume unrecognisable rather than damaged).
        vec![120..24 * sector, fat, bitmap, root]
    });
    assert!(
        fell_back > 0,
        "no case fell back: the damage is too weak to test anything"
    );
}
