//! The Windows build (`volback.exe`, x86_64-pc-windows-gnu) driven end to end under wine on
//! image files, and repositories and copies moving between the Linux and Windows builds in
//! both directions. Judges: the Linux build, `qemu-img compare`, byte-for-byte comparison.
//!
//! `scripts/win/test.sh` builds the executable and runs these tests with `VOLBACK_WIN_EXE`
//! naming it and the environment of `scripts/win/env.sh` (wine prefix, the DLL shim wine
//! lacks). Without them the tests skip, and fail when `CI` is set. `scripts/test.sh` runs
//! the Linux suite with `--skip windows::` and then these.
//!
//! Every command is written once with Unix paths and run by either build ([`System`]); for
//! the Windows build, [`wine_command`] — the one place that sets up a wine run — turns
//! absolute paths into drive `Z:` paths (wine maps the Unix root there).

use crate::ext4::populate;
use crate::util::*;
use std::fs::File;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

/// No volback.exe run is waited for longer than this: a safety net against hangs (the run
/// is killed and the test fails), not a speed check.
const HANG_GUARD: Duration = Duration::from_secs(600);

/// Which build runs a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum System {
    Linux,
    Windows,
}

/// The Windows executable under test, or why these tests cannot run (they skip, or fail
/// when `CI` is set).
fn windows_exe() -> Option<PathBuf> {
    let missing = match std::env::var_os("VOLBACK_WIN_EXE") {
        None => Some(
            "VOLBACK_WIN_EXE is not set (scripts/win/test.sh builds volback.exe and sets it)"
                .to_string(),
        ),
        Some(exe) if !Path::new(&exe).is_file() => Some(format!(
            "VOLBACK_WIN_EXE names {}, which does not exist (run scripts/win/build.sh)",
            Path::new(&exe).display()
        )),
        Some(_) if !in_path("wine") || !in_path("wineserver") => {
            Some("wine is not installed (scripts/win/setup.sh)".to_string())
        }
        Some(_) => None,
    };
    if !require(missing) {
        return None;
    }
    start_wine();
    std::env::var_os("VOLBACK_WIN_EXE").map(PathBuf::from)
}

/// Starts wine's server and services once, with no standard output or error of ours
/// (scripts/win/wine-start.sh does the same before the tests). Started by the first wine
/// program of a test instead, they would inherit that test's output pipes and hold them open
/// after the program exits: a test reading to end-of-file never got it.
fn start_wine() {
    static STARTED: Once = Once::new();
    STARTED.call_once(|| {
        for (program, args) in [
            ("wineserver", &["-p"][..]),
            ("wine", &["wineboot", "--init"]),
        ] {
            let status = Command::new(program)
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
            // `wineserver -p` fails when a server already runs: that is fine.
            assert!(
                program == "wineserver" || status.success(),
                "{program} {args:?}: {status}"
            );
        }
    });
}

/// An argument as the Windows build must see it: an absolute Unix path becomes the same path
/// on drive `Z:`; anything else is unchanged.
fn windows_arg(arg: &str) -> String {
    if arg.starts_with('/') {
        format!("Z:{}", arg.replace('/', "\\"))
    } else {
        arg.to_string()
    }
}

/// `wine volback.exe ARGS` with the arguments and password environment the Linux build gets
/// from [`volback_command`], paths translated by [`windows_arg`], stdin from /dev/null, and
/// stdout and stderr sent to anonymous files (never pipes: see [`start_wine`]). The rest of
/// the environment (WINEPREFIX, WINEPATH, WINEDEBUG) comes from scripts/win/env.sh.
fn wine_command(exe: &Path, args: &[&str]) -> (Command, File, File) {
    let mut c = Command::new("wine");
    c.arg(exe);
    c.args(volback_args(args).iter().map(|a| windows_arg(a)));
    for v in PASSWORD_VARS {
        c.env_remove(v);
    }
    c.envs(password_env(args));
    let out = tempfile::tempfile().expect("temporary file");
    let err = tempfile::tempfile().expect("temporary file");
    c.stdin(Stdio::null())
        .stdout(out.try_clone().expect("clone"))
        .stderr(err.try_clone().expect("clone"));
    (c, out, err)
}

/// Everything written to `f` (an anonymous output file).
fn read_all(mut f: File) -> String {
    let mut s = String::new();
    f.rewind().expect("rewind");
    f.read_to_string(&mut s).expect("read output");
    s
}

/// Waits for `child`, killing it (and failing) after [`HANG_GUARD`].
fn wait_guarded(child: &mut Child, cmd: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`{cmd}` was still running after {HANG_GUARD:?}: it hangs (killed)");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `volback ARGS` on `system`, whatever its exit code; asserts it did not panic.
fn run(system: System, exe: &Path, args: &[&str]) -> Run {
    let r = match system {
        System::Linux => volback(args),
        System::Windows => {
            let cmd = format!("wine volback.exe {}", args.join(" "));
            let (mut c, out, err) = wine_command(exe, args);
            let mut child = c
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
            let status = wait_guarded(&mut child, &cmd);
            Run {
                cmd,
                code: status.code(),
                stdout: read_all(out),
                stderr: read_all(err),
            }
        }
    };
    assert!(!r.stderr.contains("panicked"), "volback panicked: {r:?}");
    r
}

/// [`run`], asserting exit code 0.
fn ok(system: System, exe: &Path, args: &[&str]) -> Run {
    run(system, exe, args).expect_code(0)
}

/// An ext4 image of `size` bytes made by `mkfs.ext4 -d` from generated files (no mount
/// needed); its unused blocks are zero, so a restore of a backup reading only used blocks
/// gives back the image bit for bit.
fn ext4_image(t: &TestDir, name: &str, size: u64, seed: u64) -> PathBuf {
    let files = t.join(&format!("{name}.files"));
    populate(&files, &mut Rng::new(seed), 60);
    let img = t.join(name);
    sparse_file(&img, size);
    run_ok(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            "-d",
            p(&files),
            p(&img),
        ],
    );
    img
}

/// Adds a new file to the ext4 image with `debugfs` (blocks never used before, so the image
/// stays equal to what a restore gives back).
fn add_file(t: &TestDir, img: &Path, name: &str, seed: u64) {
    let host = t.join(&format!("{name}.host"));
    random_file(&host, 3 * MIB + 5 * KIB, seed);
    run_ok(
        "debugfs",
        &["-w", "-R", &format!("write {} {name}", p(&host)), p(img)],
    );
}

/// A raw image with random data, zero runs and a hole, of a size that is not a multiple of
/// 1 MiB.
fn raw_image(t: &TestDir, name: &str, seed: u64) -> PathBuf {
    let img = t.join(name);
    random_file(&img, 12 * MIB + 12 * KIB, seed);
    write_at(&img, 2 * MIB, &vec![0u8; 3 * MIB as usize]);
    img
}

fn assert_same_file(a: &Path, b: &Path) {
    assert_eq!(
        sha256_file(a),
        sha256_file(b),
        "{} and {} differ",
        a.display(),
        b.display()
    );
}

/// `qemu-img compare` of an image in `format` against a raw image: same content.
fn assert_image_is(image: &Path, format: &str, raw: &Path) {
    run_ok(
        "qemu-img",
        &["compare", "-q", "-f", format, "-F", "raw", p(image), p(raw)],
    );
}

/// What `qemu-img` calls each copy format, and the file it opens.
fn qemu_view(dest: &Path, format: &str) -> (PathBuf, &'static str) {
    match format {
        "raw" => (dest.to_path_buf(), "raw"),
        "vhd" | "vhd-dynamic" => (dest.to_path_buf(), "vpc"),
        "vhdx" => (dest.to_path_buf(), "vhdx"),
        "qcow2" => (dest.to_path_buf(), "qcow2"),
        other => panic!("no qemu view of {other}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The Windows build alone

/// Init, full and incremental backups, restores, `verify --read-data`, snapshots and stats,
/// on an encrypted repository, all by volback.exe.
#[test]
fn windows_build_backs_up_and_restores_image_files() {
    let Some(exe) = windows_exe() else { return };
    let w = System::Windows;
    let t = TestDir::new();
    let img = ext4_image(&t, "fs.img", 32 * MIB, 1);
    let raw = raw_image(&t, "raw.img", 2);
    let repo = t.join("repo");
    ok(w, &exe, &["init", p(&repo)]).stdout_has(&["encrypted"]);
    let first = ok(w, &exe, &["backup", "--json", p(&img), p(&repo)]).json();
    let before = t.join("before.img");
    std::fs::copy(&img, &before).unwrap();
    add_file(&t, &img, "added", 3);
    let second = ok(w, &exe, &["backup", "--json", p(&img), p(&repo)]).json();
    assert!(
        ju64(&second, "/new_bytes") < ju64(&first, "/new_bytes"),
        "the second backup is incremental: {second}"
    );
    let raw_snap = ok(w, &exe, &["backup", "--json", p(&raw), p(&repo)]).json();
    for (snap, expected) in [
        (jstr(&first, "/snapshot"), &before),
        (jstr(&second, "/snapshot"), &img),
        (jstr(&raw_snap, "/snapshot"), &raw),
    ] {
        let out = t.join(&format!("restored-{snap}"));
        ok(w, &exe, &["restore", p(&repo), snap, p(&out)]);
        assert_same_file(&out, expected);
    }
    ok(w, &exe, &["verify", "--read-data", p(&repo)]);
    ok(w, &exe, &["snapshots", p(&repo)]).stdout_has(&[&jstr(&second, "/snapshot")[..12]]);
    ok(w, &exe, &["stats", p(&repo)]);
    // A damaged pack is found by the Windows build too.
    let pack = largest_pack(&repo);
    corrupt_pack(&pack);
    let r = run(w, &exe, &["verify", "--read-data", p(&repo)]);
    assert_ne!(r.code, Some(0), "{r:?}");
}

/// `copy` in every format, `copy --update`, `verify` and `restore` of copies, and `export`,
/// by volback.exe; qemu-img judges the images.
#[test]
fn windows_build_copies_updates_and_exports_in_every_format() {
    let Some(exe) = windows_exe() else { return };
    let w = System::Windows;
    let t = TestDir::new();
    let img = ext4_image(&t, "fs.img", 24 * MIB, 4);
    let formats = ["raw", "bin", "vhd", "vhd-dynamic", "vhdx", "qcow2"];
    for format in formats {
        let dest = t.join(&format!("copy.{format}"));
        ok(w, &exe, &["copy", "--format", format, p(&img), p(&dest)]);
        if format != "bin" {
            let (view, qf) = qemu_view(&dest, format);
            assert_image_is(&view, qf, &img);
        }
    }
    add_file(&t, &img, "later", 5);
    for format in formats {
        let dest = t.join(&format!("copy.{format}"));
        let r = ok(w, &exe, &["copy", "--update", "--json", p(&img), p(&dest)]).json();
        assert!(ju64(&r, "/blocks_written") > 0, "{format}: {r}");
        ok(w, &exe, &["verify", p(&dest)]);
        let back = t.join(&format!("back.{format}"));
        ok(w, &exe, &["restore", p(&dest), p(&back)]);
        assert_same_file(&back, &img);
    }
    let repo = t.join("repo");
    ok(w, &exe, &["init", "--no-encryption", p(&repo)]);
    ok(w, &exe, &["backup", p(&img), p(&repo)]);
    for format in ["qcow2", "vhdx"] {
        let dest = t.join(&format!("export.{format}"));
        ok(
            w,
            &exe,
            &["export", p(&repo), "latest", p(&dest), "--format", format],
        );
        assert_image_is(&dest, format, &img);
        ok(w, &exe, &["verify", p(&dest)]);
    }
}

/// `probe` and `ptable dump` of a partitioned image file by volback.exe say what the Linux
/// build says.
#[test]
fn windows_build_probes_and_dumps_partition_tables() {
    let Some(exe) = windows_exe() else { return };
    if !require_tools(&["sfdisk"]) {
        return;
    }
    let t = TestDir::new();
    let disk = t.join("disk.img");
    sparse_file(&disk, 64 * MIB);
    run_stdin_ok(
        "sfdisk",
        &["-q", p(&disk)],
        b"label: gpt\nsize=20MiB, type=linux\nsize=20MiB, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\n",
    );
    for system in [System::Linux, System::Windows] {
        let v = ok(system, &exe, &["probe", "--json", p(&disk)]).json();
        assert_eq!(v["partition_table"]["type"], "gpt", "{system:?}: {v}");
    }
    let linux = ok(System::Linux, &exe, &["ptable", "dump", p(&disk)]).stdout;
    let windows = ok(System::Windows, &exe, &["ptable", "dump", p(&disk)]).stdout;
    // The device line names the path each build was given.
    let strip = |s: &str| s.replace("Z:", "").replace('\\', "/").replace("\r\n", "\n");
    assert_eq!(strip(&windows), strip(&linux));
}

/// `backup --snapshot vss`: the Linux build refuses it before anything is done, saying why;
/// the Windows build refuses, the same way, sources of which no shadow copy can be taken (an
/// image file, a whole disk, a shadow copy), and on a volume reaches VSS, which wine does not
/// have: a clear error naming VSS, nothing stored. Shadow-copy device paths pass the device
/// path parser (malformed ones are refused with the reason). `--snapshot none` is the plain
/// backup; an unknown kind is a usage error.
#[test]
fn vss_snapshots_are_refused_clearly_by_both_builds() {
    let Some(exe) = windows_exe() else { return };
    let t = TestDir::new();
    let img = raw_image(&t, "raw.img", 11);
    let repo = t.join("repo");
    ok(System::Linux, &exe, &["init", "--no-encryption", p(&repo)]);
    let vss = |system, source: &str| {
        run(
            system,
            &exe,
            &["backup", "--snapshot", "vss", source, p(&repo)],
        )
        .expect_code(1)
    };
    vss(System::Linux, p(&img)).stderr_has(&["VSS shadow copies need Windows Vista+"]);
    let w = System::Windows;
    vss(w, p(&img)).stderr_has(&["taken of volumes", "is a file", "--snapshot none"]);
    vss(w, r"\\.\PhysicalDrive0").stderr_has(&["whole disk"]);
    vss(w, r"\\?\GLOBALROOT\Device\HarddiskVolumeShadowCopy1")
        .stderr_has(&["is a shadow copy already"]);
    vss(w, r"\\.\C:\image.img").stderr_has(&["not a file"]);
    // A volume: the shadow copy is attempted, and wine's VSS fails (docs/WINDOWS.md says how).
    let r = vss(w, r"\\.\Z:");
    r.stderr_has(&[
        r"cannot take a VSS shadow copy of \\.\Z:",
        "VSS shadow copy:",
    ]);
    eprintln!(
        "wine, backup --snapshot vss \\\\.\\Z: -> {}",
        r.stderr.trim()
    );
    // Without --snapshot: what wine says of Z: decides the default; either way nothing is
    // backed up (VSS fails, or the volume cannot be opened or is refused as mounted).
    let r = run(w, &exe, &["backup", r"\\.\Z:", p(&repo)]).expect_code(1);
    eprintln!("wine, backup \\\\.\\Z: -> {}", r.stderr.trim());
    // wine reports NTFS mounted read-write on Z: (see above): read as it is, it is refused
    // without --allow-mounted, like a mounted volume on Linux.
    run(
        w,
        &exe,
        &["backup", "--snapshot", "none", r"\\.\Z:", p(&repo)],
    )
    .expect_code(1)
    .stderr_has(&[
        "has NTFS mounted read-write",
        "--allow-mounted",
        "--snapshot vss",
    ]);
    // A shadow copy's device path is taken as a source (wine has none to open) …
    let r = run(
        w,
        &exe,
        &[
            "backup",
            "--snapshot",
            "none",
            r"\\?\GLOBALROOT\Device\HarddiskVolumeShadowCopy1",
            p(&repo),
        ],
    )
    .expect_code(1);
    assert!(
        !r.stderr.contains("not a Windows device path"),
        "{}",
        r.stderr
    );
    // … a malformed one is refused with the reason.
    for (path, why) in [
        (
            r"\\?\GLOBALROOT\Device\HarddiskVolumeShadowCopy01",
            "leading zeros",
        ),
        (
            r"\\?\GLOBALROOT\Device\HarddiskVolume1",
            "only shadow copies",
        ),
        (
            r"\\?\GLOBALROOT\Device\HarddiskVolumeShadowCopy2\Windows",
            "not a file",
        ),
    ] {
        run(w, &exe, &["backup", "--snapshot", "none", path, p(&repo)])
            .expect_code(1)
            .stderr_has(&[why]);
    }
    for system in [System::Linux, System::Windows] {
        run(
            system,
            &exe,
            &["backup", "--snapshot", "bogus", p(&img), p(&repo)],
        )
        .expect_code(2);
        ok(
            system,
            &exe,
            &["backup", "--snapshot", "none", p(&img), p(&repo)],
        );
        // An image file is never mounted: the default is `none`.
        ok(system, &exe, &["backup", p(&img), p(&repo)]);
    }
    assert_eq!(
        snapshot_ids(&repo).len(),
        4,
        "only the plain backups stored snapshots"
    );
}

/// `probe` without a source lists the machine's disks and volumes (as a JSON array; under
/// wine none answers the disk ioctls, so the list may be empty), and a hostile device path
/// is refused with the reason.
#[test]
fn windows_build_lists_devices_and_refuses_bad_device_paths() {
    let Some(exe) = windows_exe() else { return };
    let w = System::Windows;
    let listed = ok(w, &exe, &["probe", "--json"]).json();
    assert!(listed.is_array(), "{listed}");
    for (path, why) in [
        (r"\\.\PhysicalDrive01", "leading zeros"),
        (r"\\.\C:\missing.img", "not a file"),
        (r"\\.\pipe\x", "PhysicalDriveN"),
    ] {
        run(w, &exe, &["probe", path])
            .expect_code(1)
            .stderr_has(&[why]);
    }
}

// ---------------------------------------------------------------------------------------------
// NBD

/// `volback.exe serve --nbd 127.0.0.1:0` read by `qemu-img` on Linux (a snapshot and a copy),
/// then stopped like Ctrl-C: it must exit 0.
#[test]
fn windows_build_serves_nbd_to_qemu() {
    let Some(exe) = windows_exe() else { return };
    let w = System::Windows;
    let t = TestDir::new();
    let img = raw_image(&t, "raw.img", 6);
    let repo = t.join("repo");
    ok(w, &exe, &["init", p(&repo)]);
    let snap = ok(w, &exe, &["backup", "--json", p(&img), p(&repo)]).json();
    let copy = t.join("copy.qcow2");
    ok(w, &exe, &["copy", "--format", "qcow2", p(&img), p(&copy)]);
    for source in [vec![p(&repo), jstr(&snap, "/snapshot")], vec![p(&copy)]] {
        let served = WineServer::start(&exe, &source);
        run_ok(
            "qemu-img",
            &[
                "compare",
                "-q",
                "-f",
                "raw",
                "-F",
                "raw",
                &served.uri,
                p(&img),
            ],
        );
        let out = t.join("over-nbd.img");
        run_ok("qemu-img", &["convert", "-O", "raw", &served.uri, p(&out)]);
        assert_same_file(&out, &img);
        let stderr = served.stop();
        assert!(stderr.contains("stopped after serving"), "{stderr}");
    }
}

/// A running `wine volback.exe serve`; killed if a test fails before [`WineServer::stop`].
struct WineServer {
    child: Option<Child>,
    out: File,
    err: File,
    uri: String,
}

impl WineServer {
    /// Starts `volback.exe serve SOURCE… --nbd 127.0.0.1:0` and waits for the URI it prints.
    fn start(exe: &Path, source: &[&str]) -> WineServer {
        let mut args = vec!["serve"];
        args.extend_from_slice(source);
        args.extend_from_slice(&["--nbd", "127.0.0.1:0"]);
        let (mut c, out, err) = wine_command(exe, &args);
        let child = c.spawn().expect("start wine volback.exe serve");
        let mut s = WineServer {
            child: Some(child),
            out,
            err,
            uri: String::new(),
        };
        let deadline = Instant::now() + HANG_GUARD;
        loop {
            let printed = s.stdout();
            if let Some(line) = printed.lines().next().filter(|_| printed.contains('\n')) {
                s.uri = line.trim().to_string();
                break;
            }
            let exited = s.child.as_mut().and_then(|c| c.try_wait().expect("wait"));
            if exited.is_some() || Instant::now() > deadline {
                panic!(
                    "volback.exe serve printed no URI ({exited:?}):\n{}",
                    s.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(s.uri.starts_with("nbd://127.0.0.1:"), "{}", s.uri);
        s
    }

    fn stdout(&self) -> String {
        read_all(self.out.try_clone().expect("clone"))
    }

    fn stderr(&self) -> String {
        read_all(self.err.try_clone().expect("clone"))
    }

    /// Stops the server as Ctrl-C does (SIGINT, which wine delivers to the program's console
    /// control handler) and returns its stderr; it must exit 0.
    fn stop(mut self) -> String {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill() takes a process id and a signal number; the child is ours and not
        // yet reaped, so the id names it.
        let r = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
        assert_eq!(r, 0, "kill -INT");
        let status = wait_guarded(&mut child, "wine volback.exe serve");
        let err = self.stderr();
        assert_eq!(status.code(), Some(0), "serve exited with {status}:\n{err}");
        err
    }
}

impl Drop for WineServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Across systems

/// A repository (two snapshots: full and incremental) and copies written by `writer` are
/// verified with `--read-data`, restored bit for bit and updated by `reader`, then verified
/// again by `writer`.
fn across(writer: System, reader: System, encrypted: bool) {
    let Some(exe) = windows_exe() else { return };
    let t = TestDir::new();
    let img = ext4_image(&t, "fs.img", 32 * MIB, 7);
    let raw = raw_image(&t, "raw.img", 8);
    let repo = t.join("repo");
    let mut init = vec!["init", p(&repo)];
    if !encrypted {
        init.push("--no-encryption");
    }
    ok(writer, &exe, &init);
    let before = t.join("before.img");
    std::fs::copy(&img, &before).unwrap();
    let first = ok(writer, &exe, &["backup", "--json", p(&img), p(&repo)]).json();
    add_file(&t, &img, "added", 9);
    let second = ok(writer, &exe, &["backup", "--json", p(&img), p(&repo)]).json();
    let third = ok(writer, &exe, &["backup", "--json", p(&raw), p(&repo)]).json();
    let copies: Vec<(&str, PathBuf)> = ["raw", "bin", "vhdx", "qcow2"]
        .into_iter()
        .map(|f| (f, t.join(&format!("copy.{f}"))))
        .collect();
    for (format, dest) in &copies {
        ok(
            writer,
            &exe,
            &["copy", "--format", format, p(&before), p(dest)],
        );
    }

    ok(reader, &exe, &["verify", "--read-data", p(&repo)]);
    for (snap, expected) in [
        (jstr(&first, "/snapshot"), &before),
        (jstr(&second, "/snapshot"), &img),
        (jstr(&third, "/snapshot"), &raw),
    ] {
        let out = t.join(&format!("restored-{snap}"));
        ok(reader, &exe, &["restore", p(&repo), snap, p(&out)]);
        assert_same_file(&out, expected);
    }
    // The reader adds a snapshot of its own to the writer's repository.
    add_file(&t, &img, "added-by-reader", 10);
    let fourth = ok(reader, &exe, &["backup", "--json", p(&img), p(&repo)]).json();
    ok(writer, &exe, &["verify", "--read-data", p(&repo)]);
    let out = t.join("restored-fourth");
    ok(
        writer,
        &exe,
        &["restore", p(&repo), jstr(&fourth, "/snapshot"), p(&out)],
    );
    assert_same_file(&out, &img);

    for (format, dest) in &copies {
        ok(reader, &exe, &["verify", p(dest)]);
        let back = t.join(&format!("back.{format}"));
        ok(reader, &exe, &["restore", p(dest), p(&back)]);
        assert_same_file(&back, &before);
        ok(reader, &exe, &["copy", "--update", p(&img), p(dest)]);
        ok(writer, &exe, &["verify", p(dest)]);
        let again = t.join(&format!("again.{format}"));
        ok(writer, &exe, &["restore", p(dest), p(&again)]);
        assert_same_file(&again, &img);
    }
}

#[test]
fn windows_reads_an_encrypted_repository_and_copies_of_the_linux_build() {
    across(System::Linux, System::Windows, true);
}

#[test]
fn windows_reads_a_plain_repository_and_copies_of_the_linux_build() {
    across(System::Linux, System::Windows, false);
}

#[test]
fn linux_reads_an_encrypted_repository_and_copies_of_the_windows_build() {
    across(System::Windows, System::Linux, true);
}

#[test]
fn linux_reads_a_plain_repository_and_copies_of_the_windows_build() {
    across(System::Windows, System::Linux, false);
}
