//! Listening on TCP or a Unix socket, one thread per client, and a clean stop.

use super::handshake::{Handshake, handshake};
use super::session::Fault;
use super::transmission::{Transmission, Transmitter};
use super::{Client, Events, Export, ServeSummary, ServerOptions, SessionEnd, SessionStats};
use crate::error::{Error, Result};
use crate::platform::{LocalListener, LocalStream};
use std::fmt;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How often the accept loop looks at the stop flag when nobody connects.
const ACCEPT_POLL: Duration = Duration::from_millis(20);
/// How long a stop waits for clients to finish the request they are serving.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// How often a read of a client's connection that is waiting for data wakes up to look at
/// the stop flag and the handshake deadline (see [`PolledReader`]).
const READ_POLL: Duration = Duration::from_millis(100);

/// Where a server listens.
///
/// Decided by syntax: a value containing `/` (or `\`) is a Unix socket path (write
/// `./nbd.sock` for one in the current directory); anything else must be `HOST:PORT`, where
/// HOST is a name, an IPv4 address or a bracketed IPv6 address (`[::1]:10809`) and port 0
/// picks a free port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// `HOST:PORT`, as given.
    Tcp(String),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl ListenAddr {
    pub fn parse(s: &str) -> Result<ListenAddr> {
        if s.contains(['/', '\\']) {
            return Ok(ListenAddr::Unix(PathBuf::from(s)));
        }
        let bad = |why: &str| {
            Error::InvalidArgument(format!(
                "{s:?} is not an NBD listen address: {why} (give HOST:PORT such as \
                 127.0.0.1:10809, or a Unix socket path containing a `/` such as ./nbd.sock)"
            ))
        };
        let (host, port) = s.rsplit_once(':').ok_or_else(|| bad("no port"))?;
        if host.is_empty() {
            return Err(bad("no host"));
        }
        if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
            return Err(bad("an IPv6 address must be in brackets"));
        }
        port.parse::<u16>()
            .map_err(|_| bad("the port is not a number from 0 to 65535"))?;
        Ok(ListenAddr::Tcp(s.to_string()))
    }
}

impl std::str::FromStr for ListenAddr {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        ListenAddr::parse(s)
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => f.write_str(a),
            ListenAddr::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

/// Percent-encodes `bytes` for a URI, keeping unreserved characters (and `/` if asked).
fn percent_encode(bytes: &[u8], keep_slash: bool) -> String {
    let mut s = String::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
            s.push(char::from(b));
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

enum Listener {
    Tcp(TcpListener),
    Local(LocalListener),
}

enum Stream {
    Tcp(TcpStream),
    Local(LocalStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Local(s) => Stream::Local(s.try_clone()?),
        })
    }

    fn shutdown(&self, how: Shutdown) {
        // Fails only when the connection is already gone.
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Local(s) => s.shutdown(how),
        };
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Local(s) => s.set_read_timeout(t),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Local(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Local(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Local(s) => s.flush(),
        }
    }
}

/// The reading half of a client's connection, whose reads wait at most [`READ_POLL`] at a
/// time and then look at the server's stop flag and at the handshake deadline.
///
/// A stop shuts the connections down for reading, which on Linux wakes a thread blocked in
/// `recv`. Windows (and wine) do not wake a `recv` blocked in another thread when the socket
/// is shut down, so a server waiting for an idle client's next request never stopped there;
/// these reads see the stop within [`READ_POLL`] instead, on every platform. The timeouts are
/// invisible to the protocol code: a read returns data, end of file (also when the server
/// stops) or a real error, and `TimedOut` only once the handshake deadline has passed.
struct PolledReader<'a> {
    stream: Stream,
    stopping: &'a AtomicBool,
    /// When the handshake must be over; `None` once it is.
    deadline: Option<Instant>,
}

impl Read for PolledReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.stream.read(buf) {
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if self.stopping.load(Ordering::SeqCst) {
                        return Ok(0);
                    }
                    if self.deadline.is_some_and(|d| Instant::now() >= d) {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the handshake took too long",
                        ));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }
}

impl Listener {
    fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.set_nonblocking(true),
            Listener::Local(l) => l.set_nonblocking(true),
        }
    }

    /// A new connection, in blocking mode, and a description of its peer.
    fn accept(&self) -> io::Result<(Stream, String)> {
        match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept()?;
                s.set_nonblocking(false)?;
                // Replies are written whole and flushed: no reason to wait for more.
                s.set_nodelay(true)?;
                Ok((Stream::Tcp(s), peer.to_string()))
            }
            Listener::Local(l) => {
                let s = l.accept()?;
                s.set_nonblocking(false)?;
                Ok((Stream::Local(s), "unix socket".to_string()))
            }
        }
    }
}

/// An NBD server bound to its address, ready to [`Server::run`].
pub struct Server {
    listener: Listener,
    export: Export,
    options: ServerOptions,
    /// The address as listened on (TCP port 0 resolved), for messages.
    address: String,
    uri: String,
}

impl Server {
    /// Checks the export and starts listening. A stale Unix socket file (nobody listening)
    /// is replaced; any other existing file is refused.
    pub fn bind(addr: &ListenAddr, export: Export, options: ServerOptions) -> Result<Server> {
        if export.name.len() > super::proto::MAX_STRING || export.name.contains('\0') {
            return Err(Error::InvalidArgument(format!(
                "the export name must be at most {} bytes without NUL characters",
                super::proto::MAX_STRING
            )));
        }
        if options.max_clients == 0 {
            return Err(Error::InvalidArgument(
                "the server must accept at least one client".into(),
            ));
        }
        let name = percent_encode(export.name.as_bytes(), false);
        let (listener, address, uri) = match addr {
            ListenAddr::Tcp(a) => {
                let net = |e| Error::Network {
                    op: "listen on",
                    address: a.clone(),
                    source: e,
                };
                let l = TcpListener::bind(a.as_str()).map_err(net)?;
                let local = l.local_addr().map_err(net)?;
                let uri = format!("nbd://{local}/{name}");
                (Listener::Tcp(l), local.to_string(), uri)
            }
            ListenAddr::Unix(p) => {
                let abs = std::path::absolute(p).map_err(|e| Error::io("listen on", p, e))?;
                let l = LocalListener::bind(&abs).map_err(|e| Error::io("listen on", &abs, e))?;
                let socket = percent_encode(abs.as_os_str().as_encoded_bytes(), true);
                let uri = format!("nbd+unix:///{name}?socket={socket}");
                (Listener::Local(l), abs.display().to_string(), uri)
            }
        };
        Ok(Server {
            listener,
            export,
            options,
            address,
            uri,
        })
    }

    /// The NBD URI clients connect to (`nbd://127.0.0.1:10809/NAME`,
    /// `nbd+unix:///NAME?socket=/run/x.sock`).
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The address listened on: `IP:PORT` (the real port when 0 was asked) or the socket
    /// path.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The Unix socket path, when listening on one.
    pub fn socket_path(&self) -> Option<&Path> {
        match &self.listener {
            Listener::Local(_) => Some(Path::new(&self.address)),
            Listener::Tcp(_) => None,
        }
    }

    /// Serves clients until `stop` becomes true, then closes every connection (after
    /// letting each finish the request it is serving) and removes the Unix socket file.
    pub fn run(self, stop: &AtomicBool, events: &dyn Events) -> Result<ServeSummary> {
        self.listener
            .set_nonblocking()
            .map_err(|e| Error::Network {
                op: "listen on",
                address: self.address.clone(),
                source: e,
            })?;
        let registry: Mutex<Vec<(u64, Stream)>> = Mutex::new(Vec::new());
        let stopping = AtomicBool::new(false);
        let mut summary = ServeSummary::default();
        let lock = || registry.lock().unwrap_or_else(|p| p.into_inner());
        std::thread::scope(|scope| {
            let mut next_id = 1u64;
            while !stop.load(Ordering::SeqCst) {
                let (stream, peer) = match self.listener.accept() {
                    Ok(c) => c,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(ACCEPT_POLL);
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // Out of descriptors, a connection reset before accept, …: go on.
                        events.accept_failed(&Error::Network {
                            op: "accept a connection on",
                            address: self.address.clone(),
                            source: e,
                        });
                        std::thread::sleep(ACCEPT_POLL);
                        continue;
                    }
                };
                let mut reg = lock();
                if reg.len() >= self.options.max_clients {
                    drop(reg);
                    stream.shutdown(Shutdown::Both);
                    summary.refused += 1;
                    let why = format!(
                        "{} clients are connected, the most this server accepts",
                        self.options.max_clients
                    );
                    events.refused(&peer, &why);
                    continue;
                }
                let id = next_id;
                next_id += 1;
                let client = Client { id, peer };
                let handle = match stream.try_clone() {
                    Ok(h) => h,
                    Err(e) => {
                        drop(reg);
                        stream.shutdown(Shutdown::Both);
                        events.accept_failed(&Error::Network {
                            op: "set up the connection of",
                            address: format!("client {id} ({})", client.peer),
                            source: e,
                        });
                        continue;
                    }
                };
                reg.push((id, handle));
                drop(reg);
                summary.clients += 1;
                events.connected(&client);
                let (export, options, stopping, registry) =
                    (&self.export, &self.options, &stopping, &registry);
                let spawned = std::thread::Builder::new()
                    .name(format!("nbd-client-{id}"))
                    .spawn_scoped(scope, move || {
                        let (end, stats) =
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                serve_client(stream, &client, export, options, events, stopping)
                            }))
                            .unwrap_or_else(|_| {
                                let e = Error::internal(
                                    "NBD server",
                                    format!("the thread serving {} panicked", client_name(&client)),
                                );
                                (SessionEnd::Failed(e), SessionStats::default())
                            });
                        registry
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .retain(|(i, _)| *i != id);
                        events.disconnected(&client, &end, &stats);
                    });
                if let Err(e) = spawned {
                    let mut reg = lock();
                    if let Some(pos) = reg.iter().position(|(i, _)| *i == id) {
                        reg.remove(pos).1.shutdown(Shutdown::Both);
                    }
                    events.accept_failed(&Error::Network {
                        op: "start a thread for",
                        address: format!("client {id}"),
                        source: e,
                    });
                }
            }
            // Stop: no more requests are read; replies being written still go out.
            stopping.store(true, Ordering::SeqCst);
            for (_, s) in lock().iter() {
                s.shutdown(Shutdown::Read);
            }
            let deadline = Instant::now() + STOP_GRACE;
            while !lock().is_empty() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            for (_, s) in lock().iter() {
                s.shutdown(Shutdown::Both);
            }
        });
        Ok(summary)
    }
}

fn client_name(client: &Client) -> String {
    format!("client {} ({})", client.id, client.peer)
}

fn client_io(client: &Client, source: io::Error) -> Error {
    Error::Network {
        op: "serve",
        address: client_name(client),
        source,
    }
}

/// One client's whole session, over its connection.
fn serve_client(
    stream: Stream,
    client: &Client,
    export: &Export,
    options: &ServerOptions,
    events: &dyn Events,
    stopping: &AtomicBool,
) -> (SessionEnd, SessionStats) {
    let mut stats = SessionStats::default();
    let fault = |f: Fault, in_handshake: bool| match f {
        Fault::Io(e)
            if in_handshake
                && matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
        {
            Error::NbdProtocol {
                client: client_name(client),
                detail: format!(
                    "it did not finish its handshake within {} s",
                    options.handshake_timeout.as_secs_f64()
                ),
            }
        }
        Fault::Io(e) => client_io(client, e),
        Fault::Protocol(detail) => Error::NbdProtocol {
            client: client_name(client),
            detail,
        },
        Fault::Volume(e) => e,
    };
    let writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => return (SessionEnd::Failed(client_io(client, e)), stats),
    };
    let closer = match stream.try_clone() {
        Ok(c) => c,
        Err(e) => return (SessionEnd::Failed(client_io(client, e)), stats),
    };
    let poll = READ_POLL
        .min(options.handshake_timeout)
        .max(Duration::from_millis(1));
    if let Err(e) = stream.set_read_timeout(Some(poll)) {
        return (SessionEnd::Failed(client_io(client, e)), stats);
    }
    let reader = PolledReader {
        stream,
        stopping,
        deadline: Instant::now().checked_add(options.handshake_timeout),
    };
    let mut r = BufReader::with_capacity(64 << 10, reader);
    let mut w = BufWriter::with_capacity(256 << 10, writer);
    let end = match handshake(&mut r, &mut w, export) {
        Ok(Handshake::Go(negotiated)) => {
            stats.transmission = true;
            r.get_mut().deadline = None;
            let mut t = Transmitter {
                w: &mut w,
                export,
                negotiated,
                client,
                events,
                stats: &mut stats,
                piece: Vec::new(),
            };
            match t.run(&mut r) {
                Ok(Transmission::Disconnected) => SessionEnd::Disconnected,
                Ok(Transmission::Closed) => SessionEnd::Closed,
                Err(f) => SessionEnd::Failed(fault(f, false)),
            }
        }
        Ok(Handshake::Aborted) => SessionEnd::Aborted,
        Ok(Handshake::Closed) => SessionEnd::Closed,
        Err(f) => SessionEnd::Failed(fault(f, true)),
    };
    let _ = w.flush();
    closer.shutdown(Shutdown::Both);
    let end = match end {
        SessionEnd::Closed | SessionEnd::Failed(_) if stopping.load(Ordering::SeqCst) => {
            SessionEnd::Stopped
        }
        e => e,
    };
    (end, stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_by_syntax() {
        for tcp in ["127.0.0.1:10809", "localhost:0", "[::1]:10809"] {
            assert_eq!(ListenAddr::parse(tcp).unwrap(), ListenAddr::Tcp(tcp.into()));
        }
        for unix in ["./nbd.sock", "/run/volback:1.sock"] {
            assert_eq!(
                ListenAddr::parse(unix).unwrap(),
                ListenAddr::Unix(unix.into())
            );
        }
        for bad in [
            "nbd.sock",
            ":10809",
            "host:",
            "host:99999",
            "::1:10809",
            "host:port",
        ] {
            assert!(ListenAddr::parse(bad).is_err(), "{bad}");
        }
    }

    /// Records session ends.
    #[derive(Default)]
    struct Record(Mutex<Vec<String>>);

    impl Events for Record {
        fn disconnected(&self, client: &Client, end: &SessionEnd, _stats: &SessionStats) {
            let what = match end {
                SessionEnd::Failed(e) => crate::error::chain(e),
                e => format!("{e:?}"),
            };
            self.0
                .lock()
                .unwrap()
                .push(format!("{}: {what}", client.id));
        }
    }

    #[test]
    fn silent_clients_are_dropped_after_the_handshake_timeout_and_stop_ends_sessions() {
        let export = Export {
            name: "x".into(),
            description: String::new(),
            volume: std::sync::Arc::new(crate::nbd::testing::Mem {
                bytes: vec![7; 4096],
                data: std::iter::once(0..4096).collect(),
                bad: None,
            }),
        };
        let options = ServerOptions {
            max_clients: 4,
            handshake_timeout: Duration::from_millis(100),
        };
        let addr = ListenAddr::parse("127.0.0.1:0").unwrap();
        let server = Server::bind(&addr, export, options).unwrap();
        assert!(server.uri().starts_with("nbd://127.0.0.1:"));
        assert!(server.uri().ends_with("/x"));
        assert_eq!(server.socket_path(), None);
        let port: u16 = server
            .address()
            .rsplit_once(':')
            .unwrap()
            .1
            .parse()
            .unwrap();
        let stop = AtomicBool::new(false);
        let events = Record::default();
        std::thread::scope(|s| {
            let running = s.spawn(|| server.run(&stop, &events));
            let guard = Some(Duration::from_secs(30));
            // A client that never answers the greeting.
            let mut silent = TcpStream::connect(("127.0.0.1", port)).unwrap();
            silent.set_read_timeout(guard).unwrap();
            let mut greeting = [0u8; 18];
            silent.read_exact(&mut greeting).unwrap();
            assert_eq!(
                silent.read(&mut [0u8; 1]).unwrap(),
                0,
                "closed after the timeout"
            );
            // A client that finished its handshake is not subject to the timeout; it is
            // disconnected when the server stops.
            // Its whole handshake is sent at once, before the greeting is read: it waits in
            // the socket when the server reads, however late the server thread runs.
            let mut idle = TcpStream::connect(("127.0.0.1", port)).unwrap();
            idle.set_read_timeout(guard).unwrap();
            let mut go = 3u32.to_be_bytes().to_vec();
            go.extend_from_slice(&super::super::proto::IHAVEOPT.to_be_bytes());
            go.extend_from_slice(&super::super::proto::OPT_EXPORT_NAME.to_be_bytes());
            go.extend_from_slice(&0u32.to_be_bytes());
            idle.write_all(&go).unwrap();
            idle.read_exact(&mut greeting).unwrap();
            let mut export_info = [0u8; 10];
            idle.read_exact(&mut export_info).unwrap();
            stop.store(true, Ordering::SeqCst);
            let summary = running.join().unwrap().unwrap();
            assert_eq!(summary.clients, 2);
            assert_eq!(idle.read(&mut [0u8; 1]).unwrap(), 0, "closed by the stop");
        });
        let mut ends = events.0.into_inner().unwrap();
        ends.sort();
        assert_eq!(ends.len(), 2, "{ends:?}");
        assert!(
            ends[0].starts_with("1: ") && ends[0].contains("handshake within 0.1 s"),
            "{ends:?}"
        );
        assert_eq!(ends[1], "2: Stopped");
    }

    #[test]
    fn uris_are_percent_encoded() {
        assert_eq!(percent_encode(b"disk 1/a", false), "disk%201%2Fa");
        assert_eq!(percent_encode(b"/tmp/a b.sock", true), "/tmp/a%20b.sock");
    }
}
