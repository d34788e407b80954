//! Restore: write a snapshot (any [`Volume`]) to a block device or a file.
//!
//! Plan, then execute: [`plan_restore`] checks the target and says what will happen (and
//! refuses unsafe targets); [`restore`] writes. Data blocks are read and written by parallel
//! workers with positional writes; a file target is made sparse (zero blocks become holes), a
//! device target gets its zero ranges zeroed. Every chunk is checked against its hash as it is
//! read, before it is written; with `verify`, a second pass flushes the target, reads every
//! data block back from the medium and compares it with the snapshot.
//!
//! Target safety is decided by identity, not by path: the target (after following symbolic
//! links) is compared by device and inode with the protected files (the repository or copy
//! being read: its files, its directories, hard links to them), and with the backing file of
//! every loop device (by inode, so a hard link, a renamed or a deleted backing file is still
//! recognised); a target behind a mounted loop device, or a loop device sharing its backing
//! file with a mounted one, is refused.
//!
//! A restore that fails after opening the target returns [`Error::IncompleteRestore`]: a file
//! that the restore created is removed; an existing file or device keeps what was written and
//! the error says it holds an incomplete restore. `only_changed` treats the holes of a file
//! target as zeros without reading them (`SEEK_DATA`).

use crate::buffer::{ALIGN, AlignedBuf};
use crate::error::{Error, IoContext, Result};
use crate::platform::{self, ObjectKind};
use crate::progress::Progress;
use crate::volume::Volume;
use crossbeam_channel::bounded;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Options of a restore.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Worker threads; 0 means one per core, or more when the volume asks for more
    /// ([`Volume::readers`]: a snapshot on object storage).
    pub threads: usize,
    /// After writing and flushing, read every data block back from the target (bypassing the
    /// page cache where possible) and compare it with the snapshot.
    pub verify: bool,
    pub cancel: Option<Arc<AtomicBool>>,
    /// Read the target first and write only what differs from the volume: a target that
    /// already holds an older state of the volume is brought up to date with few writes.
    /// Blocks whose hash the volume knows ([`Volume::known_hash`]: chunks and slices of
    /// format 1 snapshots) are compared by hashing the target alone; other blocks (pieces of
    /// blobs, format 2) are read from both and compared byte for byte, and only the differing
    /// sub-pieces are written; zero and unused ranges are zeroed only where the target is not.
    pub only_changed: bool,
}

/// What the target is and what a restore will do to it.
#[derive(Debug, Clone)]
pub struct RestorePlan {
    pub target: PathBuf,
    pub target_kind: ObjectKind,
    /// The target exists and will be overwritten.
    pub overwrites: bool,
    pub volume_size: u64,
    /// Size of a device target (≥ volume size).
    pub target_size: u64,
}

/// What a restore did.
#[derive(Debug, Clone, Default)]
pub struct RestoreReport {
    pub bytes_written: u64,
    pub zero_bytes: u64,
    pub verified_bytes: u64,
    /// `only_changed`: bytes the target already held (not written).
    pub unchanged_bytes: u64,
    /// `only_changed`: bytes of zero ranges that the target did not hold as zeros (zeroed).
    pub zeroed_bytes: u64,
}

/// What a worker did with one piece.
#[derive(Default)]
struct Done {
    written: u64,
    verified: u64,
    unchanged: u64,
    zeroed: u64,
}

fn refuse(target: &Path, reason: String) -> Error {
    Error::UnsafeTarget {
        path: target.to_path_buf(),
        reason,
    }
}

/// Why `target` is (inside, or the same file as) one of `protected`, if it is: compared by
/// path and by identity (device and inode), so that a hard link, a symbolic link or a bind
/// mount of a protected file is recognised too.
fn protected_reason(abs: &Path, protected: &[PathBuf]) -> Option<String> {
    let target_id = platform::path_id(abs).ok().flatten();
    // Where a new file would be created: its directory.
    let parent_id = abs
        .parent()
        .and_then(|d| platform::path_id(d).ok().flatten());
    // A regular file with other names may be one of the protected files under another name.
    // Where the platform cannot count links, assume there may be others.
    let linked = std::fs::metadata(abs).is_ok_and(|m| m.is_file())
        && !matches!(platform::link_count(abs), Ok(Some(n)) if n <= 1);
    let ta = std::fs::canonicalize(abs)
        .or_else(|_| {
            abs.parent()
                .map(std::fs::canonicalize)
                .unwrap_or(Ok(abs.to_path_buf()))
                .map(|d| d.join(abs.file_name().unwrap_or_default()))
        })
        .unwrap_or_else(|_| abs.to_path_buf());
    for p in protected {
        let because = || {
            Some(format!(
                "it is (inside) {}, which this operation reads",
                p.display()
            ))
        };
        let pa = std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
        if ta.starts_with(&pa) {
            return because();
        }
        let Ok(Some(pid)) = platform::path_id(p) else {
            continue;
        };
        if target_id == Some(pid) {
            return because();
        }
        if !std::fs::metadata(p).is_ok_and(|m| m.is_dir()) {
            continue;
        }
        // The target's directory is one of the protected tree's (a bind mount of it), or the
        // target is a hard link of one of its files.
        let mut dirs = Vec::new();
        let mut files = Vec::new();
        walk_ids(p, 0, &mut dirs, linked.then_some(&mut files));
        if parent_id.is_some_and(|d| dirs.contains(&d))
            || target_id.is_some_and(|t| files.contains(&t) || dirs.contains(&t))
        {
            return because();
        }
    }
    None
}

/// Identities of the directories under `dir` (itself included), and of its files when `files`
/// is given. Without `files`, directories deeper than two levels are recorded but not listed
/// (a repository's `chunks/xx/` hold only chunk files: listing them all at every restore would
/// cost too much). Symbolic links to directories are followed to a bounded depth.
fn walk_ids(
    dir: &Path,
    depth: usize,
    dirs: &mut Vec<(u64, u64)>,
    mut files: Option<&mut Vec<(u64, u64)>>,
) {
    let Ok(Some(id)) = platform::path_id(dir) else {
        return;
    };
    if depth > 8 || dirs.contains(&id) {
        return;
    }
    dirs.push(id);
    if depth >= 2 && files.is_none() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let Ok(ft) = e.file_type() else {
            continue;
        };
        let path = e.path();
        let is_dir = ft.is_dir() || (ft.is_symlink() && path.is_dir());
        if is_dir {
            walk_ids(&path, depth + 1, dirs, files.as_deref_mut());
        } else if let Some(f) = files.as_deref_mut()
            && let Ok(Some(id)) = platform::path_id(&path)
        {
            f.push(id);
        }
    }
}

/// Checks that `target` can safely receive a volume of `volume_size` bytes: not one of the
/// `protected` files (by path or identity), not mounted, not a file or device behind a mounted
/// loop device (by the loop devices' backing-file identities), big enough.
pub fn plan_restore(target: &Path, volume_size: u64, protected: &[PathBuf]) -> Result<RestorePlan> {
    let abs = std::path::absolute(target).unwrap_or_else(|_| target.to_path_buf());
    if let Some(reason) = protected_reason(&abs, protected) {
        return Err(refuse(target, reason));
    }
    let meta = match std::fs::metadata(&abs) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::io("inspect", &abs, e)),
    };
    let Some(meta) = meta else {
        if platform::in_device_namespace(&abs) {
            // Restoring would create a plain file in the device directory (in memory on
            // Linux) while the user meant a device that is not there.
            return Err(refuse(
                target,
                "no such device (a partition of a loop device appears after `partx -a`); \
                 restore writes to an existing device, or to a file outside the device \
                 directory"
                    .into(),
            ));
        }
        return Ok(RestorePlan {
            target: abs,
            target_kind: ObjectKind::RegularFile,
            overwrites: false,
            volume_size,
            target_size: volume_size,
        });
    };
    if let Some(mp) = platform::mount_point_of(&abs).ctx("check mounts of", &abs)? {
        return Err(refuse(
            target,
            format!(
                "it (or a partition or loop device on it) is mounted at {}; unmount it first",
                mp.point
            ),
        ));
    }
    let f = platform::open_read_only(&abs).ctx("open", &abs)?;
    let g = platform::geometry(&f).ctx("read the geometry of", &abs)?;
    match g.kind {
        ObjectKind::BlockDevice => {
            if g.size < volume_size {
                return Err(refuse(
                    target,
                    format!(
                        "the device holds {} bytes but the volume needs {volume_size}",
                        g.size
                    ),
                ));
            }
        }
        ObjectKind::RegularFile => {}
        ObjectKind::Other => {
            return Err(refuse(
                target,
                "it is neither a regular file nor a block device".into(),
            ));
        }
    }
    let _ = meta;
    Ok(RestorePlan {
        target: abs,
        target_kind: g.kind,
        overwrites: true,
        volume_size,
        target_size: g.size.max(volume_size),
    })
}

/// Writes `volume` to the target of `plan`.
///
/// A file target that does not exist yet is written under a temporary name beside it,
/// `TARGET.volback-incomplete`, and renamed to its name only once it is complete and flushed:
/// a restore killed half-way (kill -9, power loss) never leaves a partial image under the name
/// the user asked for.
///
/// When writing fails part-way, the error is [`Error::IncompleteRestore`]: a file target that
/// this restore created is removed (a partial image must not pass for a restored one); an
/// existing file or device is left holding the partial restore, and the error says so.
/// Cancellation ([`Error::Interrupted`]) removes a created file the same way.
pub fn restore(
    volume: &dyn Volume,
    plan: &RestorePlan,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<RestoreReport> {
    let path = &plan.target;
    let created = !plan.overwrites && plan.target_kind == ObjectKind::RegularFile;
    // A new file is written under its incomplete name first.
    let staging = created.then(|| RestorePlan {
        target: incomplete_name(path),
        ..plan.clone()
    });
    let writing = staging.as_ref().unwrap_or(plan);
    if let Some(staging) = &staging {
        // Left by a restore that was killed: start afresh, and never write through a link
        // planted under that name (it is created new below).
        match std::fs::remove_file(&staging.target) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("remove", &staging.target, e)),
        }
    }
    let file = open_target(writing, volume.size(), staging.is_some(), opts)?;
    let result = write_target(volume, writing, &file, opts, progress);
    drop(file);
    let report = result.map_err(|e| {
        let removed = created && std::fs::remove_file(&writing.target).is_ok();
        match e {
            Error::Interrupted { .. } => e,
            e => Error::IncompleteRestore {
                path: path.clone(),
                removed,
                source: Box::new(e),
            },
        }
    })?;
    if let Some(staging) = &staging {
        std::fs::rename(&staging.target, path).ctx("rename into place", &staging.target)?;
        if let Some(parent) = path.parent() {
            platform::sync_dir(parent).ctx("flush directory", parent)?;
        }
    }
    Ok(report)
}

/// The name a new file target has while it is being written.
pub fn incomplete_name(target: &Path) -> PathBuf {
    let mut name = target.as_os_str().to_owned();
    name.push(".volback-incomplete");
    PathBuf::from(name)
}

/// Opens (a file: creates) the target of `plan` for writing.
fn open_target(plan: &RestorePlan, size: u64, fresh: bool, opts: &RestoreOptions) -> Result<File> {
    let path = &plan.target;
    Ok(match plan.target_kind {
        ObjectKind::BlockDevice => {
            platform::open_device_for_overwrite(path).ctx("open for writing", path)?
        }
        _ => {
            // Only-changed keeps what the file holds; otherwise it starts empty (sparse). A
            // fresh file must not exist yet.
            let mut o = OpenOptions::new();
            o.read(true).write(true);
            if fresh {
                o.create_new(true);
            } else {
                o.create(true).truncate(!opts.only_changed);
            }
            let f = o.open(path).ctx("create", path)?;
            f.set_len(size).ctx("set the size of", path)?;
            f
        }
    })
}

/// The writing (and verifying) passes of [`restore`].
fn write_target(
    volume: &dyn Volume,
    plan: &RestorePlan,
    file: &File,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<RestoreReport> {
    let size = volume.size();
    let path = &plan.target;
    // Holes of a file target read as zeros without reading (`SEEK_DATA`).
    let sparse_target = plan.target_kind == ObjectKind::RegularFile;
    let is_device = plan.target_kind == ObjectKind::BlockDevice;
    let threads = if opts.threads == 0 {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        cores.max(volume.readers())
    } else {
        opts.threads
    };
    const PIECE: u64 = 1 << 20;
    let stop = AtomicBool::new(false);
    let cancelled = || {
        opts.cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
    };
    let mut report = RestoreReport::default();
    for verify_pass in [false, true] {
        // Only-changed: this pass compares with the target before writing.
        let checking = opts.only_changed && !verify_pass;
        if verify_pass {
            if !opts.verify {
                break;
            }
            // Everything written must be on the medium before it is read back.
            file.sync_all().ctx("flush", path)?;
        }
        // Bulk writes and read-backs bypass the page cache where the target allows it (no
        // copy through the cache, nothing left to flush); unaligned pieces use `file`.
        let direct = platform::open_direct_rw(path);
        progress.start(if verify_pass { "verify" } else { "restore" }, size);
        let result: Result<()> = std::thread::scope(|scope| {
            // Pieces: (offset, length, is a zero range to check).
            let (tx, rx) = bounded::<(u64, u64, bool)>(threads * 4);
            let (res_tx, res_rx) = bounded::<Result<Done>>(threads * 4);
            for _ in 0..threads {
                let rx = rx.clone();
                let res_tx = res_tx.clone();
                let stop = &stop;
                let direct = &direct;
                scope.spawn(move || {
                    let mut piece = AlignedBuf::new(PIECE as usize);
                    let mut check = AlignedBuf::new(PIECE as usize);
                    for (off, len, gap) in rx.iter() {
                        if stop.load(Ordering::Relaxed) {
                            continue;
                        }
                        let n = len as usize;
                        let buf = &mut piece[..n];
                        let r = (|| {
                            if checking {
                                // What the target holds now.
                                let old = &mut check[..n];
                                read_target(direct.as_ref(), file, old, off, path, sparse_target)?;
                                if gap {
                                    if crate::volume::is_zero(old) {
                                        return Ok(Done {
                                            unchanged: len,
                                            ..Done::default()
                                        });
                                    }
                                    platform::zero_range(file, off, len).map_err(|e| {
                                        Error::IoAt {
                                            op: "zero",
                                            path: path.clone(),
                                            offset: off,
                                            source: e,
                                        }
                                    })?;
                                    return Ok(Done {
                                        zeroed: len,
                                        ..Done::default()
                                    });
                                }
                                if matches_known_hashes(volume, off, old)? {
                                    return Ok(Done {
                                        unchanged: len,
                                        ..Done::default()
                                    });
                                }
                                volume.read_at(off, buf)?;
                                // Write only the sub-pieces that differ.
                                let mut written = 0u64;
                                let mut at = 0usize;
                                while at < n {
                                    let step = |i: usize| (n - i).min(SUB);
                                    if buf[at..at + step(at)] == old[at..at + step(at)] {
                                        at += step(at);
                                        continue;
                                    }
                                    let from = at;
                                    while at < n && buf[at..at + step(at)] != old[at..at + step(at)]
                                    {
                                        at += step(at);
                                    }
                                    let w = off + from as u64;
                                    write_piece(direct.as_ref(), file, &buf[from..at], w, path)?;
                                    written += (at - from) as u64;
                                }
                                return Ok(Done {
                                    written,
                                    unchanged: len - written,
                                    ..Done::default()
                                });
                            }
                            volume.read_at(off, buf)?;
                            if !verify_pass {
                                write_piece(direct.as_ref(), file, buf, off, path)?;
                                return Ok(Done {
                                    written: len,
                                    ..Done::default()
                                });
                            }
                            // Read back from the medium: O_DIRECT where possible, so the page
                            // cache cannot answer in the device's place.
                            read_target(direct.as_ref(), file, &mut check[..n], off, path, false)?;
                            if check[..n] != buf[..] {
                                return Err(Error::IoAt {
                                    op: "verify",
                                    path: path.clone(),
                                    offset: off,
                                    source: std::io::Error::other(
                                        "data read back differs from the snapshot",
                                    ),
                                });
                            }
                            Ok(Done {
                                verified: len,
                                ..Done::default()
                            })
                        })();
                        if r.is_err() {
                            stop.store(true, Ordering::Relaxed);
                        }
                        if res_tx.send(r).is_err() {
                            return;
                        }
                    }
                });
            }
            drop(res_tx);
            drop(rx);
            // Producer: walk the data ranges, zero the gaps on devices.
            // Returns the bytes of zero ranges, and those of zero ranges where the target has
            // holes (only-changed: unchanged without reading).
            let producer = scope.spawn(|| -> Result<(u64, u64)> {
                // Hands [start, end) to the workers in pieces aligned to PIECE; false when
                // the workers are gone.
                let send_pieces = |start: u64, end: u64, zero: bool| -> bool {
                    let mut off = start;
                    while off < end {
                        let len = (end - off).min(PIECE - off % PIECE);
                        if tx.send((off, len, zero)).is_err() {
                            return false;
                        }
                        off += len;
                    }
                    true
                };
                let mut pos = 0u64;
                let mut zero_bytes = 0u64;
                let mut hole_bytes = 0u64;
                while pos < size {
                    if stop.load(Ordering::Relaxed) || cancelled() {
                        break;
                    }
                    let next = volume.next_data(pos, size)?;
                    let (ds, de) = match next {
                        Some(r) => (r.start, r.end),
                        None => (size, size),
                    };
                    if ds > pos {
                        if checking {
                            // Workers check the target and zero what is not zero already;
                            // the target's holes are zeros already.
                            let mut at = pos;
                            while at < ds {
                                let (cs, ce) = match sparse_target {
                                    true => target_data(file, at, ds, path)?,
                                    false => (at, ds),
                                };
                                hole_bytes += cs - at;
                                progress.advance(cs - at);
                                if !send_pieces(cs, ce, true) {
                                    return Ok((zero_bytes, hole_bytes));
                                }
                                at = ce;
                            }
                        } else if is_device && !verify_pass {
                            platform::zero_range(file, pos, ds - pos).map_err(|e| Error::IoAt {
                                op: "zero",
                                path: path.clone(),
                                offset: pos,
                                source: e,
                            })?;
                        }
                        zero_bytes += ds - pos;
                        if !checking {
                            progress.advance(ds - pos);
                        }
                    }
                    if !send_pieces(ds, de, false) {
                        return Ok((zero_bytes, hole_bytes));
                    }
                    pos = de;
                }
                drop(tx);
                Ok((zero_bytes, hole_bytes))
            });
            let mut first_err = None;
            for r in res_rx.iter() {
                match r {
                    Ok(d) => {
                        report.bytes_written += d.written;
                        report.verified_bytes += d.verified;
                        report.unchanged_bytes += d.unchanged;
                        report.zeroed_bytes += d.zeroed;
                        progress.advance(d.written + d.verified + d.unchanged + d.zeroed);
                    }
                    Err(e) => {
                        stop.store(true, Ordering::Relaxed);
                        first_err.get_or_insert(e);
                    }
                }
            }
            let produced = producer.join().unwrap_or_else(|_| {
                Err(Error::internal("restore", "the producer thread panicked"))
            });
            if let Some(e) = first_err {
                return Err(e);
            }
            let (zero, holes) = produced?;
            if !verify_pass {
                report.zero_bytes = zero;
                report.unchanged_bytes += holes;
            }
            Ok(())
        });
        progress.finish();
        result?;
        if cancelled() {
            return Err(Error::Interrupted {
                checkpointed: false,
            });
        }
    }
    file.sync_all().ctx("flush", path)?;
    Ok(report)
}

/// Granularity of `only_changed` writes (a multiple of the direct-I/O alignment).
const SUB: usize = 64 << 10;

/// Writes `buf` at `offset` through `direct` (`O_DIRECT`) when the piece is aligned, falling
/// back to `file` otherwise and where the filesystem refuses `O_DIRECT` at write time.
fn write_piece(
    direct: Option<&File>,
    file: &File,
    buf: &[u8],
    offset: u64,
    path: &Path,
) -> Result<()> {
    let out = direct
        .filter(|_| aligned(offset, buf.len()))
        .unwrap_or(file);
    platform::write_all_at(out, buf, offset)
        .or_else(|e| {
            if e.kind() == std::io::ErrorKind::InvalidInput && !std::ptr::eq(out, file) {
                platform::write_all_at(file, buf, offset)
            } else {
                Err(e)
            }
        })
        .map_err(|e| Error::IoAt {
            op: "write",
            path: path.to_path_buf(),
            offset,
            source: e,
        })
}

/// True when `old`, the target's bytes at `offset`, hashes block by block to what `volume`
/// records for those blocks (every block of the piece whole and with a known hash).
fn matches_known_hashes(volume: &dyn Volume, offset: u64, old: &[u8]) -> Result<bool> {
    let end = offset + old.len() as u64;
    let mut pos = offset;
    while pos < end {
        let Some(k) = volume.known_hash(pos)? else {
            return Ok(false);
        };
        if k.start != pos || k.len == 0 || k.start + k.len > end {
            return Ok(false);
        }
        let s = (pos - offset) as usize;
        if k.algorithm.hash(&old[s..s + k.len as usize]) != k.hash {
            return Ok(false);
        }
        pos += k.len;
    }
    Ok(true)
}

/// True when a piece can go through `O_DIRECT`.
fn aligned(offset: u64, len: usize) -> bool {
    offset.is_multiple_of(ALIGN as u64) && len.is_multiple_of(ALIGN)
}

/// Reads the target's bytes at `offset` from the medium: through `direct` (`O_DIRECT`, so
/// the page cache cannot answer in the device's place) when the piece is aligned. With
/// `holes` (a regular file), holes are filled with zeros, not read.
fn read_target(
    direct: Option<&File>,
    file: &File,
    buf: &mut [u8],
    offset: u64,
    path: &Path,
    holes: bool,
) -> Result<()> {
    if !holes {
        return match direct.filter(|_| aligned(offset, buf.len())) {
            Some(d) => read_exact_at(d, buf, offset, path),
            None => read_exact_at(file, buf, offset, path),
        };
    }
    let end = offset + buf.len() as u64;
    let mut pos = offset;
    while pos < end {
        let (ds, de) = target_data(file, pos, end, path)?;
        buf[(pos - offset) as usize..(ds - offset) as usize].fill(0);
        if de > ds {
            let b = &mut buf[(ds - offset) as usize..(de - offset) as usize];
            read_target(direct, file, b, ds, path, false)?;
        }
        pos = de;
    }
    Ok(())
}

/// The first range of `file` (a regular file) in `[from, end)` that holds data, as
/// `(start, end)`; `(end, end)` when only holes remain.
fn target_data(file: &File, from: u64, end: u64, path: &Path) -> Result<(u64, u64)> {
    let next = platform::next_data(file, from, end).map_err(|e| Error::IoAt {
        op: "find data in",
        path: path.to_path_buf(),
        offset: from,
        source: e,
    })?;
    Ok(match next {
        Some((s, e)) => {
            let s = s.clamp(from, end);
            // A range that does not advance: treat the rest as data.
            (s, if e > s { e.min(end) } else { end })
        }
        None => (end, end),
    })
}

fn read_exact_at(file: &File, buf: &mut [u8], offset: u64, path: &Path) -> Result<()> {
    platform::read_exact_at(file, buf, offset).map_err(|source| Error::IoAt {
        op: "read back",
        path: path.to_path_buf(),
        offset,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::reader::tests::{sample, tree_volume};

    /// Format 2 blocks have no hash of their own: only-changed compares bytes and writes the
    /// sub-pieces that differ.
    #[test]
    fn only_changed_compares_pieces_of_blobs_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let data = sample(40 * 4096 + 123);
        let (vol, _) = tree_volume(dir.path(), &data, None);
        let target = dir.path().join("target.img");
        let mut old = data.clone();
        old[5 * 4096 + 7] ^= 0xff;
        old[30 * 4096] ^= 1;
        // A zero block that the target holds as data.
        old[2 * 4096 + 9] = 3;
        std::fs::write(&target, &old).unwrap();
        let plan = plan_restore(&target, vol.size(), &[]).unwrap();
        let opts = RestoreOptions {
            only_changed: true,
            threads: 2,
            ..RestoreOptions::default()
        };
        let report = restore(&vol, &plan, &opts, &crate::progress::Silent).unwrap();
        assert!(std::fs::read(&target).unwrap() == data);
        // Two sub-pieces (at most) rewritten, the zero block zeroed, the rest left alone.
        assert!(report.bytes_written > 0 && report.bytes_written <= 2 * SUB as u64);
        assert!(report.zeroed_bytes > 0);
        assert_eq!(
            report.bytes_written + report.unchanged_bytes + report.zeroed_bytes,
            data.len() as u64
        );
    }
}
