//! Where a repository's objects are stored: the storage backend interface.
//!
//! The repository logic ([`crate::repo::Repository`], the blob store, the packer, index,
//! journals, writers, prune, verify) names every object by a relative key, `/`-separated, as
//! the local layout names files: `config`, `keys/<slot>`, `packs/ab/<64hex>`, `index/<id>`,
//! `snapshots/<id>`, `journals/<stem>.journal`, `writers/<id>`, `pending/<id>`. A backend
//! stores those objects somewhere: [`local::LocalDir`] in a directory (format 1 and 2 layout,
//! unchanged), the S3 backend in a bucket under a prefix.
//!
//! The interface has a read half ([`ReadBackend`]: whole and ranged reads, stat, listing)
//! and a write half ([`WriteBackend`]: atomic puts, deletes, staged large objects, a durability
//! barrier, append-only logs for journals, and locks). Both are `Send + Sync`: one backend
//! serves every thread of a command.
//!
//! Encryption is not a backend concern: the repository logic seals objects before `put` and
//! opens them after `get` ([`crate::repo::seal::Sealer`]), because sealing binds the object's
//! kind and name and works frame by frame inside packs. Caching and retries are wrappers
//! around a backend, not flags inside one.
//!
//! # Errors
//!
//! Backends report failures as [`Error::Io`] (or [`Error::IoAt`] for ranged reads) whose path
//! is [`ReadBackend::display_path`] of the object, and whose `std::io::Error` kind carries the
//! meaning the repository logic relies on: `NotFound` for a missing object, `UnexpectedEof`
//! for a range past the end, `PermissionDenied` for refused access, `TimedOut` for a request
//! that gave up. An object larger than a `get` limit is [`Error::Corrupt`].

pub mod cache;
pub mod lease;
pub mod local;
pub mod retry;
#[cfg(feature = "s3")]
pub mod s3;
pub mod segments;
pub mod window;

use crate::error::Result;
use std::fmt::Debug;
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

/// What a listing or a stat says about one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// The object's key relative to the repository (`index/ab12…`).
    pub name: String,
    pub size: u64,
    /// Local: modification time. Object stores: the server's `LastModified`, i.e. the
    /// *server's* clock (leases compare only server times with each other).
    pub modified: Option<SystemTime>,
}

/// How a [`WriteBackend::put`] publishes an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PutMode {
    /// Replaces whatever is there. Atomic (readers see the old or the new bytes, never a
    /// mix) and durable when the call returns.
    Overwrite,
    /// An object named after its content (pack, index file, snapshot): like `Overwrite`, but
    /// a backend may defer durability to the next [`WriteBackend::barrier`], which the
    /// repository logic calls before anything refers to the object.
    ContentNamed,
}

/// What a backend is good at; the repository logic adapts its access patterns.
#[derive(Debug, Clone)]
pub struct Capabilities {
    /// Locks are kernel file locks (a dead holder's lock is free at once). Without them,
    /// locks are leases that expire.
    pub file_locks: bool,
    /// A ranged read costs about as much as the bytes it returns (local files). When false,
    /// readers fetch larger windows and keep them.
    pub cheap_ranged_reads: bool,
    /// How many requests are worth having in flight at once.
    pub parallelism: usize,
}

/// The read half of a backend. Every method may be called from many threads at once.
pub trait ReadBackend: Send + Sync + Debug {
    /// Where object `name` is, for messages and error paths: `REPO/packs/ab/…` for a local
    /// directory, `s3:http://host:port/bucket/prefix/packs/ab/…` for a bucket.
    fn display_path(&self, name: &str) -> PathBuf;

    /// The repository's location as the user wrote it (for messages).
    fn location(&self) -> String;

    fn capabilities(&self) -> &Capabilities;

    /// The whole object. An object larger than `limit` bytes is refused with
    /// [`Error::Corrupt`](crate::error::Error::Corrupt) naming `what` (before its bytes are
    /// read); a missing object is an I/O error of kind `NotFound`.
    fn get(&self, name: &str, limit: u64, what: &str) -> Result<Vec<u8>>;

    /// Exactly `buf.len()` bytes at `offset`. Bytes past the end of the object: an I/O error
    /// of kind `UnexpectedEof`.
    fn get_range(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()>;

    /// Size and time of the object, `None` when there is none.
    fn head(&self, name: &str) -> Result<Option<ObjectMeta>>;

    /// Every object directly under `dir` (`"index"`, `"packs/ab"`: no trailing slash; `""` is
    /// the repository's top level), in no particular order, passed to `f` one at a time.
    /// Names of temporary objects (`.tmp-*`) are never passed. A missing directory lists
    /// nothing.
    fn list(&self, dir: &str, f: &mut dyn FnMut(ObjectMeta) -> Result<()>) -> Result<()>;

    /// Every object in the 256 fan-out directories `dir/00` … `dir/ff` (`"packs"`), as
    /// [`ReadBackend::list`] passes them. The default lists each directory; object storage
    /// lists the whole prefix at once (one request per 1,000 objects instead of 256).
    fn list_fanout(&self, dir: &str, f: &mut dyn FnMut(ObjectMeta) -> Result<()>) -> Result<()> {
        for i in 0..=255u8 {
            self.list(&format!("{dir}/{i:02x}"), f)?;
        }
        Ok(())
    }

    /// The local directory of the repository, for the backends that have one (local
    /// directories): restore refuses targets inside it, format 1 reads through it.
    fn local_root(&self) -> Option<&std::path::Path> {
        None
    }
}

/// The write half of a backend.
pub trait WriteBackend: ReadBackend {
    /// Publishes `data` as object `name` (see [`PutMode`]).
    fn put(&self, name: &str, data: &[u8], mode: PutMode) -> Result<()>;

    /// Deletes object `name`, durably; `Ok(false)` when there was none.
    fn delete(&self, name: &str) -> Result<bool>;

    /// Starts a large object whose name is known only when it is complete (a pack is named
    /// by the hash of its bytes). Local: a temporary file; object stores: memory, uploaded
    /// by [`Staged::finish`].
    fn stage(&self) -> Result<Box<dyn Staged>>;

    /// Everything this process published with [`PutMode::ContentNamed`] or through
    /// [`Staged::finish`] is durable and visible to every reader when this returns, or an
    /// error says what failed. Called before an object that refers to them is written.
    fn barrier(&self) -> Result<()>;

    /// Moves a damaged object aside (to `<name>.bad`, `<name>.bad.1`, …) so that nothing
    /// reads it and nothing is lost; returns the new name, `None` when `name` was absent.
    fn set_aside(&self, name: &str) -> Result<Option<String>>;

    /// The append-only log `name` (resume journals): `Create` replaces any old log with an
    /// empty one; `Open` and `Read` open an existing one (`None` when there is none).
    fn open_log(&self, name: &str, mode: LogMode) -> Result<Option<Box<dyn Log>>>;

    /// Takes lock `name` exclusively without waiting (`volume/<stem>` for a backup of one
    /// volume, `prune` for a prune). Held until the guard is dropped. Held by another:
    /// [`Error::Locked`](crate::error::Error::Locked) whose detail includes `what` (a
    /// sentence: "another prune is running") and by whom when known.
    fn lock_exclusive(&self, name: &str, what: &str) -> Result<Box<dyn LockGuard>>;

    /// Whether lock `name` is held by anyone now (dry runs say whether a backup would be
    /// refused). Takes nothing.
    fn lock_held(&self, name: &str) -> Result<bool>;

    /// Creates this process's writer marker `writers/<id>` holding `payload`, kept alive
    /// (locked or refreshed) until the marker is dropped, which removes it.
    fn create_marker(&self, id: &str, payload: &[u8]) -> Result<Box<dyn Marker>>;

    /// The writer markers of live writers: `(id, payload)`. Markers whose writer is gone
    /// (its lock can be taken, or its lease expired) are removed and not returned. A payload
    /// that could not be read is `None` (a writer still writing it).
    fn live_markers(&self) -> Result<Vec<(String, Option<Vec<u8>>)>>;

    /// Housekeeping for writers that died: removes temporary objects they left.
    fn sweep_stale(&self) -> Result<()>;
}

/// A large object being written; see [`WriteBackend::stage`].
pub trait Staged: Send {
    fn write(&mut self, bytes: &[u8]) -> Result<()>;
    /// Bytes written so far.
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Publishes the object as `name` ([`PutMode::ContentNamed`]: durable at the next
    /// barrier). A backend may return before the upload completes; its errors then surface
    /// at the next [`WriteBackend::barrier`].
    fn finish(self: Box<Self>, name: &str) -> Result<()>;
}

/// How [`WriteBackend::open_log`] opens a log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogMode {
    /// A new, empty log, replacing any old one (durably).
    Create,
    /// The existing log, for reading and appending; `None` when there is none.
    Open,
    /// The existing log, for reading only (appending fails); `None` when there is none.
    Read,
}

/// A durable append-only byte log (a resume journal).
pub trait Log: Send {
    /// The log's bytes from the start, as one stream.
    fn reader(&mut self) -> Result<Box<dyn Read + '_>>;
    /// Bytes in the log.
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Appends `bytes` durably: when this returns they survive a crash.
    fn append(&mut self, bytes: &[u8]) -> Result<()>;
    /// Cuts the log to its first `len` bytes, durably (a torn tail).
    fn truncate(&mut self, len: u64) -> Result<()>;
    /// Removes the log; a crash in the middle leaves no log or a complete one.
    fn remove(self: Box<Self>) -> Result<()>;
}

/// A held lock; dropping it releases it.
pub trait LockGuard: Send + Sync + Debug {
    /// Ok while the lock is surely still held. A lease that could not be refreshed in time
    /// is an error: the holder must stop before doing what the lock protects.
    fn check(&self) -> Result<()>;
}

/// A writer's marker; dropping it removes it.
pub trait Marker: Send + Sync + Debug {
    /// Replaces the marker's payload, atomically and durably.
    fn write(&mut self, payload: &[u8]) -> Result<()>;
    /// Ok while the marker surely still protects its writer (see [`LockGuard::check`]).
    fn check(&self) -> Result<()>;
}

/// The key of object `name` in directory `dir` (`""` is the top level).
pub fn key(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

/// The last component of a key (`index/ab12…` → `ab12…`).
pub fn base_name(key: &str) -> &str {
    key.rsplit_once('/').map_or(key, |(_, n)| n)
}

/// The key of pack `id`: `packs/<first two hex digits>/<hex>`.
pub fn pack_key(id: &crate::hash::ChunkId) -> String {
    let hex = id.to_hex();
    format!("packs/{}/{hex}", &hex[..2])
}

/// The leases a writer relies on (its writer marker, its volume lock), checked before each
/// step that another process's decision could invalidate: before an index file names new
/// packs, before a journal batch, before the snapshot. Empty: nothing to check (local
/// directories, whose locks cannot lapse while their holder lives).
#[derive(Clone, Default)]
pub struct Fence {
    checks: Vec<Arc<dyn Fn() -> Result<()> + Send + Sync>>,
}

impl std::fmt::Debug for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fence")
            .field("checks", &self.checks.len())
            .finish()
    }
}

impl Fence {
    /// Adds a check.
    pub fn add(&mut self, check: Arc<dyn Fn() -> Result<()> + Send + Sync>) {
        self.checks.push(check);
    }

    /// Ok while every lease still surely holds.
    pub fn check(&self) -> Result<()> {
        self.checks.iter().try_for_each(|c| c())
    }
}
