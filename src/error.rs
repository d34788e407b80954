//! Library errors.
//!
//! Rules:
//! - Every error the library returns is an [`Error`]; callers match on the variant, never on
//!   the message. `anyhow` lives in the binary only.
//! - Each variant carries the context a user needs to act: the file, the byte offset, the
//!   chunk or snapshot id. The message is one short sentence that does not repeat the text of
//!   its `source()`; the binary prints the chain. An OS error is an [`Error::Io`] naming the
//!   path, or an [`Error::IoAt`] when it happened at an offset of a volume or file.
//! - Data read from disk is never trusted: a parser returns [`Error::Corrupt`] naming what it
//!   was reading (with its chunk or snapshot id) and why it was rejected, never panics. A
//!   file of a format version this build does not read is [`Error::UnsupportedVersion`],
//!   not damage. A parser of a structure too small to know its path returns its own typed
//!   error (such as [`crate::repo::format::BadRecords`]) that the caller wraps; no parser
//!   returns `Result<_, String>`.
//! - Three kinds are easy to confuse:
//!   - [`Error::InvalidArgument`]: a value the user (or the caller on the user's behalf)
//!     chose is wrong: a block size, a zstd level, a slice size, an image size a format
//!     cannot hold, options that contradict each other. The user can fix it.
//!   - [`Error::OutOfRange`]: a read or write outside a volume, image, snapshot or hash list,
//!     or a block index past the end: a caller's bug or a hostile client request.
//!   - [`Error::Internal`]: volback broke one of its own invariants (a thread panicked, a
//!     channel or pool closed early, its own structure failed to encode). Always a bug.
//! - Wherever a message is stored rather than returned (warnings, verify problems, NBD error
//!   replies, reports), it is [`chain`]`(&e)`, never `e.to_string()`, which drops the OS
//!   error behind a library error.

use std::path::{Path, PathBuf};

/// Result alias used throughout the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system I/O call failed.
    #[error("cannot {op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// An I/O call at a known offset of a volume failed.
    #[error("cannot {op} {} at offset {offset}", path.display())]
    IoAt {
        op: &'static str,
        path: PathBuf,
        offset: u64,
        #[source]
        source: std::io::Error,
    },

    /// Stored data does not match its format or its checksum.
    #[error("{what} in {} is corrupt: {detail}", path.display())]
    Corrupt {
        /// What was being read ("chunk 3fa2…", "snapshot header", …).
        what: String,
        path: PathBuf,
        detail: String,
    },

    /// A chunk a snapshot refers to is not in the repository.
    #[error("chunk {id} is missing from the repository (expected at {})", path.display())]
    MissingChunk { id: String, path: PathBuf },

    /// The repository, snapshot or journal was written by a format this build does not read.
    #[error("{what} at {} has format version {found}; this volback reads version {supported}", path.display())]
    UnsupportedVersion {
        what: &'static str,
        path: PathBuf,
        found: u32,
        supported: u32,
    },

    /// The directory is not a volback repository.
    #[error("{} is not a volback repository: {detail}", path.display())]
    NotARepository { path: PathBuf, detail: String },

    /// `init` on a directory that already holds something.
    #[error("cannot create a repository in {}: {detail}", path.display())]
    RepositoryExists { path: PathBuf, detail: String },

    /// A path given as a volume to read is none of the things a volume is read from.
    #[error(
        "{} is not a volume volback can read: {detail} (tried: a volback copy, a block device, \
         an image file (VHD, VHDX, qcow2 or raw); a snapshot is named REPO SNAPSHOT)",
        path.display()
    )]
    NotAVolume { path: PathBuf, detail: String },

    /// A snapshot selector matched nothing.
    #[error("no snapshot matches {selector:?}")]
    SnapshotNotFound { selector: String },

    /// A snapshot id prefix matched several snapshots.
    #[error("snapshot prefix {prefix:?} is ambiguous: it matches {}", candidates.join(", "))]
    AmbiguousSnapshot {
        prefix: String,
        candidates: Vec<String>,
    },

    /// A source cannot be backed up.
    #[error("cannot back up {}: {detail}", path.display())]
    BadSource { path: PathBuf, detail: String },

    /// A restore target was refused because writing it would be unsafe.
    #[error("refusing to restore onto {}: {reason}", path.display())]
    UnsafeTarget { path: PathBuf, reason: String },

    /// A copy's metadata, hash list or data files are missing, damaged or inconsistent.
    #[error("copy {} is unusable: {detail}", path.display())]
    BadCopy { path: PathBuf, detail: String },

    /// A copy whose copy or update run did not finish: its data files may hold a mix of old
    /// and new blocks.
    #[error("copy {} is incomplete: a copy or update was interrupted; rerun `volback copy --update SOURCE {}` (or the same `volback export`) to finish it", path.display(), path.display())]
    IncompleteCopy { path: PathBuf },

    /// Another process is writing the copy (or reading it, when an update was asked for).
    #[error("copy {} is in use by another volback process", path.display())]
    CopyInUse { path: PathBuf },

    /// A repository file is a symbolic link, FIFO, directory or device: refused, never opened
    /// through (a link planted in a repository must not redirect a write).
    #[error("{} is a {kind}, not a regular file; volback does not use it", path.display())]
    NotRegularFile { path: PathBuf, kind: &'static str },

    /// A repository directory is a symbolic link or not a directory: refused (a link planted
    /// in a repository must not redirect its writes elsewhere).
    #[error("{} is a {kind}, not a directory; volback does not use it", path.display())]
    NotADirectory { path: PathBuf, kind: &'static str },

    /// A restore failed after it began writing: the target holds part of the volume.
    #[error("restore onto {} failed{}", path.display(), if *.removed { "; the incomplete file it had created was removed" } else { "; the target now holds an incomplete restore: do not use it until a restore completes" })]
    IncompleteRestore {
        path: PathBuf,
        removed: bool,
        #[source]
        source: Box<Error>,
    },

    /// Another process holds a lock that this operation needs.
    #[error("repository {} is locked by another operation ({detail})", path.display())]
    Locked { path: PathBuf, detail: String },

    /// The operation was cancelled (Ctrl-C); any completed work was checkpointed.
    #[error("interrupted{}", if *.checkpointed { "; progress was saved and the next run resumes it" } else { "" })]
    Interrupted { checkpointed: bool },

    /// A value the caller (ultimately the user) chose is invalid: a block size, a zstd level,
    /// an image size a format cannot hold, options that contradict each other.
    #[error("{0}")]
    InvalidArgument(String),

    /// A read or write asked for bytes outside an object: past the end of a volume, an image
    /// or a snapshot, or a block index past its last block. A caller's bug or a hostile client
    /// request, never bad user input.
    #[error("{op} of {len} bytes at offset {offset} is outside {object} ({size} bytes)")]
    OutOfRange {
        /// "read" or "write".
        op: &'static str,
        /// What was addressed: a path, "snapshot 3fa2…", "block 12 of snapshot 3fa2…".
        object: String,
        offset: u64,
        len: u64,
        /// The object's size in bytes.
        size: u64,
    },

    /// volback broke one of its own invariants: a worker thread panicked, a channel or buffer
    /// pool closed early, a cache lost an entry it had just filled. Always a bug; the message
    /// names the component.
    #[error("internal error in {component}: {detail}")]
    Internal {
        component: &'static str,
        detail: String,
    },

    /// A partition table script (`sfdisk --dump` text) is malformed or describes a table that
    /// cannot exist (overlaps, partitions outside the usable area, bad types).
    #[error("partition table script {}{}: {detail}", path.display(), line.map(|l| format!(", line {l}")).unwrap_or_default())]
    BadPartitionScript {
        path: PathBuf,
        /// 1-based line, when the problem is on one line.
        line: Option<usize>,
        detail: String,
    },

    /// A network operation failed: listening on an address, accepting a connection, or
    /// talking to a client.
    #[error("cannot {op} {address}")]
    Network {
        op: &'static str,
        /// The listening address, or the client ("client 3 (127.0.0.1:41234)").
        address: String,
        #[source]
        source: std::io::Error,
    },

    /// An NBD client broke the protocol; the server closed that client's connection.
    #[error("{client} broke the NBD protocol: {detail}")]
    NbdProtocol {
        /// The client ("client 3 (127.0.0.1:41234)").
        client: String,
        detail: String,
    },

    /// A filesystem of a view could not be mounted: no method is known for its type, or every
    /// mount command failed (their messages are in `detail`).
    #[error("cannot mount the {fs_type} filesystem of {}: {detail}", image.display())]
    MountFailed {
        image: PathBuf,
        fs_type: String,
        detail: String,
    },

    /// A volume has no partition table that can be dumped.
    #[error("{} has no usable partition table: {detail}", path.display())]
    NoPartitionTable { path: PathBuf, detail: String },

    /// An encrypted repository was opened without a password: none was given and none can
    /// be asked for (no terminal), or the one given could not be read (`detail` says why).
    #[error("repository {} is encrypted and needs a password: {detail}", path.display())]
    PasswordRequired { path: PathBuf, detail: String },

    /// No key slot of the repository opens with the password given.
    #[error("wrong password for repository {}: it opens none of its {slots} key slots (check the password; `volback key list` shows the slots)", path.display())]
    WrongPassword { path: PathBuf, slots: usize },

    /// A password was given for a repository that is not encrypted. Refused: a plain
    /// repository where an encrypted one was expected may have been swapped in (docs/SECURITY.md).
    #[error("repository {} is not encrypted, but a password was given; if the repository is meant to be plain, unset VOLBACK_PASSWORD and VOLBACK_PASSWORD_FILE and drop --password-file and --password-command", path.display())]
    PasswordForPlainRepository { path: PathBuf },

    /// The key slots of an encrypted repository cannot be used or changed as asked: a slot is
    /// damaged or asks for costs outside the limits, the slot named does not exist, or the
    /// change would leave the repository without a slot.
    #[error("key slots of repository {}: {detail}", path.display())]
    KeySlot { path: PathBuf, detail: String },

    /// An image file (VHD, VHDX, qcow2) is valid but uses a feature volback does not handle
    /// (a backing file, compression, encryption, a log to replay…).
    #[error("{} uses an unsupported image feature: {detail}", path.display())]
    UnsupportedImage { path: PathBuf, detail: String },

    /// An existing image opened for update does not have the expected virtual size.
    #[error("{} has a virtual size of {found} bytes, expected {expected}", path.display())]
    ImageSizeMismatch {
        path: PathBuf,
        found: u64,
        expected: u64,
    },

    /// A lock or writer registration held as a lease on an object store could not be kept:
    /// it was not renewed in time (the store was unreachable) or another process removed it
    /// as expired. The operation stops before doing anything the lease protects.
    #[error("lost the lease {} ({detail}); the operation stops here: nothing was lost, and running it again resumes it", path.display())]
    LeaseLost { path: PathBuf, detail: String },
}

impl Error {
    /// True for a read that failed because the medium could not deliver the data (a bad
    /// sector): worth retrying sector by sector.
    pub fn is_media_error(&self) -> bool {
        match self {
            Error::Io { source, .. } | Error::IoAt { source, .. } => {
                crate::platform::is_media_error(source)
            }
            _ => false,
        }
    }

    /// Shorthand for an [`Error::Io`].
    pub fn io(op: &'static str, path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    /// Shorthand for an [`Error::Corrupt`].
    pub fn corrupt(
        what: impl Into<String>,
        path: impl AsRef<Path>,
        detail: impl Into<String>,
    ) -> Self {
        Error::Corrupt {
            what: what.into(),
            path: path.as_ref().to_path_buf(),
            detail: detail.into(),
        }
    }
}

impl Error {
    /// Shorthand for an [`Error::Internal`].
    pub fn internal(component: &'static str, detail: impl Into<String>) -> Self {
        Error::Internal {
            component,
            detail: detail.into(),
        }
    }

    /// Shorthand for an [`Error::OutOfRange`] read.
    pub fn read_out_of_range(object: impl Into<String>, offset: u64, len: u64, size: u64) -> Self {
        Error::OutOfRange {
            op: "read",
            object: object.into(),
            offset,
            len,
            size,
        }
    }
}

/// An error and every cause behind it, on one line: `"cannot read x: Input/output error (os
/// error 5)"`. Warnings, verify problems and protocol replies store this rather than
/// `to_string()`, which drops the OS error behind a library error.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        // A wrapper that repeats its cause's text adds nothing.
        if !s.ends_with(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cause = c.source();
    }
    s
}

/// Adds a path and an operation name to `std::io::Result`s.
pub(crate) trait IoContext<T> {
    fn ctx(self, op: &'static str, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, op: &'static str, path: &Path) -> Result<T> {
        self.map_err(|e| Error::io(op, path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_keeps_the_os_error_behind_a_library_error() {
        let e = Error::io("read", "/dev/sdz", std::io::Error::from_raw_os_error(5));
        let text = chain(&e);
        assert!(text.starts_with("cannot read /dev/sdz: "), "{text}");
        assert!(text.contains("os error 5"), "{text}");
        let nested = Error::IncompleteRestore {
            path: "/tmp/t".into(),
            removed: true,
            source: Box::new(e),
        };
        assert!(chain(&nested).contains("os error 5"));
    }
}

/// Test helpers for the format-version checks every versioned file has.
#[cfg(test)]
pub(crate) mod testing {
    use super::Error;
    use std::path::Path;

    /// Sets the version field (bytes 8..12, little-endian) of the file at `path` to `version`.
    pub fn set_version(path: &Path, version: u32) {
        let mut bytes = std::fs::read(path).unwrap();
        bytes[8..12].copy_from_slice(&version.to_le_bytes());
        std::fs::write(path, &bytes).unwrap();
    }

    /// `e` says the version after `supported` of a `what` is not supported.
    pub fn is_next_version(e: &Error, what: &str, supported: u32) -> bool {
        matches!(e, Error::UnsupportedVersion { what: w, found, supported: s, .. }
            if *w == what && *found == supported + 1 && *s == supported)
    }
}
