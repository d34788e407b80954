//! GUIDs as GPT stores them, and the names of common partition types.
//!
//! On disk a GUID is 16 bytes in "mixed-endian" order (UEFI specification, appendix A): the
//! first three fields (4, 2 and 2 bytes) are little-endian, the last 8 bytes are stored as
//! written. `0FC63DAF-8483-4772-8E79-3D69D8477DE4` is stored as
//! `AF 3D C6 0F 83 84 72 47 8E 79 3D 69 D8 47 7D E4`.

use std::fmt;

/// A GUID in on-disk byte order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    pub const ZERO: Guid = Guid([0; 16]);

    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }

    /// Parses `XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX` (either case).
    pub fn parse(s: &str) -> Option<Guid> {
        let s = s.trim();
        let b = s.as_bytes();
        if b.len() != 36 || [8, 13, 18, 23].iter().any(|&i| b[i] != b'-') {
            return None;
        }
        let hex: String = s.chars().filter(|&c| c != '-').collect();
        let mut v = [0u8; 16];
        hex::decode_to_slice(&hex, &mut v).ok()?;
        // Text order to on-disk order: reverse the first three fields.
        v[0..4].reverse();
        v[4..6].reverse();
        v[6..8].reverse();
        Some(Guid(v))
    }

    /// A random (version 4, RFC 4122 variant) GUID.
    pub fn random() -> Guid {
        let mut v = [0u8; 16];
        if getrandom::fill(&mut v).is_err() {
            // No OS randomness: fall back to time and process id (unique enough for a GUID
            // that only needs to differ from other disks').
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            v.copy_from_slice(&(t ^ ((std::process::id() as u128) << 64)).to_le_bytes());
        }
        // Version in the high nibble of the third field (little-endian on disk: byte 7).
        v[7] = (v[7] & 0x0F) | 0x40;
        v[8] = (v[8] & 0x3F) | 0x80;
        Guid(v)
    }
}

impl fmt::Display for Guid {
    /// Upper case, as `sfdisk` and `fdisk` print GPT GUIDs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.0;
        write!(
            f,
            "{:02X}{:02X}{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-",
            b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9]
        )?;
        for x in &b[10..16] {
            write!(f, "{x:02X}")?;
        }
        Ok(())
    }
}

pub use crate::fs::uuid_string;

/// GPT partition type GUIDs with a name, and the `sfdisk` shortcut letter where it has one.
pub const GPT_TYPES: &[(&str, &str, Option<&str>)] = &[
    (
        "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
        "EFI System",
        Some("U"),
    ),
    ("21686148-6449-6E6F-744E-656564454649", "BIOS boot", None),
    (
        "024DEE41-33E7-11D3-9D69-0008C781F39F",
        "MBR partition scheme",
        None,
    ),
    (
        "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
        "Linux filesystem",
        Some("L"),
    ),
    (
        "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F",
        "Linux swap",
        Some("S"),
    ),
    (
        "E6D6D379-F507-44C2-A23C-238F2A3DF928",
        "Linux LVM",
        Some("V"),
    ),
    (
        "A19D880F-05FC-4D3B-A006-743F0F84911E",
        "Linux RAID",
        Some("R"),
    ),
    (
        "933AC7E1-2EB4-4F13-B844-0E14E2AEF915",
        "Linux home",
        Some("H"),
    ),
    (
        "3B8F8425-20E0-4F3B-907F-1A25A76F98E8",
        "Linux server data",
        None,
    ),
    ("CA7D7CCB-63ED-4C53-861C-1742536059CC", "Linux LUKS", None),
    (
        "8DA63339-0007-60C0-C436-083AC8230908",
        "Linux reserved",
        None,
    ),
    (
        "44479540-F297-41B2-9AF7-D131D5F0458A",
        "Linux root (x86)",
        None,
    ),
    (
        "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709",
        "Linux root (x86-64)",
        None,
    ),
    (
        "B921B045-1DF0-41C3-AF44-4C6F280D3FAE",
        "Linux root (ARM-64)",
        None,
    ),
    (
        "BC13C2FF-59E6-4262-A352-B275FD6F7172",
        "Linux extended boot",
        None,
    ),
    (
        "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7",
        "Microsoft basic data",
        None,
    ),
    (
        "E3C9E316-0B5C-4DB8-817D-F92DF00215AE",
        "Microsoft reserved",
        None,
    ),
    (
        "DE94BBA4-06D1-4D40-A16A-BFD50179D6AC",
        "Windows recovery environment",
        None,
    ),
    (
        "5808C8AA-7E8F-42E0-85D2-E1E90434CFB3",
        "Microsoft LDM metadata",
        None,
    ),
    (
        "AF9B60A0-1431-4F62-BC68-3311714A69AD",
        "Microsoft LDM data",
        None,
    ),
    (
        "48465300-0000-11AA-AA11-00306543ECAC",
        "Apple HFS/HFS+",
        None,
    ),
    ("7C3457EF-0000-11AA-AA11-00306543ECAC", "Apple APFS", None),
    ("516E7CB6-6ECF-11D6-8FF8-00022D09712B", "FreeBSD UFS", None),
    (
        "6A898CC3-1DD2-11B2-99A6-080020736631",
        "Solaris /usr & Apple ZFS",
        None,
    ),
];

/// The name of a GPT partition type, for the common ones.
pub fn gpt_type_name(g: &Guid) -> Option<&'static str> {
    let s = g.to_string();
    GPT_TYPES
        .iter()
        .find(|(id, _, _)| *id == s)
        .map(|&(_, name, _)| name)
}

/// Parses a GPT type as a script gives it: a GUID or an `sfdisk` shortcut letter (upper
/// case, as libfdisk matches them).
pub fn parse_gpt_type(s: &str) -> Option<Guid> {
    if let Some(g) = Guid::parse(s) {
        return Some(g);
    }
    GPT_TYPES
        .iter()
        .find(|(_, _, short)| *short == Some(s.trim()))
        .and_then(|(id, _, _)| Guid::parse(id))
}

/// MBR partition type bytes with a name (as `fdisk` names them), for the common ones.
pub const MBR_TYPES: &[(u8, &str)] = &[
    (0x01, "FAT12"),
    (0x04, "FAT16 <32M"),
    (0x05, "Extended"),
    (0x06, "FAT16"),
    (0x07, "HPFS/NTFS/exFAT"),
    (0x0b, "W95 FAT32"),
    (0x0c, "W95 FAT32 (LBA)"),
    (0x0e, "W95 FAT16 (LBA)"),
    (0x0f, "W95 Ext'd (LBA)"),
    (0x11, "Hidden FAT12"),
    (0x12, "Compaq diagnostics"),
    (0x14, "Hidden FAT16 <32M"),
    (0x16, "Hidden FAT16"),
    (0x17, "Hidden HPFS/NTFS"),
    (0x1b, "Hidden W95 FAT32"),
    (0x1c, "Hidden W95 FAT32 (LBA)"),
    (0x1e, "Hidden W95 FAT16 (LBA)"),
    (0x27, "Hidden NTFS WinRE"),
    (0x42, "SFS"),
    (0x82, "Linux swap / Solaris"),
    (0x83, "Linux"),
    (0x85, "Linux extended"),
    (0x8e, "Linux LVM"),
    (0xa5, "FreeBSD"),
    (0xa6, "OpenBSD"),
    (0xa8, "Darwin UFS"),
    (0xa9, "NetBSD"),
    (0xaf, "HFS / HFS+"),
    (0xbf, "Solaris"),
    (0xda, "Non-FS data"),
    (0xde, "Dell Utility"),
    (0xee, "GPT"),
    (0xef, "EFI (FAT-12/16/32)"),
    (0xfb, "VMware VMFS"),
    (0xfc, "VMware VMKCORE"),
    (0xfd, "Linux raid autodetect"),
];

/// The name of an MBR partition type byte, for the common ones.
pub fn mbr_type_name(t: u8) -> Option<&'static str> {
    MBR_TYPES.iter().find(|(b, _)| *b == t).map(|&(_, n)| n)
}

/// Parses an MBR type as a script gives it: an `sfdisk` shortcut letter (upper case: L, S,
/// E, X, U, R, V; tried first, as libfdisk does) or hexadecimal (`83`, `0x83`, `e`).
pub fn parse_mbr_type(s: &str) -> Option<u8> {
    let s = s.trim();
    let short = match s {
        "L" => Some(0x83),
        "S" => Some(0x82),
        "E" => Some(0x05),
        "X" => Some(0x85),
        "U" => Some(0xef),
        "R" => Some(0xfd),
        "V" => Some(0x8e),
        _ => None,
    };
    if short.is_some() {
        return short;
    }
    let h = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    if h.is_empty() || h.len() > 2 {
        return None;
    }
    u8::from_str_radix(h, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixed_endian_round_trip() {
        let g = Guid::parse("0fc63daf-8483-4772-8e79-3d69d8477de4").unwrap();
        assert_eq!(
            g.0,
            [
                0xAF, 0x3D, 0xC6, 0x0F, 0x83, 0x84, 0x72, 0x47, 0x8E, 0x79, 0x3D, 0x69, 0xD8, 0x47,
                0x7D, 0xE4
            ]
        );
        assert_eq!(g.to_string(), "0FC63DAF-8483-4772-8E79-3D69D8477DE4");
        assert_eq!(gpt_type_name(&g), Some("Linux filesystem"));
        assert!(Guid::parse("0FC63DAF-8483-4772-8E79-3D69D8477DE").is_none());
        assert!(Guid::parse("0FC63DAF+8483-4772-8E79-3D69D8477DE4").is_none());
        let r = Guid::random();
        assert_eq!(r.to_string().as_bytes()[14], b'4');
        assert_eq!(Guid::parse(&r.to_string()), Some(r));
    }

    #[test]
    fn type_parsing() {
        assert_eq!(parse_mbr_type("83"), Some(0x83));
        assert_eq!(parse_mbr_type("0xB"), Some(0x0b));
        assert_eq!(parse_mbr_type("L"), Some(0x83));
        assert_eq!(parse_mbr_type("E"), Some(0x05));
        assert_eq!(parse_mbr_type("e"), Some(0x0e), "lower case is hexadecimal");
        assert_eq!(parse_mbr_type("123"), None);
        assert_eq!(parse_mbr_type(""), None);
        assert_eq!(
            parse_gpt_type("U").map(|g| g.to_string()).as_deref(),
            Some("C12A7328-F81F-11D2-BA4B-00A0C93EC93B")
        );
    }
}
