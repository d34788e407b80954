//! The operating-system layer: everything that differs between Linux and Windows.
//!
//! The rest of the library calls only the functions re-exported here. Each platform is one
//! module, selected once at the `mod` line below; Windows is a second implementation of the
//! same functions, not `cfg` attributes spread through the code.

use std::fs::File;
use std::io;
use std::path::Path;

/// Running a user's command through the platform shell (`--password-command`).
pub mod shell;

/// Windows device paths and ioctl output buffers, parsed (compiled everywhere, so that the
/// Linux test suite tests the parsers).
pub mod windevice;

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "linux")]
use linux as imp;

/// The mount table and loop devices: Linux only (FUSE views and `mount` run there).
#[cfg(target_os = "linux")]
pub use linux::{MountInfo, loop_backing_file, mountinfo, parse_mountinfo};

#[cfg(windows)]
mod windows;
#[cfg(windows)]
use windows as imp;

/// What kind of object a source path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    RegularFile,
    BlockDevice,
    Other,
}

/// Geometry of an opened volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub kind: ObjectKind,
    /// Size in bytes (`BLKGETSIZE64` for a device, the file length otherwise).
    pub size: u64,
    /// Logical sector size (`BLKSSZGET`), 512 for files.
    pub logical_sector_size: u32,
    /// Physical sector size (`BLKPBSZGET`), 4096 for files.
    pub physical_sector_size: u32,
}

impl Geometry {
    /// A regular file's (or other non-device object's) geometry: its length, 512-byte
    /// logical and 4096-byte physical sectors.
    fn of_file(meta: &std::fs::Metadata) -> Geometry {
        Geometry {
            kind: if meta.is_file() {
                ObjectKind::RegularFile
            } else {
                ObjectKind::Other
            },
            size: meta.len(),
            logical_sector_size: 512,
            physical_sector_size: 4096,
        }
    }
}

/// Opens `path` for reading only, without waiting on a FIFO. Never opens a source for
/// writing.
pub fn open_read_only(path: &Path) -> io::Result<File> {
    imp::open_read_only(path)
}

/// Opens `path` read-only bypassing the page cache (`O_DIRECT`), for large sequential reads
/// into [`crate::buffer::AlignedBuf`]s. `None` where the platform or filesystem cannot.
pub fn open_direct(path: &Path) -> Option<File> {
    imp::open_direct(path)
}

/// Opens an existing `path` for reading and writing with `O_DIRECT`; `None` where the platform
/// or filesystem cannot.
pub fn open_direct_rw(path: &Path) -> Option<File> {
    imp::open_direct_rw(path)
}

/// Opens `path` for writing (and reading back) without truncating or creating it (a device or
/// an existing file).
pub fn open_write_existing(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
}

/// Opens a block device that a restore (or `ptable restore`) overwrites. On Windows
/// (experimental) the disk or volume of the running Windows is refused, and a volume is locked
/// and dismounted first (the lock lasts as long as the handle).
pub fn open_device_for_overwrite(path: &Path) -> io::Result<File> {
    imp::open_device_for_overwrite(path)
}

/// The disks and volumes of the machine (`/dev/sda`…; `\\.\PhysicalDriveN` and `\\.\X:`
/// on Windows) with their sizes in bytes, for `volback probe` without an argument.
pub fn list_devices() -> Vec<(String, u64)> {
    imp::list_devices()
}

/// Opens a file of a repository without following a symbolic link in the last component of
/// `path` and without blocking on a FIFO or device (`O_NOFOLLOW | O_NONBLOCK` on Linux; the
/// descriptor is switched back to blocking mode after the open). `create` creates a missing
/// file (never truncating an existing one). Callers check that the result is a regular file
/// ([`file_kind_name`]). A symbolic link fails with [`io::ErrorKind`] `FilesystemLoop` on Linux;
/// on Windows the link (or other reparse point) itself is opened, and is not a regular file.
pub fn open_no_follow(path: &Path, write: bool, create: bool) -> io::Result<File> {
    imp::open_no_follow(path, write, create)
}

/// `None` for a regular file; otherwise what it is ("FIFO", "symbolic link", "directory",
/// "socket", "block device", "character device"), for messages.
pub fn file_kind_name(meta: &std::fs::Metadata) -> Option<&'static str> {
    imp::file_kind_name(meta)
}

/// True when `path` names the very file `file` has open (same device and inode); `true` where
/// the platform cannot tell.
pub fn path_names_file(path: &Path, file: &File) -> io::Result<bool> {
    imp::path_names_file(path, file)
}

/// The identity of whatever `path` names after following symbolic links: `(device, inode)` for
/// a file or directory, `(u64::MAX, rdev)` for a block device (the same as [`object_id`]).
/// `None` where the platform has no such identity.
pub fn path_id(path: &Path) -> io::Result<Option<(u64, u64)>> {
    imp::path_id(path)
}

/// The number of names (hard links) of the file `path` names after following symbolic links;
/// `None` where the platform cannot tell (callers then assume it may have others).
pub fn link_count(path: &Path) -> io::Result<Option<u64>> {
    imp::link_count(path)
}

/// Identities (as [`object_id`]) of the files backing the loop devices of the machine, with the
/// `major:minor` of each loop device. A backing file that was deleted or renamed is still
/// recognised by its inode where the kernel reports it (`LOOP_GET_STATUS64`).
pub fn loop_backings() -> Vec<((u64, u64), u64)> {
    imp::loop_backings()
}

/// `major:minor` strings of the block devices that are mounted or used as swap, with where.
pub fn mounted_devices() -> io::Result<Vec<(String, MountUse)>> {
    imp::mounted_devices()
}

/// `major:minor` strings of a block device, its partitions and its holders (device-mapper, md).
pub fn device_family(rdev: u64) -> Vec<String> {
    imp::device_family(rdev)
}

/// Size, kind and sector sizes of an opened file or device.
pub fn geometry(file: &File) -> io::Result<Geometry> {
    imp::geometry(file)
}

/// Reads up to `buf.len()` bytes at `offset`; returns the count (0 at end of file).
pub fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    imp::read_at(file, buf, offset)
}

/// Fills `buf` from `offset` as far as the file goes (pread on Unix, seek_read on Windows),
/// retrying reads interrupted by a signal; returns the bytes read, fewer than `buf.len()` only
/// when the file ends first.
pub fn read_up_to_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match imp::read_at(file, &mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Reads exactly `buf.len()` bytes at `offset`, retrying reads interrupted by a signal. A file
/// that ends first gives [`io::ErrorKind::UnexpectedEof`], whose message says where it ended.
pub fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let n = read_up_to_at(file, buf, offset)?;
    if n < buf.len() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "the file ends at byte {}, {} bytes short of the {} wanted at offset {offset}",
                offset + n as u64,
                buf.len() - n,
                buf.len()
            ),
        ));
    }
    Ok(())
}

/// Writes all of `buf` at `offset`.
pub fn write_all_at(file: &File, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        let n = imp::write_at(file, buf, offset)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "write returned 0"));
        }
        buf = &buf[n..];
        offset += n as u64;
    }
    Ok(())
}

/// The next range of `file` at or after `offset` that may hold data, below `end`.
/// `None` when only holes remain. Files without hole support report everything as data.
pub fn next_data(file: &File, offset: u64, end: u64) -> io::Result<Option<(u64, u64)>> {
    imp::next_data(file, offset, end)
}

/// Makes every file written so far on the filesystem holding `dir` durable.
/// Returns `false` when the platform cannot do this in one call (then callers fsync files).
pub fn sync_filesystem(dir: &Path) -> io::Result<bool> {
    imp::sync_filesystem(dir)
}

/// Makes a directory entry change (create, rename, unlink) in `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    imp::sync_dir(dir)
}

/// Where a volume is in use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountUse {
    /// Mount point ("swap" for an active swap area).
    pub point: String,
    pub read_only: bool,
}

/// If the device or file at `path` (or a partition of it, or a loop device over it) is
/// mounted or used as swap, where and how.
pub fn mount_point_of(path: &Path) -> io::Result<Option<MountUse>> {
    imp::mount_point_of(path)
}

/// An identifier of the object behind an open file (device and inode, or rdev for devices),
/// so that two paths can be recognised as the same volume.
pub fn object_id(file: &File) -> io::Result<(u64, u64)> {
    imp::object_id(file)
}

/// What the platform can tell about writes to a source since some earlier moment: a short
/// description and opaque bytes that change whenever the source is written (see
/// [`crate::source_state`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteMarkers {
    /// What the bytes are made of ("file identity, size, mtime and ctime", ...).
    pub what: String,
    pub bytes: Vec<u8>,
}

/// The write markers of the source open as `file`: for a regular file its identity, size,
/// modification and change times; for a block device its write counters (and those of its
/// parent disk, and the backing file of a loop device). `None` when the platform cannot tell
/// (then an interrupted run on this source is never resumed).
pub fn write_markers(file: &File) -> io::Result<Option<WriteMarkers>> {
    imp::write_markers(file)
}

/// Zeroes `len` bytes at `offset` of a block device or file as cheaply as the platform can
/// (discard-free zeroing on Linux devices, hole punching on files); falls back to writes.
pub fn zero_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    if imp::zero_range(file, offset, len)? {
        return Ok(());
    }
    let zeros = vec![0u8; (1 << 20).min(len as usize).max(1)];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        write_all_at(file, &zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Deallocates `[offset, offset+len)` of a regular file so that it reads as zeros, when the
/// platform and filesystem can do it without writing (hole punching). Returns `false` (and
/// changes nothing) where they cannot; callers then write zeros themselves or live with the
/// old bytes.
pub fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<bool> {
    imp::zero_range(file, offset, len)
}

/// Tells the kernel that `[offset, offset+len)` of `file` will be read soon, so that it reads
/// ahead asynchronously (the access pattern of a map-driven backup defeats plain read-ahead).
/// A hint only: errors are ignored.
pub fn prefetch(file: &File, offset: u64, len: u64) {
    imp::prefetch(file, offset, len)
}

/// Tells the system that `buf` (page-aligned) is large, short-lived working memory that
/// transparent huge pages may back: fewer page faults for a big scratch area such as the key
/// derivation's. A hint only: errors are ignored, and other systems do nothing.
pub fn advise_huge_pages(buf: &mut [u8]) {
    imp::advise_huge_pages(buf)
}

/// Bounds what the memory allocator keeps: allocations of 4 MiB and more (packs being
/// uploaded, read windows, decoded packs) get their own mapping and go back to the system when
/// freed. glibc's default raises that threshold after the first such free, after which 16 MiB
/// buffers freed by one thread stay in its arena: a backup to object storage peaked 80 MiB
/// higher. Called once by the binary at start; a `MALLOC_MMAP_THRESHOLD_` set by the user wins.
pub fn bound_allocator() {
    imp::bound_allocator()
}

/// A listening local (Unix-domain) stream socket bound to a path, and its connections.
/// [`LocalListener::bind`] replaces a stale socket file (nobody listening) but never another
/// kind of file or a live socket; dropping the listener removes the socket file if it is
/// still the one it created. Windows builds return an "unsupported" error from `bind`.
pub use imp::{LocalListener, LocalStream};

/// True when `e` says the medium could not deliver the data (a bad sector), as opposed to a
/// device that went away or a programming error: such reads are retried sector by sector.
pub fn is_media_error(e: &io::Error) -> bool {
    imp::is_media_error(e)
}

/// Whether `path` names an entry of the system's device namespace (`/dev` on Linux, `\\.\`
/// on Windows): a path there that does not exist is a device that is absent, never a file to
/// create.
pub fn in_device_namespace(path: &Path) -> bool {
    imp::in_device_namespace(path)
}

/// A point-in-time copy of a volume that a backup reads instead of the live volume (a VSS
/// shadow copy on Windows). Dropping it deletes it; [`ShadowCopy::delete`] does so and says
/// whether that worked.
pub trait ShadowCopy {
    /// The device to read: `\\?\GLOBALROOT\Device\HarddiskVolumeShadowCopyN`.
    fn device_path(&self) -> &Path;
    /// The volume it is a copy of (`\\.\C:`).
    fn volume(&self) -> &str;
    /// Deletes it now.
    fn delete(self: Box<Self>) -> io::Result<()>;
}

/// The error of platforms without VSS.
#[cfg(not(windows))]
fn no_vss() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "VSS shadow copies need Windows Vista+ with the VSS service; not available here \
         (back up an unmounted or read-only volume, or a snapshot of it, with --snapshot none)",
    )
}

/// Refuses, with the reason, a `backup --snapshot vss` source of which no shadow copy can be
/// taken, before anything is done: everything on platforms without VSS; on Windows a file, a
/// whole disk or a shadow copy (only volumes, `\\.\X:` or `\\?\Volume{GUID}`, are copied).
#[cfg(windows)]
pub fn check_shadow_copy_source(source: &Path) -> io::Result<()> {
    imp::check_shadow_copy_source(source)
}

/// Refuses, with the reason, a `backup --snapshot vss` source of which no shadow copy can be
/// taken, before anything is done: everything on platforms without VSS; on Windows a file, a
/// whole disk or a shadow copy (only volumes, `\\.\X:` or `\\?\Volume{GUID}`, are copied).
#[cfg(not(windows))]
pub fn check_shadow_copy_source(_source: &Path) -> io::Result<()> {
    Err(no_vss())
}

/// Takes a shadow copy of the volume `source` names (**experimental**, Windows only: see
/// docs/WINDOWS.md): an `Unsupported` error elsewhere, and where VSS does not work (wine).
#[cfg(windows)]
pub fn take_shadow_copy(source: &Path) -> io::Result<Box<dyn ShadowCopy>> {
    imp::take_shadow_copy(source)
}

/// Takes a shadow copy of the volume `source` names (**experimental**, Windows only: see
/// docs/WINDOWS.md): an `Unsupported` error elsewhere, and where VSS does not work (wine).
#[cfg(not(windows))]
pub fn take_shadow_copy(_source: &Path) -> io::Result<Box<dyn ShadowCopy>> {
    Err(no_vss())
}

/// The filesystem the system has mounted on the volume `path` names, and whether read-only:
/// on Windows for `\\.\X:` and `\\?\Volume{GUID}` ("NTFS", "FAT32", "ReFS" …); `None`
/// otherwise (Linux answers through [`mount_point_of`]).
#[cfg(windows)]
pub fn mounted_filesystem(path: &Path) -> Option<(String, bool)> {
    imp::mounted_filesystem(path)
}

/// The filesystem the system has mounted on the volume `path` names, and whether read-only:
/// on Windows for `\\.\X:` and `\\?\Volume{GUID}` ("NTFS", "FAT32", "ReFS" …); `None`
/// otherwise (Linux answers through [`mount_point_of`]).
#[cfg(not(windows))]
pub fn mounted_filesystem(_path: &Path) -> Option<(String, bool)> {
    None
}

/// The cluster bitmap the system keeps for an open volume (Windows:
/// `FSCTL_GET_VOLUME_BITMAP`, **experimental**): one bit a cluster from cluster 0, least
/// significant bit first, and the number of clusters. `None` where the platform has no such
/// call or `file` is a regular file.
#[cfg(windows)]
pub fn volume_bitmap(file: &File) -> io::Result<Option<(Vec<u8>, u64)>> {
    imp::volume_bitmap(file)
}

/// The cluster bitmap the system keeps for an open volume (Windows:
/// `FSCTL_GET_VOLUME_BITMAP`, **experimental**): one bit a cluster from cluster 0, least
/// significant bit first, and the number of clusters. `None` where the platform has no such
/// call or `file` is a regular file.
#[cfg(not(windows))]
pub fn volume_bitmap(_file: &File) -> io::Result<Option<(Vec<u8>, u64)>> {
    Ok(None)
}

/// The machine's host name, for snapshot metadata.
pub fn hostname() -> String {
    imp::hostname()
}

/// True when no process with id `pid` runs on this machine (false when unsure).
pub fn process_gone(pid: u32) -> bool {
    imp::process_gone(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(not(windows))]
    #[test]
    fn shadow_copies_are_refused_without_vss() {
        let p = Path::new(r"\\.\C:");
        for e in [
            check_shadow_copy_source(p).unwrap_err(),
            take_shadow_copy(p).err().expect("no VSS here"),
        ] {
            assert_eq!(e.kind(), io::ErrorKind::Unsupported);
            assert!(
                e.to_string().contains("VSS shadow copies need Windows"),
                "{e}"
            );
        }
        assert_eq!(mounted_filesystem(p), None);
        let f = File::open(std::env::current_exe().unwrap()).unwrap();
        assert!(volume_bitmap(&f).unwrap().is_none());
    }

    #[test]
    fn file_identity_follows_the_file_not_the_name() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::write(&a, b"a").unwrap();
        let file = File::open(&a).unwrap();
        assert!(path_names_file(&a, &file).unwrap());
        let id = path_id(&a)
            .unwrap()
            .expect("a regular file has an identity");
        assert_eq!(object_id(&file).unwrap(), id);
        assert_eq!(link_count(&a).unwrap(), Some(1));
        // A second name of the same file.
        let b = dir.path().join("b");
        std::fs::hard_link(&a, &b).unwrap();
        assert_eq!(path_id(&b).unwrap(), Some(id));
        assert_eq!(link_count(&a).unwrap(), Some(2));
        // Another file under the first name (renamed away: removing an open file is not
        // immediate everywhere).
        std::fs::rename(&a, dir.path().join("c")).unwrap();
        std::fs::write(&a, b"other").unwrap();
        assert!(!path_names_file(&a, &file).unwrap());
        assert_ne!(path_id(&a).unwrap(), Some(id));
        // A directory has an identity too.
        assert!(path_id(dir.path()).unwrap().is_some());
    }

    #[test]
    fn write_markers_of_a_file_change_when_it_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"one").unwrap();
        let before = write_markers(&File::open(&p).unwrap()).unwrap().unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"two"))
            .unwrap();
        let after = write_markers(&File::open(&p).unwrap()).unwrap().unwrap();
        assert_ne!(before.bytes, after.bytes);
    }
}
