//! Every constant of the copy format (docs/FORMAT.md, "Copies"), with its version.
//!
//! Byte layouts, all integers little-endian:
//!
//! ```text
//! hash list  B.sha256    header (64): magic "VBCPHASH", u32 version, u32 algorithm (1 =
//!                        SHA-256), u64 volume size, u32 block size, u32 reserved (0),
//!                        u64 block count, 24 reserved bytes (0); then block count × 32 bytes
//! journal    B.journal   magic "VBCPJRNL", u32 version, u32 header length, header JSON,
//!                        SHA-256(header JSON); then records: u32 payload length, payload,
//!                        SHA-256(payload)
//! record payload         u64 first block, u64 block count n, u64 horizon, 8 × u64 statistics,
//!                        n × 32-byte SHA-256 of the blocks
//! ```

/// `"format"` field of the metadata JSON.
pub const META_FORMAT: &str = "volback-copy";
/// Metadata JSON version this build reads and writes.
pub const META_VERSION_V1: u32 = 1;

/// Suffix of the metadata base name: `DEST.volback-copy` beside a single-file copy,
/// `DEST/volback-copy` inside a BIN directory.
pub const BASE_SUFFIX: &str = ".volback-copy";
/// Base name inside a BIN directory.
pub const BASE_IN_DIR: &str = "volback-copy";
/// The metadata file is `BASE.json`, the hash list `BASE.sha256`, the journal `BASE.journal`.
pub const META_EXT: &str = ".json";
pub const HASHES_EXT: &str = ".sha256";
pub const JOURNAL_EXT: &str = ".journal";
/// Name ending of BIN slices: `<start>.<length>.copydata.bin`.
pub const BIN_SLICE_SUFFIX: &str = ".copydata.bin";

/// Largest metadata file accepted (it lists every slice).
pub const META_MAX_LEN: u64 = 64 << 20;
/// Largest number of data files (slices) of one copy.
pub const MAX_FILES: usize = 1_000_000;

/// Hash list magic: "VBCPHASH" (VolBack CoPy HASHes).
pub const HASHES_MAGIC_V1: [u8; 8] = *b"VBCPHASH";
pub const HASHES_VERSION_V1: u32 = 1;
/// Algorithm id of SHA-256 in the hash list header.
pub const HASHES_ALG_SHA256: u32 = 1;
pub const HASHES_HEADER_LEN: u64 = 64;
pub const HASH_LEN: usize = 32;

/// Journal magic: "VBCPJRNL" (VolBack CoPy JouRNaL).
pub const JOURNAL_MAGIC_V1: [u8; 8] = *b"VBCPJRNL";
pub const JOURNAL_VERSION_V1: u32 = 1;
/// Largest journal header JSON.
pub const JOURNAL_HEADER_MAX: u32 = 1 << 20;
/// Fixed part of a record payload: first, count, horizon and eight statistics.
pub const RECORD_FIXED_LEN: usize = 11 * 8;
/// Most blocks one journal record covers (8 MiB of hashes).
pub const RECORD_MAX_BLOCKS: u64 = 1 << 18;
