//! The metadata file of a copy (`BASE.json`): what the copy is, where its files are, and
//! whether it is complete.

use super::format::*;
use crate::error::{Error, Result};
use crate::fs::FsInfo;
use crate::source::SourceInfo;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Data layout of a copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CopyFormat {
    /// One sparse raw image file, or raw slices `DEST.000`, `DEST.001`, ….
    Raw,
    /// A directory of `<start>.<length>.copydata.bin` raw slices.
    Bin,
    /// Fixed VHD.
    Vhd,
    /// Dynamic VHD.
    VhdDynamic,
    Vhdx,
    Qcow2,
}

impl CopyFormat {
    pub const ALL: [CopyFormat; 6] = [
        CopyFormat::Raw,
        CopyFormat::Bin,
        CopyFormat::Vhd,
        CopyFormat::VhdDynamic,
        CopyFormat::Vhdx,
        CopyFormat::Qcow2,
    ];

    pub fn name(self) -> &'static str {
        match self {
            CopyFormat::Raw => "raw",
            CopyFormat::Bin => "bin",
            CopyFormat::Vhd => "vhd",
            CopyFormat::VhdDynamic => "vhd-dynamic",
            CopyFormat::Vhdx => "vhdx",
            CopyFormat::Qcow2 => "qcow2",
        }
    }

    /// The image container, for the formats `crate::image` writes.
    pub fn image(self) -> Option<crate::image::ImageFormat> {
        use crate::image::ImageFormat;
        match self {
            CopyFormat::Raw | CopyFormat::Bin => None,
            CopyFormat::Vhd => Some(ImageFormat::Vhd),
            CopyFormat::VhdDynamic => Some(ImageFormat::VhdDynamic),
            CopyFormat::Vhdx => Some(ImageFormat::Vhdx),
            CopyFormat::Qcow2 => Some(ImageFormat::Qcow2),
        }
    }
}

impl std::fmt::Display for CopyFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Parses a name the user chose (`--format`): an unknown one is an
/// [`Error::InvalidArgument`].
impl std::str::FromStr for CopyFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        CopyFormat::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "unknown format {s:?} (expected raw, bin, vhd, vhd-dynamic, vhdx or qcow2)"
                ))
            })
    }
}

/// Whether the data files match the hash list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CopyState {
    /// Data files and hash list agree; the copy can be read.
    Complete,
    /// A copy or an update is under way or was interrupted: the data files may hold a mix of
    /// old and new blocks. Readers refuse the copy; `copy --update` finishes it.
    Updating,
}

/// One data file: bytes `[offset, offset + length)` of the volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataFile {
    /// File name, in the metadata file's directory.
    pub name: String,
    pub offset: u64,
    pub length: u64,
}

/// The hash list file and its checksum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HashesRef {
    pub name: String,
    /// SHA-256 of the whole hash list file, hex.
    pub sha256: String,
}

/// What the blocks of an interrupted update are compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpdateBase {
    /// A new copy: the data files were created empty (every block reads as zeros).
    Zeros,
    /// The hash list named in `hashes` describes the data files before the update.
    Hashes,
}

/// The update in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateRef {
    /// Journal file name.
    pub journal: String,
    /// Random id, also in the journal header (a journal of another update is not used).
    pub id: String,
    pub base: UpdateBase,
}

/// The snapshot an exported copy was written from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotOrigin {
    pub repository: String,
    pub id: String,
}

/// Statistics of a copy or update run (all runs of a resumed update together).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyStats {
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Blocks holding data (not all zeros).
    pub data_blocks: u64,
    /// Blocks read as zeros or skipped as holes.
    pub zero_blocks: u64,
    /// Blocks the filesystem does not use (not read; zeros in the copy).
    pub unused_blocks: u64,
    /// Blocks whose data was written to the copy.
    pub blocks_written: u64,
    /// Blocks that held data in the copy and were turned into zeros (holes punched).
    pub blocks_zeroed: u64,
    /// Bytes of data written.
    pub bytes_written: u64,
    /// Blocks the copy already held (same SHA-256): not written.
    pub unchanged_blocks: u64,
}

impl CopyStats {
    pub(crate) const FIELDS: usize = 8;

    pub(crate) fn to_array(self) -> [u64; Self::FIELDS] {
        [
            self.bytes_read,
            self.data_blocks,
            self.zero_blocks,
            self.unused_blocks,
            self.blocks_written,
            self.blocks_zeroed,
            self.bytes_written,
            self.unchanged_blocks,
        ]
    }

    pub(crate) fn from_array(a: [u64; Self::FIELDS]) -> Self {
        CopyStats {
            bytes_read: a[0],
            data_blocks: a[1],
            zero_blocks: a[2],
            unused_blocks: a[3],
            blocks_written: a[4],
            blocks_zeroed: a[5],
            bytes_written: a[6],
            unchanged_blocks: a[7],
        }
    }

    pub fn add(&mut self, o: &CopyStats) {
        let mut a = self.to_array();
        for (x, y) in a.iter_mut().zip(o.to_array()) {
            *x = x.saturating_add(y);
        }
        *self = CopyStats::from_array(a);
    }
}

/// The metadata JSON (`BASE.json`). Field meanings in docs/FORMAT.md, "Copies".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyMeta {
    pub format: String,
    pub version: u32,
    pub state: CopyState,
    pub container: CopyFormat,
    /// Volume size in bytes.
    pub size: u64,
    pub block_size: u32,
    pub block_count: u64,
    pub source: SourceInfo,
    pub filesystem: Option<FsInfo>,
    /// The partition layout, for a partitioned disk.
    #[serde(default)]
    pub layout: Option<crate::fs::disk::DiskLayout>,
    pub all_blocks: bool,
    #[serde(default)]
    pub snapshot: Option<SnapshotOrigin>,
    pub files: Vec<DataFile>,
    /// `None` only while a new copy is being written.
    pub hashes: Option<HashesRef>,
    pub update: Option<UpdateRef>,
    pub created: String,
    pub updated: String,
    /// Statistics of the last completed copy or update.
    #[serde(default)]
    pub stats: Option<CopyStats>,
    /// True when the source was not mounted read-write while the last copy or update read
    /// it (the copy is one point in time, which change tracking can trust); absent in copies
    /// written before change tracking.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistent: Option<bool>,
}

/// Where a copy's metadata lives: `base` + `.json`, `.sha256`, `.journal`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyPaths {
    /// The directory holding the metadata, hash list and (except for BIN copies, whose
    /// directory it is) the data files.
    pub dir: PathBuf,
    /// File name of the base (without extension).
    pub base: String,
}

impl CopyPaths {
    /// The metadata paths for a new copy at `dest`.
    pub fn for_dest(dest: &Path, format: CopyFormat) -> Result<CopyPaths> {
        if format == CopyFormat::Bin {
            return Ok(CopyPaths {
                dir: dest.to_path_buf(),
                base: BASE_IN_DIR.into(),
            });
        }
        let name = dest
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| !n.is_empty())
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "{} does not end in a file name (UTF-8)",
                    dest.display()
                ))
            })?;
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        Ok(CopyPaths {
            dir,
            base: format!("{name}{BASE_SUFFIX}"),
        })
    }

    /// Finds the copy that `path` names: a BIN directory, a single-file copy's data file (or
    /// its first slice's base name), or the metadata file itself. `None`: no copy there.
    pub fn locate(path: &Path) -> Option<CopyPaths> {
        if path.is_dir() {
            return path
                .join(format!("{BASE_IN_DIR}{META_EXT}"))
                .is_file()
                .then(|| CopyPaths {
                    dir: path.to_path_buf(),
                    base: BASE_IN_DIR.into(),
                });
        }
        let name = path.file_name()?.to_str()?;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if let Some(base) = name.strip_suffix(META_EXT)
            && (base.ends_with(BASE_SUFFIX) || base == BASE_IN_DIR)
            && path.is_file()
        {
            return Some(CopyPaths {
                dir,
                base: base.into(),
            });
        }
        let base = format!("{name}{BASE_SUFFIX}");
        dir.join(format!("{base}{META_EXT}"))
            .is_file()
            .then_some(CopyPaths { dir, base })
    }

    pub fn meta(&self) -> PathBuf {
        self.dir.join(format!("{}{META_EXT}", self.base))
    }

    pub fn hashes_name(&self) -> String {
        format!("{}{HASHES_EXT}", self.base)
    }

    pub fn journal_name(&self) -> String {
        format!("{}{JOURNAL_EXT}", self.base)
    }

    /// A file named in the metadata (already checked to be a plain name).
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// A name from the metadata must be one plain path component: no separators, no `..`.
fn check_name(name: &str, what: &str, path: &Path) -> Result<()> {
    let bad = name.is_empty()
        || name == "."
        || name == ".."
        || name.len() > 255
        || name
            .chars()
            .any(|c| c == '/' || c == '\\' || c == '\0' || c == ':');
    if bad {
        return Err(bad_copy(
            path,
            format!("the metadata names {what} {name:?}, which is not a plain file name"),
        ));
    }
    Ok(())
}

pub(crate) fn bad_copy(path: &Path, detail: impl Into<String>) -> Error {
    Error::BadCopy {
        path: path.to_path_buf(),
        detail: detail.into(),
    }
}

impl CopyMeta {
    /// Reads and checks the metadata at `paths`.
    pub fn load(paths: &CopyPaths) -> Result<CopyMeta> {
        let path = paths.meta();
        let bytes = match std::fs::metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(bad_copy(&path, "the metadata file is missing"));
            }
            _ => crate::repo::fsio::read_limited(&path, META_MAX_LEN, "copy metadata")?,
        };
        CopyMeta::parse(&bytes, &path)
    }

    /// Parses and checks metadata bytes read from `path`.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<CopyMeta> {
        let value: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| bad_copy(path, format!("the metadata is not valid JSON ({e})")))?;
        if value.get("format").and_then(|f| f.as_str()) != Some(META_FORMAT) {
            return Err(bad_copy(
                path,
                format!("the metadata's \"format\" is not {META_FORMAT:?}"),
            ));
        }
        let version = value.get("version").and_then(|v| v.as_u64());
        if version != Some(META_VERSION_V1 as u64) {
            return Err(Error::UnsupportedVersion {
                what: "copy metadata",
                path: path.to_path_buf(),
                found: version.map_or(0, |v| v.min(u32::MAX as u64) as u32),
                supported: META_VERSION_V1,
            });
        }
        let meta: CopyMeta = serde_json::from_value(value)
            .map_err(|e| bad_copy(path, format!("the metadata is malformed ({e})")))?;
        meta.check(path)?;
        Ok(meta)
    }

    /// Checks internal consistency (sizes, block count, file ranges, names).
    pub fn check(&self, path: &Path) -> Result<()> {
        crate::repo::check_block_size(self.block_size)
            .map_err(|e| bad_copy(path, format!("bad block size: {e}")))?;
        if self.size == 0 {
            return Err(bad_copy(path, "the volume size is 0"));
        }
        if self.block_count != self.size.div_ceil(self.block_size as u64) {
            return Err(bad_copy(
                path,
                format!(
                    "block_count {} does not match size {} / block_size {}",
                    self.block_count, self.size, self.block_size
                ),
            ));
        }
        if self.files.is_empty() || self.files.len() > MAX_FILES {
            return Err(bad_copy(
                path,
                format!(
                    "{} data files (expected 1 to {MAX_FILES})",
                    self.files.len()
                ),
            ));
        }
        if self.container.image().is_some() && self.files.len() != 1 {
            return Err(bad_copy(
                path,
                format!("a {} copy has exactly one data file", self.container),
            ));
        }
        let mut at = 0u64;
        for f in &self.files {
            check_name(&f.name, "data file", path)?;
            if f.offset != at || f.length == 0 {
                return Err(bad_copy(
                    path,
                    format!(
                        "data file {} covers [{}, +{}) but the previous one ends at {at}",
                        f.name, f.offset, f.length
                    ),
                ));
            }
            at = f
                .offset
                .checked_add(f.length)
                .ok_or_else(|| bad_copy(path, format!("data file {} ends past 2^64", f.name)))?;
        }
        if at != self.size {
            return Err(bad_copy(
                path,
                format!(
                    "the data files cover {at} bytes, the volume has {}",
                    self.size
                ),
            ));
        }
        if let Some(h) = &self.hashes {
            check_name(&h.name, "hash list", path)?;
            if h.sha256.len() != 64 || !h.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad_copy(
                    path,
                    "the hash list checksum is not 64 hex digits",
                ));
            }
        }
        match (self.state, &self.hashes, &self.update) {
            (CopyState::Complete, None, _) => {
                return Err(bad_copy(path, "a complete copy without a hash list"));
            }
            (CopyState::Updating, _, None) => {
                return Err(bad_copy(path, "an update in progress without its journal"));
            }
            (_, None, Some(u)) if u.base == UpdateBase::Hashes => {
                return Err(bad_copy(path, "an update based on a missing hash list"));
            }
            _ => {}
        }
        if let Some(u) = &self.update {
            check_name(&u.journal, "journal", path)?;
        }
        Ok(())
    }

    /// Writes the metadata atomically and durably (temporary file, fsync, rename, directory
    /// fsync).
    pub fn store(&self, paths: &CopyPaths) -> Result<()> {
        let mut json = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::internal("copy metadata", format!("cannot encode it: {e}")))?;
        json.push(b'\n');
        crate::repo::fsio::atomic_write(&paths.meta(), &json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn sample() -> CopyMeta {
        CopyMeta {
            format: META_FORMAT.into(),
            version: META_VERSION_V1,
            state: CopyState::Complete,
            container: CopyFormat::Bin,
            size: 10 << 20,
            block_size: 1 << 20,
            block_count: 10,
            source: SourceInfo {
                path: "/dev/x".into(),
                kind: "file".into(),
                size: 10 << 20,
                logical_sector_size: 512,
                physical_sector_size: 4096,
            },
            filesystem: None,
            layout: None,
            all_blocks: false,
            snapshot: None,
            files: vec![
                DataFile {
                    name: "0.4194304.copydata.bin".into(),
                    offset: 0,
                    length: 4 << 20,
                },
                DataFile {
                    name: "4194304.6291456.copydata.bin".into(),
                    offset: 4 << 20,
                    length: 6 << 20,
                },
            ],
            hashes: Some(HashesRef {
                name: "volback-copy.sha256".into(),
                sha256: "00".repeat(32),
            }),
            update: None,
            created: "t".into(),
            updated: "t".into(),
            stats: None,
            consistent: None,
        }
    }

    #[test]
    fn round_trip_and_rejections() {
        let p = Path::new("m.json");
        let m = sample();
        let bytes = serde_json::to_vec(&m).unwrap();
        assert_eq!(CopyMeta::parse(&bytes, p).unwrap(), m);

        let mut bad = m.clone();
        bad.files[1].name = "../../etc/passwd".into();
        assert!(CopyMeta::parse(&serde_json::to_vec(&bad).unwrap(), p).is_err());
        let mut bad = m.clone();
        bad.files[1].offset += 1;
        assert!(CopyMeta::parse(&serde_json::to_vec(&bad).unwrap(), p).is_err());
        let mut bad = m.clone();
        bad.block_count = 11;
        assert!(CopyMeta::parse(&serde_json::to_vec(&bad).unwrap(), p).is_err());
        let mut bad = m.clone();
        bad.version = 2;
        assert!(matches!(
            CopyMeta::parse(&serde_json::to_vec(&bad).unwrap(), p),
            Err(Error::UnsupportedVersion { found: 2, .. })
        ));
        let mut bad = m.clone();
        bad.state = CopyState::Updating;
        assert!(CopyMeta::parse(&serde_json::to_vec(&bad).unwrap(), p).is_err());
        let mut bad = m;
        bad.files[1].length = u64::MAX;
        assert!(CopyMeta::parse(&serde_json::to_vec(&bad).unwrap(), p).is_err());
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = CopyMeta::parse(&data, Path::new("m.json"));
        }

        #[test]
        fn mutated_metadata_never_panics(pos in 0usize..2000, byte in any::<u8>()) {
            let mut bytes = serde_json::to_vec(&sample()).unwrap();
            let i = pos % bytes.len();
            bytes[i] = byte;
            let _ = CopyMeta::parse(&bytes, Path::new("m.json"));
        }
    }
}
