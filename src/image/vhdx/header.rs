//! The VHDX header section: file type identifier and the two headers (decoding, checking,
//! encoding; no I/O), and the layout constants of the section.

use crate::bytes::{le_u16, le_u32, le_u64};
use crate::image::error::ParseError;
use crate::probe::crc32::{crc32c, crc32c_skipping};

pub(super) const MIB: u64 = 1 << 20;
pub(crate) const FILE_SIGNATURE: &[u8; 8] = b"vhdxfile";
const HEADER_SIGNATURE: &[u8; 4] = b"head";
pub(super) const HEADER_OFFSETS: [u64; 2] = [64 << 10, 128 << 10];
pub(super) const HEADER_SIZE: usize = 4096;
/// The header section: file type identifier, headers, region tables.
pub(super) const HEADER_SECTION: u64 = MIB;
/// Size of a region table and of the metadata table.
pub(super) const TABLE_SIZE: usize = 64 << 10;

/// Most entries a region table or the metadata table may have.
const MAX_TABLE_ENTRIES: usize = 2047;

/// A region or metadata table's entry count, read from byte `at`: refused past
/// [`MAX_TABLE_ENTRIES`].
pub(super) fn table_entry_count(count: usize, at: usize) -> Result<usize, ParseError> {
    if count > MAX_TABLE_ENTRIES {
        return Err(ParseError::field(
            "entry count",
            at,
            format!("{count} entries (at most {MAX_TABLE_ENTRIES} allowed)"),
        ));
    }
    Ok(count)
}

/// The 16 bytes of a GUID at `at`.
pub(super) fn guid16(b: &[u8], at: usize) -> [u8; 16] {
    let mut g = [0u8; 16];
    g.copy_from_slice(&b[at..at + 16]);
    g
}

/// The file type identifier volback writes: the signature and the creator in UTF-16LE.
pub(super) fn file_identifier(creator: &str) -> Vec<u8> {
    let mut id = Vec::with_capacity(8 + 512);
    id.extend_from_slice(FILE_SIGNATURE);
    id.extend(creator.encode_utf16().flat_map(|u| u.to_le_bytes()));
    id
}

/// One of the two headers, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Header {
    pub seq: u64,
    pub file_write: [u8; 16],
    pub data_write: [u8; 16],
    pub log_guid: [u8; 16],
    pub log_version: u16,
    pub version: u16,
    pub log_length: u32,
    pub log_offset: u64,
}

impl Header {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(HEADER_SIGNATURE);
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..32].copy_from_slice(&self.file_write);
        b[32..48].copy_from_slice(&self.data_write);
        b[48..64].copy_from_slice(&self.log_guid);
        b[64..66].copy_from_slice(&self.log_version.to_le_bytes());
        b[66..68].copy_from_slice(&self.version.to_le_bytes());
        b[68..72].copy_from_slice(&self.log_length.to_le_bytes());
        b[72..80].copy_from_slice(&self.log_offset.to_le_bytes());
        let crc = crc32c(&b);
        b[4..8].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and checks a header slot.
    pub fn parse(b: &[u8]) -> Result<Header, ParseError> {
        ParseError::need("header", b, HEADER_SIZE)?;
        let b = &b[..HEADER_SIZE];
        ParseError::magic("signature", b, 0, HEADER_SIGNATURE, "\"head\"")?;
        ParseError::checksum("CRC-32C", 4, le_u32(b, 4), crc32c_skipping(b, 4))?;
        let h = Header {
            seq: le_u64(b, 8),
            file_write: guid16(b, 16),
            data_write: guid16(b, 32),
            log_guid: guid16(b, 48),
            log_version: le_u16(b, 64),
            version: le_u16(b, 66),
            log_length: le_u32(b, 68),
            log_offset: le_u64(b, 72),
        };
        if h.version != 1 {
            return Err(ParseError::field(
                "version",
                66,
                format!("unknown VHDX version {}", h.version),
            ));
        }
        Ok(h)
    }

    /// The log's place in the file.
    pub fn log(&self) -> std::ops::Range<u64> {
        self.log_offset..self.log_offset.saturating_add(self.log_length as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Header {
        Header {
            seq: 7,
            file_write: [1; 16],
            data_write: [2; 16],
            log_guid: [0; 16],
            log_version: 0,
            version: 1,
            log_length: MIB as u32,
            log_offset: MIB,
        }
    }

    #[test]
    fn header_roundtrip() {
        let h = sample();
        let b = h.encode();
        assert_eq!(Header::parse(&b).unwrap(), h);
        let mut bad = b.clone();
        bad[100] = 1;
        let e = Header::parse(&bad).unwrap_err();
        assert!(matches!(e, ParseError::Checksum { offset: 4, .. }), "{e}");
        assert!(e.to_string().contains("CRC-32C"), "{e}");
        let v2 = Header { version: 2, ..h };
        assert!(matches!(
            Header::parse(&v2.encode()),
            Err(ParseError::Field { offset: 66, .. })
        ));
        assert!(matches!(
            Header::parse(&b[..100]),
            Err(ParseError::Short { .. })
        ));
    }

    #[test]
    fn file_identifier_layout() {
        let id = file_identifier("ab");
        assert_eq!(&id[..8], FILE_SIGNATURE);
        assert_eq!(&id[8..], &[b'a', 0, b'b', 0]);
    }

    proptest! {
        #[test]
        fn mutated_headers_never_panic(pos in 0usize..HEADER_SIZE, val in any::<u8>(), fix in any::<bool>()) {
            let mut b = sample().encode();
            b[pos] = val;
            if fix {
                let crc = crc32c_skipping(&b, 4);
                b[4..8].copy_from_slice(&crc.to_le_bytes());
            }
            if let Ok(h) = Header::parse(&b) {
                let _ = h.log();
            }
        }
    }
}
