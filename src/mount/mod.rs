//! Read-only views of a volume without restoring it (Linux).
//!
//! - [`view_entries`] decides what the view shows: `volume.img` (the whole volume) and, for a
//!   partitioned disk, `part<N>.img` for each data partition (N as the kernel numbers it).
//! - [`mount_view`] mounts those files as a read-only FUSE filesystem; the returned session
//!   serves reads from any [`Volume`] (a snapshot with its decoded-block cache, or a copy)
//!   until it is unmounted.
//! - [`attach_files`] mounts the filesystems inside the view read-only, without journal
//!   replay, through a read-only loop device (or the filesystem's FUSE driver where the kernel
//!   has none), so the user sees the files.
//! - [`unmount`] undoes all of it for a view directory, also after the process serving the
//!   view was killed: it unmounts every mount whose source lies inside the view (the loop
//!   devices are created with auto-clear, so they go with their mount), then the view.

mod fusefs;
mod table;

pub use fusefs::ViewFs;
pub use table::{MountEntry, mounts};

use crate::error::{Error, Result};
use crate::probe::{MbrRole, ProbeOptions};
use crate::volume::Volume;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

/// The FUSE subtype of volback views (`fuse.volback` in `/proc/self/mountinfo`).
pub const SUBTYPE: &str = "volback";

/// One file of a view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewEntry {
    /// File name in the view.
    pub name: String,
    /// Byte range of the volume the file shows.
    pub start: u64,
    pub size: u64,
    /// Filesystem type found there (`blkid` names), if any.
    pub fs_type: Option<String>,
}

/// The files of a view of `vol`: the whole volume, then each data partition.
pub fn view_entries(vol: &dyn Volume) -> Result<Vec<ViewEntry>> {
    let report = crate::probe::probe(vol, 512, 512, &ProbeOptions { filesystems: true })?;
    let mut entries = vec![ViewEntry {
        name: "volume.img".into(),
        start: 0,
        size: vol.size(),
        fs_type: report.filesystem.as_ref().map(|f| f.fs_type.clone()),
    }];
    if let Some(table) = &report.partition_table {
        for p in &table.partitions {
            if p.role == Some(MbrRole::Extended) || p.size == 0 || p.start >= vol.size() {
                continue;
            }
            entries.push(ViewEntry {
                name: format!("part{}.img", p.number),
                start: p.start,
                size: p.size.min(vol.size() - p.start),
                fs_type: p.filesystem.as_ref().map(|f| f.fs_type.clone()),
            });
        }
    }
    Ok(entries)
}

/// Mounts a read-only FUSE view of `vol` at `dir`. The view is served while the returned
/// session runs (`session.run()` returns when it is unmounted).
pub fn mount_view(
    vol: Arc<dyn Volume>,
    entries: Vec<ViewEntry>,
    dir: &Path,
    allow_other: bool,
) -> Result<fuser::Session<ViewFs>> {
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::RO,
        fuser::MountOption::FSName("volback".into()),
        fuser::MountOption::Subtype(SUBTYPE.into()),
        fuser::MountOption::NoExec,
        fuser::MountOption::NoSuid,
        fuser::MountOption::NoDev,
    ];
    if allow_other {
        config.acl = fuser::SessionACL::All;
    }
    config.n_threads = Some(4);
    let fs = ViewFs::new(vol, entries);
    fuser::Session::new(fs, dir, &config).map_err(|e| Error::io("mount a FUSE view at", dir, e))
}

/// One way to mount a filesystem read-only: a kernel driver through `mount -t TYPE -o loop,…`
/// (a read-only loop device with auto-clear), or a FUSE driver reading the image file itself.
#[derive(Debug, Clone, Copy)]
enum Method {
    Kernel(&'static str, &'static str),
    /// `mount -t TYPE -o OPTIONS` handed to the type's FUSE helper (`mount.ntfs-3g`…).
    FuseHelper(&'static str, &'static str),
    /// A FUSE program run directly: `PROGRAM -o OPTIONS,fsname=IMAGE IMAGE DIR` (the fsname
    /// puts the image's path in the mount table, where [`unmount`] looks for it).
    Program(&'static str, &'static str),
}

impl Method {
    /// The command line for mounting `image`, without the image and the target directory.
    fn command(self, image: &Path) -> (&'static str, Vec<String>) {
        match self {
            Method::Kernel(kind, opts) => (
                "mount",
                vec![
                    "-t".into(),
                    kind.into(),
                    "-o".into(),
                    format!("loop,{opts}"),
                ],
            ),
            Method::FuseHelper(kind, opts) => (
                "mount",
                vec!["-t".into(), kind.into(), "-o".into(), opts.into()],
            ),
            Method::Program(name, opts) => {
                // libfuse option syntax: commas and backslashes in a value are escaped.
                let fsname = image
                    .to_string_lossy()
                    .replace('\\', "\\\\")
                    .replace(',', "\\,");
                (name, vec!["-o".into(), format!("{opts},fsname={fsname}")])
            }
        }
    }
}

/// How to mount one filesystem type read-only without replaying its journal, in the order
/// tried (the kernel driver first, then FUSE drivers).
fn mount_methods(fs_type: &str) -> &'static [Method] {
    use Method::*;
    match fs_type {
        "ext2" => &[Kernel("ext2", "ro"), Kernel("ext4", "ro")],
        "ext3" | "ext4" => &[Kernel("ext4", "ro,noload")],
        "xfs" => &[Kernel("xfs", "ro,norecovery")],
        "btrfs" => &[
            Kernel("btrfs", "ro,rescue=nologreplay"),
            Kernel("btrfs", "ro"),
        ],
        "ntfs" => &[Kernel("ntfs3", "ro"), FuseHelper("ntfs-3g", "ro")],
        "vfat" => &[Kernel("vfat", "ro"), Program("fusefat", "ro")],
        "exfat" => &[Kernel("exfat", "ro"), FuseHelper("exfat-fuse", "ro")],
        _ => &[],
    }
}

/// A filesystem mounted by [`attach_files`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct AttachedFiles {
    /// The view file holding the filesystem.
    pub image: PathBuf,
    /// Where its files are.
    #[serde(rename = "path")]
    pub mount_point: PathBuf,
    #[serde(rename = "filesystem")]
    pub fs_type: String,
}

/// Mounts the filesystems of the view at `view_dir` read-only under `files_dir`: at
/// `files_dir` itself for a volume without partitions, at `files_dir/part<N>` for each
/// partition otherwise. Entries without a mountable filesystem are skipped (and named in the
/// returned warnings).
pub fn attach_files(
    view_dir: &Path,
    entries: &[ViewEntry],
    files_dir: &Path,
) -> Result<(Vec<AttachedFiles>, Vec<String>)> {
    let partitioned = entries.len() > 1;
    let mut attached = Vec::new();
    let mut warnings = Vec::new();
    for e in entries
        .iter()
        .filter(|e| (e.name == "volume.img") != partitioned)
    {
        let image = view_dir.join(&e.name);
        let Some(fs_type) = &e.fs_type else {
            if !partitioned {
                warnings.push(format!("{}: no filesystem recognised", e.name));
            }
            continue;
        };
        let target = if partitioned {
            files_dir.join(e.name.trim_end_matches(".img"))
        } else {
            files_dir.to_path_buf()
        };
        std::fs::create_dir_all(&target).map_err(|err| Error::io("create", &target, err))?;
        match mount_read_only(&image, fs_type, &target) {
            Ok(()) => attached.push(AttachedFiles {
                image,
                mount_point: target,
                fs_type: fs_type.clone(),
            }),
            Err(err) => {
                if attached.is_empty() && !partitioned {
                    return Err(err);
                }
                warnings.push(format!("{}: {}", e.name, crate::error::chain(&err)));
            }
        }
    }
    Ok((attached, warnings))
}

/// Mounts `image` (a file) read-only at `target` with the first method that works.
fn mount_read_only(image: &Path, fs_type: &str, target: &Path) -> Result<()> {
    let failed = |detail: String| Error::MountFailed {
        image: image.to_path_buf(),
        fs_type: fs_type.to_string(),
        detail,
    };
    let methods = mount_methods(fs_type);
    if methods.is_empty() {
        return Err(failed(format!(
            "volback does not know how to mount {fs_type}"
        )));
    }
    let mut errors = Vec::new();
    for method in methods {
        let (program, args) = method.command(image);
        let what = format!("{program} {}", args.join(" "));
        match Command::new(program)
            .args(&args)
            .arg(image)
            .arg(target)
            .output()
        {
            Ok(o) if o.status.success() => return Ok(()),
            Ok(o) => errors.push(format!(
                "{what}: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => errors.push(format!("cannot run {program}: {e}")),
        }
    }
    Err(failed(errors.join("; ")))
}

/// What [`unmount`] did.
#[derive(Debug, Clone, Default)]
pub struct UnmountReport {
    /// Filesystems unmounted that were mounted from files of the view.
    pub inner: Vec<PathBuf>,
    /// Loop devices detached that no mount held.
    pub loops: Vec<PathBuf>,
    /// True when the view itself was unmounted.
    pub view: bool,
}

/// Undoes a view: `dir` is the view directory, or a directory where [`attach_files`]
/// mounted one of its filesystems.
pub fn unmount(dir: &Path) -> Result<UnmountReport> {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let all = mounts()?;
    // The view this directory belongs to.
    let view = match all.iter().find(|m| m.mount_point == dir) {
        Some(m) if m.is_volback_view() => dir.clone(),
        Some(m) => match m.backing_file() {
            Some(f) => all
                .iter()
                .filter(|v| v.is_volback_view() && f.starts_with(&v.mount_point))
                .map(|v| v.mount_point.clone())
                .max_by_key(|p| p.as_os_str().len())
                .ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "{} is not mounted from a volback view",
                        dir.display()
                    ))
                })?,
            None => {
                return Err(Error::InvalidArgument(format!(
                    "{} is not a volback view (it is a {} mount)",
                    dir.display(),
                    m.fs_type
                )));
            }
        },
        None => {
            return Err(Error::InvalidArgument(format!(
                "nothing is mounted at {}",
                dir.display()
            )));
        }
    };
    let mut report = UnmountReport::default();
    // Inner mounts first, deepest mount point first.
    let mut inner: Vec<&MountEntry> = all
        .iter()
        .filter(|m| m.backing_file().is_some_and(|f| f.starts_with(&view)))
        .collect();
    inner.sort_by_key(|m| std::cmp::Reverse(m.mount_point.as_os_str().len()));
    for m in inner {
        table::unmount_path(&m.mount_point)?;
        report.inner.push(m.mount_point.clone());
    }
    // Loop devices on files of the view that no mount holds (attached by hand, or left when
    // a mount went away without auto-clear).
    for dev in table::loops_under(&view) {
        table::detach_loop(&dev)?;
        report.loops.push(dev);
    }
    table::unmount_path(&view)?;
    report.view = true;
    Ok(report)
}
