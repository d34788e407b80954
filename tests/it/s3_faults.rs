//! Object storage under faults: a Garage server killed in the middle of a backup and started
//! again, and a TCP proxy between volback and Garage that drops connections and stalls them.
//! Every command either succeeds with correct data or fails with an error naming the server,
//! never hangs (a command still running after [`HANG_GUARD`] seconds fails the test), and
//! what is left in the bucket verifies clean and restores bit for bit.
//!
//! No assertion depends on timing: faults are triggered by what volback has done (a journal
//! segment in the bucket, a byte offset of the proxied traffic), and where an outcome could
//! go either way (a backup that finishes before the server is killed), both ways are checked.
//! The one outcome required of a duration is that a backup survives an outage when the server
//! was measured back at least 10 s before its 60 s retry budget ran out.

use crate::garage::Garage;
use crate::s3::{address, keys, server, vb_command, vb_ok};
use crate::util::{self, MIB, Run, TestDir, jstr, p, random_file, sha256_file, write_at};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Seconds after which a volback command is judged hung: killed, and the test fails. A guard,
/// not a speed check: every command here ends in well under a minute.
const HANG_GUARD: u64 = 300;

/// `volback ARGS` against `g` with the extra environment `env`, under the hang guard.
fn run(g: &Garage, cache: &Path, args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut c = vb_command(g, cache, args);
    c.envs(env.iter().copied());
    let r = util::run_with_limit(c, &args.join(" "), HANG_GUARD, false);
    assert!(!r.stderr.contains("panicked"), "volback panicked: {r:?}");
    r
}

/// Asserts that `r` failed as a network failure should: an exit code (not a signal) other
/// than 0, and a message naming the server at `port` and what went wrong with it.
fn assert_names_the_server(r: &Run, port: u16) {
    assert!(
        matches!(r.code, Some(c) if c != 0),
        "expected a failure: {r:?}"
    );
    assert!(!r.stderr.contains("panicked"), "volback panicked: {r:?}");
    r.stderr_has(&[&format!("127.0.0.1:{port}")]);
    let said = r.stderr.to_lowercase();
    assert!(
        ["cannot reach", "connection", "did not answer"]
            .iter()
            .any(|w| said.contains(w)),
        "the error does not say what happened to the server: {r:?}"
    );
}

/// A thread collecting one output of a child.
type Reader = JoinHandle<Vec<u8>>;

/// A volback command running in the background, its output collected; killed if dropped.
struct Running {
    cmd: String,
    child: Child,
    /// The threads reading its stdout and stderr.
    readers: Option<(Reader, Reader)>,
}

impl Running {
    fn spawn(mut c: Command, cmd: &str) -> Running {
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = c
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
        let mut out = child.stdout.take().expect("stdout pipe");
        let mut err = child.stderr.take().expect("stderr pipe");
        let readers = (
            std::thread::spawn(move || {
                let mut v = Vec::new();
                let _ = out.read_to_end(&mut v);
                v
            }),
            std::thread::spawn(move || {
                let mut v = Vec::new();
                let _ = err.read_to_end(&mut v);
                v
            }),
        );
        Running {
            cmd: cmd.to_string(),
            child,
            readers: Some(readers),
        }
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Waits for the end (at most [`HANG_GUARD`] seconds: then it is killed and the test
    /// fails).
    fn wait(mut self) -> Run {
        let deadline = Instant::now() + Duration::from_secs(HANG_GUARD);
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "`{}` was still running after {HANG_GUARD} s: it hangs",
                self.cmd
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let (out, err) = self.readers.take().expect("waited once");
        let r = Run {
            cmd: self.cmd.clone(),
            code: status.code(),
            stdout: String::from_utf8_lossy(&out.join().expect("stdout reader")).into_owned(),
            stderr: String::from_utf8_lossy(&err.join().expect("stderr reader")).into_owned(),
        };
        assert!(!r.stderr.contains("panicked"), "volback panicked: {r:?}");
        r
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How long the server stays down in [`server_killed_during_a_backup`].
#[derive(Clone, Copy, PartialEq)]
enum Outage {
    /// Until the backup has exited (which it must, its retry budget being 2 s).
    UntilTheBackupFails,
    /// One second, then a restart; the backup's retry budget is 60 s.
    Short,
}

/// A backup into a single Garage node whose server is killed with SIGKILL once the backup
/// has a journal segment in the bucket, and started again on the same port. Afterwards the
/// last snapshot restores bit for bit, no journal is left and `verify --read-data` finds
/// nothing wrong.
fn server_killed_during_a_backup(prefix: &str, outage: Outage) {
    let Some(mut g) = server() else { return };
    let t = TestDir::new();
    let cache = t.join("cache");
    let src = t.join("src.img");
    let size = 192 * MIB;
    random_file(&src, size, 21);
    let sha = sha256_file(&src);
    let repo = address(&g, prefix);
    vb_ok(&g, &cache, &["init", &repo]);
    let port: u16 = g
        .endpoint()
        .rsplit(':')
        .next()
        .and_then(|s| s.parse().ok())
        .expect("the server's port");
    let budget: u64 = match outage {
        Outage::UntilTheBackupFails => 2,
        Outage::Short => 60,
    };
    let args = [
        "backup",
        "--json",
        "--checkpoint-secs",
        "0.2",
        p(&src),
        &repo,
    ];
    let mut c = vb_command(&g, &cache, &args);
    c.env("VOLBACK_RETRY_SECS", budget.to_string());
    let mut backup = Running::spawn(c, &args.join(" "));
    // Killed once a batch is in the journal (a segment after the header): the backup has
    // stored packs and said so.
    let journals = format!("{prefix}/journals/");
    let mut killed = false;
    while backup.running() {
        if keys(&g, &journals).iter().any(|k| k.contains(".journal.")) {
            g.kill();
            killed = backup.running();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let down = Instant::now();
    let (r, outage_secs) = match outage {
        Outage::UntilTheBackupFails => {
            let r = backup.wait();
            g.restart();
            (r, down.elapsed().as_secs_f64())
        }
        Outage::Short => {
            std::thread::sleep(Duration::from_secs(1));
            g.restart();
            let outage_secs = down.elapsed().as_secs_f64();
            (backup.wait(), outage_secs)
        }
    };
    eprintln!(
        "{prefix}: server killed while the backup ran: {killed}; down {outage_secs:.1} s; \
         backup exit {:?}",
        r.code
    );
    let last = if r.code == Some(0) {
        if !killed {
            eprintln!("the backup finished before the server was killed: outage not exercised");
        }
        // A backup that cannot reach its server for longer than its budget cannot finish:
        // success means it had finished its last request before the kill.
        r.json()
    } else {
        eprintln!(
            "the backup failed (server down {outage_secs:.1} s, retry budget {budget} s):\n{}",
            r.stderr
        );
        assert!(killed, "the backup failed without a fault: {r:?}");
        assert_names_the_server(&r, port);
        // A short outage is survived: every request is retried for `budget` seconds, and
        // the server was back well within that (waits between tries are at most 8 s).
        if outage == Outage::Short && outage_secs + 10.0 < budget as f64 {
            panic!("the backup did not survive an outage of {outage_secs:.1} s: {r:?}");
        }
        let journal_left = keys(&g, &journals).iter().any(|k| k.contains(".journal"));
        let next = run(&g, &cache, &["backup", "--json", p(&src), &repo], &[])
            .expect_code(0)
            .json();
        if journal_left {
            assert_eq!(next["resumed"], true, "{next}");
        } else {
            eprintln!("the failed backup had written its snapshot: nothing to resume");
        }
        next
    };
    let out = t.join("out.img");
    run(
        &g,
        &cache,
        &["restore", &repo, jstr(&last, "/snapshot"), p(&out)],
        &[],
    )
    .expect_code(0);
    assert_eq!(sha256_file(&out), sha, "the restored image differs");
    assert!(keys(&g, &journals).is_empty(), "journal left");
    run(&g, &cache, &["verify", "--read-data", &repo], &[])
        .expect_code(0)
        .stdout_has(&["no problems"]);
}

/// The server is killed during a backup whose retry budget (2 s) is shorter than the
/// outage: the backup fails with an error naming the server, and after the restart the next
/// backup resumes it.
#[test]
fn s3_server_killed_during_backup_fails_clearly_then_resumes() {
    server_killed_during_a_backup("killed-long", Outage::UntilTheBackupFails);
}

/// The server is killed during a backup and started again a moment later, well within the
/// backup's retry budget (60 s): the backup finishes by itself.
#[test]
fn s3_server_killed_during_backup_and_restarted_is_survived() {
    server_killed_during_a_backup("killed-short", Outage::Short);
}

// ---------------------------------------------------------------------------------------------
// A faulty TCP proxy

/// What the proxy does to the connection that forwards a given byte.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    /// Forward up to that byte, then close both sides (FIN to both).
    Drop,
    /// Forward up to that byte, then nothing more in either direction, keeping both sides
    /// open (until the proxy is dropped).
    Stall,
}

struct Shared {
    /// Bytes forwarded so far, both directions, all connections.
    total: AtomicU64,
    /// Faults to come: (offset in `total`, what), each fired once by the connection that
    /// forwards that byte.
    plan: Mutex<Vec<(u64, Fault)>>,
    drops: AtomicU64,
    stalls: AtomicU64,
    /// What each fired fault interrupted (for the test's output).
    log: Mutex<Vec<String>>,
    connections: AtomicU64,
    stop: AtomicBool,
    /// Both sockets of every connection, to close them all at the end.
    sockets: Mutex<Vec<TcpStream>>,
}

impl Shared {
    /// The planned fault at an offset in `start..end`, if any (taken out of the plan).
    fn claim(&self, start: u64, end: u64) -> Option<(u64, Fault)> {
        let mut plan = self.plan.lock().expect("plan lock");
        let i = plan.iter().position(|(at, _)| (start..end).contains(at))?;
        Some(plan.remove(i))
    }

    /// Blocks until the proxy stops (a stalled connection forwards nothing until then).
    fn hold(&self) {
        while !self.stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// One proxied connection: the client's socket, the server's, whether it stalled, and the
/// last request line the client sent on it.
struct Conn {
    client: TcpStream,
    server: TcpStream,
    stalled: AtomicBool,
    request: Mutex<String>,
}

impl Conn {
    fn close(&self) {
        let _ = self.client.shutdown(Shutdown::Both);
        let _ = self.server.shutdown(Shutdown::Both);
    }
}

/// A TCP proxy on loopback to `127.0.0.1:upstream` that fires planned faults at byte offsets
/// of the traffic it forwards ([`Proxy::plan`]).
struct Proxy {
    port: u16,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl Proxy {
    fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let shared = Arc::new(Shared {
            total: AtomicU64::new(0),
            plan: Mutex::new(Vec::new()),
            drops: AtomicU64::new(0),
            stalls: AtomicU64::new(0),
            log: Mutex::new(Vec::new()),
            connections: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            sockets: Mutex::new(Vec::new()),
        });
        let s = Arc::clone(&shared);
        let accept = std::thread::spawn(move || {
            for client in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                // Nothing listening upstream: the client sees its connection closed.
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                s.connections.fetch_add(1, Ordering::SeqCst);
                let clones = (client.try_clone(), server.try_clone());
                let (Ok(c2), Ok(s2)) = clones else { continue };
                s.sockets.lock().expect("sockets lock").extend([c2, s2]);
                let conn = Arc::new(Conn {
                    client,
                    server,
                    stalled: AtomicBool::new(false),
                    request: Mutex::new(String::new()),
                });
                for upward in [true, false] {
                    let (conn, s) = (Arc::clone(&conn), Arc::clone(&s));
                    std::thread::spawn(move || pump(&conn, upward, &s));
                }
            }
        });
        Proxy {
            port,
            shared,
            accept: Some(accept),
        }
    }

    /// Plans `faults`: each at its offset, in bytes from now.
    fn plan(&self, faults: &[(u64, Fault)]) {
        let now = self.shared.total.load(Ordering::SeqCst);
        *self.shared.plan.lock().expect("plan lock") =
            faults.iter().map(|(at, f)| (now + at, *f)).collect();
    }

    /// Cancels the faults not yet fired; returns how many there were.
    fn clear(&self) -> usize {
        std::mem::take(&mut *self.shared.plan.lock().expect("plan lock")).len()
    }

    /// What the faults fired so far interrupted, and drains that list.
    fn take_log(&self) -> Vec<String> {
        std::mem::take(&mut *self.shared.log.lock().expect("log lock"))
    }

    /// Faults fired so far: (drops, stalls).
    fn fired(&self) -> (u64, u64) {
        (
            self.shared.drops.load(Ordering::SeqCst),
            self.shared.stalls.load(Ordering::SeqCst),
        )
    }

    fn forwarded(&self) -> u64 {
        self.shared.total.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for s in self.shared.sockets.lock().expect("sockets lock").iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
        // Wakes the accept loop.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(a) = self.accept.take() {
            let _ = a.join();
        }
    }
}

/// Forwards one direction of `conn` (client to server when `upward`), firing the planned
/// faults that fall in what it forwards.
fn pump(conn: &Conn, upward: bool, s: &Shared) {
    let (mut from, mut to) = if upward {
        (&conn.client, &conn.server)
    } else {
        (&conn.server, &conn.client)
    };
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = from.read(&mut buf);
        if conn.stalled.load(Ordering::SeqCst) {
            // Stalled (by the other direction): nothing is forwarded, not even a close.
            return s.hold();
        }
        let n = match n {
            Ok(0) | Err(_) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
        };
        if upward {
            note_request(conn, &buf[..n]);
        }
        let start = s.total.fetch_add(n as u64, Ordering::SeqCst);
        let fault = s.claim(start, start + n as u64);
        let keep = fault.map_or(n, |(at, _)| (at - start) as usize);
        if let Some((_, f)) = fault {
            let request = conn.request.lock().expect("request lock").clone();
            let dir = if upward { "sending" } else { "answering" };
            s.log
                .lock()
                .expect("log lock")
                .push(format!("{f:?} while {dir} {request}"));
        }
        if to.write_all(&buf[..keep]).is_err() {
            conn.close();
            return;
        }
        match fault {
            None => {}
            Some((_, Fault::Drop)) => {
                s.drops.fetch_add(1, Ordering::SeqCst);
                conn.close();
                return;
            }
            Some((_, Fault::Stall)) => {
                s.stalls.fetch_add(1, Ordering::SeqCst);
                conn.stalled.store(true, Ordering::SeqCst);
                return s.hold();
            }
        }
    }
}

/// Remembers the request line (`PUT /volback/… HTTP/1.1`) at the start of `chunk`, if any.
fn note_request(conn: &Conn, chunk: &[u8]) {
    const METHODS: [&[u8]; 5] = [b"GET ", b"PUT ", b"HEAD ", b"POST ", b"DELETE "];
    if METHODS.iter().any(|m| chunk.starts_with(m)) {
        let line = chunk.split(|b| *b == b'\r').next().unwrap_or_default();
        let line = String::from_utf8_lossy(line);
        // Without the query string (signatures).
        let line = line.split('?').next().unwrap_or_default();
        *conn.request.lock().expect("request lock") = line.trim().to_string();
    }
}

/// Through a proxy that drops and stalls connections (request timeouts of 3 s, retries for
/// 30 s): a full backup, an incremental and a restore each succeed with the right data or
/// fail with an error naming the server, none hangs; then, without faults, the repository
/// verifies clean and every snapshot restores bit for bit.
#[test]
fn s3_dropped_and_stalled_connections_are_retried_or_named() {
    use Fault::{Drop, Stall};
    let Some(g) = server() else { return };
    let upstream: u16 = g
        .endpoint()
        .rsplit(':')
        .next()
        .and_then(|s| s.parse().ok())
        .expect("the server's port");
    let proxy = Proxy::start(upstream);
    let t = TestDir::new();
    let cache = t.join("cache");
    let src = t.join("src.img");
    let size = 16 * MIB;
    random_file(&src, size, 31);
    let repo = format!("s3:http://127.0.0.1:{}/{}/proxied", proxy.port, g.bucket());
    let env = [
        ("VOLBACK_S3_TIMEOUT_SECS", "3"),
        ("VOLBACK_RETRY_SECS", "30"),
    ];
    // Small packs: a stalled upload is given up after the timeout plus its size at
    // 256 KiB/s (7 s for 1 MiB, 67 s for the default 16 MiB).
    run(&g, &cache, &["init", "--pack-size", "1M", &repo], &env).expect_code(0);
    // Snapshot id → sha256 of the source it was taken of.
    let mut snapshots: BTreeMap<String, String> = BTreeMap::new();
    let mut outcomes = Vec::new();

    // One step: `args` under the faults `plan` (byte offsets from its start: the first
    // request, then uploads or downloads of packs); on a failure, named
    // and then run again without faults. Returns the run that succeeded.
    let mut step = |what: &str, args: &[&str], plan: &[(u64, Fault)]| -> Run {
        let before = proxy.fired();
        proxy.plan(plan);
        let started = Instant::now();
        let r = run(&g, &cache, args, &env);
        let left = proxy.clear();
        let after = proxy.fired();
        let fired = (after.0 - before.0, after.1 - before.1);
        outcomes.push(format!(
            "{what}: exit {:?} after {:.1} s, {} drops and {} stalls fired: {:?}",
            r.code,
            started.elapsed().as_secs_f64(),
            fired.0,
            fired.1,
            proxy.take_log()
        ));
        if r.code == Some(0) {
            // It moved more than the last planned offset (at least the image's or the
            // change's size): every planned fault fired.
            assert_eq!(
                left, 0,
                "{what} succeeded without meeting its faults: {r:?}"
            );
            return r;
        }
        assert_names_the_server(&r, proxy.port);
        eprintln!(
            "{what} failed under faults (run again without):\n{}",
            r.stderr
        );
        run(&g, &cache, args, &env).expect_code(0)
    };

    let sha1 = sha256_file(&src);
    let full = step(
        "full backup",
        &["backup", "--json", p(&src), &repo],
        &[
            (200, Stall),
            (4 * MIB, Drop),
            (8 * MIB, Stall),
            (12 * MIB, Drop),
        ],
    )
    .json();
    snapshots.insert(jstr(&full, "/snapshot").to_string(), sha1.clone());

    write_at(&src, 3 * MIB, &util::Rng::new(32).bytes(4 * MIB as usize));
    let sha2 = sha256_file(&src);
    let incr = step(
        "incremental",
        &["backup", "--json", p(&src), &repo],
        &[(200, Drop), (MIB, Stall), (2 * MIB, Drop), (3 * MIB, Drop)],
    )
    .json();
    snapshots.insert(jstr(&incr, "/snapshot").to_string(), sha2.clone());

    let out = t.join("restored.img");
    step(
        "restore",
        &["restore", &repo, jstr(&incr, "/snapshot"), p(&out)],
        &[
            (200, Stall),
            (4 * MIB, Drop),
            (8 * MIB, Stall),
            (12 * MIB, Drop),
        ],
    );
    assert_eq!(sha256_file(&out), sha2, "the restore under faults differs");
    for o in &outcomes {
        eprintln!("{o}");
    }
    let (drops, stalls) = proxy.fired();
    assert!(drops >= 1 && stalls >= 1, "{outcomes:?}");

    // Without faults (still through the proxy): clean, and every snapshot bit for bit.
    assert!(proxy.forwarded() > 2 * size);
    run(&g, &cache, &["verify", "--read-data", &repo], &env)
        .expect_code(0)
        .stdout_has(&["no problems"]);
    let list = run(&g, &cache, &["snapshots", "--json", &repo], &env)
        .expect_code(0)
        .json();
    let ids: Vec<String> = list
        .as_array()
        .expect("a list of snapshots")
        .iter()
        .map(|s| jstr(s, "/id").to_string())
        .collect();
    assert!(!ids.is_empty(), "{list}");
    for id in &ids {
        let out = t.join(&format!("{id}.img"));
        run(&g, &cache, &["restore", &repo, id, p(&out)], &env).expect_code(0);
        let got = sha256_file(&out);
        match snapshots.get(id) {
            Some(want) => assert_eq!(&got, want, "snapshot {id}"),
            // A backup that failed after writing its snapshot, then run again.
            None => assert!(
                got == sha1 || got == sha2,
                "snapshot {id} is neither source"
            ),
        }
        std::fs::remove_file(&out).expect("remove a restored image");
    }
}
