//! A local cache of a remote repository's immutable metadata.
//!
//! Index files (`index/<id>`) and snapshots (`snapshots/<id>`) are named by their content and
//! never change: once read, they are kept in a local directory so that `snapshots`, an
//! incremental backup or a restore read only what is new from the server. Everything else
//! (listings, packs, journals, markers, locks, key slots, the config) goes to the server
//! every time: a listing decides what exists, so a snapshot forgotten by another machine is
//! gone at once, and cached entries that a listing no longer shows are removed.
//!
//! Each cached file holds the object's bytes followed by their BLAKE3: a cached file that
//! does not match (a damaged disk, a torn write) is ignored and fetched again. What is
//! cached is what the server stores (sealed, in an encrypted repository), so the cache
//! reveals nothing that read access to the bucket would not.
//!
//! The cache directory is `$VOLBACK_CACHE_DIR`, else `$XDG_CACHE_HOME/volback`, else
//! `~/.cache/volback` (Windows: `%LOCALAPPDATA%\volback\cache`), one subdirectory per
//! repository location. `VOLBACK_CACHE=0` turns it off.

use super::{
    Capabilities, LockGuard, Log, LogMode, Marker, ObjectMeta, PutMode, ReadBackend, Staged,
    WriteBackend,
};
use crate::error::Result;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Directories whose objects are cached.
const CACHED_DIRS: [&str; 2] = ["index", "snapshots"];

/// A backend whose immutable metadata is cached in a local directory.
#[derive(Debug)]
pub struct Cached {
    inner: Arc<dyn WriteBackend>,
    dir: PathBuf,
}

/// The cache directory for the repository at `location`, or `None` when caching is off or
/// no directory can be found.
pub fn cache_dir_for(location: &str) -> Option<PathBuf> {
    if std::env::var_os("VOLBACK_CACHE").is_some_and(|v| v == "0") {
        return None;
    }
    let base = if let Some(d) = std::env::var_os("VOLBACK_CACHE_DIR") {
        PathBuf::from(d)
    } else if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        PathBuf::from(d).join("volback")
    } else if let Some(d) = std::env::var_os("LOCALAPPDATA") {
        PathBuf::from(d).join("volback").join("cache")
    } else {
        PathBuf::from(std::env::var_os("HOME")?)
            .join(".cache")
            .join("volback")
    };
    let tag = blake3::hash(location.as_bytes()).to_hex();
    Some(base.join(&tag[..32]))
}

impl Cached {
    /// `inner`, with its index files and snapshots cached under `dir` (created when needed).
    pub fn new(inner: Arc<dyn WriteBackend>, dir: PathBuf) -> Cached {
        Cached { inner, dir }
    }

    /// The cache file of object `name`, when it is one that is cached.
    fn file_of(&self, name: &str) -> Option<PathBuf> {
        let (dir, base) = name.split_once('/')?;
        let hex = base.len() == 64 && base.bytes().all(|b| b.is_ascii_hexdigit());
        (CACHED_DIRS.contains(&dir) && hex).then(|| self.dir.join(dir).join(base))
    }

    fn read_cached(path: &Path, limit: u64) -> Option<Vec<u8>> {
        let mut bytes = std::fs::read(path).ok()?;
        let split = bytes.len().checked_sub(32)?;
        if split as u64 > limit || blake3::hash(&bytes[..split]).as_bytes()[..] != bytes[split..] {
            return None;
        }
        bytes.truncate(split);
        Some(bytes)
    }

    /// Keeps `bytes` for object `path` (best effort: a cache that cannot be written only
    /// costs a download next time).
    fn store(path: &Path, bytes: &[u8]) {
        let Some(dir) = path.parent() else {
            return;
        };
        if std::fs::create_dir_all(dir).is_err() {
            return;
        }
        let mut data = Vec::with_capacity(bytes.len() + 32);
        data.extend_from_slice(bytes);
        data.extend_from_slice(blake3::hash(bytes).as_bytes());
        let tmp = dir.join(format!(".tmp-{}", crate::repo::fsio::random_hex(8)));
        if std::fs::write(&tmp, &data).is_ok() && std::fs::rename(&tmp, path).is_ok() {
            return;
        }
        let _ = std::fs::remove_file(&tmp);
    }

    /// Removes the cached objects of `dir` that `listed` (the server's listing) no longer
    /// has.
    fn evict_unlisted(&self, dir: &str, listed: &HashSet<String>) {
        let Ok(entries) = std::fs::read_dir(self.dir.join(dir)) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !listed.contains(&name) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

impl ReadBackend for Cached {
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
        let Some(path) = self.file_of(name) else {
            return self.inner.get(name, limit, what);
        };
        if let Some(bytes) = Self::read_cached(&path, limit) {
            return Ok(bytes);
        }
        let bytes = self.inner.get(name, limit, what)?;
        Self::store(&path, &bytes);
        Ok(bytes)
    }

    fn get_range(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.inner.get_range(name, offset, buf)
    }

    fn head(&self, name: &str) -> Result<Option<ObjectMeta>> {
        self.inner.head(name)
    }

    fn list(&self, dir: &str, f: &mut dyn FnMut(ObjectMeta) -> Result<()>) -> Result<()> {
        if !CACHED_DIRS.contains(&dir) {
            return self.inner.list(dir, f);
        }
        let mut listed = HashSet::new();
        self.inner.list(dir, &mut |m| {
            listed.insert(super::base_name(&m.name).to_string());
            f(m)
        })?;
        self.evict_unlisted(dir, &listed);
        Ok(())
    }

    fn list_fanout(&self, dir: &str, f: &mut dyn FnMut(ObjectMeta) -> Result<()>) -> Result<()> {
        self.inner.list_fanout(dir, f)
    }

    fn local_root(&self) -> Option<&Path> {
        self.inner.local_root()
    }
}

impl WriteBackend for Cached {
    fn put(&self, name: &str, data: &[u8], mode: PutMode) -> Result<()> {
        self.inner.put(name, data, mode)?;
        if let Some(path) = self.file_of(name) {
            Self::store(&path, data);
        }
        Ok(())
    }

    fn delete(&self, name: &str) -> Result<bool> {
        if let Some(path) = self.file_of(name) {
            let _ = std::fs::remove_file(path);
        }
        self.inner.delete(name)
    }

    fn stage(&self) -> Result<Box<dyn Staged>> {
        self.inner.stage()
    }

    fn barrier(&self) -> Result<()> {
        self.inner.barrier()
    }

    fn set_aside(&self, name: &str) -> Result<Option<String>> {
        if let Some(path) = self.file_of(name) {
            let _ = std::fs::remove_file(path);
        }
        self.inner.set_aside(name)
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
    use crate::repo::backend::local::LocalDir;

    /// Cached objects are served from the cache; a damaged cache file is fetched again; a
    /// listing that no longer shows an object removes it from the cache.
    #[test]
    fn immutable_metadata_is_cached_checked_and_evicted() {
        let server = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(server.path().join("index")).unwrap();
        std::fs::create_dir_all(server.path().join("keys")).unwrap();
        let inner: Arc<dyn WriteBackend> = Arc::new(LocalDir::new(server.path()));
        let c = Cached::new(inner, cache.path().to_path_buf());
        let id = "ab".repeat(32);
        let key = format!("index/{id}");
        c.put(&key, b"first", PutMode::Overwrite).unwrap();
        // Changed behind the cache's back: the cache answers (objects never change).
        std::fs::write(server.path().join("index").join(&id), b"other").unwrap();
        assert_eq!(c.get(&key, 100, "x").unwrap(), b"first");
        // A damaged cache file is not trusted.
        let cached = cache.path().join("index").join(&id);
        let mut bytes = std::fs::read(&cached).unwrap();
        bytes[0] ^= 1;
        std::fs::write(&cached, &bytes).unwrap();
        assert_eq!(c.get(&key, 100, "x").unwrap(), b"other");
        // Limits hold for cached objects too.
        assert!(c.get(&key, 3, "x").is_err());
        // Not cached: key slots.
        c.put("keys/0011223344556677", b"slot", PutMode::Overwrite)
            .unwrap();
        assert!(!cache.path().join("keys").exists());
        // Gone from the server: the next listing drops it from the cache.
        std::fs::remove_file(server.path().join("index").join(&id)).unwrap();
        let mut n = 0;
        c.list("index", &mut |_| {
            n += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(n, 0);
        assert!(!cached.exists());
    }
}
