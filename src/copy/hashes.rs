//! The hash list of a copy (`BASE.sha256`): one SHA-256 per block, in a binary file that is
//! written and read in streaming fashion (a 16 TiB volume at 256 KiB blocks has 2 GiB of
//! hashes; none of it is held in memory).

use super::format::*;
use super::meta::bad_copy;
use crate::bytes::{le_u32, le_u64};
use crate::error::{Error, IoContext, Result};
use crate::platform;
use crate::repo::fsio::TempFile;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// A 32-byte SHA-256.
pub type Hash = [u8; HASH_LEN];

pub fn sha256(data: &[u8]) -> Hash {
    Sha256::digest(data).into()
}

/// The SHA-256 of `len` zero bytes, computed without allocating `len` bytes.
pub fn zero_hash(len: u64) -> Hash {
    let zeros = [0u8; 64 << 10];
    let mut h = Sha256::new();
    let mut left = len;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        h.update(&zeros[..n]);
        left -= n as u64;
    }
    h.finalize().into()
}

/// The geometry a hash list header records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashListHeader {
    pub size: u64,
    pub block_size: u32,
    pub block_count: u64,
}

impl HashListHeader {
    pub fn encode(&self) -> [u8; HASHES_HEADER_LEN as usize] {
        let mut b = [0u8; HASHES_HEADER_LEN as usize];
        b[0..8].copy_from_slice(&HASHES_MAGIC_V1);
        b[8..12].copy_from_slice(&HASHES_VERSION_V1.to_le_bytes());
        b[12..16].copy_from_slice(&HASHES_ALG_SHA256.to_le_bytes());
        b[16..24].copy_from_slice(&self.size.to_le_bytes());
        b[24..28].copy_from_slice(&self.block_size.to_le_bytes());
        b[32..40].copy_from_slice(&self.block_count.to_le_bytes());
        b
    }

    pub fn parse(b: &[u8], path: &Path) -> Result<HashListHeader> {
        if b.len() < HASHES_HEADER_LEN as usize {
            return Err(bad_copy(path, "the hash list is shorter than its header"));
        }
        if b[0..8] != HASHES_MAGIC_V1 {
            return Err(bad_copy(path, "the hash list has a bad magic number"));
        }
        let version = le_u32(b, 8);
        if version != HASHES_VERSION_V1 {
            return Err(Error::UnsupportedVersion {
                what: "copy hash list",
                path: path.to_path_buf(),
                found: version,
                supported: HASHES_VERSION_V1,
            });
        }
        if le_u32(b, 12) != HASHES_ALG_SHA256 {
            return Err(bad_copy(
                path,
                "the hash list uses an unknown hash algorithm",
            ));
        }
        Ok(HashListHeader {
            size: le_u64(b, 16),
            block_size: le_u32(b, 24),
            block_count: le_u64(b, 32),
        })
    }

    /// The file length this header implies.
    pub fn file_len(&self) -> Option<u64> {
        self.block_count
            .checked_mul(HASH_LEN as u64)?
            .checked_add(HASHES_HEADER_LEN)
    }
}

/// Writes a new hash list to a temporary file, in block order; [`HashListWriter::finish`]
/// renames it into place.
pub struct HashListWriter {
    tmp: TempFile,
    buf: Vec<u8>,
    sha: Sha256,
    header: HashListHeader,
    written: u64,
}

impl HashListWriter {
    pub fn create_in(dir: &Path, header: HashListHeader) -> Result<HashListWriter> {
        let tmp = TempFile::create_in(dir, HASHES_EXT)?;
        let mut w = HashListWriter {
            tmp,
            buf: Vec::with_capacity(1 << 20),
            sha: Sha256::new(),
            header,
            written: 0,
        };
        w.put(&header.encode())?;
        Ok(w)
    }

    fn put(&mut self, b: &[u8]) -> Result<()> {
        self.sha.update(b);
        self.buf.extend_from_slice(b);
        if self.buf.len() >= 1 << 20 {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        self.tmp
            .file()
            .write_all(&self.buf)
            .ctx("write", self.tmp.path())?;
        self.buf.clear();
        Ok(())
    }

    /// Appends the hashes of the next blocks (a multiple of 32 bytes).
    pub fn push(&mut self, hashes: &[u8]) -> Result<()> {
        let n = (hashes.len() / HASH_LEN) as u64;
        if self.written + n > self.header.block_count || !hashes.len().is_multiple_of(HASH_LEN) {
            return Err(Error::internal(
                "hash list writer",
                format!(
                    "{} more hashes overflow a list of {} blocks ({} written)",
                    hashes.len() / HASH_LEN,
                    self.header.block_count,
                    self.written
                ),
            ));
        }
        self.written += n;
        self.put(hashes)
    }

    /// Writes the rest, fsyncs, renames to `dest`, fsyncs the directory. Returns the SHA-256 of
    /// the file, hex.
    pub fn finish(mut self, dest: &Path) -> Result<String> {
        if self.written != self.header.block_count {
            return Err(Error::internal(
                "hash list writer",
                format!(
                    "finished with {} of {} blocks",
                    self.written, self.header.block_count
                ),
            ));
        }
        self.flush()?;
        let digest = hex::encode(self.sha.finalize_reset());
        self.tmp.persist(dest, true)?;
        Ok(digest)
    }
}

/// A stored hash list, read with positional reads.
#[derive(Debug)]
pub struct HashList {
    file: File,
    path: PathBuf,
    header: HashListHeader,
}

impl HashList {
    /// Opens the hash list at `path` and checks it against the copy's geometry.
    pub fn open(path: &Path, expect: HashListHeader) -> Result<HashList> {
        let file = match platform::open_read_only(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(bad_copy(path, "the hash list is missing"));
            }
            Err(e) => return Err(Error::io("open", path, e)),
        };
        let mut b = [0u8; HASHES_HEADER_LEN as usize];
        read_full(&file, &mut b, 0, path)
            .map_err(|_| bad_copy(path, "the hash list is shorter than its header"))?;
        let header = HashListHeader::parse(&b, path)?;
        if header != expect {
            return Err(bad_copy(
                path,
                format!(
                    "the hash list describes {} bytes in {} blocks of {}, the metadata {} in {} \
                     of {}",
                    header.size,
                    header.block_count,
                    header.block_size,
                    expect.size,
                    expect.block_count,
                    expect.block_size
                ),
            ));
        }
        let len = file.metadata().ctx("inspect", path)?.len();
        if Some(len) != header.file_len() {
            return Err(bad_copy(
                path,
                format!(
                    "the hash list is {len} bytes; {} blocks need {}",
                    header.block_count,
                    header.file_len().unwrap_or(u64::MAX)
                ),
            ));
        }
        Ok(HashList {
            file,
            path: path.to_path_buf(),
            header,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The hashes of blocks `first .. first + out.len() / 32`.
    pub fn read(&self, first: u64, out: &mut [u8]) -> Result<()> {
        let n = (out.len() / HASH_LEN) as u64;
        if first
            .checked_add(n)
            .is_none_or(|e| e > self.header.block_count)
        {
            return Err(Error::read_out_of_range(
                format!("hash list {}", self.path.display()),
                first.saturating_mul(HASH_LEN as u64),
                out.len() as u64,
                self.header.block_count.saturating_mul(HASH_LEN as u64),
            ));
        }
        read_full(
            &self.file,
            out,
            HASHES_HEADER_LEN + first * HASH_LEN as u64,
            &self.path,
        )
    }

    /// The hash of block `index`.
    pub fn get(&self, index: u64) -> Result<Hash> {
        let mut h = [0u8; HASH_LEN];
        self.read(index, &mut h)?;
        Ok(h)
    }

    /// The SHA-256 of the whole file, hex.
    pub fn checksum(&self) -> Result<String> {
        let mut h = Sha256::new();
        let mut f = &self.file;
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(0)).ctx("read", &self.path)?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).ctx("read", &self.path)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        Ok(hex::encode(h.finalize()))
    }

    /// Sequential reader from block `first` on.
    pub fn cursor(&self) -> HashCursor<'_> {
        HashCursor {
            list: self,
            buf: Vec::new(),
            first: 0,
        }
    }
}

/// Reads a hash list in order, 1 MiB at a time.
pub struct HashCursor<'a> {
    list: &'a HashList,
    buf: Vec<u8>,
    first: u64,
}

impl HashCursor<'_> {
    /// The hash of block `index` (cheap when indexes increase).
    pub fn get(&mut self, index: u64) -> Result<Hash> {
        let have = (self.buf.len() / HASH_LEN) as u64;
        if index < self.first || index >= self.first + have {
            const CHUNK: u64 = 32 << 10;
            let n = CHUNK.min(self.list.header.block_count.saturating_sub(index));
            if n == 0 {
                return Err(Error::read_out_of_range(
                    format!("hash list {}", self.list.path.display()),
                    index.saturating_mul(HASH_LEN as u64),
                    HASH_LEN as u64,
                    self.list.header.block_count.saturating_mul(HASH_LEN as u64),
                ));
            }
            self.buf.resize(n as usize * HASH_LEN, 0);
            self.list.read(index, &mut self.buf)?;
            self.first = index;
        }
        let at = (index - self.first) as usize * HASH_LEN;
        let mut h = [0u8; HASH_LEN];
        h.copy_from_slice(&self.buf[at..at + HASH_LEN]);
        Ok(h)
    }
}

fn read_full(file: &File, buf: &mut [u8], offset: u64, path: &Path) -> Result<()> {
    platform::read_exact_at(file, buf, offset).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => bad_copy(path, e.to_string()),
        _ => Error::IoAt {
            op: "read",
            path: path.to_path_buf(),
            offset,
            source: e,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn zero_hash_matches_hashing_zeros() {
        for len in [0u64, 1, 4096, 65536, 65537, 262144] {
            assert_eq!(zero_hash(len), sha256(&vec![0u8; len as usize]));
        }
    }

    /// Writes the hash list `h` of `hashes` (pushed in two parts, split at `split`) to
    /// `x.sha256` in `dir`: its path and checksum.
    fn written(dir: &Path, h: HashListHeader, hashes: &[u8], split: usize) -> (PathBuf, String) {
        let mut w = HashListWriter::create_in(dir, h).unwrap();
        w.push(&hashes[..split]).unwrap();
        w.push(&hashes[split..]).unwrap();
        let dest = dir.join("x.sha256");
        let sum = w.finish(&dest).unwrap();
        (dest, sum)
    }

    #[test]
    fn write_then_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let h = HashListHeader {
            size: 100_000,
            block_size: 4096,
            block_count: 25,
        };
        let mut all = Vec::new();
        for i in 0..25u8 {
            all.extend_from_slice(&sha256(&[i]));
        }
        let (dest, sum) = written(dir.path(), h, &all, 10 * 32);
        assert_eq!(sum, hex::encode(sha256(&std::fs::read(&dest).unwrap())));
        let list = HashList::open(&dest, h).unwrap();
        assert_eq!(list.checksum().unwrap(), sum);
        let mut c = list.cursor();
        for i in 0..25u64 {
            assert_eq!(c.get(i).unwrap(), sha256(&[i as u8]));
            assert_eq!(list.get(i).unwrap(), sha256(&[i as u8]));
        }
        assert!(c.get(25).is_err());
        // Wrong geometry, truncated file.
        assert!(
            HashList::open(
                &dest,
                HashListHeader {
                    block_count: 24,
                    ..h
                }
            )
            .is_err()
        );
        let f = std::fs::OpenOptions::new().write(true).open(&dest).unwrap();
        f.set_len(64 + 24 * 32).unwrap();
        assert!(matches!(
            HashList::open(&dest, h),
            Err(Error::BadCopy { .. })
        ));
    }

    #[test]
    fn a_hash_list_of_the_next_version_is_unsupported() {
        let dir = tempfile::tempdir().unwrap();
        let h = HashListHeader {
            size: 4096,
            block_size: 4096,
            block_count: 1,
        };
        let (dest, _) = written(dir.path(), h, &zero_hash(4096), 32);
        crate::error::testing::set_version(&dest, HASHES_VERSION_V1 + 1);
        let e = HashList::open(&dest, h).unwrap_err();
        assert!(
            crate::error::testing::is_next_version(&e, "copy hash list", HASHES_VERSION_V1),
            "{e}"
        );
    }

    proptest! {
        #[test]
        fn header_parser_never_panics(data in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = HashListHeader::parse(&data, Path::new("h"));
        }
    }
}
