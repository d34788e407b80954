//! Windows disks and volumes as data: device paths (`\\.\PhysicalDriveN`, `\\.\X:`,
//! `\\?\Volume{GUID}\`) and the output buffers of the device ioctls volback issues, parsed from
//! byte slices with every length and value checked. **Experimental**: the ioctls themselves
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
}

impl DevicePath {
    /// True for a whole disk (restores onto it need no volume lock).
    pub fn is_disk(&self) -> bool {
        matches!(self, DevicePath::PhysicalDrive(_))
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
        }
    }
}

/// Longest device path accepted (a volume GUID path is 48 characters).
const MAX_DEVICE_PATH: usize = 64;

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
/// 4 digits, letters outside A–Z, malformed GUIDs, NUL and other control characters.
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

    proptest! {
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
