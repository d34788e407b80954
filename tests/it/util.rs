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

/// Runs a prepared command (stdin from /dev/null unless the command set it) and captures its
/// output; `cmd` describes it in messages.
pub fn run_command(mut command: Command, cmd: &str) -> Run {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    Run {
        cmd: cmd.to_string(),
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

/// Runs `volback ARGS`, whatever its exit code. The command line and environment are those
/// of [`volback_command`]: an encrypted repository among the arguments gets
/// [`TEST_PASSWORD`], `init` makes an encrypted repository with cheap Argon2id parameters
/// unless `--no-encryption` is given.
pub fn volback(args: &[&str]) -> Run {
    let r = run_command(
        volback_command(args),
        &format!("{VOLBACK} {}", args.join(" ")),
    );
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

// ---------------------------------------------------------------------------------------------
// Passwords (docs/SECURITY.md)

/// The password of every encrypted repository the tests make through [`volback`].
pub const TEST_PASSWORD: &str = "volback test password";

/// Cheap Argon2id parameters (1 MiB, 1 pass) for `init`, `key add` and `key passwd` in tests.
pub const CHEAP_KDF: [&str; 4] = ["--kdf-memory", "1", "--kdf-iterations", "1"];

/// Environment variables that give volback a password; cleared for every command the tests
/// run, so that the environment of whoever runs `cargo test` does not leak in.
pub const PASSWORD_VARS: [&str; 3] = [
    "VOLBACK_PASSWORD",
    "VOLBACK_PASSWORD_FILE",
    "VOLBACK_NEW_PASSWORD",
];

/// True when `dir` holds an encrypted repository (`config` of version 3 or with an
/// `encryption` object).
pub fn is_encrypted_repo(dir: &Path) -> bool {
    // Only a regular file is read: a test may have put a FIFO there.
    let config = dir.join("config");
    if !std::fs::symlink_metadata(&config).is_ok_and(|m| m.is_file()) {
        return false;
    }
    let Ok(bytes) = std::fs::read(&config) else {
        return false;
    };
    let Ok(c) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return false;
    };
    c.get("encryption").is_some_and(|e| !e.is_null()) || c["version"].as_u64() >= Some(3)
}

/// The subcommand of a volback command line (`key add` counts as `key`), and the one after
/// it.
fn subcommand<'a>(args: &[&'a str]) -> (Option<&'a str>, Option<&'a str>) {
    let mut words = args.iter().copied().filter(|a| !a.starts_with('-'));
    (words.next(), words.next())
}

/// The arguments [`volback_command`] runs: `init`, `key add` and `key passwd` get
/// [`CHEAP_KDF`] unless they choose `--kdf-*` themselves (or, for `init`, give
/// `--no-encryption`).
pub fn volback_args(args: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let chooses = args
        .iter()
        .any(|a| a.starts_with("--kdf-") || *a == "--no-encryption" || *a == "--help");
    let sets_a_key = matches!(
        subcommand(args),
        (Some("init"), _) | (Some("key"), Some("add" | "passwd"))
    );
    if sets_a_key && !chooses {
        out.extend(CHEAP_KDF.iter().map(|a| a.to_string()));
    }
    out
}

/// The password environment [`volback_command`] gives `volback ARGS`: [`TEST_PASSWORD`] in
/// `VOLBACK_PASSWORD` for `init` without `--no-encryption`, and for any command naming an
/// encrypted repository, unless the command line gives a password itself. A plain
/// repository gets none: volback refuses a password given for a plain repository.
pub fn password_env(args: &[&str]) -> Vec<(&'static str, &'static str)> {
    let own = args.iter().any(|a| {
        *a == "--no-encryption"
            || a.starts_with("--password-file")
            || a.starts_with("--password-command")
    });
    if own {
        return Vec::new();
    }
    let needs = subcommand(args).0 == Some("init")
        // Repositories on object storage in the tests are encrypted (init's default).
        || args.iter().any(|a| a.starts_with("s3:"))
        || args.iter().any(|a| {
            let path = Path::new(a);
            path.is_absolute() && path.is_dir() && is_encrypted_repo(path)
        });
    if needs {
        vec![("VOLBACK_PASSWORD", TEST_PASSWORD)]
    } else {
        Vec::new()
    }
}

/// `volback ARGS` as a [`Command`], with the arguments of [`volback_args`], the password
/// environment of [`password_env`] (any other password variable removed) and stdin from
/// /dev/null. For tests that spawn volback themselves; add `.envs(password_env(args))` to a
/// `Command::new(VOLBACK)` for the same effect.
pub fn volback_command(args: &[&str]) -> Command {
    let mut c = Command::new(VOLBACK);
    c.args(volback_args(args));
    for v in PASSWORD_VARS {
        c.env_remove(v);
    }
    c.envs(password_env(args));
    c.stdin(Stdio::null());
    c
}

/// `volback ARGS` exactly as given (no password, no KDF options added), with the password
/// variables cleared and then `env` set, stdin from /dev/null, killed (and the test failed)
/// if it runs longer than `limit_secs`: for the tests of passwords, where a hang is the bug.
pub fn volback_raw(args: &[&str], env: &[(&str, &str)], limit_secs: u64) -> Run {
    let mut c = Command::new(VOLBACK);
    c.args(args);
    for v in PASSWORD_VARS {
        c.env_remove(v);
    }
    c.envs(env.iter().copied());
    c.stdin(Stdio::null());
    let cmd = format!("{env:?} volback {}", args.join(" "));
    let r = run_with_limit(c, &cmd, limit_secs, false);
    assert!(!r.stderr.contains("panicked"), "volback panicked: {r:?}");
    r
}

/// Runs `command` with stdout and stderr captured; when `open_stdin`, its stdin is a pipe
/// that stays open (nothing is written) until it exits. Kills it and fails the test when it
/// is still running after `limit_secs` (a safety net against hangs, not a speed check).
pub fn run_with_limit(mut command: Command, cmd: &str, limit_secs: u64, open_stdin: bool) -> Run {
    if open_stdin {
        command.stdin(Stdio::piped());
    }
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    let stdin = child.stdin.take();
    let mut out_pipe = child.stdout.take().expect("stdout pipe");
    let mut err_pipe = child.stderr.take().expect("stderr pipe");
    let out_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out_pipe.read_to_end(&mut v);
        v
    });
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err_pipe.read_to_end(&mut v);
        v
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(limit_secs);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the child") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`{cmd}` was still running after {limit_secs} s: it hangs (killed)");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    drop(stdin);
    let stdout = out_reader.join().expect("stdout reader");
    let stderr = err_reader.join().expect("stderr reader");
    Run {
        cmd: cmd.to_string(),
        code: status.code(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
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

/// True when nothing is `missing` for this test; otherwise it skips, or fails when `CI` is
/// set (see [`skip_unless`]).
pub fn require(missing: Option<String>) -> bool {
    skip_unless(missing)
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

/// Blocks covered by the complete batches of the repository's one resume journal (0 when
/// there is none), read from its documented layout (FORMAT.md §5).
///
/// In an encrypted repository (FORMAT.md §F3.8) the header and every batch are sealed records,
/// each after its u32 length; batch `n` is named `<volume key>/<n>`; the first that does not
/// open ends the journal.
pub fn journal_blocks(repo: &Path) -> u64 {
    let Some(path) = journals(repo).into_iter().next() else {
        return 0;
    };
    let Ok(b) = std::fs::read(&path) else {
        return 0;
    };
    if let Some(k) = repo_keys(repo) {
        let key = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let len_at = |o: usize| {
            b.get(o..o + 4)
                .map(|x| u32::from_le_bytes(x.try_into().unwrap()) as usize)
        };
        let Some(hlen) = len_at(12) else { return 0 };
        let mut pos = 16 + hlen;
        let mut blocks = 0;
        let mut n = 0u64;
        while let Some(m) = len_at(pos) {
            let Some(rec) = b.get(pos + 4..pos + 4 + m) else {
                break;
            };
            let Some(batch) = k.open(kind::JOURNAL_RECORD, &format!("{key}/{n}"), rec) else {
                break;
            };
            blocks += u64_le(&batch, 8);
            n += 1;
            pos += 4 + m;
        }
        return blocks;
    }
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

// ---------------------------------------------------------------------------------------------
// Format-2 repositories, read by hand from their documented layout (docs/FORMAT.md §F2), not
// through the library: a reader change cannot hide a writer change, and the tests do not
// depend on the library's internal API.

// ---------------------------------------------------------------------------------------------
// Format-3 (encrypted) repositories, decrypted by hand from their documented layout
// (docs/FORMAT.md §F3, docs/SECURITY.md), not through the library: the master key is unwrapped
// from a key slot with Argon2id and AES-256-GCM, the keys are derived from it with BLAKE3, and
// each sealed record is opened with its own key. The readers below use it whenever the
// repository is encrypted, so the same hand-written checks cover both kinds.

/// The keys of an encrypted repository, unwrapped by hand.
pub struct HandKeys {
    data: [u8; 32],
    id: [u8; 32],
    pub chunker_seed: u64,
    pub repo_id: String,
    /// The slot that opened.
    pub slot: String,
}

/// Kinds of sealed records, as bound into the associated data.
pub mod kind {
    pub const FRAME: &str = "frame";
    pub const PACK_TABLE: &str = "pack-table";
    pub const INDEX: &str = "index";
    pub const SNAPSHOT: &str = "snapshot";
    pub const JOURNAL_HEADER: &str = "journal-header";
    pub const JOURNAL_RECORD: &str = "journal-record";
    pub const PENDING: &str = "pending";
    pub const WRITER: &str = "writer";
    pub const CONFIG: &str = "config";
}

/// Opens `ct | tag` (AES-256-GCM) under `key` and `nonce` with associated data `aad`.
fn aes_gcm_open(key: &[u8; 32], nonce: &[u8; 12], aad: &[u8], ct_tag: &[u8]) -> Option<Vec<u8>> {
    use aes_gcm::aead::AeadInOut;
    use aes_gcm::{Aes256Gcm, KeyInit};
    if ct_tag.len() < 16 {
        return None;
    }
    let (ct, tag) = ct_tag.split_at(ct_tag.len() - 16);
    let tag: [u8; 16] = tag.try_into().ok()?;
    let mut out = ct.to_vec();
    Aes256Gcm::new(&(*key).into())
        .decrypt_inout_detached(
            &(*nonce).into(),
            aad,
            out.as_mut_slice().into(),
            &tag.into(),
        )
        .ok()?;
    Some(out)
}

/// Key slot ids (file names) under `REPO/keys/`, temporary files skipped.
pub fn key_slots(repo: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(repo.join("keys"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

impl HandKeys {
    /// Unwraps the master key of `repo` with `password` from the first slot it opens.
    pub fn load(repo: &Path, password: &str) -> Result<HandKeys, String> {
        let config = repo_config(repo);
        let repo_id = config["id"].as_str().ok_or("config has no id")?.to_string();
        let mut why = Vec::new();
        for slot_id in key_slots(repo) {
            let path = repo.join("keys").join(&slot_id);
            let slot: serde_json::Value = match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            {
                Ok(v) => v,
                Err(e) => {
                    why.push(format!("{slot_id}: {e}"));
                    continue;
                }
            };
            match Self::unwrap_slot(&slot, password, &repo_id, &slot_id) {
                Some(master) => {
                    let mut keys = Self::derive(&master, &repo_id);
                    keys.slot = slot_id;
                    return Ok(keys);
                }
                None => why.push(format!("{slot_id}: does not open")),
            }
        }
        Err(format!(
            "no key slot of {} opens with the password: {why:?}",
            repo.display()
        ))
    }

    fn unwrap_slot(
        slot: &serde_json::Value,
        password: &str,
        repo_id: &str,
        slot_id: &str,
    ) -> Option<[u8; 32]> {
        if slot["kdf"] != "argon2id" || slot["aead"] != "aes-256-gcm" {
            return None;
        }
        let n = |k: &str| slot[k].as_u64().and_then(|v| u32::try_from(v).ok());
        let (m, t, par) = (n("memory_kib")?, n("iterations")?, n("parallelism")?);
        // The test's own bound: test repositories use cheap parameters.
        if m > 256 * 1024 || t > 16 || par > 16 {
            return None;
        }
        let salt = hex::decode(slot["salt"].as_str()?).ok()?;
        let wrapped = hex::decode(slot["wrapped"].as_str()?).ok()?;
        if wrapped.len() != 12 + 32 + 16 {
            return None;
        }
        let params = argon2::Params::new(m, t, par, Some(32)).ok()?;
        let mut kek = [0u8; 32];
        argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
            .hash_password_into(password.as_bytes(), &salt, &mut kek)
            .ok()?;
        let mut aad = b"volback-v3\0keyslot\0".to_vec();
        aad.extend_from_slice(repo_id.as_bytes());
        aad.push(0);
        aad.extend_from_slice(slot_id.as_bytes());
        let nonce: [u8; 12] = wrapped[..12].try_into().ok()?;
        let master = aes_gcm_open(&kek, &nonce, &aad, &wrapped[12..])?;
        master.try_into().ok()
    }

    /// The keys derived from a master key (BLAKE3 key derivation, docs/FORMAT.md §F3).
    pub fn derive(master: &[u8; 32], repo_id: &str) -> HandKeys {
        let seed = blake3::derive_key("volback 2026-12 chunker seed", master);
        HandKeys {
            data: blake3::derive_key("volback 2026-12 data key", master),
            id: blake3::derive_key("volback 2026-12 blob id key", master),
            chunker_seed: u64::from_le_bytes(seed[..8].try_into().unwrap()),
            repo_id: repo_id.to_string(),
            slot: String::new(),
        }
    }

    /// Opens a sealed record (`salt[24] | ciphertext | tag[16]`) of `kind` named `name`;
    /// None when it does not authenticate.
    pub fn open(&self, kind: &str, name: &str, record: &[u8]) -> Option<Vec<u8>> {
        if record.len() < 24 + 16 {
            return None;
        }
        let (salt, rest) = record.split_at(24);
        let key = blake3::keyed_hash(&self.data, salt);
        let mut aad = b"volback-v3\0".to_vec();
        aad.extend_from_slice(kind.as_bytes());
        aad.push(0);
        aad.extend_from_slice(self.repo_id.as_bytes());
        aad.push(0);
        aad.extend_from_slice(name.as_bytes());
        aes_gcm_open(key.as_bytes(), &[0; 12], &aad, rest)
    }

    /// [`HandKeys::open`], panicking with `what` when the record does not authenticate.
    pub fn open_or_panic(&self, kind: &str, name: &str, record: &[u8], what: &str) -> Vec<u8> {
        self.open(kind, name, record)
            .unwrap_or_else(|| panic!("{what} does not open as a sealed {kind} record"))
    }

    /// The id of a blob with this content: BLAKE3 keyed with the blob-id key, hex.
    pub fn blob_id(&self, content: &[u8]) -> String {
        blake3::keyed_hash(&self.id, content).to_hex().to_string()
    }
}

thread_local! {
    static HAND_KEYS: std::cell::RefCell<BTreeMap<(PathBuf, String), std::rc::Rc<HandKeys>>> =
        const { std::cell::RefCell::new(BTreeMap::new()) };
}

/// The keys of `repo` unwrapped with [`TEST_PASSWORD`], or None when it is not encrypted
/// (cached per repository and slot list).
pub fn repo_keys(repo: &Path) -> Option<std::rc::Rc<HandKeys>> {
    if !is_encrypted_repo(repo) {
        return None;
    }
    repo_keys_with(repo, TEST_PASSWORD)
}

/// The keys of `repo` unwrapped with `password` (cached), None when it is not encrypted.
pub fn repo_keys_with(repo: &Path, password: &str) -> Option<std::rc::Rc<HandKeys>> {
    if !is_encrypted_repo(repo) {
        return None;
    }
    let id = repo_config(repo)["id"].as_str().unwrap_or("").to_string();
    let key = (repo.to_path_buf(), format!("{id}\0{password}"));
    if let Some(k) = HAND_KEYS.with(|c| c.borrow().get(&key).cloned()) {
        return Some(k);
    }
    let k = std::rc::Rc::new(
        HandKeys::load(repo, password).unwrap_or_else(|e| panic!("hand-written reader: {e}")),
    );
    HAND_KEYS.with(|c| c.borrow_mut().insert(key, k.clone()));
    Some(k)
}

/// The repository a pack file belongs to (`REPO/packs/XX/<id>`).
fn repo_of_pack(pack: &Path) -> PathBuf {
    pack.parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .unwrap_or_else(|| panic!("{} is not under REPO/packs/XX/", pack.display()))
        .to_path_buf()
}

/// Panics with a clear message when a test that writes plain objects by hand meets an
/// encrypted repository.
fn require_plain(repo: &Path, what: &str) {
    assert!(
        !is_encrypted_repo(repo),
        "{what} works on plain repositories only: init {} with --no-encryption",
        repo.display()
    );
}

/// The repository's `config`, parsed.
pub fn repo_config(repo: &Path) -> serde_json::Value {
    let bytes = std::fs::read(repo.join("config")).expect("read config");
    serde_json::from_slice(&bytes).expect("config is JSON")
}

/// The repository's default block size (config `block_size`).
pub fn repo_block_size(repo: &Path) -> u64 {
    ju64(&repo_config(repo), "/block_size")
}

/// Hex chunk hash of `data` as the repository names blobs (config `chunk_hash`).
pub fn repo_hash(repo: &Path, data: &[u8]) -> String {
    if let Some(k) = repo_keys(repo) {
        return k.blob_id(data);
    }
    match repo_config(repo)["chunk_hash"].as_str() {
        Some("sha256") => sha256_bytes(data),
        _ => blake3_hex(data),
    }
}

/// Where the pack with id `hex` lives: `packs/XX/<id>`.
pub fn pack_path(repo: &Path, hex: &str) -> PathBuf {
    repo.join("packs").join(&hex[..2]).join(hex)
}

/// Every file under `REPO/packs/*/` (temporary `.tmp-*` files skipped).
fn pack_dir_files(repo: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(fanout) = std::fs::read_dir(repo.join("packs")) else {
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
    out.sort();
    out
}

/// Pack files (complete ones, named by 64 hex digits) under `REPO/packs/*/`.
pub fn pack_files(repo: &Path) -> Vec<PathBuf> {
    pack_dir_files(repo)
        .into_iter()
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit())
        })
        .collect()
}

/// Packs that `verify --read-data` set aside: `packs/XX/<id>.bad` (or `.bad.N`).
pub fn bad_packs(repo: &Path) -> Vec<PathBuf> {
    pack_dir_files(repo)
        .into_iter()
        .filter(|p| p.file_name().unwrap().to_string_lossy().contains(".bad"))
        .collect()
}

/// Total size of the pack files.
pub fn pack_bytes(repo: &Path) -> u64 {
    pack_files(repo)
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum()
}

/// The pack file (by id) of a path under `packs/`.
pub fn pack_id(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy()[..64].to_string()
}

/// The largest pack file.
pub fn largest_pack(repo: &Path) -> PathBuf {
    pack_files(repo)
        .into_iter()
        .max_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .expect("the repository has packs")
}

/// Index files under `REPO/index/` (temporary files skipped).
pub fn index_files(repo: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(repo.join("index"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with(".tmp"))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// One 52-byte blob-table entry (FORMAT.md §F2.2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobEntry {
    /// Blob id, hex.
    pub id: String,
    /// 0 data, 1 tree.
    pub kind: u8,
    pub frame_offset: u64,
    pub frame_len: u64,
    /// Offset of the blob in the frame's raw content.
    pub offset: u64,
    pub len: u64,
}

fn u32_le(b: &[u8], at: usize) -> u64 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as u64
}

fn u64_le(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn parse_entry(e: &[u8]) -> BlobEntry {
    BlobEntry {
        id: hex::encode(&e[..32]),
        kind: e[32],
        frame_offset: u32_le(e, 36),
        frame_len: u32_le(e, 40),
        offset: u32_le(e, 44),
        len: u32_le(e, 48),
    }
}

/// The blob table of a pack file, from its trailer (checked: magic, lengths, table hash; in
/// an encrypted repository the table is a sealed record, opened by hand).
pub fn read_pack_table(path: &Path) -> Vec<BlobEntry> {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    assert_eq!(&b[..8], b"VBPACK\r\n", "pack magic of {}", path.display());
    if let Some(k) = repo_keys(&repo_of_pack(path)) {
        assert!(b.len() >= 16 + 56, "{} is too short", path.display());
        let t = &b[b.len() - 56..];
        assert_eq!(
            &t[48..],
            b"VBPKEND\n",
            "trailer magic of {}",
            path.display()
        );
        let table = u64_le(t, 0) as usize;
        let n = u32_le(t, 8) as usize;
        assert_eq!(
            table + 52 * n + 40 + 56,
            b.len(),
            "sealed pack length of {}",
            path.display()
        );
        let stored = &b[table..b.len() - 56];
        assert_eq!(
            blake3::hash(stored).as_bytes(),
            &t[16..48],
            "hash of the sealed table"
        );
        let what = format!("blob table of {}", path.display());
        let bytes = k.open_or_panic(kind::PACK_TABLE, "", stored, &what);
        assert_eq!(bytes.len(), 52 * n, "{what}: length");
        return bytes.chunks_exact(52).map(parse_entry).collect();
    }
    assert!(b.len() >= 16 + 56, "{} is too short", path.display());
    let t = &b[b.len() - 56..];
    assert_eq!(
        &t[48..],
        b"VBPKEND\n",
        "pack trailer magic of {}",
        path.display()
    );
    let table = u64_le(t, 0) as usize;
    let n = u32_le(t, 8) as usize;
    assert_eq!(
        table + 52 * n + 56,
        b.len(),
        "pack length of {}",
        path.display()
    );
    let bytes = &b[table..table + 52 * n];
    assert_eq!(
        blake3::hash(bytes).as_bytes(),
        &t[16..48],
        "pack table hash"
    );
    bytes.chunks_exact(52).map(parse_entry).collect()
}

/// The union of the repository's index files (FORMAT.md §F2.3).
#[derive(Debug, Default)]
pub struct Index {
    /// Pack id → its entries, as indexed.
    pub packs: BTreeMap<String, Vec<BlobEntry>>,
    /// Blob id → every (pack id, entry) that holds it.
    pub blobs: BTreeMap<String, Vec<(String, BlobEntry)>>,
}

impl Index {
    /// The locations of blob `id` (panics when it is not indexed).
    pub fn locations(&self, id: &str) -> &[(String, BlobEntry)] {
        self.blobs
            .get(id)
            .unwrap_or_else(|| panic!("blob {id} is in no index file"))
    }
}

/// Reads every index file by hand (checksum = name checked).
pub fn read_index(repo: &Path) -> Index {
    let mut idx = Index::default();
    let keys = repo_keys(repo);
    for path in index_files(repo) {
        let mut b = std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let body_len = if let Some(k) = &keys {
            // Named by the BLAKE3 of the stored (sealed) bytes; the plaintext is the layout
            // of §F2.3, with or without its own trailing checksum.
            assert_eq!(blake3_hex(&b), name, "sealed index file name");
            b = k.open_or_panic(kind::INDEX, "", &b, &format!("index file {name}"));
            assert_eq!(&b[..8], b"VBINDEX\n", "index magic of {}", path.display());
            let tail = b.len() - 32;
            if blake3::hash(&b[..tail]).as_bytes() == &b[tail..] {
                tail
            } else {
                b.len()
            }
        } else {
            assert_eq!(&b[..8], b"VBINDEX\n", "index magic of {}", path.display());
            let (body, sum) = b.split_at(b.len() - 32);
            assert_eq!(
                blake3::hash(body).as_bytes(),
                sum,
                "checksum of {}",
                path.display()
            );
            assert_eq!(hex::encode(sum), name, "index file name");
            body.len()
        };
        let body = &b[..body_len];
        let packs = u32_le(&b, 12);
        let mut pos = 16;
        for _ in 0..packs {
            let pack = hex::encode(&b[pos..pos + 32]);
            let m = u32_le(&b, pos + 32) as usize;
            pos += 36;
            let entries: Vec<BlobEntry> = b[pos..pos + 52 * m]
                .chunks_exact(52)
                .map(parse_entry)
                .collect();
            pos += 52 * m;
            for e in &entries {
                idx.blobs
                    .entry(e.id.clone())
                    .or_default()
                    .push((pack.clone(), e.clone()));
            }
            idx.packs.entry(pack).or_default().extend(entries);
        }
        assert_eq!(pos, body.len(), "index file length of {}", path.display());
    }
    idx
}

/// The raw (decompressed) content of the frame an entry points to (FORMAT.md §3 header).
pub fn read_frame(pack: &Path, e: &BlobEntry) -> Vec<u8> {
    let f = File::open(pack).unwrap_or_else(|err| panic!("open {}: {err}", pack.display()));
    let mut frame = vec![0u8; e.frame_len as usize];
    f.read_exact_at(&mut frame, e.frame_offset)
        .unwrap_or_else(|err| panic!("read frame of {}: {err}", pack.display()));
    if let Some(k) = repo_keys(&repo_of_pack(pack)) {
        let what = format!("frame at {} of {}", e.frame_offset, pack.display());
        frame = k.open_or_panic(kind::FRAME, "", &frame, &what);
    }
    assert_eq!(&frame[..4], b"VBCK", "frame magic");
    let raw_len = u32_le(&frame, 8) as usize;
    let stored = u32_le(&frame, 12) as usize;
    assert_eq!(16 + stored, frame.len(), "frame length");
    let raw = match frame[5] {
        0 => frame[16..].to_vec(),
        1 => zstd::decode_all(&frame[16..]).expect("zstd frame"),
        c => panic!("unknown codec {c}"),
    };
    assert_eq!(raw.len(), raw_len, "frame raw length");
    raw
}

/// The content of blob `id`, read from its first indexed location and checked against its id.
pub fn read_blob(repo: &Path, idx: &Index, id: &str) -> Vec<u8> {
    let (pack, e) = &idx.locations(id)[0];
    let raw = read_frame(&pack_path(repo, pack), e);
    let blob = raw[e.offset as usize..(e.offset + e.len) as usize].to_vec();
    assert_eq!(repo_hash(repo, &blob), id, "blob content hashes to its id");
    blob
}

/// The full id of the snapshot a selector names: `latest`, or an id prefix.
pub fn resolve_snapshot(repo: &Path, sel: &str) -> String {
    let ids = snapshot_ids(repo);
    if sel == "latest" {
        return ids.last().expect("a snapshot").clone();
    }
    let found: Vec<&String> = ids.iter().filter(|i| i.starts_with(sel)).collect();
    assert_eq!(found.len(), 1, "selector {sel} in {ids:?}");
    found[0].clone()
}

/// The header JSON of a snapshot file (FORMAT.md §4: trailer → header).
pub fn snapshot_header(repo: &Path, id: &str) -> serde_json::Value {
    let b = snapshot_plaintext(repo, id);
    let t = &b[b.len() - 64..];
    let off = u64_le(t, 0) as usize;
    let len = u32_le(t, 8) as usize;
    serde_json::from_slice(&b[off..off + len]).expect("snapshot header JSON")
}

/// The bytes of snapshot file `id`, opened by hand when the repository is encrypted.
pub fn snapshot_plaintext(repo: &Path, id: &str) -> Vec<u8> {
    let b = std::fs::read(repo.join("snapshots").join(id)).expect("read snapshot file");
    match repo_keys(repo) {
        Some(k) => k.open_or_panic(kind::SNAPSHOT, "", &b, &format!("snapshot {id}")),
        None => b,
    }
}

/// What a block of a format-2 snapshot is (a leaf record of FORMAT.md §F2.5, per block).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Blk {
    Zero,
    Unused,
    /// Piece `piece` of data blob `blob` (hex).
    Part {
        blob: String,
        piece: u64,
    },
}

impl Blk {
    /// The data blob, if any.
    pub fn blob(&self) -> Option<&str> {
        match self {
            Blk::Part { blob, .. } => Some(blob),
            _ => None,
        }
    }
}

/// A snapshot's block map read by hand: runs (first block, count, what the first block is;
/// PART runs cover consecutive pieces), and every tree blob id met.
pub struct BlockMap {
    pub block_size: u64,
    pub block_count: u64,
    pub runs: Vec<(u64, u64, Blk)>,
    pub tree_blobs: Vec<String>,
}

impl BlockMap {
    /// What block `i` is.
    pub fn block(&self, i: u64) -> Blk {
        let k = self.runs.partition_point(|r| r.0 <= i) - 1;
        let (first, n, r) = &self.runs[k];
        assert!(i < first + n, "block {i} past the map");
        match r {
            Blk::Part { blob, piece } => Blk::Part {
                blob: blob.clone(),
                piece: piece + (i - first),
            },
            other => other.clone(),
        }
    }

    /// Every data blob the snapshot names.
    pub fn data_blobs(&self) -> std::collections::BTreeSet<String> {
        self.runs
            .iter()
            .filter_map(|r| r.2.blob().map(str::to_string))
            .collect()
    }
}

/// Walks the tree of snapshot `snap` (a selector) by hand.
pub fn block_map(repo: &Path, snap: &str) -> BlockMap {
    let id = resolve_snapshot(repo, snap);
    let h = snapshot_header(repo, &id);
    let root = jstr(&h, "/tree/root").to_string();
    let idx = read_index(repo);
    let mut map = BlockMap {
        block_size: ju64(&h, "/block_size"),
        block_count: ju64(&h, "/block_count"),
        runs: Vec::new(),
        tree_blobs: Vec::new(),
    };
    let mut next = 0u64;
    walk_node(repo, &idx, &root, &mut map, &mut next);
    assert_eq!(next, map.block_count, "the tree covers every block");
    map
}

fn walk_node(repo: &Path, idx: &Index, id: &str, map: &mut BlockMap, next: &mut u64) {
    map.tree_blobs.push(id.to_string());
    let b = read_blob(repo, idx, id);
    assert_eq!(&b[..4], b"VBTN", "tree node magic");
    let level = b[5];
    let covers = u64_le(&b, 8);
    let start = *next;
    let mut pos = 16;
    if level == 0 {
        while pos < b.len() {
            let tag = b[pos];
            let n = u32_le(&b, pos + 1);
            pos += 5;
            let r = match tag {
                0 => Blk::Zero,
                1 => Blk::Unused,
                4 => {
                    let blob = hex::encode(&b[pos..pos + 32]);
                    let piece = u32_le(&b, pos + 32);
                    pos += 36;
                    Blk::Part { blob, piece }
                }
                t => panic!("unknown leaf record tag {t}"),
            };
            map.runs.push((*next, n, r));
            *next += n;
        }
    } else {
        let c = u32_le(&b, 16) as usize;
        for k in 0..c {
            let child = hex::encode(&b[20 + 32 * k..52 + 32 * k]);
            walk_node(repo, idx, &child, map, next);
        }
    }
    assert_eq!(*next - start, covers, "node {id} covers what it says");
}

/// Where block `i` of snapshot `snap` is stored.
#[derive(Clone, Debug)]
pub struct BlockLoc {
    pub blob: String,
    pub piece: u64,
    /// Pack id (hex) and path of the blob's first indexed location.
    pub pack: String,
    pub pack_path: PathBuf,
    pub entry: BlobEntry,
}

/// Where data block `i` of snapshot `snap` is stored (panics if it is not a data block).
pub fn locate_block(repo: &Path, snap: &str, i: u64) -> BlockLoc {
    let map = block_map(repo, snap);
    let Blk::Part { blob, piece } = map.block(i) else {
        panic!(
            "block {i} of {snap} is not a data block: {:?}",
            map.block(i)
        );
    };
    let idx = read_index(repo);
    let (pack, entry) = idx.locations(&blob)[0].clone();
    BlockLoc {
        pack_path: pack_path(repo, &pack),
        blob,
        piece,
        pack,
        entry,
    }
}

/// Packs holding the data blobs of snapshot `snap` (first indexed location of each).
pub fn data_packs_of(repo: &Path, snap: &str) -> std::collections::BTreeSet<String> {
    let idx = read_index(repo);
    block_map(repo, snap)
        .data_blobs()
        .iter()
        .map(|b| idx.locations(b)[0].0.clone())
        .collect()
}

/// Flips one byte inside the frame that holds blob entry `e` of `pack`: inside the blob's
/// own bytes when the frame is stored raw (only that blob then fails its hash check), else
/// in the middle of the compressed payload (the whole frame fails to decode). The pack's
/// length and table stay valid: only reading the data finds the damage. Returns true when
/// only that blob is damaged.
///
/// In an encrypted repository the frame is one sealed record: the byte flipped is in its
/// middle, every blob of the frame fails, and the result is false.
pub fn corrupt_frame(pack: &Path, e: &BlobEntry) -> bool {
    let mut b = std::fs::read(pack).unwrap_or_else(|err| panic!("read {}: {err}", pack.display()));
    let f = e.frame_offset as usize;
    if is_encrypted_repo(&repo_of_pack(pack)) {
        b[f + e.frame_len as usize / 2] ^= 0x55;
        std::fs::write(pack, b).unwrap();
        return false;
    }
    let raw = b[f + 5] == 0;
    let at = if raw {
        f + 16 + (e.offset + e.len / 2) as usize
    } else {
        f + 16 + (e.frame_len as usize - 16) / 2
    };
    b[at] ^= 0x55;
    std::fs::write(pack, b).unwrap();
    raw
}

/// Flips a byte in the middle of a frame payload of the pack at `path` (the frame holding
/// its first data blob): the pack's table and length stay valid.
pub fn corrupt_pack(path: &Path) {
    let table = read_pack_table(path);
    let e = table
        .iter()
        .find(|e| e.kind == 0)
        .or(table.first())
        .expect("a pack holds blobs")
        .clone();
    corrupt_frame(path, &e);
}

/// Damages block `i` of snapshot `snap` (see [`corrupt_frame`]); returns where it was.
pub fn corrupt_block(repo: &Path, snap: &str, i: u64) -> BlockLoc {
    let loc = locate_block(repo, snap, i);
    corrupt_frame(&loc.pack_path, &loc.entry);
    loc
}

/// Deletes the pack holding block `i` of snapshot `snap`; returns where it was.
pub fn delete_pack_of_block(repo: &Path, snap: &str, i: u64) -> BlockLoc {
    let loc = locate_block(repo, snap, i);
    std::fs::remove_file(&loc.pack_path).expect("delete pack");
    loc
}

/// The volume a snapshot describes, rebuilt by hand from its tree and blobs.
pub fn volume_by_hand(repo: &Path, snap: &str) -> Vec<u8> {
    let id = resolve_snapshot(repo, snap);
    let size = ju64(&snapshot_header(repo, &id), "/source/size");
    let map = block_map(repo, &id);
    let idx = read_index(repo);
    let bs = map.block_size;
    let mut out = vec![0u8; size as usize];
    let mut cache: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for (first, n, r) in &map.runs {
        if let Blk::Part { blob, piece } = r {
            let content = cache
                .entry(blob.clone())
                .or_insert_with(|| read_blob(repo, &idx, blob));
            for k in 0..*n {
                let at = ((first + k) * bs) as usize;
                let len = (bs as usize).min(out.len() - at);
                let from = ((piece + k) * bs) as usize;
                out[at..at + len].copy_from_slice(&content[from..from + len]);
            }
        }
    }
    out
}

/// True when the pack at `path` holds tree blobs (damaging it would make snapshots
/// unreadable as a whole, not just some of their blocks).
pub fn pack_has_tree_blobs(path: &Path) -> bool {
    read_pack_table(path).iter().any(|e| e.kind == 1)
}

/// Writes an index file by hand (FORMAT.md §F2.3) listing `packs`; returns its id.
pub fn write_index_file(repo: &Path, packs: &BTreeMap<String, Vec<BlobEntry>>) -> String {
    require_plain(repo, "write_index_file");
    let mut b = b"VBINDEX\n".to_vec();
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&(packs.len() as u32).to_le_bytes());
    for (pack, entries) in packs {
        b.extend_from_slice(&hex::decode(pack).unwrap());
        b.extend_from_slice(&(entries.len() as u32).to_le_bytes());
        for e in entries {
            b.extend_from_slice(&hex::decode(&e.id).unwrap());
            b.push(e.kind);
            b.extend_from_slice(&[0; 3]);
            for v in [e.frame_offset, e.frame_len, e.offset, e.len] {
                b.extend_from_slice(&(v as u32).to_le_bytes());
            }
        }
    }
    let sum = blake3::hash(&b);
    b.extend_from_slice(sum.as_bytes());
    let id = sum.to_hex().to_string();
    std::fs::write(repo.join("index").join(&id), b).unwrap();
    id
}

/// Replaces every index file of the repository by one that lists `packs`.
pub fn replace_index(repo: &Path, packs: &BTreeMap<String, Vec<BlobEntry>>) -> String {
    let old = index_files(repo);
    let id = write_index_file(repo, packs);
    for f in old {
        if f.file_name().unwrap().to_string_lossy() != id {
            std::fs::remove_file(f).unwrap();
        }
    }
    id
}
