//! Retries of transient remote failures: [`Retry`] wraps a backend and repeats the requests
//! that failed for a reason that may pass (a timeout, a reset or refused connection, a server
//! error, throttling), with exponential backoff and full jitter, within a time budget per call.
//!
//! The interface with the backends is [`is_transient`]: a backend reports each failure as an
//! [`Error::Io`] (or [`Error::IoAt`]) whose `std::io::Error` either carries a [`RemoteProblem`]
//! saying whether it is transient, or has a kind that says so (`TimedOut`,
//! `ConnectionRefused`, `ConnectionReset`, …). Refusals (403), missing objects or buckets
//! (404) and bad requests (400) are never retried: repeating them cannot help.

use super::{
    Capabilities, LockGuard, Log, LogMode, Marker, ObjectMeta, PutMode, ReadBackend, Staged,
    WriteBackend,
};
use crate::error::{Error, Result};
use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// First backoff step.
const BASE: Duration = Duration::from_millis(100);
/// Longest single wait.
const CAP: Duration = Duration::from_secs(8);
/// Default time budget of one call, retries included.
pub const DEFAULT_BUDGET: Duration = Duration::from_secs(120);
/// Environment variable overriding the budget, in seconds.
pub const BUDGET_VAR: &str = "VOLBACK_RETRY_SECS";

/// What went wrong with a remote request, in words a user can act on, and whether trying
/// again may help. Backends put it inside the `std::io::Error` of their [`Error::Io`].
#[derive(Debug)]
pub struct RemoteProblem {
    pub message: String,
    pub transient: bool,
}

impl fmt::Display for RemoteProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for RemoteProblem {}

impl RemoteProblem {
    /// An `std::io::Error` of `kind` carrying this problem.
    pub fn into_io(self, kind: std::io::ErrorKind) -> std::io::Error {
        std::io::Error::new(kind, self)
    }
}

/// Whether `e` is a failure that may pass if the request is repeated.
pub fn is_transient(e: &Error) -> bool {
    let source = match e {
        Error::Io { source, .. } | Error::IoAt { source, .. } => source,
        _ => return false,
    };
    if let Some(p) = source
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<RemoteProblem>())
    {
        return p.transient;
    }
    use std::io::ErrorKind as K;
    matches!(
        source.kind(),
        K::TimedOut
            | K::ConnectionRefused
            | K::ConnectionReset
            | K::ConnectionAborted
            | K::NotConnected
            | K::BrokenPipe
            | K::Interrupted
    )
}

/// How long to keep trying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Time budget of one call, retries and waits included.
    pub budget: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            budget: DEFAULT_BUDGET,
        }
    }
}

impl Policy {
    /// The default policy, with the budget of `VOLBACK_RETRY_SECS` when it is set.
    pub fn from_env() -> Result<Policy> {
        let value = std::env::var(BUDGET_VAR).ok();
        Ok(Policy {
            budget: parse_budget(value.as_deref())?,
        })
    }

    /// Runs `f` until it succeeds, fails for good, or the budget is spent; the error of the
    /// last attempt is returned, saying how long it was tried when it was tried more than
    /// once.
    pub fn run<T>(&self, mut f: impl FnMut() -> Result<T>) -> Result<T> {
        let start = Instant::now();
        let mut attempt: u32 = 0;
        loop {
            let e = match f() {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            attempt += 1;
            if !is_transient(&e) {
                return Err(e);
            }
            let wait = backoff(attempt);
            let elapsed = start.elapsed();
            if elapsed + wait >= self.budget {
                return Err(gave_up(e, attempt, elapsed));
            }
            std::thread::sleep(wait);
        }
    }
}

/// `VOLBACK_RETRY_SECS`'s value: whole seconds, 0 for no retries.
pub fn parse_budget(value: Option<&str>) -> Result<Duration> {
    match value {
        None => Ok(DEFAULT_BUDGET),
        Some(v) => v
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|s| *s <= 86_400)
            .map(Duration::from_secs)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "{BUDGET_VAR}={v:?} is not a number of seconds from 0 to 86400"
                ))
            }),
    }
}

/// The wait before attempt `attempt + 1`: uniform in [0, min(CAP, BASE·2^(attempt−1))].
fn backoff(attempt: u32) -> Duration {
    let ceiling = BASE
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
        .min(CAP);
    let mut bytes = [0u8; 8];
    // Without randomness the full ceiling is still a correct (if synchronised) backoff.
    let r = match getrandom::fill(&mut bytes) {
        Ok(()) => u64::from_le_bytes(bytes),
        Err(_) => u64::MAX,
    };
    let nanos = ceiling.as_nanos() as u64;
    Duration::from_nanos(if nanos == 0 { 0 } else { r % (nanos + 1) })
}

/// `e` with "(gave up after N attempts in S s)" added to its message.
fn gave_up(e: Error, attempts: u32, elapsed: Duration) -> Error {
    if attempts <= 1 {
        return e;
    }
    let note = format!(
        "gave up after {attempts} attempts in {:.1} s",
        elapsed.as_secs_f64()
    );
    let wrap = |source: std::io::Error| {
        let kind = source.kind();
        std::io::Error::new(kind, format!("{source} ({note})"))
    };
    match e {
        Error::Io { op, path, source } => Error::Io {
            op,
            path,
            source: wrap(source),
        },
        Error::IoAt {
            op,
            path,
            offset,
            source,
        } => Error::IoAt {
            op,
            path,
            offset,
            source: wrap(source),
        },
        other => other,
    }
}

/// A backend whose requests are retried (see the module documentation). Staged uploads,
/// barriers, logs, locks and markers are delegated as they are: a backend that uploads in the
/// background retries those uploads itself, with the same [`Policy`].
#[derive(Debug, Clone)]
pub struct Retry<B> {
    inner: B,
    policy: Policy,
}

impl<B: WriteBackend> Retry<B> {
    pub fn new(inner: B, policy: Policy) -> Self {
        Retry { inner, policy }
    }

    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// Runs the listing `list` (retried as a whole) into a vector, then passes its objects to
    /// `f`: a retried listing never passes an object twice, and `f`'s errors are not retried.
    fn collected(
        &self,
        list: impl Fn(&mut dyn FnMut(ObjectMeta) -> Result<()>) -> Result<()>,
        f: &mut dyn FnMut(ObjectMeta) -> Result<()>,
    ) -> Result<()> {
        let all = self.policy.run(|| {
            let mut all = Vec::new();
            list(&mut |m| {
                all.push(m);
                Ok(())
            })?;
            Ok(all)
        })?;
        all.into_iter().try_for_each(f)
    }
}

impl<B: WriteBackend> ReadBackend for Retry<B> {
    fn display_path(&self, name: &str) -> PathBuf {
        self.inner.display_path(name)
    }

    fn location(&self) -> String {
        self.inner.location()
    }

    fn capabilities(&self) -> &Capabilities {
        self.inner.capabilities()
    }

    fn get(&self, name: &str, limit: u64, what: &str) -> Result<Vec<u8>> {
        self.policy.run(|| self.inner.get(name, limit, what))
    }

    fn get_range(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.policy.run(|| self.inner.get_range(name, offset, buf))
    }

    fn head(&self, name: &str) -> Result<Option<ObjectMeta>> {
        self.policy.run(|| self.inner.head(name))
    }

    /// The listing is collected first and passed to `f` only when it is complete, so that a
    /// retried listing never passes an object twice and `f`'s own errors are not retried.
    fn list(&self, dir: &str, f: &mut dyn FnMut(ObjectMeta) -> Result<()>) -> Result<()> {
        self.collected(|g| self.inner.list(dir, g), f)
    }

    /// Collected first and then passed to `f`, as `list` is.
    fn list_fanout(&self, dir: &str, f: &mut dyn FnMut(ObjectMeta) -> Result<()>) -> Result<()> {
        self.collected(|g| self.inner.list_fanout(dir, g), f)
    }

    fn local_root(&self) -> Option<&std::path::Path> {
        self.inner.local_root()
    }
}

impl<B: WriteBackend> WriteBackend for Retry<B> {
    fn put(&self, name: &str, data: &[u8], mode: PutMode) -> Result<()> {
        // Puts are idempotent: content-named objects, or a writer's own object.
        self.policy.run(|| self.inner.put(name, data, mode))
    }

    fn delete(&self, name: &str) -> Result<bool> {
        self.policy.run(|| self.inner.delete(name))
    }

    fn stage(&self) -> Result<Box<dyn Staged>> {
        self.inner.stage()
    }

    fn barrier(&self) -> Result<()> {
        self.inner.barrier()
    }

    fn set_aside(&self, name: &str) -> Result<Option<String>> {
        self.policy.run(|| self.inner.set_aside(name))
    }

    fn open_log(&self, name: &str, mode: LogMode) -> Result<Option<Box<dyn Log>>> {
        self.inner.open_log(name, mode)
    }

    fn lock_exclusive(&self, name: &str, what: &str) -> Result<Box<dyn LockGuard>> {
        self.inner.lock_exclusive(name, what)
    }

    fn lock_held(&self, name: &str) -> Result<bool> {
        self.inner.lock_held(name)
    }

    fn create_marker(&self, id: &str, payload: &[u8]) -> Result<Box<dyn Marker>> {
        self.inner.create_marker(id, payload)
    }

    fn live_markers(&self) -> Result<Vec<(String, Option<Vec<u8>>)>> {
        self.inner.live_markers()
    }

    fn sweep_stale(&self) -> Result<()> {
        self.inner.sweep_stale()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::ErrorKind;

    fn remote(kind: ErrorKind, transient: bool) -> Error {
        Error::io(
            "read",
            "s3:http://h/b/x",
            RemoteProblem {
                message: "m".into(),
                transient,
            }
            .into_io(kind),
        )
    }

    #[test]
    fn classification() {
        assert!(is_transient(&remote(ErrorKind::Other, true)));
        assert!(!is_transient(&remote(ErrorKind::Other, false)));
        // The marker wins over the kind.
        assert!(!is_transient(&remote(ErrorKind::TimedOut, false)));
        assert!(is_transient(&Error::io(
            "read",
            "x",
            std::io::Error::from(ErrorKind::ConnectionReset)
        )));
        for k in [
            ErrorKind::NotFound,
            ErrorKind::PermissionDenied,
            ErrorKind::UnexpectedEof,
            ErrorKind::InvalidData,
        ] {
            assert!(!is_transient(&Error::io("read", "x", k.into())), "{k:?}");
        }
        assert!(!is_transient(&Error::corrupt("x", "y", "z")));
    }

    #[test]
    fn budget_from_the_environment_value() {
        assert_eq!(parse_budget(None).unwrap(), DEFAULT_BUDGET);
        assert_eq!(parse_budget(Some(" 3 ")).unwrap(), Duration::from_secs(3));
        assert_eq!(parse_budget(Some("0")).unwrap(), Duration::ZERO);
        for bad in ["", "-1", "1.5", "x", "999999"] {
            let e = parse_budget(Some(bad)).unwrap_err().to_string();
            assert!(e.contains(BUDGET_VAR), "{e}");
        }
    }

    #[test]
    fn backoff_stays_under_its_ceiling() {
        for attempt in 1..40 {
            let cap = BASE.saturating_mul(1 << (attempt - 1).min(16)).min(CAP);
            assert!(backoff(attempt) <= cap);
        }
    }

    #[test]
    fn run_retries_transient_errors_only() {
        let policy = Policy {
            budget: Duration::from_secs(60),
        };
        let mut calls = 0;
        let v = policy
            .run(|| {
                calls += 1;
                if calls < 3 {
                    Err(remote(ErrorKind::Other, true))
                } else {
                    Ok(calls)
                }
            })
            .unwrap();
        assert_eq!(v, 3);
        let mut calls = 0;
        let e = policy
            .run(|| -> Result<()> {
                calls += 1;
                Err(remote(ErrorKind::PermissionDenied, false))
            })
            .unwrap_err();
        assert_eq!(calls, 1);
        assert!(!e.to_string().contains("gave up"));
    }

    #[test]
    fn run_gives_up_when_the_budget_is_spent() {
        let policy = Policy {
            budget: Duration::ZERO,
        };
        let mut calls = 0;
        let e = policy
            .run(|| -> Result<()> {
                calls += 1;
                Err(remote(ErrorKind::TimedOut, true))
            })
            .unwrap_err();
        assert_eq!(calls, 1);
        assert!(is_transient(&e) || matches!(e, Error::Io { .. }));
    }
}
