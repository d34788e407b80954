//! Tests of the S3 backend against a real Garage server (single node on loopback, started per
//! test). Without a `garage` binary (`GARAGE`, else /work/garage-build/root/bin/garage, else
//! `garage` on PATH) they are skipped with a message, unless `CI` is set: then they fail.

use super::super::retry;
use super::*;
use crate::repo::address::{Location, parse};
use std::path::Path;
use std::process::{Child, Command, Stdio};

const BUCKET: &str = "volback";

/// A single-node Garage with one bucket and one key, killed when dropped.
struct Garage {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    key_id: String,
    secret: String,
}

fn garage_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("GARAGE") {
        return Some(PathBuf::from(p));
    }
    let built = Path::new("/work/garage-build/root/bin/garage");
    if built.is_file() {
        return Some(built.to_path_buf());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("garage"))
            .find(|p| p.is_file())
    })
}

/// Ports P, P+1 (RPC) and P+3 (admin) free on 127.0.0.1.
fn free_ports() -> u16 {
    for _ in 0..50 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        if p > 65000 {
            continue;
        }
        let others: Vec<_> = [1, 3]
            .iter()
            .map(|d| std::net::TcpListener::bind(("127.0.0.1", p + d)))
            .collect();
        if others.iter().all(|o| o.is_ok()) {
            return p;
        }
    }
    panic!("no free ports for garage");
}

impl Garage {
    /// A running server, or `None` (skip) when there is no binary outside CI.
    fn start() -> Option<Garage> {
        let Some(bin) = garage_binary() else {
            assert!(
                std::env::var_os("CI").is_none(),
                "no garage binary (set GARAGE): the S3 tests cannot run in CI without it"
            );
            eprintln!("skipped: no garage binary (set GARAGE=/path/to/garage)");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let port = free_ports();
        let secret: [u8; 32] = crate::crypto::random_bytes().unwrap();
        let d = dir.path().display();
        let config = format!(
            "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"lmdb\"\n\
             replication_factor = 1\ncompression_level = \"none\"\n\
             rpc_bind_addr = \"127.0.0.1:{}\"\nrpc_public_addr = \"127.0.0.1:{}\"\n\
             rpc_secret = \"{}\"\n[s3_api]\ns3_region = \"garage\"\n\
             api_bind_addr = \"127.0.0.1:{port}\"\nroot_domain = \".s3.garage.localhost\"\n\
             [admin]\napi_bind_addr = \"127.0.0.1:{}\"\n",
            port + 1,
            port + 1,
            hex::encode(secret),
            port + 3
        );
        std::fs::write(dir.path().join("garage.toml"), config).unwrap();
        let mut g = Garage {
            bin,
            dir,
            port,
            child: None,
            key_id: String::new(),
            secret: String::new(),
        };
        g.spawn();
        let node = g.cli(&["node", "id", "-q"]);
        let node = node.trim().split('@').next().unwrap().to_string();
        g.cli(&["layout", "assign", "-z", "dc1", "-c", "1G", &node]);
        g.cli(&["layout", "apply", "--version", "1"]);
        g.cli(&["bucket", "create", BUCKET]);
        let key = g.cli(&["key", "create", "test-key"]);
        let field = |label: &str| {
            key.lines()
                .find(|l| l.contains(label))
                .and_then(|l| l.split_whitespace().last())
                .unwrap_or_else(|| panic!("no {label} in {key}"))
                .to_string()
        };
        g.key_id = field("Key ID");
        g.secret = field("Secret key");
        g.cli(&[
            "bucket", "allow", "--read", "--write", "--owner", BUCKET, "--key", "test-key",
        ]);
        Some(g)
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("garage.toml")
    }

    /// Starts the server process (again, on the same port and directories) and waits until it
    /// answers `status`.
    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .unwrap();
        let mut cmd = Command::new(&self.bin);
        cmd.arg("-c")
            .arg(self.config())
            .arg("server")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.child = Some(cmd.spawn().unwrap());
        for _ in 0..150 {
            let ok = Command::new(&self.bin)
                .arg("-c")
                .arg(self.config())
                .arg("status")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("garage did not start: see {}", self.dir.path().display());
    }

    fn cli(&self, args: &[&str]) -> String {
        for attempt in 0..50 {
            let out = Command::new(&self.bin)
                .arg("-c")
                .arg(self.config())
                .args(args)
                .output()
                .unwrap();
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).into_owned();
            }
            if attempt == 49 {
                panic!("garage {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        unreachable!()
    }

    fn pid(&self) -> String {
        self.child.as_ref().unwrap().id().to_string()
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.pid()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn location(&self, prefix: &str) -> S3Location {
        self.location_of(BUCKET, prefix)
    }

    fn location_of(&self, bucket: &str, prefix: &str) -> S3Location {
        let text = format!("s3:http://127.0.0.1:{}/{bucket}/{prefix}", self.port);
        match parse(Path::new(&text)).unwrap() {
            Location::S3(l) => l,
            other => panic!("{other:?}"),
        }
    }

    fn options(&self) -> S3Options {
        S3Options {
            credentials: Some((self.key_id.clone(), self.secret.clone())),
            region: Some("garage".into()),
            policy: Policy {
                budget: Duration::from_secs(60),
            },
            ..S3Options::default()
        }
    }

    fn backend(&self, prefix: &str) -> S3 {
        S3::new(&self.location(prefix), self.options()).unwrap()
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            // A stopped server must be able to die.
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
        }
        self.kill();
    }
}

fn io_kind(e: &Error) -> ErrorKind {
    match e {
        Error::Io { source, .. } | Error::IoAt { source, .. } => source.kind(),
        other => panic!("not an I/O error: {other:?}"),
    }
}

/// The whole message of `e`, also printed (run with --nocapture to read the messages users see).
fn text(e: &Error) -> String {
    let t = crate::error::chain(e);
    eprintln!("message: {t}");
    t
}

#[test]
fn objects_are_put_read_listed_and_deleted() {
    let Some(g) = Garage::start() else { return };
    let s3 = g.backend("repo/one");
    assert_eq!(
        s3.display_path("index/ab"),
        PathBuf::from(format!(
            "s3:http://127.0.0.1:{}/volback/repo/one/index/ab",
            g.port
        ))
    );
    assert_eq!(
        s3.location(),
        format!("s3:http://127.0.0.1:{}/volback/repo/one", g.port)
    );
    // Nothing there yet.
    assert_eq!(s3.head("config").unwrap(), None);
    let mut n = 0;
    s3.list("index", &mut |_| {
        n += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!(n, 0);
    let e = s3.get("config", 100, "config").unwrap_err();
    assert_eq!(io_kind(&e), ErrorKind::NotFound, "{}", text(&e));
    assert!(!retry::is_transient(&e));

    let config: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
    s3.put("config", &config, PutMode::Overwrite).unwrap();
    s3.put("index/aa", b"one", PutMode::ContentNamed).unwrap();
    s3.put("index/bb", b"two!", PutMode::ContentNamed).unwrap();
    s3.put("index/.tmp-x", b"tmp", PutMode::ContentNamed)
        .unwrap();
    s3.put("index/deeper/cc", b"deep", PutMode::ContentNamed)
        .unwrap();
    assert_eq!(s3.get("config", 5000, "config").unwrap(), config);
    let meta = s3.head("config").unwrap().unwrap();
    assert_eq!((meta.name.as_str(), meta.size), ("config", 5000));
    assert!(meta.modified.is_some());

    // The limit is checked before the body is read.
    let e = s3.get("config", 4999, "the config").unwrap_err();
    assert!(
        matches!(&e, Error::Corrupt { what, .. } if what == "the config"),
        "{e}"
    );

    let mut buf = [0u8; 10];
    s3.get_range("config", 4990, &mut buf).unwrap();
    assert_eq!(&buf[..], &config[4990..]);
    let e = s3.get_range("config", 4991, &mut buf).unwrap_err();
    assert_eq!(io_kind(&e), ErrorKind::UnexpectedEof, "{}", text(&e));
    let e = s3.get_range("config", 6000, &mut buf).unwrap_err();
    assert_eq!(io_kind(&e), ErrorKind::UnexpectedEof, "{}", text(&e));
    let e = s3.get_range("nothing", 0, &mut buf).unwrap_err();
    assert_eq!(io_kind(&e), ErrorKind::NotFound, "{}", text(&e));

    let mut listed = Vec::new();
    s3.list("index", &mut |m| {
        listed.push((m.name, m.size, m.modified.is_some()));
        Ok(())
    })
    .unwrap();
    listed.sort();
    assert_eq!(
        listed,
        vec![
            ("index/aa".to_string(), 3, true),
            ("index/bb".to_string(), 4, true)
        ]
    );
    let mut top = Vec::new();
    s3.list("", &mut |m| {
        top.push(m.name);
        Ok(())
    })
    .unwrap();
    assert_eq!(top, vec!["config".to_string()]);
    // Another repository in the same bucket sees none of it.
    let other = g.backend("repo/two");
    assert_eq!(other.head("config").unwrap(), None);

    assert!(s3.delete("index/aa").unwrap());
    assert!(!s3.delete("index/aa").unwrap());
    assert_eq!(s3.head("index/aa").unwrap(), None);
    // Errors of `f` stop the listing and come back as they are.
    let e = s3
        .list("index", &mut |_| Err(Error::internal("test", "stop")))
        .unwrap_err();
    assert!(matches!(e, Error::Internal { .. }), "{e}");
    assert!(s3.put("../x", b"", PutMode::Overwrite).is_err());
    s3.sweep_stale().unwrap();
    assert!(!s3.capabilities().file_locks);
}

#[test]
fn listings_cross_pages() {
    let Some(g) = Garage::start() else { return };
    let s3 = g.backend("many");
    const N: usize = 1100;
    std::thread::scope(|scope| {
        for t in 0..8 {
            let s3 = &s3;
            scope.spawn(move || {
                for i in (t..N).step_by(8) {
                    let name = format!("index/{i:05}");
                    s3.put(&name, name.as_bytes(), PutMode::ContentNamed)
                        .unwrap();
                }
            });
        }
    });
    let mut names = Vec::new();
    s3.list("index", &mut |m| {
        assert_eq!(m.size, 11);
        names.push(m.name);
        Ok(())
    })
    .unwrap();
    names.sort();
    let expected: Vec<String> = (0..N).map(|i| format!("index/{i:05}")).collect();
    assert_eq!(names, expected);
    // Through the retry wrapper too (it collects the listing first).
    let r = Retry::new(s3.clone(), Policy::default());
    let mut n = 0;
    r.list("index", &mut |_| {
        n += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!(n, N);
}

#[test]
fn damaged_objects_are_set_aside() {
    let Some(g) = Garage::start() else { return };
    let s3 = g.backend("aside");
    assert_eq!(s3.set_aside("packs/ab/x").unwrap(), None);
    s3.put("packs/ab/x", b"first", PutMode::ContentNamed)
        .unwrap();
    assert_eq!(
        s3.set_aside("packs/ab/x").unwrap().as_deref(),
        Some("packs/ab/x.bad")
    );
    s3.put("packs/ab/x", b"second", PutMode::ContentNamed)
        .unwrap();
    assert_eq!(
        s3.set_aside("packs/ab/x").unwrap().as_deref(),
        Some("packs/ab/x.bad.1")
    );
    assert_eq!(s3.head("packs/ab/x").unwrap(), None);
    assert_eq!(s3.get("packs/ab/x.bad", 100, "x").unwrap(), b"first");
    assert_eq!(s3.get("packs/ab/x.bad.1", 100, "x").unwrap(), b"second");
    // A repository at the top of the bucket sees the other one as a "directory" only.
    let top = g.backend("");
    let mut names = Vec::new();
    top.list("", &mut |m| {
        names.push(m.name);
        Ok(())
    })
    .unwrap();
    assert!(names.is_empty(), "{names:?}");
    top.list("aside/packs/ab", &mut |m| {
        names.push(m.name);
        Ok(())
    })
    .unwrap();
    names.sort();
    assert_eq!(names, ["aside/packs/ab/x.bad", "aside/packs/ab/x.bad.1"]);
}

#[test]
fn staged_objects_are_readable_while_uploading_and_the_barrier_waits() {
    let Some(g) = Garage::start() else { return };
    let s3 = S3::new(
        &g.location("staged"),
        S3Options {
            max_inflight: 2,
            ..g.options()
        },
    )
    .unwrap();
    let pack = |i: u8| -> Vec<u8> { (0..3_000_000u32).map(|n| (n as u8) ^ i).collect() };
    let mut staged = s3.stage().unwrap();
    assert!(staged.is_empty());
    staged.write(&pack(1)[..1000]).unwrap();
    staged.write(&pack(1)[1000..]).unwrap();
    assert_eq!(staged.len(), 3_000_000);

    // While the server is stopped, no upload can complete: the object is read from memory.
    g.signal("-STOP");
    staged.finish("packs/01/one").unwrap();
    assert_eq!(s3.get("packs/01/one", 1 << 30, "pack").unwrap(), pack(1));
    let mut buf = vec![0u8; 100];
    s3.get_range("packs/01/one", 2_999_900, &mut buf).unwrap();
    assert_eq!(buf, pack(1)[2_999_900..]);
    let e = s3
        .get_range("packs/01/one", 2_999_901, &mut buf)
        .unwrap_err();
    assert_eq!(io_kind(&e), ErrorKind::UnexpectedEof);
    assert_eq!(s3.head("packs/01/one").unwrap().unwrap().size, 3_000_000);
    let e = s3.get("packs/01/one", 100, "pack").unwrap_err();
    assert!(matches!(e, Error::Corrupt { .. }), "{e}");
    g.signal("-CONT");

    for i in 2..6u8 {
        let mut st = s3.stage().unwrap();
        st.write(&pack(i)).unwrap();
        st.finish(&format!("packs/0{i}/p")).unwrap();
    }
    s3.barrier().unwrap();
    // On the server now: a fresh backend (no upload state) reads them.
    let fresh = g.backend("staged");
    assert_eq!(fresh.get("packs/01/one", 1 << 30, "pack").unwrap(), pack(1));
    for i in 2..6u8 {
        assert_eq!(
            fresh
                .get(&format!("packs/0{i}/p"), 1 << 30, "pack")
                .unwrap(),
            pack(i)
        );
    }
    let mut too_big = s3.stage().unwrap();
    assert!(too_big.write(&vec![0u8; MAX_STAGED as usize + 1]).is_err());
}

#[test]
fn upload_failures_surface_at_the_barrier() {
    let Some(g) = Garage::start() else { return };
    let s3 = S3::new(
        &g.location("fail"),
        S3Options {
            credentials: Some((g.key_id.clone(), "wrong".into())),
            ..g.options()
        },
    )
    .unwrap();
    let mut st = s3.stage().unwrap();
    st.write(b"data").unwrap();
    st.finish("packs/00/x").unwrap();
    let e = s3.barrier().unwrap_err();
    assert_eq!(io_kind(&e), ErrorKind::PermissionDenied, "{e}");
    // Reported once.
    s3.barrier().unwrap();
}

#[test]
fn a_restarted_server_is_retried_and_a_stalled_one_times_out() {
    let Some(mut g) = Garage::start() else { return };
    let s3 = S3::new(
        &g.location("restart"),
        S3Options {
            idle_timeout: Duration::from_secs(2),
            ..g.options()
        },
    )
    .unwrap();
    s3.put("config", b"hello", PutMode::Overwrite).unwrap();

    // Stalled: the request fails as a timeout, a transient error; a large upload too (it
    // gets the idle time plus its size at the minimum rate: 2 s + 4 s here).
    g.signal("-STOP");
    let e = s3.get("config", 100, "config").unwrap_err();
    let big = s3
        .put("big", &vec![7u8; BULK_BODY + 1], PutMode::ContentNamed)
        .unwrap_err();
    g.signal("-CONT");
    assert_eq!(io_kind(&big), ErrorKind::TimedOut, "{}", text(&big));
    assert!(retry::is_transient(&big));
    assert_eq!(io_kind(&e), ErrorKind::TimedOut, "{}", text(&e));
    assert!(retry::is_transient(&e));
    assert!(text(&e).contains("did not answer"), "{}", text(&e));

    // Down: refused, transient, naming the endpoint.
    g.kill();
    let e = s3.get("config", 100, "config").unwrap_err();
    assert_eq!(io_kind(&e), ErrorKind::ConnectionRefused, "{}", text(&e));
    assert!(retry::is_transient(&e));
    assert!(
        text(&e).contains(&format!("cannot reach http://127.0.0.1:{}", g.port)),
        "{}",
        text(&e)
    );

    // Retried until the server is back (budget 60 s; the restart takes about a second).
    let retrying = Retry::new(s3.clone(), g.options().policy);
    std::thread::scope(|scope| {
        let reader = scope.spawn(|| retrying.get("config", 100, "config"));
        g.spawn();
        assert_eq!(reader.join().unwrap().unwrap(), b"hello");
    });
    retrying
        .put("config", b"again", PutMode::Overwrite)
        .unwrap();
    assert_eq!(retrying.get("config", 100, "config").unwrap(), b"again");
}

#[test]
fn wrong_credentials_bucket_region_and_endpoint_are_named() {
    let Some(g) = Garage::start() else { return };
    let retrying = |loc: S3Location, options: S3Options| {
        Retry::new(
            S3::new(&loc, options).unwrap(),
            Policy {
                budget: Duration::from_secs(60),
            },
        )
    };
    // Wrong secret, then unknown key: refused at once (not retried for 60 s).
    for creds in [
        (g.key_id.clone(), "0".repeat(64)),
        ("GK0123456789abcdef01234567".to_string(), "0".repeat(64)),
    ] {
        let b = retrying(
            g.location("x"),
            S3Options {
                credentials: Some(creds),
                ..g.options()
            },
        );
        for e in [
            b.get("config", 10, "config").unwrap_err(),
            b.head("config").unwrap_err(),
            b.put("config", b"x", PutMode::Overwrite).unwrap_err(),
        ] {
            assert_eq!(io_kind(&e), ErrorKind::PermissionDenied, "{}", text(&e));
            assert!(text(&e).contains("AWS_ACCESS_KEY_ID"), "{}", text(&e));
            assert!(!text(&e).contains("gave up"), "{}", text(&e));
        }
    }

    // Missing bucket: named with the endpoint, by every operation.
    let b = retrying(g.location_of("no-such-bucket", "p"), g.options());
    let want = format!(
        "bucket no-such-bucket does not exist at http://127.0.0.1:{}",
        g.port
    );
    for e in [
        b.get("config", 10, "config").unwrap_err(),
        b.head("config").unwrap_err(),
        b.list("index", &mut |_| Ok(())).unwrap_err(),
        b.put("config", b"x", PutMode::Overwrite).unwrap_err(),
        b.delete("config").unwrap_err(),
    ] {
        assert!(text(&e).contains(&want), "{}", text(&e));
        assert!(!retry::is_transient(&e));
    }

    // Wrong region.
    let b = retrying(
        g.location("x"),
        S3Options {
            region: Some("us-east-1".into()),
            ..g.options()
        },
    );
    let e = b.get("config", 10, "config").unwrap_err();
    assert!(text(&e).contains("region us-east-1"), "{}", text(&e));
    assert!(text(&e).contains("AWS_REGION"), "{}", text(&e));

    // Nothing listens: refused, retried within the budget, then named.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let loc = match parse(Path::new(&format!("s3:http://127.0.0.1:{port}/volback"))).unwrap() {
        Location::S3(l) => l,
        other => panic!("{other:?}"),
    };
    let b = Retry::new(
        S3::new(&loc, g.options()).unwrap(),
        Policy {
            budget: Duration::from_secs(1),
        },
    );
    let e = b.get("config", 10, "config").unwrap_err();
    assert_eq!(io_kind(&e), ErrorKind::ConnectionRefused, "{}", text(&e));
    assert!(
        text(&e).contains(&format!("cannot reach http://127.0.0.1:{port}")),
        "{}",
        text(&e)
    );
    assert!(text(&e).contains("gave up after"), "{}", text(&e));
}

#[test]
fn profile_regions_are_read() {
    let text = "[default]\nregion = eu-west-3\n\n[profile work]\n# c\nregion=us-west-2\n\
                output = json\n[other]\nregion = x\n";
    assert_eq!(
        profile_region(text, "default").as_deref(),
        Some("eu-west-3")
    );
    assert_eq!(profile_region(text, "work").as_deref(), Some("us-west-2"));
    assert_eq!(profile_region(text, "none"), None);
}

#[test]
fn error_fields_are_found() {
    let m = "S3Error { code: \"NoSuchBucket\", message: \"Bucket not found: x\", resource: \"\", \
             request_id: \"\" }";
    assert_eq!(quoted_field(m, "code").as_deref(), Some("NoSuchBucket"));
    assert_eq!(
        quoted_field(m, "message").as_deref(),
        Some("Bucket not found: x")
    );
    assert_eq!(quoted_field("nothing", "code"), None);
    assert_eq!(
        http_status("Unexpected ... response: Parts { status: 503, version: HTTP/1.1"),
        Some(503)
    );
    assert_eq!(http_status("no answer"), None);
}

#[test]
fn idle_timeout_from_the_environment_value() {
    assert_eq!(parse_idle_timeout(None).unwrap(), IDLE_TIMEOUT);
    assert_eq!(
        parse_idle_timeout(Some(" 3 ")).unwrap(),
        Duration::from_secs(3)
    );
    for bad in ["", "0", "-1", "1.5", "x", "3601"] {
        let e = parse_idle_timeout(Some(bad)).unwrap_err().to_string();
        assert!(e.contains(TIMEOUT_VAR), "{e}");
    }
}
