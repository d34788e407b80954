//! VHD images ("Virtual Hard Disk Image Format Specification", Microsoft, version 1.0),
//! fixed and dynamic.
//!
//! All integers are big-endian.
//!
//! Footer (512 bytes; at the end of every VHD, and a copy at offset 0 of a dynamic one):
//!
//! | off | size | field                                                        |
//! |-----|------|--------------------------------------------------------------|
//! | 0   | 8    | cookie `conectix`                                            |
//! | 8   | 4    | features (bit 1 "reserved" always set: 0x00000002)           |
//! | 12  | 4    | file format version 0x00010000                               |
//! | 16  | 8    | data offset: dynamic header offset (512), all ones when fixed |
//! | 24  | 4    | time stamp, seconds since 2000-01-01 00:00:00 UTC            |
//! | 28  | 4    | creator application                                          |
//! | 32  | 4    | creator version                                              |
//! | 36  | 4    | creator host OS (`Wi2k`)                                     |
//! | 40  | 8    | original size                                                |
//! | 48  | 8    | current size (the virtual size in bytes)                     |
//! | 56  | 4    | geometry: cylinders (2), heads (1), sectors per track (1)    |
//! | 60  | 4    | disk type: 2 fixed, 3 dynamic, 4 differencing                |
//! | 64  | 4    | checksum: one's complement of the byte sum, this field zero  |
//! | 68  | 16   | unique id                                                    |
//! | 84  | 1    | saved state                                                  |
//! | 85  | 427  | zero                                                         |
//!
//! Dynamic disk header (1024 bytes at the footer's data offset): cookie `cxsparse` (8), data
//! offset (8, all ones), BAT offset (8), header version 0x00010000 (4), max table entries (4),
//! block size (4), checksum (4, as the footer's), then parent fields (differencing disks only).
//!
//! BAT: one 4-byte entry per block, the sector number (byte offset / 512) of the block's
//! sector bitmap, or 0xFFFFFFFF for a block that is not allocated (reads as zeros). A block
//! is its sector bitmap (one bit per 512-byte sector, most significant bit first, padded to
//! 512 bytes) followed by its data.
//!
//! Layout written by volback (dynamic): footer copy at 0, header at 512, BAT at 1536 (padded
//! to 512 bytes, 0xFF-filled), blocks appended in allocation order, footer at the end.
//!
//! The parts: [`footer`] decodes and encodes the footer and the dynamic header (pure,
//! unit-tested); [`check`] validates them and the BAT against the file; [`read`] presents an
//! image as a volume; [`write`] creates and updates images.

mod check;
mod footer;
mod read;
mod write;

pub(crate) use footer::{COOKIE, DISK_FIXED, MAX_SIZE};
pub(crate) use read::open;
pub(crate) use write::{create_dynamic, create_fixed, open_for_update};
