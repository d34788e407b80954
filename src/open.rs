//! One opener for everything a command reads a volume from: a block device, an image file
//! (raw, VHD, VHDX, qcow2), a copy (made by `copy` or `export`), or a snapshot in a
//! repository, named as the command line names them: one path, or `REPO SNAPSHOT`.
//!
//! Two steps: [`identify`] works out what the arguments name (it resolves a snapshot
//! selector, finds a copy's metadata, recognises an image format) without opening a volume;
//! [`Target::open`] opens it. [`open`] does both. `restore`, `export`, `mount`, `serve` and
//! `verify` go through here.
//!
//! A single path is tried in this order: a copy (the path is a BIN directory, a copy's data
//! file or its metadata file; see [`crate::copy::locate`]), a block device, then a regular
//! file whose contents [`crate::image::detect`] recognises as VHD, VHDX or qcow2, else a raw
//! image. Anything else is [`Error::NotAVolume`], which names the path and what was tried.

use crate::copy::{self, CopyPaths};
use crate::error::{Error, Result};
use crate::image::{self, ImageFormat};
use crate::platform::ObjectKind;
use crate::progress::Progress;
use crate::repo::Repository;
use crate::repo::keys::{NoPassword, PasswordSource};
use crate::repo::reader::{CacheOptions, SnapshotVolume};
use crate::repo::snapshot::SnapshotHeader;
use crate::source::Source;
use crate::volume::Volume;
use std::ffi::OsStr;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What kind of thing was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum VolumeKind {
    /// A block device.
    Device,
    /// A regular file read as the volume itself.
    RawImage,
    /// A VHD image (fixed or dynamic).
    Vhd,
    /// A VHDX image.
    Vhdx,
    /// A qcow2 image.
    Qcow2,
    /// A copy made by `volback copy` or `volback export` (any container format).
    Copy,
    /// A snapshot in a repository.
    Snapshot,
}

impl VolumeKind {
    /// The name users read: "device", "raw image", "VHD image", …
    pub fn name(self) -> &'static str {
        match self {
            VolumeKind::Device => "device",
            VolumeKind::RawImage => "raw image",
            VolumeKind::Vhd => "VHD image",
            VolumeKind::Vhdx => "VHDX image",
            VolumeKind::Qcow2 => "qcow2 image",
            VolumeKind::Copy => "copy",
            VolumeKind::Snapshot => "snapshot",
        }
    }
}

impl fmt::Display for VolumeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the arguments name, found but not opened yet.
pub enum Target {
    Device {
        path: PathBuf,
    },
    /// An image file; `format` `None`: raw.
    Image {
        path: PathBuf,
        format: Option<ImageFormat>,
    },
    Copy {
        /// The path as given.
        path: PathBuf,
        paths: CopyPaths,
    },
    Snapshot {
        /// The repository directory as given.
        root: PathBuf,
        repository: Repository,
        /// The full snapshot id the selector resolved to.
        id: String,
    },
}

/// How to open a target.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Give a snapshot a decoded-block cache and read-ahead (for readers that come back to
    /// the same blocks in small pieces: `mount`, `serve`); `None`: plain reads (`restore`).
    pub snapshot_cache: Option<CacheOptions>,
}

/// A snapshot that was opened.
pub struct OpenedSnapshot {
    pub root: PathBuf,
    pub repository: Repository,
    pub id: String,
    pub header: SnapshotHeader,
}

/// An opened volume and what it is.
pub struct Opened {
    pub volume: Arc<dyn Volume>,
    pub kind: VolumeKind,
    /// The name users know it by: the path as given, the copy's name ([`CopyPaths::dest`]),
    /// or the snapshot's 12-character short id.
    pub name: String,
    /// The paths that hold it (the image or device, every file of a copy, the repository
    /// directory): nothing may be written to them while it is read.
    pub members: Vec<PathBuf>,
    /// Set for a snapshot.
    pub snapshot: Option<OpenedSnapshot>,
    /// Set for a copy.
    pub copy: Option<copy::CopyInfo>,
}

impl Opened {
    /// "snapshot 3fa2c1d0e9b8", "copy /backups/sda1.img", "VHDX image disk.vhdx".
    pub fn describe(&self) -> String {
        format!("{} {}", self.kind, self.name)
    }
}

/// Works out what `args` name (one path, or `REPO SNAPSHOT`) without opening a volume.
/// Warnings (unreadable snapshot files skipped while resolving `latest`) go to `progress`.
/// An encrypted repository is [`Error::PasswordRequired`]: see [`identify_with`].
pub fn identify<A: AsRef<OsStr>>(args: &[A], progress: &dyn Progress) -> Result<Target> {
    identify_with(args, &NoPassword, progress)
}

/// [`identify`], opening a repository with the password from `passwords`
/// ([`Repository::open_with`]).
pub fn identify_with<A: AsRef<OsStr>>(
    args: &[A],
    passwords: &dyn PasswordSource,
    progress: &dyn Progress,
) -> Result<Target> {
    match args {
        [repo, selector] => {
            let repository = Repository::open_with(Path::new(repo.as_ref()), passwords)?;
            let root = repository.root().to_path_buf();
            let selector = selector.as_ref().to_string_lossy();
            let id = repository.resolve_warn(&selector, progress)?;
            Ok(Target::Snapshot {
                root,
                repository,
                id,
            })
        }
        [path] => identify_path(Path::new(path.as_ref())),
        _ => Err(Error::InvalidArgument(format!(
            "expected one path or REPO SNAPSHOT, got {} arguments",
            args.len()
        ))),
    }
}

fn identify_path(path: &Path) -> Result<Target> {
    if let Some(paths) = copy::locate(path) {
        return Ok(Target::Copy {
            path: path.to_path_buf(),
            paths,
        });
    }
    let not = |detail: &str| Error::NotAVolume {
        path: path.to_path_buf(),
        detail: detail.into(),
    };
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(not("it does not exist"));
        }
        Err(e) => return Err(not(&format!("cannot read its metadata: {e}"))),
    };
    if meta.is_dir() {
        // An encrypted repository opened without a password still shows it is one.
        let is_repository = path.join("config").is_file()
            && matches!(
                Repository::open(path),
                Ok(_) | Err(Error::PasswordRequired { .. } | Error::KeySlot { .. })
            );
        let detail = if is_repository {
            "it is a repository; name a snapshot in it too"
        } else {
            "it is a directory without copy metadata"
        };
        return Err(not(detail));
    }
    if meta.is_file() {
        let format = image::detect(path)?;
        return Ok(Target::Image {
            path: path.to_path_buf(),
            format,
        });
    }
    // Not a regular file: a block device is the only other thing volback reads.
    let source = Source::open(path).map_err(|e| match e {
        Error::BadSource { .. } => not("it is neither a block device nor a regular file"),
        e => e,
    })?;
    match source.geometry().kind {
        ObjectKind::BlockDevice => Ok(Target::Device {
            path: path.to_path_buf(),
        }),
        _ => Err(not("it is neither a block device nor a regular file")),
    }
}

impl Target {
    /// The kind of volume this target opens as.
    pub fn kind(&self) -> VolumeKind {
        match self {
            Target::Device { .. } => VolumeKind::Device,
            Target::Image { format: None, .. } => VolumeKind::RawImage,
            Target::Image {
                format: Some(ImageFormat::Vhd | ImageFormat::VhdDynamic),
                ..
            } => VolumeKind::Vhd,
            Target::Image {
                format: Some(ImageFormat::Vhdx),
                ..
            } => VolumeKind::Vhdx,
            Target::Image {
                format: Some(ImageFormat::Qcow2),
                ..
            } => VolumeKind::Qcow2,
            Target::Copy { .. } => VolumeKind::Copy,
            Target::Snapshot { .. } => VolumeKind::Snapshot,
        }
    }

    /// Opens the volume.
    pub fn open(self, options: &OpenOptions) -> Result<Opened> {
        let kind = self.kind();
        let opened = match self {
            Target::Device { path } | Target::Image { path, format: None } => Opened {
                volume: Arc::new(Source::open(&path)?),
                kind,
                name: path.display().to_string(),
                members: vec![path],
                snapshot: None,
                copy: None,
            },
            Target::Image {
                path,
                format: Some(format),
            } => Opened {
                volume: Arc::from(image::open(format, &path)?),
                kind,
                name: path.display().to_string(),
                members: vec![path],
                snapshot: None,
                copy: None,
            },
            Target::Copy { path, .. } => {
                let opened = copy::open_copy(&path)?;
                let members = opened.members();
                let (volume, info) = opened.split();
                Opened {
                    volume: Arc::new(volume),
                    kind,
                    name: info.paths.dest().display().to_string(),
                    members,
                    snapshot: None,
                    copy: Some(info),
                }
            }
            Target::Snapshot {
                root,
                repository,
                id,
            } => {
                let volume = SnapshotVolume::open(&repository, &id, options.snapshot_cache)?;
                let header = volume.snapshot().header().clone();
                Opened {
                    volume: Arc::new(volume),
                    kind,
                    name: id[..12.min(id.len())].to_string(),
                    members: vec![root.clone()],
                    snapshot: Some(OpenedSnapshot {
                        root,
                        repository,
                        id,
                        header,
                    }),
                    copy: None,
                }
            }
        };
        Ok(opened)
    }
}

/// Opens what `args` name (one path, or `REPO SNAPSHOT`): [`identify`] then [`Target::open`].
pub fn open<A: AsRef<OsStr>>(
    args: &[A],
    options: &OpenOptions,
    progress: &dyn Progress,
) -> Result<Opened> {
    identify(args, progress)?.open(options)
}

/// [`open`] with the password of an encrypted repository from `passwords`.
pub fn open_with<A: AsRef<OsStr>>(
    args: &[A],
    options: &OpenOptions,
    passwords: &dyn PasswordSource,
    progress: &dyn Progress,
) -> Result<Opened> {
    identify_with(args, passwords, progress)?.open(options)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::Silent;

    fn kind_of(path: &Path) -> Result<VolumeKind> {
        identify(&[path], &Silent).map(|t| t.kind())
    }

    /// A FIFO is refused at once: opening it must not wait for a writer.
    #[cfg(unix)]
    #[test]
    fn a_fifo_is_refused_without_waiting_for_a_writer() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(status.success());
        let e = kind_of(&fifo).unwrap_err();
        assert!(
            matches!(e, Error::NotAVolume { ref path, .. } if *path == fifo),
            "{e}"
        );
        let e = Source::open(&fifo).unwrap_err();
        assert!(matches!(e, Error::BadSource { .. }), "{e}");
    }

    #[test]
    fn identifies_raw_and_formatted_images() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("raw.img");
        std::fs::write(&raw, vec![7u8; 64 * 1024]).unwrap();
        assert_eq!(kind_of(&raw).unwrap(), VolumeKind::RawImage);
        let opened = open(&[&raw], &OpenOptions::default(), &Silent).unwrap();
        assert_eq!(opened.volume.size(), 64 * 1024);
        assert_eq!(opened.members, vec![raw.clone()]);
        assert_eq!(opened.describe(), format!("raw image {}", raw.display()));

        for (format, kind) in [
            (ImageFormat::Qcow2, VolumeKind::Qcow2),
            (ImageFormat::Vhdx, VolumeKind::Vhdx),
            (ImageFormat::VhdDynamic, VolumeKind::Vhd),
            (ImageFormat::Vhd, VolumeKind::Vhd),
        ] {
            let path = dir.path().join(format!("{kind:?}-{format:?}"));
            let w = image::create(format, &path, 4 << 20, &Default::default()).unwrap();
            w.finish().unwrap();
            assert_eq!(kind_of(&path).unwrap(), kind, "{format:?}");
            let opened = open(&[&path], &OpenOptions::default(), &Silent).unwrap();
            assert_eq!(opened.kind, kind);
            assert_eq!(opened.volume.size(), 4 << 20);
        }
    }

    #[test]
    fn a_path_that_is_no_volume_is_named_with_what_was_tried() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such.img");
        let e = kind_of(&missing).unwrap_err();
        assert!(matches!(e, Error::NotAVolume { ref path, .. } if *path == missing));
        let text = e.to_string();
        assert!(
            text.contains("no-such.img") && text.contains("does not exist"),
            "{text}"
        );
        assert!(
            text.contains("copy") && text.contains("block device"),
            "{text}"
        );

        let e = kind_of(dir.path()).unwrap_err();
        assert!(
            e.to_string().contains("directory without copy metadata"),
            "{e}"
        );

        let three = identify(&["a", "b", "c"], &Silent).err().unwrap();
        assert!(matches!(three, Error::InvalidArgument(ref m) if m.contains("got 3")));
    }

    #[test]
    fn repo_snapshot_that_is_no_repository_is_a_volback_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = identify(&[dir.path().as_os_str(), OsStr::new("latest")], &Silent)
            .err()
            .unwrap();
        assert!(matches!(e, Error::NotARepository { .. }), "{e}");
    }
}
