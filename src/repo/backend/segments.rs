//! Append-only logs (resume journals) on a store that cannot append: a log is a numbered run
//! of objects, each written once by one PUT.
//!
//! Log `<name>` (`journals/<stem>.journal`) is the object `<name>` (segment 0, the *header*
//! segment) followed by `<name>.0000000001`, `<name>.0000000002`, … (segment `n` is
//! `<name>.<n:010>`), one per [`Log::append`]. The log's bytes are the segments' bytes in
//! order, so the journal parser, its sealing and its record names do not change.
//!
//! - The log exists exactly when its header segment does. Removing it deletes the header
//!   first, so a crash in the middle leaves no log (only orphan segments, deleted by the
//!   next `Create` of the same name), never a log with a hole.
//! - The header segment is written by the first append after `Create`, with that append's
//!   bytes (the journal's magic and header): a log is never visible empty or half-made, as a
//!   local journal written by temp-file-and-rename never is. `Create` itself only removes the
//!   old log; a `Create` followed by no append leaves no log.
//! - Segments are found by listing. They are numbered without gaps; a gap (which only a store
//!   that lost a write could produce) ends the log, and the segments past it are deleted
//!   before this log writes anything, so that they never reappear after a later append.
//! - `truncate` deletes whole segments past the cut from the last one down (a crash leaves a
//!   shorter prefix of the old log, which the journal's resume cuts again), then re-writes the
//!   segment the cut falls into, shortened.
//!
//! Works over any [`WriteBackend`] through `get`, `list`, `put` and `delete` only; the S3
//! backend's [`WriteBackend::open_log`] delegates here.

use super::{Log, LogMode, ObjectMeta, PutMode, WriteBackend};
use crate::error::{Error, Result};
use std::io::Read;
use std::sync::Arc;

/// Highest segment number (10 decimal digits).
const MAX_SEGMENT: u64 = 9_999_999_999;

/// Opens log `name` ([`LogMode::Create`]: removes any old one and starts an empty one;
/// [`LogMode::Open`]: the existing one, `None` when there is none).
pub fn open_log(
    store: Arc<dyn WriteBackend>,
    name: &str,
    mode: LogMode,
) -> Result<Option<Box<dyn Log>>> {
    Ok(SegmentLog::open(store, name, mode)?.map(|l| Box::new(l) as Box<dyn Log>))
}

/// What a listing shows of log `name`.
struct Found {
    /// Size of the header segment, if there is one.
    header: Option<u64>,
    /// `(segment number, size)` of the other segments, in order.
    segments: Vec<(u64, u64)>,
}

/// The segment number of `object` if it is a segment of log `name` (≥ 1).
fn segment_number(name: &str, object: &str) -> Option<u64> {
    let digits = object.strip_prefix(name)?.strip_prefix('.')?;
    if digits.len() != 10 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|&n| n > 0)
}

fn segment_name(name: &str, n: u64) -> String {
    if n == 0 {
        name.to_string()
    } else {
        format!("{name}.{n:010}")
    }
}

fn scan(store: &dyn WriteBackend, name: &str) -> Result<Found> {
    let dir = name.rsplit_once('/').map_or("", |(dir, _)| dir);
    let mut found = Found {
        header: None,
        segments: Vec::new(),
    };
    store.list(dir, &mut |m: ObjectMeta| {
        if m.name == name {
            found.header = Some(m.size);
        } else if let Some(n) = segment_number(name, &m.name) {
            found.segments.push((n, m.size));
        }
        Ok(())
    })?;
    found.segments.sort_unstable();
    Ok(found)
}

/// A log stored as segments.
struct SegmentLog {
    store: Arc<dyn WriteBackend>,
    name: String,
    /// Sizes of segments 0, 1, …; empty while the header segment is not written.
    sizes: Vec<u64>,
    /// Numbers of segments past a gap (or numbered 0): deleted before the next write.
    strays: Vec<u64>,
}

impl SegmentLog {
    fn open(store: Arc<dyn WriteBackend>, name: &str, mode: LogMode) -> Result<Option<SegmentLog>> {
        if name.is_empty() || name.ends_with('/') {
            return Err(Error::internal("log", format!("invalid log name {name:?}")));
        }
        let found = scan(&*store, name)?;
        let mut log = SegmentLog {
            store,
            name: name.to_string(),
            sizes: Vec::new(),
            strays: Vec::new(),
        };
        match mode {
            LogMode::Create => {
                // Header first: from here on there is no log, whatever else a crash leaves.
                log.store.delete(name)?;
                for &(n, _) in found.segments.iter().rev() {
                    log.store.delete(&segment_name(name, n))?;
                }
            }
            LogMode::Open | LogMode::Read => {
                let Some(header) = found.header else {
                    return Ok(None);
                };
                log.sizes.push(header);
                for (n, size) in found.segments {
                    if n == log.sizes.len() as u64 {
                        log.sizes.push(size);
                    } else {
                        log.strays.push(n);
                    }
                }
            }
        }
        Ok(Some(log))
    }

    /// Deletes the segments past a gap, last first.
    fn clear_strays(&mut self) -> Result<()> {
        while let Some(&n) = self.strays.last() {
            self.store.delete(&segment_name(&self.name, n))?;
            self.strays.pop();
        }
        Ok(())
    }

    fn total(&self) -> u64 {
        self.sizes.iter().sum()
    }
}

impl Log for SegmentLog {
    fn reader(&mut self) -> Result<Box<dyn Read + '_>> {
        Ok(Box::new(SegmentReader {
            log: self,
            next: 0,
            current: std::io::Cursor::new(Vec::new()),
        }))
    }

    fn len(&self) -> u64 {
        self.total()
    }

    fn append(&mut self, bytes: &[u8]) -> Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.clear_strays()?;
        let n = self.sizes.len() as u64;
        if n > MAX_SEGMENT {
            return Err(Error::io(
                "append to",
                self.store.display_path(&self.name),
                std::io::Error::other("the log has the largest number of segments possible"),
            ));
        }
        self.store
            .put(&segment_name(&self.name, n), bytes, PutMode::Overwrite)?;
        self.sizes.push(bytes.len() as u64);
        Ok(())
    }

    fn truncate(&mut self, len: u64) -> Result<()> {
        let total = self.total();
        if len > total {
            return Err(Error::internal(
                "log",
                format!(
                    "cannot cut {} to {len} bytes: it holds {total}",
                    self.store.display_path(&self.name).display()
                ),
            ));
        }
        if len == total {
            return Ok(());
        }
        self.clear_strays()?;
        // The segment `k` the cut falls in (start < len ≤ end), or the header for len 0.
        let mut start = 0;
        let mut keep = self.sizes.len();
        for (k, &size) in self.sizes.iter().enumerate() {
            if start + size >= len {
                keep = k + 1;
                break;
            }
            start += size;
        }
        while self.sizes.len() > keep {
            let n = self.sizes.len() as u64 - 1;
            self.store.delete(&segment_name(&self.name, n))?;
            self.sizes.pop();
        }
        let k = keep - 1;
        let new_size = len - start;
        if self.sizes[k] > new_size {
            let seg = segment_name(&self.name, k as u64);
            let bytes = self.store.get(&seg, self.sizes[k], "log segment")?;
            let cut = bytes.get(..new_size as usize).ok_or_else(|| {
                Error::corrupt(
                    "log segment",
                    self.store.display_path(&seg),
                    format!(
                        "{} bytes where the listing said {}",
                        bytes.len(),
                        self.sizes[k]
                    ),
                )
            })?;
            self.store.put(&seg, cut, PutMode::Overwrite)?;
            self.sizes[k] = new_size;
        }
        Ok(())
    }

    fn remove(mut self: Box<Self>) -> Result<()> {
        // Header first: the log is gone at once, even if a crash follows.
        self.store.delete(&self.name)?;
        while self.sizes.len() > 1 {
            let n = self.sizes.len() as u64 - 1;
            self.store.delete(&segment_name(&self.name, n))?;
            self.sizes.pop();
        }
        self.clear_strays()
    }
}

/// The bytes of a log, one segment read at a time.
struct SegmentReader<'a> {
    log: &'a SegmentLog,
    /// Next segment to read.
    next: usize,
    current: std::io::Cursor<Vec<u8>>,
}

impl Read for SegmentReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let n = self.current.read(buf)?;
            if n > 0 || buf.is_empty() || self.next >= self.log.sizes.len() {
                return Ok(n);
            }
            let seg = segment_name(&self.log.name, self.next as u64);
            // A segment shorter than listed reads short (a torn tail for the parser); longer
            // is refused by the limit.
            let bytes = self
                .log
                .store
                .get(&seg, self.log.sizes[self.next], "log segment")
                .map_err(std::io::Error::other)?;
            self.current = std::io::Cursor::new(bytes);
            self.next += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::lease::mem::MemStore;
    use super::*;

    fn store(m: &Arc<MemStore>) -> Arc<dyn WriteBackend> {
        m.clone()
    }

    const NAME: &str = "journals/ab.journal";

    fn open(m: &Arc<MemStore>, mode: LogMode) -> Option<Box<dyn Log>> {
        open_log(store(m), NAME, mode).unwrap()
    }

    fn contents(log: &mut Box<dyn Log>) -> Vec<u8> {
        let mut v = Vec::new();
        log.reader().unwrap().read_to_end(&mut v).unwrap();
        assert_eq!(v.len() as u64, log.len());
        v
    }

    #[test]
    fn appends_are_segments_read_back_in_order() {
        let m = MemStore::new();
        assert!(open(&m, LogMode::Open).is_none());
        let mut log = open(&m, LogMode::Create).unwrap();
        assert_eq!(log.len(), 0);
        assert_eq!(contents(&mut log), b"");
        log.append(b"HEADER").unwrap();
        log.append(b"").unwrap(); // nothing written
        log.append(b"one").unwrap();
        log.append(b"two!").unwrap();
        assert_eq!(contents(&mut log), b"HEADERonetwo!");
        assert_eq!(
            m.names("journals/"),
            vec![
                NAME.to_string(),
                format!("{NAME}.0000000001"),
                format!("{NAME}.0000000002"),
            ]
        );
        assert_eq!(m.raw(NAME).unwrap(), b"HEADER");
        drop(log);
        let mut log = open(&m, LogMode::Open).unwrap();
        assert_eq!(log.len(), 13);
        assert_eq!(contents(&mut log), b"HEADERonetwo!");
        log.append(b"3").unwrap();
        assert_eq!(
            contents(&mut open(&m, LogMode::Open).unwrap()),
            b"HEADERonetwo!3"
        );
        // Other objects in the directory are not segments.
        m.put("journals/ab.journal.x", b"?", PutMode::Overwrite)
            .unwrap();
        m.put("journals/abc.journal", b"?", PutMode::Overwrite)
            .unwrap();
        m.put(&format!("{NAME}.00000000004"), b"?", PutMode::Overwrite)
            .unwrap();
        assert_eq!(
            contents(&mut open(&m, LogMode::Open).unwrap()),
            b"HEADERonetwo!3"
        );
    }

    #[test]
    fn a_create_without_append_leaves_no_log() {
        let m = MemStore::new();
        drop(open(&m, LogMode::Create));
        assert!(open(&m, LogMode::Open).is_none());
        assert!(m.names("").is_empty());
    }

    #[test]
    fn create_replaces_an_old_log() {
        let m = MemStore::new();
        let mut log = open(&m, LogMode::Create).unwrap();
        for part in [&b"H"[..], b"a", b"b", b"c"] {
            log.append(part).unwrap();
        }
        let mut new = open(&m, LogMode::Create).unwrap();
        assert!(m.names("journals/").is_empty());
        new.append(b"N").unwrap();
        assert_eq!(contents(&mut open(&m, LogMode::Open).unwrap()), b"N");
    }

    #[test]
    fn truncate_inside_a_segment_at_a_boundary_and_to_nothing() {
        let m = MemStore::new();
        let mut log = open(&m, LogMode::Create).unwrap();
        for part in [&b"HEAD"[..], b"12345", b"678", b"9abc"] {
            log.append(part).unwrap();
        }
        log.truncate(log.len()).unwrap();
        assert_eq!(log.len(), 16);
        assert!(log.truncate(17).is_err());
        // Inside segment 2: segment 3 deleted, segment 2 rewritten shorter.
        log.truncate(10).unwrap();
        assert_eq!(contents(&mut log), b"HEAD123456");
        assert_eq!(m.raw(&format!("{NAME}.0000000002")).unwrap(), b"6");
        assert!(m.raw(&format!("{NAME}.0000000003")).is_none());
        // At a boundary: nothing rewritten.
        log.truncate(9).unwrap();
        assert_eq!(m.names("journals/").len(), 2);
        assert_eq!(
            contents(&mut open(&m, LogMode::Open).unwrap()),
            b"HEAD12345"
        );
        // Appends continue after the cut.
        log.append(b"xy").unwrap();
        assert_eq!(
            contents(&mut open(&m, LogMode::Open).unwrap()),
            b"HEAD12345xy"
        );
        // Inside the header, then to nothing: the (empty) log still exists.
        log.truncate(2).unwrap();
        assert_eq!(contents(&mut open(&m, LogMode::Open).unwrap()), b"HE");
        log.truncate(0).unwrap();
        let mut reopened = open(&m, LogMode::Open).unwrap();
        assert_eq!(reopened.len(), 0);
        reopened.append(b"again").unwrap();
        assert_eq!(contents(&mut open(&m, LogMode::Open).unwrap()), b"again");
        assert_eq!(
            m.names("journals/"),
            vec![NAME.to_string(), format!("{NAME}.0000000001")]
        );
    }

    #[test]
    fn remove_deletes_everything() {
        let m = MemStore::new();
        let mut log = open(&m, LogMode::Create).unwrap();
        for part in [&b"H"[..], b"a", b"b"] {
            log.append(part).unwrap();
        }
        log.remove().unwrap();
        assert!(m.names("").is_empty());
        assert!(open(&m, LogMode::Open).is_none());
    }

    #[test]
    fn a_crash_between_the_steps_of_remove_leaves_no_log_and_create_cleans_up() {
        let m = MemStore::new();
        let mut log = open(&m, LogMode::Create).unwrap();
        for part in [&b"H"[..], b"a", b"b", b"c"] {
            log.append(part).unwrap();
        }
        // The header's delete succeeds, the next one fails (the process dies there).
        *m.deletes_left.lock().unwrap() = Some(1);
        assert!(log.remove().is_err());
        *m.deletes_left.lock().unwrap() = None;
        assert_eq!(m.names("journals/").len(), 3);
        assert!(open(&m, LogMode::Open).is_none());
        // The next backup creates its journal: the orphans go, none reappears.
        let mut new = open(&m, LogMode::Create).unwrap();
        assert!(m.names("journals/").is_empty());
        new.append(b"N").unwrap();
        new.append(b"1").unwrap();
        assert_eq!(contents(&mut open(&m, LogMode::Open).unwrap()), b"N1");
    }

    #[test]
    fn a_gap_ends_the_log_and_what_follows_never_reappears() {
        let m = MemStore::new();
        let mut log = open(&m, LogMode::Create).unwrap();
        for part in [&b"H"[..], b"a", b"b", b"c", b"d"] {
            log.append(part).unwrap();
        }
        m.raw_delete(&format!("{NAME}.0000000002"));
        let mut log = open(&m, LogMode::Open).unwrap();
        assert_eq!(contents(&mut log), b"Ha");
        log.append(b"X").unwrap();
        assert_eq!(contents(&mut open(&m, LogMode::Open).unwrap()), b"HaX");
        assert_eq!(m.names("journals/").len(), 3);
    }

    #[test]
    fn a_failed_append_is_not_counted_and_the_next_one_takes_its_place() {
        let m = MemStore::new();
        let mut log = open(&m, LogMode::Create).unwrap();
        log.append(b"H").unwrap();
        m.fail_puts.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(log.append(b"lost").is_err());
        m.fail_puts
            .store(false, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(log.len(), 1);
        log.append(b"b").unwrap();
        assert_eq!(contents(&mut open(&m, LogMode::Open).unwrap()), b"Hb");
    }

    #[test]
    fn logs_at_the_top_level_work_too() {
        let m = MemStore::new();
        let mut log = open_log(store(&m), "top", LogMode::Create)
            .unwrap()
            .unwrap();
        log.append(b"a").unwrap();
        log.append(b"b").unwrap();
        let mut again = open_log(store(&m), "top", LogMode::Open).unwrap().unwrap();
        assert_eq!(contents(&mut again), b"ab");
    }
}
