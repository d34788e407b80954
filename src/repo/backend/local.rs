//! A repository in a local directory: the layout of docs/FORMAT.md, byte for byte.
//!
//! Objects are files named by their key under the root. Whole objects are published through
//! a temporary file in their own directory (fsync, rename, directory fsync: [`fsio`]); packs
//! are staged in `tmp/` and renamed without their own fsync, the next
//! [`barrier`](WriteBackend::barrier) syncs the filesystem (or their directories). Locks are
//! `flock`s on lock files, which the kernel releases when their holder dies; writer markers
//! are files locked by their writer.
//!
//! Every file is opened through [`fsio::open_regular`]: never through a symbolic link, never
//! blocking, regular files only.

use super::{
    Capabilities, LockGuard, Log, LogMode, Marker, ObjectMeta, PutMode, ReadBackend, Staged,
    WriteBackend,
};
use crate::error::{Error, IoContext, Result};
use crate::platform;
use crate::repo::fsio::{self, TempFile};
use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A repository directory.
#[derive(Debug)]
pub struct LocalDir {
    root: PathBuf,
    caps: Capabilities,
    /// Directories that received content-named objects since the last barrier.
    dirty: Arc<Mutex<BTreeSet<PathBuf>>>,
}

impl LocalDir {
    pub fn new(root: &Path) -> LocalDir {
        LocalDir {
            root: root.to_path_buf(),
            caps: Capabilities {
                file_locks: true,
                cheap_ranged_reads: true,
                parallelism: 1,
            },
            dirty: Arc::default(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file of object `name`.
    pub fn path(&self, name: &str) -> PathBuf {
        let mut p = self.root.clone();
        p.extend(name.split('/').filter(|c| !c.is_empty()));
        p
    }

    /// The lock file of lock `name`.
    fn lock_path(&self, name: &str) -> PathBuf {
        match name.strip_prefix("volume/") {
            Some(stem) => self.path(&format!("journals/{stem}.lock")),
            None => self.path(&format!("{name}.lock")),
        }
    }

    fn mark_dirty(&self, dir: &Path) {
        self.dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(dir.to_path_buf());
    }
}

fn meta_of(name: String, m: &std::fs::Metadata) -> ObjectMeta {
    ObjectMeta {
        name,
        size: m.len(),
        modified: m.modified().ok(),
    }
}

impl ReadBackend for LocalDir {
    fn display_path(&self, name: &str) -> PathBuf {
        self.path(name)
    }

    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    fn get(&self, name: &str, limit: u64, what: &str) -> Result<Vec<u8>> {
        fsio::read_limited(&self.path(name), limit, what)
    }

    fn get_range(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        // Opened for each read, never kept: a handle kept open would keep a deleted pack
        // readable (and on Windows its name taken) for as long as the repository is open.
        let file = fsio::open_regular(&self.path(name), false, "open")?;
        platform::read_exact_at(&file, buf, offset).map_err(|source| Error::IoAt {
            op: "read",
            path: self.path(name),
            offset,
            source,
        })
    }

    fn head(&self, name: &str) -> Result<Option<ObjectMeta>> {
        let path = self.path(name);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() => Ok(Some(meta_of(name.to_string(), &m))),
            Ok(m) => Err(Error::NotRegularFile {
                path,
                kind: if m.file_type().is_symlink() {
                    "symbolic link"
                } else {
                    platform::file_kind_name(&m).unwrap_or("directory")
                },
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("inspect", &path, e)),
        }
    }

    fn list(&self, dir: &str, f: &mut dyn FnMut(ObjectMeta) -> Result<()>) -> Result<()> {
        let path = self.path(dir);
        let entries = match std::fs::read_dir(&path) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io("list", &path, e)),
        };
        for e in entries {
            let e = e.ctx("list", &path)?;
            let file_name = e.file_name().to_string_lossy().into_owned();
            if file_name.starts_with(".tmp-") {
                continue;
            }
            // A directory is not an object; anything else is listed, and opening it says
            // what is wrong with it (a link, a FIFO).
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            if m.is_dir() {
                continue;
            }
            let name = if dir.is_empty() {
                file_name
            } else {
                format!("{dir}/{file_name}")
            };
            f(meta_of(name, &m))?;
        }
        Ok(())
    }

    fn local_root(&self) -> Option<&Path> {
        Some(&self.root)
    }
}

impl WriteBackend for LocalDir {
    fn put(&self, name: &str, data: &[u8], mode: PutMode) -> Result<()> {
        let dest = self.path(name);
        if let Some(parent) = dest.parent() {
            // A link planted as a directory of the repository would send the file elsewhere.
            fsio::check_directory(parent)?;
        }
        match mode {
            PutMode::Overwrite => fsio::atomic_write(&dest, data),
            PutMode::ContentNamed => {
                let dir = dest.parent().unwrap_or(&self.root).to_path_buf();
                let tmp = TempFile::create_in(&dir, "")?;
                tmp.file().write_all(data).ctx("write", tmp.path())?;
                let durable = !cfg!(target_os = "linux");
                tmp.persist_content_named(&dest, durable)?;
                self.mark_dirty(&dir);
                Ok(())
            }
        }
    }

    fn delete(&self, name: &str) -> Result<bool> {
        let path = self.path(name);
        match std::fs::remove_file(&path) {
            Ok(()) => {
                if let Some(dir) = path.parent() {
                    platform::sync_dir(dir).ctx("flush directory", dir)?;
                }
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io("remove", &path, e)),
        }
    }

    fn stage(&self) -> Result<Box<dyn Staged>> {
        let tmp = TempFile::create_in(&self.path("tmp"), ".pack")?;
        Ok(Box::new(LocalStaged {
            tmp,
            len: 0,
            dir: self.root.clone(),
            dirty: self.dirty.clone(),
        }))
    }

    fn barrier(&self) -> Result<()> {
        let dirs = std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|p| p.into_inner()));
        if dirs.is_empty() {
            return Ok(());
        }
        let synced = platform::sync_filesystem(&self.root).ctx("flush", &self.root);
        match synced {
            Ok(true) => Ok(()),
            Ok(false) => {
                // Each file was flushed when written; their names need their directories.
                for d in &dirs {
                    platform::sync_dir(d).ctx("flush directory", d)?;
                }
                Ok(())
            }
            Err(e) => {
                self.dirty
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(dirs);
                Err(e)
            }
        }
    }

    fn set_aside(&self, name: &str) -> Result<Option<String>> {
        let path = self.path(name);
        let Some(dest) = fsio::set_aside(&path, name)? else {
            return Ok(None);
        };
        if let Some(dir) = path.parent() {
            platform::sync_dir(dir).ctx("flush directory", dir)?;
        }
        let suffix = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let parent = name.rsplit_once('/').map(|(d, _)| d);
        Ok(Some(match parent {
            Some(d) => format!("{d}/{suffix}"),
            None => suffix,
        }))
    }

    fn open_log(&self, name: &str, mode: LogMode) -> Result<Option<Box<dyn Log>>> {
        let path = self.path(name);
        match mode {
            LogMode::Create => {
                let dir = path.parent().unwrap_or(&self.root);
                fsio::check_directory(dir)?;
                let tmp = TempFile::create_in(dir, ".journal")?;
                tmp.persist(&path, true)?;
            }
            LogMode::Open | LogMode::Read => {}
        }
        let write = mode != LogMode::Read;
        let mut file = match fsio::open_regular(&path, write, "open journal") {
            Ok(f) => f,
            Err(e) if fsio::is_not_found(&e) && mode != LogMode::Create => return Ok(None),
            Err(e) => return Err(e),
        };
        let len = file.seek(SeekFrom::End(0)).ctx("seek", &path)?;
        Ok(Some(Box::new(FileLog { path, file, len })))
    }

    fn lock_exclusive(&self, name: &str, what: &str) -> Result<Box<dyn LockGuard>> {
        let path = self.lock_path(name);
        let file = fsio::lock_file(&path)?;
        if name.starts_with("volume/") {
            // Temporary files left by killed writers go when a backup starts.
            self.sweep_stale()?;
        }
        match file.try_lock() {
            Ok(()) => Ok(Box::new(FileLock { _file: file })),
            Err(std::fs::TryLockError::WouldBlock) => Err(Error::Locked {
                path: self.root.clone(),
                detail: format!("{} is held: {what}", path.display()),
            }),
            Err(std::fs::TryLockError::Error(e)) => Err(Error::io("lock", &path, e)),
        }
    }

    fn lock_held(&self, name: &str) -> Result<bool> {
        let path = self.lock_path(name);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(Error::io("open lock file", &path, e)),
        };
        match file.try_lock_shared() {
            Ok(()) => Ok(false),
            Err(std::fs::TryLockError::WouldBlock) => Ok(true),
            Err(std::fs::TryLockError::Error(e)) => Err(Error::io("lock", &path, e)),
        }
    }

    fn create_marker(&self, id: &str, payload: &[u8]) -> Result<Box<dyn Marker>> {
        let dir = self.path("writers");
        std::fs::create_dir_all(&dir).ctx("create directory", &dir)?;
        fsio::check_directory(&dir)?;
        let path = dir.join(id);
        let file = platform::open_no_follow(&path, true, true)
            .map_err(|e| Error::io("create writer marker", &path, e))?;
        file.lock().ctx("lock", &path)?;
        // A `live_markers` that took the lock between the create and ours removed the name
        // as a dead writer's.
        if !platform::path_names_file(&path, &file).unwrap_or(false) {
            return Err(Error::io(
                "create writer marker",
                &path,
                std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "it disappeared after creation",
                ),
            ));
        }
        let mut marker = FileMarker {
            path,
            file: Some(file),
        };
        marker.write(payload)?;
        platform::sync_dir(&dir).ctx("flush directory", &dir)?;
        Ok(Box::new(marker))
    }

    fn live_markers(&self) -> Result<Vec<(String, Option<Vec<u8>>)>> {
        let dir = self.path("writers");
        let mut names = Vec::new();
        self.list("writers", &mut |m| {
            if let Some(id) = m.name.strip_prefix("writers/") {
                names.push(id.to_string());
            }
            Ok(())
        })?;
        let mut out = Vec::new();
        for id in names {
            let path = dir.join(&id);
            let mut file = match fsio::open_regular(&path, false, "open") {
                Ok(f) => f,
                Err(e) if fsio::is_not_found(&e) => continue,
                Err(e) => return Err(e),
            };
            match file.try_lock() {
                Ok(()) => {
                    // Dead: still the file that was locked (not a new writer's under that
                    // name)?
                    if platform::path_names_file(&path, &file).unwrap_or(false) {
                        match std::fs::remove_file(&path) {
                            Ok(()) => platform::sync_dir(&dir).ctx("flush directory", &dir)?,
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                            Err(e) => return Err(Error::io("remove", &path, e)),
                        }
                    }
                    continue;
                }
                Err(std::fs::TryLockError::WouldBlock) => {}
                Err(std::fs::TryLockError::Error(e)) => return Err(Error::io("lock", &path, e)),
            }
            let mut bytes = Vec::new();
            let read = (&mut file)
                .take(MAX_MARKER_READ)
                .read_to_end(&mut bytes)
                .ctx("read", &path);
            read?;
            out.push((id, Some(bytes)));
        }
        Ok(out)
    }

    fn sweep_stale(&self) -> Result<()> {
        let started = std::time::SystemTime::now();
        for dir in [
            "tmp",
            "journals",
            "",
            "index",
            "pending",
            "snapshots",
            "keys",
        ] {
            fsio::remove_stale_temp_files(&self.path(dir), started);
        }
        Ok(())
    }
}

/// Largest marker read (against hostile files).
const MAX_MARKER_READ: u64 = 17 << 20;

/// A pack being written to `tmp/`.
struct LocalStaged {
    tmp: TempFile,
    len: u64,
    dir: PathBuf,
    /// The backend's directories to sync at the next barrier.
    dirty: Arc<Mutex<BTreeSet<PathBuf>>>,
}

impl Staged for LocalStaged {
    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.tmp
            .file()
            .write_all(bytes)
            .ctx("write", self.tmp.path())?;
        self.len += bytes.len() as u64;
        Ok(())
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn finish(self: Box<Self>, name: &str) -> Result<()> {
        let mut dest = self.dir.clone();
        dest.extend(name.split('/').filter(|c| !c.is_empty()));
        let parent = dest.parent().unwrap_or(&self.dir).to_path_buf();
        // A link planted as a fan-out directory would send the pack elsewhere.
        fsio::check_directory(&parent)?;
        if !cfg!(target_os = "linux") {
            // No syncfs there: each object is flushed on its own.
            self.tmp.file().sync_data().ctx("flush", self.tmp.path())?;
        }
        // Named by its content: an existing object of that name holds these very bytes.
        self.tmp.persist_content_named(&dest, false)?;
        self.dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(parent);
        Ok(())
    }
}

/// A journal file.
struct FileLog {
    path: PathBuf,
    file: File,
    len: u64,
}

impl Log for FileLog {
    fn reader(&mut self) -> Result<Box<dyn Read + '_>> {
        self.file.seek(SeekFrom::Start(0)).ctx("seek", &self.path)?;
        let len = self.len;
        Ok(Box::new((&mut self.file).take(len)))
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn append(&mut self, bytes: &[u8]) -> Result<()> {
        self.file
            .seek(SeekFrom::Start(self.len))
            .ctx("seek", &self.path)?;
        self.file
            .write_all(bytes)
            .ctx("append to journal", &self.path)?;
        self.file.sync_data().ctx("flush journal", &self.path)?;
        self.len += bytes.len() as u64;
        Ok(())
    }

    fn truncate(&mut self, len: u64) -> Result<()> {
        if len < self.len {
            self.file
                .set_len(len)
                .ctx("truncate torn journal", &self.path)?;
            self.file.sync_data().ctx("flush", &self.path)?;
            self.len = len;
        }
        Ok(())
    }

    fn remove(self: Box<Self>) -> Result<()> {
        let FileLog { path, file, .. } = *self;
        drop(file);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("remove journal", &path, e)),
        }
    }
}

/// An exclusive `flock`, released when the file is closed.
#[derive(Debug)]
struct FileLock {
    _file: File,
}

impl LockGuard for FileLock {
    fn check(&self) -> Result<()> {
        Ok(())
    }
}

/// A writer marker file, locked by its writer; removed (while still locked) when dropped.
#[derive(Debug)]
struct FileMarker {
    path: PathBuf,
    file: Option<File>,
}

impl Marker for FileMarker {
    /// Replaces the marker's content (fsynced): a reader of a half-written marker takes it for
    /// a live writer that knows nothing, the safe reading.
    fn write(&mut self, payload: &[u8]) -> Result<()> {
        let Some(mut f) = self.file.as_ref() else {
            return Err(Error::internal("writer marker", "marker already released"));
        };
        f.set_len(0).ctx("write", &self.path)?;
        platform::write_all_at(f, payload, 0).ctx("write", &self.path)?;
        f.flush().ctx("write", &self.path)?;
        f.sync_all().ctx("flush", &self.path)
    }

    fn check(&self) -> Result<()> {
        Ok(())
    }
}

impl Drop for FileMarker {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        self.file.take();
    }
}
