//! Crash-safe file writing: temporary file, fsync, rename, directory fsync.

use crate::error::{Error, IoContext, Result};
use crate::platform;
use std::fs::{File, OpenOptions};
use std::io::Write;
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
    pub fn persist(mut self, dest: &Path, durable: bool) -> Result<()> {
        let file = self.file.take().expect("file present until persist");
        if durable {
            file.sync_all().ctx("flush", &self.path)?;
        }
        drop(file);
        std::fs::rename(&self.path, dest).map_err(|e| Error::io("rename", dest, e))?;
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

/// Writes `data` to `dest` atomically and durably.
pub fn atomic_write(dest: &Path, data: &[u8]) -> Result<()> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    let tmp = TempFile::create_in(dir, "")?;
    tmp.file().write_all(data).ctx("write", tmp.path())?;
    tmp.persist(dest, true)
}

/// Reads a whole small file, refusing files larger than `limit` bytes.
pub fn read_limited(path: &Path, limit: u64, what: &str) -> Result<Vec<u8>> {
    let meta = std::fs::metadata(path).ctx("read", path)?;
    if meta.len() > limit {
        return Err(Error::corrupt(
            what,
            path,
            format!("{} bytes, more than the {limit} allowed", meta.len()),
        ));
    }
    std::fs::read(path).ctx("read", path)
}
