//! qcow2 images (qemu's `docs/interop/qcow2.txt`), version 3 written, versions 2 and 3 read.
//!
//! All integers are big-endian. The file is a sequence of clusters (64 KiB by default).
//!
//! Header (cluster 0):
//!
//! | off | size | field                                                          |
//! |-----|------|----------------------------------------------------------------|
//! | 0   | 4    | magic `QFI\xfb`                                                |
//! | 4   | 4    | version (3)                                                    |
//! | 8   | 8    | backing file name offset (0: none)                             |
//! | 16  | 4    | backing file name length                                       |
//! | 20  | 4    | cluster bits (16: 64 KiB clusters)                             |
//! | 24  | 8    | virtual size in bytes                                          |
//! | 32  | 4    | encryption method (0: none)                                    |
//! | 36  | 4    | L1 table entries                                               |
//! | 40  | 8    | L1 table offset                                                |
//! | 48  | 8    | refcount table offset                                          |
//! | 56  | 4    | refcount table clusters                                        |
//! | 60  | 4    | number of snapshots                                            |
//! | 64  | 8    | snapshot table offset                                          |
//! | 72  | 8    | incompatible features (bit 0 dirty, 1 corrupt, 2 external data |
//! |     |      | file, 3 compression type, 4 extended L2 entries)               |
//! | 80  | 8    | compatible features (bit 0 lazy refcounts)                     |
//! | 88  | 8    | autoclear features (bit 0 bitmaps, 1 raw external data)        |
//! | 96  | 4    | refcount order (4: 16-bit refcounts)                           |
//! | 100 | 4    | header length (104)                                            |
//!
//! then header extensions (type (4), length (4), data padded to 8 bytes) up to an end marker
//! of type 0, all inside cluster 0.
//!
//! Virtual cluster `v` is found through L1 entry `v / (cluster_size / 8)` (bits 9-55: offset
//! of an L2 table, bit 63: "copied", refcount exactly 1) and entry `v % (cluster_size / 8)`
//! of that L2 table (bit 0: reads as zeros, bits 9-55: data cluster offset, bit 62:
//! compressed, bit 63: copied). An entry of 0 reads as zeros (there is no backing file).
//!
//! Refcounts: the refcount table (entries: offsets of refcount blocks) and refcount blocks
//! (one `2^refcount_order`-bit count per cluster of the file) say how many references each
//! cluster has.
//!
//! Layout written by volback: header in cluster 0, refcount table from cluster 1 (sized for
//! the largest file the virtual size can need), the L1 table after it, then L2 tables and data
//! clusters in allocation order, refcount blocks appended when the image is finished.
//!
//! Crash safety: the dirty bit is set while volback writes an image (refcounts on disk are
//! stale then; qemu rebuilds them when it opens a dirty image read-write, and so does
//! [`open_for_update`]). Data clusters are made durable before the L2 tables that point at
//! them, L2 tables before the L1 entries that point at them. `finish` writes every refcount
//! block from an in-memory bitmap of used clusters, then clears the dirty bit.
//!
//! The parts: [`header`] decodes and encodes the header and its extensions, [`table`] the L1,
//! L2 and refcount entries (both pure, unit-tested); [`check`] validates the tables against
//! the file; [`read`] presents an image as a volume; [`write`] creates and updates images.

mod check;
mod header;
mod read;
mod table;
mod write;

pub(crate) use header::{MAGIC, MAX_SIZE};
pub(crate) use read::open;
pub(crate) use write::{create, open_for_update};
