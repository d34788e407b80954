//! The tests that matter for a remote repository, run against both kinds of repository: a
//! local directory and a prefix of a bucket on a Garage S3 server started by the test.
//!
//! Each test is a function of a [`Backend`]; [`both_backends!`] makes two `#[test]`s of it,
//! `backends::local::NAME` and `backends::s3::NAME`. A test gets its repository from
//! [`Repo::new`] (`None`: the S3 test skips without a garage binary, and fails when `CI` is
//! set) and runs every command through [`Repo`], which gives the address and the
//! environment (credentials, metadata cache, retry budget); what it checks is the same on
//! both.

use crate::garage::Garage;
use crate::util::{self, MIB, Run, TestDir, jstr, ju64, p, random_file, sha256_file, write_at};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

/// Where a test's repository lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A directory of the test's temporary directory.
    Local,
    /// A prefix of the bucket of a single-node Garage started for the test.
    S3,
}

/// Makes `backends::local::NAME` and `backends::s3::NAME`, each a `#[test]` calling
/// `NAME(Backend::…)`, for every function `NAME` listed.
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod local {
            $(
                #[test]
                fn $name() {
                    super::$name(super::Backend::Local)
                }
            )*
        }
        mod s3 {
            $(
                #[test]
                fn $name() {
                    super::$name(super::Backend::S3)
                }
            )*
        }
    };
}

both_backends!(
    ext4_full_incremental_restore_exact,
    killed_backup_resumes_and_restores_exact,
    damaged_pack_is_named_by_verify_and_stops_restore,
    mount_copy_and_nbd_serve_read_the_snapshot,
    export_to_qcow2_vhd_and_a_verified_copy,
    forget_prune_then_the_kept_snapshot_restores_exact,
);

// ---------------------------------------------------------------------------------------------
// The fixture

/// A repository address of one backend (not initialised until [`Repo::init`]), with what
/// its commands need.
pub struct Repo {
    pub backend: Backend,
    /// The address commands take: a directory path, or `s3:http://127.0.0.1:PORT/volback/repo`.
    url: String,
    /// `VOLBACK_CACHE_DIR` of every command (S3 metadata cache; unused locally).
    cache: PathBuf,
    /// The server (S3), stopped when the repository is dropped: drop mounts and servers
    /// reading it first (declare them after it).
    garage: Option<Garage>,
}

/// The prefix of the repository in the bucket.
const PREFIX: &str = "repo";

impl Repo {
    /// A repository address in `t` (local) or on a new single-node Garage (S3), or `None`
    /// after printing why the test skips (no garage binary; a failure when `CI` is set).
    pub fn new(backend: Backend, t: &TestDir) -> Option<Repo> {
        let cache = t.join("cache");
        match backend {
            Backend::Local => Some(Repo {
                backend,
                url: p(&t.join("repo")).to_string(),
                cache,
                garage: None,
            }),
            Backend::S3 => {
                let g = Garage::single()?;
                Some(Repo {
                    backend,
                    url: g.repo_url(PREFIX),
                    cache,
                    garage: Some(g),
                })
            }
        }
    }

    /// The address to give commands.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `volback ARGS` with this repository's environment (and the test password when ARGS
    /// name it, as [`util::volback_command`] gives).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = util::volback_command(args);
        c.env("VOLBACK_CACHE_DIR", &self.cache);
        if let Some(g) = &self.garage {
            c.envs(g.env());
            c.env("VOLBACK_RETRY_SECS", "20");
        }
        c
    }

    /// Runs `volback ARGS`, whatever its exit code (but not a panic).
    pub fn vb(&self, args: &[&str]) -> Run {
        let r = util::run_command(self.command(args), &format!("volback {}", args.join(" ")));
        assert!(!r.stderr.contains("panicked"), "volback panicked: {r:?}");
        r
    }

    /// Runs `volback ARGS`, which must exit 0.
    pub fn ok(&self, args: &[&str]) -> Run {
        self.vb(args).expect_code(0)
    }

    pub fn init(&self) {
        self.ok(&["init", &self.url]);
    }

    /// `backup --json EXTRA… SOURCE REPO`: the report.
    pub fn backup(&self, src: &Path, extra: &[&str]) -> serde_json::Value {
        let mut args = vec!["backup", "--json"];
        args.extend_from_slice(extra);
        args.extend([p(src), &self.url]);
        self.ok(&args).json()
    }

    /// `restore REPO SNAPSHOT TARGET`, which must succeed.
    pub fn restore(&self, snapshot: &str, target: &Path) -> Run {
        self.ok(&["restore", &self.url, snapshot, p(target)])
    }

    /// `snapshots --json`: the ids, oldest first.
    pub fn snapshot_ids(&self) -> Vec<String> {
        let v = self.ok(&["snapshots", "--json", &self.url]).json();
        v.as_array()
            .expect("snapshots --json prints an array")
            .iter()
            .map(|s| jstr(s, "/id").to_string())
            .collect()
    }

    /// The repository's objects whose names start with `dir` (`packs/`, `journals/`…), by
    /// name relative to the repository (`packs/ab/ab…`), with their sizes.
    pub fn objects(&self, dir: &str) -> BTreeMap<String, u64> {
        match &self.garage {
            Some(g) => g
                .list(&format!("{PREFIX}/{dir}"))
                .into_iter()
                .map(|(k, n)| (k[PREFIX.len() + 1..].to_string(), n))
                .collect(),
            None => {
                let mut out = BTreeMap::new();
                walk(
                    Path::new(&self.url),
                    Path::new(&self.url).join(dir),
                    &mut out,
                );
                out
            }
        }
    }

    /// Pack ids with their sizes (objects named `packs/XX/<64 hex digits>`).
    pub fn packs(&self) -> BTreeMap<String, u64> {
        self.objects("packs/")
            .into_iter()
            .filter_map(|(k, n)| {
                let id = k.rsplit('/').next()?.to_string();
                (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some((id, n))
            })
            .collect()
    }

    /// The bytes of object `name` (relative to the repository).
    pub fn read_object(&self, name: &str) -> Vec<u8> {
        match &self.garage {
            Some(g) => g.get(&format!("{PREFIX}/{name}")),
            None => std::fs::read(Path::new(&self.url).join(name))
                .unwrap_or_else(|e| panic!("read {name}: {e}")),
        }
    }

    /// Replaces object `name` by `bytes` (a local file in place; an S3 object by a PUT).
    pub fn write_object(&self, name: &str, bytes: &[u8]) {
        match &self.garage {
            Some(g) => g.put(&format!("{PREFIX}/{name}"), bytes),
            None => std::fs::write(Path::new(&self.url).join(name), bytes)
                .unwrap_or_else(|e| panic!("write {name}: {e}")),
        }
    }

    /// Flips one byte in the middle of pack `id` (its length and table stay valid: only
    /// reading its data finds the damage).
    pub fn damage_pack(&self, id: &str) {
        let name = format!("packs/{}/{id}", &id[..2]);
        let mut b = self.read_object(&name);
        let mid = b.len() / 2;
        b[mid] ^= 0x40;
        self.write_object(&name, &b);
    }

    /// Whether the resume journal of an unfinished backup holds at least one checkpoint (a
    /// batch after its header): a local journal file with a complete batch, or an S3
    /// journal segment `journals/<stem>.journal.<n>`.
    pub fn journal_has_checkpoint(&self) -> bool {
        match self.backend {
            Backend::Local => util::journal_blocks(Path::new(&self.url)) > 0,
            Backend::S3 => self
                .objects("journals/")
                .keys()
                .any(|k| k.contains(".journal.")),
        }
    }

    /// Resume journals (objects or files under `journals/` named `*.journal*`).
    pub fn journals(&self) -> Vec<String> {
        self.objects("journals/")
            .into_keys()
            .filter(|k| k.contains(".journal"))
            .collect()
    }
}

/// Files under `dir`, by path relative to `root`, with their sizes.
fn walk(root: &Path, dir: PathBuf, out: &mut BTreeMap<String, u64>) {
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return;
    };
    for e in rd.flatten() {
        let path = e.path();
        let meta = e.metadata().expect("stat");
        if meta.is_dir() {
            walk(root, path, out);
        } else {
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            out.insert(rel, meta.len());
        }
    }
}

/// A view made by `volback mount`; `volback umount` when dropped (if the test did not).
struct Mounted<'a> {
    repo: &'a Repo,
    view: PathBuf,
    mounted: bool,
}

impl<'a> Mounted<'a> {
    /// `volback mount --json REPO SNAPSHOT VIEW EXTRA…`.
    fn new(repo: &'a Repo, snapshot: &str, view: &Path, extra: &[&str]) -> Mounted<'a> {
        std::fs::create_dir_all(view).expect("create the view directory");
        let mut args = vec!["mount", "--json", repo.url(), snapshot, p(view)];
        args.extend_from_slice(extra);
        repo.ok(&args);
        Mounted {
            repo,
            view: view.to_path_buf(),
            mounted: true,
        }
    }

    fn umount(mut self) {
        self.mounted = false;
        self.repo.ok(&["umount", p(&self.view)]);
    }
}

impl Drop for Mounted<'_> {
    fn drop(&mut self) {
        if self.mounted {
            let _ = self.repo.vb(&["umount", p(&self.view)]);
        }
    }
}

/// A running `volback serve --nbd 127.0.0.1:0 REPO SNAPSHOT`, killed when dropped.
struct Served {
    child: Child,
    _stdout: BufReader<ChildStdout>,
    uri: String,
}

impl Served {
    fn start(repo: &Repo, snapshot: &str, stderr: &Path) -> Served {
        let mut child = repo
            .command(&["serve", "--nbd", "127.0.0.1:0", repo.url(), snapshot])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(stderr).expect("create the stderr file"))
            .spawn()
            .expect("start volback serve");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("read the server's URI");
        if !line.starts_with("nbd://") {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "volback serve printed {line:?}, not a URI:\n{}",
                std::fs::read_to_string(stderr).unwrap_or_default()
            );
        }
        Served {
            child,
            _stdout: out,
            uri: line.trim().to_string(),
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Sources

/// Files for an ext4 image: random data (incompressible), text, a small file in a
/// subdirectory.
fn source_files(dir: &Path, seed: u64) {
    let mut rng = util::Rng::new(seed);
    std::fs::create_dir_all(dir.join("sub")).expect("create dirs");
    for i in 0..3 {
        std::fs::write(dir.join(format!("r{i}.bin")), rng.bytes(3 * MIB as usize)).unwrap();
    }
    std::fs::write(dir.join("text.txt"), rng.text(2 * MIB as usize)).unwrap();
    std::fs::write(dir.join("sub/small"), b"hello from a volume").unwrap();
}

/// An ext4 image of `size` bytes holding the files of `dir` (`mkfs.ext4 -d`: no mount, no
/// root). Its unused blocks are zero (a new sparse file), so a restore, which writes zeros
/// there, is the image bit for bit.
fn ext4_image(path: &Path, dir: &Path, size: u64) {
    util::sparse_file(path, size);
    util::run_ok("mkfs.ext4", &["-q", "-F", "-d", p(dir), p(path)]);
    util::run_ok("e2fsck", &["-fn", p(path)]);
}

/// Adds file `name` holding `data` to the root directory of the ext4 image (debugfs: no
/// mount). Only adds: the blocks ext4 leaves unused stay zero.
fn ext4_add_file(t: &TestDir, image: &Path, name: &str, data: &[u8]) {
    let file = t.join(&format!("{name}.add"));
    std::fs::write(&file, data).unwrap();
    util::run_ok(
        "debugfs",
        &["-w", "-R", &format!("write {} {name}", p(&file)), p(image)],
    );
    util::run_ok("e2fsck", &["-fn", p(image)]);
}

/// A byte count as `restore` prints it ("1.5 MiB", "4096 B"), in bytes.
fn human_bytes(s: &str) -> u64 {
    let (n, unit) = s.trim().split_once(' ').expect("NUMBER UNIT");
    let n: f64 = n.parse().expect("a number");
    let scale = match unit {
        "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => MIB as f64,
        "GiB" => (1u64 << 30) as f64,
        u => panic!("unit {u:?}"),
    };
    (n * scale) as u64
}

/// What a restore says it wrote ("restored … : N written, …").
fn restore_written(r: &Run) -> u64 {
    let line = r
        .stdout
        .lines()
        .chain(r.stderr.lines())
        .find(|l| l.contains(" written"))
        .unwrap_or_else(|| panic!("restore did not say what it wrote: {r:?}"));
    let before = line.split(" written").next().unwrap();
    let amount = before.rsplit(": ").next().unwrap();
    human_bytes(amount)
}

// ---------------------------------------------------------------------------------------------
// The tests

/// A full and an incremental backup of an ext4 image restore bit for bit to filesystems
/// `e2fsck -fn` finds clean; the incremental stores little; `restore --only-changed` of the
/// first snapshot onto a restore of the second brings it back with few writes; `verify
/// --read-data` finds nothing; `stats` answers; the snapshots list is the same without the
/// metadata cache; `init` refuses an address that holds a repository.
fn ext4_full_incremental_restore_exact(b: Backend) {
    if !util::require_tools(&["mkfs.ext4", "e2fsck", "debugfs"]) {
        return;
    }
    let t = TestDir::new();
    let Some(r) = Repo::new(b, &t) else { return };
    let files = t.join("files");
    source_files(&files, 1);
    let img = t.join("ext4.img");
    let size = 64 * MIB;
    ext4_image(&img, &files, size);
    let sha1 = sha256_file(&img);
    r.init();
    let first = r.backup(&img, &[]);
    let id1 = jstr(&first, "/snapshot").to_string();
    assert!(first["parent"].is_null(), "{first}");

    ext4_add_file(
        &t,
        &img,
        "new.bin",
        &util::Rng::new(2).bytes(2 * MIB as usize),
    );
    let sha2 = sha256_file(&img);
    assert_ne!(sha1, sha2);
    let second = r.backup(&img, &[]);
    let id2 = jstr(&second, "/snapshot").to_string();
    assert_eq!(jstr(&second, "/parent"), id1, "{second}");
    assert!(
        ju64(&second, "/stats/new_bytes") <= 8 * MIB,
        "the incremental stores about what changed (a 2 MiB file): {second}"
    );

    let out = t.join("out.img");
    r.restore(&id2, &out);
    assert_eq!(sha256_file(&out), sha2, "restore of the incremental");
    util::run_ok("e2fsck", &["-fn", p(&out)]);
    // The first snapshot onto the second's restore: only what differs is written.
    let back = r.ok(&["restore", "--only-changed", r.url(), &id1, p(&out)]);
    let written = restore_written(&back);
    assert!(
        written <= 8 * MIB,
        "--only-changed wrote {written} bytes: {back:?}"
    );
    assert_eq!(
        sha256_file(&out),
        sha1,
        "restore --only-changed of the full"
    );
    util::run_ok("e2fsck", &["-fn", p(&out)]);

    r.ok(&["verify", "--read-data", r.url()])
        .stdout_has(&["no problems"]);
    assert_eq!(r.snapshot_ids(), [id1.clone(), id2.clone()]);
    r.ok(&["stats", "--json", r.url()]).json();
    r.ok(&["stats", "--json", r.url(), &id2]).json();
    // Without the cache the same list (on S3: from the server).
    let warm = r.ok(&["snapshots", "--json", r.url()]).json();
    let mut cold = r.command(&["snapshots", "--json", r.url()]);
    cold.env("VOLBACK_CACHE_DIR", t.join("cold-cache"));
    assert_eq!(
        util::run_command(cold, "snapshots, cold cache").json(),
        warm
    );
    r.vb(&["init", r.url()])
        .expect_code(1)
        .stderr_has(&["already holds a repository"]);
    // Nothing of an S3 repository went to a local directory named like its address.
    assert!(!Path::new("s3:http:").exists());
}

/// A child killed (and reaped) when dropped: a test that fails leaves no stopped process.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the stopped-and-continued child in slices of `slice` until the repository's journal
/// holds a checkpoint, then kills it with SIGKILL (true); false when it finished first
/// (having succeeded; `stderr` is its standard error). Between slices the child is stopped (SIGSTOP), so a look at the
/// repository sees it as it is.
fn kill_after_checkpoint(child: &mut Child, r: &Repo, slice: Duration, stderr: &Path) -> bool {
    let pid = child.id() as libc::pid_t;
    // Every thread stopped (or the process gone: a zombie has nothing left running).
    let stopped = || {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return true;
        };
        tasks.flatten().all(|task| {
            std::fs::read_to_string(task.path().join("stat"))
                .ok()
                .and_then(|s| s.rsplit(") ").next().and_then(|f| f.chars().next()))
                .is_none_or(|state| matches!(state, 'T' | 't' | 'Z' | 'X'))
        })
    };
    let signal = |sig| {
        // SAFETY: kill() takes a process id and a signal number; the child is ours and not
        // yet reaped (only this function waits for it), so the id names it.
        unsafe { libc::kill(pid, sig) };
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    signal(libc::SIGSTOP);
    loop {
        signal(libc::SIGCONT);
        std::thread::sleep(slice);
        signal(libc::SIGSTOP);
        while !stopped() {
            std::thread::sleep(Duration::from_millis(1));
        }
        if let Some(status) = child.try_wait().expect("try_wait") {
            assert!(
                status.success(),
                "the backup failed: {status:?}\n{}",
                std::fs::read_to_string(stderr).unwrap_or_default()
            );
            return false;
        }
        if r.journal_has_checkpoint() {
            child.kill().expect("SIGKILL");
            let status = child.wait().expect("wait");
            assert_eq!(status.code(), None, "killed by a signal: {status:?}");
            return true;
        }
        assert!(Instant::now() < deadline, "the backup ran for 10 minutes");
    }
}

/// A backup killed with SIGKILL once its journal holds a checkpoint leaves a valid
/// repository and is resumed by the next run (`resumed: true`, not everything read again, every block counted once), which
/// leaves no journal; the snapshot restores bit for bit and `verify --read-data` is clean.
fn killed_backup_resumes_and_restores_exact(b: Backend) {
    let t = TestDir::new();
    let Some(r) = Repo::new(b, &t) else { return };
    r.init();
    let size = 96 * MIB;
    // The backup runs in slices between looks at the repository; a run that finishes
    // before a checkpoint is seen is tried again with shorter slices, on a new volume.
    for (attempt, slice_ms) in [20u64, 4, 1].into_iter().enumerate() {
        let src = t.join(&format!("src{attempt}.img"));
        random_file(&src, size, 40 + attempt as u64);
        let sha = sha256_file(&src);
        let args = ["backup", "--checkpoint-secs", "0.2", p(&src), r.url()];
        let stderr = t.join(&format!("backup{attempt}.stderr"));
        let mut child = KillOnDrop(
            r.command(&args)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&stderr).expect("create the stderr file"))
                .spawn()
                .expect("spawn backup"),
        );
        let before = r.snapshot_ids().len();
        let slice = Duration::from_millis(slice_ms);
        if !kill_after_checkpoint(&mut child.0, &r, slice, &stderr) {
            eprintln!("attempt {attempt}: the backup finished before a checkpoint was seen");
            continue;
        }
        if r.snapshot_ids().len() > before {
            // Killed between writing its snapshot and removing its journal: nothing to
            // resume. The next run of this volume clears the journal.
            eprintln!("attempt {attempt}: killed after its snapshot was written");
            r.backup(&src, &[]);
            continue;
        }
        assert!(!r.journals().is_empty(), "the killed run left its journal");
        // What is committed is intact after the crash.
        r.ok(&["verify", "--read-data", r.url()])
            .stdout_has(&["no problems"]);
        let last = r.backup(&src, &["--checkpoint-secs", "0.2"]);
        assert_eq!(last["resumed"], true, "{last}");
        assert!(ju64(&last, "/bytes_read") < size, "{last}");
        assert_eq!(ju64(&last, "/stats/bytes_read"), size, "{last}");
        assert!(last["parent"].is_null(), "{last}");
        assert!(r.journals().is_empty(), "journal left: {:?}", r.journals());
        let out = t.join("out.img");
        r.restore(jstr(&last, "/snapshot"), &out);
        assert_eq!(sha256_file(&out), sha, "restore of the resumed backup");
        r.ok(&["verify", "--read-data", r.url()])
            .stdout_has(&["no problems"]);
        return;
    }
    panic!("three backups finished before a checkpoint of theirs was seen");
}

/// A flipped byte in a pack is found by `verify --read-data`, which names the pack and sets
/// it aside (`.bad`); a restore then fails naming it, and leaves no target file.
fn damaged_pack_is_named_by_verify_and_stops_restore(b: Backend) {
    let t = TestDir::new();
    let Some(r) = Repo::new(b, &t) else { return };
    let src = t.join("src.img");
    random_file(&src, 32 * MIB, 3);
    r.init();
    let id = jstr(&r.backup(&src, &[]), "/snapshot").to_string();
    r.ok(&["verify", "--read-data", r.url()])
        .stdout_has(&["no problems"]);
    let packs = r.packs();
    let (pack, _) = packs
        .iter()
        .max_by_key(|(_, n)| **n)
        .expect("the backup stored packs");
    r.damage_pack(pack);
    // Quick verify does not read packs.
    r.ok(&["verify", r.url()]);
    let v = r.vb(&["verify", "--read-data", r.url()]).expect_code(1);
    v.stdout_has(&[pack, &id[..12]]);
    let bad = format!("packs/{}/{pack}.bad", &pack[..2]);
    assert!(
        r.objects("packs/").contains_key(&bad),
        "{bad} not set aside: {:?}",
        r.objects("packs/")
    );
    assert!(!r.packs().contains_key(pack), "{pack} still in place");
    let out = t.join("out.img");
    let e = r.vb(&["restore", r.url(), &id, p(&out)]).expect_code(1);
    e.stderr_has(&[&pack[..12]]);
    assert!(!out.exists(), "a failed restore left its file");
}

/// A snapshot mounted with `volback mount` (FUSE) reads as the source image (SHA-256 of
/// the view's `volume.img`), its files through `--files` (loop device) are the source's,
/// `volback copy` of the view's image makes a local copy that verifies and restores to the
/// source; `serve --nbd` serves the snapshot, which `qemu-img compare` finds equal to the
/// source.
fn mount_copy_and_nbd_serve_read_the_snapshot(b: Backend) {
    if !util::require_root_loop_and_fuse() || !util::require_tools(&["qemu-img"]) {
        return;
    }
    let t = TestDir::new();
    let Some(r) = Repo::new(b, &t) else { return };
    let files = t.join("files");
    source_files(&files, 5);
    let img = t.join("ext4.img");
    ext4_image(&img, &files, 48 * MIB);
    let sha = sha256_file(&img);
    r.init();
    let id = jstr(&r.backup(&img, &[]), "/snapshot").to_string();

    let view = t.join("view");
    let fs = t.join("fs");
    let m = Mounted::new(&r, &id, &view, &["--files", p(&fs)]);
    let volume = view.join("volume.img");
    assert_eq!(sha256_file(&volume), sha, "the view's volume.img");
    assert_eq!(util::tree_hashes(&fs), util::tree_hashes(&files));
    // A local copy of the mounted snapshot.
    let copy = t.join("copy");
    util::volback_ok(&["copy", "--format", "bin", p(&volume), p(&copy)]);
    m.umount();
    assert!(!util::mountinfo_mentions(p(t.path())), "a mount is left");
    util::volback_ok(&["verify", p(&copy)]).stdout_has(&["no problems"]);
    let out = t.join("from-copy.img");
    util::volback_ok(&["restore", p(&copy), p(&out)]);
    assert_eq!(sha256_file(&out), sha, "restore of the copy");

    let served = Served::start(&r, &id, &t.join("serve.stderr"));
    util::run_ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", p(&img), &served.uri],
    );
    drop(served);
}

/// `export` of a snapshot to qcow2 and VHD (fixed and dynamic): `qemu-img check` finds the
/// qcow2 clean, `qemu-img compare` finds each equal to the source, `volback verify` checks
/// each against its hashes; `export --format bin` makes a copy that verifies and restores to
/// the source.
fn export_to_qcow2_vhd_and_a_verified_copy(b: Backend) {
    if !util::require_tools(&["mkfs.ext4", "e2fsck", "qemu-img"]) {
        return;
    }
    let t = TestDir::new();
    let Some(r) = Repo::new(b, &t) else { return };
    let files = t.join("files");
    source_files(&files, 6);
    let img = t.join("ext4.img");
    ext4_image(&img, &files, 40 * MIB);
    r.init();
    let id = jstr(&r.backup(&img, &[]), "/snapshot").to_string();
    for (format, qemu) in [("qcow2", "qcow2"), ("vhd", "vpc"), ("vhd-dynamic", "vpc")] {
        let out = t.join(&format!("export.{format}"));
        let e = r
            .ok(&[
                "export",
                "--json",
                "--format",
                format,
                r.url(),
                &id,
                p(&out),
            ])
            .json();
        assert_eq!(e["snapshot"], id.as_str(), "{e}");
        if format == "qcow2" {
            util::run_ok("qemu-img", &["check", "-f", qemu, p(&out)]);
        }
        util::run_ok(
            "qemu-img",
            &["compare", "-f", qemu, "-F", "raw", p(&out), p(&img)],
        );
        util::volback_ok(&["verify", p(&out)]).stdout_has(&["no problems"]);
    }
    let copy = t.join("export.bin");
    r.ok(&[
        "export",
        "--format",
        "bin",
        "--slice-size",
        "16M",
        r.url(),
        "latest",
        p(&copy),
    ]);
    util::volback_ok(&["verify", p(&copy)]).stdout_has(&["no problems"]);
    let out = t.join("from-copy.img");
    util::volback_ok(&["restore", p(&copy), p(&out)]);
    assert_eq!(sha256_file(&out), sha256_file(&img), "restore of the copy");
    util::run_ok("e2fsck", &["-fn", p(&out)]);
}

/// Three backups of a changing volume; `forget --keep-last 1` and `prune --max-unused 0`
/// remove the two older ones and the data only they used; the kept snapshot restores bit
/// for bit, a forgotten one is gone, and `verify --read-data` is clean.
fn forget_prune_then_the_kept_snapshot_restores_exact(b: Backend) {
    let t = TestDir::new();
    let Some(r) = Repo::new(b, &t) else { return };
    let src = t.join("src.img");
    random_file(&src, 32 * MIB, 7);
    r.init();
    let mut ids = Vec::new();
    for i in 0..3u64 {
        if i > 0 {
            write_at(
                &src,
                i * 8 * MIB,
                &util::Rng::new(70 + i).bytes(4 * MIB as usize),
            );
        }
        ids.push(jstr(&r.backup(&src, &[]), "/snapshot").to_string());
    }
    let sha = sha256_file(&src);
    r.ok(&["forget", r.url(), "--keep-last", "1"]);
    assert_eq!(r.snapshot_ids(), [ids[2].clone()]);
    let pr = r
        .ok(&["prune", "--json", r.url(), "--max-unused", "0"])
        .json();
    assert!(
        ju64(&pr, "/bytes_after") < ju64(&pr, "/bytes_before"),
        "prune freed nothing: {pr}"
    );
    assert!(pr["deferred"].as_array().is_some_and(Vec::is_empty), "{pr}");
    let out = t.join("out.img");
    r.restore(&ids[2], &out);
    assert_eq!(sha256_file(&out), sha, "restore of the kept snapshot");
    r.vb(&["restore", r.url(), &ids[0], p(&t.join("gone.img"))])
        .expect_code(1);
    r.ok(&["verify", "--read-data", r.url()])
        .stdout_has(&["no problems"]);
}
