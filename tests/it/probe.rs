//! `volback probe` and `volback ptable` against real partitioned disks: a GPT and an MBR disk
//! (extended partition with several logical ones) made with `sfdisk` on image files,
//! attached to loop devices, each partition formatted by a different tool. The probe must
//! agree with `blkid -p` (TYPE, UUID, LABEL) and `sfdisk --json` (start, size, type); a dump
//! must be accepted by `sfdisk`, and `ptable restore` must give the same table as `sfdisk`.
//! Damaged tables (bad GPT checksums, absurd entry counts, truncated disks, looping EBR
//! chains) must give warnings or clear errors, never a crash.

use crate::util::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------------
// Helpers

const DISK_TOOLS: &[&str] = &[
    "sfdisk",
    "blkid",
    "partx",
    "mkfs.xfs",
    "mkfs.btrfs",
    "mkfs.vfat",
    "mkfs.ntfs",
    "mkfs.exfat",
    "mkswap",
    "cryptsetup",
    "pvcreate",
];

/// A loop device over a partitioned image, with its partition nodes; partitions removed and
/// device detached when dropped.
struct PartLoop {
    dev: PathBuf,
}

impl PartLoop {
    /// Attaches `file` with partition scanning and waits for the nodes of `parts`. Kernels
    /// built without partition table support do not scan; `partx` then adds the partitions.
    fn attach(file: &Path, parts: &[u32]) -> PartLoop {
        let r = run_ok("losetup", &["--find", "--show", "--partscan", p(file)]);
        let dev = PathBuf::from(r.stdout.trim());
        assert!(dev.starts_with("/dev/"), "losetup printed {:?}", r.stdout);
        let l = PartLoop { dev };
        let all_there = |l: &PartLoop| parts.iter().all(|&n| l.part(n).exists());
        for round in 0..2 {
            for _ in 0..50 {
                if all_there(&l) {
                    return l;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            if round == 0 {
                // Adds the partitions the kernel does not know yet (and complains about the
                // others).
                run_program("partx", &["-a", p(&l.dev)]);
            }
        }
        panic!(
            "the partitions {parts:?} of {} never appeared",
            l.dev.display()
        );
    }

    fn part(&self, n: u32) -> PathBuf {
        PathBuf::from(format!("{}p{n}", self.dev.display()))
    }
}

impl Drop for PartLoop {
    fn drop(&mut self) {
        run_program("partx", &["-d", p(&self.dev)]);
        for attempt in 0..50 {
            if run_program("losetup", &["-d", p(&self.dev)]).code == Some(0) {
                return;
            }
            if attempt == 49 {
                eprintln!("warning: cannot detach {}", self.dev.display());
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Format {
    Ext4,
    Xfs,
    Btrfs,
    /// FAT with the size mkfs.vfat picks (FAT16 at 64 MiB).
    Vfat,
    Vfat32,
    Ntfs,
    Exfat,
    Swap,
    Luks,
    Lvm,
}

/// Formats `node`; returns the label given (none for LVM).
fn format(node: &Path, f: Format) -> Option<&'static str> {
    let n = p(node);
    match f {
        Format::Ext4 => {
            run_ok("mkfs.ext4", &["-q", "-F", "-L", "vb-ext4", n]);
            Some("vb-ext4")
        }
        Format::Xfs => {
            run_ok("mkfs.xfs", &["-q", "-f", "-L", "vb-xfs", n]);
            Some("vb-xfs")
        }
        Format::Btrfs => {
            run_ok("mkfs.btrfs", &["-q", "-f", "-L", "vb-btrfs", n]);
            Some("vb-btrfs")
        }
        Format::Vfat => {
            run_ok("mkfs.vfat", &["-n", "VBFAT", n]);
            Some("VBFAT")
        }
        Format::Vfat32 => {
            run_ok("mkfs.vfat", &["-F", "32", "-n", "VBFAT32", n]);
            Some("VBFAT32")
        }
        Format::Ntfs => {
            run_ok("mkfs.ntfs", &["-Q", "-F", "-q", "-L", "vb-ntfs", n]);
            Some("vb-ntfs")
        }
        Format::Exfat => {
            run_ok("mkfs.exfat", &["-L", "vb-exfat", n]);
            Some("vb-exfat")
        }
        Format::Swap => {
            run_ok("mkswap", &["-L", "vb-swap", n]);
            Some("vb-swap")
        }
        Format::Luks => {
            run_stdin_ok(
                "cryptsetup",
                &[
                    "luksFormat",
                    "--type",
                    "luks2",
                    "--label",
                    "vb-luks",
                    "--pbkdf",
                    "pbkdf2",
                    "--pbkdf-force-iterations",
                    "1000",
                    "-q",
                    n,
                    "-",
                ],
                b"secret",
            );
            Some("vb-luks")
        }
        Format::Lvm => {
            run_ok("pvcreate", &["-q", "-y", n]);
            None
        }
    }
}

/// `blkid -p -o export NODE` as a map (values unescaped).
fn blkid(node: &Path) -> BTreeMap<String, String> {
    let r = run_program("blkid", &["-p", "-o", "export", p(node)]);
    r.stdout
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.replace('\\', "")))
        .collect()
}

/// `sfdisk --json TARGET` without the names that differ between copies of a disk.
fn sfdisk_json(target: &Path) -> Value {
    let mut v = run_ok("sfdisk", &["--json", p(target)]).json();
    let t = v
        .get_mut("partitiontable")
        .and_then(Value::as_object_mut)
        .expect("partitiontable");
    t.remove("device");
    for part in t
        .get_mut("partitions")
        .and_then(Value::as_array_mut)
        .expect("partitions")
    {
        part.as_object_mut().expect("partition").remove("node");
    }
    v
}

fn text(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_string)
}

/// Compares `volback probe --json DEV` with `sfdisk --json DEV` and, for each formatted
/// partition, with `blkid -p`.
fn check_probe(dev: &PartLoop, formats: &[(u32, Format, Option<&str>)]) -> Value {
    let v = volback_ok(&["probe", "--json", p(&dev.dev)]).json();
    assert_eq!(v["schema"], 1);
    let table = &v["partition_table"];
    let sf = run_ok("sfdisk", &["--json", p(&dev.dev)]).json();
    let sf = &sf["partitiontable"];
    assert_eq!(table["type"], sf["label"], "{v}");
    assert!(
        jstr(table, "/id").eq_ignore_ascii_case(sf["id"].as_str().unwrap()),
        "id {} vs {}",
        table["id"],
        sf["id"]
    );
    let ours = table["partitions"].as_array().unwrap();
    let theirs = sf["partitions"].as_array().unwrap();
    assert_eq!(ours.len(), theirs.len(), "ours {v}\ntheirs {sf}");
    for (o, t) in ours.iter().zip(theirs) {
        let what = format!("partition {}", o["number"]);
        assert_eq!(o["node"], t["node"], "{what}");
        assert_eq!(o["start_sector"], t["start"], "{what}");
        assert_eq!(o["size_sectors"], t["size"], "{what}");
        assert_eq!(
            ju64(o, "/start"),
            ju64(t, "/start") * 512,
            "{what} start bytes"
        );
        assert!(
            jstr(o, "/type").eq_ignore_ascii_case(jstr(t, "/type")),
            "{what}: type {} vs {}",
            o["type"],
            t["type"]
        );
        if let Some(u) = text(t, "uuid") {
            assert!(
                jstr(o, "/uuid").eq_ignore_ascii_case(&u),
                "{what}: uuid {} vs {u}",
                o["uuid"]
            );
        }
        assert_eq!(text(o, "name"), text(t, "name"), "{what}");
        assert_eq!(text(o, "attrs"), text(t, "attrs"), "{what}");
        assert_eq!(
            o["bootable"].as_bool().unwrap(),
            t.get("bootable").and_then(Value::as_bool).unwrap_or(false),
            "{what}"
        );
        assert_eq!(o["warnings"], serde_json::json!([]), "{what}");
    }
    for (n, f, label) in formats {
        let part = ours
            .iter()
            .find(|x| x["number"] == *n)
            .unwrap_or_else(|| panic!("no partition {n} in {v}"));
        let fs = &part["filesystem"];
        let b = blkid(&dev.part(*n));
        let what = format!("partition {n} ({f:?}): ours {fs}, blkid {b:?}");
        assert_eq!(
            text(fs, "type").as_deref(),
            b.get("TYPE").map(String::as_str),
            "{what}"
        );
        assert_eq!(
            text(fs, "uuid").as_deref(),
            b.get("UUID").map(String::as_str),
            "{what}"
        );
        assert_eq!(
            text(fs, "label").as_deref(),
            b.get("LABEL").map(String::as_str),
            "{what}"
        );
        assert_eq!(text(fs, "label").as_deref(), *label, "{what}");
        if matches!(
            f,
            Format::Ext4
                | Format::Xfs
                | Format::Btrfs
                | Format::Vfat
                | Format::Vfat32
                | Format::Exfat
                | Format::Ntfs
        ) {
            let used = ju64(fs, "/used_bytes");
            let size = ju64(fs, "/size");
            assert!(used > 0 || matches!(f, Format::Vfat), "{what}");
            assert!(used <= size && size <= ju64(part, "/size"), "{what}");
        }
    }
    assert_eq!(v["warnings"], serde_json::json!([]), "{v}");
    v
}

/// Dumps the table of `dev` (whose image is `image`), restores the dump onto blank images of
/// the same size with `sfdisk` and with `volback ptable restore`, and compares `sfdisk
/// --json` of all three.
fn check_dump_and_restore(t: &TestDir, dev: &PartLoop, image: &Path, size: u64) {
    let dump = volback_ok(&["ptable", "dump", p(&dev.dev)]);
    assert!(dump.stderr.is_empty(), "warnings: {}", dump.stderr);
    let dump_file = t.join("table.dump");
    std::fs::write(&dump_file, &dump.stdout).unwrap();
    // The dump is what sfdisk itself prints, except for the device name.
    let theirs = run_ok("sfdisk", &["--dump", p(&dev.dev)]).stdout;
    assert_eq!(dump.stdout, theirs);

    let by_sfdisk = t.join("by-sfdisk.img");
    sparse_file(&by_sfdisk, size);
    run_stdin_ok("sfdisk", &["-q", p(&by_sfdisk)], dump.stdout.as_bytes());
    let by_volback = t.join("by-volback.img");
    sparse_file(&by_volback, size);
    volback_ok(&["ptable", "restore", p(&by_volback), p(&dump_file)]).stdout_has(&["verified"]);
    let want = sfdisk_json(image);
    assert_eq!(sfdisk_json(&by_sfdisk), want, "sfdisk restore of our dump");
    assert_eq!(sfdisk_json(&by_volback), want, "volback restore");
    // sfdisk finds nothing to complain about in what volback wrote.
    let verify = run_ok("sfdisk", &["--verify", p(&by_volback)]);
    assert!(
        verify.stdout.contains("No errors detected"),
        "{}",
        verify.stdout
    );
    // And volback reads back what it wrote exactly as what it dumped.
    let again = volback_ok(&["ptable", "dump", p(&by_volback)]).stdout;
    assert_eq!(without_names(&again), without_names(&dump.stdout));
}

/// A dump without its device and partition names.
fn without_names(dump: &str) -> String {
    dump.lines()
        .map(|l| {
            if l.starts_with("device:") {
                "device: DEV"
            } else if let Some((_, rest)) = l.split_once(" : start=") {
                rest
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------------------------------------------------------------------------------------------
// Real disks

const DISK_SIZE: u64 = 900 * MIB;

#[test]
fn gpt_disk_probe_agrees_with_blkid_and_sfdisk() {
    if !require_root_and_loop() || !require_tools(DISK_TOOLS) {
        return;
    }
    let t = TestDir::new();
    let image = t.join("gpt.img");
    sparse_file(&image, DISK_SIZE);
    let script = "label: gpt
size=64MiB, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=\"linux root\"
size=320MiB, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=\"xfs data\"
size=128MiB, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4
size=64MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=\"EFI system\", attrs=\"RequiredPartition GUID:63\"
size=64MiB, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7, name=\"windows data\"
size=32MiB, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7
size=32MiB, type=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F
size=32MiB, type=CA7D7CCB-63ED-4C53-861C-1742536059CC
size=16MiB, type=E6D6D379-F507-44C2-A23C-238F2A3DF928
size=1MiB, type=21686148-6449-6E6F-744E-656564454649, attrs=\"LegacyBIOSBootable\"
";
    run_stdin_ok("sfdisk", &["-q", p(&image)], script.as_bytes());
    let parts = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10];
    let dev = PartLoop::attach(&image, &parts);
    let mut formats = Vec::new();
    for (n, f) in [
        (1, Format::Ext4),
        (2, Format::Xfs),
        (3, Format::Btrfs),
        (4, Format::Vfat32),
        (5, Format::Ntfs),
        (6, Format::Exfat),
        (7, Format::Swap),
        (8, Format::Luks),
        (9, Format::Lvm),
    ] {
        formats.push((n, f, format(&dev.part(n), f)));
    }
    let v = check_probe(&dev, &formats);
    let gpt = &v["partition_table"]["gpt"];
    assert_eq!(gpt["primary"]["status"], "ok", "{gpt}");
    assert_eq!(gpt["backup"]["status"], "ok", "{gpt}");
    assert_eq!(ju64(gpt, "/backup/lba"), DISK_SIZE / 512 - 1);
    assert_eq!(gpt["protective_mbr"], "protective");
    let p4 = &v["partition_table"]["partitions"][3];
    assert_eq!(p4["type_name"], "EFI System");
    assert_eq!(p4["filesystem"]["version"], "FAT32");
    assert_eq!(
        v["partition_table"]["partitions"][4]["type_name"],
        "Microsoft basic data"
    );
    assert!(v["partition_table"]["partitions"][9]["filesystem"].is_null());

    // The human form names the same things.
    volback_ok(&["probe", p(&dev.dev)]).stdout_has(&[
        "Disklabel type: gpt",
        "backup LBA",
        "linux root",
        "vb-xfs",
        "vb-exfat",
        "crypto_LUKS",
        "LVM2_member",
        "vfat (FAT32)",
    ]);

    check_dump_and_restore(&t, &dev, &image, DISK_SIZE);
}

#[test]
fn mbr_disk_with_logical_partitions_agrees_with_blkid_and_sfdisk() {
    if !require_root_and_loop() || !require_tools(DISK_TOOLS) {
        return;
    }
    let t = TestDir::new();
    let image = t.join("mbr.img");
    sparse_file(&image, DISK_SIZE);
    let script = "label: dos
size=64MiB, type=83, bootable
size=320MiB, type=83
type=5
size=128MiB, type=83
size=64MiB, type=e
size=64MiB, type=7
size=32MiB, type=7
size=32MiB, type=82
size=32MiB, type=83
size=16MiB, type=8e
";
    run_stdin_ok("sfdisk", &["-q", p(&image)], script.as_bytes());
    let parts = [1, 2, 3, 5, 6, 7, 8, 9, 10, 11];
    let dev = PartLoop::attach(&image, &parts);
    let mut formats = Vec::new();
    for (n, f) in [
        (1, Format::Ext4),
        (2, Format::Xfs),
        (5, Format::Btrfs),
        (6, Format::Vfat),
        (7, Format::Ntfs),
        (8, Format::Exfat),
        (9, Format::Swap),
        (10, Format::Luks),
        (11, Format::Lvm),
    ] {
        formats.push((n, f, format(&dev.part(n), f)));
    }
    let v = check_probe(&dev, &formats);
    let ps = v["partition_table"]["partitions"].as_array().unwrap();
    let roles: Vec<&str> = ps.iter().map(|x| x["role"].as_str().unwrap()).collect();
    assert_eq!(
        roles,
        [
            "primary", "primary", "extended", "logical", "logical", "logical", "logical",
            "logical", "logical", "logical"
        ]
    );
    assert_eq!(ps[0]["bootable"], true);
    assert!(
        ps[2]["filesystem"].is_null(),
        "an extended partition has no format"
    );
    // PARTUUID as blkid gives it for MBR partitions.
    let b = run_program("blkid", &["-p", "-o", "export", p(&dev.part(6))]);
    assert!(
        b.stdout
            .contains(&format!("PART_ENTRY_UUID={}", jstr(&ps[4], "/uuid"))),
        "{}",
        b.stdout
    );
    volback_ok(&["probe", p(&dev.dev)]).stdout_has(&[
        "Disklabel type: dos",
        "Extended (5)",
        "vb-btrfs",
        "vfat (FAT16)",
        "vb-ntfs",
    ]);

    check_dump_and_restore(&t, &dev, &image, DISK_SIZE);

    // Refusals: a mounted partition (through the device or its image file), a disk too
    // small for the table.
    let dump_file = t.join("table.dump");
    let m = Mount::new(&dev.part(1), &t.join("mnt"), None);
    for target in [&dev.dev, &image] {
        volback_code(&["ptable", "restore", p(target), p(&dump_file)], 1)
            .stderr_has(&["refusing", "mounted"]);
    }
    m.unmount();
    let small = t.join("small.img");
    sparse_file(&small, 200 * MIB);
    volback_code(&["ptable", "restore", p(&small), p(&dump_file)], 1).stderr_has(&[
        "refusing",
        "too small",
        "partition 2",
    ]);
    assert_eq!(
        sha256_file(&small),
        sha256_bytes(&vec![0u8; (200 * MIB) as usize]),
        "a refused restore wrote nothing"
    );
}

// ---------------------------------------------------------------------------------------------
// Damaged tables (image files only: no root needed)

/// CRC-32 (zlib) for patching GPT headers.
fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut b = vec![0u8; len];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut b, offset)
        .unwrap();
    b
}

/// Sets the entry count of the GPT header at `lba` and fixes its CRC.
fn set_gpt_entry_count(image: &Path, lba: u64, count: u32) {
    let mut h = read_at(image, lba * 512, 92);
    h[80..84].copy_from_slice(&count.to_le_bytes());
    h[16..20].fill(0);
    let crc = crc32(&h);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    write_at(image, lba * 512, &h);
}

fn probe_json(image: &Path) -> Value {
    volback_ok(&["probe", "--json", p(image)]).json()
}

fn warnings(v: &Value) -> String {
    let mut all: Vec<String> = v["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap().to_string())
        .collect();
    if let Some(ps) = v["partition_table"]["partitions"].as_array() {
        for x in ps {
            for w in x["warnings"].as_array().unwrap() {
                all.push(w.as_str().unwrap().to_string());
            }
        }
    }
    all.join("\n")
}

fn gpt_image(t: &TestDir, name: &str) -> PathBuf {
    let image = t.join(name);
    sparse_file(&image, 64 * MIB);
    run_stdin_ok(
        "sfdisk",
        &["-q", p(&image)],
        b"label: gpt\nsize=8MiB, type=L\nsize=8MiB, type=S\nsize=8MiB, type=U\n",
    );
    image
}

#[test]
fn damaged_gpt_headers_fall_back_or_fail_clearly() {
    if !require_tools(&["sfdisk"]) {
        return;
    }
    let t = TestDir::new();
    let last = 64 * MIB / 512 - 1;

    // Primary header checksum wrong: the backup is used, with a warning.
    let image = gpt_image(&t, "primary.img");
    let mut b = read_at(&image, 512 + 40, 1);
    b[0] ^= 0xFF;
    write_at(&image, 512 + 40, &b);
    let v = probe_json(&image);
    assert_eq!(v["partition_table"]["gpt"]["primary"]["status"], "corrupt");
    assert_eq!(
        v["partition_table"]["partitions"].as_array().unwrap().len(),
        3
    );
    assert!(warnings(&v).contains("using the backup"), "{v}");
    let d = volback_ok(&["ptable", "dump", p(&image)]);
    d.stderr_has(&["warning", "checksum"]);
    assert_eq!(d.stdout.matches("start=").count(), 3);

    // Backup entry array damaged: reported, primary used.
    let image = gpt_image(&t, "backup.img");
    write_at(&image, (last - 32) * 512 + 5, b"garbage");
    let v = probe_json(&image);
    assert_eq!(v["partition_table"]["gpt"]["backup"]["status"], "corrupt");
    assert!(
        jstr(&v, "/partition_table/gpt/backup/detail").contains("entry array checksum"),
        "{v}"
    );

    // Both headers claim 2^32-1 entries with valid checksums: rejected without trying to
    // read 512 GiB.
    let image = gpt_image(&t, "absurd.img");
    set_gpt_entry_count(&image, 1, u32::MAX);
    set_gpt_entry_count(&image, last, u32::MAX);
    let v = probe_json(&image);
    assert!(
        jstr(&v, "/partition_table/gpt/primary/detail").contains("exceed"),
        "{v}"
    );
    assert!(warnings(&v).contains("no usable GPT header"), "{v}");
    volback_code(&["ptable", "dump", p(&image)], 1)
        .stderr_has(&["no usable partition table", "exceed"]);

    // A truncated disk: partitions past the end and a missing backup are named.
    let image = gpt_image(&t, "truncated.img");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(12 * MIB)
        .unwrap();
    let v = probe_json(&image);
    let w = warnings(&v);
    assert!(w.contains("truncated"), "{w}");
    assert!(w.contains("past the end of the volume"), "{w}");
    volback_ok(&["probe", p(&image)]).stdout_has(&["warning: partition 2", "truncated"]);

    // A volume of a few bytes.
    let tiny = t.join("tiny.img");
    std::fs::write(&tiny, b"hello").unwrap();
    let v = probe_json(&tiny);
    assert!(v["partition_table"].is_null() && v["filesystem"].is_null());
}

#[test]
fn looping_ebr_chain_is_cut_with_a_warning() {
    if !require_tools(&["sfdisk"]) {
        return;
    }
    let t = TestDir::new();
    let image = t.join("loop.img");
    sparse_file(&image, 64 * MIB);
    run_stdin_ok(
        "sfdisk",
        &["-q", p(&image)],
        b"label: dos\nsize=4MiB, type=83\ntype=5\nsize=4MiB, type=83\nsize=4MiB, type=83\n",
    );
    // Find the extended partition and its second EBR, then make the second EBR link to
    // itself.
    let mbr = read_at(&image, 0, 512);
    let ext_start = u32::from_le_bytes(mbr[446 + 16 + 8..446 + 16 + 12].try_into().unwrap());
    let ebr1 = read_at(&image, u64::from(ext_start) * 512, 512);
    let rel2 = u32::from_le_bytes(ebr1[446 + 16 + 8..446 + 16 + 12].try_into().unwrap());
    assert_ne!(rel2, 0);
    let ebr2 = u64::from(ext_start + rel2) * 512;
    let mut link = vec![0u8; 16];
    link[4] = 0x05;
    link[8..12].copy_from_slice(&rel2.to_le_bytes());
    link[12..16].copy_from_slice(&100u32.to_le_bytes());
    write_at(&image, ebr2 + 446 + 16, &link);

    let v = probe_json(&image);
    let numbers: Vec<u64> = v["partition_table"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["number"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, [1, 2, 5, 6]);
    assert!(warnings(&v).contains("loops back"), "{v}");
}

#[test]
fn bad_partition_scripts_are_refused_with_the_line() {
    let t = TestDir::new();
    let target = t.join("blank.img");
    sparse_file(&target, 64 * MIB);
    let cases: &[(&str, &[&str])] = &[
        (
            "label: dos\n1 : start=2048, size=4MiB, type=83\n",
            &["line 2", "size"],
        ),
        (
            "label: gpt\n1 : start=2048, size=2048, type=L\n2 : start=3000, size=2048, type=L\n",
            &["overlap"],
        ),
        (
            "label: dos\nlabel-id: zz\n1 : start=2048, size=8, type=83\n",
            &["label-id"],
        ),
        ("1 : start=2048, size=2048, type=83\n", &["label"]),
        (
            "label: gpt\nsector-size: 4096\n1 : start=2048, size=2048, type=L\n",
            &["refusing", "4096-byte sectors"],
        ),
    ];
    for (i, (text, needles)) in cases.iter().enumerate() {
        let f = t.join(&format!("bad{i}.dump"));
        std::fs::write(&f, text).unwrap();
        volback_code(&["ptable", "restore", p(&target), p(&f)], 1).stderr_has(needles);
    }
    // Nothing was written.
    assert_eq!(allocated_bytes(&target), 0);
    // A volume without a table has nothing to dump.
    volback_code(&["ptable", "dump", p(&target)], 1).stderr_has(&["no usable partition table"]);
    // --dry-run shows the table and writes nothing.
    let f = t.join("good.dump");
    std::fs::write(
        &f,
        "label: gpt\n1 : start=2048, size=2048, type=L, name=\"x\"\n",
    )
    .unwrap();
    volback_ok(&["ptable", "restore", "--dry-run", p(&target), p(&f)])
        .stdout_has(&["would write", "name=\"x\""]);
    assert_eq!(allocated_bytes(&target), 0);
}

#[test]
fn probe_and_ptable_command_line() {
    for args in [
        &["probe", "--help"][..],
        &["ptable", "--help"],
        &["ptable", "dump", "--help"],
        &["ptable", "restore", "--help"],
    ] {
        volback_ok(args).stdout_has(&["usage"]);
    }
    volback_ok(&["--help"]).stdout_has(&["probe", "ptable"]);
    // Without a source: the machine's disks and volumes (an array, possibly empty).
    assert!(volback_ok(&["probe", "--json"]).json().is_array());
    for args in [
        &["ptable"][..],
        &["ptable", "dump"],
        &["ptable", "restore", "disk.img"],
        &["ptable", "bogus", "x"],
    ] {
        volback_code(args, 2);
    }
    let t = TestDir::new();
    volback_code(&["probe", p(t.path())], 1).stderr_has(&["is a directory"]);
    volback_code(&["probe", p(&t.join("missing.img"))], 1).stderr_has(&["missing.img"]);
    // A bare filesystem image: no table, the format at the top level, and nothing to dump.
    let img = t.join("fs.img");
    sparse_file(&img, 8 * MIB);
    if require_tools(&["mkfs.ext4"]) {
        run_ok("mkfs.ext4", &["-q", "-F", "-L", "bare", p(&img)]);
        let v = probe_json(&img);
        assert!(v["partition_table"].is_null(), "{v}");
        assert_eq!(v["filesystem"]["type"], "ext4");
        assert_eq!(v["filesystem"]["label"], "bare");
        volback_ok(&["probe", p(&img)]).stdout_has(&["Disklabel type: none", "ext4", "bare"]);
        volback_code(&["ptable", "dump", p(&img)], 1).stderr_has(&["no usable partition table"]);
    }
}
