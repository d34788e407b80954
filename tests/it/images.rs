//! VHD, VHDX and qcow2 writers and readers (`volback::image`) judged by qemu-img: `info`
//! (format, exact virtual size), `check` (clean), `compare` (same content as a raw file
//! written alongside), images updated in place, interrupted writers (a child process killed
//! mid-run), images made by `qemu-img convert` read back, and damaged images refused cleanly.

use crate::util::*;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use volback::image::{self, CreateOptions, ImageFormat, ImageWriter};
use volback::volume::Volume;

const FORMATS: [ImageFormat; 4] = [
    ImageFormat::Vhd,
    ImageFormat::VhdDynamic,
    ImageFormat::Vhdx,
    ImageFormat::Qcow2,
];

/// The copy pipeline's default block size.
const BLOCK: u64 = 256 * KIB;

/// 40 MiB + 3 sectors: not a multiple of any format's block size.
const ODD_SIZE: u64 = 40 * MIB + 3 * 512;

fn qemu_name(f: ImageFormat) -> &'static str {
    match f {
        ImageFormat::Vhd | ImageFormat::VhdDynamic => "vpc",
        ImageFormat::Vhdx => "vhdx",
        ImageFormat::Qcow2 => "qcow2",
    }
}

fn ext(f: ImageFormat) -> &'static str {
    match f {
        ImageFormat::Vhd | ImageFormat::VhdDynamic => "vhd",
        ImageFormat::Vhdx => "vhdx",
        ImageFormat::Qcow2 => "qcow2",
    }
}

/// True when qemu-img is installed; without it the tests skip, or fail when `CI` is set.
fn require_qemu_img() -> bool {
    require_tools(&["qemu-img"])
}

/// A raw file and an image receiving the same writes.
struct Pair {
    raw: std::fs::File,
    img: Box<dyn ImageWriter>,
}

impl Pair {
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.raw.write_all_at(data, offset).expect("write raw");
        self.img.write_at(offset, data).expect("write image");
    }

    fn zero(&mut self, offset: u64, len: u64) {
        self.raw
            .write_all_at(&vec![0u8; len as usize], offset)
            .expect("zero raw");
        self.img.write_zeroes(offset, len).expect("zero image");
    }
}

fn new_raw(path: &Path, size: u64) -> std::fs::File {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .expect("create raw");
    f.set_len(size).expect("size raw");
    f
}

/// The standard pattern: 256 KiB blocks in ascending order, with never-written blocks, blocks
/// of zeros (written as data or as `write_zeroes`), and a few unaligned writes.
fn write_pattern(pair: &mut Pair, size: u64, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut off = 0;
    let mut i = 0u64;
    while off < size {
        let len = BLOCK.min(size - off);
        match i % 9 {
            3 | 7 => {}
            5 => pair.write(off, &vec![0u8; len as usize]),
            8 => pair.zero(off, len),
            _ => pair.write(off, &rng.bytes(len as usize)),
        }
        off += len;
        i += 1;
    }
    // Unaligned writes across block, cluster and sector boundaries.
    for (o, n) in [
        (12_345u64, 1000usize),
        (2 * MIB - 100, 300),
        (size - 700, 700),
    ] {
        pair.write(o, &rng.bytes(n));
    }
}

fn info(format: ImageFormat, path: &Path) -> serde_json::Value {
    run_ok(
        "qemu-img",
        &["info", "--output=json", "-f", qemu_name(format), p(path)],
    )
    .json()
}

fn check_clean(format: ImageFormat, path: &Path) {
    if matches!(format, ImageFormat::Vhd | ImageFormat::VhdDynamic) {
        // qemu-img has no consistency check for VHD; reading every byte is the check.
        return;
    }
    let r = run_program(
        "qemu-img",
        &["check", "--output=json", "-f", qemu_name(format), p(path)],
    );
    assert_eq!(
        r.code,
        Some(0),
        "qemu-img check {} is not clean:\n{}\n{}",
        path.display(),
        r.stdout,
        r.stderr
    );
}

fn compare(format: ImageFormat, raw: &Path, img: &Path) {
    run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            qemu_name(format),
            p(raw),
            p(img),
        ],
    );
}

/// Reads the image through volback's reader and compares every byte with the raw file;
/// checks that `next_data` never skips data.
fn read_back(format: ImageFormat, raw: &Path, img: &Path) -> Box<dyn Volume> {
    let vol = image::open(format, img).expect("open image");
    let expected = std::fs::read(raw).expect("read raw");
    assert_eq!(vol.size(), format.virtual_size(expected.len() as u64));
    let mut got = vec![0u8; vol.size() as usize];
    // Odd-sized reads, to cross unit boundaries.
    let mut off = 0;
    while off < got.len() {
        let n = (777 * 1024).min(got.len() - off);
        vol.read_at(off as u64, &mut got[off..off + n])
            .expect("read image");
        off += n;
    }
    assert!(got[expected.len()..].iter().all(|&b| b == 0));
    assert!(got[..expected.len()] == expected[..], "content differs");
    // Everything outside next_data's ranges is zero.
    let mut pos = 0;
    while let Some(r) = vol.next_data(pos, vol.size()).expect("next_data") {
        assert!(r.start >= pos && r.end > r.start && r.end <= vol.size());
        assert!(
            got[pos as usize..r.start as usize].iter().all(|&b| b == 0),
            "next_data skipped data at {pos}..{}",
            r.start
        );
        pos = r.end;
    }
    assert!(got[pos as usize..].iter().all(|&b| b == 0));
    vol
}

/// Bytes reported as data by `next_data`.
fn data_bytes(vol: &dyn Volume) -> u64 {
    let mut pos = 0;
    let mut total = 0;
    while let Some(r) = vol.next_data(pos, vol.size()).expect("next_data") {
        total += r.end - r.start;
        pos = r.end;
    }
    total
}

fn create(format: ImageFormat, path: &Path, size: u64) -> Box<dyn ImageWriter> {
    image::create(format, path, size, &CreateOptions::default()).expect("create image")
}

/// Every format: write the pattern, then qemu-img info / check / compare and volback's own
/// reader agree with a raw file of the same writes; then update in place (overwrite, zero
/// whole blocks and parts of blocks) and check again.
#[test]
fn images_match_raw_and_update_in_place() {
    if !require_qemu_img() {
        return;
    }
    let dir = TestDir::new();
    for format in FORMATS {
        let raw = dir.join(&format!("{format:?}.raw"));
        let img = dir.join(&format!("{format:?}.{}", ext(format)));
        let mut pair = Pair {
            raw: new_raw(&raw, ODD_SIZE),
            img: create(format, &img, ODD_SIZE),
        };
        write_pattern(&mut pair, ODD_SIZE, 1);
        pair.img.finish().expect("finish");
        assert_eq!(image::detect(&img).unwrap(), Some(format));
        let i = info(format, &img);
        assert_eq!(ju64(&i, "/virtual-size"), ODD_SIZE, "{format:?}: {i}");
        assert_eq!(jstr(&i, "/format"), qemu_name(format));
        check_clean(format, &img);
        compare(format, &raw, &img);
        read_back(format, &raw, &img);

        // Update in place.
        let mut pair = Pair {
            raw: new_raw(&raw, ODD_SIZE),
            img: image::open_for_update(format, &img, ODD_SIZE).expect("open for update"),
        };
        let mut rng = Rng::new(99);
        for k in [0u64, 7, 8, 40, 100, 159] {
            pair.write(k * BLOCK, &rng.bytes(BLOCK as usize));
        }
        pair.zero(16 * MIB, 4 * MIB); // whole VHD/VHDX blocks and qcow2 clusters
        pair.zero(3 * MIB + 4096, 10_000); // part of a block
        pair.write(30 * MIB + 5, &rng.bytes(3 * MIB as usize));
        pair.write(33 * MIB, &vec![0u8; 2 * MIB as usize]); // zeros over data
        pair.img.sync().expect("sync");
        pair.write(ODD_SIZE - 512, &rng.bytes(512));
        pair.img.finish().expect("finish update");
        check_clean(format, &img);
        compare(format, &raw, &img);
        let vol = read_back(format, &raw, &img);
        if format != ImageFormat::Vhd {
            // Never-written blocks stay unallocated.
            assert!(
                data_bytes(&*vol) < ODD_SIZE,
                "{format:?}: no holes reported"
            );
        }
    }
}

/// A sparse 5 GiB volume with a few blocks written: the image stays small, qemu sees the
/// exact size and the same content.
#[test]
fn sparse_five_gib_images() {
    if !require_qemu_img() {
        return;
    }
    let dir = TestDir::new();
    let size = 5 << 30;
    for format in FORMATS {
        let raw = dir.join(&format!("{format:?}.raw"));
        let img = dir.join(&format!("{format:?}.{}", ext(format)));
        let mut pair = Pair {
            raw: new_raw(&raw, size),
            img: create(format, &img, size),
        };
        let mut rng = Rng::new(5);
        let written = [0, 4 << 30, (4 << 30) + BLOCK, size - BLOCK, 123 * MIB + 512];
        for off in written {
            pair.write(off, &rng.bytes(BLOCK as usize));
        }
        pair.img.finish().expect("finish");
        let i = info(format, &img);
        assert_eq!(ju64(&i, "/virtual-size"), size, "{format:?}: {i}");
        assert!(
            allocated_bytes(&img) < 64 * MIB,
            "{format:?}: {} bytes allocated",
            allocated_bytes(&img)
        );
        check_clean(format, &img);
        if format == ImageFormat::Vhdx {
            // qemu reads VHDX holes as data (no block status): compare the written blocks
            // through `qemu-img dd` instead of reading 5 GiB of zeros.
            for off in written {
                let out = dir.join("dd.out");
                let _ = std::fs::remove_file(&out);
                run_ok(
                    "qemu-img",
                    &[
                        "dd",
                        "-f",
                        "vhdx",
                        "-O",
                        "raw",
                        &format!("bs={BLOCK}"),
                        &format!("skip={}", off / BLOCK),
                        // qemu-img dd counts the skipped blocks too.
                        &format!("count={}", off / BLOCK + 1),
                        &format!("if={}", p(&img)),
                        &format!("of={}", p(&out)),
                    ],
                );
                let mut want = vec![0u8; BLOCK as usize];
                std::fs::File::open(&raw)
                    .unwrap()
                    .read_exact_at(&mut want, off / BLOCK * BLOCK)
                    .unwrap();
                assert!(std::fs::read(&out).unwrap() == want, "VHDX block at {off}");
            }
        } else {
            compare(format, &raw, &img);
        }
        let vol = image::open(format, &img).expect("open");
        assert!(data_bytes(&*vol) < 64 * MIB, "{format:?}");
        let mut buf = vec![0u8; BLOCK as usize];
        vol.read_at(4 << 30, &mut buf).unwrap();
        let mut want = vec![0u8; BLOCK as usize];
        std::fs::File::open(&raw)
            .unwrap()
            .read_exact_at(&mut want, 4 << 30)
            .unwrap();
        assert!(buf == want);
    }
}

/// A volume whose size is not a multiple of 512: the image is rounded up to whole sectors.
#[test]
fn image_sizes_round_up_to_sectors() {
    if !require_qemu_img() {
        return;
    }
    let dir = TestDir::new();
    let size = 3 * MIB + 100;
    for format in FORMATS {
        let img = dir.join(&format!("{format:?}.{}", ext(format)));
        let mut w = create(format, &img, size);
        w.write_at(size - 100, &[0xAB; 100]).unwrap();
        w.finish().unwrap();
        let i = info(format, &img);
        assert_eq!(ju64(&i, "/virtual-size"), 3 * MIB + 512, "{format:?}");
        check_clean(format, &img);
        let vol = image::open(format, &img).unwrap();
        let mut b = [0u8; 512];
        vol.read_at(3 * MIB, &mut b).unwrap();
        assert!(b[..100].iter().all(|&x| x == 0xAB) && b[100..].iter().all(|&x| x == 0));
        // The true size is accepted for update.
        image::open_for_update(format, &img, size)
            .unwrap()
            .finish()
            .unwrap();
        let e = image::open_for_update(format, &img, size + MIB)
            .err()
            .unwrap();
        assert!(matches!(e, volback::Error::ImageSizeMismatch { .. }), "{e}");
    }
}

/// The child side of the crash test: writes the pattern forever (rewinding at the end) and
/// prints a line after each sync, until killed.
#[test]
fn images_crash_child() {
    let Ok(spec) = std::env::var("VOLBACK_IMAGE_CRASH_CHILD") else {
        return;
    };
    let mut parts = spec.splitn(2, ':');
    let format: ImageFormat =
        serde_json::from_str(&format!("\"{}\"", parts.next().unwrap())).expect("format");
    let path = Path::new(parts.next().unwrap());
    let mut w = create(format, path, ODD_SIZE);
    let mut rng = Rng::new(7);
    let mut round = 0u64;
    loop {
        let mut off = 0;
        let mut i = 0u64;
        while off < ODD_SIZE {
            let len = BLOCK.min(ODD_SIZE - off);
            if (i + round) % 4 == 1 {
                w.write_zeroes(off, len).unwrap();
            } else {
                w.write_at(off, &rng.bytes(len as usize)).unwrap();
            }
            if i % 16 == 15 {
                w.sync().unwrap();
                println!("synced {round} {i}");
            }
            off += len;
            i += 1;
        }
        round += 1;
    }
}

/// A writer killed (SIGKILL) in the middle of writing: `open_for_update` accepts the image,
/// rewriting the same ranges and finishing gives an image qemu-img checks clean, with the
/// right content.
#[test]
fn images_survive_a_killed_writer() {
    if !require_qemu_img() {
        return;
    }
    use std::io::BufRead;
    let dir = TestDir::new();
    for format in FORMATS {
        for kill_after in [1usize, 9] {
            let img = dir.join(&format!("crash-{format:?}-{kill_after}.{}", ext(format)));
            let name = serde_json::to_string(&format).unwrap();
            let mut child = Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "images::images_crash_child", "--nocapture"])
                .env(
                    "VOLBACK_IMAGE_CRASH_CHILD",
                    format!("{}:{}", name.trim_matches('"'), p(&img)),
                )
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn child");
            let out = child.stdout.take().unwrap();
            let mut lines = std::io::BufReader::new(out).lines();
            let mut seen = 0;
            while seen < kill_after {
                let line = lines.next().expect("child exited").unwrap();
                if line.starts_with("synced") {
                    seen += 1;
                }
            }
            child.kill().unwrap();
            child.wait().unwrap();

            let raw = dir.join("crash.raw");
            let _ = std::fs::remove_file(&raw);
            let mut pair = Pair {
                raw: new_raw(&raw, ODD_SIZE),
                img: image::open_for_update(format, &img, ODD_SIZE)
                    .unwrap_or_else(|e| panic!("{format:?}: reopen after kill: {e}")),
            };
            // Rewrite everything: the same ranges, new content (zeros over the rest).
            let mut rng = Rng::new(8);
            let mut off = 0;
            let mut i = 0u64;
            while off < ODD_SIZE {
                let len = BLOCK.min(ODD_SIZE - off);
                if i.is_multiple_of(3) {
                    pair.zero(off, len);
                } else {
                    pair.write(off, &rng.bytes(len as usize));
                }
                off += len;
                i += 1;
            }
            pair.img.finish().unwrap();
            check_clean(format, &img);
            compare(format, &raw, &img);
            read_back(format, &raw, &img);
        }
    }
}

/// Images made by `qemu-img convert` read back through volback's readers.
#[test]
fn images_from_qemu_img_read_back() {
    if !require_qemu_img() {
        return;
    }
    let dir = TestDir::new();
    let raw = dir.join("src.raw");
    {
        let mut f = new_raw(&raw, ODD_SIZE);
        let mut rng = Rng::new(3);
        let mut off = 0;
        let mut i = 0;
        while off < ODD_SIZE {
            let len = BLOCK.min(ODD_SIZE - off);
            if i % 3 != 1 {
                f.write_all_at(&rng.bytes(len as usize), off).unwrap();
            }
            off += len;
            i += 1;
        }
        use std::io::Write;
        f.flush().unwrap();
    }
    let expected = std::fs::read(&raw).unwrap();
    let cases: [(&str, &[&str], ImageFormat); 5] = [
        ("vpc", &["-o", "subformat=dynamic"], ImageFormat::VhdDynamic),
        ("vpc", &["-o", "subformat=fixed"], ImageFormat::Vhd),
        (
            "vpc",
            &["-o", "subformat=fixed,force_size=on"],
            ImageFormat::Vhd,
        ),
        ("vhdx", &[], ImageFormat::Vhdx),
        ("qcow2", &[], ImageFormat::Qcow2),
    ];
    for (i, (fmt, opts, format)) in cases.iter().enumerate() {
        let img = dir.join(&format!("q{i}.{fmt}"));
        let mut args = vec!["convert", "-f", "raw", "-O", fmt];
        args.extend_from_slice(opts);
        args.push(p(&raw));
        args.push(p(&img));
        run_ok("qemu-img", &args);
        assert_eq!(
            image::detect(&img).unwrap(),
            Some(*format),
            "{fmt} {opts:?}"
        );
        let vol = image::open(*format, &img).expect("open qemu image");
        let qsize = ju64(&info(*format, &img), "/virtual-size");
        assert_eq!(vol.size(), qsize, "{fmt} {opts:?}: size");
        let mut got = vec![0u8; vol.size() as usize];
        vol.read_at(0, &mut got).unwrap();
        assert!(
            got[..expected.len()] == expected[..],
            "{fmt} {opts:?}: content"
        );
        assert!(got[expected.len()..].iter().all(|&b| b == 0));
        if *format != ImageFormat::Vhd {
            assert!(data_bytes(&*vol) < vol.size(), "{fmt}: no holes");
        }
        // And they can be updated in place (qemu's VHD sizes follow the CHS geometry).
        let mut w = image::open_for_update(*format, &img, qsize).expect("update qemu image");
        w.write_zeroes(0, 4 * MIB).unwrap();
        w.write_at(MIB + 17, b"volback was here").unwrap();
        w.finish().unwrap();
        check_clean(*format, &img);
        let vol = image::open(*format, &img).unwrap();
        let mut b = vec![0u8; 4 * MIB as usize];
        vol.read_at(0, &mut b).unwrap();
        assert_eq!(
            &b[MIB as usize + 17..MIB as usize + 33],
            b"volback was here"
        );
        b[MIB as usize + 17..MIB as usize + 33].fill(0);
        assert!(b.iter().all(|&x| x == 0));
    }
}

/// Flips bytes of `path` at `offset`.
fn poke(path: &Path, offset: u64, bytes: &[u8]) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

/// Opens and reads the whole image; returns the error (there must be one).
fn open_and_read_err(format: ImageFormat, path: &Path) -> volback::Error {
    let r = image::open(format, path).and_then(|vol| {
        let mut buf = vec![0u8; MIB as usize];
        let mut off = 0;
        while off < vol.size() {
            let n = MIB.min(vol.size() - off) as usize;
            vol.read_at(off, &mut buf[..n])?;
            off += n as u64;
        }
        let mut pos = 0;
        while let Some(r) = vol.next_data(pos, vol.size())? {
            pos = r.end;
        }
        Ok(())
    });
    match r {
        Ok(()) => panic!("{format:?} {}: damage not detected", path.display()),
        Err(e) => e,
    }
}

fn assert_corrupt(e: &volback::Error, words: &[&str]) {
    let msg = e.to_string();
    assert!(
        matches!(e, volback::Error::Corrupt { .. }),
        "not a Corrupt error: {msg}"
    );
    for w in words {
        assert!(msg.contains(w), "{msg:?} does not mention {w:?}");
    }
}

fn small_image(dir: &TestDir, format: ImageFormat, name: &str) -> std::path::PathBuf {
    let img = dir.join(name);
    let mut w = create(format, &img, 8 * MIB);
    let mut rng = Rng::new(11);
    w.write_at(0, &rng.bytes(MIB as usize)).unwrap();
    w.write_at(5 * MIB, &rng.bytes(MIB as usize)).unwrap();
    w.finish().unwrap();
    img
}

/// Damaged images: clear `Corrupt` errors naming the file and the structure, never a panic.
#[test]
fn damaged_images_are_refused() {
    let dir = TestDir::new();
    let be32 = |v: u32| v.to_be_bytes();

    // Fixed VHD: wrong footer checksum.
    let img = small_image(&dir, ImageFormat::Vhd, "fixed.vhd");
    poke(&img, 8 * MIB + 64, &be32(0x1234_5678));
    let e = open_and_read_err(ImageFormat::Vhd, &img);
    assert_corrupt(&e, &["VHD footer", "checksum", "fixed.vhd"]);

    // Dynamic VHD: a damaged copy at offset 0 is not fatal while the last footer is sound...
    let img = small_image(&dir, ImageFormat::VhdDynamic, "dyn.vhd");
    poke(&img, 64, &be32(0x1234_5678));
    assert!(image::open(ImageFormat::VhdDynamic, &img).is_ok());
    let copy = dir.join("dyn-copy.vhd");
    std::fs::copy(&img, &copy).unwrap();
    // Updating repairs the copy.
    image::open_for_update(ImageFormat::VhdDynamic, &copy, 8 * MIB)
        .unwrap()
        .finish()
        .unwrap();
    let len = std::fs::metadata(&copy).unwrap().len();
    poke(&copy, len - 512 + 64, &be32(0x1234_5678));
    assert!(image::open(ImageFormat::VhdDynamic, &copy).is_ok());
    // ...both are.
    let len = std::fs::metadata(&img).unwrap().len();
    poke(&img, len - 512 + 64, &be32(0x1234_5678));
    assert_corrupt(
        &open_and_read_err(ImageFormat::VhdDynamic, &img),
        &["footer", "checksum"],
    );

    // Dynamic VHD: a BAT entry past the end of the file.
    let img = small_image(&dir, ImageFormat::VhdDynamic, "bat.vhd");
    poke(&img, 1536, &be32(0x00FF_0000));
    assert_corrupt(
        &open_and_read_err(ImageFormat::VhdDynamic, &img),
        &["block allocation table entry 0", "past the end"],
    );
    // A BAT entry pointing into the header.
    poke(&img, 1536, &be32(1));
    assert_corrupt(
        &open_and_read_err(ImageFormat::VhdDynamic, &img),
        &["overlaps"],
    );

    // Dynamic VHD: an absurd BAT size (checksum fixed up).
    let img = small_image(&dir, ImageFormat::VhdDynamic, "absurd.vhd");
    let mut h = [0u8; 1024];
    std::fs::File::open(&img)
        .unwrap()
        .read_exact_at(&mut h, 512)
        .unwrap();
    h[28..32].copy_from_slice(&be32(0xFFFF_FFF0));
    h[36..40].fill(0);
    let sum = !h.iter().fold(0u32, |s, &b| s.wrapping_add(b as u32));
    h[36..40].copy_from_slice(&be32(sum));
    poke(&img, 512, &h);
    assert_corrupt(
        &open_and_read_err(ImageFormat::VhdDynamic, &img),
        &["dynamic header", "block allocation table"],
    );

    // VHDX: both headers damaged.
    let img = small_image(&dir, ImageFormat::Vhdx, "hdr.vhdx");
    poke(&img, 64 * KIB + 100, b"x");
    poke(&img, 128 * KIB + 100, b"x");
    assert_corrupt(
        &open_and_read_err(ImageFormat::Vhdx, &img),
        &["VHDX headers", "CRC-32C"],
    );
    // VHDX: one damaged header is survivable.
    let img = small_image(&dir, ImageFormat::Vhdx, "hdr1.vhdx");
    poke(&img, 128 * KIB + 100, b"x");
    assert!(image::open(ImageFormat::Vhdx, &img).is_ok());

    // VHDX: a BAT entry past the end of the file (BAT at 3 MiB).
    let img = small_image(&dir, ImageFormat::Vhdx, "bat.vhdx");
    poke(&img, 3 * MIB, &((1u64 << 40) | 6).to_le_bytes());
    assert_corrupt(
        &open_and_read_err(ImageFormat::Vhdx, &img),
        &["BAT entry of block 0", "past the end"],
    );
    // VHDX: an absurd virtual size (metadata items at 2 MiB + 64 KiB: block size, then size).
    let img = small_image(&dir, ImageFormat::Vhdx, "size.vhdx");
    poke(&img, 2 * MIB + 64 * KIB + 8, &(60u64 << 40).to_le_bytes());
    assert_corrupt(
        &open_and_read_err(ImageFormat::Vhdx, &img),
        &["BAT region", "too small"],
    );
    poke(&img, 2 * MIB + 64 * KIB + 8, &u64::MAX.to_le_bytes());
    assert_corrupt(
        &open_and_read_err(ImageFormat::Vhdx, &img),
        &["virtual disk size"],
    );

    // qcow2: an L2 entry past the end of the file.
    let img = small_image(&dir, ImageFormat::Qcow2, "l2.qcow2");
    let mut hdr = [0u8; 48];
    std::fs::File::open(&img)
        .unwrap()
        .read_exact_at(&mut hdr, 0)
        .unwrap();
    let l1_off = u64::from_be_bytes(hdr[40..48].try_into().unwrap());
    let mut l1 = [0u8; 8];
    std::fs::File::open(&img)
        .unwrap()
        .read_exact_at(&mut l1, l1_off)
        .unwrap();
    let l2_off = u64::from_be_bytes(l1) & 0x00ff_ffff_ffff_fe00;
    poke(&img, l2_off, &((1u64 << 63) | (1 << 40)).to_be_bytes());
    assert_corrupt(
        &open_and_read_err(ImageFormat::Qcow2, &img),
        &["L2 entry of virtual cluster 0", "past the end"],
    );
    // qcow2: an L1 table claimed absurdly large.
    poke(&img, 36, &be32(0x7FFF_FFFF));
    assert_corrupt(&open_and_read_err(ImageFormat::Qcow2, &img), &["L1 table"]);
    // qcow2: compressed and backing-file images are refused as unsupported.
    let img = small_image(&dir, ImageFormat::Qcow2, "back.qcow2");
    poke(&img, 8, &512u64.to_be_bytes());
    let e = image::open(ImageFormat::Qcow2, &img).err().unwrap();
    assert!(matches!(e, volback::Error::UnsupportedImage { .. }), "{e}");
    assert!(e.to_string().contains("backing file"), "{e}");

    // Truncated files, every format.
    for format in FORMATS {
        let img = small_image(&dir, format, &format!("trunc-{format:?}"));
        let len = std::fs::metadata(&img).unwrap().len();
        for keep in [0, 100, 70_000, len / 2, len - 1] {
            OpenOptions::new()
                .write(true)
                .open(&img)
                .unwrap()
                .set_len(keep)
                .unwrap();
            let e = open_and_read_err(format, &img);
            assert!(
                matches!(e, volback::Error::Corrupt { .. }),
                "{format:?} cut at {keep}: {e}"
            );
        }
    }
}

/// Random bytes sprayed over the metadata of valid images: errors, no panics, no hangs.
#[test]
fn images_with_random_damage_never_panic() {
    let dir = TestDir::new();
    let mut rng = Rng::new(42);
    for format in FORMATS {
        let pristine = small_image(&dir, format, &format!("pristine-{format:?}"));
        let bytes = std::fs::read(&pristine).unwrap();
        // Where the metadata is.
        let hot: &[(u64, u64)] = match format {
            ImageFormat::Vhd => &[(8 * MIB, 512)],
            ImageFormat::VhdDynamic => &[(0, 2048), (bytes.len() as u64 - 512, 512)],
            ImageFormat::Vhdx => &[(0, 320 * KIB), (2 * MIB, 64 * KIB + 64), (3 * MIB, 4096)],
            ImageFormat::Qcow2 => &[(0, 4 * 65536)],
        };
        for round in 0..40 {
            let mut b = bytes.clone();
            for _ in 0..1 + round % 8 {
                let (start, len) = hot[rng.below(hot.len() as u64) as usize];
                let at = (start + rng.below(len)) as usize;
                if at < b.len() {
                    b[at] = rng.next_u64() as u8;
                }
            }
            let img = dir.join("mutated");
            std::fs::write(&img, &b).unwrap();
            if let Ok(vol) = image::open(format, &img) {
                let mut buf = vec![0u8; 64 * KIB as usize];
                let mut pos = 0;
                let mut steps = 0;
                while let Ok(Some(r)) = vol.next_data(pos, vol.size()) {
                    let n = (r.end - r.start).min(buf.len() as u64) as usize;
                    let _ = vol.read_at(r.start, &mut buf[..n]);
                    pos = r.end;
                    steps += 1;
                    if steps > 2000 {
                        break;
                    }
                }
            }
            let _ = image::open_for_update(format, &img, 8 * MIB).map(|w| w.finish());
        }
    }
}

/// Variants other tools produce: qcow2 with 1- and 64-bit refcounts, small and large
/// clusters, version 2; VHDX with "not present" blocks; a dynamic VHD whose sector bitmaps
/// leave sectors out. Read back, updated where volback supports it, checked by qemu-img.
#[test]
fn image_variants_from_other_tools() {
    if !require_qemu_img() {
        return;
    }
    let dir = TestDir::new();
    let size = 12 * MIB + 512;
    let raw = dir.join("v.raw");
    {
        let f = new_raw(&raw, size);
        let mut rng = Rng::new(21);
        for off in [0, 3 * MIB + 4096, 7 * MIB, size - 64 * KIB] {
            f.write_all_at(&rng.bytes(64 * KIB as usize), off).unwrap();
        }
    }
    let variants: [(&str, &[&str]); 6] = [
        ("qcow2", &["-o", "refcount_bits=1"]),
        ("qcow2", &["-o", "refcount_bits=64,cluster_size=512"]),
        ("qcow2", &["-o", "cluster_size=2M,lazy_refcounts=on"]),
        ("qcow2", &["-o", "compat=0.10"]),
        ("vhdx", &["-o", "block_state_zero=off,block_size=1M"]),
        ("vpc", &["-o", "force_size=on"]),
    ];
    for (i, (fmt, opts)) in variants.iter().enumerate() {
        let img = dir.join(&format!("v{i}.{fmt}"));
        let mut args = vec!["convert", "-f", "raw", "-O", fmt];
        args.extend_from_slice(opts);
        args.push(p(&raw));
        args.push(p(&img));
        run_ok("qemu-img", &args);
        let format = image::detect(&img).unwrap().expect("detected");
        read_back(format, &raw, &img);
        let upd = image::open_for_update(format, &img, size);
        if opts.contains(&"compat=0.10") {
            let e = upd.err().expect("version 2 refused for update");
            assert!(e.to_string().contains("compat=1.1"), "{e}");
            continue;
        }
        let mut pair = Pair {
            raw: new_raw(&raw, size),
            img: upd.unwrap_or_else(|e| panic!("{fmt} {opts:?}: {e}")),
        };
        let mut rng = Rng::new(22 + i as u64);
        pair.write(5 * MIB + 333, &rng.bytes(300_000));
        pair.zero(0, 64 * KIB);
        pair.zero(7 * MIB, 2 * MIB);
        pair.write(11 * MIB, &rng.bytes(MIB as usize));
        pair.img.finish().unwrap();
        check_clean(format, &img);
        compare(format, &raw, &img);
        read_back(format, &raw, &img);
    }
}

/// A dynamic VHD block whose sector bitmap leaves sectors out (as Windows writes them): those
/// sectors read as zeros whatever the file holds there, also after volback updated the block.
#[test]
fn vhd_sector_bitmaps_are_honoured() {
    if !require_qemu_img() {
        return;
    }
    let dir = TestDir::new();
    let img = small_image(&dir, ImageFormat::VhdDynamic, "bitmap.vhd");
    // 8 MiB: 4 BAT entries at 1536, padded to 512 bytes: block 0's bitmap is at 2048.
    let bitmap = 2048;
    let data = bitmap + 512;
    poke(&img, bitmap + 1, &[0x00]); // sectors 8..16 absent
    poke(&img, data + 8 * 512, &[0xEE; 8 * 512]);
    let vol = image::open(ImageFormat::VhdDynamic, &img).unwrap();
    let mut b = vec![0u8; 32 * 512];
    vol.read_at(0, &mut b).unwrap();
    assert!(b[8 * 512..16 * 512].iter().all(|&x| x == 0));
    assert!(b[16 * 512..].iter().any(|&x| x != 0));
    let before = b.clone();
    drop(vol);
    let mut w = image::open_for_update(ImageFormat::VhdDynamic, &img, 8 * MIB).unwrap();
    w.write_at(100 * 512, &[0x55; 512]).unwrap();
    w.finish().unwrap();
    // qemu ignores sector bitmaps: the absent sectors were zeroed in the file.
    let out = dir.join("out.raw");
    run_ok(
        "qemu-img",
        &["convert", "-f", "vpc", "-O", "raw", p(&img), p(&out)],
    );
    let got = std::fs::read(&out).unwrap();
    assert!(got[..32 * 512] == before[..]);
    assert!(got[100 * 512..101 * 512].iter().all(|&x| x == 0x55));
}

/// Many random writes, zeroings, syncs and reopens (so that freed space is reused): qemu-img
/// still finds the images clean and identical to the raw file.
#[test]
fn random_churn_stays_clean() {
    if !require_qemu_img() {
        return;
    }
    let dir = TestDir::new();
    let size = 16 * MIB + 1536;
    for (format, block) in [
        (ImageFormat::Qcow2, Some(4096)),
        (ImageFormat::Qcow2, None),
        (ImageFormat::Vhdx, Some(MIB)),
        (ImageFormat::VhdDynamic, Some(64 * KIB)),
    ] {
        let raw = dir.join("churn.raw");
        let _ = std::fs::remove_file(&raw);
        let img = dir.join(&format!("churn-{format:?}-{block:?}"));
        let opts = CreateOptions { block_size: block };
        let mut pair = Pair {
            raw: new_raw(&raw, size),
            img: image::create(format, &img, size, &opts).unwrap(),
        };
        let mut rng = Rng::new(77);
        // Writes since the last sync: what a crash may lose, replayed after the reopen.
        let mut unsynced: Vec<(u64, Option<Vec<u8>>, u64)> = Vec::new();
        for step in 0..250 {
            let off = rng.below(size);
            let len = (1 + rng.below(MIB + MIB / 2)).min(size - off);
            match rng.below(10) {
                0..=4 => {
                    let d = rng.bytes(len as usize);
                    pair.write(off, &d);
                    unsynced.push((off, Some(d), len));
                }
                5..=7 => {
                    pair.zero(off, len);
                    unsynced.push((off, None, len));
                }
                8 => {
                    pair.img.sync().unwrap();
                    unsynced.clear();
                }
                _ => {
                    let w = std::mem::replace(
                        &mut pair.img,
                        Box::new(NoWriter) as Box<dyn ImageWriter>,
                    );
                    let crashed = step % 2 == 1;
                    if crashed {
                        drop(w); // as if the process had died here
                    } else {
                        w.finish().unwrap();
                    }
                    pair.img = image::open_for_update(format, &img, size).unwrap();
                    if crashed {
                        for (o, d, l) in &unsynced {
                            match d {
                                Some(d) => pair.img.write_at(*o, d).unwrap(),
                                None => pair.img.write_zeroes(*o, *l).unwrap(),
                            }
                        }
                    }
                    unsynced.clear();
                }
            }
        }
        pair.img.finish().unwrap();
        check_clean(format, &img);
        compare(format, &raw, &img);
        read_back(format, &raw, &img);
    }
}

/// A placeholder writer while the real one is being reopened.
struct NoWriter;

impl ImageWriter for NoWriter {
    fn write_at(&mut self, _: u64, _: &[u8]) -> volback::Result<()> {
        unreachable!()
    }
    fn write_zeroes(&mut self, _: u64, _: u64) -> volback::Result<()> {
        unreachable!()
    }
    fn sync(&mut self) -> volback::Result<()> {
        unreachable!()
    }
    fn finish(self: Box<Self>) -> volback::Result<()> {
        Ok(())
    }
}
