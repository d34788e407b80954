//! `volback serve --nbd`: snapshots served over NBD on a Unix socket and on TCP, judged by
//! `qemu-img` and `qemu-nbd` (and `nbd-client -l`), and hostile clients written here over raw
//! sockets. Every server is stopped with SIGINT and must exit 0 and remove its socket.

use crate::util::*;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

// Protocol numbers (doc/proto.md of the NBD project).
const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_SET_META_CONTEXT: u32 = 10;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_BLOCK_STATUS: u16 = 7;
const REPLY_FLAG_DONE: u16 = 1;
const REPLY_TYPE_NONE: u16 = 0;
const REPLY_TYPE_OFFSET_DATA: u16 = 1;
const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
const EPERM: u32 = 1;
const EINVAL: u32 = 22;
const EOVERFLOW: u32 = 75;

/// Guards against a hung server: no test waits on it longer than this.
const HANG_GUARD: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// The server process

/// A running `volback serve`; killed (SIGKILL) if a test fails before [`Served::stop`].
struct Served {
    child: Option<Child>,
    _stdout: BufReader<ChildStdout>,
    uri: String,
    stderr: PathBuf,
}

impl Served {
    /// Starts `volback serve REPO SNAPSHOT --nbd ADDR EXTRA…` and reads the URI it prints.
    fn start(t: &TestDir, repo: &Path, snapshot: &str, addr: &str, extra: &[&str]) -> Served {
        Served::start_source(t, &[p(repo), snapshot], addr, extra)
    }

    /// `volback serve SOURCE… --nbd ADDR EXTRA…` (SOURCE: REPO SNAPSHOT, or COPY).
    fn start_source(t: &TestDir, source: &[&str], addr: &str, extra: &[&str]) -> Served {
        static N: AtomicUsize = AtomicUsize::new(0);
        let stderr = t.join(&format!(
            "serve-{}.stderr",
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let mut child = Command::new(VOLBACK)
            .arg("serve")
            .args(source)
            .args(["--nbd", addr])
            .args(extra)
            .envs(password_env(source))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&stderr).expect("create stderr file"))
            .spawn()
            .expect("start volback serve");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("read the server's stdout");
        if line.trim().is_empty() {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "volback serve printed no URI:\n{}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            );
        }
        Served {
            child: Some(child),
            _stdout: out,
            uri: line.trim().to_string(),
            stderr,
        }
    }

    /// The socket path of an `nbd+unix://` URI.
    fn socket(&self) -> PathBuf {
        let (_, s) = self.uri.split_once("?socket=").expect("a Unix socket URI");
        PathBuf::from(s)
    }

    /// The port of an `nbd://` URI.
    fn port(&self) -> u16 {
        let rest = self
            .uri
            .strip_prefix("nbd://127.0.0.1:")
            .expect("a TCP URI");
        rest.split('/').next().unwrap().parse().expect("a port")
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Stops the server with SIGINT, like Ctrl-C; asserts that it exits 0 without panicking
    /// and returns its stderr.
    fn stop(mut self) -> String {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill() takes a process id and a signal number; the child is ours and not
        // yet reaped, so the id names it.
        let r = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
        assert_eq!(r, 0, "kill -INT");
        let deadline = Instant::now() + HANG_GUARD;
        let status = loop {
            if let Some(s) = child.try_wait().expect("wait") {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("volback serve did not stop on SIGINT:\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let err = self.stderr();
        assert!(!err.contains("panicked"), "volback serve panicked:\n{err}");
        assert_eq!(status.code(), Some(0), "exit status; stderr:\n{err}");
        err
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A raw NBD client

trait Conn: Read + Write {}
impl<T: Read + Write> Conn for T {}

struct Raw {
    s: Box<dyn Conn>,
}

impl Raw {
    fn tcp(port: u16) -> Raw {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect over TCP");
        s.set_read_timeout(Some(HANG_GUARD)).unwrap();
        Raw { s: Box::new(s) }
    }

    fn unix(path: &Path) -> Raw {
        let s = UnixStream::connect(path).expect("connect to the Unix socket");
        s.set_read_timeout(Some(HANG_GUARD)).unwrap();
        Raw { s: Box::new(s) }
    }

    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send");
    }

    fn take(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).expect("receive");
        b
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.take(2).try_into().unwrap())
    }

    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.take(4).try_into().unwrap())
    }

    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.take(8).try_into().unwrap())
    }

    /// True when the server closed the connection (nothing more to read).
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ),
        }
    }

    /// Reads the greeting; sends the client flags (fixed newstyle, no zeroes).
    fn greet(&mut self) {
        assert_eq!(self.u64(), NBDMAGIC);
        assert_eq!(self.u64(), IHAVEOPT);
        assert_eq!(self.u16(), 3, "handshake flags: FIXED_NEWSTYLE | NO_ZEROES");
        self.send(&3u32.to_be_bytes());
    }

    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    /// One option reply: (option, type, data).
    fn reply(&mut self) -> (u32, u32, Vec<u8>) {
        assert_eq!(self.u64(), OPTION_REPLY_MAGIC);
        let opt = self.u32();
        let kind = self.u32();
        let len = self.u32() as usize;
        (opt, kind, self.take(len))
    }

    /// Negotiates and enters transmission; returns the export size.
    fn go(&mut self, structured: bool, allocation: bool) -> u64 {
        self.greet();
        if structured {
            self.option(OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(self.reply().1, REP_ACK);
        }
        if allocation {
            let q = b"base:allocation";
            let mut d = 0u32.to_be_bytes().to_vec();
            d.extend_from_slice(&1u32.to_be_bytes());
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q);
            self.option(OPT_SET_META_CONTEXT, &d);
            assert_eq!(self.reply().1, REP_META_CONTEXT);
            assert_eq!(self.reply().1, REP_ACK);
        }
        let mut d = 0u32.to_be_bytes().to_vec();
        d.extend_from_slice(&0u16.to_be_bytes());
        self.option(OPT_GO, &d);
        let mut size = None;
        loop {
            let (_, kind, data) = self.reply();
            match kind {
                REP_INFO if data[0..2] == [0, 0] => {
                    size = Some(u64::from_be_bytes(data[2..10].try_into().unwrap()));
                }
                REP_INFO => {}
                REP_ACK => break,
                k => panic!("unexpected reply {k:#x} to NBD_OPT_GO"),
            }
        }
        size.expect("NBD_INFO_EXPORT")
    }

    fn request(&mut self, command: u16, cookie: u64, offset: u64, len: u32) {
        let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&command.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        self.send(&b);
    }

    /// A simple reply: (error, cookie).
    fn simple(&mut self) -> (u32, u64) {
        assert_eq!(self.u32(), SIMPLE_REPLY_MAGIC);
        (self.u32(), self.u64())
    }

    /// A read with simple replies: the data, or the error.
    fn read_simple(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.request(CMD_READ, 77, offset, len);
        let (err, cookie) = self.simple();
        assert_eq!(cookie, 77);
        if err != 0 {
            return Err(err);
        }
        Ok(self.take(len as usize))
    }

    /// A whole structured reply: (type, payload) of each chunk.
    fn chunks(&mut self, cookie: u64) -> Vec<(u16, Vec<u8>)> {
        let mut v = Vec::new();
        loop {
            assert_eq!(self.u32(), STRUCTURED_REPLY_MAGIC);
            let flags = self.u16();
            let kind = self.u16();
            assert_eq!(self.u64(), cookie);
            let len = self.u32() as usize;
            v.push((kind, self.take(len)));
            if flags & REPLY_FLAG_DONE != 0 {
                return v;
            }
        }
    }

    /// A read with structured replies, reassembled; also the chunk types seen.
    fn read_structured(&mut self, offset: u64, len: u32) -> Result<(Vec<u8>, Vec<u16>), u32> {
        self.request(CMD_READ, 78, offset, len);
        let mut out = vec![0xa5u8; len as usize];
        let mut kinds = Vec::new();
        for (kind, p) in self.chunks(78) {
            kinds.push(kind);
            let at = |p: &[u8]| (u64::from_be_bytes(p[0..8].try_into().unwrap()) - offset) as usize;
            match kind {
                REPLY_TYPE_OFFSET_DATA => {
                    let a = at(&p);
                    out[a..a + p.len() - 8].copy_from_slice(&p[8..]);
                }
                REPLY_TYPE_OFFSET_HOLE => {
                    let a = at(&p);
                    let n = u32::from_be_bytes(p[8..12].try_into().unwrap()) as usize;
                    out[a..a + n].fill(0);
                }
                REPLY_TYPE_NONE => {}
                k if k & 0x8000 != 0 => {
                    return Err(u32::from_be_bytes(p[0..4].try_into().unwrap()));
                }
                k => panic!("unexpected chunk type {k}"),
            }
        }
        Ok((out, kinds))
    }

    fn disconnect(mut self) {
        self.request(CMD_DISC, 0, 0, 0);
        assert!(self.closed(), "the server closes after NBD_CMD_DISC");
    }
}

// ---------------------------------------------------------------------------------------------
// Test volume

const SIZE: u64 = 40 * MIB;

/// Byte ranges of [`make_image`] that hold data; the rest reads as zeros.
fn data_ranges() -> Vec<(u64, u64)> {
    vec![
        (2 * MIB, 5 * MIB),
        (20 * MIB, 21 * MIB),
        (39 * MIB, 40 * MIB),
    ]
}

/// A 40 MiB sparse image: random data, text, a megabyte of written zeros, holes.
fn make_image(path: &Path) -> Vec<u8> {
    let mut rng = Rng::new(0x0b0d);
    sparse_file(path, SIZE);
    write_at(path, 2 * MIB, &rng.bytes(3 * MIB as usize));
    write_at(path, 10 * MIB, &vec![0u8; MIB as usize]);
    write_at(path, 20 * MIB, &rng.text(MIB as usize));
    write_at(path, 39 * MIB, &rng.bytes(MIB as usize));
    std::fs::read(path).expect("read the image back")
}

/// A repository with one backup of a fresh [`make_image`]; returns (image path, bytes, id).
fn backed_up(t: &TestDir) -> (PathBuf, Vec<u8>, String) {
    let img = t.join("disk.img");
    let bytes = make_image(&img);
    let repo = t.join("repo");
    init_repo(&repo, &[]);
    let b = backup_json(&img, &repo, &[]);
    (img, bytes, jstr(&b, "/snapshot").to_string())
}

/// `qemu-img map --output=json URI`, as the merged ranges with data.
fn qemu_data_ranges(uri: &str) -> Vec<(u64, u64)> {
    let r = run_ok("qemu-img", &["map", "--output=json", uri]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("qemu-img map JSON");
    let mut out: Vec<(u64, u64)> = Vec::new();
    for e in v.as_array().expect("an array") {
        let start = ju64(e, "/start");
        let len = ju64(e, "/length");
        if e["data"] == true {
            match out.last_mut() {
                Some((_, end)) if *end == start => *end += len,
                _ => out.push((start, start + len)),
            }
        } else {
            assert_eq!(e["zero"], true, "a range without data reads as zeros: {e}");
        }
    }
    out
}

/// A well-behaved client (structured replies, block status, reads) still gets exact data.
fn good_client_works(mut c: Raw, image: &[u8]) {
    assert_eq!(c.go(true, true), SIZE);
    let (data, kinds) = c.read_structured(4 * MIB, 3 * MIB as u32).expect("read");
    assert!(
        data[..] == image[4 * MIB as usize..7 * MIB as usize],
        "read differs"
    );
    assert!(kinds.contains(&REPLY_TYPE_OFFSET_HOLE), "{kinds:?}");
    assert!(kinds.contains(&REPLY_TYPE_OFFSET_DATA), "{kinds:?}");
    c.request(CMD_BLOCK_STATUS, 5, 0, 8 * MIB as u32);
    let chunks = c.chunks(5);
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].0, REPLY_TYPE_BLOCK_STATUS);
    let words: Vec<u32> = chunks[0]
        .1
        .chunks(4)
        .map(|w| u32::from_be_bytes(w.try_into().unwrap()))
        .collect();
    let m = MIB as u32;
    assert_eq!(
        words,
        vec![1, 2 * m, 3, 3 * m, 0, 3 * m, 3],
        "context, then (length, flags): hole+zero, data, hole+zero"
    );
    c.disconnect();
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn nbd_qemu_reads_a_snapshot_over_unix_socket_and_tcp() {
    let t = TestDir::new();
    let (img, image, id) = backed_up(&t);
    let repo = t.join("repo");
    let sock = t.join("nbd.sock");
    let unix = Served::start(&t, &repo, "latest", p(&sock), &[]);
    let tcp = Served::start(&t, &repo, &id[..8], "127.0.0.1:0", &["--name", "disk"]);
    assert_eq!(unix.socket(), sock);
    assert!(
        unix.uri
            .starts_with(&format!("nbd+unix:///{}?socket=", &id[..12])),
        "{}",
        unix.uri
    );
    assert!(tcp.uri.ends_with("/disk"), "{}", tcp.uri);

    // The bytes: qemu-img reads both exports (with block status, so holes are skipped) and
    // compares them with the source image; the default export (empty name) works too.
    let default_export = format!("nbd+unix:///?socket={}", p(&sock));
    for uri in [&unix.uri, &tcp.uri, &default_export] {
        run_ok("qemu-img", &["compare", "-f", "raw", p(&img), uri]);
    }

    // The export list, with the metadata context.
    let l = run_ok("qemu-nbd", &["--list", "-k", p(&sock)]);
    l.stdout_has(&[
        &id[..12],
        "base:allocation",
        "readonly",
        "max block: 33554432",
    ]);
    let port = tcp.port().to_string();
    let l = run_ok("qemu-nbd", &["--list", "-b", "127.0.0.1", "-p", &port]);
    l.stdout_has(&["export: 'disk'", "size:  41943040"]);
    // nbd-client's list mode (no kernel module needed), when installed.
    if Path::new("/usr/sbin/nbd-client").exists() || Path::new("/sbin/nbd-client").exists() {
        run_ok("nbd-client", &["-l", "127.0.0.1", &port]).stdout_has(&["disk"]);
    }

    // Block status: data exactly where the image has non-zero data (written zeros are holes).
    assert_eq!(qemu_data_ranges(&unix.uri), data_ranges());
    assert_eq!(qemu_data_ranges(&tcp.uri), data_ranges());

    // Several clients at once: an idle raw client holds a connection in transmission while
    // three qemu-img processes read both servers.
    let mut idle = Raw::unix(&sock);
    assert_eq!(idle.go(false, false), SIZE);
    let procs: Vec<_> = [&unix.uri, &unix.uri, &tcp.uri]
        .into_iter()
        .map(|uri| {
            Command::new("qemu-img")
                .args(["compare", "-f", "raw", p(&img), uri])
                .stdout(Stdio::null())
                .spawn()
                .expect("start qemu-img")
        })
        .collect();
    for mut c in procs {
        assert!(
            c.wait().expect("wait qemu-img").success(),
            "qemu-img compare"
        );
    }
    assert_eq!(
        idle.read_simple(20 * MIB, 4096).expect("read"),
        image[20 * MIB as usize..20 * MIB as usize + 4096]
    );

    // Ctrl-C: the idle client is disconnected, the server exits 0 and removes its socket.
    let err = unix.stop();
    assert!(idle.closed(), "the idle client was disconnected");
    assert!(!sock.exists(), "socket file left behind");
    assert!(err.contains("client 1 connected"), "{err}");
    assert!(err.contains("stopped after serving"), "{err}");
    tcp.stop();
}

#[test]
fn nbd_bad_clients_do_not_disturb_others() {
    let t = TestDir::new();
    let (_img, image, _id) = backed_up(&t);
    let srv = Served::start(&t, &t.join("repo"), "latest", "127.0.0.1:0", &[]);
    let port = srv.port();

    // Garbage instead of client flags (an HTTP client on the wrong port).
    let mut c = Raw::tcp(port);
    c.take(18);
    c.send(b"GET / HTTP/1.0\r\n\r\n");
    assert!(c.closed());
    good_client_works(Raw::tcp(port), &image);

    // An option with garbage magic.
    let mut c = Raw::tcp(port);
    c.greet();
    c.send(b"GARBAGE!\0\0\0\x07\0\0\0\0");
    assert!(c.closed());
    good_client_works(Raw::tcp(port), &image);

    // An option claiming 4 GiB of data: refused with TOO_BIG, then the connection closes.
    let mut c = Raw::tcp(port);
    c.greet();
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&OPT_GO.to_be_bytes());
    b.extend_from_slice(&u32::MAX.to_be_bytes());
    c.send(&b);
    assert_eq!(c.reply().1, REP_ERR_TOO_BIG);
    assert!(c.closed());
    good_client_works(Raw::tcp(port), &image);

    // An unknown option is refused politely and the handshake goes on.
    let mut c = Raw::tcp(port);
    c.greet();
    c.option(200, b"some data");
    assert_eq!(c.reply().1, REP_ERR_UNSUP);
    c.option(OPT_GO, &[0, 0, 0, 0, 0, 0]);
    loop {
        let (_, kind, _) = c.reply();
        if kind == REP_ACK {
            break;
        }
        assert_eq!(kind, REP_INFO);
    }
    // Simple replies: a read past the end, huge reads, a write, a trim and block status
    // without a context fail; the connection stays usable.
    assert_eq!(c.read_simple(SIZE - 100, 200), Err(EINVAL));
    assert_eq!(c.read_simple(SIZE, 1), Err(EINVAL));
    assert_eq!(c.read_simple(u64::MAX - 10, 100), Err(EINVAL));
    assert_eq!(c.read_simple(0, u32::MAX), Err(EINVAL));
    assert_eq!(
        c.read_simple(0, 33 * MIB as u32),
        Err(EINVAL),
        "over 32 MiB"
    );
    c.request(CMD_WRITE, 9, 0, 4096);
    c.send(&[0x55; 4096]);
    assert_eq!(c.simple(), (EPERM, 9));
    c.request(CMD_TRIM, 10, 0, 4096);
    assert_eq!(c.simple(), (EPERM, 10));
    c.request(CMD_BLOCK_STATUS, 11, 0, 4096);
    assert_eq!(c.simple(), (EINVAL, 11));
    c.request(42, 12, 0, 0);
    assert_eq!(c.simple(), (EINVAL, 12));
    c.request(CMD_FLUSH, 13, 0, 0);
    assert_eq!(c.simple(), (0, 13));
    assert_eq!(
        c.read_simple(SIZE - 4096, 4096)
            .expect("read the last 4 KiB"),
        image[(SIZE - 4096) as usize..]
    );
    c.disconnect();

    // The same with structured replies: errors come as error chunks.
    let mut c = Raw::tcp(port);
    assert_eq!(c.go(true, true), SIZE);
    assert_eq!(c.read_structured(SIZE - 100, 200), Err(EINVAL));
    assert_eq!(c.read_structured(0, 33 * MIB as u32), Err(EOVERFLOW));
    assert_eq!(c.read_structured(0, u32::MAX), Err(EINVAL));
    let (data, _) = c
        .read_structured(0, 32 * MIB as u32)
        .expect("a 32 MiB read");
    assert!(
        data[..] == image[..32 * MIB as usize],
        "32 MiB read differs"
    );
    c.disconnect();

    // Connections dropped mid-message: in the greeting, in a request header, with a big
    // read reply unread, in a write payload.
    let mut c = Raw::tcp(port);
    c.take(10);
    drop(c);
    let mut c = Raw::tcp(port);
    c.go(false, false);
    c.send(&REQUEST_MAGIC.to_be_bytes());
    c.send(&[0, 0, 0]);
    drop(c);
    let mut c = Raw::tcp(port);
    c.go(false, false);
    c.request(CMD_READ, 1, 0, 32 * MIB as u32);
    drop(c);
    let mut c = Raw::tcp(port);
    c.go(true, false);
    c.request(CMD_WRITE, 1, 0, MIB as u32);
    c.send(&[0; 100]);
    drop(c);
    good_client_works(Raw::tcp(port), &image);

    let err = srv.stop();
    assert!(err.contains("broke the NBD protocol"), "{err}");
    assert!(err.contains("is not IHAVEOPT"), "{err}");
}

#[test]
fn nbd_limits_the_number_of_clients() {
    let t = TestDir::new();
    let (_img, image, _id) = backed_up(&t);
    let sock = t.join("limited.sock");
    let srv = Served::start(
        &t,
        &t.join("repo"),
        "latest",
        p(&sock),
        &["--max-clients", "2"],
    );
    let mut a = Raw::unix(&sock);
    a.go(false, false);
    let mut b = Raw::unix(&sock);
    b.take(18);
    // A third connection is closed at once, without a greeting.
    let mut c = Raw::unix(&sock);
    assert!(c.closed(), "the third client was not refused");
    // Once a client leaves, there is room again (the server notices the departure shortly).
    a.disconnect();
    drop(b);
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        let mut d = Raw::unix(&sock);
        let mut g = [0u8; 8];
        if d.s.read_exact(&mut g).is_ok() {
            assert_eq!(u64::from_be_bytes(g), NBDMAGIC);
            break;
        }
        assert!(Instant::now() < deadline, "no room after clients left");
        std::thread::sleep(Duration::from_millis(20));
    }
    good_client_works(Raw::unix(&sock), &image);
    let err = srv.stop();
    assert!(err.contains("refused a connection"), "{err}");
    assert!(!sock.exists());
}

#[test]
fn nbd_socket_paths_are_checked() {
    let t = TestDir::new();
    let (img, _image, _id) = backed_up(&t);
    let repo = t.join("repo");

    // A regular file at the path is never replaced.
    let file = t.join("not-a-socket");
    std::fs::write(&file, b"keep me").unwrap();
    volback_code(&["serve", p(&repo), "latest", "--nbd", p(&file)], 1)
        .stderr_has(&["not a socket"]);
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");

    // A stale socket (its server is gone) is replaced.
    let sock = t.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let srv = Served::start(&t, &repo, "latest", p(&sock), &[]);

    // A live one is not: the second server fails and the first keeps serving.
    volback_code(&["serve", p(&repo), "latest", "--nbd", p(&sock)], 1)
        .stderr_has(&["another server is listening"]);
    run_ok("qemu-img", &["compare", "-f", "raw", p(&img), &srv.uri]);
    srv.stop();
    assert!(!sock.exists());

    // Malformed addresses are usage errors.
    for bad in ["nbd.sock", "localhost", "::1:10809"] {
        volback_code(&["serve", p(&repo), "latest", "--nbd", bad], 2)
            .stderr_has(&["not an NBD listen address"]);
    }
    volback_code(&["serve", p(&repo), "nosuch", "--nbd", "127.0.0.1:0"], 1)
        .stderr_has(&["no snapshot matches"]);
}

#[test]
fn nbd_serves_an_ext4_snapshot() {
    if !require_root_and_loop() {
        return;
    }
    let t = TestDir::new();
    let img = t.join("ext4.img");
    sparse_file(&img, 32 * MIB);
    run_ok("mkfs.ext4", &["-q", "-F", "-b", "4096", p(&img)]);
    {
        let lo = Loop::attach(&img, false);
        let m = Mount::new(lo.path(), &t.join("mnt"), None);
        let mut rng = Rng::new(4);
        std::fs::write(m.dir.join("random.bin"), rng.bytes(3 * MIB as usize)).unwrap();
        std::fs::write(m.dir.join("text.txt"), rng.text(MIB as usize)).unwrap();
        std::fs::create_dir(m.dir.join("sub")).unwrap();
        std::fs::write(m.dir.join("sub/small"), b"hello").unwrap();
        m.unmount();
    }
    let repo = t.join("repo");
    init_repo(&repo, &["--block-size", "64K"]);
    let used = backup_json(&img, &repo, &[]);
    let all = backup_json(&img, &repo, &["--all-blocks"]);
    assert!(ju64(&used, "/stats/unused_blocks") > 0, "{used}");

    // The snapshot of used blocks equals its restore (the image with unused blocks zeroed);
    // the --all-blocks snapshot equals the image itself.
    let restored = t.join("restored.img");
    let used_id = jstr(&used, "/snapshot");
    restore(&repo, used_id, &restored);
    let sock = t.join("ext4.sock");
    let a = Served::start(&t, &repo, used_id, p(&sock), &[]);
    let b = Served::start(&t, &repo, jstr(&all, "/snapshot"), "127.0.0.1:0", &[]);
    run_ok("qemu-img", &["compare", "-f", "raw", p(&restored), &a.uri]);
    run_ok("qemu-img", &["compare", "-f", "raw", p(&img), &b.uri]);

    // Unused blocks are holes: the data the server reports is about what ext4 uses.
    let data: u64 = qemu_data_ranges(&a.uri).iter().map(|(s, e)| e - s).sum();
    assert!(
        (4 * MIB..16 * MIB).contains(&data),
        "{data} bytes of data reported for a 32 MiB ext4 holding 4 MiB of files"
    );
    a.stop();
    b.stop();
    assert!(!sock.exists());
}

/// A copy (qcow2 here) is served like a snapshot: `volback serve COPY`.
#[test]
fn nbd_serves_a_copy() {
    let t = TestDir::new();
    let img = t.join("disk.img");
    make_image(&img);
    let copy = t.join("disk.qcow2");
    volback_ok(&["copy", p(&img), p(&copy), "--format", "qcow2"]);
    let sock = t.join("copy.sock");
    let served = Served::start_source(&t, &[p(&copy)], p(&sock), &[]);
    assert!(served.uri.contains("disk.qcow2"), "{}", served.uri);
    run_ok("qemu-img", &["compare", "-f", "raw", p(&img), &served.uri]);
    assert_eq!(qemu_data_ranges(&served.uri), data_ranges());
}
