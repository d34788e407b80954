//! Repositories on object storage: what only S3 has (errors of credentials, buckets and
//! endpoints; several machines backing up into one bucket through a three-node cluster),
//! against a real Garage S3 server started by the test (`garage.rs`). The tests that run on
//! both a local directory and a bucket are in `backends.rs`.

use crate::garage::Garage;
use crate::util::{
    self, Run, TestDir, jstr, ju64, p, random_file, require_root_and_loop, sha256_file,
};
use std::path::Path;
use std::process::{Command, Stdio};

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

/// The keys of the objects under `prefix` in `g`'s bucket.
pub(crate) fn keys(g: &Garage, prefix: &str) -> Vec<String> {
    g.list(prefix).into_iter().map(|(k, _)| k).collect()
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
