//! VHDX images ([MS-VHDX] "Virtual Hard Disk v2 (VHDX) File Format"), dynamic.
//!
//! All integers are little-endian; GUIDs are stored as Windows stores them (first three
//! fields little-endian). Every structure is 1 MiB-aligned in the file.
//!
//! | offset  | size   | content                                                             |
//! |---------|--------|---------------------------------------------------------------------|
//! | 0       | 64 KiB | file type identifier: `vhdxfile`, creator (UTF-16LE, 512 bytes)     |
//! | 64 KiB  | 4 KiB  | header 1 (in a 64 KiB slot)                                         |
//! | 128 KiB | 4 KiB  | header 2                                                            |
//! | 192 KiB | 64 KiB | region table 1                                                      |
//! | 256 KiB | 64 KiB | region table 2 (identical)                                          |
//! | 1 MiB   | 1 MiB  | log (empty: every header's log GUID is zero)                        |
//! | 2 MiB   | 1 MiB  | metadata region: 64 KiB table, then the items                       |
//! | 3 MiB   | n MiB  | BAT                                                                 |
//! | …       |        | payload blocks, appended in allocation order                        |
//!
//! Header (CRC-32C over its 4 KiB with the checksum zeroed): `head` (4), checksum (4),
//! sequence number (8), file write GUID (16), data write GUID (16), log GUID (16), log version
//! (2, 0), version (2, 1), log length (4), log offset (8). The current header is the valid one
//! with the higher sequence number.
//!
//! Region table (CRC-32C over 64 KiB): `regi`, checksum, entry count (4), reserved (4), then
//! entries of GUID (16), file offset (8), length (4), required (4): the BAT region
//! (2DC27766-F623-4200-9D64-115E9BFD4A08) and the metadata region
//! (8B7CA206-4790-4B9A-B8FE-575F050F886E).
//!
//! Metadata table: `metadata` (8), reserved (2), entry count (2), reserved (20), then entries of
//! item GUID (16), offset in the region (4), length (4), flags (4: bit 0 IsUser, bit 1
//! IsVirtualDisk, bit 2 IsRequired), reserved (4). Items: file parameters (block size (4),
//! flags (4): bit 0 LeaveBlocksAllocated, bit 1 HasParent), virtual disk size (8), virtual disk
//! id / page 83 data (16), logical sector size (4), physical sector size (4).
//!
//! BAT entry (8 bytes): bits 0-2 state, bits 20-63 file offset in MiB. Payload states: 0 not
//! present, 1 undefined, 2 zero, 3 unmapped (all read as zeros here), 6 fully present, 7
//! partially present (differencing disks only). After every `chunk ratio` payload entries
//! (2^23 × logical sector size / block size) comes one sector-bitmap entry, never present in a
//! dynamic disk.
//!
//! The parts: [`header`], [`region`], [`metadata`] and [`bat`] decode and encode the on-disk
//! structures (pure, unit-tested); [`check`] validates them against the file (current
//! header, empty log, regions and BAT entries inside the file and apart); [`read`] presents an
//! image as a volume; [`write`] creates and updates images.

mod bat;
mod check;
mod header;
mod metadata;
mod read;
mod region;
mod write;

pub(crate) use header::FILE_SIGNATURE;
pub(crate) use metadata::MAX_SIZE;
pub(crate) use read::open;
pub(crate) use write::{create, open_for_update};
