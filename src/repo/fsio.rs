//! Crash-safe file writing (temporary file, fsync, rename, directory fsync) and safe opening
//! of repository files.
//!
//! Every file of a repository is opened through [`open_regular`] or [`lock_file`]: a symbolic
//! link as the last component is refused (never followed), the open never blocks (a FIFO put
//! in a repository cannot hang a command), and anything but a regular file is refused with
//! [`Error::NotRegularFile`]. Lock files are created without truncation. The directories of a
//! repository may be symbolic links (a repository can be spread over disks that way): only the
//! files themselves are checked.
//!
//! Temporary files (`.tmp-*`) are locked (`flock`) by their writer from creation until they
//! are renamed or removed; [`remove_stale_temp_files`] removes those whose writer is gone
//! (killed), which the kernel shows by letting the lock be taken.

use crate::error::{Error, IoContext, Result};
use crate::platform;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// A random lowercase hex string of `bytes` random bytes.
pub fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    if getrandom::fill(&mut b).is_err() {
        // Fall back to time and pid: uniqueness within this process is all that is needed.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let seed = t ^ ((std::process::id() as u128) << 64);
        for (i, x) in b.iter_mut().enumerate() {
            *x = (seed >> ((i % 16) * 8)) as u8;
        }
    }
    hex::encode(b)
}

/// A temporary file that is removed when dropped unless [`TempFile::persist`] was called.
#[derive(Debug)]
pub struct TempFile {
    path: PathBuf,
    file: Option<File>,
}

impl TempFile {
    /// Creates a new temporary file in `dir`, named `.tmp-<unique><suffix>`: a random
    /// per-process prefix and a counter (no system call per name).
    pub fn create_in(dir: &Path, suffix: &str) -> Result<TempFile> {
        static PREFIX: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let prefix = PREFIX.get_or_init(|| random_hex(6));
        let mut lost = 0u32;
        loop {
            let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path = dir.join(format!(".tmp-{prefix}-{n}{suffix}"));
            match OpenOptions::new()
                .write(true)
                .read(true)
                .create_new(true)
                .open(&path)
            {
                Ok(file) => {
                    // Held until persisted or dropped: shows `remove_stale_temp_files` that the
                    // writer is alive. A cleaner that took it first (between the create and
                    // this lock) removed the name: start over under a new one.
                    // (Where the filesystem has no locks, nothing can remove it either.)
                    if file.lock().is_ok()
                        && !platform::path_names_file(&path, &file).unwrap_or(false)
                    {
                        lost += 1;
                        if lost > 1000 {
                            return Err(Error::io(
                                "create temporary file",
                                &path,
                                std::io::Error::other("it keeps disappearing after creation"),
                            ));
                        }
                        continue;
                    }
                    return Ok(TempFile {
                        path,
                        file: Some(file),
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::io("create temporary file", &path, e)),
            }
        }
    }

    pub fn file(&self) -> &File {
        self.file.as_ref().expect("file present until persist")
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// fsyncs if `durable`, renames to `dest` and fsyncs the destination directory if
    /// `durable`.
    pub fn persist(self, dest: &Path, durable: bool) -> Result<()> {
        self.persist_as(dest, durable, false)
    }

    /// [`persist`](Self::persist) for a file named after its content (a pack): when `dest`
    /// cannot be replaced but already holds the same bytes, the work is done and the
    /// temporary file is removed. Windows refuses to rename over a file that any handle has
    /// open (a reader of the same pack), where Linux replaces it.
    pub fn persist_content_named(self, dest: &Path, durable: bool) -> Result<()> {
        self.persist_as(dest, durable, true)
    }

    fn persist_as(mut self, dest: &Path, durable: bool, same_is_done: bool) -> Result<()> {
        let file = self.file.take().expect("file present until persist");
        if durable {
            file.sync_all().ctx("flush", &self.path)?;
        }
        // Renamed while still open and locked, so no cleaner can remove it first.
        let renamed = match std::fs::rename(&self.path, dest) {
            Ok(()) => Ok(()),
            Err(_) if same_is_done && same_content(&file, dest).unwrap_or(false) => {
                // Removed (with its lock) by Drop.
                drop(file);
                return Ok(());
            }
            Err(e) => Err(Error::io("rename", dest, e)),
        };
        drop(file);
        renamed?;
        if durable && let Some(parent) = dest.parent() {
            platform::sync_dir(parent).ctx("flush directory", parent)?;
        }
        self.path = PathBuf::new();
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            self.file.take();
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Whether the regular file at `path` holds exactly the bytes of `file`.
fn same_content(file: &File, path: &Path) -> std::io::Result<bool> {
    let other = platform::open_no_follow(path, false, false)?;
    let (a, b) = (file.metadata()?, other.metadata()?);
    if platform::file_kind_name(&b).is_some() || a.len() != b.len() {
        return Ok(false);
    }
    let mut x = vec![0u8; 1 << 20];
    let mut y = vec![0u8; 1 << 20];
    let mut offset = 0;
    while offset < a.len() {
        let n = (a.len() - offset).min(x.len() as u64) as usize;
        platform::read_exact_at(file, &mut x[..n], offset)?;
        platform::read_exact_at(&other, &mut y[..n], offset)?;
        if x[..n] != y[..n] {
            return Ok(false);
        }
        offset += n as u64;
    }
    Ok(true)
}

/// Writes `data` to `dest` atomically and durably.
pub fn atomic_write(dest: &Path, data: &[u8]) -> Result<()> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    let tmp = TempFile::create_in(dir, "")?;
    tmp.file().write_all(data).ctx("write", tmp.path())?;
    tmp.persist(dest, true)
}

/// Reads a whole small file, refusing files larger than `limit` bytes and anything but a
/// regular file ([`open_regular`]).
pub fn read_limited(path: &Path, limit: u64, what: &str) -> Result<Vec<u8>> {
    let mut file = open_regular(path, false, "read")?;
    let len = file.metadata().ctx("read", path)?.len();
    if len > limit {
        return Err(Error::corrupt(
            what,
            path,
            format!("{len} bytes, more than the {limit} allowed"),
        ));
    }
    let mut out = Vec::with_capacity(len as usize);
    file.read_to_end(&mut out).ctx("read", path)?;
    Ok(out)
}

/// Opens an existing repository file for reading (and writing if `write`): no symbolic link
/// as the last component, no blocking open, regular files only ([`Error::NotRegularFile`]).
/// `op` names the operation in I/O errors ("open", "read"…). A missing file is an
/// [`Error::Io`] whose source has kind `NotFound` ([`is_not_found`]).
pub fn open_regular(path: &Path, write: bool, op: &'static str) -> Result<File> {
    checked(path, platform::open_no_follow(path, write, false), op)
}

/// Opens (creating it if missing, never truncating) a lock file of a repository, with the
/// same checks as [`open_regular`]: a symbolic link planted as a lock file is refused, never
/// followed (following it and truncating would empty the file it points to).
pub fn lock_file(path: &Path) -> Result<File> {
    checked(
        path,
        platform::open_no_follow(path, true, true),
        "open lock file",
    )
}

fn checked(path: &Path, opened: std::io::Result<File>, op: &'static str) -> Result<File> {
    let file = match opened {
        Ok(f) => f,
        // O_NOFOLLOW on a symbolic link.
        Err(e) if e.raw_os_error() == Some(ELOOP) => {
            return Err(Error::NotRegularFile {
                path: path.to_path_buf(),
                kind: "symbolic link",
            });
        }
        Err(e) => {
            // Name what is there when it is not a regular file (a directory, say).
            if let Ok(m) = std::fs::symlink_metadata(path)
                && let Some(kind) = platform::file_kind_name(&m)
            {
                return Err(Error::NotRegularFile {
                    path: path.to_path_buf(),
                    kind,
                });
            }
            return Err(Error::io(op, path, e));
        }
    };
    let meta = file.metadata().ctx(op, path)?;
    if let Some(kind) = platform::file_kind_name(&meta) {
        return Err(Error::NotRegularFile {
            path: path.to_path_buf(),
            kind,
        });
    }
    Ok(file)
}

/// `ELOOP`, what `O_NOFOLLOW` returns for a symbolic link (Linux's value). Windows opens the
/// link itself instead (`FILE_FLAG_OPEN_REPARSE_POINT`), which the metadata check refuses.
const ELOOP: i32 = 40;

/// True for an I/O error saying the file does not exist.
/// Checks that `dir`, a directory of a repository, is a real directory and not a symbolic
/// link (or anything else); a missing one is fine (it is created when needed).
pub fn check_directory(dir: &Path) -> Result<()> {
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_dir() => Ok(()),
        Ok(m) => Err(Error::NotADirectory {
            path: dir.to_path_buf(),
            kind: if m.file_type().is_symlink() {
                "symbolic link"
            } else {
                crate::platform::file_kind_name(&m).unwrap_or("regular file")
            },
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("inspect", dir, e)),
    }
}

pub fn is_not_found(e: &Error) -> bool {
    matches!(e, Error::Io { source, .. } | Error::IoAt { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
}

/// Removes the temporary files (`.tmp-*`) in `dir` whose writer is gone: their lock can be
/// taken (a live writer holds it, see [`TempFile`]) and they were last modified before
/// `before`. Returns how many were removed. Best effort: whatever cannot be inspected or
/// removed is left alone.
pub fn remove_stale_temp_files(dir: &Path, before: std::time::SystemTime) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        if !e.file_name().to_string_lossy().starts_with(".tmp-") {
            continue;
        }
        let path = e.path();
        let Ok(file) = open_regular(&path, false, "open") else {
            continue;
        };
        let old = file
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t < before);
        if !old || file.try_lock().is_err() {
            continue;
        }
        // Still the file that was locked (not one created under the same name since).
        if platform::path_names_file(&path, &file).unwrap_or(false)
            && std::fs::remove_file(&path).is_ok()
        {
            removed += 1;
        }
    }
    removed
}

/// Fills `buf` from `r`, at `offset` of the file at `path`: `false` when the file ends first
/// (a torn tail of a journal), an [`Error::IoAt`] when the read fails: a failed read is not a
/// torn tail, and must not get a journal's valid records cut off.
pub(crate) fn read_unless_eof(
    r: &mut (impl Read + ?Sized),
    buf: &mut [u8],
    path: &Path,
    offset: u64,
) -> Result<bool> {
    match r.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(source) => Err(Error::IoAt {
            op: "read",
            path: path.to_path_buf(),
            offset,
            source,
        }),
    }
}

/// Renames the damaged file `path` aside to the first free name of `<path>.bad`,
/// `<path>.bad.1`, … (never deleted), so that readers and writers no longer find it under its
/// name. Returns where it went, or `None` when there was no file to move. `what` names the
/// file in the error when a thousand names are taken.
pub fn set_aside(path: &Path, what: &str) -> Result<Option<PathBuf>> {
    for n in 0..1000u32 {
        let mut dest = path.as_os_str().to_owned();
        dest.push(".bad");
        if n > 0 {
            dest.push(format!(".{n}"));
        }
        let dest = PathBuf::from(dest);
        match std::fs::symlink_metadata(&dest) {
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("stat", &dest, e)),
        }
        return match std::fs::rename(path, &dest) {
            Ok(()) => Ok(Some(dest)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("rename", path, e)),
        };
    }
    Err(Error::corrupt(
        what,
        path,
        "1000 earlier copies of it were already moved aside",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    #[test]
    fn only_temp_files_of_dead_writers_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let live = TempFile::create_in(dir.path(), ".x").unwrap();
        let dead = dir.path().join(".tmp-dead-0.x");
        std::fs::write(&dead, b"").unwrap();
        let other = dir.path().join("config");
        std::fs::write(&other, b"{}").unwrap();
        // Not older than the sweep's start: kept.
        let past = SystemTime::now() - Duration::from_secs(3600);
        assert_eq!(remove_stale_temp_files(dir.path(), past), 0);
        assert!(dead.exists());
        let later = SystemTime::now() + Duration::from_secs(3600);
        assert_eq!(remove_stale_temp_files(dir.path(), later), 1);
        assert!(live.path().exists() && !dead.exists() && other.exists());
        let dest = dir.path().join("done");
        live.persist(&dest, false).unwrap();
        assert!(dest.exists());
    }

    /// Windows refuses to rename over an open file: a pack written again under the name of
    /// an open pack with the same bytes is done, not an error.
    #[test]
    fn a_content_named_file_over_an_open_identical_one_is_done() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("pack");
        std::fs::write(&dest, b"same bytes").unwrap();
        let open = File::open(&dest).unwrap();
        let tmp = TempFile::create_in(dir.path(), "").unwrap();
        tmp.file().write_all(b"same bytes").unwrap();
        let tmp_path = tmp.path().to_path_buf();
        tmp.persist_content_named(&dest, false).unwrap();
        drop(open);
        assert_eq!(std::fs::read(&dest).unwrap(), b"same bytes");
        assert!(!tmp_path.exists(), "the temporary file is gone");
    }

    #[cfg(unix)]
    #[test]
    fn symlinks_are_refused_and_their_targets_never_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        let link = dir.path().join("x.lock");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        for r in [lock_file(&link), open_regular(&link, true, "open")] {
            assert!(matches!(
                r,
                Err(Error::NotRegularFile {
                    kind: "symbolic link",
                    ..
                })
            ));
        }
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
    }

    #[test]
    fn directories_are_refused_and_lock_files_never_truncated() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            read_limited(dir.path(), 10, "config"),
            Err(Error::NotRegularFile {
                kind: "directory",
                ..
            })
        ));
        let missing = open_regular(&dir.path().join("nope"), false, "open").unwrap_err();
        assert!(is_not_found(&missing));
        // A lock file is created, and an existing one keeps its content.
        let lock = dir.path().join("lock");
        std::fs::write(&lock, b"x").unwrap();
        lock_file(&lock).unwrap();
        assert_eq!(std::fs::read(&lock).unwrap(), b"x");
    }
}
