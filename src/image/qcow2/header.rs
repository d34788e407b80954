//! The qcow2 header and its extensions: decoding, checking and encoding, no I/O.

use crate::bytes::{be_u32, be_u64};
use crate::image::error::ParseError;
use crate::image::file::round_up;

pub(crate) const MAGIC: &[u8; 4] = b"QFI\xfb";
pub(super) const VERSION: u32 = 3;
pub(super) const V2_HEADER_LEN: u32 = 72;
pub(super) const V3_HEADER_LEN: u32 = 104;
pub(super) const DEFAULT_CLUSTER_BITS: u32 = 16;
pub(super) const MIN_CLUSTER_BITS: u32 = 9;
pub(super) const MAX_CLUSTER_BITS: u32 = 21;
pub(super) const REFCOUNT_ORDER: u32 = 4;

pub(super) const INCOMPAT_DIRTY: u64 = 1 << 0;
pub(super) const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub(super) const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub(super) const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub(super) const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
pub(super) const AUTOCLEAR_BITMAPS: u64 = 1 << 0;

pub(super) const EXT_END: u32 = 0;
pub(super) const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub(super) const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
pub(super) const EXT_BITMAPS: u32 = 0x2385_2875;
pub(super) const EXT_CRYPTO: u32 = 0x0537_be77;
pub(super) const EXT_DATA_FILE: u32 = 0x4441_5441;
/// The largest virtual size volback writes.
pub(crate) const MAX_SIZE: u64 = 1 << 61;

/// The header fields, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    /// Header extension types present (before the end marker).
    pub extensions: Vec<u32>,
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Virtual bytes one L2 table maps.
    pub fn l2_coverage(&self) -> u64 {
        self.cluster_size() * (self.cluster_size() / 8)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; V3_HEADER_LEN as usize + 8];
        b[0..4].copy_from_slice(MAGIC);
        b[4..8].copy_from_slice(&self.version.to_be_bytes());
        b[8..16].copy_from_slice(&self.backing_file_offset.to_be_bytes());
        b[20..24].copy_from_slice(&self.cluster_bits.to_be_bytes());
        b[24..32].copy_from_slice(&self.size.to_be_bytes());
        b[32..36].copy_from_slice(&self.crypt_method.to_be_bytes());
        b[36..40].copy_from_slice(&self.l1_size.to_be_bytes());
        b[40..48].copy_from_slice(&self.l1_table_offset.to_be_bytes());
        b[48..56].copy_from_slice(&self.refcount_table_offset.to_be_bytes());
        b[56..60].copy_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b[60..64].copy_from_slice(&self.nb_snapshots.to_be_bytes());
        b[72..80].copy_from_slice(&self.incompatible.to_be_bytes());
        b[80..88].copy_from_slice(&self.compatible.to_be_bytes());
        b[88..96].copy_from_slice(&self.autoclear.to_be_bytes());
        b[96..100].copy_from_slice(&self.refcount_order.to_be_bytes());
        b[100..104].copy_from_slice(&self.header_length.to_be_bytes());
        // b[104..112]: the end-of-extensions marker (type 0, length 0).
        b
    }

    /// Decodes the header and its extensions from the start of cluster 0 (`b` holds at least
    /// the whole header and its extensions, or the whole file when it is shorter).
    /// Unsupported features are reported separately by [`Header::unsupported`].
    pub fn parse(b: &[u8]) -> Result<Header, ParseError> {
        ParseError::need("header", b, V2_HEADER_LEN as usize)?;
        ParseError::magic("magic", b, 0, MAGIC, "qcow2")?;
        let version = be_u32(b, 4);
        if version != 2 && version != 3 {
            return Err(ParseError::field(
                "version",
                4,
                format!("unknown version {version}"),
            ));
        }
        let cluster_bits = be_u32(b, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(ParseError::field(
                "cluster bits",
                20,
                format!("{cluster_bits} outside {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}"),
            ));
        }
        let cs = 1usize << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be_u64(b, 8),
            cluster_bits,
            size: be_u64(b, 24),
            crypt_method: be_u32(b, 32),
            l1_size: be_u32(b, 36),
            l1_table_offset: be_u64(b, 40),
            refcount_table_offset: be_u64(b, 48),
            refcount_table_clusters: be_u32(b, 56),
            nb_snapshots: be_u32(b, 60),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            extensions: Vec::new(),
        };
        if version == 3 {
            ParseError::need("version 3 header", b, V3_HEADER_LEN as usize)?;
            h.incompatible = be_u64(b, 72);
            h.compatible = be_u64(b, 80);
            h.autoclear = be_u64(b, 88);
            h.refcount_order = be_u32(b, 96);
            h.header_length = be_u32(b, 100);
            if h.header_length < V3_HEADER_LEN || h.header_length as usize > cs {
                return Err(ParseError::field(
                    "header length",
                    100,
                    format!("{} outside {V3_HEADER_LEN}..={cs}", h.header_length),
                ));
            }
            if h.refcount_order > 6 {
                return Err(ParseError::field(
                    "refcount order",
                    96,
                    format!("{} above 6", h.refcount_order),
                ));
            }
        }
        // Header extensions, inside cluster 0.
        let limit = cs.min(b.len());
        let mut at = round_up(h.header_length as u64, 8).unwrap_or(u64::MAX) as usize;
        loop {
            if at.checked_add(8).is_none_or(|e| e > limit) {
                return Err(ParseError::field(
                    "header extension",
                    at,
                    "header extensions run past the first cluster without an end marker",
                ));
            }
            let ty = be_u32(b, at);
            let len = be_u32(b, at + 4) as usize;
            if ty == EXT_END {
                break;
            }
            let next = round_up(len as u64, 8)
                .and_then(|l| (at as u64 + 8).checked_add(l))
                .filter(|&n| n <= limit as u64);
            let Some(next) = next else {
                return Err(ParseError::field(
                    "header extension",
                    at,
                    format!("extension {ty:#010x} of {len} bytes runs past the first cluster"),
                ));
            };
            h.extensions.push(ty);
            at = next as usize;
        }
        Ok(h)
    }

    /// Why volback cannot read this image, if it cannot: a [`ParseError::Unsupported`].
    pub fn unsupported(&self) -> Option<ParseError> {
        if self.backing_file_offset != 0 {
            return Some(ParseError::unsupported(
                "backing file offset",
                8,
                "it has a backing file (its data depends on another image); convert it to a \
                 standalone image first (qemu-img convert)",
            ));
        }
        if self.crypt_method != 0 || self.extensions.contains(&EXT_CRYPTO) {
            return Some(ParseError::unsupported(
                "encryption method",
                32,
                "it is encrypted",
            ));
        }
        if self.incompatible & INCOMPAT_DATA_FILE != 0 || self.extensions.contains(&EXT_DATA_FILE) {
            return Some(ParseError::unsupported(
                "incompatible features",
                72,
                "its data is in an external data file",
            ));
        }
        if self.incompatible & INCOMPAT_EXTL2 != 0 {
            return Some(ParseError::unsupported(
                "incompatible features",
                72,
                "it uses extended L2 entries (subclusters)",
            ));
        }
        let unknown = self.incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Some(ParseError::unsupported(
                "incompatible features",
                72,
                format!("it uses unknown incompatible features {unknown:#x}"),
            ));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Header {
        Header {
            version: 3,
            backing_file_offset: 0,
            cluster_bits: 16,
            size: 1 << 30,
            crypt_method: 0,
            l1_size: 2,
            l1_table_offset: 2 << 16,
            refcount_table_offset: 1 << 16,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: 104,
            extensions: Vec::new(),
        }
    }

    #[test]
    fn header_roundtrip() {
        let h = sample();
        assert_eq!(Header::parse(&h.encode()).unwrap(), h);
        let mut b = h.encode();
        b[4..8].copy_from_slice(&9u32.to_be_bytes());
        assert!(matches!(
            Header::parse(&b),
            Err(ParseError::Field { offset: 4, .. })
        ));
        assert!(matches!(
            Header::parse(&b[..50]),
            Err(ParseError::Short { need: 72, .. })
        ));
    }

    #[test]
    fn header_extensions_are_bounded() {
        let mut b = sample().encode();
        b.resize(1 << 16, 0);
        // An extension claiming 4 GiB.
        b[104..108].copy_from_slice(&EXT_FEATURE_TABLE.to_be_bytes());
        b[108..112].copy_from_slice(&u32::MAX.to_be_bytes());
        let e = Header::parse(&b).unwrap_err();
        assert!(matches!(e, ParseError::Field { offset: 104, .. }), "{e}");
        assert!(e.to_string().contains("past the first cluster"), "{e}");
        b[108..112].copy_from_slice(&8u32.to_be_bytes());
        let h = Header::parse(&b).unwrap();
        assert_eq!(h.extensions, vec![EXT_FEATURE_TABLE]);
    }

    #[test]
    fn unsupported_features_name_their_field() {
        let mut h = sample();
        assert_eq!(h.unsupported(), None);
        h.backing_file_offset = 512;
        let e = h.unsupported().unwrap();
        assert!(matches!(e, ParseError::Unsupported { offset: 8, .. }));
        assert!(e.to_string().contains("backing file"), "{e}");
        h.backing_file_offset = 0;
        h.incompatible = 1 << 40;
        assert!(
            h.unsupported()
                .unwrap()
                .to_string()
                .contains("0x10000000000")
        );
    }

    proptest! {
        #[test]
        fn parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(h) = Header::parse(&bytes) {
                let _ = h.unsupported();
            }
        }

        #[test]
        fn mutated_headers_never_panic(pos in 0usize..120, val in any::<u8>()) {
            let mut b = sample().encode();
            b.resize(4096, 0);
            b[pos] = val;
            if let Ok(h) = Header::parse(&b) {
                let _ = h.unsupported();
                let _ = h.l2_coverage();
            }
        }
    }
}
