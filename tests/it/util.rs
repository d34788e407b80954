//! Helpers shared by the integration tests: running `volback`, temporary directories,
//! deterministic test data, checksums, and RAII guards for loop devices and mounts.

#![allow(dead_code)]

use sha2::Digest;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The binary under test.
pub const VOLBACK: &str = env!("CARGO_BIN_EXE_volback");

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// Running volback and other programs

/// The outcome of one command.
#[derive(Debug)]
pub struct Run {
    /// The command line, for messages.
    pub cmd: String,
    /// Exit code; `None` when killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// stdout parsed as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "`{}` did not print JSON ({e}):\n--- stdout\n{}\n--- stderr\n{}",
                self.cmd, self.stdout, self.stderr
            )
        })
    }

    /// stdout and stderr together, for searching messages.
    pub fn all_output(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }

    fn describe(&self) -> String {
        format!(
            "`{}` exited with {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.cmd, self.code, self.stdout, self.stderr
        )
    }

    /// Asserts that the command exited with `code` and did not panic.
    pub fn expect_code(self, code: i32) -> Run {
        assert_eq!(self.code, Some(code), "{}", self.describe());
        assert!(
            !self.stderr.contains("panicked"),
            "volback panicked: {}",
            self.describe()
        );
        self
    }

    /// Asserts that stderr contains every one of `needles` (case-insensitive).
    pub fn stderr_has(&self, needles: &[&str]) -> &Run {
        let hay = self.stderr.to_lowercase();
        for n in needles {
            assert!(
                hay.contains(&n.to_lowercase()),
                "stderr does not mention {n:?}: {}",
                self.describe()
            );
        }
        self
    }

    /// Asserts that stdout contains every one of `needles` (case-insensitive).
    pub fn stdout_has(&self, needles: &[&str]) -> &Run {
        let hay = self.stdout.to_lowercase();
        for n in needles {
            assert!(
                hay.contains(&n.to_lowercase()),
                "stdout does not mention {n:?}: {}",
                self.describe()
            );
        }
        self
    }
}

/// Runs a program and captures its output.
pub fn run_program(program: &str, args: &[&str]) -> Run {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    Run {
        cmd: format!("{program} {}", args.join(" ")),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs a program and panics (showing its stderr) unless it exits 0.
pub fn run_ok(program: &str, args: &[&str]) -> Run {
    let r = run_program(program, args);
    assert_eq!(r.code, Some(0), "{}", r.describe());
    r
}

/// Runs a program with `input` on its standard input.
pub fn run_stdin(program: &str, args: &[&str], input: &[u8]) -> Run {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    Run {
        cmd: format!("{program} {}", args.join(" ")),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// [`run_stdin`], asserting success.
pub fn run_stdin_ok(program: &str, args: &[&str], input: &[u8]) -> Run {
    let r = run_stdin(program, args, input);
    assert_eq!(
        r.code,
        Some(0),
        "`{}` failed:\n{}\n{}",
        r.cmd,
        r.stdout,
        r.stderr
    );
    r
}

/// Runs `volback ARGS`, whatever its exit code.
pub fn volback(args: &[&str]) -> Run {
    let r = run_program(VOLBACK, args);
    assert!(
        !r.stderr.contains("panicked"),
        "volback panicked: {}",
        r.describe()
    );
    r
}

/// Runs `volback ARGS` and panics (showing its stderr) unless it exits 0.
pub fn volback_ok(args: &[&str]) -> Run {
    volback(args).expect_code(0)
}

/// Runs `volback ARGS` and asserts its exit code.
pub fn volback_code(args: &[&str], code: i32) -> Run {
    volback(args).expect_code(code)
}

/// A path as `&str` for command lines (test paths are always UTF-8).
pub fn p(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}

/// `volback init REPO [EXTRA…]`.
pub fn init_repo(repo: &Path, extra: &[&str]) {
    let mut args = vec!["init", p(repo)];
    args.extend_from_slice(extra);
    volback_ok(&args);
}

/// `volback backup --json SOURCE REPO [EXTRA…]`; returns the JSON report.
pub fn backup_json(source: &Path, repo: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["backup", "--json"];
    args.extend_from_slice(extra);
    args.push(p(source));
    args.push(p(repo));
    volback_ok(&args).json()
}

/// `volback restore REPO SNAPSHOT TARGET`.
pub fn restore(repo: &Path, snapshot: &str, target: &Path) -> Run {
    volback_ok(&["restore", p(repo), snapshot, p(target)])
}

/// A JSON field as u64, with a clear message when absent.
pub fn ju64(v: &serde_json::Value, pointer: &str) -> u64 {
    v.pointer(pointer)
        .and_then(|x| x.as_u64())
        .unwrap_or_else(|| panic!("no integer at {pointer} in {v}"))
}

/// A JSON field as a string, with a clear message when absent.
pub fn jstr<'a>(v: &'a serde_json::Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(|x| x.as_str())
        .unwrap_or_else(|| panic!("no string at {pointer} in {v}"))
}

// ---------------------------------------------------------------------------------------------
// Temporary directories

/// A temporary directory for one test, removed when dropped. Declare it before any
/// [`Loop`] or [`Mount`] guard so that those are released first.
pub struct TestDir {
    dir: tempfile::TempDir,
}

impl TestDir {
    pub fn new() -> TestDir {
        let dir = tempfile::Builder::new()
            .prefix("volback-it-")
            .tempdir()
            .expect("create temporary directory");
        TestDir { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

// ---------------------------------------------------------------------------------------------
// Test data

/// A small deterministic pseudo-random generator (SplitMix64): incompressible output, same
/// bytes for the same seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x005e_ed0f_da7a)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        v
    }

    /// `n` bytes of English-like text (compressible).
    pub fn text(&mut self, n: usize) -> Vec<u8> {
        const WORDS: &[&str] = &[
            "volume",
            "block",
            "snapshot",
            "restore",
            "chunk",
            "the",
            "of",
            "and",
            "backup",
            "repository",
            "sector",
            "ext4",
            "inode",
            "journal",
            "extent",
            "zero",
            "hole",
            "checksum",
            "a",
            "is",
        ];
        let mut out = Vec::with_capacity(n + 16);
        let mut line = 0;
        while out.len() < n {
            let w = WORDS[self.below(WORDS.len() as u64) as usize];
            out.extend_from_slice(w.as_bytes());
            line += w.len() + 1;
            if line > 70 {
                out.push(b'\n');
                line = 0;
            } else {
                out.push(b' ');
            }
        }
        out.truncate(n);
        out
    }
}

/// Writes `data` at `offset` of an existing file (or creates it), without truncating.
pub fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.write_all_at(data, offset)
        .unwrap_or_else(|e| panic!("write {} at {offset}: {e}", path.display()));
}

/// Creates (or truncates) `path` as a sparse file of `size` bytes.
pub fn sparse_file(path: &Path, size: u64) {
    let f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.set_len(size).expect("set_len");
}

/// Creates `path` filled with `size` bytes of incompressible data from `seed`.
pub fn random_file(path: &Path, size: u64, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut f = std::io::BufWriter::with_capacity(
        MIB as usize,
        File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display())),
    );
    let mut buf = vec![0u8; MIB as usize];
    let mut left = size;
    while left > 0 {
        let n = left.min(MIB) as usize;
        rng.fill(&mut buf[..n]);
        f.write_all(&buf[..n]).expect("write random file");
        left -= n as u64;
    }
    f.flush().expect("flush random file");
}

/// Bytes the filesystem has allocated for `path`.
pub fn allocated_bytes(path: &Path) -> u64 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .blocks()
        * 512
}

// ---------------------------------------------------------------------------------------------
// Checksums

/// Lowercase hex SHA-256 of the first `limit` bytes of a file or device (all of it if `None`).
pub fn sha256_prefix(path: &Path, limit: Option<u64>) -> String {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut r: Box<dyn Read> = match limit {
        Some(n) => Box::new(f.take(n)),
        None => Box::new(f),
    };
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; MIB as usize];
    let mut total = 0u64;
    loop {
        let n = r
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        if n == 0 {
            break;
        }
        total += n as u64;
        h.update(&buf[..n]);
    }
    if let Some(n) = limit {
        assert_eq!(total, n, "{} is shorter than {n} bytes", path.display());
    }
    hex::encode(h.finalize())
}

/// Lowercase hex SHA-256 of a file or device.
pub fn sha256_file(path: &Path) -> String {
    sha256_prefix(path, None)
}

pub fn sha256_bytes(data: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(data))
}

pub fn blake3_hex(data: &[u8]) -> String {
    blake3::hash(data).to_hex().to_string()
}

/// SHA-256 of every regular file under `root`, by path relative to `root`. The ext4
/// `lost+found` directory is skipped.
pub fn tree_hashes(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("list {}: {e}", dir.display()))
            .map(|e| e.expect("dir entry").path())
            .collect();
        entries.sort();
        for path in entries {
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if rel == "lost+found" {
                continue;
            }
            let ft = std::fs::symlink_metadata(&path).unwrap().file_type();
            if ft.is_dir() {
                walk(root, &path, out);
            } else if ft.is_file() {
                out.insert(rel, sha256_file(&path));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

// ---------------------------------------------------------------------------------------------
// Repository inspection

/// Chunk files (complete ones: temporary files are skipped) under `REPO/chunks/*/`.
pub fn chunk_files(repo: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(fanout) = std::fs::read_dir(repo.join("chunks")) else {
        return out;
    };
    for d in fanout.flatten() {
        let Ok(entries) = std::fs::read_dir(d.path()) else {
            continue;
        };
        for e in entries.flatten() {
            if !e.file_name().to_string_lossy().starts_with(".tmp") {
                out.push(e.path());
            }
        }
    }
    out
}

/// Where a chunk with id `hex` lives.
pub fn chunk_path(repo: &Path, hex: &str) -> PathBuf {
    repo.join("chunks").join(&hex[..2]).join(hex)
}

/// Snapshot ids in the repository (from `snapshots --json`), oldest first.
pub fn snapshot_ids(repo: &Path) -> Vec<String> {
    let v = volback_ok(&["snapshots", "--json", p(repo)]).json();
    v.as_array()
        .expect("snapshots --json prints an array")
        .iter()
        .map(|s| jstr(s, "/id").to_string())
        .collect()
}

/// Resume journals present in `REPO/journals/`.
pub fn journals(repo: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(repo.join("journals"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "journal"))
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Root, loop devices, mounts

/// Whether `tool` is in PATH (or /sbin, /usr/sbin).
pub fn in_path(tool: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/sbin", "/usr/sbin"].map(PathBuf::from))
        .any(|d| d.join(tool).is_file())
}

/// Why this test cannot use root and loop devices (with the ext4 tools), if it cannot.
fn root_and_loop_missing() -> Option<String> {
    let uid = run_program("id", &["-u"]);
    if uid.stdout.trim() != "0" {
        return Some("not running as root".into());
    }
    if !Path::new("/dev/loop-control").exists() {
        return Some("no /dev/loop-control (loop driver not available)".into());
    }
    tools_missing(&[
        "losetup",
        "mount",
        "umount",
        "mkfs.ext4",
        "e2fsck",
        "dumpe2fs",
    ])
}

/// Which of `tools` are not installed, if any.
fn tools_missing(tools: &[&str]) -> Option<String> {
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !in_path(t)).collect();
    (!missing.is_empty()).then(|| format!("{} not installed", missing.join(", ")))
}

/// The one rule for a test whose capability is missing (`why`): it panics when the `CI`
/// environment variable is set (CI must run every test), otherwise it prints "skipped: …"
/// and returns false so that the test returns early. True when nothing is missing.
fn skip_unless(missing: Option<String>) -> bool {
    let Some(why) = missing else {
        return true;
    };
    if std::env::var_os("CI").is_some() {
        panic!("this test cannot run: {why} (CI is set: not skipping)");
    }
    eprintln!("skipped: {why}");
    false
}

/// True when this test can use root, loop devices and the ext4 tools (see [`skip_unless`]
/// for what happens when it cannot).
pub fn require_root_and_loop() -> bool {
    require_root_loop_and(&[], false)
}

/// [`require_root_and_loop`], and also `tools` (mkfs and fsck of other filesystems…) and,
/// when `fuse` is true, `/dev/fuse`.
pub fn require_root_loop_and(tools: &[&str], fuse: bool) -> bool {
    skip_unless(
        root_and_loop_missing()
            .map(|why| format!("it needs root and loop devices, but {why}"))
            .or_else(|| tools_missing(tools))
            .or_else(|| (fuse && !Path::new("/dev/fuse").exists()).then(|| "no /dev/fuse".into())),
    )
}

/// True when this test can mount FUSE filesystems as root.
pub fn require_root_loop_and_fuse() -> bool {
    require_root_loop_and(&[], true)
}

/// True when every one of `tools` is installed (for tests that need no root).
pub fn require_tools(tools: &[&str]) -> bool {
    skip_unless(tools_missing(tools))
}

/// A loop device attached to a file; detached when dropped.
pub struct Loop {
    pub dev: PathBuf,
}

impl Loop {
    pub fn attach(file: &Path, read_only: bool) -> Loop {
        let mut args = vec!["--find", "--show"];
        if read_only {
            args.push("--read-only");
        }
        args.push(p(file));
        let r = run_ok("losetup", &args);
        let dev = PathBuf::from(r.stdout.trim());
        assert!(
            dev.starts_with("/dev/"),
            "losetup printed {:?}, not a device",
            r.stdout
        );
        Loop { dev }
    }

    pub fn path(&self) -> &Path {
        &self.dev
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        for attempt in 0..50 {
            let r = run_program("losetup", &["-d", p(&self.dev)]);
            if r.code == Some(0) {
                return;
            }
            if attempt == 49 {
                eprintln!(
                    "warning: cannot detach {}: {}",
                    self.dev.display(),
                    r.stderr
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

/// A mounted filesystem; unmounted when dropped (or by [`Mount::unmount`]).
pub struct Mount {
    pub dir: PathBuf,
    mounted: bool,
}

impl Mount {
    /// `mount [-o OPTIONS] DEVICE DIR` (DIR is created).
    pub fn new(device: &Path, dir: &Path, options: Option<&str>) -> Mount {
        std::fs::create_dir_all(dir).expect("create mount point");
        let mut args = Vec::new();
        if let Some(o) = options {
            args.extend(["-o", o]);
        }
        args.extend([p(device), p(dir)]);
        run_ok("mount", &args);
        Mount {
            dir: dir.to_path_buf(),
            mounted: true,
        }
    }

    /// A mount made by a program other than `mount` (a FUSE driver: `ntfs-3g DEV DIR`,
    /// `fusefat -o ro IMAGE DIR`); DIR (the last argument) is created.
    pub fn with_command(program: &str, args: &[&str]) -> Mount {
        let dir = PathBuf::from(args.last().expect("the mount point is the last argument"));
        std::fs::create_dir_all(&dir).expect("create mount point");
        run_ok(program, args);
        Mount { dir, mounted: true }
    }

    /// Unmounts, panicking on failure (the normal way; `Drop` is the fallback).
    pub fn unmount(mut self) {
        self.try_unmount().unwrap_or_else(|e| panic!("{e}"));
    }

    fn try_unmount(&mut self) -> Result<(), String> {
        if !self.mounted {
            return Ok(());
        }
        let mut last = String::new();
        for _ in 0..50 {
            let r = run_program("umount", &[p(&self.dir)]);
            if r.code == Some(0) {
                self.mounted = false;
                return Ok(());
            }
            last = r.stderr;
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        Err(format!("cannot unmount {}: {last}", self.dir.display()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Err(e) = self.try_unmount() {
            eprintln!("warning: {e}");
        }
    }
}

/// True when a line of `/proc/self/mountinfo` mentions `needle`.
pub fn mountinfo_mentions(needle: &str) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.contains(needle))
}

/// Loop devices (`losetup -a` lines) whose backing file path contains `needle`.
pub fn loops_mentioning(needle: &str) -> Vec<String> {
    run_ok("losetup", &["-a"])
        .stdout
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

/// The reference of block `index` in snapshot `snap` (an id or any selector), read with the
/// library.
pub fn block_ref(repo: &Path, snap: &str, index: u64) -> volback::repo::format::BlockRef {
    let r = volback::repo::Repository::open(repo).expect("open repository");
    let id = r.resolve(snap).expect("resolve snapshot");
    let s = r.open_snapshot(&id).expect("open snapshot");
    let per = volback::repo::format::SEGMENT_BLOCKS;
    s.segment((index / per) as usize).expect("read segment")[(index % per) as usize]
}

/// Id (hex) and path of the chunk file holding block `index` of snapshot `snap`, with the
/// hex content hash of the block itself.
pub fn chunk_of_block(repo: &Path, snap: &str, index: u64) -> (String, PathBuf, String) {
    let r = block_ref(repo, snap, index);
    let chunk = r.chunk().expect("a stored block").to_hex();
    let content = r.content_hash().expect("a stored block").to_hex();
    let path = chunk_path(repo, &chunk);
    assert!(
        path.is_file(),
        "chunk of block {index} at {}",
        path.display()
    );
    (chunk, path, content)
}

/// The content of a chunk file, decoded by hand from its documented layout (FORMAT.md §3).
pub fn decode_chunk(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).expect("read chunk file");
    assert_eq!(&bytes[..4], b"VBCK", "chunk magic");
    let payload = &bytes[16..];
    match bytes[5] {
        0 => payload.to_vec(),
        1 => zstd::decode_all(payload).expect("zstd payload"),
        c => panic!("unknown codec {c}"),
    }
}

/// Blocks covered by the complete batches of the repository's one resume journal (0 when
/// there is none), read from its documented layout (FORMAT.md §5).
pub fn journal_blocks(repo: &Path) -> u64 {
    let Some(path) = journals(repo).into_iter().next() else {
        return 0;
    };
    let Ok(b) = std::fs::read(path) else {
        return 0;
    };
    let u32_at = |o: usize| {
        b.get(o..o + 4)
            .map(|x| u32::from_le_bytes(x.try_into().unwrap()))
    };
    let u64_at = |o: usize| {
        b.get(o..o + 8)
            .map(|x| u64::from_le_bytes(x.try_into().unwrap()))
    };
    let Some(hlen) = u32_at(12) else { return 0 };
    let mut pos = 16 + hlen as usize + 32;
    let mut blocks = 0;
    while let Some(plen) = u32_at(pos) {
        let end = pos + 4 + plen as usize + 32;
        if end > b.len() {
            break;
        }
        blocks += u64_at(pos + 4 + 8).unwrap_or(0);
        pos = end;
    }
    blocks
}

/// Flips a byte in the middle of the chunk that stores a block with content `block` (in a
/// repository without packs), so that reading that block fails its hash check.
pub fn damage_chunk_of(repo: &Path, block: &[u8]) {
    let chunk = chunk_path(repo, &blake3_hex(block));
    let mut bytes = std::fs::read(&chunk).expect("the block's chunk exists");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&chunk, bytes).unwrap();
}
