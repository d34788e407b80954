//! Repositories on object storage: the commands against a real Garage S3 server started by
//! the test (`garage.rs`), judged by the bytes they give back.

use crate::garage::Garage;
use crate::util::{
    self, Run, TestDir, jstr, ju64, p, random_file, require_root_and_loop, sha256_file, write_at,
};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const MIB: u64 = 1 << 20;

/// A single-node server, or `None` (skipped; a failure when `CI` is set).
pub(crate) fn server() -> Option<Garage> {
    let g = Garage::single();
    if g.is_none() {
        util::require(Some(
            "a garage 2.5.0 binary (scripts/garage.sh install)".into(),
        ));
    }
    g
}

/// The address of the repository `name` in `g`'s bucket.
pub(crate) fn address(g: &Garage, name: &str) -> String {
    format!("s3:{}/{}/{name}", g.endpoint(), g.bucket())
}

/// `volback ARGS` as a client of `g` (its credentials), with its metadata cache in `cache`.
pub(crate) fn vb_command(g: &Garage, cache: &Path, args: &[&str]) -> Command {
    let mut c = util::volback_command(args);
    c.envs(g.env());
    c.env("VOLBACK_CACHE_DIR", cache);
    c.env("VOLBACK_RETRY_SECS", "20");
    c
}

pub(crate) fn vb(g: &Garage, cache: &Path, args: &[&str]) -> Run {
    let r = util::run_command(vb_command(g, cache, args), &args.join(" "));
    assert!(!r.stderr.contains("panicked"), "volback panicked: {r:?}");
    r
}

pub(crate) fn vb_ok(g: &Garage, cache: &Path, args: &[&str]) -> Run {
    vb(g, cache, args).expect_code(0)
}

/// The keys of the objects under `prefix` in `g`'s bucket (first 1000).
pub(crate) fn keys(g: &Garage, prefix: &str) -> Vec<String> {
    let url = format!(
        "{}/{}?list-type=2&prefix={}",
        g.endpoint(),
        g.bucket(),
        prefix.replace('/', "%2F")
    );
    let mut c = Command::new("curl");
    c.args(g.curl_auth()).arg(&url);
    let r = util::run_command(c, &format!("curl {url}"));
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(r.stdout.contains("<ListBucketResult"), "{}", r.stdout);
    r.stdout
        .split("<Key>")
        .skip(1)
        .filter_map(|s| s.split("</Key>").next())
        .map(str::to_string)
        .collect()
}

/// Full and incremental backups into a bucket restore bit for bit, `verify --read-data`
/// finds nothing, the incremental stores only what changed, `restore --only-changed` brings
/// a changed target back, and `init` refuses a prefix that holds a repository.
#[test]
fn s3_full_incremental_restore_verify() {
    let Some(g) = server() else { return };
    let t = TestDir::new();
    let cache = t.join("cache");
    let src = t.join("src.img");
    random_file(&src, 48 * MIB, 1);
    let repo = address(&g, "roundtrip");
    vb_ok(&g, &cache, &["init", &repo]);
    let first = vb_ok(&g, &cache, &["backup", "--json", p(&src), &repo]).json();
    let id1 = jstr(&first, "/snapshot").to_string();
    write_at(&src, 5 * MIB, &util::Rng::new(2).bytes(MIB as usize));
    let sha2 = sha256_file(&src);
    let second = vb_ok(&g, &cache, &["backup", "--json", p(&src), &repo]).json();
    let id2 = jstr(&second, "/snapshot").to_string();
    assert_eq!(jstr(&second, "/parent"), id1, "{second}");
    assert!(
        ju64(&second, "/stats/new_bytes") <= 2 * MIB,
        "the incremental stores only what changed: {second}"
    );
    let out = t.join("out.img");
    vb_ok(&g, &cache, &["restore", &repo, &id2, p(&out)]);
    assert_eq!(sha256_file(&out), sha2);
    // The first snapshot, onto the second's restore: only the changed blocks are written.
    random_file(&src, 48 * MIB, 1);
    let sha1 = sha256_file(&src);
    vb_ok(
        &g,
        &cache,
        &["restore", "--only-changed", &repo, &id1, p(&out)],
    )
    .stdout_has(&["1.0 MiB written"]);
    assert_eq!(sha256_file(&out), sha1);
    vb_ok(&g, &cache, &["verify", "--read-data", &repo]).stdout_has(&["no problems"]);
    let list = vb_ok(&g, &cache, &["snapshots", "--json", &repo]).json();
    assert_eq!(list.as_array().map(Vec::len), Some(2), "{list}");
    // Without the cache the same answers come from the server.
    let cold = t.join("cold");
    let list2 = vb_ok(&g, &cold, &["snapshots", "--json", &repo]).json();
    assert_eq!(list, list2);
    vb(&g, &cache, &["init", &repo])
        .expect_code(1)
        .stderr_has(&["already holds a repository"]);
    // Nothing of the repository went anywhere but the bucket.
    assert!(!Path::new("s3:http:").exists());
}

/// A damaged pack object is found by `verify --read-data`, named, and stops a restore.
#[test]
fn s3_damaged_pack_object_is_found_and_stops_restore() {
    let Some(g) = server() else { return };
    let t = TestDir::new();
    let cache = t.join("cache");
    let src = t.join("src.img");
    random_file(&src, 8 * MIB, 3);
    let repo = address(&g, "damage");
    vb_ok(&g, &cache, &["init", &repo]);
    let b = vb_ok(&g, &cache, &["backup", "--json", p(&src), &repo]).json();
    let id = jstr(&b, "/snapshot").to_string();
    let packs = keys(&g, "damage/packs/");
    assert!(!packs.is_empty(), "no pack objects listed");
    let pack = &packs[0];
    let file = t.join("pack");
    let mut bytes = download(&g, pack, &file);
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&file, &bytes).unwrap();
    assert_eq!(g.curl(0, pack, Some(&file)).code, Some(0));
    let r = vb(&g, &cache, &["verify", "--read-data", &repo]);
    assert_ne!(r.code, Some(0), "{r:?}");
    let name = pack.rsplit('/').next().unwrap_or_default();
    r.stdout_has(&[&name[..12]]);
    let out = t.join("out.img");
    let r = vb(&g, &cache, &["restore", &repo, &id, p(&out)]);
    assert_ne!(
        r.code,
        Some(0),
        "a restore over a damaged pack must fail: {r:?}"
    );
}

/// Object `key` of `g`'s bucket, also written to `file`.
fn download(g: &Garage, key: &str, file: &Path) -> Vec<u8> {
    let url = format!("{}/{}/{key}", g.endpoint(), g.bucket());
    let status = Command::new("curl")
        .args(g.curl_auth())
        .args(["-o", p(file), &url])
        .status()
        .expect("run curl");
    assert!(status.success(), "curl GET {url}");
    std::fs::read(file).expect("read the downloaded object")
}

/// A backup killed with SIGKILL after a checkpoint leaves a journal in the bucket; the next
/// run resumes it, and the snapshot restores bit for bit.
#[test]
fn s3_backup_killed_resumes() {
    let Some(g) = server() else { return };
    let t = TestDir::new();
    let cache = t.join("cache");
    let src = t.join("src.img");
    let size = 160 * MIB;
    random_file(&src, size, 4);
    let sha = sha256_file(&src);
    let repo = address(&g, "killed");
    vb_ok(&g, &cache, &["init", &repo]);
    let mut child = vb_command(
        &g,
        &cache,
        &["backup", "--checkpoint-secs", "0.2", p(&src), &repo],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .expect("spawn backup");
    // Killed once a batch is in the journal (a segment after the header).
    let mut killed = false;
    for _ in 0..6000 {
        if child.try_wait().expect("try_wait").is_some() {
            break;
        }
        let journal = keys(&g, "killed/journals/");
        if journal.iter().any(|k| k.contains(".journal.")) {
            child.kill().expect("SIGKILL");
            killed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.wait();
    // The killed run's lease names a process of this host that is gone: no wait for its
    // expiry.
    let last = vb_ok(&g, &cache, &["backup", "--json", p(&src), &repo]).json();
    if killed {
        assert_eq!(last["resumed"], true, "{last}");
        assert!(ju64(&last, "/bytes_read") < size, "{last}");
    } else {
        eprintln!("the backup finished before a checkpoint was seen: resume not exercised");
    }
    let out = t.join("out.img");
    vb_ok(
        &g,
        &cache,
        &["restore", &repo, jstr(&last, "/snapshot"), p(&out)],
    );
    assert_eq!(sha256_file(&out), sha);
    assert!(keys(&g, "killed/journals/").is_empty(), "journal left");
    vb_ok(&g, &cache, &["verify", "--read-data", &repo]).stdout_has(&["no problems"]);
}

/// Wrong credentials, a missing bucket and an endpoint where nothing listens are errors that
/// name the problem, within the retry budget.
#[test]
fn s3_wrong_credentials_missing_bucket_and_endpoint_are_named() {
    let Some(g) = server() else { return };
    let t = TestDir::new();
    let cache = t.join("cache");
    let repo = address(&g, "faults");
    let mut c = vb_command(&g, &cache, &["init", &repo]);
    c.env("AWS_SECRET_ACCESS_KEY", "0".repeat(64));
    let r = util::run_command(c, "init with a wrong secret");
    assert_ne!(r.code, Some(0));
    r.stderr_has(&["AWS_SECRET_ACCESS_KEY"]);
    let missing = format!("s3:{}/no-such-bucket/x", g.endpoint());
    vb(&g, &cache, &["init", &missing])
        .expect_code(1)
        .stderr_has(&["no-such-bucket", "does not exist"]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let nowhere = format!("s3:http://127.0.0.1:{port}/volback/x");
    let mut c = vb_command(&g, &cache, &["snapshots", &nowhere]);
    c.env("VOLBACK_RETRY_SECS", "2");
    let r = util::run_command(c, "snapshots at a closed port");
    assert_ne!(r.code, Some(0));
    r.stderr_has(&["cannot reach", &port.to_string()]);
}

/// A snapshot in a bucket is served over NBD and read by `qemu-img`, and an ext4 volume
/// backed up into a bucket restores to a filesystem that `e2fsck -fn` finds clean.
#[test]
fn s3_ext4_restore_is_clean_and_nbd_serves_it() {
    if !require_root_and_loop() || !util::require_tools(&["qemu-img", "mkfs.ext4", "e2fsck"]) {
        return;
    }
    let Some(g) = server() else { return };
    let t = TestDir::new();
    let cache = t.join("cache");
    let img = t.join("ext4.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(64 * MIB))
        .expect("image");
    util::run_ok("mkfs.ext4", &["-q", "-F", p(&img)]);
    {
        let dev = util::Loop::attach(&img, false);
        let mnt = t.join("mnt");
        std::fs::create_dir_all(&mnt).expect("mount point");
        let _m = util::Mount::new(dev.path(), &mnt, None);
        random_file(&mnt.join("a.bin"), 5 * MIB, 7);
        std::fs::write(mnt.join("b.txt"), b"hello from a bucket").expect("write");
    }
    let sha = sha256_file(&img);
    let repo = address(&g, "ext4");
    vb_ok(&g, &cache, &["init", &repo]);
    let b = vb_ok(&g, &cache, &["backup", "--json", p(&img), &repo]).json();
    let id = jstr(&b, "/snapshot").to_string();
    let out = t.join("out.img");
    vb_ok(&g, &cache, &["restore", &repo, &id, p(&out)]);
    assert_eq!(sha256_file(&out), sha);
    util::run_ok("e2fsck", &["-fn", p(&out)]);
    // Served over NBD from the bucket, compared by qemu-img with the source.
    let mut serve = vb_command(&g, &cache, &["serve", "--nbd", "127.0.0.1:0", &repo, &id])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn serve");
    let mut line = String::new();
    let stdout = serve.stdout.take().expect("stdout");
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)
        .expect("read the server's URI");
    let url = line.trim().to_string();
    assert!(url.starts_with("nbd://"), "serve printed {line:?}");
    let r = util::run_program("qemu-img", &["compare", "-f", "raw", p(&img), &url]);
    let _ = serve.kill();
    let _ = serve.wait();
    assert_eq!(r.code, Some(0), "{r:?}");
}

/// `volback ARGS` on a "machine" of its own: a UTS namespace with host name `host`, talking
/// to `g` with the metadata cache `cache`.
fn on_machine(g: &Garage, host: &str, cache: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("unshare");
    c.args([
        "--uts",
        "sh",
        "-c",
        "hostname \"$0\" && exec \"$@\"",
        host,
        util::VOLBACK,
    ]);
    c.args(util::volback_args(args));
    for v in [
        "VOLBACK_PASSWORD",
        "VOLBACK_PASSWORD_FILE",
        "VOLBACK_PASSWORD_COMMAND",
    ] {
        c.env_remove(v);
    }
    c.envs(util::password_env(args));
    c.envs(g.env());
    c.env("VOLBACK_CACHE_DIR", cache);
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// An ext4 image of `size` bytes filled from `dir` (mkfs.ext4 -d: no mount needed).
fn ext4_image(path: &Path, dir: &Path, size: u64) {
    std::fs::File::create(path)
        .and_then(|f| f.set_len(size))
        .expect("image");
    util::run_ok("mkfs.ext4", &["-q", "-F", "-d", p(dir), p(path)]);
}

/// Three machines (UTS namespaces with their own host names, each talking to another node
/// of a three-node Garage cluster) back up at the same time into one repository: an
/// incremental of volume A, a clone of A on another machine, and another volume. The clone
/// stores almost nothing; every snapshot restores bit for bit and is a clean filesystem.
#[test]
fn s3_three_machines_back_up_at_once_into_one_bucket() {
    if !require_root_and_loop() || !util::require_tools(&["unshare", "mkfs.ext4", "e2fsck"]) {
        return;
    }
    let Some(g) = Garage::cluster3() else {
        util::require(Some(
            "a garage 2.5.0 binary (scripts/garage.sh install)".into(),
        ));
        return;
    };
    let t = TestDir::new();
    let (da, dc) = (t.join("files-a"), t.join("files-c"));
    for (d, seed) in [(&da, 11), (&dc, 12)] {
        std::fs::create_dir_all(d).expect("dir");
        for i in 0..4 {
            random_file(&d.join(format!("f{i}")), 3 * MIB, seed * 10 + i);
        }
    }
    let (a, b, c) = (t.join("a.img"), t.join("b.img"), t.join("c.img"));
    ext4_image(&a, &da, 48 * MIB);
    ext4_image(&c, &dc, 48 * MIB);
    std::fs::copy(&a, &b).expect("clone A");
    let repo = g.repo_url_of(0, "fleet");
    let cache = |m: &str| t.join(&format!("cache-{m}"));
    let run = |cmd: &mut Command, what: &str| -> serde_json::Value {
        let out = cmd.output().expect("run volback");
        assert!(
            out.status.success(),
            "{what}: {:?}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("JSON report")
    };
    // Machine 1 initialises the repository and backs up A.
    let out = on_machine(&g, "m1", &cache("m1"), &["init", &repo])
        .output()
        .expect("init");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first = run(
        &mut on_machine(&g, "m1", &cache("m1"), &["backup", "--json", p(&a), &repo]),
        "backup of A",
    );
    let stored_a = ju64(&first, "/stats/new_bytes_stored");
    // Then three at once, each through its own node.
    let jobs = [("m1", 0, &a), ("m2", 1, &b), ("m3", 2, &c)];
    let children: Vec<_> = jobs
        .iter()
        .map(|(m, node, src)| {
            let repo = g.repo_url_of(*node, "fleet");
            on_machine(&g, m, &cache(m), &["backup", "--json", p(src), &repo])
                .spawn()
                .expect("spawn backup")
        })
        .collect();
    let reports: Vec<serde_json::Value> = children
        .into_iter()
        .zip(jobs)
        .map(|(child, (m, _, _))| {
            let out = child.wait_with_output().expect("wait");
            assert!(
                out.status.success(),
                "backup on {m}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            serde_json::from_slice(&out.stdout).expect("JSON report")
        })
        .collect();
    let clone = ju64(&reports[1], "/stats/new_bytes_stored");
    assert!(
        clone * 100 <= stored_a,
        "the clone stored {clone} bytes, A {stored_a}: {}",
        reports[1]
    );
    // Every snapshot restores exactly, through any node.
    let snaps = [
        (&first, &a),
        (&reports[0], &a),
        (&reports[1], &b),
        (&reports[2], &c),
    ];
    for (i, (report, src)) in snaps.iter().enumerate() {
        let out = t.join(&format!("out{i}.img"));
        let repo = g.repo_url_of(i % 3, "fleet");
        let id = jstr(report, "/snapshot");
        let r = on_machine(&g, "m1", &cache("m1"), &["restore", &repo, id, p(&out)])
            .output()
            .expect("restore");
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        assert_eq!(sha256_file(&out), sha256_file(src), "snapshot {id}");
        util::run_ok("e2fsck", &["-fn", p(&out)]);
    }
    let v = on_machine(&g, "m2", &cache("m2"), &["verify", "--read-data", &repo])
        .output()
        .expect("verify");
    assert!(
        v.status.success() && String::from_utf8_lossy(&v.stdout).contains("no problems"),
        "{}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
}
