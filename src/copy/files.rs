//! Raw and BIN data files: a volume stored as one sparse file or as consecutive slices.
//!
//! [`FileSet`] maps volume offsets to (file, offset) pairs. It is written through the same
//! [`ImageWriter`] interface as the image containers, and read as a [`Volume`] whose
//! `next_data` reports the files' holes (`SEEK_DATA`).

use super::format::*;
use super::meta::{CopyFormat, CopyPaths, DataFile, bad_copy};
use crate::error::{Error, IoContext, Result};
use crate::image::ImageWriter;
use crate::platform;
use crate::volume::Volume;
use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// The data files of a new copy of `size` bytes whose destination file (or directory) is
/// named `dest_name`.
pub fn layout(
    format: CopyFormat,
    dest_name: &str,
    size: u64,
    slice_size: Option<u64>,
) -> Result<Vec<DataFile>> {
    let slice = match (format, slice_size) {
        (CopyFormat::Raw | CopyFormat::Bin, Some(s)) if s < size => s,
        (CopyFormat::Raw | CopyFormat::Bin, _) => size,
        (_, Some(_)) => {
            return Err(Error::InvalidArgument(format!(
                "--slice-size applies to raw and bin copies, not {format}"
            )));
        }
        (_, None) => size,
    };
    if slice == 0 {
        return Err(Error::InvalidArgument(
            "the slice size must not be 0".into(),
        ));
    }
    let count = size.div_ceil(slice);
    if count > MAX_FILES as u64 {
        return Err(Error::InvalidArgument(format!(
            "{count} slices is more than the {MAX_FILES} allowed; choose a larger slice size"
        )));
    }
    let width = (count.saturating_sub(1).to_string().len()).max(3);
    let mut out = Vec::with_capacity(count as usize);
    for i in 0..count {
        let offset = i * slice;
        let length = slice.min(size - offset);
        let name = match format {
            CopyFormat::Bin => format!("{offset}.{length}{BIN_SLICE_SUFFIX}"),
            CopyFormat::Raw if count > 1 => format!("{dest_name}.{i:0width$}"),
            _ => dest_name.to_string(),
        };
        out.push(DataFile {
            name,
            offset,
            length,
        });
    }
    Ok(out)
}

struct Slice {
    range: Range<u64>,
    path: PathBuf,
}

/// Open descriptors kept at most (a copy may have thousands of slices).
const OPEN_FILES: usize = 32;

/// The data files of a raw or BIN copy. Files are opened when first used; a few stay open.
pub struct FileSet {
    slices: Vec<Slice>,
    size: u64,
    name: String,
    write: bool,
    /// Recently used descriptors, most recent last.
    open: Mutex<Vec<(usize, Arc<File>)>>,
    /// Slices written since the last sync.
    dirty: Vec<bool>,
}

impl FileSet {
    /// Creates the data files (sparse, at their full length), replacing files of the same
    /// names, and makes them and their directory entries durable.
    pub fn create(paths: &CopyPaths, files: &[DataFile]) -> Result<FileSet> {
        let mut slices = Vec::with_capacity(files.len());
        for f in files {
            let path = paths.file(&f.name);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .ctx("create", &path)?;
            file.set_len(f.length).ctx("set the size of", &path)?;
            file.sync_all().ctx("flush", &path)?;
            slices.push(Slice {
                range: f.offset..f.offset + f.length,
                path,
            });
        }
        platform::sync_dir(&paths.dir).ctx("flush directory", &paths.dir)?;
        Ok(FileSet::from_slices(paths, slices, true))
    }

    /// Opens existing data files, checking that each is there with its recorded length.
    pub fn open(paths: &CopyPaths, files: &[DataFile], write: bool) -> Result<FileSet> {
        let mut slices = Vec::with_capacity(files.len());
        for f in files {
            let path = paths.file(&f.name);
            let len = match std::fs::metadata(&path) {
                Ok(m) if m.is_file() => m.len(),
                Ok(_) => {
                    return Err(bad_copy(
                        &paths.meta(),
                        format!("data file {} is not a regular file", path.display()),
                    ));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(bad_copy(
                        &paths.meta(),
                        format!("data file {} is missing", path.display()),
                    ));
                }
                Err(e) => return Err(Error::io("inspect", &path, e)),
            };
            if len != f.length {
                return Err(bad_copy(
                    &paths.meta(),
                    format!(
                        "data file {} is {len} bytes, but holds bytes {}..{} of the volume \
                         ({} bytes){}",
                        path.display(),
                        f.offset,
                        f.offset + f.length,
                        f.length,
                        if len < f.length {
                            ": it was truncated"
                        } else {
                            ""
                        }
                    ),
                ));
            }
            slices.push(Slice {
                range: f.offset..f.offset + f.length,
                path,
            });
        }
        let set = FileSet::from_slices(paths, slices, write);
        // The first file must open (permissions); the others open when used.
        set.file(0)?;
        Ok(set)
    }

    fn from_slices(paths: &CopyPaths, slices: Vec<Slice>, write: bool) -> FileSet {
        let size = slices.last().map_or(0, |s| s.range.end);
        let name = match slices.as_slice() {
            [one] => one.path.display().to_string(),
            _ => format!("{} ({} slices)", paths.dir.display(), slices.len()),
        };
        FileSet {
            dirty: vec![false; slices.len()],
            slices,
            size,
            name,
            write,
            open: Mutex::new(Vec::new()),
        }
    }

    /// The open descriptor of slice `i`.
    fn file(&self, i: usize) -> Result<Arc<File>> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pos) = open.iter().position(|(j, _)| *j == i) {
            let entry = open.remove(pos);
            let f = entry.1.clone();
            open.push(entry);
            return Ok(f);
        }
        let s = self.slices.get(i).ok_or_else(|| {
            Error::internal("copy data files", format!("no slice {i} in {}", self.name))
        })?;
        let f = if self.write {
            platform::open_write_existing(&s.path)
        } else {
            platform::open_read_only(&s.path)
        }
        .ctx("open", &s.path)?;
        let f = Arc::new(f);
        if open.len() >= OPEN_FILES {
            open.remove(0);
        }
        open.push((i, f.clone()));
        Ok(f)
    }

    /// Calls `f(slice index, offset in the slice, start in the range, length)` for each
    /// piece of `[offset, offset + len)`; `op` ("read", "write") names the access in the
    /// out-of-range error.
    fn pieces(
        &self,
        op: &'static str,
        offset: u64,
        len: u64,
        mut f: impl FnMut(usize, u64, u64, u64) -> Result<()>,
    ) -> Result<()> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| Error::OutOfRange {
                op,
                object: self.name.clone(),
                offset,
                len,
                size: self.size,
            })?;
        let mut pos = offset;
        let mut i = self.slices.partition_point(|s| s.range.end <= pos);
        while pos < end {
            let Some(s) = self.slices.get(i) else {
                break;
            };
            let n = end.min(s.range.end) - pos;
            f(i, pos - s.range.start, pos - offset, n)?;
            pos += n;
            i += 1;
        }
        Ok(())
    }

    /// Runs `f(file, at, from, n)` on each slice's piece of `[offset, offset + len)` (an I/O
    /// error is reported as `op` at the slice's offset) and marks the slices written.
    fn write_pieces(
        &mut self,
        op: &'static str,
        offset: u64,
        len: u64,
        f: impl Fn(&File, u64, u64, u64) -> std::io::Result<()>,
    ) -> Result<()> {
        let mut touched = Vec::new();
        self.pieces("write", offset, len, |i, at, from, n| {
            let file = self.file(i)?;
            f(&file, at, from, n).map_err(|e| Error::IoAt {
                op,
                path: self.slices[i].path.clone(),
                offset: at,
                source: e,
            })?;
            touched.push(i);
            Ok(())
        })?;
        for i in touched {
            self.dirty[i] = true;
        }
        Ok(())
    }
}

impl ImageWriter for FileSet {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.write_pieces("write", offset, data.len() as u64, |f, at, from, n| {
            platform::write_all_at(f, &data[from as usize..(from + n) as usize], at)
        })
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        self.write_pieces("zero", offset, len, |f, at, _, n| {
            platform::zero_range(f, at, n)
        })
    }

    fn sync(&mut self) -> Result<()> {
        for i in 0..self.slices.len() {
            if self.dirty[i] {
                // A descriptor opened again flushes the file's data all the same.
                self.file(i)?
                    .sync_data()
                    .ctx("flush", &self.slices[i].path)?;
                self.dirty[i] = false;
            }
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        self.sync()
    }
}

impl Volume for FileSet {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.pieces("read", offset, buf.len() as u64, |i, at, from, n| {
            let file = self.file(i)?;
            let path = &self.slices[i].path;
            let out = &mut buf[from as usize..(from + n) as usize];
            platform::read_exact_at(&file, out, at).map_err(|e| Error::IoAt {
                op: "read",
                path: path.clone(),
                offset: at,
                source: if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    std::io::Error::new(e.kind(), format!("{e} (was the data file truncated?)"))
                } else {
                    e
                },
            })?;
            Ok(())
        })
    }

    fn next_data(&self, offset: u64, end: u64) -> Result<Option<Range<u64>>> {
        let end = end.min(self.size);
        let mut pos = offset;
        let mut found: Option<Range<u64>> = None;
        while pos < end {
            let i = self.slices.partition_point(|s| s.range.end <= pos);
            let Some(s) = self.slices.get(i) else {
                break;
            };
            let local_end = end.min(s.range.end) - s.range.start;
            let file = self.file(i)?;
            let r = platform::next_data(&file, pos - s.range.start, local_end).map_err(|e| {
                Error::IoAt {
                    op: "find data in",
                    path: s.path.clone(),
                    offset: pos - s.range.start,
                    source: e,
                }
            })?;
            match (r, &mut found) {
                // Data running to the end of a slice continues into the next one.
                (Some((a, b)), Some(f)) if s.range.start + a == f.end => {
                    f.end = s.range.start + b;
                }
                (Some(_), Some(_)) => break,
                (Some((a, b)), None) => found = Some(s.range.start + a..s.range.start + b),
                (None, Some(_)) => break,
                (None, None) => {}
            }
            match &found {
                Some(f) if f.end < s.range.start + local_end => break,
                _ => pos = s.range.start + local_end,
            }
        }
        Ok(found)
    }

    fn describe(&self) -> String {
        self.name.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts() {
        let bin = layout(CopyFormat::Bin, "x", 10 << 20, Some(4 << 20)).unwrap();
        let names: Vec<_> = bin.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "0.4194304.copydata.bin",
                "4194304.4194304.copydata.bin",
                "8388608.2097152.copydata.bin"
            ]
        );
        let one = layout(CopyFormat::Bin, "x", 1000, None).unwrap();
        assert_eq!(one[0].name, "0.1000.copydata.bin");
        let raw = layout(CopyFormat::Raw, "d.img", 5000, Some(1000)).unwrap();
        assert_eq!(raw[4].name, "d.img.004");
        assert_eq!(
            layout(CopyFormat::Raw, "d.img", 5000, None).unwrap()[0].name,
            "d.img"
        );
        assert!(layout(CopyFormat::Vhdx, "d", 5000, Some(1000)).is_err());
    }

    #[test]
    fn slices_read_write_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let paths = CopyPaths {
            dir: dir.path().to_path_buf(),
            base: "volback-copy".into(),
        };
        let files = layout(CopyFormat::Bin, "x", 3 * 8192 + 100, Some(8192)).unwrap();
        let mut set = FileSet::create(&paths, &files).unwrap();
        let data: Vec<u8> = (0..9000u32).map(|i| (i % 251 + 1) as u8).collect();
        set.write_at(4096, &data).unwrap();
        set.sync().unwrap();
        let mut back = vec![0u8; 9000];
        set.read_at(4096, &mut back).unwrap();
        assert_eq!(back, data);
        assert!(set.read_at(3 * 8192 + 1, &mut [0u8; 100]).is_err());
        let r = set.next_data(0, set.size()).unwrap().unwrap();
        assert!(r.start <= 4096 && r.end >= 4096 + 9000, "{r:?}");
        set.write_zeroes(4096, 9000).unwrap();
        set.read_at(4096, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 0));
        // Reopen: lengths are checked.
        drop(set);
        FileSet::open(&paths, &files, false).unwrap();
        let f = OpenOptions::new()
            .write(true)
            .open(paths.file(&files[1].name))
            .unwrap();
        f.set_len(100).unwrap();
        assert!(matches!(
            FileSet::open(&paths, &files, false),
            Err(Error::BadCopy { .. })
        ));
        std::fs::remove_file(paths.file(&files[2].name)).unwrap();
        assert!(matches!(
            FileSet::open(&paths, &files, false),
            Err(Error::BadCopy { .. })
        ));
    }
}
