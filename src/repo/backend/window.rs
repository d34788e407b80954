//! Read windows: ranged reads of packs served from larger aligned pieces that are kept and
//! fetched ahead.
//!
//! On object storage every ranged read is a request with a round trip, and restore, verify
//! and the tree walk of an incremental read a pack's frames one after the other, often from
//! several threads. [`Windows`] wraps a backend whose ranged reads are not cheap
//! ([`super::Capabilities::cheap_ranged_reads`] false) and answers a ranged read of a pack
//! from [`WINDOW`]-aligned windows of the object:
//!
//! - a window is fetched with one ranged GET, at most once at a time (a second thread that
//!   needs it waits for the first), and kept in a small LRU ([`KEPT`] windows);
//! - a window never asks for bytes past the object's end (S3 clients refuse a short answer):
//!   the sizes of packs come from one listing of `packs/` at the first window (a request per
//!   1,000 packs), and an object the listing did not show is asked for with a HEAD;
//! - when a read ends in the second half of a full window, the next window is fetched in the
//!   background (one window ahead), so a sequential reader finds it there;
//! - a read larger than two windows, or of an object that is not a pack, goes to the backend
//!   as it is; so does a read a window cannot serve (a failed fetch, an object shorter than
//!   the read), so that its error is the backend's own.
//!
//! Packs are named by their content and never change, so a kept window is never stale: at
//! worst it serves the bytes of a pack deleted meanwhile, which are the bytes the reader's
//! index pointed at (and every frame is checked by hash or authenticated anyway).

use super::{Capabilities, ObjectMeta, ReadBackend};
use crate::error::Result;
use crate::repo::load_cache::LoadCache;
use crossbeam_channel::Sender;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Bytes of a window.
pub const WINDOW: u64 = 4 << 20;
/// Windows kept (64 MiB).
pub const KEPT: usize = 16;
/// Background fetches queued at most; further prefetch requests are dropped.
const QUEUED: usize = 4;

type Key = (String, u64);

/// A backend whose ranged reads of packs go through read windows.
pub struct Windows {
    shared: Arc<Shared>,
    /// Windows to fetch ahead; the prefetch threads end when it is dropped (they are not
    /// waited for: one may be retrying against a server that is gone).
    queue: Option<Sender<Key>>,
}

struct Shared {
    inner: Arc<dyn ReadBackend>,
    window: u64,
    windows: LoadCache<Key, Vec<u8>>,
    /// Sizes of objects, learnt from the listing of packs (`None` until it was tried) and
    /// from HEADs.
    sizes: Mutex<Option<HashMap<String, u64>>>,
    /// Windows fetched, and reads passed to the backend as they were (tests, cost model).
    fetched: AtomicU64,
    passed: AtomicU64,
}

impl std::fmt::Debug for Windows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Windows")
            .field("inner", &self.shared.inner)
            .field("window", &self.shared.window)
            .finish_non_exhaustive()
    }
}

impl Windows {
    /// `inner` with windows of [`WINDOW`] bytes, [`KEPT`] of them kept, and `prefetchers`
    /// background threads fetching ahead (0: none).
    pub fn new(inner: Arc<dyn ReadBackend>, prefetchers: usize) -> Windows {
        Windows::with_sizes(inner, WINDOW, KEPT, prefetchers)
    }

    pub(crate) fn with_sizes(
        inner: Arc<dyn ReadBackend>,
        window: u64,
        kept: usize,
        prefetchers: usize,
    ) -> Windows {
        let shared = Arc::new(Shared {
            inner,
            window: window.max(1),
            windows: LoadCache::new(kept.max(2)),
            sizes: Mutex::new(None),
            fetched: AtomicU64::new(0),
            passed: AtomicU64::new(0),
        });
        let queue = (prefetchers > 0).then(|| {
            let (tx, rx) = crossbeam_channel::bounded::<Key>(QUEUED);
            for _ in 0..prefetchers {
                let rx = rx.clone();
                let shared = shared.clone();
                std::thread::spawn(move || {
                    for (name, w) in rx {
                        let key = (name, w);
                        if shared.windows.claim(key.clone()) {
                            // A failed prefetch is not reported: the reader that needs the
                            // window fetches it itself and gets the error then.
                            let _ = shared
                                .windows
                                .load(key.clone(), || shared.fetch(&key.0, key.1));
                        }
                    }
                });
            }
            tx
        });
        Windows { shared, queue }
    }

    /// The size of object `name` (a pack): from one listing of every pack, made at the first
    /// question, else from a HEAD; remembered. A missing object is an error.
    pub fn size_of(&self, name: &str) -> Result<u64> {
        self.shared.size_of(name)
    }

    /// Windows fetched so far, and reads passed to the backend as they were.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.shared.fetched.load(Ordering::Relaxed),
            self.shared.passed.load(Ordering::Relaxed),
        )
    }

    fn prefetch(&self, name: &str, w: u64) {
        let Some(queue) = &self.queue else {
            return;
        };
        let key = (name.to_string(), w);
        if !self.shared.windows.contains(&key) {
            // A full queue drops the request: the reader fetches the window when it gets there.
            let _ = queue.try_send(key);
        }
    }

    /// Serves `buf` at `offset` of `name` from windows; false when they cannot (the caller
    /// then reads from the backend).
    fn read_windowed(&self, name: &str, offset: u64, buf: &mut [u8]) -> bool {
        let size = self.shared.window;
        let Some(end) = offset.checked_add(buf.len() as u64) else {
            return false;
        };
        let (first, last) = (offset / size, (end - 1) / size);
        let mut last_window_full = false;
        for w in first..=last {
            let key = (name.to_string(), w);
            let Ok(data) = self.shared.windows.get(key, || self.shared.fetch(name, w)) else {
                return false;
            };
            let base = w * size;
            let from = offset.max(base);
            let to = end.min(base + size);
            let (Ok(a), Ok(b)) = (usize::try_from(from - base), usize::try_from(to - base)) else {
                return false;
            };
            let Some(src) = data.get(a..b) else {
                return false;
            };
            let (da, db) = ((from - offset) as usize, (to - offset) as usize);
            buf[da..db].copy_from_slice(src);
            last_window_full = data.len() as u64 == size;
        }
        // Ends in the second half of a full window: the reader is likely to go on.
        if last_window_full && (end - 1) % size >= size / 2 {
            self.prefetch(name, last + 1);
        }
        true
    }
}

impl Shared {
    /// Window `w` of `name`, read from the backend: up to `window` bytes, fewer at the end of
    /// the object.
    fn fetch(&self, name: &str, w: u64) -> Result<Vec<u8>> {
        self.fetched.fetch_add(1, Ordering::Relaxed);
        let size = self.size_of(name)?;
        let start = w.saturating_mul(self.window);
        let len = size.saturating_sub(start).min(self.window);
        if len == 0 {
            return Err(crate::error::Error::IoAt {
                op: "read",
                path: self.inner.display_path(name),
                offset: start,
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("the object has {size} bytes"),
                ),
            });
        }
        let mut buf = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX)];
        self.inner.get_range(name, start, &mut buf)?;
        Ok(buf)
    }

    /// The size of object `name`: from the listing of every pack (made once, at the first
    /// question), else from a HEAD (remembered: packs never change).
    fn size_of(&self, name: &str) -> Result<u64> {
        let mut sizes = self.sizes.lock().unwrap_or_else(|p| p.into_inner());
        let sizes = sizes.get_or_insert_with(|| {
            let mut map = HashMap::new();
            // A failed listing only costs HEADs.
            let _ = self.inner.list_fanout("packs", &mut |m| {
                map.insert(m.name, m.size);
                Ok(())
            });
            map
        });
        if let Some(&size) = sizes.get(name) {
            return Ok(size);
        }
        let size = match self.inner.head(name)? {
            Some(m) => m.size,
            None => {
                return Err(crate::error::Error::io(
                    "read",
                    self.inner.display_path(name),
                    std::io::ErrorKind::NotFound.into(),
                ));
            }
        };
        sizes.insert(name.to_string(), size);
        Ok(size)
    }
}

/// Objects whose ranged reads go through windows.
fn windowed(name: &str) -> bool {
    name.starts_with("packs/")
}

impl ReadBackend for Windows {
    fn display_path(&self, name: &str) -> PathBuf {
        self.shared.inner.display_path(name)
    }

    fn location(&self) -> String {
        self.shared.inner.location()
    }

    fn capabilities(&self) -> &Capabilities {
        self.shared.inner.capabilities()
    }

    fn get(&self, name: &str, limit: u64, what: &str) -> Result<Vec<u8>> {
        self.shared.inner.get(name, limit, what)
    }

    fn get_range(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        if !buf.is_empty()
            && windowed(name)
            && buf.len() as u64 <= 2 * self.shared.window
            && self.read_windowed(name, offset, buf)
        {
            return Ok(());
        }
        self.shared.passed.fetch_add(1, Ordering::Relaxed);
        self.shared.inner.get_range(name, offset, buf)
    }

    fn head(&self, name: &str) -> Result<Option<ObjectMeta>> {
        self.shared.inner.head(name)
    }

    fn list(&self, dir: &str, f: &mut dyn FnMut(ObjectMeta) -> Result<()>) -> Result<()> {
        self.shared.inner.list(dir, f)
    }

    fn list_fanout(&self, dir: &str, f: &mut dyn FnMut(ObjectMeta) -> Result<()>) -> Result<()> {
        self.shared.inner.list_fanout(dir, f)
    }

    fn local_root(&self) -> Option<&std::path::Path> {
        self.shared.inner.local_root()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::backend::PutMode;
    use crate::repo::backend::WriteBackend;
    use crate::repo::backend::lease::mem::MemStore;

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    fn store_with(name: &str, data: &[u8]) -> Arc<MemStore> {
        let s = MemStore::new();
        s.put(name, data, PutMode::Overwrite).unwrap();
        s
    }

    /// Every range of a pack reads back the object's bytes, across window edges and at the
    /// object's end; each window is fetched once while it is kept.
    #[test]
    fn ranges_read_back_exactly_and_windows_are_fetched_once() {
        let data = pattern(10_000);
        let s = store_with("packs/ab/p", &data);
        let w = Windows::with_sizes(s, 1000, 16, 0);
        for (off, len) in [
            (0, 10),
            (995, 10),
            (999, 1),
            (1000, 1000),
            (1500, 1999),
            (9990, 10),
        ] {
            let mut buf = vec![0u8; len];
            w.get_range("packs/ab/p", off as u64, &mut buf).unwrap();
            assert_eq!(buf, data[off..off + len], "{off}+{len}");
        }
        let (fetched, passed) = w.counts();
        assert_eq!(passed, 0);
        // Windows 0, 1, 2, 3 and 9.
        assert_eq!(fetched, 5);
    }

    /// A read past the end fails as the backend's own read does; a read larger than two
    /// windows and a read of another object go to the backend.
    #[test]
    fn short_objects_large_reads_and_other_objects_go_to_the_backend() {
        let data = pattern(2500);
        let s = store_with("packs/ab/p", &data);
        s.put("index/i", &data, PutMode::Overwrite).unwrap();
        let w = Windows::with_sizes(s, 1000, 16, 0);
        let mut buf = vec![0u8; 10];
        let e = w.get_range("packs/ab/p", 2495, &mut buf).unwrap_err();
        assert!(
            matches!(&e, crate::error::Error::Io { source, .. } | crate::error::Error::IoAt { source, .. }
                if source.kind() == std::io::ErrorKind::UnexpectedEof),
            "{e}"
        );
        let mut big = vec![0u8; 2100];
        w.get_range("packs/ab/p", 100, &mut big).unwrap();
        assert_eq!(big, data[100..2200]);
        w.get_range("index/i", 5, &mut buf).unwrap();
        assert_eq!(buf, data[5..15]);
        let mut none = vec![0u8; 10];
        assert!(w.get_range("packs/ab/missing", 0, &mut none).is_err());
        assert_eq!(w.counts().1, 4);
    }

    /// Only `kept` windows stay, whatever the prefetcher does; every byte reads back.
    #[test]
    fn windows_are_bounded() {
        let data = pattern(20_000);
        let s = store_with("packs/ab/p", &data);
        let w = Windows::with_sizes(s, 1000, 3, 1);
        let mut buf = vec![0u8; 100];
        for off in (0..20_000).step_by(100) {
            w.get_range("packs/ab/p", off as u64, &mut buf).unwrap();
            assert_eq!(buf, data[off..off + 100]);
            // Kept windows, plus at most one being fetched by the prefetcher.
            assert!(w.shared.windows.len() <= 3 + 1);
        }
        let (fetched, passed) = w.counts();
        assert!(fetched >= 20, "{fetched}");
        assert_eq!(passed, 0);
    }

    /// A read that ends in the second half of a full window has the next one fetched in the
    /// background; the reader then finds it there.
    #[test]
    fn the_next_window_is_fetched_ahead() {
        let data = pattern(3000);
        let s = store_with("packs/ab/p", &data);
        let w = Windows::with_sizes(s, 1000, 8, 1);
        let mut buf = vec![0u8; 100];
        // First half: nothing is fetched ahead.
        w.get_range("packs/ab/p", 100, &mut buf).unwrap();
        w.get_range("packs/ab/p", 600, &mut buf).unwrap();
        let key = ("packs/ab/p".to_string(), 1);
        // (Waits for the background thread; the deadline only guards against a hang.)
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !w.shared.windows.is_ready(&key) {
            assert!(
                std::time::Instant::now() < deadline,
                "window 1 never fetched"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(w.counts(), (2, 0));
        w.get_range("packs/ab/p", 1200, &mut buf).unwrap();
        assert_eq!(buf, data[1200..1300]);
        assert_eq!(w.counts(), (2, 0));
    }

    /// Threads reading the same window fetch it once.
    #[test]
    fn concurrent_readers_share_a_window() {
        let data = pattern(4000);
        let s = store_with("packs/ab/p", &data);
        let w = Arc::new(Windows::with_sizes(s, 4000, 4, 0));
        std::thread::scope(|scope| {
            for t in 0..8 {
                let w = w.clone();
                let data = &data;
                scope.spawn(move || {
                    let mut buf = vec![0u8; 50];
                    let off = t * 400;
                    w.get_range("packs/ab/p", off as u64, &mut buf).unwrap();
                    assert_eq!(buf, data[off..off + 50]);
                });
            }
        });
        assert_eq!(w.counts(), (1, 0));
    }
}
