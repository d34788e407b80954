//! Windows implementation of the platform layer. Image files are fully supported through the
//! standard library; raw volumes (`\\.\C:`), VSS and hole queries are future work, so files are
//! read as fully allocated and repository durability relies on per-file flushes.

use super::{Geometry, MountUse, ObjectKind};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::windows::fs::FileExt;
use std::path::Path;

pub fn open_read_only(path: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).open(path)
}

pub fn open_direct(_path: &Path) -> Option<File> {
    None
}

pub fn open_direct_rw(_path: &Path) -> Option<File> {
    None
}

pub fn geometry(file: &File) -> io::Result<Geometry> {
    let meta = file.metadata()?;
    Ok(Geometry {
        kind: if meta.is_file() {
            ObjectKind::RegularFile
        } else {
            ObjectKind::Other
        },
        size: meta.len(),
        logical_sector_size: 512,
        physical_sector_size: 4096,
    })
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

pub fn open_no_follow(path: &Path, write: bool, create: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .create(create)
        .open(path)
}

pub fn file_kind_name(meta: &std::fs::Metadata) -> Option<&'static str> {
    let ft = meta.file_type();
    if ft.is_file() {
        None
    } else if ft.is_dir() {
        Some("directory")
    } else if ft.is_symlink() {
        Some("symbolic link")
    } else {
        Some("special file")
    }
}

pub fn path_names_file(_path: &Path, _file: &File) -> io::Result<bool> {
    Ok(true)
}

pub fn path_id(_path: &Path) -> io::Result<Option<(u64, u64)>> {
    Ok(None)
}

pub fn loop_backings() -> Vec<((u64, u64), u64)> {
    Vec::new()
}

pub fn mounted_devices() -> io::Result<Vec<(String, MountUse)>> {
    Ok(Vec::new())
}

pub fn device_family(_rdev: u64) -> Vec<String> {
    Vec::new()
}

pub fn object_id(_file: &File) -> io::Result<(u64, u64)> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "file identity is not available on this platform",
    ))
}

/// Regular files: size, creation and last-write times (a write changes the last). Devices:
/// unknown (an interrupted run on a device is never resumed on Windows).
pub fn write_markers(file: &File) -> io::Result<Option<super::WriteMarkers>> {
    use std::os::windows::fs::MetadataExt;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Ok(None);
    }
    let mut bytes = Vec::new();
    for v in [
        meta.file_size(),
        meta.creation_time(),
        meta.last_write_time(),
    ] {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    Ok(Some(super::WriteMarkers {
        what: "file size, creation and last-write times".into(),
        bytes,
    }))
}

pub fn zero_range(_file: &File, _offset: u64, _len: u64) -> io::Result<bool> {
    Ok(false)
}

pub fn prefetch(_file: &File, _offset: u64, _len: u64) {}

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
