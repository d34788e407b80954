//! Windows implementation of the platform layer. Image files are fully supported through the
//! standard library; raw disks and volumes (`\\.\PhysicalDriveN`, `\\.\C:`) go through
//! [`device`], VSS shadow copies through [`vss`] (both experimental: never run on real
//! Windows). Hole queries are future work, so files are read as fully allocated and repository
//! durability relies on per-file flushes.
//!
//! File identity (volume serial number and file index, the Windows counterpart of device and
//! inode) and the link count come from `GetFileInformationByHandle`, declared below: the
//! standard library's accessors for them are unstable.

mod device;
mod vss;

use super::{Geometry, MountUse, ObjectKind};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::windows::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::windows::io::AsRawHandle;
use std::path::Path;

/// `FILE_FLAG_OPEN_REPARSE_POINT`: open a symbolic link (or other reparse point) itself.
const FILE_FLAG_OPEN_REPARSE_POINT: u32 = 0x0020_0000;
/// `FILE_FLAG_BACKUP_SEMANTICS`: needed to open a directory handle.
const FILE_FLAG_BACKUP_SEMANTICS: u32 = 0x0200_0000;
/// `FILE_ATTRIBUTE_REPARSE_POINT`.
const FILE_ATTRIBUTE_REPARSE_POINT: u32 = 0x0400;

/// `FILETIME`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FileTime {
    low: u32,
    high: u32,
}

/// `BY_HANDLE_FILE_INFORMATION` of <fileapi.h>.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct ByHandleFileInformation {
    file_attributes: u32,
    creation_time: FileTime,
    last_access_time: FileTime,
    last_write_time: FileTime,
    volume_serial_number: u32,
    file_size_high: u32,
    file_size_low: u32,
    number_of_links: u32,
    file_index_high: u32,
    file_index_low: u32,
}

/// `FILE_BASIC_INFO` of <winbase.h> (for its `ChangeTime`, which std does not expose).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FileBasicInfo {
    creation_time: i64,
    last_access_time: i64,
    last_write_time: i64,
    change_time: i64,
    file_attributes: u32,
}

/// `FileBasicInfo` of the `FILE_INFO_BY_HANDLE_CLASS` enumeration.
const FILE_BASIC_INFO_CLASS: i32 = 0;

#[link(name = "kernel32")]
unsafe extern "system" {
    fn GetFileInformationByHandle(
        file: *mut std::ffi::c_void,
        info: *mut ByHandleFileInformation,
    ) -> i32;
    fn GetFileInformationByHandleEx(
        file: *mut std::ffi::c_void,
        class: i32,
        info: *mut std::ffi::c_void,
        size: u32,
    ) -> i32;
}

/// `GetFileInformationByHandle` of an open file or directory.
fn handle_info(file: &File) -> io::Result<ByHandleFileInformation> {
    let mut info = ByHandleFileInformation::default();
    // SAFETY: the handle is owned by `file`, alive for the call; the function writes one
    // BY_HANDLE_FILE_INFORMATION (whose layout `ByHandleFileInformation` reproduces) through
    // the pointer to live, initialised storage.
    let r = unsafe { GetFileInformationByHandle(file.as_raw_handle(), &mut info) };
    if r == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info)
}

/// The change time (`FILE_BASIC_INFO.ChangeTime`: any change of data or metadata) of an open
/// file.
fn change_time(file: &File) -> io::Result<i64> {
    let mut info = FileBasicInfo::default();
    // SAFETY: the handle is owned by `file`, alive for the call; the function writes at most
    // `size` bytes (one FILE_BASIC_INFO, whose layout `FileBasicInfo` reproduces) through the
    // pointer to live, initialised storage of that size.
    let r = unsafe {
        GetFileInformationByHandleEx(
            file.as_raw_handle(),
            FILE_BASIC_INFO_CLASS,
            (&mut info as *mut FileBasicInfo).cast(),
            std::mem::size_of::<FileBasicInfo>() as u32,
        )
    };
    if r == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info.change_time)
}

/// (volume serial number, file index): what identifies a file on Windows.
fn identity(info: &ByHandleFileInformation) -> (u64, u64) {
    (
        u64::from(info.volume_serial_number),
        (u64::from(info.file_index_high) << 32) | u64::from(info.file_index_low),
    )
}

/// Opens `path` for querying its attributes only (no read or write access, every sharing
/// mode), directories included; `follow` false opens a symbolic link itself.
fn open_for_query(path: &Path, follow: bool) -> io::Result<File> {
    let mut flags = FILE_FLAG_BACKUP_SEMANTICS;
    if !follow {
        flags |= FILE_FLAG_OPEN_REPARSE_POINT;
    }
    OpenOptions::new()
        .access_mode(0)
        .share_mode(0x7) // FILE_SHARE_READ | FILE_SHARE_WRITE | FILE_SHARE_DELETE
        .custom_flags(flags)
        .open(path)
}

/// A path in the device namespace must name a disk, a volume or a shadow copy
/// (`\\.\PhysicalDriveN`, `\\.\X:`, `\\?\Volume{GUID}`,
/// `\\?\GLOBALROOT\Device\HarddiskVolumeShadowCopyN`): anything else there is refused with the
/// reason. A live volume is opened sharing reads and writes (others keep using it).
pub fn open_read_only(path: &Path) -> io::Result<File> {
    if in_device_namespace(path) {
        device::device_path(path)?;
    }
    OpenOptions::new().read(true).open(path)
}

/// A VSS shadow copy of the volume `source` names (`\\.\X:` or `\\?\Volume{GUID}`).
pub fn take_shadow_copy(source: &Path) -> io::Result<Box<dyn super::ShadowCopy>> {
    Ok(Box::new(vss::take(source)?))
}

/// Refuses, with the reason, a source of which no shadow copy can be taken (a file, a whole
/// disk, a shadow copy), without taking one.
pub fn check_shadow_copy_source(source: &Path) -> io::Result<()> {
    vss::volume_name(source).map(|_| ())
}

#[link(name = "kernel32")]
unsafe extern "system" {
    #[allow(clippy::too_many_arguments)]
    fn GetVolumeInformationW(
        root: *const u16,
        name: *mut u16,
        name_size: u32,
        serial: *mut u32,
        max_component: *mut u32,
        flags: *mut u32,
        fs_name: *mut u16,
        fs_name_size: u32,
    ) -> i32;
}

/// `FILE_READ_ONLY_VOLUME`.
const FILE_READ_ONLY_VOLUME: u32 = 0x0008_0000;

/// The filesystem mounted on the volume `path` names (`\\.\X:`, `\\?\Volume{GUID}`), and
/// whether it is mounted read-only; `None` for anything else, or when nothing is mounted.
pub fn mounted_filesystem(path: &Path) -> Option<(String, bool)> {
    let s = path.to_string_lossy();
    if !in_device_namespace(path) {
        return None;
    }
    let root = super::windevice::parse_device_path(&s)
        .ok()?
        .vss_volume_name()?;
    let root: Vec<u16> = root.encode_utf16().chain(std::iter::once(0)).collect();
    let mut fs_name = [0u16; 64];
    let mut flags = 0u32;
    // SAFETY: `root` is a live NUL-terminated UTF-16 string; the volume-name buffer is not
    // asked for (null, size 0); `flags` is live; `fs_name` is live and its length in
    // characters is passed; the other out pointers may be null.
    let ok = unsafe {
        GetVolumeInformationW(
            root.as_ptr(),
            std::ptr::null_mut(),
            0,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            &mut flags,
            fs_name.as_mut_ptr(),
            fs_name.len() as u32,
        )
    };
    if ok == 0 {
        return None;
    }
    let len = fs_name
        .iter()
        .position(|&c| c == 0)
        .unwrap_or(fs_name.len());
    Some((
        String::from_utf16_lossy(&fs_name[..len]),
        flags & FILE_READ_ONLY_VOLUME != 0,
    ))
}

/// The cluster bitmap of an open volume (`FSCTL_GET_VOLUME_BITMAP`); `None` for a regular
/// file.
pub fn volume_bitmap(file: &File) -> io::Result<Option<(Vec<u8>, u64)>> {
    if file.metadata().map(|m| m.is_file()).unwrap_or(false) {
        return Ok(None);
    }
    device::volume_bitmap(file).map(Some)
}

pub fn open_device_for_overwrite(path: &Path) -> io::Result<File> {
    device::open_for_overwrite(path)
}

pub fn list_devices() -> Vec<(String, u64)> {
    device::list()
}

pub fn open_direct(_path: &Path) -> Option<File> {
    None
}

pub fn open_direct_rw(_path: &Path) -> Option<File> {
    None
}

/// A regular file's length; a disk's or volume's size and sector sizes from its ioctls.
pub fn geometry(file: &File) -> io::Result<Geometry> {
    let meta = file.metadata();
    if let Ok(m) = &meta
        && m.is_file()
    {
        return Ok(Geometry::of_file(m));
    }
    match device::geometry(file)? {
        Some((size, logical, physical)) => Ok(Geometry {
            kind: ObjectKind::BlockDevice,
            size,
            logical_sector_size: logical,
            physical_sector_size: physical,
        }),
        None => Ok(Geometry::of_file(&meta?)),
    }
}

pub fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    file.seek_read(buf, offset)
}

pub fn write_at(file: &File, buf: &[u8], offset: u64) -> io::Result<usize> {
    file.seek_write(buf, offset)
}

pub fn next_data(_file: &File, offset: u64, end: u64) -> io::Result<Option<(u64, u64)>> {
    Ok((offset < end).then_some((offset, end)))
}

pub fn sync_filesystem(_dir: &Path) -> io::Result<bool> {
    Ok(false)
}

pub fn sync_dir(_dir: &Path) -> io::Result<()> {
    // NTFS journals directory entries; there is no directory handle to flush.
    Ok(())
}

pub fn mount_point_of(_path: &Path) -> io::Result<Option<MountUse>> {
    Ok(None)
}

/// `FILE_FLAG_OPEN_REPARSE_POINT` opens a symbolic link (or any other reparse point) itself
/// instead of its target, the counterpart of `O_NOFOLLOW`: the caller then sees a non-regular
/// file ([`file_kind_name`]) and refuses it. Creating never truncates (`OPEN_ALWAYS`). Opening
/// a directory fails (no `FILE_FLAG_BACKUP_SEMANTICS`); a repository holds no named pipes or
/// devices, which only exist under `\\.\`, so there is nothing to block on.
pub fn open_no_follow(path: &Path, write: bool, create: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .create(create)
        .custom_flags(FILE_FLAG_OPEN_REPARSE_POINT)
        .open(path)
}

/// A reparse point that is not a symbolic link (a junction, a deduplicated or cloud
/// placeholder file) is refused too: opened with `FILE_FLAG_OPEN_REPARSE_POINT` its content is
/// not the file's data.
pub fn file_kind_name(meta: &std::fs::Metadata) -> Option<&'static str> {
    let ft = meta.file_type();
    if ft.is_symlink() {
        Some("symbolic link")
    } else if ft.is_dir() {
        Some("directory")
    } else if meta.file_attributes() & FILE_ATTRIBUTE_REPARSE_POINT != 0 {
        Some("reparse point")
    } else if ft.is_file() {
        None
    } else {
        Some("special file")
    }
}

/// Compares volume serial numbers and file indexes (`path` itself, not a link's target).
pub fn path_names_file(path: &Path, file: &File) -> io::Result<bool> {
    let a = handle_info(&open_for_query(path, false)?)?;
    let b = handle_info(file)?;
    Ok(identity(&a) == identity(&b))
}

/// (volume serial number, file index) of what `path` names after following links. `None`
/// where the object has no such identity (a raw volume such as `\\.\C:`).
pub fn path_id(path: &Path) -> io::Result<Option<(u64, u64)>> {
    let f = open_for_query(path, true)?;
    Ok(handle_info(&f).ok().map(|i| identity(&i)))
}

/// The number of names (hard links) of the file `path` names after following links; `None`
/// where it cannot be read.
pub fn link_count(path: &Path) -> io::Result<Option<u64>> {
    let f = open_for_query(path, true)?;
    Ok(handle_info(&f).ok().map(|i| u64::from(i.number_of_links)))
}

/// Windows has no loop devices (attached VHDs are not looked at): nothing is backed by a file.
pub fn loop_backings() -> Vec<((u64, u64), u64)> {
    Vec::new()
}

pub fn mounted_devices() -> io::Result<Vec<(String, MountUse)>> {
    Ok(Vec::new())
}

pub fn device_family(_rdev: u64) -> Vec<String> {
    Vec::new()
}

/// (volume serial number, file index). Raw volumes have no file index: an error, so callers
/// treat the identity as unknown.
pub fn object_id(file: &File) -> io::Result<(u64, u64)> {
    Ok(identity(&handle_info(file)?))
}

/// Regular files: identity (volume serial number, file index), size, creation, last-write and
/// change times (a write changes the last two; setting the last-write time back changes the
/// change time). Devices and anything whose markers cannot be read: unknown, so an interrupted
/// run on them is never resumed on Windows (it starts over).
pub fn write_markers(file: &File) -> io::Result<Option<super::WriteMarkers>> {
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Ok(None);
    }
    let (Ok(info), Ok(ctime)) = (handle_info(file), change_time(file)) else {
        return Ok(None);
    };
    let (volume, index) = identity(&info);
    let mut bytes = Vec::new();
    for v in [
        volume,
        index,
        meta.file_size(),
        meta.creation_time(),
        meta.last_write_time(),
        ctime as u64,
    ] {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    Ok(Some(super::WriteMarkers {
        what: "file identity, size, creation, last-write and change times".into(),
        bytes,
    }))
}

pub fn zero_range(_file: &File, _offset: u64, _len: u64) -> io::Result<bool> {
    Ok(false)
}

pub fn prefetch(_file: &File, _offset: u64, _len: u64) {}

pub fn advise_huge_pages(_buf: &mut [u8]) {}

/// The Windows heap returns large blocks to the system by itself.
pub fn bound_allocator() {}

pub fn in_device_namespace(path: &Path) -> bool {
    let s = path.as_os_str().to_string_lossy();
    s.starts_with(r"\\.\") || s.starts_with(r"\\?\GLOBALROOT")
}

/// Not checked on Windows: a lease of a killed process there waits for its expiry.
pub fn process_gone(_pid: u32) -> bool {
    false
}

pub fn hostname() -> String {
    std::env::var("COMPUTERNAME").unwrap_or_default()
}

/// Local (Unix-domain) sockets are not available through the standard library on Windows:
/// `bind` fails, so no value of these types ever exists.
pub enum LocalListener {}

impl LocalListener {
    pub fn bind(_path: &Path) -> io::Result<LocalListener> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "Unix sockets are not supported on Windows; listen on a TCP address",
        ))
    }

    pub fn set_nonblocking(&self, _nonblocking: bool) -> io::Result<()> {
        match *self {}
    }

    pub fn accept(&self) -> io::Result<LocalStream> {
        match *self {}
    }
}

/// See [`LocalListener`]: never constructed on Windows.
pub enum LocalStream {}

impl LocalStream {
    pub fn try_clone(&self) -> io::Result<LocalStream> {
        match *self {}
    }

    pub fn shutdown(&self, _how: std::net::Shutdown) -> io::Result<()> {
        match *self {}
    }

    pub fn set_nonblocking(&self, _nonblocking: bool) -> io::Result<()> {
        match *self {}
    }

    pub fn set_read_timeout(&self, _t: Option<std::time::Duration>) -> io::Result<()> {
        match *self {}
    }
}

impl io::Read for LocalStream {
    fn read(&mut self, _buf: &mut [u8]) -> io::Result<usize> {
        match *self {}
    }
}

impl io::Write for LocalStream {
    fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
        match *self {}
    }

    fn flush(&mut self) -> io::Result<()> {
        match *self {}
    }
}

/// ERROR_CRC (23), ERROR_SECTOR_NOT_FOUND (27), ERROR_READ_FAULT (30), ERROR_IO_DEVICE (1117).
pub fn is_media_error(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(23 | 27 | 30 | 1117))
}
