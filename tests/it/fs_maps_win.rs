//! Allocation maps of NTFS, FAT12/16/32 and exFAT, judged by the real tools: each filesystem
//! is made by its mkfs over random bytes, filled through its real driver (ntfs-3g, mtools,
//! exfat-fuse), partly deleted so that random residue stays in free clusters, backed up with
//! its map, restored, checked by its fsck, and every file's SHA-256 read back through a
//! read-only FUSE mount (ntfs-3g, fusefat, exfat-fuse). The used bytes the backup reports
//! equal what an independent tool counts, and the bytes read stay close to them.

use crate::util::*;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Ntfs,
    Fat12,
    Fat16,
    Fat32,
    Exfat,
}

/// Block size of the backups (the map's granularity).
const BS: u64 = 16 * KIB;

impl Kind {
    fn size(self) -> u64 {
        match self {
            Kind::Fat12 => 8 * MIB,
            Kind::Fat16 => 40 * MIB,
            _ => 48 * MIB,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Kind::Ntfs => "vb-ntfs",
            Kind::Exfat => "vb-exfat",
            _ => "VBFAT",
        }
    }

    /// `blkid` TYPE and `volback probe` version.
    fn fs_type(self) -> (&'static str, Option<&'static str>) {
        match self {
            Kind::Ntfs => ("ntfs", None),
            Kind::Fat12 => ("vfat", Some("FAT12")),
            Kind::Fat16 => ("vfat", Some("FAT16")),
            Kind::Fat32 => ("vfat", Some("FAT32")),
            Kind::Exfat => ("exfat", Some("1.0")),
        }
    }

    fn tools(self) -> &'static [&'static str] {
        match self {
            Kind::Ntfs => &["mkntfs", "ntfs-3g", "ntfsfix"],
            Kind::Exfat => &["mkfs.exfat", "mount.exfat-fuse", "fsck.exfat", "dump.exfat"],
            _ => &["mkfs.vfat", "fsck.vfat", "mcopy", "mmd", "mdel", "fusefat"],
        }
    }

    fn mkfs(self, img: &Path) {
        let (l, i) = (self.label(), p(img));
        match self {
            Kind::Ntfs => run_ok("mkntfs", &["-Q", "-F", "-q", "-L", l, i]),
            Kind::Fat12 => run_ok("mkfs.vfat", &["-F", "12", "-n", l, i]),
            Kind::Fat16 => run_ok("mkfs.vfat", &["-F", "16", "-n", l, i]),
            Kind::Fat32 => run_ok("mkfs.vfat", &["-F", "32", "-s", "1", "-n", l, i]),
            Kind::Exfat => run_ok("mkfs.exfat", &["-L", l, i]),
        };
    }

    /// `fsck -n`: fails the test on any problem.
    fn fsck(self, img: &Path) {
        match self {
            Kind::Ntfs => run_ok("ntfsfix", &["-n", p(img)]),
            Kind::Exfat => run_ok("fsck.exfat", &["-n", p(img)]),
            _ => run_ok("fsck.vfat", &["-n", p(img)]),
        };
    }
}

/// Skips (or fails under CI) without root, loop devices, FUSE or the tools of `kind`.
fn require(kind: Kind) -> bool {
    require_root_loop_and(kind.tools(), true)
}

/// Files to write (path under the root, content): random bytes of varied sizes in a few
/// directories, about 70 % of `size` in all.
fn plan(rng: &mut Rng, size: u64, prefix: &str) -> Vec<(String, Vec<u8>)> {
    let dirs = ["", "Folder-A/", "Folder-A/Inner-Deep/", "Folder-B/"];
    let mut out = Vec::new();
    let mut total = 0u64;
    let budget = size / 10 * 7;
    let large = size / 12;
    while total < budget {
        let i = out.len();
        let len = match rng.below(8) {
            0 => rng.below(3),
            1..=3 => rng.below(6 * KIB),
            4 | 5 => 6 * KIB + rng.below(200 * KIB),
            _ => large / 2 + rng.below(large),
        }
        .min(budget - total + 1);
        total += len;
        let dir = dirs[i % dirs.len()];
        out.push((
            format!("{dir}{prefix}-{i:03}-Data.bin"),
            rng.bytes(len as usize),
        ));
    }
    out
}

/// The files' SHA-256 by path, as [`tree_hashes`] gives them.
fn hashes(files: &[(String, Vec<u8>)]) -> BTreeMap<String, String> {
    files
        .iter()
        .map(|(n, d)| (n.clone(), sha256_bytes(d)))
        .collect()
}

/// Writes the first plan, deletes every other big file and a third of the rest, writes the
/// second plan; returns what remains.
fn populate(kind: Kind, img: &Path, t: &TestDir, rng: &mut Rng) -> BTreeMap<String, String> {
    let first = plan(rng, kind.size(), "first");
    let doomed: Vec<&String> = first
        .iter()
        .enumerate()
        .filter(|(i, (_, d))| i % 3 == 0 || (d.len() as u64 > 200 * KIB && i % 2 == 0))
        .map(|(_, (n, _))| n)
        .collect();
    let second = plan(rng, kind.size() / 5, "second");
    let mut want = hashes(&first);
    for n in &doomed {
        want.remove(*n);
    }
    want.extend(hashes(&second));
    match kind {
        Kind::Ntfs | Kind::Exfat => {
            let lo = Loop::attach(img, false);
            let dir = t.join("src.mnt");
            let m = if kind == Kind::Ntfs {
                Mount::with_command("ntfs-3g", &[p(&lo.dev), p(&dir)])
            } else {
                Mount::with_command("mount.exfat-fuse", &[p(&lo.dev), p(&dir)])
            };
            let write = |files: &[(String, Vec<u8>)]| {
                for (n, d) in files {
                    let path = m.dir.join(n);
                    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                    std::fs::write(&path, d).unwrap();
                }
            };
            write(&first);
            for n in &doomed {
                std::fs::remove_file(m.dir.join(n)).unwrap();
            }
            write(&second);
            m.unmount();
        }
        _ => {
            // mtools on the image: `mmd -i IMAGE ::/DIR`, `mcopy -i IMAGE FILE ::/PATH`.
            let mtools = |tool: &str, args: &[&str]| {
                let mut a = vec!["-i", p(img)];
                a.extend_from_slice(args);
                run_ok(tool, &a);
            };
            for d in ["::/Folder-A", "::/Folder-A/Inner-Deep", "::/Folder-B"] {
                mtools("mmd", &[d]);
            }
            let local = t.join("staged-file");
            let write = |files: &[(String, Vec<u8>)]| {
                for (n, d) in files {
                    std::fs::write(&local, d).unwrap();
                    mtools("mcopy", &[p(&local), &format!("::/{n}")]);
                }
            };
            write(&first);
            for n in &doomed {
                mtools("mdel", &[&format!("::/{n}")]);
            }
            write(&second);
        }
    }
    want
}

/// Clusters in use and the cluster size, by a tool other than volback: `fsck.vfat -n`'s
/// "used/total clusters", `dump.exfat`'s free and total clusters, and for NTFS the free
/// blocks ntfs-3g reports (counted in `$Bitmap`) through `statvfs`.
fn independent_used_bytes(kind: Kind, img: &Path, t: &TestDir) -> u64 {
    match kind {
        Kind::Ntfs => {
            let lo = Loop::attach(img, true);
            let dir = t.join("count.mnt");
            let m = Mount::with_command("ntfs-3g", &["-o", "ro", p(&lo.dev), p(&dir)]);
            let r = run_ok("stat", &["-f", "-c", "%b %f %S", p(&m.dir)]);
            m.unmount();
            let v: Vec<u64> = r
                .stdout
                .split_whitespace()
                .map(|x| x.parse().unwrap())
                .collect();
            (v[0] - v[1]) * v[2]
        }
        Kind::Exfat => {
            let r = run_ok("dump.exfat", &[p(img)]);
            let field = |name: &str| -> u64 {
                r.stdout
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or_else(|| panic!("dump.exfat shows no {name:?}: {}", r.stdout))
            };
            (field("Total Clusters:") - field("Free Clusters:")) * field("Cluster size:")
        }
        _ => {
            // "IMAGE: 12 files, 345/8167 clusters"
            let r = run_ok("fsck.vfat", &["-n", p(img)]);
            let used = r
                .stdout
                .lines()
                .find_map(|l| l.split(", ").nth(1)?.split('/').next()?.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("fsck.vfat shows no cluster count: {}", r.stdout));
            used * cluster(img)
        }
    }
}

/// The FAT cluster size from the boot sector (bytes/sector × sectors/cluster).
fn cluster(img: &Path) -> u64 {
    let b = std::fs::read(img).unwrap();
    u64::from(u16::from_le_bytes([b[11], b[12]])) * u64::from(b[13])
}

/// `blkid -p -o export` as a map.
fn blkid(node: &Path) -> BTreeMap<String, String> {
    run_program("blkid", &["-p", "-o", "export", p(node)])
        .stdout
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Every file's SHA-256 through a read-only mount of `img`. fusefat shows short names in
/// upper case and the volume label as an empty file: paths are compared in lower case,
/// without the label.
fn mounted_hashes(kind: Kind, img: &Path, t: &TestDir) -> BTreeMap<String, String> {
    let name = img.file_name().unwrap().to_string_lossy();
    let dir = t.join(&format!("{name}.ro"));
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
    let label = kind.label().to_lowercase();
    got.into_iter()
        .map(|(k, v)| (k.to_lowercase(), v))
        .filter(|(k, _)| !(k == &label && matches!(kind, Kind::Fat12 | Kind::Fat16 | Kind::Fat32)))
        .collect()
}

/// Compares `restored` with `source` block by block: each block is the same or, where the
/// filesystem does not use it, zeros. Returns how many blocks were zeroed.
fn zeroed_blocks(source: &Path, restored: &Path) -> u64 {
    let a = std::fs::read(source).unwrap();
    let b = std::fs::read(restored).unwrap();
    assert_eq!(a.len(), b.len(), "restored size");
    let mut zeroed = 0;
    for (i, (x, y)) in a.chunks(BS as usize).zip(b.chunks(BS as usize)).enumerate() {
        if x != y {
            assert!(
                y.iter().all(|&v| v == 0),
                "block {i} of {} differs from the source and is not zeros",
                restored.display()
            );
            zeroed += 1;
        }
    }
    zeroed
}

fn round_trip(kind: Kind, seed: u64) {
    if !require(kind) {
        return;
    }
    let t = TestDir::new();
    let img = t.join("fs.img");
    let repo = t.join("repo");
    let size = kind.size();
    let mut rng = Rng::new(seed);
    // Random bytes everywhere first: free clusters hold residue that must not be stored.
    random_file(&img, size, seed + 1000);
    kind.mkfs(&img);
    let want = populate(kind, &img, &t, &mut rng);
    kind.fsck(&img);
    let used = independent_used_bytes(kind, &img, &t);
    let remaining: u64 = want.len() as u64;
    assert!(remaining > 10, "{kind:?}: only {remaining} files");

    init_repo(&repo, &[]);
    let j = backup_json(&img, &repo, &["--block-size", "16K"]);
    let fs = &j["filesystem"];
    let (ty, version) = kind.fs_type();
    let b = blkid(&img);
    assert_eq!(fs["type"], ty, "{j}");
    assert_eq!(fs["version"].as_str(), version, "{j}");
    assert_eq!(b.get("TYPE").map(String::as_str), Some(ty), "blkid {b:?}");
    assert_eq!(
        fs["uuid"].as_str(),
        b.get("UUID").map(String::as_str),
        "{j}"
    );
    assert_eq!(fs["label"], kind.label(), "{j}");
    assert_eq!(j["all_blocks"], false, "{j}");
    assert_eq!(
        ju64(fs, "/used_bytes"),
        used,
        "used bytes differ from the tool's: {j}"
    );
    assert!(ju64(&j, "/stats/unused_blocks") > 0, "{j}");
    // Only what is used is read and stored: the residue (at least a third of the volume) is
    // not. Slack: metadata outside the clusters (FATs, boot regions) and block rounding.
    let slack = size / 8;
    let read = ju64(&j, "/bytes_read");
    let stored = ju64(&j, "/new_bytes_stored");
    assert!(read <= used + slack, "read {read} for {used} used: {j}");
    assert!(
        stored <= used + slack,
        "stored {stored} for {used} used: {j}"
    );
    assert!(
        read <= size / 3 * 2,
        "read {read} of a {size}-byte volume: {j}"
    );

    let out = t.join("restored.img");
    restore(&repo, "latest", &out);
    kind.fsck(&out);
    assert_eq!(
        mounted_hashes(kind, &img, &t),
        lower(&want),
        "{kind:?}: source"
    );
    assert_eq!(
        mounted_hashes(kind, &out, &t),
        lower(&want),
        "{kind:?}: restored"
    );
    let zeroed = zeroed_blocks(&img, &out);
    assert!(zeroed > 0, "{kind:?}: no residue was left out");
    eprintln!(
        "{kind:?}: {} files, {used} bytes used, {read} read, {stored} stored, {zeroed} blocks \
         of residue restored as zeros",
        want.len()
    );
}

fn lower(m: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    m.iter()
        .map(|(k, v)| (k.to_lowercase(), v.clone()))
        .collect()
}

#[test]
fn ntfs_map_skips_free_clusters_and_restores_a_clean_volume() {
    round_trip(Kind::Ntfs, 41);
}

#[test]
fn fat12_map_skips_free_clusters_and_restores_a_clean_volume() {
    round_trip(Kind::Fat12, 42);
}

#[test]
fn fat16_map_skips_free_clusters_and_restores_a_clean_volume() {
    round_trip(Kind::Fat16, 43);
}

#[test]
fn fat32_map_skips_free_clusters_and_restores_a_clean_volume() {
    round_trip(Kind::Fat32, 44);
}

#[test]
fn exfat_map_skips_free_clusters_and_restores_a_clean_volume() {
    round_trip(Kind::Exfat, 45);
}

/// Damage that makes a map untrustworthy: the backup warns, reads every block, and the
/// restored image is the source, bit for bit.
#[test]
fn damaged_fat_and_ntfs_allocation_data_fall_back_to_every_block() {
    if !require(Kind::Fat16) || !require(Kind::Ntfs) {
        return;
    }
    let t = TestDir::new();
    let repo = t.join("repo");
    init_repo(&repo, &[]);
    let mut rng = Rng::new(46);

    // FAT16: the FAT entry of cluster 2 points past the last cluster (0xFFF0 is reserved).
    let fat = t.join("fat.img");
    random_file(&fat, 16 * MIB, 47);
    run_ok("mkfs.vfat", &["-F", "16", "-n", "VBFAT", p(&fat)]);
    let local = t.join("file");
    std::fs::write(&local, rng.bytes(100 * KIB as usize)).unwrap();
    run_ok("mcopy", &["-i", p(&fat), p(&local), "::/file.bin"]);
    let b = std::fs::read(&fat).unwrap();
    let reserved = u64::from(u16::from_le_bytes([b[14], b[15]]));
    let sector = u64::from(u16::from_le_bytes([b[11], b[12]]));
    write_at(&fat, reserved * sector + 2 * 2, &0xFFF0u16.to_le_bytes());

    // NTFS: the last two bytes of the first 512-byte stride of MFT record 6 ($Bitmap) no
    // longer hold the update sequence number (a torn write).
    let ntfs = t.join("ntfs.img");
    random_file(&ntfs, 16 * MIB, 48);
    run_ok("mkntfs", &["-Q", "-F", "-q", p(&ntfs)]);
    let b = std::fs::read(&ntfs).unwrap();
    let sector = u64::from(u16::from_le_bytes([b[11], b[12]]));
    let cluster = sector * u64::from(b[13]);
    let mft = u64::from_le_bytes(b[0x30..0x38].try_into().unwrap()) * cluster;
    let rec = match b[0x40] as i8 {
        n if n > 0 => cluster * n as u64,
        n => 1 << n.unsigned_abs(),
    };
    let at = (mft + 6 * rec + 510) as usize;
    write_at(&ntfs, at as u64, &[b[at] ^ 0xFF]);

    for (img, what) in [(&fat, "vfat (FAT16)"), (&ntfs, "ntfs")] {
        let r = volback_ok(&["backup", "--json", "--block-size", "16K", p(img), p(&repo)]);
        r.stderr_has(&[what, "allocation data is unusable", "reading every block"]);
        let j = r.json();
        assert_eq!(j["all_blocks"], true, "{j}");
        assert_eq!(
            ju64(&j, "/bytes_read"),
            std::fs::metadata(img).unwrap().len()
        );
        let out = t.join("restored.img");
        restore(&repo, jstr(&j, "/snapshot"), &out);
        assert_eq!(sha256_file(&out), sha256_file(img), "{what}");
        std::fs::remove_file(&out).unwrap();
    }
}
