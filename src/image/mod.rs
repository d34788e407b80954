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

use crate::error::Result;
use crate::volume::Volume;
use std::path::Path;

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

/// Creates a new image of `size` virtual bytes at `path` (which must not exist).
pub fn create(
    format: ImageFormat,
    path: &Path,
    size: u64,
    options: &CreateOptions,
) -> Result<Box<dyn ImageWriter>> {
    let _ = (format, path, size, options);
    Err(crate::error::Error::InvalidArgument(format!(
        "{format:?} images are not implemented yet"
    )))
}

/// Opens an existing image for in-place update. Its virtual size must be `size`.
pub fn open_for_update(
    format: ImageFormat,
    path: &Path,
    size: u64,
) -> Result<Box<dyn ImageWriter>> {
    let _ = (path, size);
    Err(crate::error::Error::InvalidArgument(format!(
        "{format:?} images are not implemented yet"
    )))
}

/// Recognises the image format of the file at `path` from its contents; `None` for a file
/// that is none of them (a raw image, say).
pub fn detect(path: &Path) -> Result<Option<ImageFormat>> {
    let _ = path;
    Ok(None)
}

/// Opens an image read-only as a [`Volume`].
pub fn open(format: ImageFormat, path: &Path) -> Result<Box<dyn Volume>> {
    let _ = path;
    Err(crate::error::Error::InvalidArgument(format!(
        "{format:?} images are not implemented yet"
    )))
}
