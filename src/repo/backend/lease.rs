//! Locks and writer markers as *leases* on a store without file locks (object stores).
//!
//! A lease is an object that its holder keeps rewriting. It says "I am alive" for as long as
//! the store's own clock shows it was rewritten recently; a holder that dies stops rewriting
//! it, and after a while every other process may judge it dead, delete it and go on.
//!
//! Everything here works over any [`WriteBackend`] through its object primitives only (`get`,
//! `head`, `list`, `put`, `delete`), never through its lock, marker or log methods: the S3
//! backend's [`WriteBackend::lock_exclusive`], [`WriteBackend::lock_held`],
//! [`WriteBackend::create_marker`] and [`WriteBackend::live_markers`] delegate here.
//!
//! # Objects
//!
//! - Lock `name` (`volume/<stem>`, `prune`) is the set of objects `locks/<name>/<lease id>`
//!   (lease id: 16 random bytes, hex). Content: JSON `{"host", "pid", "started", "what",
//!   "ttl_secs"}`, used for the message of a refused contender and for the holder's TTL.
//! - Writer marker `<id>` is the object `writers/<id>`; its content is the caller's payload,
//!   unchanged (other code parses it), so an observer judges markers with its *own* TTL: every
//!   process using one repository must use the same `VOLBACK_LEASE_SECS`.
//! - `locks/.probe-<random>`: an empty object an observer that holds no lease writes, stats and
//!   deletes to learn the store's clock.
//!
//! # Liveness: the server's clock only
//!
//! A lease is live when `server_now − modified(lease) ≤ ttl + grace`, where `modified` is the
//! store's `LastModified` and `server_now` is the `LastModified` of an object the observer
//! itself has just written (its own lease, or a probe) *before* it listed. No local clock is
//! ever compared with the server's: clock offsets between machines do not matter, and
//! `server_now` can only be earlier than the real time of the listing, which makes leases
//! look younger, never older.
//!
//! # Self-fencing of the holder
//!
//! A thread rewrites the lease every `ttl / 6` (first checking that it still exists: an
//! observer that judged it dead deletes it). The holder counts from the *start* of its last
//! successful rewrite, on the monotonic clock: after `ttl − margin` without another one, or
//! once a rewrite found the object gone, [`LockGuard::check`] and [`Marker::check`] fail with
//! [`Error::LeaseLost`] and the holder must stop before doing anything the lease protects
//! (it calls `check` before each such step). An observer deletes the lease only when its
//! `LastModified` is more than `ttl + grace` behind the observer's server time. The rewrite
//! the holder last relied on started before the server stamped it, so the holder stopped
//! relying on the lease at least `grace + margin` before anyone may take it over; that gap
//! covers request latency (a request must give up within `margin`), and clock *rate* drift.
//! A holder never renews once it has let its lease lapse (the loss is final), so a late
//! rewrite cannot revive a lease someone else has already judged dead.
//!
//! # Why exclusion holds (write-then-list)
//!
//! To take lock `name`, a contender (1) PUTs its own lease, (2) LISTs `locks/<name>/`, (3)
//! holds the lock if the listing shows no *other live* lease; otherwise it DELETEs its own
//! lease (and tries once more after a random 0.5–2 s, then reports who holds the lock).
//! Suppose A and B both hold it. Each PUT precedes its own LIST. Order the two LISTs as the
//! store linearizes them and say B's came second: B's LIST came after A's LIST, which came
//! after A's PUT, so B's LIST saw A's lease, and (A being alive) judged it live: B backed off.
//! Contradiction. Two contenders that see each other both back off (no one holds the lock,
//! never two); the random retry breaks the tie.
//!
//! What this requires of the store: **linearizable PUT, DELETE and LIST** (a completed PUT is
//! in every listing that starts after it; a completed DELETE in none), and a `LastModified`
//! that the store stamps from one clock running at a sane rate. AWS S3 (since 2020-12),
//! MinIO and Garage in its default `consistency_mode = "consistent"` give this. Conditional
//! writes (`If-None-Match`) are not needed: Garage 2.5.0 ignores them on PutObject.

use super::{LockGuard, Marker, ObjectMeta, PutMode, WriteBackend};
use crate::error::{Error, Result};
use crate::repo::fsio::random_hex;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

/// Largest lease object read (against hostile objects).
const LEASE_LIMIT: u64 = 64 << 10;
/// Largest writer marker read (the limit of `writers.rs`).
const MARKER_LIMIT: u64 = 16 << 20;
/// Default time to live of a lease.
const DEFAULT_TTL: Duration = Duration::from_secs(600);
/// Largest TTL accepted from the environment or believed from a lease object.
const MAX_TTL_SECS: u64 = 7 * 24 * 3600;
/// The environment variable that sets the TTL in seconds (tests use small values).
pub const LEASE_SECS_ENV: &str = "VOLBACK_LEASE_SECS";

/// The times of a lease: how long it lives after a rewrite, how long an observer waits beyond
/// that, and how early the holder stops trusting it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTimes {
    /// Time to live: the holder rewrites the lease every `ttl / 6`.
    pub ttl: Duration,
    /// Observers judge a lease dead only `ttl + grace` after its last rewrite.
    pub grace: Duration,
    /// The holder stops trusting its lease `ttl − margin` after its last successful rewrite
    /// started.
    pub margin: Duration,
}

impl Default for LeaseTimes {
    fn default() -> Self {
        LeaseTimes::for_ttl(DEFAULT_TTL)
    }
}

impl LeaseTimes {
    /// The times for `ttl`, grace and margin scaled as the defaults (10 min, 5 min, 2 min).
    pub fn for_ttl(ttl: Duration) -> LeaseTimes {
        LeaseTimes {
            ttl,
            grace: ttl / 2,
            margin: ttl / 5,
        }
    }

    /// The defaults, or `VOLBACK_LEASE_SECS=N` (ttl N seconds, the rest scaled).
    pub fn from_env() -> Result<LeaseTimes> {
        match std::env::var(LEASE_SECS_ENV) {
            Err(std::env::VarError::NotPresent) => Ok(LeaseTimes::default()),
            Ok(s) => match s.trim().parse::<u64>() {
                Ok(n) if (1..=MAX_TTL_SECS).contains(&n) => {
                    Ok(LeaseTimes::for_ttl(Duration::from_secs(n)))
                }
                _ => Err(Error::InvalidArgument(format!(
                    "{LEASE_SECS_ENV}={s:?}: expected a number of seconds from 1 to {MAX_TTL_SECS}"
                ))),
            },
            Err(std::env::VarError::NotUnicode(s)) => Err(Error::InvalidArgument(format!(
                "{LEASE_SECS_ENV}={s:?}: expected a number of seconds"
            ))),
        }
    }

    /// How often the holder rewrites its lease.
    pub fn refresh_every(&self) -> Duration {
        self.ttl / 6
    }

    /// How long after its last rewrite (server time) a lease counts as live.
    fn lifetime(&self) -> Duration {
        self.ttl.saturating_add(self.grace)
    }

    /// How long after the start of its last successful rewrite the holder trusts its lease.
    fn valid_for(&self) -> Duration {
        self.ttl.saturating_sub(self.margin)
    }
}

/// The content of a lock's lease object.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
struct LeaseInfo {
    host: String,
    pid: u32,
    started: String,
    what: String,
    ttl_secs: u64,
}

impl LeaseInfo {
    fn describe(&self) -> String {
        format!(
            "{} on host {} (pid {}) since {}",
            if self.what.is_empty() {
                "an operation"
            } else {
                &self.what
            },
            self.host,
            self.pid,
            self.started
        )
    }
}

/// What an observer found in a lease object it listed.
enum Seen {
    /// Deleted between the listing and the read.
    Gone,
    Info(LeaseInfo),
    /// Not a lease this build can parse: judged with the observer's own TTL.
    Unreadable,
}

fn read_lease(store: &dyn WriteBackend, name: &str) -> Result<Seen> {
    match store.get(name, LEASE_LIMIT, "lease") {
        Ok(bytes) => Ok(match serde_json::from_slice::<LeaseInfo>(&bytes) {
            Ok(info) => Seen::Info(info),
            Err(_) => Seen::Unreadable,
        }),
        Err(e) if is_not_found(&e) => Ok(Seen::Gone),
        Err(Error::Corrupt { .. }) => Ok(Seen::Unreadable),
        Err(e) => Err(e),
    }
}

fn is_not_found(e: &Error) -> bool {
    matches!(e, Error::Io { source, .. } | Error::IoAt { source, .. }
        if source.kind() == std::io::ErrorKind::NotFound)
}

/// Whether an object last written at `modified` is live at `server_now` for `lifetime`. An
/// object without a time, or written after `server_now`, cannot be proved dead.
fn is_live(server_now: SystemTime, modified: Option<SystemTime>, lifetime: Duration) -> bool {
    match modified.map(|m| server_now.duration_since(m)) {
        Some(Ok(age)) => age <= lifetime,
        Some(Err(_)) | None => true,
    }
}

/// Whether the lease `seen` belongs to a process of this machine (same host name) that no
/// longer runs: a backup killed here need not wait for its lease to expire. A process that
/// still runs under that pid (even a new one that reused it) keeps the lease live: the safe
/// reading. Machines sharing a repository must have distinct host names (docs/OBJECT-STORAGE.md).
fn holder_died_here(seen: &Seen) -> bool {
    match seen {
        Seen::Info(info) => {
            info.pid != 0
                && info.pid != std::process::id()
                && info.host == crate::platform::hostname()
                && crate::platform::process_gone(info.pid)
        }
        _ => false,
    }
}

/// The lifetime of a lease whose content is `seen`, as judged by an observer using `times`.
fn lifetime_of(seen: &Seen, times: LeaseTimes) -> Duration {
    match seen {
        Seen::Info(info) if info.ttl_secs > 0 => {
            LeaseTimes::for_ttl(Duration::from_secs(info.ttl_secs.min(MAX_TTL_SECS))).lifetime()
        }
        _ => times.lifetime(),
    }
}

fn store_error(store: &dyn WriteBackend, name: &str, op: &'static str, why: &str) -> Error {
    Error::io(
        op,
        store.display_path(name),
        std::io::Error::other(why.to_string()),
    )
}

/// Lock names and marker ids: `/`-separated non-empty components of `[A-Za-z0-9._-]`, none
/// `.` or `..` or starting with `.` (the probe's prefix).
fn check_name(kind: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name
            .split('/')
            .all(|c| !c.is_empty() && !c.starts_with('.'))
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::internal(
            "lease",
            format!("invalid {kind} name {name:?}"),
        ))
    }
}

fn lock_dir(name: &str) -> String {
    format!("locks/{name}")
}

/// The store's clock now: the `LastModified` of a probe object written for it (and deleted).
fn server_clock(store: &dyn WriteBackend) -> Result<SystemTime> {
    let probe = format!("locks/.probe-{}", random_hex(16));
    store.put(&probe, b"", PutMode::Overwrite)?;
    let meta = store.head(&probe);
    let _ = store.delete(&probe);
    match meta? {
        Some(ObjectMeta {
            modified: Some(t), ..
        }) => Ok(t),
        Some(_) => Err(store_error(
            store,
            &probe,
            "read the time of",
            "the store gives objects no modification time, which leases need",
        )),
        None => Err(store_error(
            store,
            &probe,
            "read",
            "an object just written is not there: leases need a store with read-after-write consistency",
        )),
    }
}

/// Every object directly under `dir`.
fn list_all(store: &dyn WriteBackend, dir: &str) -> Result<Vec<ObjectMeta>> {
    let mut out = Vec::new();
    store.list(dir, &mut |m| {
        out.push(m);
        Ok(())
    })?;
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// A held lease and its refresher

/// What the holder knows about its lease.
#[derive(Debug)]
struct Status {
    /// Start (monotonic) of the last successful write of the lease.
    last_ok: Instant,
    /// Why the lease is lost, once it is (final).
    lost: Option<String>,
}

/// The part of a lease its refresher thread shares.
struct Shared {
    store: Arc<dyn WriteBackend>,
    /// The lease object.
    key: String,
    times: LeaseTimes,
    /// The bytes the lease holds; locked during every PUT of the lease, so that a refresh
    /// never writes back a payload a [`Marker::write`] has just replaced.
    content: Mutex<Vec<u8>>,
    status: Mutex<Status>,
}

/// Outcome of one refresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refreshed {
    Renewed,
    /// The store failed; the next refresh tries again.
    Failed,
    /// The lease is lost for good: the refresher stops.
    Lost,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    fn expired(&self, status: &Status, now: Instant) -> bool {
        now.saturating_duration_since(status.last_ok) > self.times.valid_for()
    }

    fn lapse_message(&self, status: &Status, now: Instant) -> String {
        format!(
            "it could not be renewed for {} s, longer than the {} s it may be trusted",
            now.saturating_duration_since(status.last_ok).as_secs(),
            self.times.valid_for().as_secs()
        )
    }

    /// Marks the lease lost (if it is not already) because it lapsed at `now`.
    fn lapse(&self, now: Instant) -> bool {
        let mut status = lock(&self.status);
        if status.lost.is_none() && self.expired(&status, now) {
            status.lost = Some(self.lapse_message(&status, now));
        }
        status.lost.is_some()
    }

    /// One rewrite of the lease; `clock` gives its start (after any wait for a
    /// [`Marker::write`] in flight, so that the wait counts against the lease).
    fn refresh(&self, clock: &dyn Fn() -> Instant) -> Refreshed {
        let content = lock(&self.content);
        let now = clock();
        if self.lapse(now) {
            return Refreshed::Lost;
        }
        match self.store.head(&self.key) {
            Ok(Some(_)) => {}
            Ok(None) => {
                lock(&self.status).lost.get_or_insert_with(|| {
                    "another process removed it, judging it expired".to_string()
                });
                return Refreshed::Lost;
            }
            Err(_) => return Refreshed::Failed,
        }
        match self.store.put(&self.key, &content, PutMode::Overwrite) {
            Ok(()) => {
                let mut status = lock(&self.status);
                if status.lost.is_some() {
                    return Refreshed::Lost;
                }
                status.last_ok = status.last_ok.max(now);
                Refreshed::Renewed
            }
            Err(_) => Refreshed::Failed,
        }
    }

    fn check_at(&self, now: Instant) -> Result<()> {
        let status = lock(&self.status);
        let detail = match &status.lost {
            Some(why) => why.clone(),
            None if self.expired(&status, now) => self.lapse_message(&status, now),
            None => return Ok(()),
        };
        Err(Error::LeaseLost {
            path: self.store.display_path(&self.key),
            detail,
        })
    }

    /// Replaces the content (a marker's payload): one PUT, which also renews the lease.
    fn replace(&self, payload: &[u8]) -> Result<()> {
        let mut content = lock(&self.content);
        let now = Instant::now();
        self.check_at(now)?;
        self.store.put(&self.key, payload, PutMode::Overwrite)?;
        *content = payload.to_vec();
        let mut status = lock(&self.status);
        if status.lost.is_none() {
            status.last_ok = status.last_ok.max(now);
        }
        Ok(())
    }
}

/// The refresher thread of a lease; stopped (and joined) when dropped.
struct Refresher {
    stop: Option<crossbeam_channel::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Refresher {
    fn start(shared: Arc<Shared>) -> Result<Refresher> {
        let (stop, stopped) = crossbeam_channel::bounded::<()>(1);
        let every = shared.times.refresh_every();
        let path = shared.store.display_path(&shared.key);
        let thread = std::thread::Builder::new()
            .name("lease-refresh".into())
            .spawn(move || {
                // Disconnected (the lease was dropped) or a message: stop.
                while let Err(crossbeam_channel::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(every)
                {
                    if shared.refresh(&Instant::now) == Refreshed::Lost {
                        break;
                    }
                }
            })
            .map_err(|e| Error::io("start the refresh thread of", path, e))?;
        Ok(Refresher {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Refresher {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            // Waits for a refresh in flight, so that it cannot recreate the lease after the
            // holder deleted it.
            let _ = t.join();
        }
    }
}

/// A lease this process holds (a lock or a writer marker). Dropping it stops the refresher and
/// deletes the lease object (a failure is ignored: the lease expires).
pub struct Lease {
    shared: Arc<Shared>,
    refresher: Option<Refresher>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("key", &self.shared.key)
            .field("times", &self.shared.times)
            .field("status", &*lock(&self.shared.status))
            .finish()
    }
}

impl Lease {
    /// A lease whose object `key` was written with `content`, the write having started at
    /// `started`; not refreshed until [`Lease::start_refresher`].
    fn held(
        store: Arc<dyn WriteBackend>,
        key: String,
        content: Vec<u8>,
        started: Instant,
        times: LeaseTimes,
    ) -> Lease {
        Lease {
            shared: Arc::new(Shared {
                store,
                key,
                times,
                content: Mutex::new(content),
                status: Mutex::new(Status {
                    last_ok: started,
                    lost: None,
                }),
            }),
            refresher: None,
        }
    }

    fn start_refresher(mut self) -> Result<Lease> {
        self.refresher = Some(Refresher::start(self.shared.clone())?);
        Ok(self)
    }

    /// The lease object's name.
    pub fn key(&self) -> &str {
        &self.shared.key
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        drop(self.refresher.take());
        let _ = self.shared.store.delete(&self.shared.key);
    }
}

impl LockGuard for Lease {
    fn check(&self) -> Result<()> {
        self.shared.check_at(Instant::now())
    }
}

impl Marker for Lease {
    fn write(&mut self, payload: &[u8]) -> Result<()> {
        self.shared.replace(payload)
    }

    fn check(&self) -> Result<()> {
        self.shared.check_at(Instant::now())
    }
}

// ---------------------------------------------------------------------------------------------
// Locks

/// A contender for lock `name` whose lease is written but not yet judged.
struct Contender {
    store: Arc<dyn WriteBackend>,
    name: String,
    key: String,
    content: Vec<u8>,
    started: Instant,
    times: LeaseTimes,
}

impl Contender {
    /// Step 1: PUT own lease.
    fn put(
        store: &Arc<dyn WriteBackend>,
        name: &str,
        what: &str,
        times: LeaseTimes,
    ) -> Result<Contender> {
        let info = LeaseInfo {
            host: crate::platform::hostname(),
            pid: std::process::id(),
            started: crate::time::rfc3339(crate::time::now_unix()),
            what: what.to_string(),
            ttl_secs: times.ttl.as_secs().max(1),
        };
        let content = serde_json::to_vec(&info)
            .map_err(|e| Error::internal("lease", format!("cannot encode a lease: {e}")))?;
        let key = format!("{}/{}", lock_dir(name), random_hex(16));
        let started = Instant::now();
        store.put(&key, &content, PutMode::Overwrite)?;
        Ok(Contender {
            store: store.clone(),
            name: name.to_string(),
            key,
            content,
            started,
            times,
        })
    }

    /// Steps 2 and 3: LIST, judge the other leases (deleting stale ones), and either hold the
    /// lock or delete own lease and say who holds it.
    fn decide(self) -> Result<std::result::Result<Lease, String>> {
        match self.judge() {
            Ok(None) => Ok(Ok(self.into_lease())),
            Ok(Some(holder)) => {
                self.store.delete(&self.key)?;
                Ok(Err(holder))
            }
            Err(e) => {
                // Own lease must not stay behind (it would block everyone until it expires).
                let _ = self.store.delete(&self.key);
                Err(e)
            }
        }
    }

    fn into_lease(self) -> Lease {
        Lease::held(self.store, self.key, self.content, self.started, self.times)
    }

    /// The holder's description when another live lease exists.
    fn judge(&self) -> Result<Option<String>> {
        let store = &*self.store;
        let listed = list_all(store, &lock_dir(&self.name))?;
        let own = listed.iter().find(|m| m.name == self.key).ok_or_else(|| {
            store_error(
                store,
                &self.key,
                "find",
                "the store does not list a lease just written: leases need a store whose \
                 listings show every completed write",
            )
        })?;
        let server_now = own.modified.ok_or_else(|| {
            store_error(
                store,
                &self.key,
                "read the time of",
                "the store gives objects no modification time, which leases need",
            )
        })?;
        let mut holder = None;
        for m in listed.iter().filter(|m| m.name != self.key) {
            let seen = read_lease(store, &m.name)?;
            if matches!(seen, Seen::Gone) {
                continue;
            }
            if is_live(server_now, m.modified, lifetime_of(&seen, self.times))
                && !holder_died_here(&seen)
            {
                if holder.is_none() {
                    holder = Some(match &seen {
                        Seen::Info(info) => info.describe(),
                        _ => format!("an unreadable lease {}", m.name),
                    });
                }
            } else {
                // Stale: its holder is gone. Best effort; the next contender tries again.
                let _ = store.delete(&m.name);
            }
        }
        Ok(holder)
    }
}

/// Tries to take lock `name`; with `retry_after`, once more after that delay when it is held.
fn acquire(
    store: &Arc<dyn WriteBackend>,
    name: &str,
    what: &str,
    times: LeaseTimes,
    retry_after: Option<&dyn Fn() -> Duration>,
) -> Result<Lease> {
    check_name("lock", name)?;
    let mut holder = match Contender::put(store, name, what, times)?.decide()? {
        Ok(lease) => return Ok(lease),
        Err(holder) => holder,
    };
    if let Some(delay) = retry_after {
        std::thread::sleep(delay());
        match Contender::put(store, name, what, times)?.decide()? {
            Ok(lease) => return Ok(lease),
            Err(h) => holder = h,
        }
    }
    Err(Error::Locked {
        path: store.display_path(&lock_dir(name)),
        detail: format!("held by {holder}"),
    })
}

/// A random delay of 0.5–2 s before the one retry of a contender that found the lock held.
fn random_backoff() -> Duration {
    let mut b = [0u8; 2];
    let r = getrandom::fill(&mut b)
        .map(|()| u16::from_le_bytes(b))
        .unwrap_or(0x8000);
    Duration::from_millis(500 + u64::from(r) % 1501)
}

/// Takes lock `name` exclusively without waiting (one retry after a random 0.5–2 s), holding
/// it as a lease refreshed by a thread until the guard is dropped. Held by another live
/// lease: [`Error::Locked`] naming the holder's operation, host, pid and start time.
pub fn lock_exclusive(
    store: Arc<dyn WriteBackend>,
    name: &str,
    what: &str,
) -> Result<Box<dyn LockGuard>> {
    let times = LeaseTimes::from_env()?;
    let lease = acquire(&store, name, what, times, Some(&random_backoff))?;
    Ok(Box::new(lease.start_refresher()?))
}

/// Whether lock `name` is held by a live lease now. Takes nothing and deletes nothing (it
/// writes and deletes one probe object to read the store's clock).
pub fn lock_held(store: &dyn WriteBackend, name: &str) -> Result<bool> {
    lock_held_with(store, name, LeaseTimes::from_env()?)
}

fn lock_held_with(store: &dyn WriteBackend, name: &str, times: LeaseTimes) -> Result<bool> {
    check_name("lock", name)?;
    let server_now = server_clock(store)?;
    for m in list_all(store, &lock_dir(name))? {
        let seen = read_lease(store, &m.name)?;
        if !matches!(seen, Seen::Gone)
            && is_live(server_now, m.modified, lifetime_of(&seen, times))
            && !holder_died_here(&seen)
        {
            return Ok(true);
        }
    }
    Ok(false)
}

// ---------------------------------------------------------------------------------------------
// Writer markers

/// Creates this process's writer marker `writers/<id>` holding `payload` (as is), refreshed by
/// re-writing the same payload until the marker is dropped, which deletes it.
pub fn create_marker(
    store: Arc<dyn WriteBackend>,
    id: &str,
    payload: &[u8],
) -> Result<Box<dyn Marker>> {
    let lease = put_marker(store, id, payload, LeaseTimes::from_env()?)?;
    Ok(Box::new(lease.start_refresher()?))
}

fn put_marker(
    store: Arc<dyn WriteBackend>,
    id: &str,
    payload: &[u8],
    times: LeaseTimes,
) -> Result<Lease> {
    check_name("writer marker", id)?;
    if id.contains('/') {
        return Err(Error::internal(
            "lease",
            format!("invalid writer marker name {id:?}"),
        ));
    }
    let key = format!("writers/{id}");
    let started = Instant::now();
    store.put(&key, payload, PutMode::Overwrite)?;
    Ok(Lease::held(store, key, payload.to_vec(), started, times))
}

/// The markers of live writers, `(id, payload)`. Expired markers are deleted (best effort)
/// and not returned; a marker deleted between the listing and its read is skipped; one that
/// cannot be read as a marker (larger than the limit) is `(id, None)`.
pub fn live_markers(store: &dyn WriteBackend) -> Result<Vec<(String, Option<Vec<u8>>)>> {
    live_markers_with(store, LeaseTimes::from_env()?)
}

fn live_markers_with(
    store: &dyn WriteBackend,
    times: LeaseTimes,
) -> Result<Vec<(String, Option<Vec<u8>>)>> {
    let server_now = server_clock(store)?;
    let mut live = Vec::new();
    for m in list_all(store, "writers")? {
        let id = m.name.rsplit('/').next().unwrap_or(&m.name).to_string();
        if !is_live(server_now, m.modified, times.lifetime()) {
            let _ = store.delete(&m.name);
            continue;
        }
        match store.get(&m.name, MARKER_LIMIT, "writer marker") {
            Ok(bytes) => live.push((id, Some(bytes))),
            Err(e) if is_not_found(&e) => {}
            Err(Error::Corrupt { .. }) => live.push((id, None)),
            Err(e) => return Err(e),
        }
    }
    Ok(live)
}

// ---------------------------------------------------------------------------------------------
// Tests

/// A store in memory whose clock the test sets, with failures on demand (unit tests of this
/// module and of `segments`).
#[cfg(test)]
pub(crate) mod mem {
    use super::super::{Capabilities, Log, LogMode, ObjectMeta, PutMode, ReadBackend, Staged};
    use super::*;
    use std::collections::BTreeMap;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[derive(Debug)]
    pub struct MemStore {
        caps: Capabilities,
        objects: Mutex<BTreeMap<String, (Vec<u8>, SystemTime)>>,
        clock: Mutex<SystemTime>,
        /// Every PUT fails.
        pub fail_puts: AtomicBool,
        /// Deletes left before every DELETE fails (`None`: no limit).
        pub deletes_left: Mutex<Option<usize>>,
        /// A GET of this object deletes it first (deleted between list and get).
        pub vanish_on_get: Mutex<Option<String>>,
    }

    impl MemStore {
        pub fn new() -> Arc<MemStore> {
            Arc::new(MemStore {
                caps: Capabilities {
                    file_locks: false,
                    cheap_ranged_reads: false,
                    parallelism: 1,
                },
                objects: Mutex::new(BTreeMap::new()),
                clock: Mutex::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)),
                fail_puts: AtomicBool::new(false),
                deletes_left: Mutex::new(None),
                vanish_on_get: Mutex::new(None),
            })
        }

        /// Moves the server's clock forward.
        pub fn advance(&self, d: Duration) {
            *lock(&self.clock) += d;
        }

        /// Names of the objects starting with `prefix`.
        pub fn names(&self, prefix: &str) -> Vec<String> {
            lock(&self.objects)
                .keys()
                .filter(|k| k.starts_with(prefix))
                .cloned()
                .collect()
        }

        pub fn raw(&self, name: &str) -> Option<Vec<u8>> {
            lock(&self.objects).get(name).map(|(b, _)| b.clone())
        }

        pub fn raw_delete(&self, name: &str) {
            lock(&self.objects).remove(name);
        }

        fn not_found(&self, name: &str) -> Error {
            Error::io(
                "read",
                self.display_path(name),
                std::io::ErrorKind::NotFound.into(),
            )
        }
    }

    impl ReadBackend for MemStore {
        fn display_path(&self, name: &str) -> PathBuf {
            PathBuf::from(format!("mem:/{name}"))
        }
        fn location(&self) -> String {
            "mem:".into()
        }
        fn capabilities(&self) -> &Capabilities {
            &self.caps
        }
        fn get(&self, name: &str, limit: u64, what: &str) -> Result<Vec<u8>> {
            if lock(&self.vanish_on_get).as_deref() == Some(name) {
                lock(&self.objects).remove(name);
            }
            let objects = lock(&self.objects);
            let (bytes, _) = objects.get(name).ok_or_else(|| self.not_found(name))?;
            if bytes.len() as u64 > limit {
                return Err(Error::corrupt(what, self.display_path(name), "too large"));
            }
            Ok(bytes.clone())
        }
        fn get_range(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
            let objects = lock(&self.objects);
            let (bytes, _) = objects.get(name).ok_or_else(|| self.not_found(name))?;
            let start = offset as usize;
            let src = bytes.get(start..start + buf.len()).ok_or_else(|| {
                Error::io(
                    "read",
                    self.display_path(name),
                    std::io::ErrorKind::UnexpectedEof.into(),
                )
            })?;
            buf.copy_from_slice(src);
            Ok(())
        }
        fn head(&self, name: &str) -> Result<Option<ObjectMeta>> {
            Ok(lock(&self.objects).get(name).map(|(b, t)| ObjectMeta {
                name: name.to_string(),
                size: b.len() as u64,
                modified: Some(*t),
            }))
        }
        fn list(&self, dir: &str, f: &mut dyn FnMut(ObjectMeta) -> Result<()>) -> Result<()> {
            let prefix = if dir.is_empty() {
                String::new()
            } else {
                format!("{dir}/")
            };
            let found: Vec<ObjectMeta> = lock(&self.objects)
                .iter()
                .filter_map(|(k, (b, t))| {
                    let rest = k.strip_prefix(&prefix)?;
                    (!rest.contains('/') && !rest.starts_with(".tmp-")).then(|| ObjectMeta {
                        name: k.clone(),
                        size: b.len() as u64,
                        modified: Some(*t),
                    })
                })
                .collect();
            found.into_iter().try_for_each(f)
        }
    }

    impl WriteBackend for MemStore {
        fn put(&self, name: &str, data: &[u8], _mode: PutMode) -> Result<()> {
            if self.fail_puts.load(Ordering::SeqCst) {
                return Err(Error::io(
                    "write",
                    self.display_path(name),
                    std::io::ErrorKind::TimedOut.into(),
                ));
            }
            let now = *lock(&self.clock);
            lock(&self.objects).insert(name.to_string(), (data.to_vec(), now));
            Ok(())
        }
        fn delete(&self, name: &str) -> Result<bool> {
            if let Some(left) = lock(&self.deletes_left).as_mut() {
                if *left == 0 {
                    return Err(Error::io(
                        "delete",
                        self.display_path(name),
                        std::io::ErrorKind::TimedOut.into(),
                    ));
                }
                *left -= 1;
            }
            Ok(lock(&self.objects).remove(name).is_some())
        }
        fn stage(&self) -> Result<Box<dyn Staged>> {
            unimplemented!("not used by leases and segments")
        }
        fn barrier(&self) -> Result<()> {
            Ok(())
        }
        fn set_aside(&self, _name: &str) -> Result<Option<String>> {
            unimplemented!("not used by leases and segments")
        }
        fn open_log(&self, _name: &str, _mode: LogMode) -> Result<Option<Box<dyn Log>>> {
            unimplemented!("tests call segments::open_log")
        }
        fn lock_exclusive(&self, _name: &str, _what: &str) -> Result<Box<dyn LockGuard>> {
            unimplemented!("tests call lease::lock_exclusive")
        }
        fn lock_held(&self, _name: &str) -> Result<bool> {
            unimplemented!("tests call lease::lock_held")
        }
        fn create_marker(&self, _id: &str, _payload: &[u8]) -> Result<Box<dyn Marker>> {
            unimplemented!("tests call lease::create_marker")
        }
        fn live_markers(&self) -> Result<Vec<(String, Option<Vec<u8>>)>> {
            unimplemented!("tests call lease::live_markers")
        }
        fn sweep_stale(&self) -> Result<()> {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::mem::MemStore;
    use super::*;
    use std::path::PathBuf;
    use std::sync::atomic::Ordering;

    fn times() -> LeaseTimes {
        LeaseTimes::for_ttl(Duration::from_secs(60))
    }

    fn dyn_store(m: &Arc<MemStore>) -> Arc<dyn WriteBackend> {
        m.clone()
    }

    fn take(m: &Arc<MemStore>, name: &str, what: &str) -> Result<Lease> {
        acquire(&dyn_store(m), name, what, times(), None)
    }

    #[test]
    fn times_scale_with_the_ttl() {
        let d = LeaseTimes::default();
        assert_eq!(d.ttl, Duration::from_secs(600));
        assert_eq!(d.grace, Duration::from_secs(300));
        assert_eq!(d.margin, Duration::from_secs(120));
        assert_eq!(d.refresh_every(), Duration::from_secs(100));
        let t = LeaseTimes::for_ttl(Duration::from_secs(6));
        assert_eq!(t.grace, Duration::from_secs(3));
        assert_eq!(t.margin, Duration::from_millis(1200));
        assert_eq!(t.refresh_every(), Duration::from_secs(1));
    }

    #[test]
    fn every_interleaving_of_two_contenders_gives_exactly_one_holder() {
        // Steps: 0 = A puts, 1 = A decides, 2 = B puts, 3 = B decides; each contender's
        // steps in order.
        let orders: [[usize; 4]; 6] = [
            [0, 1, 2, 3],
            [0, 2, 1, 3],
            [0, 2, 3, 1],
            [2, 0, 1, 3],
            [2, 0, 3, 1],
            [2, 3, 0, 1],
        ];
        for order in orders {
            let m = MemStore::new();
            let store = dyn_store(&m);
            let mut pending: [Option<Contender>; 2] = [None, None];
            let mut outcome: [Option<std::result::Result<Lease, String>>; 2] = [None, None];
            for step in order {
                let who = step / 2;
                if step % 2 == 0 {
                    let what = if who == 0 { "backup A" } else { "backup B" };
                    pending[who] = Some(Contender::put(&store, "volume/x", what, times()).unwrap());
                } else {
                    let c = pending[who].take().unwrap();
                    outcome[who] = Some(c.decide().unwrap());
                }
            }
            let winners: Vec<&Lease> = outcome
                .iter()
                .filter_map(|o| o.as_ref().unwrap().as_ref().ok())
                .collect();
            assert_eq!(winners.len(), 1, "order {order:?}");
            // Only the holder's lease is left.
            assert_eq!(m.names("locks/"), vec![winners[0].key().to_string()]);
            for o in outcome.iter().flatten() {
                if let Err(holder) = o {
                    assert!(holder.contains("backup"), "{holder}");
                    assert!(holder.contains(&std::process::id().to_string()), "{holder}");
                }
            }
        }
    }

    #[test]
    fn a_held_lock_refuses_others_naming_the_holder_until_released() {
        let m = MemStore::new();
        let a = take(&m, "volume/x", "backup of /dev/sdz1").unwrap();
        let e = take(&m, "volume/x", "backup of /dev/sdz1").unwrap_err();
        let Error::Locked { path, detail } = &e else {
            panic!("{e:?}")
        };
        assert_eq!(path, &PathBuf::from("mem:/locks/volume/x"));
        assert!(detail.contains("backup of /dev/sdz1"), "{detail}");
        assert!(detail.contains(&crate::platform::hostname()), "{detail}");
        assert!(
            detail.contains(&format!("pid {}", std::process::id())),
            "{detail}"
        );
        assert!(lock_held_with(&*m, "volume/x", times()).unwrap());
        // Another lock name is independent.
        let p = take(&m, "prune", "prune").unwrap();
        drop(a);
        assert!(!lock_held_with(&*m, "volume/x", times()).unwrap());
        let b = take(&m, "volume/x", "second").unwrap();
        assert!(b.check_at_now().is_ok());
        drop((b, p));
        assert!(m.names("").is_empty(), "{:?}", m.names(""));
    }

    impl Lease {
        fn check_at_now(&self) -> Result<()> {
            self.shared.check_at(Instant::now())
        }
    }

    #[test]
    fn the_lease_of_a_dead_holder_expires_on_the_server_clock_and_is_taken_over() {
        let m = MemStore::new();
        let dead = take(&m, "prune", "prune").unwrap();
        let dead_key = dead.key().to_string();
        std::mem::forget(dead); // killed: no refresh, no delete
        let t = times();
        m.advance(t.ttl + t.grace);
        assert!(matches!(
            take(&m, "prune", "prune"),
            Err(Error::Locked { .. })
        ));
        assert!(lock_held_with(&*m, "prune", t).unwrap());
        m.advance(Duration::from_secs(1));
        assert!(!lock_held_with(&*m, "prune", t).unwrap());
        let b = take(&m, "prune", "prune").unwrap();
        // The stale lease was deleted by the new holder.
        assert_eq!(m.names("locks/"), vec![b.key().to_string()]);
        assert_ne!(b.key(), dead_key);
    }

    #[test]
    fn a_lease_with_a_longer_ttl_is_judged_by_its_own_ttl() {
        let m = MemStore::new();
        let long = LeaseTimes::for_ttl(Duration::from_secs(600));
        let holder = acquire(&dyn_store(&m), "prune", "prune", long, None).unwrap();
        std::mem::forget(holder);
        // Older than the observer's 60 s + 30 s, younger than the holder's 600 s + 300 s.
        m.advance(Duration::from_secs(200));
        assert!(take(&m, "prune", "prune").is_err());
        m.advance(Duration::from_secs(701));
        assert!(take(&m, "prune", "prune").is_ok());
    }

    #[test]
    fn check_fails_when_refreshes_fail_for_longer_than_ttl_minus_margin() {
        let m = MemStore::new();
        let lease = take(&m, "volume/x", "backup").unwrap();
        let s = &lease.shared;
        let t0 = lock(&s.status).last_ok;
        let t = times();
        // A refresh that works extends the validity from its start.
        assert_eq!(s.refresh(&|| t0 + t.refresh_every()), Refreshed::Renewed);
        let t1 = t0 + t.refresh_every();
        assert!(s.check_at(t1 + t.valid_for()).is_ok());
        // The store stops answering: the lease is trusted until ttl − margin, not after.
        m.fail_puts.store(true, Ordering::SeqCst);
        for k in 2..6 {
            assert_eq!(s.refresh(&|| t0 + t.refresh_every() * k), Refreshed::Failed);
        }
        assert!(s.check_at(t1 + t.valid_for()).is_ok());
        let e = s
            .check_at(t1 + t.valid_for() + Duration::from_millis(1))
            .unwrap_err();
        assert!(matches!(e, Error::LeaseLost { .. }), "{e:?}");
        assert!(e.to_string().contains("resumes"), "{e}");
        // Once lapsed, the loss is final even if the store comes back.
        m.fail_puts.store(false, Ordering::SeqCst);
        assert_eq!(
            s.refresh(&|| t1 + t.valid_for() + Duration::from_secs(1)),
            Refreshed::Lost
        );
        assert!(s.check_at(t1).is_err());
    }

    #[test]
    fn check_fails_when_a_refresh_finds_the_lease_removed() {
        let m = MemStore::new();
        let lease = take(&m, "volume/x", "backup").unwrap();
        let t0 = lock(&lease.shared.status).last_ok;
        m.raw_delete(lease.key());
        assert_eq!(lease.shared.refresh(&|| t0), Refreshed::Lost);
        // Not recreated.
        assert!(m.raw(lease.key()).is_none());
        let e = lease.shared.check_at(t0).unwrap_err();
        assert!(e.to_string().contains("removed"), "{e}");
    }

    #[test]
    fn the_refresher_thread_stops_when_the_guard_drops() {
        let m = MemStore::new();
        let store = dyn_store(&m);
        let guard: Box<dyn LockGuard> = Box::new(
            acquire(&store, "prune", "prune", times(), None)
                .unwrap()
                .start_refresher()
                .unwrap(),
        );
        guard.check().unwrap();
        drop(guard); // joins the thread (10 s period) at once, then deletes the lease
        assert!(m.names("").is_empty());
        let marker = create_marker_with(&store, "ab12", b"x");
        drop(marker);
        assert!(m.names("").is_empty());
    }

    fn create_marker_with(store: &Arc<dyn WriteBackend>, id: &str, payload: &[u8]) -> Lease {
        put_marker(store.clone(), id, payload, times())
            .unwrap()
            .start_refresher()
            .unwrap()
    }

    #[test]
    fn marker_payloads_round_trip_unwrapped_and_expire() {
        let m = MemStore::new();
        let store = dyn_store(&m);
        let payload = br#"{"pid":1,"knows":[]}"#;
        let mut a = put_marker(store.clone(), "aa11", payload, times()).unwrap();
        assert_eq!(m.raw("writers/aa11").unwrap(), payload);
        assert_eq!(
            live_markers_with(&*m, times()).unwrap(),
            vec![("aa11".to_string(), Some(payload.to_vec()))]
        );
        Marker::write(&mut a, b"second").unwrap();
        let t0 = lock(&a.shared.status).last_ok;
        // A refresh writes the current payload back.
        assert_eq!(a.shared.refresh(&|| t0), Refreshed::Renewed);
        assert_eq!(m.raw("writers/aa11").unwrap(), b"second");
        // The probe object is gone again.
        assert_eq!(m.names("locks/"), Vec::<String>::new());

        let b = put_marker(store.clone(), "bb22", b"b", times()).unwrap();
        std::mem::forget(b); // dies
        let t = times();
        m.advance(t.lifetime());
        assert_eq!(live_markers_with(&*m, t).unwrap().len(), 2);
        a.shared.refresh(&|| t0 + Duration::from_secs(1));
        m.advance(Duration::from_secs(1));
        assert_eq!(
            live_markers_with(&*m, t).unwrap(),
            vec![("aa11".to_string(), Some(b"second".to_vec()))]
        );
        // The expired marker was deleted.
        assert_eq!(m.names("writers/"), vec!["writers/aa11".to_string()]);
        drop(a);
        assert!(m.names("").is_empty());
    }

    #[test]
    fn markers_that_vanish_or_cannot_be_read_between_list_and_get() {
        let m = MemStore::new();
        let store = dyn_store(&m);
        let _a = put_marker(store.clone(), "aa11", b"a", times()).unwrap();
        let _b = put_marker(store.clone(), "bb22", b"b", times()).unwrap();
        *lock(&m.vanish_on_get) = Some("writers/aa11".into());
        assert_eq!(
            live_markers_with(&*m, times()).unwrap(),
            vec![("bb22".to_string(), Some(b"b".to_vec()))]
        );
        *lock(&m.vanish_on_get) = None;
        m.put(
            "writers/cc33",
            &vec![0u8; MARKER_LIMIT as usize + 1],
            PutMode::Overwrite,
        )
        .unwrap();
        let live = live_markers_with(&*m, times()).unwrap();
        assert!(live.contains(&("cc33".to_string(), None)), "{live:?}");
    }

    #[test]
    fn a_failed_marker_write_keeps_the_old_payload_for_refreshes() {
        let m = MemStore::new();
        let mut a = put_marker(dyn_store(&m), "aa11", b"one", times()).unwrap();
        m.fail_puts.store(true, Ordering::SeqCst);
        assert!(Marker::write(&mut a, b"two").is_err());
        m.fail_puts.store(false, Ordering::SeqCst);
        let t0 = lock(&a.shared.status).last_ok;
        assert_eq!(a.shared.refresh(&|| t0), Refreshed::Renewed);
        assert_eq!(m.raw("writers/aa11").unwrap(), b"one");
    }

    #[test]
    fn bad_names_are_refused() {
        let m = MemStore::new();
        for name in ["", "/x", "x/", "a//b", "..", "a/../b", ".probe", "a b"] {
            assert!(take(&m, name, "x").is_err(), "{name:?}");
        }
        assert!(put_marker(dyn_store(&m), "a/b", b"", times()).is_err());
        assert!(m.names("").is_empty());
    }

    #[test]
    fn two_threads_never_both_hold_the_lock() {
        let m = MemStore::new();
        let store = dyn_store(&m);
        let results: Vec<bool> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..2)
                .map(|_| {
                    let store = store.clone();
                    s.spawn(move || {
                        acquire(&store, "volume/x", "backup", times(), Some(&random_backoff))
                            .map(std::mem::forget) // keep the lease object
                            .is_ok()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(results.iter().filter(|&&ok| ok).count() <= 1, "{results:?}");
        assert!(m.names("locks/").len() <= 1);
    }
}
