//! The mount table (`/proc/self/mountinfo`), loop devices (`/sys/block/loop*`) and unmounting.

use super::SUBTYPE;
use crate::error::{Error, Result};
use crate::platform::{self, loop_backing_file};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    /// Filesystem type, with the FUSE subtype (`fuse.volback`, `ext4`).
    pub fs_type: String,
    /// Mount source (`/dev/loop3`, a file path, `volback`).
    pub source: String,
}

impl MountEntry {
    /// A view mounted by [`super::mount_view`]: FUSE type `fuse.volback`, or plain `fuse`
    /// with source `volback` (the kernel records no subtype when the mount is made directly
    /// rather than through `fusermount`).
    pub fn is_volback_view(&self) -> bool {
        self.fs_type == format!("fuse.{SUBTYPE}")
            || (self.fs_type == "fuse" && self.source == SUBTYPE)
    }

    /// The file this filesystem is read from: the backing file of a loop device, or the
    /// source itself when it is a path (FUSE drivers reading an image file).
    pub fn backing_file(&self) -> Option<PathBuf> {
        if let Some(name) = self.source.strip_prefix("/dev/")
            && name.starts_with("loop")
        {
            return loop_backing_file(name);
        }
        self.source
            .starts_with('/')
            .then(|| PathBuf::from(&self.source))
    }
}

impl From<platform::MountInfo> for MountEntry {
    fn from(m: platform::MountInfo) -> MountEntry {
        MountEntry {
            mount_point: PathBuf::from(m.mount_point),
            fs_type: m.fs_type,
            source: m.source,
        }
    }
}

/// The current mount table.
pub fn mounts() -> Result<Vec<MountEntry>> {
    let entries = platform::mountinfo()
        .map_err(|e| Error::io("read", Path::new("/proc/self/mountinfo"), e))?;
    Ok(entries.into_iter().map(MountEntry::from).collect())
}

/// Loop devices whose backing file lies under `dir`.
pub fn loops_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| n.starts_with("loop"))
        .filter(|n| loop_backing_file(n).is_some_and(|f| f.starts_with(dir)))
        .map(|n| PathBuf::from(format!("/dev/{n}")))
        .collect()
}

/// Detaches a loop device (`LOOP_CLR_FD`).
pub fn detach_loop(dev: &Path) -> Result<()> {
    const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
    let f = std::fs::File::open(dev).map_err(|e| Error::io("open", dev, e))?;
    use std::os::fd::AsRawFd;
    // SAFETY: LOOP_CLR_FD takes no argument; the descriptor is valid for the call.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), LOOP_CLR_FD, 0) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        // ENXIO: already detached.
        if e.raw_os_error() != Some(libc::ENXIO) {
            return Err(Error::io("detach loop device", dev, e));
        }
    }
    Ok(())
}

fn umount2(path: &Path, flags: libc::c_int) -> std::io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Unmounts `path`: a normal unmount, retried while busy, then a lazy one; without the
/// privilege to unmount, `fusermount3 -u` / `fusermount -u` (a user's own FUSE mount).
pub fn unmount_path(path: &Path) -> Result<()> {
    let mut last = None;
    for attempt in 0..20 {
        match umount2(path, 0) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                last = Some(e);
                std::thread::sleep(std::time::Duration::from_millis(50 * (attempt + 1)));
            }
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                for tool in ["fusermount3", "fusermount"] {
                    if let Ok(o) = std::process::Command::new(tool)
                        .arg("-u")
                        .arg(path)
                        .output()
                        && o.status.success()
                    {
                        return Ok(());
                    }
                }
                return Err(Error::io("unmount", path, e));
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                // Not a mount point (any more).
                return Ok(());
            }
            Err(e) => {
                last = Some(e);
                break;
            }
        }
    }
    match umount2(path, libc::MNT_DETACH) {
        Ok(()) => Ok(()),
        Err(e) => Err(Error::io("unmount", path, last.unwrap_or(e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_lines() {
        let text = "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw\n\
                    40 30 0:50 / /tmp/view rw,nosuid - fuse.volback volback ro,user_id=0\n\
                    garbage line\n";
        let m: Vec<MountEntry> = platform::parse_mountinfo(text)
            .into_iter()
            .map(MountEntry::from)
            .collect();
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/with space"));
        assert_eq!(m[0].fs_type, "ext3");
        assert!(m[1].is_volback_view());
        assert_eq!(m[1].backing_file(), None);
    }
}
