//! Plain image formats that standard tools open without volback: VHD (fixed and dynamic),
//! VHDX and qcow2. (Raw images and sliced BIN copies are plain files; `crate::copy` writes
//! them directly.)
//!
//! Every format has a writer ([`ImageWriter`]) that `copy`, `copy --update` and `export`
//! drive, and a reader that presents the image as a [`Volume`] (so `restore`, `verify`,
//! `mount` and `serve` accept a copy like a snapshot).
//!
//! Contract shared by all writers:
//! - Offsets and lengths are volume byte offsets. Writes arrive in any order; a write may
//!   cover any byte range inside the virtual size (it is not required to be aligned to the
//!   format's block or cluster; the writer handles partial clusters).
//! - Ranges never written read as zeros; [`ImageWriter::write_zeroes`] turns a range back into
//!   zeros, deallocating whole format blocks where the format can.
//! - [`ImageWriter::sync`] makes all data and metadata written so far durable: data first,
//!   then the metadata that points at it, so that a crash at any moment leaves an image that
//!   [`open_for_update`] can open again (at worst with leaked, unreferenced space).
//! - [`ImageWriter::finish`] writes the final metadata and syncs; after it the image is
//!   clean for `qemu-img check`.
//! - After a crash, ranges written since the last `sync` may read old or new content (or
//!   zeros); the caller rewrites them after [`open_for_update`].
//!
//! The formats' on-disk choices, crash-safety mechanisms and limits are in docs/IMAGES.md;
//! each format module documents its byte layout.

use crate::error::Result;
use crate::volume::Volume;
use std::path::Path;

mod error;
mod file;
mod mapped;
mod qcow2;
mod sparse;
mod vhd;
mod vhdx;

/// Image container formats with a native writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ImageFormat {
    /// VHD with every block present (a raw image plus a 512-byte footer).
    Vhd,
    /// Dynamic VHD (block allocation table; absent blocks read as zeros).
    VhdDynamic,
    /// VHDX (dynamic).
    Vhdx,
    /// qcow2 (version 3).
    Qcow2,
}

impl ImageFormat {
    /// The virtual size an image of this format gets for a volume of `size` bytes: `size`
    /// rounded up to whole 512-byte sectors (VHD, VHDX and qcow2 all count the disk in
    /// sectors; qemu and Windows ignore a partial last sector). The bytes added read as
    /// zeros. A copy's own metadata keeps the true size.
    pub fn virtual_size(self, size: u64) -> u64 {
        size.div_ceil(512).saturating_mul(512)
    }

    /// The largest volume this format can hold, in bytes.
    pub fn max_size(self) -> u64 {
        match self {
            ImageFormat::Vhd | ImageFormat::VhdDynamic => vhd::MAX_SIZE,
            ImageFormat::Vhdx => vhdx::MAX_SIZE,
            ImageFormat::Qcow2 => qcow2::MAX_SIZE,
        }
    }
}

/// Writes one image file.
pub trait ImageWriter: Send {
    /// Writes `data` at volume offset `offset`.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()>;

    /// Makes `[offset, offset + len)` read as zeros.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()>;

    /// Makes everything written so far durable (see the module contract).
    fn sync(&mut self) -> Result<()>;

    /// Writes the final metadata and syncs.
    fn finish(self: Box<Self>) -> Result<()>;
}

/// Options for creating an image.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// Format block / cluster size in bytes; `None`: the format's usual default.
    pub block_size: Option<u64>,
}

/// Creates a new image of `size` virtual bytes at `path` (which must not exist). The virtual
/// size is [`ImageFormat::virtual_size`]; `options.block_size` is the format's block or
/// cluster size (VHD: power of two 512 B to 256 MiB, default 2 MiB, ignored for fixed VHD;
/// VHDX: power of two 1 MiB to 256 MiB, default 2 MiB up to 2 TiB; qcow2: power of two 512 B
/// to 2 MiB, default 64 KiB).
pub fn create(
    format: ImageFormat,
    path: &Path,
    size: u64,
    options: &CreateOptions,
) -> Result<Box<dyn ImageWriter>> {
    match format {
        ImageFormat::Vhd => vhd::create_fixed(path, size),
        ImageFormat::VhdDynamic => vhd::create_dynamic(path, size, options),
        ImageFormat::Vhdx => vhdx::create(path, size, options),
        ImageFormat::Qcow2 => qcow2::create(path, size, options),
    }
}

/// Opens an existing image for in-place update. Its virtual size must be `size` (rounded as
/// [`ImageFormat::virtual_size`] does), else [`crate::Error::ImageSizeMismatch`]. An image
/// left behind by an interrupted run (no `finish`, process killed, power lost) is accepted and
/// repaired: unreferenced space at its end is cut, qcow2 refcounts are rebuilt.
pub fn open_for_update(
    format: ImageFormat,
    path: &Path,
    size: u64,
) -> Result<Box<dyn ImageWriter>> {
    match format {
        ImageFormat::Vhd => vhd::open_for_update(path, size, false),
        ImageFormat::VhdDynamic => vhd::open_for_update(path, size, true),
        ImageFormat::Vhdx => vhdx::open_for_update(path, size),
        ImageFormat::Qcow2 => qcow2::open_for_update(path, size),
    }
}

/// Recognises the image format of the file at `path` from its contents; `None` for a file
/// that is none of them (a raw image, say).
pub fn detect(path: &Path) -> Result<Option<ImageFormat>> {
    let f = file::ImageFile::open_ro(path)?;
    let mut head = [0u8; 512];
    let n = f.read_at_most(0, &mut head)?;
    if n >= 8 {
        if head[0..4] == *qcow2::MAGIC {
            return Ok(Some(ImageFormat::Qcow2));
        }
        if head[0..8] == *vhdx::FILE_SIGNATURE {
            return Ok(Some(ImageFormat::Vhdx));
        }
    }
    let len = f.len()?;
    if len < 512 {
        return Ok(None);
    }
    let disk_type = |b: &[u8]| crate::bytes::be_u32(b, 60);
    // A dynamic VHD starts with a copy of its footer; every VHD ends with its footer.
    if n == 512 && head[0..8] == *vhd::COOKIE && disk_type(&head) != vhd::DISK_FIXED {
        return Ok(Some(ImageFormat::VhdDynamic));
    }
    let mut tail = [0u8; 512];
    f.read_exact_at(len - 512, &mut tail, "last sector")?;
    if tail[0..8] == *vhd::COOKIE {
        return Ok(Some(if disk_type(&tail) == vhd::DISK_FIXED {
            ImageFormat::Vhd
        } else {
            ImageFormat::VhdDynamic
        }));
    }
    Ok(None)
}

/// Opens an image read-only as a [`Volume`]. Its `next_data` skips unallocated blocks and
/// clusters. `Vhd` and `VhdDynamic` both open either kind of VHD.
pub fn open(format: ImageFormat, path: &Path) -> Result<Box<dyn Volume>> {
    match format {
        ImageFormat::Vhd | ImageFormat::VhdDynamic => vhd::open(path),
        ImageFormat::Vhdx => vhdx::open(path),
        ImageFormat::Qcow2 => qcow2::open(path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Write { off: u64, len: u64, seed: u8 },
        Zero { off: u64, len: u64 },
        WriteZeros { off: u64, len: u64 },
        Sync,
        Reopen,
    }

    fn op(size: u64) -> impl Strategy<Value = Op> {
        let range = (0..size, 1..size / 3).prop_map(move |(o, l)| (o, l.min(size - o)));
        prop_oneof![
            4 => (range.clone(), any::<u8>()).prop_map(|((off, len), seed)| Op::Write { off, len, seed }),
            2 => range.clone().prop_map(|(off, len)| Op::Zero { off, len }),
            1 => range.prop_map(|(off, len)| Op::WriteZeros { off, len }),
            1 => Just(Op::Sync),
            1 => Just(Op::Reopen),
        ]
    }

    fn fill(seed: u8, off: u64, len: u64) -> Vec<u8> {
        (off..off + len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect()
    }

    /// Runs `ops` against an image and a byte-array model; the image must read back exactly
    /// as the model, before and after `finish`, and `next_data` must never skip data.
    fn run(format: ImageFormat, block: Option<u64>, size: u64, ops: &[Op]) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let opts = CreateOptions { block_size: block };
        let mut w = create(format, &path, size, &opts).unwrap();
        let mut model = vec![0u8; size as usize];
        for o in ops {
            match *o {
                Op::Write { off, len, seed } => {
                    let d = fill(seed, off, len);
                    w.write_at(off, &d).unwrap();
                    model[off as usize..(off + len) as usize].copy_from_slice(&d);
                }
                Op::Zero { off, len } => {
                    w.write_zeroes(off, len).unwrap();
                    model[off as usize..(off + len) as usize].fill(0);
                }
                Op::WriteZeros { off, len } => {
                    w.write_at(off, &vec![0u8; len as usize]).unwrap();
                    model[off as usize..(off + len) as usize].fill(0);
                }
                Op::Sync => w.sync().unwrap(),
                Op::Reopen => {
                    w.finish().unwrap();
                    w = open_for_update(format, &path, size).unwrap();
                }
            }
        }
        w.finish().unwrap();
        let vol = open(format, &path).unwrap();
        assert_eq!(vol.size(), size);
        let mut got = vec![0u8; size as usize];
        vol.read_at(0, &mut got).unwrap();
        assert!(got == model, "{format:?}: content differs from the model");
        let mut pos = 0;
        while let Some(r) = vol.next_data(pos, size).unwrap() {
            assert!(
                model[pos as usize..r.start as usize]
                    .iter()
                    .all(|&b| b == 0)
            );
            pos = r.end;
        }
        assert!(model[pos as usize..].iter().all(|&b| b == 0));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        #[test]
        fn qcow2_matches_a_model(ops in proptest::collection::vec(op(300 * 1024), 1..25)) {
            run(ImageFormat::Qcow2, Some(4096), 300 * 1024, &ops);
            run(ImageFormat::Qcow2, Some(512), 300 * 1024, &ops);
        }

        #[test]
        fn vhd_matches_a_model(ops in proptest::collection::vec(op(300 * 1024), 1..25)) {
            run(ImageFormat::VhdDynamic, Some(8192), 300 * 1024, &ops);
            run(ImageFormat::Vhd, None, 300 * 1024, &ops);
        }

        #[test]
        fn vhdx_matches_a_model(ops in proptest::collection::vec(op(5 << 20), 1..25)) {
            run(ImageFormat::Vhdx, Some(1 << 20), 5 << 20, &ops);
        }
    }
}
