//! Raw disks and volumes on Windows (**experimental: never run on real Windows**; wine has
//! no raw disk ioctls). Paths and ioctl output buffers are parsed by
//! [`crate::platform::windevice`], which the Linux suite tests; this module only issues the
//! calls.

use crate::platform::windevice::{self, DevicePath};
use std::ffi::c_void;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::windows::io::AsRawHandle;
use std::path::Path;

// Control codes of <winioctl.h>: CTL_CODE(device type, function, method, access).
/// CTL_CODE(IOCTL_DISK_BASE 0x07, 0x0017, METHOD_BUFFERED, FILE_READ_ACCESS).
const IOCTL_DISK_GET_LENGTH_INFO: u32 = 0x0007_405C;
/// CTL_CODE(IOCTL_DISK_BASE 0x07, 0x0028, METHOD_BUFFERED, FILE_ANY_ACCESS).
const IOCTL_DISK_GET_DRIVE_GEOMETRY_EX: u32 = 0x0007_00A0;
/// CTL_CODE(IOCTL_STORAGE_BASE 0x2d, 0x0500, METHOD_BUFFERED, FILE_ANY_ACCESS).
const IOCTL_STORAGE_QUERY_PROPERTY: u32 = 0x002D_1400;
/// CTL_CODE(IOCTL_VOLUME_BASE 0x56, 0, METHOD_BUFFERED, FILE_ANY_ACCESS).
const IOCTL_VOLUME_GET_VOLUME_DISK_EXTENTS: u32 = 0x0056_0000;
/// CTL_CODE(FILE_DEVICE_FILE_SYSTEM 0x09, 6, METHOD_BUFFERED, FILE_ANY_ACCESS).
const FSCTL_LOCK_VOLUME: u32 = 0x0009_0018;
/// CTL_CODE(FILE_DEVICE_FILE_SYSTEM 0x09, 8, METHOD_BUFFERED, FILE_ANY_ACCESS).
const FSCTL_DISMOUNT_VOLUME: u32 = 0x0009_0020;
/// CTL_CODE(FILE_DEVICE_FILE_SYSTEM 0x09, 27, METHOD_NEITHER, FILE_ANY_ACCESS).
const FSCTL_GET_VOLUME_BITMAP: u32 = 0x0009_006F;
/// `ERROR_MORE_DATA`: the output buffer held only the first part.
const ERROR_MORE_DATA: i32 = 234;
/// `StorageAccessAlignmentProperty` of `STORAGE_PROPERTY_ID`.
const STORAGE_ACCESS_ALIGNMENT_PROPERTY: u32 = 6;

#[link(name = "kernel32")]
unsafe extern "system" {
    fn DeviceIoControl(
        device: *mut c_void,
        code: u32,
        in_buffer: *const c_void,
        in_size: u32,
        out_buffer: *mut c_void,
        out_size: u32,
        returned: *mut u32,
        overlapped: *mut c_void,
    ) -> i32;
    fn GetSystemDirectoryW(buffer: *mut u16, size: u32) -> u32;
}

/// `DeviceIoControl(file, code, input, output)` without overlapped I/O; the bytes returned.
fn ioctl(file: &File, code: u32, input: &[u8], output: &mut [u8]) -> io::Result<usize> {
    match ioctl_partial(file, code, input, output)? {
        (n, false) => Ok(n),
        (_, true) => Err(io::Error::from_raw_os_error(ERROR_MORE_DATA)),
    }
}

/// [`ioctl`] for calls that fill the output buffer with the first part of a longer answer
/// (`ERROR_MORE_DATA`): the bytes returned, and whether more remain.
fn ioctl_partial(
    file: &File,
    code: u32,
    input: &[u8],
    output: &mut [u8],
) -> io::Result<(usize, bool)> {
    let mut returned = 0u32;
    // SAFETY: the handle is owned by `file`, alive for the call; the input and output
    // pointers and sizes come from live slices (the driver reads at most `in_size` and writes
    // at most `out_size` bytes); `returned` is live; no OVERLAPPED (synchronous handle).
    let ok = unsafe {
        DeviceIoControl(
            file.as_raw_handle(),
            code,
            input.as_ptr().cast(),
            input.len() as u32,
            output.as_mut_ptr().cast(),
            output.len() as u32,
            &mut returned,
            std::ptr::null_mut(),
        )
    };
    if ok == 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(ERROR_MORE_DATA) {
            return Ok(((returned as usize).min(output.len()), true));
        }
        return Err(e);
    }
    Ok(((returned as usize).min(output.len()), false))
}

fn invalid_data(e: windevice::IoctlBufferError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// The device a path in the device namespace names, or a clear error.
pub fn device_path(path: &Path) -> io::Result<DevicePath> {
    let s = path.to_string_lossy();
    windevice::parse_device_path(&s).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// Size and sector sizes of an open disk or volume; `None` when the handle answers no disk
/// ioctl (a regular file).
pub fn geometry(file: &File) -> io::Result<Option<(u64, u32, u32)>> {
    let mut len = [0u8; 8];
    let size = match ioctl(file, IOCTL_DISK_GET_LENGTH_INFO, &[], &mut len) {
        Ok(n) => windevice::parse_length_info(&len[..n]).map_err(invalid_data)?,
        Err(_) => return Ok(None),
    };
    // STORAGE_PROPERTY_QUERY { PropertyId; QueryType = PropertyStandardQuery (0);
    // AdditionalParameters[1] } (12 bytes with padding).
    let mut query = [0u8; 12];
    query[..4].copy_from_slice(&STORAGE_ACCESS_ALIGNMENT_PROPERTY.to_le_bytes());
    let mut align = [0u8; 64];
    let sectors = match ioctl(file, IOCTL_STORAGE_QUERY_PROPERTY, &query, &mut align) {
        Ok(n) => windevice::parse_access_alignment(&align[..n])
            .ok()
            .map(|a| (a.logical_sector_size, a.physical_sector_size)),
        Err(_) => None,
    };
    let sectors = match sectors {
        Some(s) => s,
        None => {
            let mut geo = [0u8; 256];
            match ioctl(file, IOCTL_DISK_GET_DRIVE_GEOMETRY_EX, &[], &mut geo) {
                Ok(n) => {
                    let g = windevice::parse_drive_geometry_ex(&geo[..n]).map_err(invalid_data)?;
                    (g.bytes_per_sector, g.bytes_per_sector.max(4096))
                }
                Err(_) => (512, 4096),
            }
        }
    };
    Ok(Some((size, sectors.0, sectors.1)))
}

/// The drive letter of the running Windows (of its system directory).
fn system_drive_letter() -> Option<char> {
    let mut buf = [0u16; 300];
    // SAFETY: the buffer is live and its length in characters is passed; the function
    // writes at most that many (and returns the length, or 0 on failure).
    let n = unsafe { GetSystemDirectoryW(buf.as_mut_ptr(), buf.len() as u32) } as usize;
    let dir = String::from_utf16_lossy(&buf[..n.min(buf.len())]);
    let c = dir.chars().next()?;
    (c.is_ascii_alphabetic() && dir[1..].starts_with(':')).then(|| c.to_ascii_uppercase())
}

/// The disk numbers holding the volume of the running Windows.
fn system_disks(letter: char) -> Vec<u32> {
    let Ok(volume) = OpenOptions::new()
        .access_mode(0)
        .open(format!(r"\\.\{letter}:"))
    else {
        return Vec::new();
    };
    let mut buf = vec![0u8; 8 + 24 * 32];
    match ioctl(&volume, IOCTL_VOLUME_GET_VOLUME_DISK_EXTENTS, &[], &mut buf) {
        Ok(n) => windevice::parse_volume_disk_extents(&buf[..n])
            .map(|e| e.iter().map(|x| x.disk_number).collect())
            .unwrap_or_default(),
        Err(_) => Vec::new(),
    }
}

use std::os::windows::fs::OpenOptionsExt;

/// Opens a disk or volume that a restore overwrites. The disk or volume of the running Windows
/// is refused; a volume is locked (`FSCTL_LOCK_VOLUME`: nobody else has it open; the lock
/// lasts as long as the handle) and dismounted (`FSCTL_DISMOUNT_VOLUME`: the filesystem lets
/// go of it and rereads it afterwards) before anything is written.
pub fn open_for_overwrite(path: &Path) -> io::Result<File> {
    let device = device_path(path)?;
    let refuse = |why: String| Err(io::Error::new(io::ErrorKind::PermissionDenied, why));
    if let Some(letter) = system_drive_letter() {
        match &device {
            DevicePath::DriveLetter(c) if *c == letter => {
                return refuse(format!("{device} holds the running Windows ({letter}:)"));
            }
            DevicePath::PhysicalDrive(n) if system_disks(letter).contains(n) => {
                return refuse(format!("{device} holds the running Windows ({letter}:)"));
            }
            _ => {}
        }
    }
    let file = OpenOptions::new().read(true).write(true).open(path)?;
    if !device.is_disk() {
        ioctl(&file, FSCTL_LOCK_VOLUME, &[], &mut []).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot lock {device} (close what has it open): {e}"),
            )
        })?;
        ioctl(&file, FSCTL_DISMOUNT_VOLUME, &[], &mut [])
            .map_err(|e| io::Error::new(e.kind(), format!("cannot dismount {device}: {e}")))?;
    }
    Ok(file)
}

/// Disks (`\\.\PhysicalDriveN`, N below 64) and drive-letter volumes that open, with their
/// sizes: what `volback probe` lists without an argument.
pub fn list() -> Vec<(String, u64)> {
    let mut found = Vec::new();
    let names = (0..64)
        .map(|n| format!(r"\\.\PhysicalDrive{n}"))
        .chain((b'A'..=b'Z').map(|c| format!(r"\\.\{}:", char::from(c))));
    for name in names {
        let Ok(f) = OpenOptions::new().read(true).open(&name) else {
            continue;
        };
        if let Ok(Some((size, _, _))) = geometry(&f) {
            found.push((name, size));
        }
    }
    found
}

/// The cluster bitmap the filesystem driver keeps for an open volume
/// (`FSCTL_GET_VOLUME_BITMAP`, asked again from where each answer ended until the whole volume
/// is described; pieces put together by [`windevice::BitmapAssembly`]): one bit a cluster from
/// cluster 0, and the number of clusters.
pub fn volume_bitmap(file: &File) -> io::Result<(Vec<u8>, u64)> {
    // 16 bytes of header and 1 MiB of bitmap (8 Mi clusters, 32 GiB in 4 KiB clusters) a call.
    let mut buf = vec![0u8; 16 + (1 << 20)];
    let mut assembly = windevice::BitmapAssembly::default();
    loop {
        let start = assembly.next_lcn();
        // STARTING_LCN_INPUT_BUFFER { LARGE_INTEGER StartingLcn; }
        let input = (start as i64).to_le_bytes();
        let (n, _more) = ioctl_partial(file, FSCTL_GET_VOLUME_BITMAP, &input, &mut buf)
            .map_err(|e| io::Error::new(e.kind(), format!("FSCTL_GET_VOLUME_BITMAP: {e}")))?;
        if assembly.add(&buf[..n]).map_err(invalid_data)? {
            break;
        }
    }
    assembly.finish().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "FSCTL_GET_VOLUME_BITMAP did not describe the whole volume",
        )
    })
}
