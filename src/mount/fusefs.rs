//! The FUSE filesystem of a view: one directory of read-only image files, each a byte range
//! of a [`Volume`].

use super::ViewEntry;
use crate::volume::Volume;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry,
    ReplyOpen, ReplyStatfs, Request,
};
use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// Attributes never change: the kernel may cache them for long.
const TTL: Duration = Duration::from_secs(3600);
/// The largest read served in one request (the kernel asks for at most its max_read).
const MAX_READ: u64 = 4 << 20;
const FIRST_FILE_INO: u64 = 2;

/// A read-only directory of volume images.
pub struct ViewFs {
    vol: Arc<dyn Volume>,
    entries: Vec<ViewEntry>,
    uid: u32,
    gid: u32,
    time: SystemTime,
    /// Reads that failed (served as EIO).
    errors: AtomicU64,
    /// The first of them, with its causes (the kernel only sees EIO).
    first_error: Mutex<Option<String>>,
}

impl ViewFs {
    pub fn new(vol: Arc<dyn Volume>, entries: Vec<ViewEntry>) -> ViewFs {
        // SAFETY: getuid and getgid cannot fail and have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        ViewFs {
            vol,
            entries,
            uid,
            gid,
            time: SystemTime::now(),
            errors: AtomicU64::new(0),
            first_error: Mutex::new(None),
        }
    }

    /// Reads that failed so far.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// The first read that failed, as [`crate::error::chain`] formats it.
    pub fn first_error(&self) -> Option<String> {
        self.first_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn entry(&self, ino: INodeNo) -> Option<&ViewEntry> {
        ino.0
            .checked_sub(FIRST_FILE_INO)
            .and_then(|i| self.entries.get(usize::try_from(i).ok()?))
    }

    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let (kind, size, perm, nlink) = if ino == INodeNo::ROOT {
            (FileType::Directory, 0, 0o555, 2)
        } else {
            (FileType::RegularFile, self.entry(ino)?.size, 0o444, 1)
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.time,
            mtime: self.time,
            ctime: self.time,
            crtime: self.time,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }
}

impl Filesystem for ViewFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Let the kernel read ahead as far as it allows: images are read sequentially.
        if let Err(max) = config.set_max_readahead(4 << 20) {
            let _ = config.set_max_readahead(max);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent != INodeNo::ROOT {
            return reply.error(Errno::ENOENT);
        }
        let found = self
            .entries
            .iter()
            .position(|e| OsStr::new(&e.name) == name)
            .and_then(|i| self.attr(INodeNo(FIRST_FILE_INO + i as u64)));
        match found {
            Some(attr) => reply.entry(&TTL, &attr, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if self.entry(ino).is_none() {
            return reply.error(Errno::ENOENT);
        }
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        // The content never changes: keep the page cache across opens.
        reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(e) = self.entry(ino) else {
            return reply.error(Errno::ENOENT);
        };
        if offset >= e.size {
            // End of file.
            return reply.data(&[]);
        }
        let len = (e.size - offset).min(u64::from(size)).min(MAX_READ) as usize;
        let mut buf = vec![0u8; len];
        match self.vol.read_at(e.start + offset, &mut buf) {
            Ok(()) => reply.data(&buf),
            Err(err) => {
                if self.errors.fetch_add(1, Ordering::Relaxed) == 0 {
                    *self.first_error.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(crate::error::chain(&err));
                }
                reply.error(Errno::EIO)
            }
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let dots = [(INodeNo::ROOT, FileType::Directory, ".".to_string())]
            .into_iter()
            .chain([(INodeNo::ROOT, FileType::Directory, "..".to_string())]);
        let files = self.entries.iter().enumerate().map(|(i, e)| {
            (
                INodeNo(FIRST_FILE_INO + i as u64),
                FileType::RegularFile,
                e.name.clone(),
            )
        });
        for (i, (ino, kind, name)) in dots.chain(files).enumerate().skip(offset as usize) {
            if reply.add(ino, i as u64 + 1, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.vol.size().div_ceil(4096);
        reply.statfs(
            blocks,
            0,
            0,
            self.entries.len() as u64 + 1,
            0,
            4096,
            255,
            4096,
        );
    }
}
