//! The repository: where snapshots live.
//!
//! # Layout of a local-directory repository (format version 2)
//!
//! ```text
//! REPO/
//!   config                 JSON: format name, version 2, repository id, chunk hash, zstd level,
//!                          block size (default 4096), pack size (default 16 MiB). Written
//!                          last by `init`: no config, no repository.
//!   lock                   empty; every command holds a shared lock on it (table below)
//!   prune.lock             empty; a prune holds an exclusive lock on it
//!   packs/00 … packs/ff/   pack files ([`pack`]), named by the BLAKE3 of the whole file
//!   index/<id>             immutable index files ([`index`]): which blobs each pack holds
//!   snapshots/<id>         one immutable file per snapshot; id = hex of its checksum
//!   journals/<key>.journal resume journal of an unfinished backup of volume <key>
//!   journals/<key>.lock    held exclusively while a backup of volume <key> runs
//!   writers/<id>           one marker per running backup, locked by it ([`writers`])
//!   pending/<id>           packs a prune condemned and has not deleted yet ([`writers`])
//!   tmp/                   temporary files (packs being written), renamed when complete
//! ```
//!
//! Data lives in blobs ([`blob`]): content-addressed, stored in frames inside packs, found
//! through the index ([`blobs::BlobStore`]), written by a [`packer::Packer`]. Snapshots name
//! blobs only by id, so a prune may move them. Format 1 repositories (a `chunks/00 … ff/`
//! tree of one file per chunk, [`chunks`]) are still opened and read; nothing writes new data
//! into them ([`Repository::require_format2`]).
//!
//! Byte layouts are in [`format`] and docs/FORMAT.md.
//!
//! # Encrypted repositories (format 3)
//!
//! Format 3 is format 2 with every object sealed ([`seal::Sealer`], [`crate::crypto`]) and
//! one more directory, `keys/`, holding key slots: the master key wrapped under each password
//! ([`keys`]). Its `config` adds `encryption` and `sealed`, a sealed copy of itself checked
//! on open, so a changed plain field is detected. [`Repository::open_with`] unlocks it with a
//! [`keys::PasswordSource`]; [`Repository::open`] opens plain repositories only. `init`
//! makes format 3 when [`InitOptions::encryption`] is set; plain repositories stay format 2,
//! byte for byte. Everything that says "format 2" below holds for format 3.
//!
//! # Locking
//!
//! | operation                                    | `lock` | `prune.lock`     | `journals/<key>.lock` | `writers/` marker |
//! |----------------------------------------------|--------|------------------|-----------------------|-------------------|
//! | backup                                       | shared | —                | exclusive (try)       | yes               |
//! | restore, verify, list, export, mount, serve  | shared | —                | —                     | no                |
//! | forget                                       | shared | —                | —                     | no                |
//! | prune                                        | shared | exclusive (try)  | —                     | no                |
//!
//! Nothing takes `lock` exclusively any more: prune and backups run side by side. A backup's
//! marker says which pending records it read before loading the index; a prune deletes the
//! packs of a record only once every live marker knows it (docs/FORMAT.md F2.8).
//!
//! A missing `lock` file is created when the repository is writable; in a repository that
//! cannot be written (read-only medium or permissions) it is treated as "no lock held":
//! nothing can write there either, so restore, verify, listing, export, mount and serve work
//! on such a repository.
//!
//! Every repository file is opened through [`fsio::open_regular`] or [`fsio::lock_file`]:
//! symbolic links, FIFOs, devices and directories where a file belongs are refused
//! ([`Error::NotRegularFile`]), never followed or opened in a way that could block. The
//! repository's directories may be symbolic links.
//!
//! # Temporary files
//!
//! Every writer creates `.tmp-*` files and holds an exclusive lock on each until it is renamed
//! or removed. A process killed while writing leaves its temporary file behind, unlocked: the
//! next backup removes such files from `tmp/` (where packs are written), `journals/`,
//! `index/`, `pending/` and the repository root (those of `packs/` and format 1's `chunks/`
//! wait for prune: listing every fan-out directory at each backup would cost too much).
//!
//! Backups of different volumes, or of one volume into different repositories, run side by
//! side: packs (and format 1's chunk files) appear by atomic rename under content-derived
//! names, and each writer indexes its own packs. Two backups of the same volume at once are
//! refused (the second would redo the first one's work from the same journal). Locks are advisory `flock`
//! style locks that the kernel drops when a process dies, so a crash never leaves a stale lock.
//!
//! # Crash safety
//!
//! Metadata (config, snapshots, journal headers, index files, pending records) is written to
//! a temporary file, fsynced, renamed and the directory fsynced. Packs are renamed into place
//! without an fsync each; a `syncfs` of the repository's filesystem precedes the index file
//! that names them, and only indexed blobs are named by journal batches and snapshots. A pack
//! no index file names (a crash before the index file) is a leftover a prune deletes. Every
//! deletion happens after what replaces it is durable.

pub mod address;
pub mod backend;
pub mod blob;
pub mod blobs;
pub mod chunks;
pub mod format;
pub mod fsio;
pub mod index;
pub mod journal;
pub mod keys;
pub(crate) mod load_cache;
pub mod pack;
pub mod packer;
pub mod reader;
pub mod seal;
pub mod snapshot;
pub mod tree;
pub mod writers;

use crate::crypto::keyslot::KdfParams;
use crate::crypto::{Keys, Kind, MasterKey};
use crate::error::{Error, IoContext, Result};
use crate::hash::HashAlgorithm;
use crate::platform;
use chunks::ChunkStore;
use format::*;
use serde::{Deserialize, Serialize};
use snapshot::{SnapshotFile, SnapshotHeader};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// True when an I/O error says that the repository cannot be written (read-only filesystem,
/// no permission).
fn cannot_write(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::PermissionDenied
        || e.kind() == std::io::ErrorKind::ReadOnlyFilesystem
}

/// Block size used when neither the repository nor the command chooses one.
/// Chosen by measurement (docs/BENCHMARKS.md, "Block size"): with pack chunks, smaller blocks
/// store less per change but cost snapshot metadata (about 34 bytes per stored block in every
/// snapshot); 256 KiB keeps that near 140 MB per snapshot of a full 1 TiB volume.
pub const DEFAULT_BLOCK_SIZE: u32 = 256 * 1024;

/// Largest pack a backup writes by default: consecutive blocks compressed together
/// (docs/FORMAT.md §3). 4 MiB compresses like a stream (docs/BENCHMARKS.md) and is what one
/// read request fetches.
pub const DEFAULT_PACK_SIZE: u32 = 4 << 20;

fn default_pack_size() -> u32 {
    DEFAULT_PACK_SIZE
}

/// The `config` file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub format: String,
    pub version: u32,
    pub id: String,
    pub created: String,
    pub chunk_hash: HashAlgorithm,
    pub compression: String,
    pub zstd_level: i32,
    pub block_size: u32,
    /// Largest pack new backups write, in bytes; at most one block turns packing off.
    /// Absent in repositories made before packs: the default.
    #[serde(default = "default_pack_size")]
    pub pack_size: u32,
    /// Format 3: how objects are encrypted. Absent in plain repositories.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<EncryptionInfo>,
    /// Format 3: hex of a sealed record (kind `config`, name "") of this config's canonical
    /// JSON without `sealed` ([`Config::canonical_json`]); checked against the plain fields on
    /// open, so a changed plain field is detected. Absent in plain repositories.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed: Option<String>,
}

/// The `encryption` object of a format-3 config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptionInfo {
    /// Version of the encryption scheme: [`ENCRYPTION_VERSION`].
    pub version: u32,
    /// "aes-256-gcm".
    pub aead: String,
    /// "argon2id".
    pub kdf: String,
}

/// Version of the encryption scheme this volback reads and writes (`encryption.version`).
pub const ENCRYPTION_VERSION: u32 = 1;

impl EncryptionInfo {
    /// What this volback writes.
    pub fn current() -> EncryptionInfo {
        EncryptionInfo {
            version: ENCRYPTION_VERSION,
            aead: crate::crypto::AEAD_NAME.into(),
            kdf: "argon2id".into(),
        }
    }
}

impl Config {
    /// The bytes the `sealed` field seals: `serde_json::to_vec` of this config with `sealed`
    /// removed (members in declaration order, no whitespace).
    pub fn canonical_json(&self) -> Result<Vec<u8>> {
        let unsealed = Config {
            sealed: None,
            ..self.clone()
        };
        serde_json::to_vec(&unsealed)
            .map_err(|e| Error::internal("repository config", format!("cannot encode: {e}")))
    }
}

/// Options of `volback init`.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Repository format version: 2 (default), or 1 to make old-style repositories in tests.
    pub format: u32,
    pub chunk_hash: HashAlgorithm,
    pub zstd_level: i32,
    pub block_size: u32,
    pub pack_size: u32,
    /// Encrypt (format 3 = format 2 sealed) under this first password; `None`: plain.
    pub encryption: Option<EncryptionInit>,
}

/// The first key slot of a new encrypted repository.
#[derive(Clone)]
pub struct EncryptionInit {
    pub password: zeroize::Zeroizing<String>,
    pub kdf: KdfParams,
}

impl std::fmt::Debug for EncryptionInit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncryptionInit")
            .field("password", &"..")
            .field("kdf", &self.kdf)
            .finish()
    }
}

impl Default for InitOptions {
    /// A plain format-2 repository with its defaults (4 KiB blocks, 16 MiB packs).
    fn default() -> Self {
        InitOptions {
            format: REPO_VERSION,
            chunk_hash: HashAlgorithm::Blake3,
            zstd_level: 3,
            block_size: DEFAULT_BLOCK_SIZE_V2,
            pack_size: DEFAULT_PACK_SIZE_V2,
            encryption: None,
        }
    }
}

impl InitOptions {
    /// A format-1 repository with format 1's defaults (256 KiB blocks, 4 MiB pack chunks):
    /// what tests of old repositories create.
    pub fn v1() -> Self {
        InitOptions {
            format: 1,
            block_size: DEFAULT_BLOCK_SIZE,
            pack_size: DEFAULT_PACK_SIZE,
            ..InitOptions::default()
        }
    }
}

/// Message of [`Repository::require_format2`].
pub const FORMAT1_READ_ONLY: &str = "repository format 1 is read-only in this version of \
    volback: its snapshots can be listed, restored, verified, exported, mounted and served, and \
    forgotten; back up into a new repository (volback init)";

/// Directories of a format-1, a format-2 and a format-3 repository (besides the fan-out
/// ones).
const DIRS_V1: &[&str] = &["snapshots", "chunks", "journals", "tmp"];
const DIRS_V2: &[&str] = &[
    "snapshots",
    "packs",
    "index",
    "writers",
    "pending",
    "journals",
    "tmp",
];
const DIRS_V3: &[&str] = &[
    "snapshots",
    "packs",
    "index",
    "writers",
    "pending",
    "journals",
    "tmp",
    keys::KEYS_DIR,
];

fn dirs_of(version: u32) -> &'static [&'static str] {
    match version {
        1 => DIRS_V1,
        2 => DIRS_V2,
        _ => DIRS_V3,
    }
}

/// Checks that a block size is a power of two within the supported range.
pub fn check_block_size(bs: u32) -> Result<()> {
    if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) || !bs.is_power_of_two() {
        return Err(Error::InvalidArgument(format!(
            "block size {bs} must be a power of two between {MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE}"
        )));
    }
    Ok(())
}

/// Checks `pack_size` for a repository of format `version`: format 1 packs are chunks (at
/// most the largest chunk), format 2 packs are files of 1 MiB … 128 MiB.
fn check_pack_size(version: u32, pack_size: u32) -> Result<()> {
    if version == 1 {
        if pack_size > MAX_BLOCK_SIZE {
            return Err(Error::InvalidArgument(format!(
                "pack size {pack_size} is above the largest chunk, {MAX_BLOCK_SIZE} bytes"
            )));
        }
    } else if !(MIN_PACK_SIZE_V2..=MAX_PACK_SIZE_V2).contains(&pack_size) {
        return Err(Error::InvalidArgument(format!(
            "pack size {pack_size} must be between {MIN_PACK_SIZE_V2} and {MAX_PACK_SIZE_V2} bytes"
        )));
    }
    Ok(())
}

/// How [`Repository::open_impl`] gets the master key of an encrypted repository.
enum Unlock<'a> {
    /// From a key slot, with a password from this source.
    With(&'a dyn keys::PasswordSource),
    /// Already known (`init` just wrote the first slot).
    Known(keys::Unlocked),
}

/// Checks the encryption fields of `config` against its version: format 3 has both
/// `encryption` (a scheme this volback knows) and `sealed`; formats 1 and 2 have neither.
fn check_encryption_fields(config: &Config, cfg_path: &Path) -> Result<()> {
    let corrupt = |d: &str| Err(Error::corrupt("repository config", cfg_path, d));
    if config.version < REPO_VERSION_ENCRYPTED {
        if config.encryption.is_some() || config.sealed.is_some() {
            return corrupt(
                "a plain (format 1 or 2) config with encryption fields: its version was changed",
            );
        }
        return Ok(());
    }
    let (Some(enc), Some(_)) = (&config.encryption, &config.sealed) else {
        return corrupt("a format-3 config without its \"encryption\" and \"sealed\" fields");
    };
    if enc.version > ENCRYPTION_VERSION {
        return Err(Error::UnsupportedVersion {
            what: "repository encryption",
            path: cfg_path.to_path_buf(),
            found: enc.version,
            supported: ENCRYPTION_VERSION,
        });
    }
    if enc.version != ENCRYPTION_VERSION
        || enc.aead != crate::crypto::AEAD_NAME
        || enc.kdf != "argon2id"
    {
        return corrupt(&format!(
            "encryption version {} with {} and {} (this volback knows version \
             {ENCRYPTION_VERSION} with {} and argon2id)",
            enc.version,
            enc.aead,
            enc.kdf,
            crate::crypto::AEAD_NAME
        ));
    }
    if config.chunk_hash != HashAlgorithm::Blake3 {
        return corrupt("an encrypted repository's chunk_hash must be blake3 (keyed)");
    }
    Ok(())
}

/// Format 3: opens the sealed copy of the config and compares it with the plain fields.
fn check_sealed_config(config: &Config, sealer: &seal::Sealer, cfg_path: &Path) -> Result<()> {
    let Some(sealed) = &config.sealed else {
        return Err(Error::corrupt(
            "repository config",
            cfg_path,
            "no \"sealed\" field",
        ));
    };
    let stored = hex::decode(sealed).map_err(|e| {
        Error::corrupt(
            "repository config",
            cfg_path,
            format!("\"sealed\" is not hex: {e}"),
        )
    })?;
    let plain = sealer.open(
        Kind::Config,
        b"",
        &stored,
        "sealed repository config",
        cfg_path,
    )?;
    let inner: Config = serde_json::from_slice(&plain)
        .map_err(|e| Error::corrupt("sealed repository config", cfg_path, e.to_string()))?;
    let outer = Config {
        sealed: None,
        ..config.clone()
    };
    if inner != outer {
        return Err(Error::corrupt(
            "repository config",
            cfg_path,
            "config was changed: its plain fields differ from its sealed copy",
        ));
    }
    Ok(())
}

/// A snapshot's id and header, as listed.
#[derive(Debug, Clone)]
pub struct SnapshotEntry {
    pub id: String,
    pub header: SnapshotHeader,
}

/// Sorts snapshots oldest first. Times have a resolution of one second, so within one second a
/// snapshot sorts after its parent (two quick backups: `latest` is the second), then by id.
pub fn sort_snapshots(list: &mut [SnapshotEntry]) {
    let by_id: std::collections::HashMap<&str, (i64, Option<&str>)> = list
        .iter()
        .map(|s| {
            (
                s.id.as_str(),
                (s.header.time_unix, s.header.parent.as_deref()),
            )
        })
        .collect();
    // Ancestors taken in the same second (bounded: a hostile repository may hold a cycle).
    let depth = |id: &str| {
        let (time, mut parent) = by_id[id];
        let mut d = 0usize;
        while let Some(&(t, pp)) = parent.and_then(|p| by_id.get(p)) {
            if t != time || d >= by_id.len() {
                break;
            }
            d += 1;
            parent = pp;
        }
        d
    };
    // Nanoseconds first: a parent forgotten since no longer links two snapshots of one second.
    let keys: std::collections::HashMap<String, (i64, u32, usize)> = list
        .iter()
        .map(|s| {
            let h = &s.header;
            (s.id.clone(), (h.time_unix, h.time_nanos, depth(&s.id)))
        })
        .collect();
    list.sort_by(|a, b| (keys[&a.id], &a.id).cmp(&(keys[&b.id], &b.id)));
}

/// An open repository. Holds a shared lock on it for its lifetime.
#[derive(Debug)]
pub struct Repository {
    root: PathBuf,
    /// Where the objects are.
    backend: Arc<dyn backend::WriteBackend>,
    // Boxed: a `Repository` is moved around by value (open::Target) and the config is large.
    config: Box<Config>,
    chunks: ChunkStore,
    /// The reader's blob store (format 2), opened on first use.
    blobs: OnceLock<Arc<blobs::BlobStore>>,
    /// How objects are stored: plain, or sealed under the repository's keys (format 3).
    sealer: seal::Sealer,
    /// Format 3: the master key (to write new key slots) and the slot that gave it.
    master: Option<Arc<keys::Unlocked>>,
    /// `None` in a read-only repository without a `lock` file.
    _lock: Option<File>,
}

/// Asks the system to read the index and snapshot files of the repository at `root` ahead
/// (a hint: files that cannot be opened are skipped, nothing is checked or kept).
fn prefetch_metadata(root: &Path) {
    for dir in ["index", "snapshots"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
            continue;
        };
        for entry in entries.take(4096).flatten() {
            if let Ok(file) = fsio::open_regular(&entry.path(), false, "prefetch")
                && let Ok(meta) = file.metadata()
            {
                crate::platform::prefetch(&file, 0, meta.len());
            }
        }
    }
}

/// The backend of the repository at address `arg`: how to name it in messages, the backend,
/// and its local directory when it has one. Object storage gets a local cache of immutable
/// metadata ([`backend::cache`]).
fn open_location(arg: &Path) -> Result<(PathBuf, Arc<dyn backend::WriteBackend>, Option<PathBuf>)> {
    match address::parse(arg)? {
        address::Location::Local(dir) => {
            let store: Arc<dyn backend::WriteBackend> =
                Arc::new(backend::local::LocalDir::new(&dir));
            Ok((dir.clone(), store, Some(dir)))
        }
        #[cfg(feature = "s3")]
        address::Location::S3(loc) => {
            let name = loc.to_string();
            let mut store = backend::s3::open_s3(&loc)?;
            if let Some(dir) = backend::cache::cache_dir_for(&name) {
                store = Arc::new(backend::cache::Cached::new(store, dir));
            }
            Ok((PathBuf::from(name), store, None))
        }
        #[cfg(not(feature = "s3"))]
        address::Location::S3(loc) => Err(Error::InvalidArgument(format!(
            "{loc} is on object storage, and this volback was built without S3 support \
             (cargo feature s3)"
        ))),
    }
}

/// Creates the directories of a new local repository of format `version` in `dir`, and its
/// `lock` file.
fn create_directories(dir: &Path, version: u32) -> Result<()> {
    std::fs::create_dir_all(dir).ctx("create directory", dir)?;
    let fan_out = match version {
        1 => "chunks",
        _ => "packs",
    };
    for sub in dirs_of(version) {
        let p = dir.join(sub);
        std::fs::create_dir_all(&p).ctx("create directory", &p)?;
    }
    for i in 0..=255u8 {
        let p = dir.join(fan_out).join(format!("{i:02x}"));
        std::fs::create_dir_all(&p).ctx("create directory", &p)?;
    }
    fsio::lock_file(&dir.join("lock"))?;
    Ok(())
}

/// Checks that the store of a new repository on object storage holds no repository and no
/// other objects where the repository's would go.
fn check_empty_store(root: &Path, store: &dyn backend::WriteBackend) -> Result<()> {
    if store.head("config")?.is_some() {
        return Err(Error::RepositoryExists {
            path: root.to_path_buf(),
            detail: "it already holds a repository".into(),
        });
    }
    for dir in [
        "",
        "keys",
        "index",
        "snapshots",
        "journals",
        "writers",
        "pending",
        "locks",
    ] {
        let mut any = false;
        store.list(dir, &mut |_| {
            any = true;
            Ok(())
        })?;
        if any {
            return Err(Error::RepositoryExists {
                path: root.to_path_buf(),
                detail: format!(
                    "the prefix is not empty (objects under {})",
                    store.display_path(dir).display()
                ),
            });
        }
    }
    Ok(())
}

/// Checks the directories of the local repository in `dir` and takes the shared lock on its
/// `lock` file (created where the repository is writable; a read-only one is used
/// unlocked).
fn open_shared_lock(dir: &Path, version: u32) -> Result<Option<File>> {
    // The repository's own directories are never followed through a link.
    for d in dirs_of(version) {
        fsio::check_directory(&dir.join(d))?;
    }
    let lock_path = dir.join("lock");
    let lock = match fsio::open_regular(&lock_path, false, "open") {
        Ok(f) => Some(f),
        Err(e) if fsio::is_not_found(&e) => match fsio::lock_file(&lock_path) {
            Ok(f) => Some(f),
            Err(Error::Io { source, .. }) if cannot_write(&source) => None,
            Err(e) => return Err(e),
        },
        Err(e) => return Err(e),
    };
    if let Some(lock) = &lock {
        match lock.try_lock_shared() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(Error::Locked {
                    path: dir.to_path_buf(),
                    detail: "an exclusive operation such as gc is running".into(),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(Error::io("lock", &lock_path, e));
            }
        }
    }
    Ok(lock)
}

impl Repository {
    /// Checks that `path` can receive a new repository (missing, or an empty directory)
    /// without changing anything: what `init` checks first, for callers that ask for a
    /// password before calling it.
    pub fn check_new_location(path: &Path) -> Result<()> {
        match address::parse(path)? {
            address::Location::Local(p) => Self::check_new_directory(&p),
            address::Location::S3(_) => {
                let (root, store, _) = open_location(path)?;
                check_empty_store(&root, store.as_ref())
            }
        }
    }

    fn check_new_directory(path: &Path) -> Result<()> {
        match std::fs::read_dir(path) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    let detail = if path.join("config").exists() {
                        "it already holds a repository"
                    } else {
                        "the directory is not empty"
                    };
                    return Err(Error::RepositoryExists {
                        path: path.to_path_buf(),
                        detail: detail.into(),
                    });
                }
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("read directory", path, e)),
        }
    }

    /// Creates a new repository in `path` (which must not exist or be an empty directory):
    /// format 3 (encrypted) when `opts.encryption` is set, else `opts.format` (2, or 1 for
    /// tests of old repositories).
    pub fn init(path: &Path, opts: &InitOptions) -> Result<Repository> {
        let (root, store, local) = open_location(path)?;
        let path = &root;
        check_block_size(opts.block_size)?;
        if !(1..=REPO_VERSION).contains(&opts.format) {
            return Err(Error::InvalidArgument(format!(
                "repository format {} is not one this volback writes (1 or 2; format 3 is \
                 format 2 with encryption)",
                opts.format
            )));
        }
        let version = match &opts.encryption {
            None => opts.format,
            Some(e) => {
                if opts.format != REPO_VERSION {
                    return Err(Error::InvalidArgument(format!(
                        "format {} repositories cannot be encrypted",
                        opts.format
                    )));
                }
                if opts.chunk_hash != HashAlgorithm::Blake3 {
                    return Err(Error::InvalidArgument(
                        "an encrypted repository names blobs with keyed BLAKE3: \
                         --hash sha256 applies to plain repositories only"
                            .into(),
                    ));
                }
                if e.password.is_empty() {
                    return Err(Error::InvalidArgument(
                        "the password is empty; an empty password is refused".into(),
                    ));
                }
                e.kdf.check().map_err(|d| {
                    Error::InvalidArgument(format!("key derivation parameters: {d}"))
                })?;
                REPO_VERSION_ENCRYPTED
            }
        };
        check_pack_size(opts.format, opts.pack_size)?;
        if !(1..=22).contains(&opts.zstd_level) {
            return Err(Error::InvalidArgument(format!(
                "zstd level {} must be between 1 and 22",
                opts.zstd_level
            )));
        }
        match &local {
            Some(dir) => {
                Self::check_new_directory(dir)?;
                create_directories(dir, version)?;
            }
            None if version == 1 => {
                return Err(Error::InvalidArgument(
                    "format 1 repositories are local directories only".into(),
                ));
            }
            None => check_empty_store(path, store.as_ref())?,
        }
        let mut config = Config {
            format: REPO_FORMAT_NAME.into(),
            version,
            id: fsio::random_hex(16),
            created: crate::time::rfc3339(crate::time::now_unix()),
            chunk_hash: opts.chunk_hash,
            compression: "zstd".into(),
            zstd_level: opts.zstd_level,
            block_size: opts.block_size,
            pack_size: opts.pack_size,
            encryption: None,
            sealed: None,
        };
        let mut unlocked = None;
        if let Some(e) = &opts.encryption {
            let master = MasterKey::generate().map_err(|e| {
                Error::internal("repository init", format!("no random numbers: {e}"))
            })?;
            let slot = keys::write_slot(store.as_ref(), &config.id, &master, &e.password, e.kdf)?;
            config.encryption = Some(EncryptionInfo::current());
            let sealer = seal::Sealer::encrypted(Arc::new(Keys::derive(&master, &config.id)));
            let canonical = config.canonical_json()?;
            let sealed = sealer.seal(Kind::Config, b"", &canonical)?;
            config.sealed = Some(hex::encode(sealed));
            unlocked = Some(keys::Unlocked { master, slot });
        }
        let json = serde_json::to_vec_pretty(&config).map_err(|e| {
            Error::internal("repository init", format!("cannot encode the config: {e}"))
        })?;
        // Everything below config is durable before config appears.
        if let Some(dir) = &local {
            platform::sync_filesystem(dir).ctx("flush", dir)?;
        }
        store.put("config", &json, backend::PutMode::Overwrite)?;
        let unlock = match unlocked {
            None => Unlock::With(&keys::NoPassword),
            Some(u) => Unlock::Known(u),
        };
        Self::open_on(root, store, local, unlock)
    }

    /// Opens an existing plain repository and takes a shared lock on it; an encrypted one is
    /// [`Error::PasswordRequired`] ([`Repository::open_with`] opens both).
    pub fn open(path: &Path) -> Result<Repository> {
        Self::open_with(path, &keys::NoPassword)
    }

    /// Opens an existing repository and takes a shared lock on it. An encrypted repository
    /// (format 3) is unlocked with the password from `passwords` ([`keys`]); a password
    /// given for a plain one is [`Error::PasswordForPlainRepository`].
    pub fn open_with(path: &Path, passwords: &dyn keys::PasswordSource) -> Result<Repository> {
        Self::open_impl(path, Unlock::With(passwords))
    }

    fn open_impl(path: &Path, unlock: Unlock<'_>) -> Result<Repository> {
        let (root, store, local) = open_location(path)?;
        Self::open_on(root, store, local, unlock)
    }

    /// Opens the repository in `store` (named `root` in messages; `local` is its directory
    /// when it has one).
    fn open_on(
        root: PathBuf,
        store: Arc<dyn backend::WriteBackend>,
        local: Option<PathBuf>,
        unlock: Unlock<'_>,
    ) -> Result<Repository> {
        let path = &root;
        let cfg_path = store.display_path("config");
        let bytes = match store.get("config", 1 << 20, "config") {
            Ok(b) => b,
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotARepository {
                    path: path.to_path_buf(),
                    detail: "it has no config file (create one with `volback init`)".into(),
                });
            }
            Err(e) => return Err(e),
        };
        let value: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| Error::corrupt("repository config", &cfg_path, e.to_string()))?;
        if value.get("format").and_then(|v| v.as_str()) != Some(REPO_FORMAT_NAME) {
            return Err(Error::NotARepository {
                path: path.to_path_buf(),
                detail: format!("config does not say \"format\": \"{REPO_FORMAT_NAME}\""),
            });
        }
        let version = value.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
        if !(1..=u64::from(*REPO_VERSIONS_READ.end())).contains(&version) {
            return Err(Error::UnsupportedVersion {
                what: "repository",
                path: path.to_path_buf(),
                found: version.min(u32::MAX as u64) as u32,
                supported: *REPO_VERSIONS_READ.end(),
            });
        }
        if version < u64::from(REPO_VERSION_ENCRYPTED)
            && let Unlock::With(source) = &unlock
            && source.given()
        {
            return Err(Error::PasswordForPlainRepository {
                path: path.to_path_buf(),
            });
        }
        let mut value = value;
        if version == 2
            && let Some(obj) = value.as_object_mut()
        {
            // Absent in format 2 means format 2's default, not format 1's.
            obj.entry("pack_size")
                .or_insert_with(|| DEFAULT_PACK_SIZE_V2.into());
        }
        let config: Config = serde_json::from_value(value)
            .map_err(|e| Error::corrupt("repository config", &cfg_path, e.to_string()))?;
        check_block_size(config.block_size)
            .and_then(|()| check_pack_size(config.version, config.pack_size))
            .map_err(|e| Error::corrupt("repository config", &cfg_path, e.to_string()))?;
        check_encryption_fields(&config, &cfg_path)?;
        let lock = match &local {
            Some(dir) => open_shared_lock(dir, config.version)?,
            None if config.version == 1 => {
                return Err(Error::NotARepository {
                    path: path.to_path_buf(),
                    detail: "a format 1 repository is read from a local directory only".into(),
                });
            }
            // On object storage nothing takes the repository exclusively (FORMAT.md §7).
            None => None,
        };
        let (sealer, master) = if config.version >= REPO_VERSION_ENCRYPTED {
            let unlocked = match unlock {
                Unlock::Known(u) => u,
                Unlock::With(source) => {
                    // The disk reads the index and snapshot files while the CPU derives the
                    // key: nearly every command reads them next.
                    if let Some(dir) = &local {
                        prefetch_metadata(dir);
                    }
                    keys::unlock(store.as_ref(), &config.id, source)?
                }
            };
            let sealer =
                seal::Sealer::encrypted(Arc::new(Keys::derive(&unlocked.master, &config.id)));
            check_sealed_config(&config, &sealer, &cfg_path)?;
            (sealer, Some(Arc::new(unlocked)))
        } else {
            (seal::Sealer::plain(config.chunk_hash), None)
        };
        let fsync_each = !cfg!(target_os = "linux");
        let chunks = ChunkStore::new(path.join("chunks"), config.chunk_hash, fsync_each);
        Ok(Repository {
            root: path.to_path_buf(),
            backend: store,
            config: Box::new(config),
            chunks,
            blobs: OnceLock::new(),
            sealer,
            master,
            _lock: lock,
        })
    }

    /// Format 3: the id of the key slot the password opened (`keys/<id>`); `None` when plain.
    pub fn current_slot(&self) -> Option<&str> {
        self.master.as_ref().map(|u| u.slot.as_str())
    }

    /// True for an encrypted repository (format 3).
    pub fn is_encrypted(&self) -> bool {
        self.master.is_some()
    }

    /// Format 3: the master key, to wrap it in new key slots ([`keys`]).
    pub(crate) fn master_key(&self) -> Option<&MasterKey> {
        self.master.as_ref().map(|u| &u.master)
    }

    /// The repository's format version (`config.version`): 1, 2, or 3 (2 encrypted).
    pub fn format_version(&self) -> u32 {
        self.config.version
    }

    /// Refuses operation `op` (a backup, a prune's repack…) on a format-1 repository, which
    /// this version only reads. Format 3 is format 2 with sealed objects: allowed.
    pub fn require_format2(&self, op: &str) -> Result<()> {
        match self.config.version {
            1 => Err(Error::InvalidArgument(format!(
                "cannot {op} in {}: {FORMAT1_READ_ONLY}",
                self.root.display()
            ))),
            _ => Ok(()),
        }
    }

    /// `packs/`: pack files under `packs/XX/<id>` (format 2).
    pub fn packs_dir(&self) -> PathBuf {
        self.root.join("packs")
    }

    /// `index/`: index files (format 2).
    pub fn index_dir(&self) -> PathBuf {
        self.root.join("index")
    }

    /// `writers/`: markers of running writers (format 2).
    pub fn writers_dir(&self) -> PathBuf {
        self.root.join("writers")
    }

    /// `pending/`: prune's condemnation records (format 2).
    pub fn pending_dir(&self) -> PathBuf {
        self.root.join("pending")
    }

    /// The reader's blob store (format 2): opened on first use (every index file, and the
    /// tables of packs pending deletion), then shared.
    pub fn blobs(&self) -> Result<Arc<blobs::BlobStore>> {
        if let Some(b) = self.blobs.get() {
            return Ok(b.clone());
        }
        let store = blobs::BlobStore::open(self)?;
        // Two threads may open it at once: the first one stored wins.
        Ok(self.blobs.get_or_init(|| store).clone())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the repository's objects are stored.
    pub fn backend(&self) -> &Arc<dyn backend::WriteBackend> {
        &self.backend
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// How this repository stores objects: plain or sealed (format 3), and how it names
    /// blobs. Every object written or read goes through it.
    pub fn sealer(&self) -> &seal::Sealer {
        &self.sealer
    }

    pub fn chunks(&self) -> &ChunkStore {
        &self.chunks
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    pub fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    pub fn journals_dir(&self) -> PathBuf {
        self.root.join("journals")
    }

    /// Makes every chunk written so far durable. Returns false when the platform cannot (chunks
    /// were then flushed one by one as they were written).
    pub fn sync_chunks(&self) -> Result<bool> {
        platform::sync_filesystem(&self.root).ctx("flush", &self.root)
    }

    /// Ids of all snapshots (unordered). Temporary files are skipped.
    pub fn snapshot_ids(&self) -> Result<Vec<String>> {
        let mut ids = Vec::new();
        self.backend.list("snapshots", &mut |m| {
            let name = backend::base_name(&m.name);
            if name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
                ids.push(name.to_string());
            }
            Ok(())
        })?;
        Ok(ids)
    }

    /// Opens snapshot `id` (a full id) and checks its metadata.
    pub fn open_snapshot(&self, id: &str) -> Result<SnapshotFile> {
        let key = format!("snapshots/{id}");
        let found = match self.backend.head(&key) {
            Ok(m) => m.is_some(),
            // There, but not a regular file: opening it says so.
            Err(Error::NotRegularFile { .. }) => true,
            Err(e) => return Err(e),
        };
        if !found {
            return Err(Error::SnapshotNotFound {
                selector: id.into(),
            });
        }
        SnapshotFile::open_in(self.backend.as_ref(), &key, &self.sealer, Some(id))
    }

    /// All snapshots, oldest first. A damaged snapshot file is an error naming it.
    pub fn list_snapshots(&self) -> Result<Vec<SnapshotEntry>> {
        let (list, mut damaged) = self.list_snapshots_lenient()?;
        match damaged.is_empty() {
            true => Ok(list),
            false => Err(damaged.remove(0)),
        }
    }

    /// All readable snapshots, oldest first, and an error for each damaged snapshot file:
    /// one damaged snapshot does not hide the others.
    pub fn list_snapshots_lenient(&self) -> Result<(Vec<SnapshotEntry>, Vec<Error>)> {
        let mut out = Vec::new();
        let mut damaged = Vec::new();
        for id in self.snapshot_ids()? {
            match self.open_snapshot(&id) {
                Ok(snap) => out.push(SnapshotEntry {
                    id,
                    header: snap.header().clone(),
                }),
                Err(e) => damaged.push(e),
            }
        }
        sort_snapshots(&mut out);
        Ok((out, damaged))
    }

    /// Resolves a snapshot selector: a full id, a unique id prefix, `latest`, or
    /// `latest:SOURCE` (the latest snapshot whose source path is SOURCE). Like
    /// [`Repository::resolve_warn`], without its warnings.
    pub fn resolve(&self, selector: &str) -> Result<String> {
        self.resolve_warn(selector, &crate::progress::Silent)
    }

    /// Resolves a snapshot selector: a full id, a unique id prefix, `latest`, or
    /// `latest:SOURCE` (the latest snapshot whose source path is SOURCE, compared as given,
    /// made absolute, and with symlinks resolved where both paths still exist).
    ///
    /// Unreadable snapshot files (damaged, or stray files with a 64-hex-digit name) are
    /// skipped with a warning through `progress`, as a backup skips them when it looks for
    /// its parent: `latest` is the latest readable snapshot, and a prefix that also matches
    /// unreadable files names the one readable snapshot it matches. `verify` still reports
    /// them.
    pub fn resolve_warn(
        &self,
        selector: &str,
        progress: &dyn crate::progress::Progress,
    ) -> Result<String> {
        let not_found = || Error::SnapshotNotFound {
            selector: selector.into(),
        };
        if selector == "latest" || selector.starts_with("latest:") {
            let (list, damaged) = self.list_snapshots_lenient()?;
            for e in &damaged {
                progress.warn(&format!(
                    "skipping unreadable snapshot: {}",
                    crate::error::chain(e)
                ));
            }
            let wanted = selector.strip_prefix("latest:");
            let Some(wanted) = wanted else {
                return list.last().map(|s| s.id.clone()).ok_or_else(not_found);
            };
            let wanted_abs = std::path::absolute(wanted)
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_else(|_| wanted.to_string());
            let wanted_canonical = std::fs::canonicalize(wanted).ok();
            let mut canonical: std::collections::HashMap<String, Option<PathBuf>> =
                std::collections::HashMap::new();
            let mut same_source = |recorded: &str| -> bool {
                if recorded == wanted || recorded == wanted_abs {
                    return true;
                }
                let Some(w) = &wanted_canonical else {
                    return false;
                };
                // Snapshots taken before source paths were canonical recorded the path as
                // given (made absolute): compare what both resolve to now.
                canonical
                    .entry(recorded.to_string())
                    .or_insert_with(|| std::fs::canonicalize(recorded).ok())
                    .as_ref()
                    == Some(w)
            };
            return list
                .iter()
                .rev()
                .find(|s| same_source(&s.header.source.path))
                .map(|s| s.id.clone())
                .ok_or_else(not_found);
        }
        let prefix = selector.to_ascii_lowercase();
        if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(not_found());
        }
        let mut matches: Vec<String> = self
            .snapshot_ids()?
            .into_iter()
            .filter(|id| id.starts_with(&prefix))
            .collect();
        matches.sort();
        if matches.len() > 1 {
            // Several files match: keep the readable ones, if that leaves exactly one.
            let mut readable = Vec::new();
            let mut unreadable = Vec::new();
            for id in &matches {
                match self.open_snapshot(id) {
                    Ok(_) => readable.push(id.clone()),
                    Err(e) => unreadable.push(e),
                }
            }
            if readable.len() == 1 {
                for e in &unreadable {
                    progress.warn(&format!(
                        "skipping unreadable snapshot: {}",
                        crate::error::chain(e)
                    ));
                }
                matches = readable;
            }
        }
        match matches.len() {
            0 => Err(not_found()),
            1 => Ok(matches.remove(0)),
            _ => Err(Error::AmbiguousSnapshot {
                prefix: selector.into(),
                candidates: matches.into_iter().map(|m| m[..12].to_string()).collect(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repository_of_the_next_version_is_unsupported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("repo");
        Repository::init(&path, &InitOptions::default()).unwrap();
        let cfg = path.join("config");
        let mut value: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&cfg).unwrap()).unwrap();
        let last = *REPO_VERSIONS_READ.end();
        value["version"] = (last + 1).into();
        std::fs::write(&cfg, serde_json::to_vec(&value).unwrap()).unwrap();
        let e = Repository::open(&path).err().unwrap();
        assert!(
            crate::error::testing::is_next_version(&e, "repository", last),
            "{e}"
        );
    }

    #[test]
    fn format_2_is_the_default_and_format_1_still_opens() {
        let dir = tempfile::tempdir().unwrap();
        let p2 = dir.path().join("v2");
        let r = Repository::init(&p2, &InitOptions::default()).unwrap();
        assert_eq!(r.format_version(), 2);
        assert_eq!(r.config().block_size, 4096);
        assert_eq!(r.config().pack_size, 16 << 20);
        r.require_format2("back up").unwrap();
        for d in [
            r.packs_dir().join("00"),
            r.packs_dir().join("ff"),
            r.index_dir(),
            r.writers_dir(),
            r.pending_dir(),
            r.tmp_dir(),
            r.snapshots_dir(),
            r.journals_dir(),
        ] {
            assert!(d.is_dir(), "{}", d.display());
        }
        assert!(!p2.join("chunks").exists());
        assert_eq!(r.blobs().unwrap().with_index(|i| i.len()), 0);
        drop(r);
        // A format-2 config without pack_size means format 2's default.
        let cfg = p2.join("config");
        let mut value: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&cfg).unwrap()).unwrap();
        value.as_object_mut().unwrap().remove("pack_size");
        std::fs::write(&cfg, serde_json::to_vec(&value).unwrap()).unwrap();
        assert_eq!(Repository::open(&p2).unwrap().config().pack_size, 16 << 20);

        let p1 = dir.path().join("v1");
        Repository::init(&p1, &InitOptions::v1()).unwrap();
        let r = Repository::open(&p1).unwrap();
        assert_eq!(r.format_version(), 1);
        assert_eq!(r.config().block_size, DEFAULT_BLOCK_SIZE);
        assert!(p1.join("chunks").join("ab").is_dir() && !p1.join("packs").exists());
        let e = r.require_format2("back up").unwrap_err().to_string();
        assert!(e.contains(FORMAT1_READ_ONLY), "{e}");
        assert_eq!(r.blobs().unwrap().with_index(|i| i.len()), 0);
    }

    #[test]
    fn user_values_are_invalid_arguments() {
        let dir = tempfile::tempdir().unwrap();
        for opts in [
            InitOptions {
                block_size: 5000,
                ..InitOptions::default()
            },
            InitOptions {
                zstd_level: 23,
                ..InitOptions::default()
            },
            InitOptions {
                pack_size: MAX_BLOCK_SIZE + 1,
                ..InitOptions::v1()
            },
            InitOptions {
                pack_size: MAX_PACK_SIZE_V2 + 1,
                ..InitOptions::default()
            },
            InitOptions {
                pack_size: MIN_PACK_SIZE_V2 - 1,
                ..InitOptions::default()
            },
            InitOptions {
                format: 3,
                ..InitOptions::default()
            },
        ] {
            let e = Repository::init(&dir.path().join("r"), &opts)
                .err()
                .unwrap();
            assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        }
    }
}
