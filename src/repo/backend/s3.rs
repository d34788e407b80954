//! Repositories in a bucket of an S3-compatible object store (AWS S3, Garage, MinIO, …).
//!
//! [`S3`] implements the backend traits with opendal's S3 service, driven by one private
//! tokio runtime per backend (two worker threads) from volback's ordinary threads. Requests go
//! through our own HTTP client: a connect timeout of 5 s, and a stall of 30 s without progress
//! (`VOLBACK_S3_TIMEOUT_SECS`) is a timeout error, never a hang (large uploads get time in
//! proportion to their size).
//!
//! Objects are `PREFIX/NAME` in the bucket. Every failure is an [`Error::Io`] (or
//! [`Error::IoAt`] for ranged reads) naming the object's address, whose `std::io::Error` has
//! a kind saying what happened (`NotFound`, `PermissionDenied`, `TimedOut`,
//! `ConnectionRefused`, …) and carries a [`RemoteProblem`] with the words a user can act on
//! and whether retrying may help ([`super::retry::is_transient`]). [`open_s3`] wraps the backend in
//! [`Retry`].
//!
//! Large objects ([`WriteBackend::stage`]) are buffered in memory and uploaded in the
//! background by at most `max_inflight` threads (one PUT each, retried with the same policy);
//! until its PUT completes, an object stays readable from memory, and
//! [`WriteBackend::barrier`] waits for the uploads and reports the first failure.

use super::retry::{Policy, RemoteProblem, Retry};
use super::{
    Capabilities, LockGuard, Log, LogMode, Marker, ObjectMeta, PutMode, ReadBackend, Staged,
    WriteBackend,
};
use crate::error::{Error, Result};
use crate::repo::address::S3Location;
use bytes::Buf;
use futures::TryStreamExt;
use std::collections::HashMap;
use std::fmt;
use std::io::ErrorKind;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// Largest object [`WriteBackend::stage`] holds (the largest pack).
pub const MAX_STAGED: u64 = 128 << 20;
/// Uploads of staged objects in flight at once, by default.
pub const DEFAULT_INFLIGHT: usize = 4;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A request that makes no progress for this long is a timeout.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Environment variable overriding [`IDLE_TIMEOUT`], in whole seconds (tests of stalled
/// connections use a few seconds).
pub const TIMEOUT_VAR: &str = "VOLBACK_S3_TIMEOUT_SECS";
/// Largest value of [`TIMEOUT_VAR`].
const MAX_TIMEOUT_SECS: u64 = 3600;
/// Requests with larger bodies get more time than [`IDLE_TIMEOUT`] before their answer…
const BULK_BODY: usize = 1 << 20;
/// …as if sent at no less than this many bytes per second.
const MIN_UPLOAD_RATE: u64 = 256 << 10;
/// How many `.bad.N` names `set_aside` tries.
const MAX_ASIDE: u32 = 1000;

/// Opens the repository at `loc` with the credentials and region of the environment (see
/// [`S3Options::default`]), retrying transient failures ([`Policy::from_env`]), with the idle
/// timeout of `VOLBACK_S3_TIMEOUT_SECS` when it is set.
pub fn open_s3(loc: &S3Location) -> Result<Arc<dyn WriteBackend>> {
    let policy = Policy::from_env()?;
    let idle_timeout = parse_idle_timeout(std::env::var(TIMEOUT_VAR).ok().as_deref())?;
    let s3 = S3::new(
        loc,
        S3Options {
            policy,
            idle_timeout,
            ..S3Options::default()
        },
    )?;
    Ok(Arc::new(Retry::new(s3, policy)))
}

/// `VOLBACK_S3_TIMEOUT_SECS`'s value: whole seconds from 1 to 3600 ([`IDLE_TIMEOUT`] when
/// unset).
pub fn parse_idle_timeout(value: Option<&str>) -> Result<Duration> {
    match value {
        None => Ok(IDLE_TIMEOUT),
        Some(v) => v
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|s| (1..=MAX_TIMEOUT_SECS).contains(s))
            .map(Duration::from_secs)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "{TIMEOUT_VAR}={v:?} is not a number of seconds from 1 to {MAX_TIMEOUT_SECS}"
                ))
            }),
    }
}

/// How an [`S3`] backend connects.
#[derive(Clone)]
pub struct S3Options {
    /// Access key id and secret. `None`: the standard sources, in opendal's (reqsign's) order:
    /// `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN`, then the profile
    /// (`AWS_PROFILE`, default `default`) in `~/.aws/credentials` and `~/.aws/config`
    /// (`AWS_SHARED_CREDENTIALS_FILE`, `AWS_CONFIG_FILE`).
    pub credentials: Option<(String, String)>,
    /// Signing region. `None`: `AWS_REGION`, `AWS_DEFAULT_REGION`, the profile's `region` in
    /// `~/.aws/config`, else `us-east-1`.
    pub region: Option<String>,
    /// Uploads of staged objects in flight at once.
    pub max_inflight: usize,
    /// Retries of the background uploads.
    pub policy: Policy,
    /// A request without progress for this long fails as a timeout.
    pub idle_timeout: Duration,
}

impl Default for S3Options {
    fn default() -> Self {
        S3Options {
            credentials: None,
            region: None,
            max_inflight: DEFAULT_INFLIGHT,
            policy: Policy::default(),
            idle_timeout: IDLE_TIMEOUT,
        }
    }
}

impl fmt::Debug for S3Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the secret.
        f.debug_struct("S3Options")
            .field("credentials", &self.credentials.as_ref().map(|(id, _)| id))
            .field("region", &self.region)
            .field("max_inflight", &self.max_inflight)
            .finish_non_exhaustive()
    }
}

/// A repository in a bucket; cheap to clone (one shared connection pool, runtime and upload
/// queue).
#[derive(Clone)]
pub struct S3 {
    inner: Arc<Inner>,
}

struct Inner {
    loc: S3Location,
    /// `s3:http://host:port/bucket/prefix`.
    address: String,
    region: String,
    op: opendal::Operator,
    rt: tokio::runtime::Runtime,
    caps: Capabilities,
    policy: Policy,
    max_inflight: usize,
    /// A request without progress for this long fails.
    idle: Duration,
    uploads: Mutex<Uploads>,
    uploads_changed: Condvar,
    /// The bucket was seen to exist (a 404 is then a missing object, not a missing bucket).
    bucket_seen: AtomicBool,
    requests: Arc<Requests>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if std::env::var_os("VOLBACK_S3_REQUESTS").is_some_and(|v| v != "0") {
            eprintln!("volback: S3 requests: {}", self.requests.summary());
        }
    }
}

#[derive(Default)]
struct Uploads {
    /// Objects being uploaded, readable until their PUT completes.
    inflight: HashMap<String, Arc<Vec<u8>>>,
    running: usize,
    first_error: Option<Error>,
}

impl fmt::Debug for S3 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3")
            .field("address", &self.inner.address)
            .field("region", &self.inner.region)
            .finish_non_exhaustive()
    }
}

impl S3 {
    /// A backend for `loc`. Sends no request: a wrong endpoint, bucket or key shows at the
    /// first operation.
    pub fn new(loc: &S3Location, options: S3Options) -> Result<S3> {
        install_crypto_provider();
        let address = loc.to_string();
        let invalid = |what: &str, e: &dyn fmt::Display| {
            Error::InvalidArgument(format!("cannot use {address}: {what}: {e}"))
        };
        let region = match options.region.clone() {
            Some(r) => r,
            None => region_from_environment(),
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("volback-s3")
            .enable_all()
            .build()
            .map_err(|e| Error::io("start the S3 runtime for", &address, e))?;
        let client = |read_timeout: Duration| {
            reqwest::Client::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .read_timeout(read_timeout)
                .pool_idle_timeout(Duration::from_secs(50))
                .build()
        };
        let small = client(options.idle_timeout)
            .map_err(|e| invalid("cannot build the HTTP client", &e))?;
        // Large uploads are bounded by `Transport::fetch`; this bounds their answer's body.
        let bulk = client(options.idle_timeout.saturating_mul(10))
            .map_err(|e| invalid("cannot build the HTTP client", &e))?;
        let requests = Arc::new(Requests {
            trace: std::env::var_os("VOLBACK_S3_REQUESTS").is_some_and(|v| v == "trace"),
            ..Requests::default()
        });
        let transport = Transport {
            small: opendal_http_transport_reqwest::ReqwestTransport::new(small),
            bulk: opendal_http_transport_reqwest::ReqwestTransport::new(bulk),
            idle: options.idle_timeout,
            counts: requests.clone(),
        };
        let mut builder = opendal::services::S3::default()
            .bucket(&loc.bucket)
            .root(&format!("/{}", loc.prefix))
            .endpoint(&loc.endpoint())
            .region(&region);
        if let Some((id, secret)) = &options.credentials {
            builder = builder.access_key_id(id).secret_access_key(secret);
        }
        if loc.is_aws() {
            builder = builder.enable_virtual_host_style();
        } else {
            // The instance metadata service exists only on cloud machines: asking it
            // elsewhere costs a timeout and sends traffic where none belongs.
            builder = builder.disable_ec2_metadata();
        }
        let op = opendal::Operator::new(builder)
            .map_err(|e| invalid("bad S3 configuration", &e))?
            .with_context(
                opendal::OperationContext::new()
                    .with_http_transport(opendal::HttpTransporter::new(transport)),
            );
        Ok(S3 {
            inner: Arc::new(Inner {
                loc: loc.clone(),
                address,
                region,
                op,
                rt,
                caps: Capabilities {
                    file_locks: false,
                    cheap_ranged_reads: false,
                    parallelism: 8,
                },
                policy: options.policy,
                max_inflight: options.max_inflight.max(1),
                idle: options.idle_timeout,
                uploads: Mutex::new(Uploads::default()),
                uploads_changed: Condvar::new(),
                bucket_seen: AtomicBool::new(false),
                requests,
            }),
        })
    }

    /// This backend with retries, as the generic lock, marker and log code gets it.
    fn shared(&self) -> Arc<dyn WriteBackend> {
        Arc::new(Retry::new(self.clone(), self.inner.policy))
    }

    fn block<F: std::future::Future>(&self, f: F) -> F::Output {
        self.inner.rt.block_on(f)
    }

    fn uploads(&self) -> MutexGuard<'_, Uploads> {
        // A panic while holding the lock leaves consistent data (plain inserts/removes).
        self.inner
            .uploads
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn inflight(&self, name: &str) -> Option<Arc<Vec<u8>>> {
        self.uploads().inflight.get(name).cloned()
    }

    /// Refuses names that would escape the prefix or address a "directory".
    fn check_name(&self, op: &'static str, name: &str) -> Result<()> {
        if name.is_empty()
            || name.starts_with('/')
            || name.ends_with('/')
            || name
                .split('/')
                .any(|p| p.is_empty() || p == "." || p == "..")
        {
            return Err(Error::io(
                op,
                self.display_path(name),
                std::io::Error::new(ErrorKind::InvalidInput, "not a valid object name"),
            ));
        }
        Ok(())
    }

    /// The [`Error::Io`] for a failed request about `name`.
    fn error(&self, op: &'static str, name: &str, e: opendal::Error) -> Error {
        Error::io(op, self.display_path(name), self.classify(&e))
    }

    /// What `e` means, as an `std::io::Error` with a kind and a [`RemoteProblem`].
    fn classify(&self, e: &opendal::Error) -> std::io::Error {
        let endpoint = self.inner.loc.endpoint();
        let bucket = &self.inner.loc.bucket;
        let text = e.to_string();
        let status = http_status(&text);
        let code = quoted_field(e.message(), "code").unwrap_or_default();
        let server_message = quoted_field(e.message(), "message").unwrap_or_default();
        let said = || match (code.is_empty(), server_message.is_empty()) {
            (true, _) => status.map(|s| format!("HTTP {s}")).unwrap_or_default(),
            (false, true) => code.clone(),
            (false, false) => format!("{code}: {server_message}"),
        };
        let problem = |kind: ErrorKind, transient: bool, message: String| {
            RemoteProblem { message, transient }.into_io(kind)
        };
        let credentials = "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or the profile \
                           AWS_PROFILE names)";
        // Failures before or without an answer: the transport's.
        if status.is_none()
            && let Some(kind) = transport_kind(e)
        {
            return match kind {
                ErrorKind::TimedOut => problem(
                    kind,
                    true,
                    format!(
                        "{endpoint} did not answer in time (no progress for {} s)",
                        self.inner.idle.as_secs()
                    ),
                ),
                ErrorKind::ConnectionRefused => problem(
                    kind,
                    true,
                    format!("cannot reach {endpoint}: connection refused"),
                ),
                ErrorKind::NotConnected => problem(
                    kind,
                    true,
                    format!("cannot reach {endpoint}: {}", source_chain(e)),
                ),
                _ => problem(
                    kind,
                    true,
                    format!("the connection to {endpoint} broke: {}", source_chain(e)),
                ),
            };
        }
        // opendal's own check that a ranged read got all it asked for (the server's answer
        // was complete but shorter: the range runs past the end of the object).
        if status.is_none() && e.message().contains("reader got too little data") {
            return problem(
                ErrorKind::UnexpectedEof,
                false,
                "the range runs past the end of the object".into(),
            );
        }
        let region = &self.inner.region;
        let wrong_region = code == "AuthorizationHeaderMalformed"
            || code == "PermanentRedirect"
            || code == "IncorrectEndpoint"
            || (status == Some(400) && server_message.to_ascii_lowercase().contains("region"));
        if code == "NoSuchBucket" {
            return problem(
                ErrorKind::Other,
                false,
                format!("bucket {bucket} does not exist at {endpoint}"),
            );
        }
        if wrong_region {
            return problem(
                ErrorKind::Other,
                false,
                format!(
                    "the server refused region {region} ({}): set AWS_REGION to the bucket's \
                     region",
                    said()
                ),
            );
        }
        match status {
            Some(404) => problem(ErrorKind::NotFound, false, "no such object".into()),
            Some(403) if key_refused(&code, &server_message) => problem(
                ErrorKind::PermissionDenied,
                false,
                format!("the access key was refused ({}): {credentials}", said()),
            ),
            Some(403) => match code.as_str() {
                "AccessDenied" | "AllAccessDisabled" => problem(
                    ErrorKind::PermissionDenied,
                    false,
                    format!(
                        "access denied ({}): the access key may lack permission on bucket \
                         {bucket}, or be wrong: {credentials}",
                        said()
                    ),
                ),
                _ => problem(
                    ErrorKind::PermissionDenied,
                    false,
                    format!("the access key was refused ({}): {credentials}", said()),
                ),
            },
            Some(401) => problem(
                ErrorKind::PermissionDenied,
                false,
                format!("the access key was refused ({}): {credentials}", said()),
            ),
            Some(408) => problem(
                ErrorKind::TimedOut,
                true,
                format!("{endpoint} timed out the request ({})", said()),
            ),
            Some(429) => problem(
                ErrorKind::Other,
                true,
                format!("{endpoint} asks to slow down ({})", said()),
            ),
            Some(s) if s >= 500 => problem(
                ErrorKind::Other,
                true,
                format!("{endpoint} failed ({})", said()),
            ),
            Some(416) => problem(
                ErrorKind::UnexpectedEof,
                false,
                "the range is past the end of the object".into(),
            ),
            Some(_) => problem(
                ErrorKind::Other,
                e.is_temporary() || e.kind() == opendal::ErrorKind::RateLimited,
                format!("{endpoint} refused the request ({})", said()),
            ),
            None => {
                let lower = text.to_ascii_lowercase();
                let message = match e.kind() {
                    opendal::ErrorKind::ConfigInvalid | opendal::ErrorKind::PermissionDenied
                        if lower.contains("credential") =>
                    {
                        format!("no usable S3 credentials: {credentials} ({})", e.message())
                    }
                    // No credentials at all: nothing to sign the request with.
                    _ if lower.contains("signing") => format!(
                        "no S3 credentials were found to sign the request to {endpoint}: \
                         {credentials}"
                    ),
                    _ => format!("request to {endpoint} failed: {}", e.message()),
                };
                let kind = match e.kind() {
                    opendal::ErrorKind::NotFound => ErrorKind::NotFound,
                    opendal::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
                    opendal::ErrorKind::RangeNotSatisfied => ErrorKind::UnexpectedEof,
                    _ => ErrorKind::Other,
                };
                problem(kind, e.is_temporary(), message)
            }
        }
    }

    /// Confirms once that the bucket exists, so that a 404 is a missing object and not a
    /// missing bucket (HEAD answers carry no error code).
    fn check_bucket(&self, op: &'static str, name: &str) -> Result<()> {
        if self.inner.bucket_seen.load(Ordering::Relaxed) {
            return Ok(());
        }
        let r = self.block(async {
            let mut lister = self.inner.op.lister_with("/").limit(1).await?;
            lister.try_next().await
        });
        match r {
            Ok(_) => {
                self.inner.bucket_seen.store(true, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => Err(self.error(op, name, e)),
        }
    }

    fn stat(&self, op: &'static str, name: &str) -> Result<Option<ObjectMeta>> {
        self.check_name(op, name)?;
        match self.block(self.inner.op.stat(name)) {
            Ok(m) => {
                self.inner.bucket_seen.store(true, Ordering::Relaxed);
                Ok(Some(ObjectMeta {
                    name: name.to_string(),
                    size: m.content_length(),
                    modified: m.last_modified().map(Into::into),
                }))
            }
            Err(e) => {
                let io = self.classify(&e);
                if io.kind() == ErrorKind::NotFound {
                    self.check_bucket(op, name)?;
                    Ok(None)
                } else if http_status(&e.to_string()).is_some_and(|s| (400..500).contains(&s))
                    && quoted_field(e.message(), "code").is_none()
                {
                    // HEAD answers carry no error document: a listing says what is wrong.
                    self.inner.bucket_seen.store(false, Ordering::Relaxed);
                    self.check_bucket(op, name)?;
                    Err(Error::io(op, self.display_path(name), io))
                } else {
                    Err(Error::io(op, self.display_path(name), io))
                }
            }
        }
    }

    /// Objects under `dir/`: directly under it, or (`deep`) at any depth.
    fn list_prefix(
        &self,
        dir: &str,
        deep: bool,
        f: &mut dyn FnMut(ObjectMeta) -> Result<()>,
    ) -> Result<()> {
        let path = if dir.is_empty() {
            "/".to_string()
        } else {
            self.check_name("list", dir)?;
            format!("{dir}/")
        };
        // The outer result is `f`'s, the inner one the server's.
        type Listed = std::result::Result<(), opendal::Error>;
        let listed = self.block(async {
            let mut lister = match self.inner.op.lister_with(&path).recursive(deep).await {
                Ok(l) => l,
                Err(e) => return Ok::<Listed, Error>(Err(e)),
            };
            loop {
                let entry = match lister.try_next().await {
                    Ok(Some(entry)) => entry,
                    Ok(None) => return Ok(Ok(())),
                    Err(e) => return Ok(Err(e)),
                };
                let name = entry.path().trim_start_matches('/');
                let Some(base) = name.strip_prefix(path.trim_start_matches('/')) else {
                    continue;
                };
                if base.is_empty() || (!deep && base.contains('/')) || base.starts_with(".tmp-") {
                    continue;
                }
                let meta = entry.metadata();
                f(ObjectMeta {
                    name: name.to_string(),
                    size: meta.content_length(),
                    modified: meta.last_modified().map(Into::into),
                })?;
            }
        });
        match listed? {
            Ok(()) => {
                self.inner.bucket_seen.store(true, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => Err(self.error("list", if dir.is_empty() { "" } else { dir }, e)),
        }
    }

    /// Bytes `range` of `name`, as many as the server has.
    fn read_range(&self, name: &str, range: std::ops::Range<u64>) -> opendal::Result<Vec<u8>> {
        self.block(async {
            let buf = self.inner.op.read_with(name).range(range).await?;
            Ok::<_, opendal::Error>(buf.to_vec())
        })
    }

    /// One PUT of `data` as `name`.
    fn put_bytes(&self, name: &str, data: bytes::Bytes) -> Result<()> {
        self.check_name("write", name)?;
        self.block(self.inner.op.write(name, opendal::Buffer::from(data)))
            .map(|_| ())
            .map_err(|e| self.error("write", name, e))
    }

    /// Queues the upload of `data` as `name`; blocks while `max_inflight` uploads run.
    fn start_upload(&self, name: &str, data: Vec<u8>) -> Result<()> {
        self.check_name("write", name)?;
        let data = Arc::new(data);
        {
            let mut u = self.uploads();
            while u.running >= self.inner.max_inflight {
                u = self
                    .inner
                    .uploads_changed
                    .wait(u)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
            }
            u.running += 1;
            u.inflight.insert(name.to_string(), Arc::clone(&data));
        }
        let this = self.clone();
        let owned = name.to_string();
        let body = Arc::clone(&data);
        let spawned = std::thread::Builder::new()
            .name("volback-s3-put".into())
            .spawn(move || {
                let bytes = bytes::Bytes::from_owner(SharedBytes(body));
                let result = this
                    .inner
                    .policy
                    .run(|| this.put_bytes(&owned, bytes.clone()));
                this.finish_upload(&owned, &data, result);
            });
        if let Err(e) = spawned {
            let mut u = self.uploads();
            u.running -= 1;
            u.inflight.remove(name);
            self.inner.uploads_changed.notify_all();
            return Err(Error::io(
                "start an upload thread for",
                self.display_path(name),
                e,
            ));
        }
        Ok(())
    }

    fn finish_upload(&self, name: &str, data: &Arc<Vec<u8>>, result: Result<()>) {
        let mut u = self.uploads();
        u.running -= 1;
        // A later upload of the same name keeps its own entry.
        if u.inflight.get(name).is_some_and(|d| Arc::ptr_eq(d, data)) {
            u.inflight.remove(name);
        }
        if let Err(e) = result {
            u.first_error.get_or_insert(e);
        }
        self.inner.uploads_changed.notify_all();
    }
}

/// Shares an upload's buffer with `bytes::Bytes` without a copy.
struct SharedBytes(Arc<Vec<u8>>);

impl AsRef<[u8]> for SharedBytes {
    fn as_ref(&self) -> &[u8] {
        self.0.as_slice()
    }
}

impl ReadBackend for S3 {
    fn display_path(&self, name: &str) -> PathBuf {
        PathBuf::from(format!("{}/{name}", self.inner.address))
    }

    fn location(&self) -> String {
        self.inner.address.clone()
    }

    fn capabilities(&self) -> &Capabilities {
        &self.inner.caps
    }

    fn get(&self, name: &str, limit: u64, what: &str) -> Result<Vec<u8>> {
        let too_large = |size: u64| {
            Error::corrupt(
                what,
                self.display_path(name),
                format!("it is {size} bytes long, more than the {limit} bytes allowed"),
            )
        };
        if let Some(data) = self.inflight(name) {
            if data.len() as u64 > limit {
                return Err(too_large(data.len() as u64));
            }
            return Ok(data.to_vec());
        }
        let Some(meta) = self.stat("read", name)? else {
            return Err(Error::io(
                "read",
                self.display_path(name),
                RemoteProblem {
                    message: "no such object".into(),
                    transient: false,
                }
                .into_io(ErrorKind::NotFound),
            ));
        };
        if meta.size > limit {
            return Err(too_large(meta.size));
        }
        if meta.size == 0 {
            return Ok(Vec::new());
        }
        let data = self
            .read_range(name, 0..meta.size)
            .map_err(|e| self.error("read", name, e))?;
        if data.len() as u64 != meta.size {
            return Err(Error::io(
                "read",
                self.display_path(name),
                RemoteProblem {
                    message: format!(
                        "the object changed while it was read ({} bytes, then {})",
                        meta.size,
                        data.len()
                    ),
                    transient: true,
                }
                .into_io(ErrorKind::Other),
            ));
        }
        Ok(data)
    }

    fn get_range(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        let eof = |have: u64| Error::IoAt {
            op: "read",
            path: self.display_path(name),
            offset,
            source: std::io::Error::new(
                ErrorKind::UnexpectedEof,
                format!(
                    "{} bytes asked for, the object has {have} from there",
                    buf.len()
                ),
            ),
        };
        if let Some(data) = self.inflight(name) {
            let start = usize::try_from(offset).unwrap_or(usize::MAX);
            let end = start.saturating_add(buf.len());
            return match data.get(start..end) {
                Some(bytes) => {
                    buf.copy_from_slice(bytes);
                    Ok(())
                }
                None => Err(eof(data.len().saturating_sub(start) as u64)),
            };
        }
        self.check_name("read", name)?;
        let end = offset.checked_add(buf.len() as u64).ok_or_else(|| eof(0))?;
        if buf.is_empty() {
            return Ok(());
        }
        let data = match self.block(async {
            let b = self.inner.op.read_with(name).range(offset..end).await?;
            Ok::<_, opendal::Error>(b)
        }) {
            Ok(b) => b,
            Err(e) => {
                let io = self.classify(&e);
                if io.kind() == ErrorKind::UnexpectedEof {
                    return Err(eof(0));
                }
                return Err(Error::IoAt {
                    op: "read",
                    path: self.display_path(name),
                    offset,
                    source: io,
                });
            }
        };
        if data.len() != buf.len() {
            return Err(eof(data.len() as u64));
        }
        let mut data = data;
        data.copy_to_slice(buf);
        Ok(())
    }

    fn head(&self, name: &str) -> Result<Option<ObjectMeta>> {
        if let Some(data) = self.inflight(name) {
            return Ok(Some(ObjectMeta {
                name: name.to_string(),
                size: data.len() as u64,
                modified: None,
            }));
        }
        self.stat("stat", name)
    }

    fn list(&self, dir: &str, f: &mut dyn FnMut(ObjectMeta) -> Result<()>) -> Result<()> {
        self.list_prefix(dir, false, f)
    }

    /// One listing of the whole prefix `dir/`, without a delimiter: 1,000 objects per
    /// request, instead of a request per fan-out directory.
    fn list_fanout(&self, dir: &str, f: &mut dyn FnMut(ObjectMeta) -> Result<()>) -> Result<()> {
        self.list_prefix(dir, true, &mut |m| {
            // Only `dir/xx/name`, as the fan-out listings would have passed.
            let rest = m.name.get(dir.len() + 1..).unwrap_or("");
            match rest.split_once('/') {
                Some((fan, base))
                    if fan.len() == 2
                        && fan.bytes().all(|b| b.is_ascii_hexdigit())
                        && !base.is_empty()
                        && !base.contains('/')
                        && !base.starts_with(".tmp-") =>
                {
                    f(m)
                }
                _ => Ok(()),
            }
        })
    }
}

impl WriteBackend for S3 {
    fn put(&self, name: &str, data: &[u8], _mode: PutMode) -> Result<()> {
        // One PUT: atomic, and durable when the server answers.
        self.put_bytes(name, bytes::Bytes::copy_from_slice(data))
    }

    fn delete(&self, name: &str) -> Result<bool> {
        // S3 answers a DELETE of a missing key with success: ask first.
        if self.stat("delete", name)?.is_none() {
            return Ok(false);
        }
        self.block(self.inner.op.delete(name))
            .map_err(|e| self.error("delete", name, e))?;
        Ok(true)
    }

    fn stage(&self) -> Result<Box<dyn Staged>> {
        Ok(Box::new(S3Staged {
            backend: self.clone(),
            buf: Vec::new(),
        }))
    }

    fn barrier(&self) -> Result<()> {
        let mut u = self.uploads();
        while u.running > 0 {
            u = self
                .inner
                .uploads_changed
                .wait(u)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        match u.first_error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Server-side copy to the first free `<name>.bad[.N]`, then delete: a crash between the
    /// two leaves both, and nothing reads the `.bad` copy.
    fn set_aside(&self, name: &str) -> Result<Option<String>> {
        if self.stat("set aside", name)?.is_none() {
            return Ok(None);
        }
        let mut target = None;
        for n in 0..MAX_ASIDE {
            let candidate = if n == 0 {
                format!("{name}.bad")
            } else {
                format!("{name}.bad.{n}")
            };
            if self.stat("set aside", &candidate)?.is_none() {
                target = Some(candidate);
                break;
            }
        }
        let Some(target) = target else {
            return Err(Error::io(
                "set aside",
                self.display_path(name),
                std::io::Error::new(
                    ErrorKind::AlreadyExists,
                    format!("{MAX_ASIDE} set-aside copies exist already"),
                ),
            ));
        };
        self.block(self.inner.op.copy(name, &target))
            .map_err(|e| self.error("copy", name, e))?;
        self.block(self.inner.op.delete(name))
            .map_err(|e| self.error("delete", name, e))?;
        Ok(Some(target))
    }

    fn open_log(&self, name: &str, mode: LogMode) -> Result<Option<Box<dyn Log>>> {
        shim::open_log(self.shared(), name, mode)
    }

    fn lock_exclusive(&self, name: &str, what: &str) -> Result<Box<dyn LockGuard>> {
        shim::lock_exclusive(self.shared(), name, what)
    }

    fn lock_held(&self, name: &str) -> Result<bool> {
        shim::lock_held(self.shared().as_ref(), name)
    }

    fn create_marker(&self, id: &str, payload: &[u8]) -> Result<Box<dyn Marker>> {
        shim::create_marker(self.shared(), id, payload)
    }

    fn live_markers(&self) -> Result<Vec<(String, Option<Vec<u8>>)>> {
        shim::live_markers(self.shared().as_ref())
    }

    /// Nothing to sweep: no temporary objects are ever written (single PUTs, no multipart).
    fn sweep_stale(&self) -> Result<()> {
        Ok(())
    }
}

/// A staged object: a memory buffer, uploaded by [`Staged::finish`].
struct S3Staged {
    backend: S3,
    buf: Vec<u8>,
}

impl Staged for S3Staged {
    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        if self.buf.len() as u64 + bytes.len() as u64 > MAX_STAGED {
            return Err(Error::internal(
                "S3 staged object",
                format!("more than {MAX_STAGED} bytes written"),
            ));
        }
        self.buf.extend_from_slice(bytes);
        Ok(())
    }

    fn len(&self) -> u64 {
        self.buf.len() as u64
    }

    fn finish(self: Box<Self>, name: &str) -> Result<()> {
        let S3Staged { backend, buf } = *self;
        backend.start_upload(name, buf)
    }
}

/// Locks and writer markers are leases, journals are segment logs: the generic code over
/// any backend's object primitives.
mod shim {
    pub use super::super::lease::{create_marker, live_markers, lock_exclusive, lock_held};
    pub use super::super::segments::open_log;
}

/// HTTP through our reqwest clients: small requests fail after `idle` without an answer or
/// body progress (the client's read timeout); requests with large bodies get `idle` plus the
/// time to send the body at [`MIN_UPLOAD_RATE`].
struct Transport {
    small: opendal_http_transport_reqwest::ReqwestTransport,
    bulk: opendal_http_transport_reqwest::ReqwestTransport,
    idle: Duration,
    counts: Arc<Requests>,
}

/// Requests sent, by kind (retries included): `VOLBACK_S3_REQUESTS=1` prints them when the
/// backend is dropped, to check the cost model (docs/OBJECT-STORAGE.md);
/// `VOLBACK_S3_REQUESTS=trace` also prints each request as it is sent.
#[derive(Default)]
struct Requests {
    trace: bool,
    get: AtomicU64,
    ranged_get: AtomicU64,
    list: AtomicU64,
    head: AtomicU64,
    put: AtomicU64,
    delete: AtomicU64,
    other: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

impl Requests {
    fn count<T>(&self, req: &http::Request<T>, body: usize) {
        let query = req.uri().query().unwrap_or("");
        let c = match *req.method() {
            http::Method::GET if query.contains("list-type") => &self.list,
            http::Method::GET if req.headers().contains_key(http::header::RANGE) => {
                &self.ranged_get
            }
            http::Method::GET => &self.get,
            http::Method::HEAD => &self.head,
            http::Method::PUT => &self.put,
            http::Method::DELETE => &self.delete,
            _ => &self.other,
        };
        c.fetch_add(1, Ordering::Relaxed);
        self.bytes_out.fetch_add(body as u64, Ordering::Relaxed);
    }

    fn summary(&self) -> String {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "GET {} (ranged {}), LIST {}, HEAD {}, PUT {}, DELETE {}, other {}; \
             {} bytes received, {} bytes sent",
            n(&self.get) + n(&self.ranged_get),
            n(&self.ranged_get),
            n(&self.list),
            n(&self.head),
            n(&self.put),
            n(&self.delete),
            n(&self.other),
            n(&self.bytes_in),
            n(&self.bytes_out)
        )
    }
}

impl opendal::HttpTransport for Transport {
    async fn fetch(
        &self,
        req: http::Request<opendal::Buffer>,
    ) -> opendal::Result<http::Response<opendal::HttpBody>> {
        let len = req.body().len();
        let head = req.method() == http::Method::HEAD;
        self.counts.count(&req, len);
        if self.counts.trace {
            let range = req.headers().get(http::header::RANGE);
            let range = range.and_then(|r| r.to_str().ok()).unwrap_or("");
            eprintln!("volback: S3 {} {} {range}", req.method(), req.uri().path());
        }
        let answer = if len <= BULK_BODY {
            self.small.fetch(req).await
        } else {
            let limit = self.idle + Duration::from_secs(len as u64 / MIN_UPLOAD_RATE);
            match tokio::time::timeout(limit, self.bulk.fetch(req)).await {
                Ok(r) => r,
                Err(_) => Err(opendal::Error::new(
                    opendal::ErrorKind::Unexpected,
                    "the request timed out",
                )
                .set_temporary()
                .set_source(std::io::Error::new(
                    ErrorKind::TimedOut,
                    format!("no answer within {} s", limit.as_secs()),
                ))),
            }
        };
        if let Ok(resp) = &answer
            && !head
            && let Some(n) = resp
                .headers()
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        {
            self.counts.bytes_in.fetch_add(n, Ordering::Relaxed);
        }
        answer
    }
}

/// Installs ring as the process's TLS crypto provider (once; one installed by someone else
/// stays).
fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The region of the environment: `AWS_REGION`, `AWS_DEFAULT_REGION`, the profile's `region`
/// in the AWS config file, else `us-east-1`.
fn region_from_environment() -> String {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    if let Some(r) = env("AWS_REGION").or_else(|| env("AWS_DEFAULT_REGION")) {
        return r.trim().to_string();
    }
    let file = env("AWS_CONFIG_FILE")
        .map(PathBuf::from)
        .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".aws").join("config")));
    let profile = env("AWS_PROFILE").unwrap_or_else(|| "default".into());
    file.and_then(|f| std::fs::read_to_string(f).ok())
        .and_then(|text| profile_region(&text, &profile))
        .unwrap_or_else(|| "us-east-1".into())
}

/// `region = …` of `[profile NAME]` (or `[default]`) in an AWS config file's text.
fn profile_region(text: &str, profile: &str) -> Option<String> {
    let mut in_section = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let section = section.trim();
            let name = section
                .strip_prefix("profile ")
                .map(str::trim)
                .unwrap_or(section);
            in_section = name == profile;
            continue;
        }
        if in_section
            && let Some((k, v)) = line.split_once('=')
            && k.trim() == "region"
            && !v.trim().is_empty()
        {
            return Some(v.trim().to_string());
        }
    }
    None
}

/// Whether a 403 says the key itself is wrong (unknown key, bad secret), rather than that it
/// lacks a permission: AWS has codes for it, Garage answers `AccessDenied` with a message.
fn key_refused(code: &str, server_message: &str) -> bool {
    let m = server_message.to_ascii_lowercase();
    matches!(
        code,
        "InvalidAccessKeyId" | "SignatureDoesNotMatch" | "InvalidToken" | "ExpiredToken"
    ) || m.contains("signature")
        || m.contains("no such key")
        || m.contains("access key")
}

/// The HTTP status in an opendal error's text (its `response` context: `Parts { status: 403,`).
fn http_status(text: &str) -> Option<u16> {
    let at = text.find("Parts { status: ")? + "Parts { status: ".len();
    let digits: String = text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// `VALUE` of `name: "VALUE"` in opendal's rendering of an S3 error document.
fn quoted_field(message: &str, name: &str) -> Option<String> {
    let key = format!("{name}: \"");
    let at = message.find(&key)? + key.len();
    let rest = &message[at..];
    let end = rest.find('"')?;
    Some(rest[..end].to_string())
}

/// The kind of the transport failure behind `e`, if it is one: timeouts, refused and broken
/// connections, and other failures to connect.
fn transport_kind(e: &opendal::Error) -> Option<ErrorKind> {
    let mut connect = false;
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            match io.kind() {
                k @ (ErrorKind::TimedOut
                | ErrorKind::ConnectionRefused
                | ErrorKind::ConnectionReset
                | ErrorKind::ConnectionAborted
                | ErrorKind::BrokenPipe
                | ErrorKind::NotConnected) => return Some(k),
                ErrorKind::UnexpectedEof => return Some(ErrorKind::ConnectionReset),
                _ => {}
            }
        }
        if let Some(r) = c.downcast_ref::<reqwest::Error>() {
            if r.is_timeout() {
                return Some(ErrorKind::TimedOut);
            }
            connect |= r.is_connect();
        }
        cause = c.source();
    }
    if connect {
        return Some(ErrorKind::NotConnected);
    }
    // An answer cut short, or a request that could not be sent: opendal marks them temporary.
    if e.is_temporary() && e.kind() == opendal::ErrorKind::Unexpected {
        return Some(ErrorKind::ConnectionReset);
    }
    None
}

/// The causes behind `e`, for messages.
fn source_chain(e: &opendal::Error) -> String {
    let mut parts = Vec::new();
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(c) = cause {
        let text = c.to_string();
        if !parts.iter().any(|p: &String| p.contains(&text)) {
            parts.push(text);
        }
        cause = c.source();
    }
    if parts.is_empty() {
        e.message().to_string()
    } else {
        parts.join(": ")
    }
}

#[cfg(test)]
mod tests;
