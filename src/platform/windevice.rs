//! Windows disks and volumes as data: device paths (`\\.\PhysicalDriveN`, `\\.\X:`,
//! `\\?\Volume{GUID}\`, VSS shadow copies `\\?\GLOBALROOT\Device\HarddiskVolumeShadowCopyN`) and
//! the output buffers of the device ioctls volback issues, parsed from byte slices with every
//! length and value checked; the `FSCTL_GET_VOLUME_BITMAP` pieces put together and compared with
//! volback's own reading of NTFS `$Bitmap`; VSS result codes named. **Experimental**: the ioctls themselves
//! (in `windows.rs`) have not run on real Windows; wine answers none of them for image-backed
//! drives (docs/WINDOWS.md).
//!
//! Compiled on every platform, so that the parsers are tested — property tests included:
//! random and truncated buffers and hostile paths give an error, never a panic — by the Linux
//! test suite too. Layouts are those of <winioctl.h> on x86_64 (little-endian, natural
//! alignment); each parser quotes its structure.

use std::fmt;

/// Why a device path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DevicePathError {
    #[error("{path:?} is not a Windows device path: {why}")]
    Invalid { path: String, why: &'static str },
}

/// Why an ioctl output buffer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IoctlBufferError {
    #[error("the {what} returned {got} bytes, fewer than the {need} it must hold")]
    Short {
        what: &'static str,
        need: usize,
        got: usize,
    },
    #[error("the {what} is not valid: {detail}")]
    Invalid { what: &'static str, detail: String },
}

/// A disk or volume named in the Windows device namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DevicePath {
    /// `\\.\PhysicalDriveN`: a whole disk.
    PhysicalDrive(u32),
    /// `\\.\X:`: the volume mounted as drive letter X (upper case).
    DriveLetter(char),
    /// `\\?\Volume{GUID}` (with or without the trailing `\`): a volume by its GUID, in
    /// lower case.
    VolumeGuid(String),
    /// `\\?\GLOBALROOT\Device\HarddiskVolumeShadowCopyN`: a VSS shadow copy of a volume (the
    /// device object `IVssBackupComponents::GetSnapshotProperties` names).
    ShadowCopy(u32),
}

impl DevicePath {
    /// True for a whole disk (restores onto it need no volume lock).
    pub fn is_disk(&self) -> bool {
        matches!(self, DevicePath::PhysicalDrive(_))
    }

    /// The volume name VSS takes (`IVssBackupComponents::AddToSnapshotSet`): a drive root
    /// (`C:\`) or a volume GUID path with its trailing backslash. `None` for a whole disk and
    /// for a shadow copy, of which no shadow copy is taken.
    pub fn vss_volume_name(&self) -> Option<String> {
        match self {
            DevicePath::DriveLetter(c) => Some(format!("{c}:\\")),
            DevicePath::VolumeGuid(g) => Some(format!(r"\\?\Volume{{{g}}}\")),
            DevicePath::PhysicalDrive(_) | DevicePath::ShadowCopy(_) => None,
        }
    }
}

impl fmt::Display for DevicePath {
    /// The path `CreateFileW` opens (no trailing backslash: that would open the root directory
    /// of the volume instead of the volume).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DevicePath::PhysicalDrive(n) => write!(f, r"\\.\PhysicalDrive{n}"),
            DevicePath::DriveLetter(c) => write!(f, r"\\.\{c}:"),
            DevicePath::VolumeGuid(g) => write!(f, r"\\?\Volume{{{g}}}"),
            DevicePath::ShadowCopy(n) => write!(f, r"{SHADOW_COPY_PREFIX}{n}"),
        }
    }
}

/// Longest device path accepted (a volume GUID path is 48 characters, a shadow copy's at most
/// 57).
const MAX_DEVICE_PATH: usize = 64;

/// The device objects of VSS shadow copies, numbered from 1 in the order they were made.
pub const SHADOW_COPY_PREFIX: &str = r"\\?\GLOBALROOT\Device\HarddiskVolumeShadowCopy";

/// True when `path` is in the device namespace (`\\.\` or `\\?\`): it must then parse as a
/// [`DevicePath`] or be refused, never be taken as a file name.
pub fn is_device_namespace(path: &str) -> bool {
    let b = path.as_bytes();
    b.len() >= 4
        && b[0] == b'\\'
        && b[1] == b'\\'
        && (b[2] == b'.' || b[2] == b'?')
        && b[3] == b'\\'
}

/// Parses a disk or volume path. Case-insensitive prefix and names; `\\.\` and `\\?\` are
/// both accepted before each form. Refused with a reason: anything after the device name (a
/// file on the volume), forward slashes, drive numbers with signs, leading zeros or over
/// 4 digits, letters outside A–Z, malformed GUIDs, NUL and other control characters, and
/// under `GLOBALROOT` anything but a shadow copy (`HarddiskVolumeShadowCopyN`, N from 1 with
/// no leading zeros and at most 10 digits, below 2^32).
pub fn parse_device_path(path: &str) -> Result<DevicePath, DevicePathError> {
    let bad = |why| {
        Err(DevicePathError::Invalid {
            path: path.chars().take(MAX_DEVICE_PATH + 8).collect(),
            why,
        })
    };
    if path.len() > MAX_DEVICE_PATH {
        return bad("too long for a disk or volume name");
    }
    if path.chars().any(char::is_control) {
        return bad("it contains control characters");
    }
    if path.contains('/') {
        return bad(r"write backslashes (\\.\X:), not forward slashes");
    }
    if !is_device_namespace(path) {
        return bad(r"it does not start with \\.\ or \\?\");
    }
    let rest = &path[4..];
    let lower = rest.to_ascii_lowercase();
    if let Some(device) = lower.strip_prefix(r"globalroot\") {
        let Some(n) = device.strip_prefix(r"device\harddiskvolumeshadowcopy") else {
            return bad(
                r"under GLOBALROOT only shadow copies are read (\\?\GLOBALROOT\Device\HarddiskVolumeShadowCopyN); give \\.\PhysicalDriveN, \\.\X: or \\?\Volume{GUID} otherwise",
            );
        };
        let digits = n.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return bad("HarddiskVolumeShadowCopy must be followed by a shadow copy number");
        }
        if digits < n.len() {
            return bad("name the shadow copy, not a file or directory on it");
        }
        if n.len() > 1 && n.starts_with('0') {
            return bad("a shadow copy number has no leading zeros");
        }
        return match n.parse::<u32>() {
            Ok(0) => bad("shadow copies are numbered from 1"),
            Ok(n) if digits <= 10 => Ok(DevicePath::ShadowCopy(n)),
            _ => bad("a shadow copy number is below 2^32"),
        };
    }
    if let Some(n) = lower.strip_prefix("physicaldrive") {
        if n.is_empty() || n.len() > 4 || !n.bytes().all(|b| b.is_ascii_digit()) {
            return bad("PhysicalDrive must be followed by a disk number (0 to 9999)");
        }
        if n.len() > 1 && n.starts_with('0') {
            return bad("a disk number has no leading zeros");
        }
        return match n.parse() {
            Ok(n) => Ok(DevicePath::PhysicalDrive(n)),
            Err(_) => bad("PhysicalDrive must be followed by a disk number (0 to 9999)"),
        };
    }
    if let Some(g) = lower.strip_prefix("volume{") {
        let g = g.strip_suffix('\\').unwrap_or(g);
        let Some(g) = g.strip_suffix('}') else {
            return bad("a volume GUID ends with }");
        };
        let groups: Vec<&str> = g.split('-').collect();
        let lens: Vec<usize> = groups.iter().map(|s| s.len()).collect();
        if lens != [8, 4, 4, 4, 12] || !g.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit()) {
            return bad("a volume GUID is {xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx} in hexadecimal");
        }
        return Ok(DevicePath::VolumeGuid(g.to_string()));
    }
    let b = rest.as_bytes();
    if b.len() >= 2 && b[1] == b':' {
        if !b[0].is_ascii_alphabetic() {
            return bad("a drive letter is A to Z");
        }
        if b.len() > 2 {
            return bad(r"name the volume (\\.\X:), not a file or directory on it");
        }
        return Ok(DevicePath::DriveLetter(char::from(
            b[0].to_ascii_uppercase(),
        )));
    }
    bad(r"give \\.\PhysicalDriveN, \\.\X: or \\?\Volume{GUID}")
}

// ---------------------------------------------------------------------------------------------
// Ioctl output buffers

fn need(what: &'static str, buf: &[u8], n: usize) -> Result<(), IoctlBufferError> {
    if buf.len() < n {
        return Err(IoctlBufferError::Short {
            what,
            need: n,
            got: buf.len(),
        });
    }
    Ok(())
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

fn i64_at(buf: &[u8], at: usize) -> i64 {
    i64::from_le_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
}

fn non_negative(what: &'static str, field: &str, v: i64) -> Result<u64, IoctlBufferError> {
    u64::try_from(v).map_err(|_| IoctlBufferError::Invalid {
        what,
        detail: format!("{field} is negative ({v})"),
    })
}

fn sector_size(what: &'static str, field: &str, v: u32) -> Result<u32, IoctlBufferError> {
    if !(512..=65536).contains(&v) || !v.is_power_of_two() {
        return Err(IoctlBufferError::Invalid {
            what,
            detail: format!("{field} is {v}, not a power of two from 512 to 65536"),
        });
    }
    Ok(v)
}

/// What `IOCTL_DISK_GET_DRIVE_GEOMETRY_EX` says of a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DriveGeometry {
    pub bytes_per_sector: u32,
    pub disk_size: u64,
    /// `MEDIA_TYPE`: 12 fixed, 11 removable, …
    pub media_type: u32,
}

/// `DISK_GEOMETRY_EX` = { `DISK_GEOMETRY` Geometry { LARGE_INTEGER Cylinders; MEDIA_TYPE
/// MediaType; DWORD TracksPerCylinder, SectorsPerTrack, BytesPerSector; } (24 bytes);
/// LARGE_INTEGER DiskSize (at 24); BYTE Data[1]; } — the partition and detection data that
/// may follow are not read.
pub fn parse_drive_geometry_ex(buf: &[u8]) -> Result<DriveGeometry, IoctlBufferError> {
    const WHAT: &str = "drive geometry (IOCTL_DISK_GET_DRIVE_GEOMETRY_EX)";
    need(WHAT, buf, 32)?;
    Ok(DriveGeometry {
        media_type: u32_at(buf, 8),
        bytes_per_sector: sector_size(WHAT, "BytesPerSector", u32_at(buf, 20))?,
        disk_size: non_negative(WHAT, "DiskSize", i64_at(buf, 24))?,
    })
}

/// `GET_LENGTH_INFORMATION` = { LARGE_INTEGER Length; } (`IOCTL_DISK_GET_LENGTH_INFO`, which
/// also answers for volumes): the size in bytes.
pub fn parse_length_info(buf: &[u8]) -> Result<u64, IoctlBufferError> {
    const WHAT: &str = "length (IOCTL_DISK_GET_LENGTH_INFO)";
    need(WHAT, buf, 8)?;
    non_negative(WHAT, "Length", i64_at(buf, 0))
}

/// Logical and physical sector sizes from `IOCTL_STORAGE_QUERY_PROPERTY`
/// (`StorageAccessAlignmentProperty`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccessAlignment {
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
}

/// `STORAGE_ACCESS_ALIGNMENT_DESCRIPTOR` = { DWORD Version; DWORD Size; DWORD
/// BytesPerCacheLine; DWORD BytesOffsetForCacheAlignment; DWORD BytesPerLogicalSector (at 16);
/// DWORD BytesPerPhysicalSector (at 20); DWORD BytesOffsetForSectorAlignment; } (28 bytes;
/// Version and Size are both 28).
pub fn parse_access_alignment(buf: &[u8]) -> Result<AccessAlignment, IoctlBufferError> {
    const WHAT: &str = "access alignment descriptor (IOCTL_STORAGE_QUERY_PROPERTY)";
    need(WHAT, buf, 28)?;
    let size = u32_at(buf, 4) as usize;
    if size < 28 {
        return Err(IoctlBufferError::Invalid {
            what: WHAT,
            detail: format!("its Size is {size}, less than the 28 bytes of the descriptor"),
        });
    }
    let logical = sector_size(WHAT, "BytesPerLogicalSector", u32_at(buf, 16))?;
    let physical = sector_size(WHAT, "BytesPerPhysicalSector", u32_at(buf, 20))?;
    if physical < logical {
        return Err(IoctlBufferError::Invalid {
            what: WHAT,
            detail: format!(
                "physical sectors ({physical}) are smaller than logical ones ({logical})"
            ),
        });
    }
    Ok(AccessAlignment {
        logical_sector_size: logical,
        physical_sector_size: physical,
    })
}

/// One piece of a volume on a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskExtent {
    pub disk_number: u32,
    pub starting_offset: u64,
    pub length: u64,
}

/// Most extents accepted (a volume spanning more disks than this is not one volback reads).
pub const MAX_DISK_EXTENTS: usize = 1024;

/// `VOLUME_DISK_EXTENTS` = { DWORD NumberOfDiskExtents; (4 bytes of padding) DISK_EXTENT
/// Extents[]; } with `DISK_EXTENT` = { DWORD DiskNumber; (padding) LARGE_INTEGER
/// StartingOffset; LARGE_INTEGER ExtentLength; } (24 bytes, from offset 8).
pub fn parse_volume_disk_extents(buf: &[u8]) -> Result<Vec<DiskExtent>, IoctlBufferError> {
    const WHAT: &str = "volume disk extents (IOCTL_VOLUME_GET_VOLUME_DISK_EXTENTS)";
    need(WHAT, buf, 8)?;
    let n = u32_at(buf, 0) as usize;
    if n > MAX_DISK_EXTENTS {
        return Err(IoctlBufferError::Invalid {
            what: WHAT,
            detail: format!("it counts {n} extents, more than {MAX_DISK_EXTENTS}"),
        });
    }
    need(WHAT, buf, 8 + n * 24)?;
    (0..n)
        .map(|i| {
            let at = 8 + i * 24;
            let starting_offset = non_negative(WHAT, "StartingOffset", i64_at(buf, at + 8))?;
            let length = non_negative(WHAT, "ExtentLength", i64_at(buf, at + 16))?;
            if starting_offset.checked_add(length).is_none() {
                return Err(IoctlBufferError::Invalid {
                    what: WHAT,
                    detail: format!("extent {i} ends past 2^64"),
                });
            }
            Ok(DiskExtent {
                disk_number: u32_at(buf, at),
                starting_offset,
                length,
            })
        })
        .collect()
}

/// The cluster bitmap of a volume (`FSCTL_GET_VOLUME_BITMAP`), or the part of it that fitted
/// in the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeBitmap<'a> {
    /// The first cluster (LCN) the bitmap describes.
    pub starting_lcn: u64,
    /// Clusters from `starting_lcn` to the end of the volume (`BitmapSize`).
    pub clusters: u64,
    /// One bit a cluster, least significant bit first; may describe fewer than `clusters`
    /// clusters when the buffer was too small (`ERROR_MORE_DATA`): see [`Self::described`].
    pub bits: &'a [u8],
}

impl VolumeBitmap<'_> {
    /// How many clusters the bytes at hand describe.
    pub fn described(&self) -> u64 {
        self.clusters.min(self.bits.len() as u64 * 8)
    }

    /// Whether cluster `lcn` is in use; `None` outside what the buffer describes.
    pub fn is_used(&self, lcn: u64) -> Option<bool> {
        let i = lcn.checked_sub(self.starting_lcn)?;
        if i >= self.described() {
            return None;
        }
        Some(self.bits[(i / 8) as usize] & (1 << (i % 8)) != 0)
    }
}

/// `VOLUME_BITMAP_BUFFER` = { LARGE_INTEGER StartingLcn; LARGE_INTEGER BitmapSize; BYTE
/// Buffer[]; }. A buffer holding fewer bytes than `BitmapSize` needs is the first part of the
/// bitmap (the call is then repeated from a later LCN), not an error.
pub fn parse_volume_bitmap(buf: &[u8]) -> Result<VolumeBitmap<'_>, IoctlBufferError> {
    const WHAT: &str = "volume bitmap (FSCTL_GET_VOLUME_BITMAP)";
    need(WHAT, buf, 16)?;
    let starting_lcn = non_negative(WHAT, "StartingLcn", i64_at(buf, 0))?;
    let clusters = non_negative(WHAT, "BitmapSize", i64_at(buf, 8))?;
    let bits = &buf[16..];
    let full = clusters.div_ceil(8);
    Ok(VolumeBitmap {
        starting_lcn,
        clusters,
        bits: &bits[..(bits.len() as u64).min(full) as usize],
    })
}

/// The first cluster that `windows` (`FSCTL_GET_VOLUME_BITMAP`) and `own` (volback's own
/// reading of a bitmap such as NTFS `$Bitmap`: one bit a cluster from cluster 0, least
/// significant bit first) mark differently, among the clusters both describe; `None` when
/// they agree.
pub fn first_bitmap_difference(windows: &VolumeBitmap<'_>, own: &[u8]) -> Option<u64> {
    let end = windows
        .starting_lcn
        .saturating_add(windows.described())
        .min(own.len() as u64 * 8);
    (windows.starting_lcn..end).find(|&lcn| {
        let mine = own[(lcn / 8) as usize] & (1 << (lcn % 8)) != 0;
        windows.is_used(lcn) != Some(mine)
    })
}

/// Largest cluster bitmap put together from `FSCTL_GET_VOLUME_BITMAP` (1 GiB: 2^33 clusters,
/// 32 TiB in 4 KiB clusters); a larger volume is not compared.
pub const MAX_VOLUME_BITMAP_BYTES: u64 = 1 << 30;

/// The whole cluster bitmap of a volume, put together from the pieces successive
/// `FSCTL_GET_VOLUME_BITMAP` calls return: ask from [`Self::next_lcn`], give each output buffer
/// to [`Self::add`] until it says the bitmap is complete. Each piece must start where the last
/// ended (or on the byte boundary before it: Windows rounds `StartingLcn` down to a multiple of
/// 8), describe at least one new cluster, and count the same clusters for the volume.
#[derive(Debug, Clone, Default)]
pub struct BitmapAssembly {
    bits: Vec<u8>,
    /// Clusters of the volume, known from the first piece.
    clusters: Option<u64>,
    next: u64,
}

impl BitmapAssembly {
    /// The LCN to ask for next (`STARTING_LCN_INPUT_BUFFER`).
    pub fn next_lcn(&self) -> u64 {
        self.next
    }

    /// Adds one output buffer; `Ok(true)` once every cluster of the volume is described.
    pub fn add(&mut self, buf: &[u8]) -> Result<bool, IoctlBufferError> {
        const WHAT: &str = "volume bitmap (FSCTL_GET_VOLUME_BITMAP)";
        let invalid = |detail: String| IoctlBufferError::Invalid { what: WHAT, detail };
        let piece = parse_volume_bitmap(buf)?;
        if piece.starting_lcn > self.next
            || self.next - piece.starting_lcn >= 8
            || !piece.starting_lcn.is_multiple_of(8)
        {
            return Err(invalid(format!(
                "it starts at cluster {} where cluster {} was asked for",
                piece.starting_lcn, self.next
            )));
        }
        let total = piece
            .starting_lcn
            .checked_add(piece.clusters)
            .ok_or_else(|| invalid("its clusters end past 2^64".into()))?;
        match self.clusters {
            None => {
                if total.div_ceil(8) > MAX_VOLUME_BITMAP_BYTES {
                    return Err(invalid(format!(
                        "the volume has {total} clusters, more than volback compares"
                    )));
                }
                self.clusters = Some(total);
                self.bits = vec![0; total.div_ceil(8) as usize];
            }
            Some(t) if t != total => {
                return Err(invalid(format!(
                    "it counts {total} clusters where an earlier piece counted {t}"
                )));
            }
            Some(_) => {}
        }
        let end = piece.starting_lcn + piece.described();
        if end <= self.next {
            return Err(invalid(format!(
                "it describes no cluster from {} on",
                self.next
            )));
        }
        let from = (piece.starting_lcn / 8) as usize;
        let bytes = piece.described().div_ceil(8) as usize;
        self.bits[from..from + bytes].copy_from_slice(&piece.bits[..bytes]);
        self.next = end;
        Ok(end == total)
    }

    /// The bitmap (one bit a cluster from cluster 0, least significant bit first) and the
    /// number of clusters of the volume, once [`Self::add`] said it is complete; `None` before.
    pub fn finish(self) -> Option<(Vec<u8>, u64)> {
        let clusters = self.clusters?;
        (self.next == clusters).then_some((self.bits, clusters))
    }
}

/// How two cluster bitmaps of one volume differ: Windows' (`FSCTL_GET_VOLUME_BITMAP`) and
/// volback's own reading of NTFS `$Bitmap`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BitmapComparison {
    /// Clusters both describe.
    pub compared: u64,
    /// Clusters Windows marks used and `$Bitmap` free: a map made from `$Bitmap` would skip
    /// them. The first of them, and how many.
    pub first_used_only_by_windows: Option<u64>,
    pub used_only_by_windows: u64,
    /// Clusters `$Bitmap` marks used and Windows free (read for nothing, never lost).
    pub first_used_only_by_own: Option<u64>,
    pub used_only_by_own: u64,
}

impl BitmapComparison {
    /// True when a backup from `$Bitmap` reads every cluster Windows says is used.
    pub fn own_covers_windows(&self) -> bool {
        self.used_only_by_windows == 0
    }
}

/// Compares `windows` and `own`, two bitmaps from cluster 0 (one bit a cluster, least
/// significant bit first), over the first `clusters` clusters both describe. A byte at a time
/// where they agree.
pub fn compare_bitmaps(windows: &[u8], own: &[u8], clusters: u64) -> BitmapComparison {
    let clusters = clusters
        .min(windows.len() as u64 * 8)
        .min(own.len() as u64 * 8);
    let mut c = BitmapComparison {
        compared: clusters,
        ..Default::default()
    };
    let bytes = clusters.div_ceil(8) as usize;
    for (i, (&w, &o)) in windows[..bytes].iter().zip(&own[..bytes]).enumerate() {
        // Bits past the last cluster are not compared.
        let valid = match clusters - i as u64 * 8 {
            n if n >= 8 => 0xFF,
            n => (1u8 << n) - 1,
        };
        let (only_w, only_o) = (w & !o & valid, o & !w & valid);
        let first = |bits: u8| i as u64 * 8 + u64::from(bits.trailing_zeros());
        if only_w != 0 {
            c.first_used_only_by_windows.get_or_insert(first(only_w));
            c.used_only_by_windows += u64::from(only_w.count_ones());
        }
        if only_o != 0 {
            c.first_used_only_by_own.get_or_insert(first(only_o));
            c.used_only_by_own += u64::from(only_o.count_ones());
        }
    }
    c
}

/// What a VSS (or COM) result code means, for messages: its `vsserror.h` name and a hint, or
/// the code in hexadecimal when volback does not know it.
pub fn vss_result_text(hr: u32) -> String {
    let known = match hr {
        0x8004_2301 => "VSS_E_BAD_STATE: the calls were made in the wrong order",
        0x8004_2302 => "VSS_E_UNEXPECTED: see the Application event log",
        0x8004_2304 => "VSS_E_PROVIDER_NOT_REGISTERED",
        0x8004_2306 => "VSS_E_PROVIDER_VETO: the shadow copy provider refused",
        0x8004_2308 => "VSS_E_OBJECT_NOT_FOUND",
        0x0004_230B => "VSS_S_ASYNC_CANCELLED: the operation was cancelled",
        0x8004_230C => "VSS_E_VOLUME_NOT_SUPPORTED: this volume cannot have shadow copies",
        0x8004_230E => "VSS_E_VOLUME_NOT_SUPPORTED_BY_PROVIDER",
        0x8004_230F => "VSS_E_UNEXPECTED_PROVIDER_ERROR",
        0x8004_2312 => "VSS_E_MAXIMUM_NUMBER_OF_VOLUMES_REACHED",
        0x8004_2313 => "VSS_E_FLUSH_WRITES_TIMEOUT: the system was too busy to freeze writes",
        0x8004_2314 => "VSS_E_HOLD_WRITES_TIMEOUT: the system was too busy to hold writes",
        0x8004_2315 => "VSS_E_UNEXPECTED_WRITER_ERROR",
        0x8004_2316 => "VSS_E_SNAPSHOT_SET_IN_PROGRESS: another shadow copy is being made; retry",
        0x8004_2317 => "VSS_E_MAXIMUM_NUMBER_OF_SNAPSHOTS_REACHED",
        0x8004_2318 => "VSS_E_WRITER_INFRASTRUCTURE: is the VSS service (and its writers) running?",
        0x8004_2319 => "VSS_E_WRITER_NOT_RESPONDING",
        0x8004_231B => "VSS_E_UNSUPPORTED_CONTEXT",
        0x8004_231D => "VSS_E_VOLUME_IN_USE",
        0x8004_231F => "VSS_E_INSUFFICIENT_STORAGE: not enough free space for the shadow copy",
        0x8004_232F => "VSS_E_NOT_SUPPORTED",
        0x8000_4001 => "E_NOTIMPL: this system has no working VSS (wine?)",
        0x8000_4005 => "E_FAIL",
        0x8007_0005 => "E_ACCESSDENIED: run volback as an administrator (backup operators too)",
        0x8007_0057 => "E_INVALIDARG",
        0x8007_000E => "E_OUTOFMEMORY",
        0x8000_FFFF => "E_UNEXPECTED",
        0x8004_0154 => "REGDB_E_CLASSNOTREG: the VSS classes are not registered",
        0x8007_0422 => "the VSS service is disabled",
        _ => return format!("0x{hr:08X}"),
    };
    format!("0x{hr:08X} {known}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn device_paths_in_every_accepted_form() {
        let ok = |s: &str| parse_device_path(s).unwrap();
        assert_eq!(ok(r"\\.\PhysicalDrive0"), DevicePath::PhysicalDrive(0));
        assert_eq!(ok(r"\\.\physicaldrive12"), DevicePath::PhysicalDrive(12));
        assert_eq!(
            ok(r"\\?\PHYSICALDRIVE9999"),
            DevicePath::PhysicalDrive(9999)
        );
        assert_eq!(ok(r"\\.\c:"), DevicePath::DriveLetter('C'));
        let guid = "0c6d9f2e-1a2b-11ef-9a3b-000c29a1b2c3";
        let v = ok(&format!(r"\\?\Volume{{{}}}\", guid.to_uppercase()));
        assert_eq!(v, DevicePath::VolumeGuid(guid.into()));
        assert_eq!(v.to_string(), format!(r"\\?\Volume{{{guid}}}"));
        assert_eq!(ok(&v.to_string()), v);
        assert_eq!(ok(r"\\.\D:").to_string(), r"\\.\D:");
        assert!(ok(r"\\.\PhysicalDrive3").is_disk());
        // What GetSnapshotProperties names as m_pwszSnapshotDeviceObject.
        let s = ok(r"\\?\GLOBALROOT\Device\HarddiskVolumeShadowCopy12");
        assert_eq!(s, DevicePath::ShadowCopy(12));
        assert_eq!(
            s.to_string(),
            r"\\?\GLOBALROOT\Device\HarddiskVolumeShadowCopy12"
        );
        assert!(!s.is_disk());
        assert_eq!(
            ok(r"\\.\globalroot\device\harddiskvolumeshadowcopy4294967295"),
            DevicePath::ShadowCopy(u32::MAX)
        );
        // The names VSS takes for the volumes it copies.
        assert_eq!(ok(r"\\.\c:").vss_volume_name().as_deref(), Some("C:\\"));
        assert_eq!(
            ok(&format!(r"\\?\Volume{{{guid}}}")).vss_volume_name(),
            Some(format!(r"\\?\Volume{{{guid}}}\"))
        );
        assert_eq!(ok(r"\\.\PhysicalDrive0").vss_volume_name(), None);
        assert_eq!(s.vss_volume_name(), None);
    }

    #[test]
    fn hostile_device_paths_are_refused_with_a_reason() {
        for (path, why) in [
            (r"\\.\PhysicalDrive", "disk number"),
            (r"\\.\PhysicalDrive-1", "disk number"),
            (r"\\.\PhysicalDrive+1", "disk number"),
            (r"\\.\PhysicalDrive01", "leading zeros"),
            (r"\\.\PhysicalDrive99999", "disk number"),
            (r"\\.\PhysicalDrive1\x", "disk number"),
            (r"\\.\C:\Windows", "not a file"),
            (r"\\.\1:", "A to Z"),
            ("//./C:", "backslashes"),
            (r"\\.\C:\0", "not a file"),
            ("\\\\.\\C:\0", "control"),
            (r"C:\image.img", r"\\.\"),
            (r"\\.\Volume{1234}", "GUID"),
            (
                r"\\?\Volume{0c6d9f2e-1a2b-11ef-9a3b-000c29a1b2c3",
                "ends with }",
            ),
            (r"\\?\Volume{0c6d9f2e-1a2b-11ef-9a3b-000c29a1b2cg}", "GUID"),
            (r"\\.\pipe\x", r"\\.\PhysicalDriveN"),
            (r"\\.\GLOBALROOT\Device\Harddisk0", r"\\.\PhysicalDriveN"),
            (
                r"\\?\GLOBALROOT\Device\HarddiskVolume1",
                "only shadow copies",
            ),
            (
                r"\\?\GLOBALROOT\Device\HarddiskVolumeShadowCopy",
                "shadow copy number",
            ),
            (
                r"\\?\GLOBALROOT\Device\HarddiskVolumeShadowCopy0",
                "numbered from 1",
            ),
            (
                r"\\?\GLOBALROOT\Device\HarddiskVolumeShadowCopy07",
                "leading zeros",
            ),
            (
                r"\\?\GLOBALROOT\Device\HarddiskVolumeShadowCopy4294967296",
                "below 2^32",
            ),
            (
                r"\\?\GLOBALROOT\Device\HarddiskVolumeShadowCopy3\Windows",
                "not a file",
            ),
            (
                r"\\?\GLOBALROOT\Device\HarddiskVolumeShadowCopy-3",
                "shadow copy number",
            ),
            (
                r"\\?\GLOBALROOT\Device\HarddiskVolumeShadowCopy+3",
                "shadow copy number",
            ),
            (
                "//?/GLOBALROOT/Device/HarddiskVolumeShadowCopy3",
                "backslashes",
            ),
        ] {
            let e = parse_device_path(path).unwrap_err().to_string();
            assert!(e.contains(why), "{path:?}: {e}");
        }
        assert!(parse_device_path(&format!(r"\\.\{}", "a".repeat(500))).is_err());
    }

    fn le(fields: &[&[u8]]) -> Vec<u8> {
        fields.concat()
    }

    #[test]
    fn geometry_length_and_alignment_from_captured_layouts() {
        // DISK_GEOMETRY_EX of a 64 MiB fixed disk with 512-byte sectors.
        let geo = le(&[
            &8i64.to_le_bytes(),
            &12u32.to_le_bytes(),
            &255u32.to_le_bytes(),
            &63u32.to_le_bytes(),
            &512u32.to_le_bytes(),
            &(64i64 << 20).to_le_bytes(),
            &[0; 8],
        ]);
        let g = parse_drive_geometry_ex(&geo).unwrap();
        assert_eq!(
            g,
            DriveGeometry {
                bytes_per_sector: 512,
                disk_size: 64 << 20,
                media_type: 12
            }
        );
        assert!(matches!(
            parse_drive_geometry_ex(&geo[..31]),
            Err(IoctlBufferError::Short {
                need: 32,
                got: 31,
                ..
            })
        ));
        assert_eq!(
            parse_length_info(&(1i64 << 40).to_le_bytes()).unwrap(),
            1 << 40
        );
        let e = parse_length_info(&(-1i64).to_le_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.contains("negative"), "{e}");
        let mut align = le(&[
            &28u32.to_le_bytes(),
            &28u32.to_le_bytes(),
            &64u32.to_le_bytes(),
            &0u32.to_le_bytes(),
            &512u32.to_le_bytes(),
            &4096u32.to_le_bytes(),
            &0u32.to_le_bytes(),
        ]);
        assert_eq!(
            parse_access_alignment(&align).unwrap(),
            AccessAlignment {
                logical_sector_size: 512,
                physical_sector_size: 4096
            }
        );
        align[16..20].copy_from_slice(&4096u32.to_le_bytes());
        align[20..24].copy_from_slice(&512u32.to_le_bytes());
        let e = parse_access_alignment(&align).unwrap_err().to_string();
        assert!(e.contains("smaller than logical"), "{e}");
        align[20..24].copy_from_slice(&1000u32.to_le_bytes());
        let e = parse_access_alignment(&align).unwrap_err().to_string();
        assert!(e.contains("power of two"), "{e}");
    }

    #[test]
    fn extents_and_bitmaps_from_captured_layouts() {
        let ext = le(&[
            &2u32.to_le_bytes(),
            &[0; 4],
            &1u32.to_le_bytes(),
            &[0; 4],
            &(1i64 << 20).to_le_bytes(),
            &(100i64 << 20).to_le_bytes(),
            &3u32.to_le_bytes(),
            &[0; 4],
            &0i64.to_le_bytes(),
            &(5i64 << 20).to_le_bytes(),
        ]);
        let e = parse_volume_disk_extents(&ext).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(
            e[0],
            DiskExtent {
                disk_number: 1,
                starting_offset: 1 << 20,
                length: 100 << 20
            }
        );
        assert_eq!(e[1].disk_number, 3);
        assert!(matches!(
            parse_volume_disk_extents(&ext[..40]),
            Err(IoctlBufferError::Short { need: 56, .. })
        ));
        let bm = le(&[
            &10i64.to_le_bytes(),
            &20i64.to_le_bytes(),
            &[0b0000_0101, 0xFF, 0x0F, 0xEE],
        ]);
        let b = parse_volume_bitmap(&bm).unwrap();
        assert_eq!((b.starting_lcn, b.clusters, b.described()), (10, 20, 20));
        assert_eq!(b.bits.len(), 3, "bytes past BitmapSize are not part of it");
        assert_eq!(b.is_used(10), Some(true));
        assert_eq!(b.is_used(11), Some(false));
        assert_eq!(b.is_used(12), Some(true));
        assert_eq!(b.is_used(29), Some(true));
        assert_eq!(b.is_used(30), None);
        assert_eq!(b.is_used(9), None);
        // Cut short (ERROR_MORE_DATA): the first part.
        let part = parse_volume_bitmap(&bm[..17]).unwrap();
        assert_eq!(part.described(), 8);
        assert_eq!(part.is_used(18), None);
    }

    /// VOLUME_BITMAP_BUFFER bytes: StartingLcn, BitmapSize, the bits.
    fn bitmap_buffer(start: u64, clusters: u64, bits: &[u8]) -> Vec<u8> {
        le(&[
            &(start as i64).to_le_bytes(),
            &(clusters as i64).to_le_bytes(),
            bits,
        ])
    }

    /// The pieces Windows would return for `bits` (`clusters` clusters) with output buffers
    /// holding `room` bytes of bitmap, asked from `assembly.next_lcn()` each time.
    fn assemble(bits: &[u8], clusters: u64, room: usize) -> Result<(Vec<u8>, u64), String> {
        let mut a = BitmapAssembly::default();
        for _ in 0..=bits.len() + 1 {
            let start = a.next_lcn() / 8 * 8;
            let from = (start / 8) as usize;
            let to = (from + room).min(bits.len());
            let buf = bitmap_buffer(start, clusters - start, &bits[from..to]);
            if a.add(&buf).map_err(|e| e.to_string())? {
                return a.finish().ok_or_else(|| "complete but no bitmap".into());
            }
        }
        Err("never complete".into())
    }

    #[test]
    fn volume_bitmap_pieces_are_put_together() {
        let bits = [0x0F, 0xF0, 0xAA, 0x55, 0x01];
        for room in 1..=6 {
            assert_eq!(assemble(&bits, 37, room), Ok((bits.to_vec(), 37)), "{room}");
        }
        // A piece that does not start where asked, or counts other clusters, or brings
        // nothing new, is refused.
        let mut a = BitmapAssembly::default();
        assert!(!a.add(&bitmap_buffer(0, 40, &[0xFF])).unwrap());
        assert_eq!(a.next_lcn(), 8);
        let e = a
            .add(&bitmap_buffer(16, 24, &[0xFF]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("asked for"), "{e}");
        let e = a
            .add(&bitmap_buffer(8, 40, &[0xFF]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("earlier piece counted 40"), "{e}");
        let e = a.add(&bitmap_buffer(8, 32, &[])).unwrap_err().to_string();
        assert!(e.contains("no cluster"), "{e}");
        assert!(a.clone().finish().is_none(), "incomplete");
        assert!(a.add(&bitmap_buffer(8, 32, &[0x01; 4])).unwrap());
        assert_eq!(a.finish(), Some((vec![0xFF, 1, 1, 1, 1], 40)));
        let e = BitmapAssembly::default()
            .add(&bitmap_buffer(0, 1 << 40, &[0]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("more than volback compares"), "{e}");
    }

    #[test]
    fn bitmaps_compared_cluster_by_cluster() {
        let same = compare_bitmaps(&[0xFF, 0x0F], &[0xFF, 0x0F], 12);
        assert!(same.own_covers_windows());
        assert_eq!(
            same,
            BitmapComparison {
                compared: 12,
                ..Default::default()
            }
        );
        // Windows uses clusters 9 and 10 that $Bitmap calls free; $Bitmap uses 0 and 1 that
        // Windows calls free; the bits past cluster 12 do not count.
        let c = compare_bitmaps(&[0xFC, 0x06 | 0xF0], &[0xFF, 0x00], 12);
        assert!(!c.own_covers_windows());
        assert_eq!(c.first_used_only_by_windows, Some(9));
        assert_eq!(c.used_only_by_windows, 2);
        assert_eq!(c.first_used_only_by_own, Some(0));
        assert_eq!(c.used_only_by_own, 2);
        // Only what both describe.
        assert_eq!(compare_bitmaps(&[0xFF], &[0x00, 0xFF], 16).compared, 8);
    }

    #[test]
    fn vss_results_are_named() {
        assert!(vss_result_text(0x8004_2318).contains("VSS_E_WRITER_INFRASTRUCTURE"));
        assert!(vss_result_text(0x8000_4001).starts_with("0x80004001 E_NOTIMPL"));
        assert_eq!(vss_result_text(0x1234), "0x00001234");
    }

    proptest! {
        #[test]
        fn bitmaps_put_together_from_any_pieces_are_the_bitmap(
            bits in proptest::collection::vec(any::<u8>(), 1..64),
            cut in 0u64..8,
            room in 1usize..70,
        ) {
            let clusters = bits.len() as u64 * 8 - cut;
            let (got, n) = assemble(&bits, clusters, room).map_err(TestCaseError::fail)?;
            prop_assert_eq!(n, clusters);
            prop_assert_eq!(got, bits);
        }

        #[test]
        fn comparison_counts_match_a_bit_by_bit_count(
            w in proptest::collection::vec(any::<u8>(), 0..40),
            o in proptest::collection::vec(any::<u8>(), 0..40),
            clusters in 0u64..400,
        ) {
            let c = compare_bitmaps(&w, &o, clusters);
            let bit = |b: &[u8], i: u64| b[(i / 8) as usize] & (1 << (i % 8)) != 0;
            let n = clusters.min(w.len() as u64 * 8).min(o.len() as u64 * 8);
            let only_w: Vec<u64> = (0..n).filter(|&i| bit(&w, i) && !bit(&o, i)).collect();
            let only_o: Vec<u64> = (0..n).filter(|&i| bit(&o, i) && !bit(&w, i)).collect();
            prop_assert_eq!(c.compared, n);
            prop_assert_eq!(c.used_only_by_windows, only_w.len() as u64);
            prop_assert_eq!(c.first_used_only_by_windows, only_w.first().copied());
            prop_assert_eq!(c.used_only_by_own, only_o.len() as u64);
            prop_assert_eq!(c.first_used_only_by_own, only_o.first().copied());
            if let Ok(b) = parse_volume_bitmap(&bitmap_buffer(0, n, &w)) {
                prop_assert_eq!(first_bitmap_difference(&b, &o).is_none(), only_w.is_empty() && only_o.is_empty());
            }
        }

        #[test]
        fn hostile_bitmap_pieces_never_panic(
            pieces in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..6),
        ) {
            let mut a = BitmapAssembly::default();
            for p in &pieces {
                if a.add(p).is_err() { break; }
            }
            let _ = a.finish();
        }

        #[test]
        fn shadow_copy_paths_round_trip(n in 1u32.., dot in any::<bool>(), upper in any::<bool>()) {
            let mut path = format!(r"{}GLOBALROOT\Device\HarddiskVolumeShadowCopy{n}", if dot { r"\\.\" } else { r"\\?\" });
            if upper { path = path.to_uppercase(); }
            let d = parse_device_path(&path);
            prop_assert_eq!(d.clone(), Ok(DevicePath::ShadowCopy(n)));
            prop_assert_eq!(parse_device_path(&DevicePath::ShadowCopy(n).to_string()), d);
        }

        #[test]
        fn malformed_shadow_copy_paths_are_refused(
            tail in "[0-9A-Za-z\\:.+-]{0,14}",
        ) {
            let path = format!(r"\\?\GLOBALROOT\Device\HarddiskVolumeShadowCopy{tail}");
            let well_formed = !tail.is_empty()
                && tail.bytes().all(|b| b.is_ascii_digit())
                && !tail.starts_with('0')
                && tail.parse::<u32>().is_ok();
            match parse_device_path(&path) {
                Ok(DevicePath::ShadowCopy(n)) => {
                    prop_assert!(well_formed, "{path:?} accepted");
                    prop_assert_eq!(n.to_string(), tail);
                }
                Ok(other) => prop_assert!(false, "{:?} parsed as {:?}", path, other),
                Err(e) => prop_assert!(!well_formed, "{path:?} refused: {e}"),
            }
        }

        #[test]
        fn arbitrary_buffers_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_drive_geometry_ex(&buf);
            let _ = parse_length_info(&buf);
            let _ = parse_access_alignment(&buf);
            let _ = parse_volume_disk_extents(&buf);
            if let Ok(b) = parse_volume_bitmap(&buf) {
                prop_assert!(b.described() <= b.clusters);
                let _ = first_bitmap_difference(&b, &buf);
                for lcn in [0, b.starting_lcn, b.starting_lcn.saturating_add(b.described()), u64::MAX] {
                    let _ = b.is_used(lcn);
                }
            }
        }

        #[test]
        fn truncated_valid_buffers_are_short_never_a_panic(cut in 0usize..56) {
            let ext = [2u32.to_le_bytes().as_slice(), &[0; 52]].concat();
            match parse_volume_disk_extents(&ext[..cut]) {
                Err(IoctlBufferError::Short { got, .. }) => prop_assert_eq!(got, cut),
                other => prop_assert!(false, "{:?}", other),
            }
        }

        #[test]
        fn arbitrary_device_paths_never_panic(s in "\\PC{0,80}") {
            let _ = parse_device_path(&s);
        }

        #[test]
        fn near_miss_device_paths_never_panic(
            prefix in prop::sample::select(vec![r"\\.\", r"\\?\", r"\\", r"\\.", ""]),
            body in "[A-Za-z0-9{}:\\\\./ -]{0,60}",
        ) {
            let path = format!("{prefix}{body}");
            if let Ok(d) = parse_device_path(&path) {
                // Whatever is accepted prints as a path that parses to the same device.
                prop_assert_eq!(parse_device_path(&d.to_string()), Ok(d));
            }
        }
    }
}
