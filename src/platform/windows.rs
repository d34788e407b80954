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

pub fn object_id(_file: &File) -> io::Result<(u64, u64)> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "file identity is not available on this platform",
    ))
}

pub fn zero_range(_file: &File, _offset: u64, _len: u64) -> io::Result<bool> {
    Ok(false)
}

pub fn prefetch(_file: &File, _offset: u64, _len: u64) {}

pub fn hostname() -> String {
    std::env::var("COMPUTERNAME").unwrap_or_default()
}
