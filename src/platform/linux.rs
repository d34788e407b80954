//! Linux implementation of the platform layer: `pread`/`pwrite`, block-device ioctls,
//! `SEEK_DATA`/`SEEK_HOLE`, `syncfs`, and `/proc/self/mountinfo`.

use super::{Geometry, MountUse, ObjectKind};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

// ioctl numbers from <linux/fs.h>:
//   #define BLKSSZGET  _IO(0x12,104)
//   #define BLKGETSIZE64 _IOR(0x12,114,size_t)
//   #define BLKPBSZGET _IO(0x12,123)
//   #define BLKZEROOUT _IO(0x12,127)
const BLKSSZGET: libc::c_ulong = 0x1268;
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKPBSZGET: libc::c_ulong = 0x127b;
const BLKZEROOUT: libc::c_ulong = 0x127f;

pub fn open_read_only(path: &Path) -> io::Result<File> {
    // O_NONBLOCK: opening a FIFO must not wait for a writer (the caller then refuses it by
    // its kind). Cleared again for the reads that follow.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)?;
    clear_nonblock(&file);
    Ok(file)
}

/// Clears `O_NONBLOCK` on `file` (opened with it only so that the open cannot block).
fn clear_nonblock(file: &File) {
    // SAFETY: fcntl on a descriptor owned by `file` (alive for the calls) with integer
    // arguments only.
    unsafe {
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
}

pub fn open_direct(path: &Path) -> Option<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_DIRECT)
        .open(path)
        .ok()
}

pub fn open_direct_rw(path: &Path) -> Option<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_DIRECT)
        .open(path)
        .ok()
}

pub fn geometry(file: &File) -> io::Result<Geometry> {
    let meta = file.metadata()?;
    let ft = meta.file_type();
    if ft.is_block_device() {
        let fd = file.as_raw_fd();
        let mut size: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 (size_t on 64-bit Linux) through the pointer,
        // which points to a live, properly aligned u64.
        let r = unsafe { libc::ioctl(fd, BLKGETSIZE64, &mut size as *mut u64) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut lss: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int through the pointer to a live c_int.
        let r = unsafe { libc::ioctl(fd, BLKSSZGET, &mut lss as *mut libc::c_int) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut pss: libc::c_uint = 0;
        // SAFETY: BLKPBSZGET writes one unsigned int through the pointer to a live c_uint.
        let r = unsafe { libc::ioctl(fd, BLKPBSZGET, &mut pss as *mut libc::c_uint) };
        if r != 0 {
            pss = lss as u32;
        }
        Ok(Geometry {
            kind: ObjectKind::BlockDevice,
            size,
            logical_sector_size: lss.max(512) as u32,
            physical_sector_size: pss.max(lss as u32).max(512),
        })
    } else {
        Ok(Geometry::of_file(&meta))
    }
}

pub fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    file.read_at(buf, offset)
}

pub fn write_at(file: &File, buf: &[u8], offset: u64) -> io::Result<usize> {
    file.write_at(buf, offset)
}

fn lseek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let off = libc::off_t::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
    // SAFETY: lseek takes a file descriptor owned by `file` (alive for this call) and plain
    // integers; it does not touch memory.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

pub fn next_data(file: &File, offset: u64, end: u64) -> io::Result<Option<(u64, u64)>> {
    if offset >= end {
        return Ok(None);
    }
    if !file.metadata()?.file_type().is_file() {
        return Ok(Some((offset, end)));
    }
    let start = match lseek(file, offset, libc::SEEK_DATA) {
        Ok(Some(s)) => s,
        Ok(None) => return Ok(None),
        // Filesystems without SEEK_DATA support: everything is data.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(Some((offset, end))),
        Err(e) => return Err(e),
    };
    if start >= end {
        return Ok(None);
    }
    let stop = lseek(file, start, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
    Ok(Some((start, stop.max(start))))
}

pub fn sync_filesystem(dir: &Path) -> io::Result<bool> {
    let f = File::open(dir)?;
    // SAFETY: syncfs takes a file descriptor owned by `f`, alive for this call.
    let r = unsafe { libc::syncfs(f.as_raw_fd()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(true)
}

pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Decodes the octal escapes (`\040` for space…) used in `/proc/self/mountinfo`.
fn unescape_mountinfo(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = oct
                    .iter()
                    .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                out.push(v as u8);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One line of `/proc/self/mountinfo` (proc(5)), its fields unescaped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    /// `major:minor` of the mounted device (field 3).
    pub dev: String,
    /// Mount point (field 5).
    pub mount_point: String,
    /// Per-mount options (field 6: `rw,noatime`).
    pub options: String,
    /// Filesystem type, with a FUSE subtype (`fuse.volback`, `ext4`).
    pub fs_type: String,
    /// Mount source (`/dev/loop3`, a file path, `volback`).
    pub source: String,
}

impl MountInfo {
    /// True when the mount is read-only.
    pub fn read_only(&self) -> bool {
        self.options.split(',').any(|o| o == "ro")
    }
}

/// Parses mountinfo text; lines without the `-` separator are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-")?;
            if sep < 6 {
                return None;
            }
            Some(MountInfo {
                dev: fields[2].to_string(),
                mount_point: unescape_mountinfo(fields[4]),
                options: fields[5].to_string(),
                fs_type: unescape_mountinfo(fields.get(sep + 1)?),
                source: unescape_mountinfo(fields.get(sep + 2)?),
            })
        })
        .collect()
}

/// The mount table of this process (`/proc/self/mountinfo`).
pub fn mountinfo() -> io::Result<Vec<MountInfo>> {
    Ok(parse_mountinfo(&std::fs::read_to_string(
        "/proc/self/mountinfo",
    )?))
}

/// What `/sys/block/loopN/loop/backing_file` says for the loop device whose sysfs directory
/// is `sys` (a deleted file keeps its old path followed by ` (deleted)`); `None` when it is
/// not attached.
fn backing_file_text(sys: &Path) -> Option<String> {
    let s = std::fs::read_to_string(sys.join("loop/backing_file")).ok()?;
    Some(s.trim_end_matches('\n').to_string())
}

/// The backing file of loop device `name` (`loop3`), if attached (the path it was attached
/// with, also when that file was deleted since).
pub fn loop_backing_file(name: &str) -> Option<PathBuf> {
    let s = backing_file_text(&Path::new("/sys/block").join(name))?;
    Some(PathBuf::from(s.strip_suffix(" (deleted)").unwrap_or(&s)))
}

fn dev_numbers(rdev: u64) -> (u64, u64) {
    (libc::major(rdev) as u64, libc::minor(rdev) as u64)
}

/// Block devices whose mounting would make writing `dev` unsafe: the device itself and its
/// partitions (from `/sys/dev/block/M:m/`), as `major:minor` strings.
pub fn device_family(rdev: u64) -> Vec<String> {
    let (maj, min) = dev_numbers(rdev);
    let me = format!("{maj}:{min}");
    let mut out = vec![me.clone()];
    let sys = PathBuf::from(format!("/sys/dev/block/{me}"));
    if let Ok(entries) = std::fs::read_dir(&sys) {
        for e in entries.flatten() {
            let devfile = e.path().join("dev");
            if e.path().join("partition").exists()
                && let Ok(s) = std::fs::read_to_string(&devfile)
            {
                out.push(s.trim().to_string());
            }
        }
    }
    // Holders (device-mapper, md) built on this device.
    if let Ok(entries) = std::fs::read_dir(sys.join("holders")) {
        for e in entries.flatten() {
            if let Ok(s) = std::fs::read_to_string(e.path().join("dev")) {
                out.push(s.trim().to_string());
            }
        }
    }
    out
}

/// `LOOP_GET_STATUS64` from <linux/loop.h>: `#define LOOP_GET_STATUS64 0x4C05`, filling a
/// `struct loop_info64`.
const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;

/// `struct loop_info64` of <linux/loop.h>.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// Identity of a loop device's backing file: from the kernel (`LOOP_GET_STATUS64`, which also
/// knows a deleted or renamed file) when the device can be opened, else by `stat` of the path
/// in `/sys/block/loopN/loop/backing_file`.
fn loop_backing_id(sys: &Path, name: &std::ffi::OsStr) -> Option<(u64, u64)> {
    let backing = backing_file_text(sys)?;
    let by_path = || path_id(Path::new(backing.trim_end_matches(" (deleted)"))).ok()?;
    let Ok(dev) = open_read_only(&Path::new("/dev").join(name)) else {
        return by_path();
    };
    let mut info = std::mem::MaybeUninit::<LoopInfo64>::zeroed();
    // SAFETY: LOOP_GET_STATUS64 writes one `struct loop_info64` through the pointer, which
    // points to live, zero-initialised storage of that layout; `dev` is alive for the call.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_GET_STATUS64, info.as_mut_ptr()) };
    if r != 0 {
        return by_path();
    }
    // SAFETY: the ioctl succeeded and filled the structure (all fields are plain integers,
    // valid for any bit pattern; it was zero-initialised anyway).
    let info = unsafe { info.assume_init() };
    // A block device as backing file: identify it by its rdev, as `object_id` does.
    match by_path() {
        Some(id) if id.0 == u64::MAX => Some(id),
        _ => Some((info.lo_device, info.lo_inode)),
    }
}

pub fn loop_backings() -> Vec<((u64, u64), u64)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        if !name.as_bytes().starts_with(b"loop") {
            continue;
        }
        let Some(id) = loop_backing_id(&e.path(), &name) else {
            continue;
        };
        if let Ok(dev) = std::fs::read_to_string(e.path().join("dev"))
            && let Some((a, b)) = dev.trim().split_once(':')
            && let (Ok(a), Ok(b)) = (a.parse::<u32>(), b.parse::<u32>())
        {
            out.push((id, libc::makedev(a, b)));
        }
    }
    out
}

pub fn path_id(path: &Path) -> io::Result<Option<(u64, u64)>> {
    let meta = std::fs::metadata(path)?;
    Ok(Some(if meta.file_type().is_block_device() {
        (u64::MAX, meta.rdev())
    } else {
        (meta.dev(), meta.ino())
    }))
}

pub fn link_count(path: &Path) -> io::Result<Option<u64>> {
    Ok(Some(std::fs::metadata(path)?.nlink()))
}

pub fn mounted_devices() -> io::Result<Vec<(String, MountUse)>> {
    let mut out: Vec<(String, MountUse)> = mountinfo()?
        .into_iter()
        .map(|m| {
            let read_only = m.read_only();
            (
                m.dev,
                MountUse {
                    point: m.mount_point,
                    read_only,
                },
            )
        })
        .collect();
    // Swap areas on block devices are "mounted" too.
    if let Ok(swaps) = std::fs::read_to_string("/proc/swaps") {
        for line in swaps.lines().skip(1) {
            if let Some(dev) = line.split_whitespace().next()
                && let Ok(m) = std::fs::metadata(unescape_mountinfo(dev))
                && m.file_type().is_block_device()
            {
                let (a, b) = dev_numbers(m.rdev());
                out.push((
                    format!("{a}:{b}"),
                    MountUse {
                        point: "swap".into(),
                        read_only: false,
                    },
                ));
            }
        }
    }
    Ok(out)
}

fn dev_string(rdev: u64) -> String {
    let (a, b) = dev_numbers(rdev);
    format!("{a}:{b}")
}

fn parse_dev(s: &str) -> Option<u64> {
    let (a, b) = s.trim().split_once(':')?;
    Some(libc::makedev(a.parse().ok()?, b.parse().ok()?))
}

/// The whole device and the partition number of a partition (from `/sys/dev/block/M:m/`).
fn partition_of(rdev: u64) -> Option<(u64, String)> {
    let sys = PathBuf::from(format!("/sys/dev/block/{}", dev_string(rdev)));
    let number = std::fs::read_to_string(sys.join("partition")).ok()?;
    let parent = parse_dev(&std::fs::read_to_string(sys.join("../dev")).ok()?)?;
    Some((parent, number.trim().to_string()))
}

/// `major:minor` of partition `number` of the whole device `rdev`, if it has one.
fn partition_numbered(rdev: u64, number: &str) -> Option<String> {
    let sys = PathBuf::from(format!("/sys/dev/block/{}", dev_string(rdev)));
    std::fs::read_dir(&sys).ok()?.flatten().find_map(|e| {
        let n = std::fs::read_to_string(e.path().join("partition")).ok()?;
        (n.trim() == number)
            .then(|| std::fs::read_to_string(e.path().join("dev")).ok())
            .flatten()
            .map(|d| d.trim().to_string())
    })
}

pub fn mount_point_of(path: &Path) -> io::Result<Option<MountUse>> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let id = if meta.file_type().is_block_device() {
        (u64::MAX, meta.rdev())
    } else {
        (meta.dev(), meta.ino())
    };
    let mut family: Vec<String> = Vec::new();
    let loops = loop_backings();
    if meta.file_type().is_block_device() {
        family.extend(device_family(meta.rdev()));
        // A loop device: every other loop device over the same backing file writes the same
        // bytes, so its mounts count too.
        if let Some((backing, _)) = loops.iter().find(|(_, dev)| *dev == meta.rdev()) {
            for (other, dev) in &loops {
                if other == backing {
                    family.extend(device_family(*dev));
                }
            }
        }
        // A partition: a filesystem on its whole device covers it, and so does the same
        // partition of another loop device over the same backing file.
        if let Some((parent, number)) = partition_of(meta.rdev()) {
            family.push(dev_string(parent));
            if let Some((backing, _)) = loops.iter().find(|(_, dev)| *dev == parent) {
                for (other, dev) in &loops {
                    if other == backing && *dev != parent {
                        family.push(dev_string(*dev));
                        family.extend(partition_numbered(*dev, &number));
                    }
                }
            }
        }
    }
    if meta.file_type().is_file() || meta.file_type().is_block_device() {
        // Loop devices over this file or device (compared by identity: a hard link or a
        // renamed path is the same file).
        for (backing, dev) in &loops {
            if *backing == id {
                family.extend(device_family(*dev));
            }
        }
    }
    if !family.is_empty() {
        for (dev, mount) in mounted_devices()? {
            if family.contains(&dev) {
                return Ok(Some(mount));
            }
        }
    }
    // Swap files and devices in use, by identity.
    if let Ok(swaps) = std::fs::read_to_string("/proc/swaps") {
        for line in swaps.lines().skip(1) {
            if let Some(dev) = line.split_whitespace().next()
                && path_id(Path::new(&unescape_mountinfo(dev))).ok().flatten() == Some(id)
            {
                return Ok(Some(MountUse {
                    point: "swap".into(),
                    read_only: false,
                }));
            }
        }
    }
    Ok(None)
}

pub fn open_no_follow(path: &Path, write: bool, create: bool) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(write)
        .create(create)
        .mode(0o644)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    if file.metadata()?.file_type().is_file() {
        clear_nonblock(&file);
    }
    Ok(file)
}

pub fn file_kind_name(meta: &std::fs::Metadata) -> Option<&'static str> {
    let ft = meta.file_type();
    Some(if ft.is_file() {
        return None;
    } else if ft.is_fifo() {
        "FIFO"
    } else if ft.is_symlink() {
        "symbolic link"
    } else if ft.is_dir() {
        "directory"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_block_device() {
        "block device"
    } else if ft.is_char_device() {
        "character device"
    } else {
        "special file"
    })
}

pub fn path_names_file(path: &Path, file: &File) -> io::Result<bool> {
    let a = std::fs::symlink_metadata(path)?;
    let b = file.metadata()?;
    Ok(a.dev() == b.dev() && a.ino() == b.ino())
}

pub fn object_id(file: &File) -> io::Result<(u64, u64)> {
    let meta = file.metadata()?;
    if meta.file_type().is_block_device() {
        Ok((u64::MAX, meta.rdev()))
    } else {
        Ok((meta.dev(), meta.ino()))
    }
}

/// The write counters of the block device whose sysfs directory is `dir`: writes completed,
/// sectors written, discards completed and sectors discarded (fields 5, 7, 12 and 14 of
/// `stat`, see the kernel's Documentation/block/stat.rst), then for a loop device the identity
/// and times of its backing file.
fn device_write_counters(dir: &Path, out: &mut Vec<u8>) -> io::Result<()> {
    let stat = std::fs::read_to_string(dir.join("stat"))?;
    let fields: Vec<&str> = stat.split_whitespace().collect();
    for i in [4usize, 6, 11, 13] {
        let v = fields.get(i).and_then(|f| f.parse::<u64>().ok());
        out.extend_from_slice(&v.unwrap_or(u64::MAX).to_le_bytes());
    }
    if let Some(backing) = backing_file_text(dir) {
        let backing = backing.as_str();
        out.extend_from_slice(backing.as_bytes());
        out.push(0);
        if let Ok(m) = std::fs::metadata(backing) {
            file_markers(&m, out);
        }
    }
    Ok(())
}

fn file_markers(m: &std::fs::Metadata, out: &mut Vec<u8>) {
    for v in [
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime() as u64,
        m.mtime_nsec() as u64,
        m.ctime() as u64,
        m.ctime_nsec() as u64,
    ] {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

pub fn write_markers(file: &File) -> io::Result<Option<super::WriteMarkers>> {
    let meta = file.metadata()?;
    let ft = meta.file_type();
    let mut bytes = Vec::new();
    if ft.is_file() {
        file_markers(&meta, &mut bytes);
        return Ok(Some(super::WriteMarkers {
            what: "file identity, size, modification and change times".into(),
            bytes,
        }));
    }
    if !ft.is_block_device() {
        return Ok(None);
    }
    let (maj, min) = dev_numbers(meta.rdev());
    let sys = PathBuf::from(format!("/sys/dev/block/{maj}:{min}"));
    let Ok(dir) = std::fs::canonicalize(&sys) else {
        return Ok(None);
    };
    bytes.extend_from_slice(&meta.rdev().to_le_bytes());
    if device_write_counters(&dir, &mut bytes).is_err() {
        return Ok(None);
    }
    let mut what = format!("write counters of {}", dir.display());
    // A partition: writes to the disk beside it (its partition table, other partitions or
    // the whole-disk device) show in the disk's counters.
    if dir.join("partition").exists()
        && let Some(parent) = dir.parent()
    {
        if device_write_counters(parent, &mut bytes).is_err() {
            return Ok(None);
        }
        what.push_str(" and its disk");
    }
    Ok(Some(super::WriteMarkers { what, bytes }))
}

pub fn zero_range(file: &File, offset: u64, len: u64) -> io::Result<bool> {
    if len == 0 {
        return Ok(true);
    }
    let meta = file.metadata()?;
    if meta.file_type().is_block_device() {
        let range: [u64; 2] = [offset, len];
        // SAFETY: BLKZEROOUT reads a `uint64_t[2]` {start, length} through the pointer, which
        // points to a live array of two u64.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKZEROOUT, range.as_ptr()) };
        return Ok(r == 0);
    }
    let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Ok(false);
    };
    // SAFETY: fallocate takes a descriptor owned by `file` and plain integers.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            l,
        )
    };
    Ok(r == 0)
}

pub fn prefetch(file: &File, offset: u64, len: u64) {
    let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return;
    };
    // SAFETY: posix_fadvise takes a descriptor owned by `file` and plain integers; it only
    // schedules read-ahead.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), off, l, libc::POSIX_FADV_WILLNEED);
    }
}

pub fn advise_huge_pages(buf: &mut [u8]) {
    // SAFETY: the range is memory this process owns exclusively (`&mut`); MADV_HUGEPAGE only
    // changes how the kernel backs it, never its contents.
    unsafe {
        libc::madvise(buf.as_mut_ptr().cast(), buf.len(), libc::MADV_HUGEPAGE);
    }
}

pub fn bound_allocator() {
    #[cfg(target_env = "gnu")]
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
        // SAFETY: mallopt only changes allocator parameters; called before other threads run.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        }
    }
}

pub fn in_device_namespace(path: &Path) -> bool {
    path.starts_with("/dev")
}

pub fn process_gone(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists; no signal is sent.
    let r = unsafe { libc::kill(pid, 0) };
    r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into the live buffer.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    if r != 0 {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// A Unix-domain listening socket that removes its socket file when dropped.
pub struct LocalListener {
    inner: std::os::unix::net::UnixListener,
    path: PathBuf,
    /// Device and inode of the socket file this listener created.
    id: (u64, u64),
}

impl LocalListener {
    pub fn bind(path: &Path) -> io::Result<LocalListener> {
        use std::os::unix::net::{UnixListener, UnixStream};
        let inner = match UnixListener::bind(path) {
            Ok(l) => l,
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                let meta = std::fs::symlink_metadata(path)?;
                if !meta.file_type().is_socket() {
                    return Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        "the path exists and is not a socket",
                    ));
                }
                match UnixStream::connect(path) {
                    Ok(_) => {
                        return Err(io::Error::new(
                            io::ErrorKind::AddrInUse,
                            "another server is listening on this socket",
                        ));
                    }
                    Err(c) if c.kind() == io::ErrorKind::ConnectionRefused => {
                        // A socket file left behind by a server that is gone.
                        std::fs::remove_file(path)?;
                        UnixListener::bind(path)?
                    }
                    Err(c) => return Err(c),
                }
            }
            Err(e) => return Err(e),
        };
        let meta = std::fs::symlink_metadata(path)?;
        Ok(LocalListener {
            inner,
            path: path.to_path_buf(),
            id: (meta.dev(), meta.ino()),
        })
    }

    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        self.inner.set_nonblocking(nonblocking)
    }

    pub fn accept(&self) -> io::Result<LocalStream> {
        self.inner.accept().map(|(s, _)| LocalStream(s))
    }
}

impl Drop for LocalListener {
    fn drop(&mut self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path)
            && (meta.dev(), meta.ino()) == self.id
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// One connection on a [`LocalListener`].
pub struct LocalStream(std::os::unix::net::UnixStream);

impl LocalStream {
    pub fn try_clone(&self) -> io::Result<LocalStream> {
        self.0.try_clone().map(LocalStream)
    }

    pub fn shutdown(&self, how: std::net::Shutdown) -> io::Result<()> {
        self.0.shutdown(how)
    }

    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        self.0.set_nonblocking(nonblocking)
    }

    pub fn set_read_timeout(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        self.0.set_read_timeout(t)
    }
}

impl io::Read for LocalStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        io::Read::read(&mut self.0, buf)
    }
}

impl io::Write for LocalStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        io::Write::write(&mut self.0, buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        io::Write::flush(&mut self.0)
    }
}

/// EIO (the block layer's "medium error"), ENODATA and EBADMSG (what some drivers and
/// filesystems return for unreadable or corrupt data), EILSEQ.
pub fn is_media_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EIO | libc::ENODATA | libc::EBADMSG | libc::EILSEQ)
    )
}

pub fn open_device_for_overwrite(path: &Path) -> io::Result<File> {
    super::open_write_existing(path)
}

/// Whole block devices of /sys/block (loop devices with nothing attached left out), with
/// their sizes.
pub fn list_devices() -> Vec<(String, u64)> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut found: Vec<(String, u64)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let sectors: u64 = std::fs::read_to_string(e.path().join("size"))
                .ok()?
                .trim()
                .parse()
                .ok()?;
            (sectors > 0).then(|| (format!("/dev/{name}"), sectors * 512))
        })
        .collect();
    found.sort();
    found
}
