//! Garage S3 servers for the tests: one node, or three nodes on loopback, in a temporary
//! directory on free ports, stopped when dropped.
//!
//! The binary is a garage 2.5.0 found in `$GARAGE`, on `PATH`, in `~/.cargo/bin` or in
//! `$GARAGE_ROOT/bin` (`scripts/garage.sh install` builds one there). Without one, a test
//! skips, and fails when `CI` is set ([`util::require`]).
//!
//! Servers are started with `PR_SET_PDEATHSIG(SIGKILL)`: they die with the thread that started
//! them, so create a [`Garage`] in the test's own thread, and a test binary killed mid-test
//! leaves no server behind.

use crate::util::{self, TestDir};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The Garage version the tests are written against.
pub const VERSION: &str = "2.5.0";

/// The bucket every server has.
pub const BUCKET: &str = "volback";

/// A garage binary of [`VERSION`], if one is installed.
pub fn garage_binary() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(g) = std::env::var_os("GARAGE") {
        candidates.push(g.into());
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("garage")));
    }
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(Path::new(&home).join(".cargo/bin/garage"));
    }
    if let Some(root) = std::env::var_os("GARAGE_ROOT") {
        candidates.push(Path::new(&root).join("bin/garage"));
    }
    candidates.into_iter().find(|c| {
        c.is_file()
            && Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| says_version(&String::from_utf8_lossy(&o.stdout)))
    })
}

/// Whether `garage --version` output names [`VERSION`] ("garage cargo:2.5.0 [features: …]",
/// or "garage v2.5.0 …" for a git build).
fn says_version(out: &str) -> bool {
    out.split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .any(|word| word == VERSION)
}

/// One Garage node: its directory, configuration, ports and process.
struct Node {
    dir: PathBuf,
    s3_port: u16,
    child: Option<Child>,
}

impl Node {
    fn config(&self) -> PathBuf {
        self.dir.join("garage.toml")
    }
}

/// A running Garage (one node or a cluster) with bucket [`BUCKET`] and a key allowed on it.
pub struct Garage {
    bin: PathBuf,
    nodes: Vec<Node>,
    key_id: String,
    secret: String,
    /// Last, so that the servers are stopped before their files go.
    _dir: TestDir,
}

/// `n` distinct free TCP ports on loopback (all bound at once, then released).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local address").port())
        .collect()
}

fn random_hex32() -> String {
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("read /dev/urandom");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Polls `ok` every 0.1 s for up to `secs`; panics with `what` when it never holds.
fn wait_until(secs: u64, what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !ok() {
        assert!(Instant::now() < deadline, "gave up after {secs} s: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Garage {
    /// A single node (replication factor 1), or `None` (after printing why) when there is no
    /// garage binary; panics instead when `CI` is set.
    pub fn single() -> Option<Garage> {
        Garage::start(1)
    }

    /// Three nodes on loopback (replication factor 3, consistent mode), connected, one layout;
    /// the bucket and key work through every node's endpoint. `None` as for [`Garage::single`].
    pub fn cluster3() -> Option<Garage> {
        Garage::start(3)
    }

    fn start(n: usize) -> Option<Garage> {
        let bin = garage_binary();
        if !util::require(bin.is_none().then(|| {
            format!("no garage {VERSION} binary (set GARAGE, or run scripts/garage.sh install)")
        })) {
            return None;
        }
        let bin = bin.expect("checked above");
        let dir = TestDir::new();
        let ports = free_ports(3 * n);
        let secret = random_hex32();
        let mut nodes = Vec::new();
        for i in 0..n {
            let node_dir = dir.join(&format!("n{}", i + 1));
            std::fs::create_dir_all(node_dir.join("meta")).expect("create node dirs");
            std::fs::create_dir_all(node_dir.join("data")).expect("create node dirs");
            let (s3, rpc, admin) = (ports[3 * i], ports[3 * i + 1], ports[3 * i + 2]);
            let config = format!(
                "metadata_dir = \"{d}/meta\"\n\
                 data_dir = \"{d}/data\"\n\
                 db_engine = \"lmdb\"\n\
                 replication_factor = {n}\n\
                 consistency_mode = \"consistent\"\n\
                 compression_level = \"none\"\n\
                 rpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_public_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_secret = \"{secret}\"\n\
                 bootstrap_peers = []\n\
                 [s3_api]\n\
                 s3_region = \"garage\"\n\
                 api_bind_addr = \"127.0.0.1:{s3}\"\n\
                 root_domain = \".s3.garage.localhost\"\n\
                 [admin]\n\
                 api_bind_addr = \"127.0.0.1:{admin}\"\n",
                d = node_dir.display()
            );
            std::fs::write(node_dir.join("garage.toml"), config).expect("write garage.toml");
            nodes.push(Node {
                dir: node_dir,
                s3_port: s3,
                child: None,
            });
        }
        let mut g = Garage {
            bin,
            nodes,
            key_id: String::new(),
            secret: String::new(),
            _dir: dir,
        };
        g.spawn_all();
        g.setup();
        Some(g)
    }

    /// Runs `garage -c <node i's config> args`, panicking with its output on failure.
    fn cli(&self, node: usize, args: &[&str]) -> String {
        let out = Command::new(&self.bin)
            .arg("-c")
            .arg(self.nodes[node].config())
            .args(args)
            .output()
            .expect("run garage");
        assert!(
            out.status.success(),
            "garage {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn cli_ok(&self, node: usize, args: &[&str]) -> bool {
        Command::new(&self.bin)
            .arg("-c")
            .arg(self.nodes[node].config())
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn spawn_all(&mut self) {
        for node in &mut self.nodes {
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(node.dir.join("server.log"))
                .expect("open server.log");
            let mut cmd = Command::new(&self.bin);
            cmd.arg("-c")
                .arg(node.config())
                .arg("server")
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("clone log"))
                .stderr(log);
            #[cfg(target_os = "linux")]
            {
                use std::os::unix::process::CommandExt;
                // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
                unsafe {
                    cmd.pre_exec(|| {
                        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                        Ok(())
                    });
                }
            }
            node.child = Some(cmd.spawn().expect("start garage server"));
        }
        for i in 0..self.nodes.len() {
            wait_until(20, "garage answers `status`", || {
                self.cli_ok(i, &["status"])
            });
        }
    }

    /// Connects the nodes, applies a layout, makes the bucket and the key.
    fn setup(&mut self) {
        let ids: Vec<String> = (0..self.nodes.len())
            .map(|i| self.cli(i, &["node", "id", "-q"]).trim().to_string())
            .collect();
        for id in &ids[1..] {
            self.cli(0, &["node", "connect", id]);
        }
        // Peers learnt by `node connect` are saved only from time to time: a cluster killed
        // soon after would not find itself again on restart. The configurations name them.
        let peers: Vec<String> = ids.iter().map(|id| format!("{id:?}")).collect();
        for node in &self.nodes {
            let text = std::fs::read_to_string(node.config()).expect("read garage.toml");
            let text = text.replace(
                "bootstrap_peers = []",
                &format!("bootstrap_peers = [{}]", peers.join(", ")),
            );
            std::fs::write(node.config(), text).expect("write garage.toml");
        }
        let n = self.nodes.len();
        wait_until(20, "every node sees the others", || {
            (0..n).all(|i| {
                let out = self.cli(i, &["status"]);
                ids.iter().all(|id| out.contains(&id[..16]))
            })
        });
        let capacity = if n == 1 { "20G" } else { "1G" };
        for id in &ids {
            let short = id.split('@').next().unwrap_or(id);
            self.cli(0, &["layout", "assign", "-z", "dc1", "-c", capacity, short]);
        }
        self.cli(0, &["layout", "apply", "--version", "1"]);
        wait_until(20, "every node has layout version 1", || {
            (0..n).all(|i| self.cli(i, &["layout", "show"]).contains("version: 1"))
        });
        wait_until(20, "the bucket can be created", || {
            self.cli_ok(0, &["bucket", "create", BUCKET])
                || self.cli_ok(0, &["bucket", "info", BUCKET])
        });
        let key_name = format!("{BUCKET}-key");
        let key = self.cli(0, &["key", "create", &key_name]);
        let field = |label: &str| {
            key.lines()
                .find(|l| l.trim_start().starts_with(label))
                .and_then(|l| l.split_whitespace().last())
                .unwrap_or_else(|| panic!("no {label:?} in `garage key create`:\n{key}"))
                .to_string()
        };
        self.key_id = field("Key ID");
        self.secret = field("Secret key");
        self.cli(
            0,
            &[
                "bucket", "allow", "--read", "--write", "--owner", BUCKET, "--key", &key_name,
            ],
        );
        for i in 0..n {
            wait_until(20, "every node knows the bucket", || {
                self.cli_ok(i, &["bucket", "info", BUCKET])
            });
        }
        self.wait_s3();
    }

    /// Until every node's S3 port accepts connections and answers HTTP.
    fn wait_s3(&self) {
        for node in &self.nodes {
            let port = node.s3_port;
            wait_until(20, "the S3 API answers", || {
                TcpStream::connect(("127.0.0.1", port))
                    .and_then(|mut s| {
                        s.set_read_timeout(Some(Duration::from_secs(2)))?;
                        s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
                        let mut b = [0u8; 12];
                        s.read_exact(&mut b)?;
                        Ok(b.starts_with(b"HTTP/"))
                    })
                    .unwrap_or(false)
            });
        }
    }

    /// The S3 endpoint of node 1 (`http://127.0.0.1:PORT`).
    pub fn endpoint(&self) -> String {
        self.endpoint_of(0)
    }

    /// The S3 endpoint of node `i` (0-based).
    pub fn endpoint_of(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.nodes[i].s3_port)
    }

    /// Every node's S3 endpoint.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.nodes.len()).map(|i| self.endpoint_of(i)).collect()
    }

    pub fn bucket(&self) -> &str {
        BUCKET
    }

    /// The volback address of a repository under `prefix` in the bucket, through node 1
    /// (`s3:http://127.0.0.1:PORT/volback/PREFIX`); each test uses its own prefix.
    pub fn repo_url(&self, prefix: &str) -> String {
        self.repo_url_of(0, prefix)
    }

    /// [`Garage::repo_url`] through node `i` (0-based).
    pub fn repo_url_of(&self, i: usize, prefix: &str) -> String {
        format!("s3:{}/{BUCKET}/{prefix}", self.endpoint_of(i))
    }

    /// Adds [`Garage::env`] to a command.
    pub fn apply_env<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        cmd.envs(self.env())
    }

    /// The environment of an S3 client of this server (credentials, region, endpoint).
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", self.key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret.clone()),
            ("AWS_DEFAULT_REGION", "garage".to_string()),
            ("AWS_ENDPOINT_URL", self.endpoint()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Kills every node with SIGKILL (a crash: nothing is flushed) and waits for them.
    pub fn kill(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut c) = node.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// Starts the nodes again on the same directories and ports (killing running ones
    /// first); returns once they serve the bucket again.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn_all();
        for i in 0..self.nodes.len() {
            wait_until(30, "the bucket is served again", || {
                self.cli_ok(i, &["bucket", "info", BUCKET])
            });
        }
        self.wait_s3();
    }

    /// Whether node `i`'s process is running.
    pub fn is_running(&mut self, i: usize) -> bool {
        self.nodes[i]
            .child
            .as_mut()
            .is_some_and(|c| c.try_wait().is_ok_and(|s| s.is_none()))
    }

    /// Process ids of the running nodes.
    pub fn pids(&self) -> Vec<u32> {
        self.nodes
            .iter()
            .filter_map(|n| n.child.as_ref().map(|c| c.id()))
            .collect()
    }

    /// curl's options for requests signed for this server.
    pub fn curl_auth(&self) -> Vec<String> {
        [
            "-sS",
            "-f",
            "--aws-sigv4",
            "aws:amz:garage:s3",
            "--user",
            &format!("{}:{}", self.key_id, self.secret),
            // Garage wants the header; curl does not send it by itself.
            "-H",
            "x-amz-content-sha256: UNSIGNED-PAYLOAD",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    }

    /// `curl --aws-sigv4` against node `i`: PUT `body` as `key` (when given) or GET `key`.
    /// The tests of the harness itself use it; volback has its own client.
    pub fn curl(&self, i: usize, key: &str, body: Option<&Path>) -> util::Run {
        let url = format!("{}/{BUCKET}/{key}", self.endpoint_of(i));
        let auth = self.curl_auth();
        let mut args: Vec<&str> = auth.iter().map(String::as_str).collect();
        if let Some(b) = body {
            args.extend(["-T", util::p(b)]);
        }
        args.push(&url);
        util::run_program("curl", &args)
    }

    /// The objects of the bucket whose keys start with `prefix`, with their sizes (through
    /// node 1, `curl`; at most 1000, which the tests never reach).
    pub fn list(&self, prefix: &str) -> Vec<(String, u64)> {
        let url = format!(
            "{}/{BUCKET}?list-type=2&prefix={}",
            self.endpoint(),
            prefix.replace('/', "%2F")
        );
        let mut c = Command::new("curl");
        c.args(self.curl_auth()).arg(&url);
        let r = util::run_command(c, &format!("curl {url}"));
        assert_eq!(r.code, Some(0), "{r:?}");
        assert!(r.stdout.contains("<ListBucketResult"), "{}", r.stdout);
        assert!(
            !r.stdout.contains("<IsTruncated>true"),
            "more than one page"
        );
        let field = |s: &str, tag: &str| -> Option<String> {
            let (_, rest) = s.split_once(&format!("<{tag}>"))?;
            Some(rest.split_once(&format!("</{tag}>"))?.0.to_string())
        };
        r.stdout
            .split("<Contents>")
            .skip(1)
            .map(|c| {
                let key = field(c, "Key").expect("<Key> in <Contents>");
                let size = field(c, "Size").and_then(|n| n.parse().ok());
                (key, size.expect("<Size> in <Contents>"))
            })
            .collect()
    }

    /// Object `key` (GET through node 1, `curl`).
    pub fn get(&self, key: &str) -> Vec<u8> {
        let url = format!("{}/{BUCKET}/{key}", self.endpoint());
        let out = Command::new("curl")
            .args(self.curl_auth())
            .arg(&url)
            .output()
            .expect("run curl");
        assert!(
            out.status.success(),
            "curl GET {url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// Writes object `key` (PUT through node 1, `curl`).
    pub fn put(&self, key: &str, bytes: &[u8]) {
        let dir = TestDir::new();
        let body = dir.join("body");
        std::fs::write(&body, bytes).expect("write the body");
        let r = self.curl(0, key, Some(&body));
        assert_eq!(r.code, Some(0), "PUT {key}: {r:?}");
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// Tests of the harness

fn object_round_trip(g: &Garage, dir: &TestDir, put_on: usize, get_on: usize, key: &str) {
    let body = dir.join(key);
    let data = format!("object {key} written through node {put_on}\n").repeat(1000);
    std::fs::write(&body, &data).unwrap();
    let put = g.curl(put_on, key, Some(&body));
    assert_eq!(put.code, Some(0), "{put:?}");
    let got = g.curl(get_on, key, None);
    assert_eq!(got.code, Some(0), "{got:?}");
    assert_eq!(got.stdout, data, "GET {key} through node {get_on}");
}

#[test]
fn garage_single_node_starts_restarts_and_stops() {
    let t0 = Instant::now();
    let Some(mut g) = Garage::single() else {
        return;
    };
    eprintln!(
        "garage single node ready in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let env = g.env();
    let printed = g
        .apply_env(&mut Command::new("env"))
        .output()
        .expect("run env");
    assert!(String::from_utf8_lossy(&printed.stdout).contains("AWS_DEFAULT_REGION=garage"));
    assert!(
        env.iter()
            .any(|(k, v)| k == "AWS_DEFAULT_REGION" && v == "garage")
    );
    assert!(
        env.iter()
            .any(|(k, v)| k == "AWS_ENDPOINT_URL" && *v == g.endpoint())
    );
    assert_eq!(g.bucket(), BUCKET);
    assert_eq!(g.repo_url("t1"), format!("s3:{}/{BUCKET}/t1", g.endpoint()));
    let dir = TestDir::new();
    let curl = util::in_path("curl");
    if curl {
        object_round_trip(&g, &dir, 0, 0, "before");
    }

    g.kill();
    assert!(!g.is_running(0));
    assert!(TcpStream::connect(g.endpoint().trim_start_matches("http://")).is_err());
    let t1 = Instant::now();
    g.restart();
    eprintln!(
        "garage single node restarted in {:.1} s",
        t1.elapsed().as_secs_f64()
    );
    assert!(g.is_running(0));
    if curl {
        // Same directories: what was written before the crash is there.
        let got = g.curl(0, "before", None);
        assert_eq!(got.code, Some(0), "{got:?}");
        assert!(got.stdout.starts_with("object before"));
        object_round_trip(&g, &dir, 0, 0, "after");
    }

    let pids = g.pids();
    drop(g);
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains(") Z")),
            "garage {pid} still runs after drop"
        );
    }
}

#[test]
fn garage_cluster_of_three_serves_one_bucket_through_every_node() {
    let t0 = Instant::now();
    let Some(mut g) = Garage::cluster3() else {
        return;
    };
    eprintln!(
        "garage cluster of 3 ready in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(g.endpoints().len(), 3);
    if !util::require_tools(&["curl"]) {
        return;
    }
    let dir = TestDir::new();
    object_round_trip(&g, &dir, 0, 2, "one-to-three");
    object_round_trip(&g, &dir, 2, 0, "three-to-one");
    object_round_trip(&g, &dir, 1, 2, "two-to-three");
    let t1 = Instant::now();
    g.restart();
    eprintln!(
        "garage cluster of 3 restarted in {:.1} s",
        t1.elapsed().as_secs_f64()
    );
    let got = g.curl(1, "one-to-three", None);
    assert_eq!(got.code, Some(0), "{got:?}");
}
