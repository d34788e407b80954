//! The chunk store: one file per chunk under `chunks/XX/`, named by the chunk id.
//!
//! A chunk file holds a 16-byte header and the block's content, zstd-compressed when that is
//! smaller, raw otherwise. Chunk files are written to a temporary name in their fan-out
//! directory and renamed into place, so a reader never sees a partial file under a chunk's
//! name after a process crash. Durability against power loss comes from the backup's
//! checkpoints (`syncfs` before any journal record or snapshot that refers to new chunks);
//! [`ChunkStore::is_present`] also rejects the zero-length or truncated files that an
//! unsynced rename can leave after a power cut, so they are rewritten instead of reused.

use super::format::*;
use super::fsio::{self, TempFile};
use crate::error::{Error, IoContext, Result};
use crate::hash::{ChunkId, HashAlgorithm};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Access to the chunk files of one repository.
#[derive(Debug, Clone)]
pub struct ChunkStore {
    dir: PathBuf,
    hash: HashAlgorithm,
    /// Flush every chunk file before renaming it (platforms without `syncfs`).
    fsync_each: bool,
}

/// A chunk encoded for storage: its header and payload (borrowed from the [`Encoder`]).
#[derive(Debug)]
pub struct EncodedChunk<'a> {
    pub header: [u8; CHUNK_HEADER_LEN],
    pub payload: &'a [u8],
}

impl EncodedChunk<'_> {
    /// Size of the chunk file.
    pub fn len(&self) -> usize {
        CHUNK_HEADER_LEN + self.payload.len()
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

/// Per-thread compression state. Buffers are reused from block to block: a large allocation
/// per block would cost an `mmap`, page faults and an `munmap` each.
pub struct Encoder {
    compressor: zstd::bulk::Compressor<'static>,
    scratch: Vec<u8>,
}

impl Encoder {
    pub fn new(level: i32) -> Result<Encoder> {
        let mut compressor = zstd::bulk::Compressor::new(level)
            .map_err(|e| Error::InvalidArgument(format!("zstd level {level}: {e}")))?;
        // A 4 MiB window, so that a whole default pack is context for its end (levels up to
        // 8 default to 2 MiB or less; zstd shrinks the window for smaller inputs itself).
        if level <= 8 {
            compressor
                .set_parameter(zstd::zstd_safe::CParameter::WindowLog(22))
                .map_err(|e| {
                    Error::internal("chunk encoder", format!("cannot set the zstd window: {e}"))
                })?;
        }
        Ok(Encoder {
            compressor,
            scratch: Vec::new(),
        })
    }

    /// Encodes `data` (at most [`MAX_BLOCK_SIZE`] bytes), keeping the compressed form only
    /// when it is smaller.
    pub fn encode<'a>(&'a mut self, data: &'a [u8]) -> EncodedChunk<'a> {
        let bound = zstd::zstd_safe::compress_bound(data.len());
        if self.scratch.capacity() < bound {
            self.scratch.reserve(bound - self.scratch.len());
        }
        let compressed = self
            .compressor
            .compress_to_buffer(data, &mut self.scratch)
            .ok()
            .filter(|&n| n < data.len());
        let (codec, payload): (u8, &[u8]) = match compressed {
            Some(n) => (CODEC_ZSTD, &self.scratch[..n]),
            None => (CODEC_RAW, data),
        };
        let mut header = [0u8; CHUNK_HEADER_LEN];
        header[0..4].copy_from_slice(&CHUNK_MAGIC);
        header[4] = CHUNK_VERSION;
        header[5] = codec;
        header[8..12].copy_from_slice(&(data.len() as u32).to_le_bytes());
        header[12..16].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        EncodedChunk { header, payload }
    }
}

thread_local! {
    /// Per-thread read buffer and zstd context, reused across chunk reads.
    static SCRATCH: std::cell::RefCell<(Vec<u8>, Option<zstd::bulk::Decompressor<'static>>)> =
        const { std::cell::RefCell::new((Vec::new(), None)) };
}

/// What [`ChunkStore::check_cheap`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkHealth {
    /// A regular file with a sane header whose lengths match the file.
    Good,
    /// No file under the chunk's name.
    Missing,
    /// A file that cannot be a complete chunk, and why.
    Damaged(String),
}

/// Parsed chunk header.
#[derive(Debug, Clone, Copy)]
struct ChunkHeader {
    codec: u8,
    raw_len: u32,
    stored_len: u32,
}

/// Parses the header of chunk `id`, read from `path`: [`Error::UnsupportedVersion`] for a
/// chunk of another format version, [`Error::Corrupt`] for anything else wrong.
fn parse_header(h: &[u8], id: &ChunkId, path: &Path) -> Result<ChunkHeader> {
    let bad = |detail: String| Error::corrupt(format!("chunk {id}"), path, detail);
    if h.len() < CHUNK_HEADER_LEN {
        return Err(bad(format!(
            "{} bytes, shorter than a chunk header",
            h.len()
        )));
    }
    if h[0..4] != CHUNK_MAGIC {
        return Err(bad("bad magic (not a volback chunk)".into()));
    }
    if h[4] != CHUNK_VERSION {
        return Err(Error::UnsupportedVersion {
            what: "chunk",
            path: path.to_path_buf(),
            found: h[4].into(),
            supported: CHUNK_VERSION.into(),
        });
    }
    let codec = h[5];
    if codec != CODEC_RAW && codec != CODEC_ZSTD {
        return Err(bad(format!("unknown codec {codec}")));
    }
    let raw_len = le_u32(h, 8);
    let stored_len = le_u32(h, 12);
    if raw_len == 0 || raw_len > MAX_BLOCK_SIZE {
        return Err(bad(format!("uncompressed length {raw_len} out of range")));
    }
    if codec == CODEC_RAW && stored_len != raw_len {
        return Err(bad(
            "raw chunk whose stored and uncompressed lengths differ".into(),
        ));
    }
    if stored_len > MAX_BLOCK_SIZE + (MAX_BLOCK_SIZE >> 6) + 1024 {
        return Err(bad(format!("stored length {stored_len} out of range")));
    }
    Ok(ChunkHeader {
        codec,
        raw_len,
        stored_len,
    })
}

/// Decompresses the zstd `payload` of a chunk encoding into `out` (cleared) with the thread's
/// context `dctx`: exactly `raw_len` bytes, or an error naming `what`.
fn decompress(
    dctx: &mut Option<zstd::bulk::Decompressor<'static>>,
    payload: &[u8],
    raw_len: u32,
    out: &mut Vec<u8>,
    what: &str,
    path: &Path,
) -> Result<()> {
    out.clear();
    out.reserve(raw_len as usize);
    let d = match dctx {
        Some(d) => d,
        None => dctx.insert(
            zstd::bulk::Decompressor::new().map_err(|e| Error::io("set up zstd for", path, e))?,
        ),
    };
    let n = d
        .decompress_to_buffer(payload, out)
        .map_err(|e| Error::corrupt(what, path, format!("zstd: {e}")))?;
    if n != raw_len as usize {
        return Err(Error::corrupt(
            what,
            path,
            format!("decompressed to {n} bytes, header says {raw_len}"),
        ));
    }
    Ok(())
}

/// The uncompressed and stored lengths announced by the header of a chunk encoding held in
/// memory (a frame of a pack file, docs/FORMAT.md F2.2), after the checks of a chunk file's
/// header. Errors name `what`, read from `path`.
pub fn encoded_lengths(encoded: &[u8], what: &str, path: &Path) -> Result<(u32, u32)> {
    let hd = parse_header(encoded, &ChunkId([0; 32]), path).map_err(|e| match e {
        Error::Corrupt { path, detail, .. } => Error::Corrupt {
            what: what.into(),
            path,
            detail,
        },
        e => e,
    })?;
    Ok((hd.raw_len, hd.stored_len))
}

/// Decodes a whole chunk encoding held in memory (a frame of a pack file): checks its header
/// and length, and puts exactly its `raw_len` bytes of content in `out`. The content's hash
/// is the caller's to check (a frame holds several blobs). Errors name `what`.
pub fn decode_encoded(encoded: &[u8], what: &str, path: &Path, out: &mut Vec<u8>) -> Result<()> {
    let (raw_len, stored_len) = encoded_lengths(encoded, what, path)?;
    let payload = &encoded[CHUNK_HEADER_LEN..];
    if payload.len() != stored_len as usize {
        return Err(Error::corrupt(
            what,
            path,
            format!(
                "{} bytes but its header announces {}",
                encoded.len(),
                CHUNK_HEADER_LEN as u64 + u64::from(stored_len)
            ),
        ));
    }
    if encoded[5] == CODEC_RAW {
        out.clear();
        out.extend_from_slice(payload);
        return Ok(());
    }
    SCRATCH.with_borrow_mut(|(_, dctx)| decompress(dctx, payload, raw_len, out, what, path))
}

impl ChunkStore {
    pub fn new(dir: PathBuf, hash: HashAlgorithm, fsync_each: bool) -> ChunkStore {
        ChunkStore {
            dir,
            hash,
            fsync_each,
        }
    }

    pub fn hash_algorithm(&self) -> HashAlgorithm {
        self.hash
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where chunk `id` lives.
    pub fn path(&self, id: &ChunkId) -> PathBuf {
        let hex = id.to_hex();
        self.dir.join(&hex[..2]).join(hex)
    }

    /// True when a complete chunk file for `id` exists (header consistent with the file
    /// length): [`ChunkStore::check_cheap`] found it [`ChunkHealth::Good`]. Content is not
    /// re-hashed; `verify --read-data` does that.
    pub fn is_present(&self, id: &ChunkId) -> Result<bool> {
        Ok(self.check_cheap(id)? == ChunkHealth::Good)
    }

    /// The cheap check of an existing chunk, made wherever a backup would reuse a chunk
    /// instead of storing the block again (the parent's reference, change tracking,
    /// deduplication, pack slots, chunks a resume journal names): the chunk file exists, is
    /// a regular file (not a symlink, FIFO or directory), and its 16-byte header is sane
    /// (magic, version, codec, declared lengths) and agrees with the file's length. One
    /// `lstat`, one `open` and a 16-byte read; the content is not read (`verify
    /// --read-data` does that). A chunk that is not [`ChunkHealth::Good`] must be stored
    /// again from the source, which also repairs every snapshot that refers to it (chunks
    /// are content-addressed).
    /// A chunk of another format version is neither good nor damaged: the check fails with
    /// [`Error::UnsupportedVersion`], and the chunk is left alone.
    pub fn check_cheap(&self, id: &ChunkId) -> Result<ChunkHealth> {
        let path = self.path(id);
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(ChunkHealth::Missing);
            }
            Err(e) => return Err(Error::io("stat", &path, e)),
        };
        if !meta.file_type().is_file() {
            return Ok(ChunkHealth::Damaged("not a regular file".into()));
        }
        let len = meta.len();
        if len < CHUNK_HEADER_LEN as u64 {
            return Ok(ChunkHealth::Damaged(format!("file has only {len} bytes")));
        }
        // Opened without following links or waiting on a FIFO: the file may have been
        // swapped since the lstat.
        let mut f = match fsio::open_regular(&path, false, "open") {
            Ok(f) => f,
            Err(e) if fsio::is_not_found(&e) => return Ok(ChunkHealth::Missing),
            Err(Error::NotRegularFile { kind, .. }) => {
                return Ok(ChunkHealth::Damaged(format!("{kind}, not a regular file")));
            }
            Err(e) => return Err(e),
        };
        let mut h = [0u8; CHUNK_HEADER_LEN];
        if let Err(e) = f.read_exact(&mut h) {
            return Ok(ChunkHealth::Damaged(format!("header unreadable: {e}")));
        }
        Ok(match parse_header(&h, id, &path) {
            Ok(hd) if len == CHUNK_HEADER_LEN as u64 + hd.stored_len as u64 => ChunkHealth::Good,
            Ok(hd) => ChunkHealth::Damaged(format!(
                "file is {len} bytes but its header announces {}",
                CHUNK_HEADER_LEN as u64 + hd.stored_len as u64
            )),
            Err(Error::Corrupt { detail, .. }) => ChunkHealth::Damaged(detail),
            // A chunk of another format version is not damaged: it is neither set aside nor
            // rewritten, and the caller reports the version.
            Err(e) => return Err(e),
        })
    }

    /// Where [`ChunkStore::quarantine`] moves a damaged chunk: `<id>.bad` beside it (then
    /// `<id>.bad.1`, `<id>.bad.2`, … when that name is taken). Nothing reads these names.
    pub fn quarantine_path(&self, id: &ChunkId, n: u32) -> PathBuf {
        let mut p = self.path(id).into_os_string();
        p.push(".bad");
        if n > 0 {
            p.push(format!(".{n}"));
        }
        PathBuf::from(p)
    }

    /// Moves the damaged chunk file of `id` aside (renamed to a free
    /// [`ChunkStore::quarantine_path`], never deleted), so that the chunk counts as missing
    /// and the next backup of a source that still holds its data stores it again. Returns
    /// where it went, or `None` when there was no file to move.
    pub fn quarantine(&self, id: &ChunkId) -> Result<Option<PathBuf>> {
        super::fsio::set_aside(&self.path(id), &format!("chunk {id}"))
    }

    /// True when a chunk file for `id` exists and is longer than a header (metadata only).
    /// It does not see a damaged header: before reusing a chunk, a backup makes
    /// [`ChunkStore::check_cheap`] instead.
    pub fn exists(&self, id: &ChunkId) -> Result<bool> {
        let path = self.path(id);
        match std::fs::metadata(&path) {
            Ok(m) => Ok(m.len() > CHUNK_HEADER_LEN as u64),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io("stat", &path, e)),
        }
    }

    /// Stores an encoded chunk under `id` (temporary name, then rename).
    pub fn put(&self, id: &ChunkId, chunk: &EncodedChunk<'_>) -> Result<()> {
        let dest = self.path(id);
        let dir = dest.parent().unwrap_or(&self.dir);
        fsio::check_directory(dir)?;
        let tmp = match TempFile::create_in(dir, "") {
            Ok(t) => t,
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(dir).ctx("create directory", dir)?;
                TempFile::create_in(dir, "")?
            }
            Err(e) => return Err(e),
        };
        let mut f = tmp.file();
        f.write_all(&chunk.header).ctx("write", tmp.path())?;
        f.write_all(chunk.payload).ctx("write", tmp.path())?;
        if self.fsync_each {
            tmp.file().sync_data().ctx("flush", tmp.path())?;
        }
        // Named by its content: a chunk file of that name that cannot be replaced (open on
        // Windows) and holds the same bytes is as good.
        tmp.persist_content_named(&dest, false)
    }

    /// Reads, decompresses and checks chunk `id`; returns its content.
    pub fn get(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.get_into(id, &mut out)?;
        Ok(out)
    }

    /// Like [`ChunkStore::get`], reusing `out`'s allocation.
    pub fn get_into(&self, id: &ChunkId, out: &mut Vec<u8>) -> Result<()> {
        self.read_into(id, out, true)
    }

    /// Reads and decompresses chunk `id` into `out`; checks its hash when `check_hash` (a
    /// reader of pack slices checks each slice's own hash instead).
    pub fn read_into(&self, id: &ChunkId, out: &mut Vec<u8>, check_hash: bool) -> Result<()> {
        let path = self.path(id);
        let mut f = match fsio::open_regular(&path, false, "open") {
            Ok(f) => f,
            Err(e) if fsio::is_not_found(&e) => {
                return Err(Error::MissingChunk {
                    id: id.to_hex(),
                    path,
                });
            }
            Err(e) => return Err(e),
        };
        let what = || format!("chunk {id}");
        let len = f.metadata().ctx("stat", &path)?.len();
        let mut h = [0u8; CHUNK_HEADER_LEN];
        if len < CHUNK_HEADER_LEN as u64 {
            return Err(Error::corrupt(
                what(),
                &path,
                format!("file has only {len} bytes"),
            ));
        }
        f.read_exact(&mut h).ctx("read", &path)?;
        let hd = parse_header(&h, id, &path)?;
        if len != CHUNK_HEADER_LEN as u64 + hd.stored_len as u64 {
            return Err(Error::corrupt(
                what(),
                &path,
                format!(
                    "file is {len} bytes but its header announces {}",
                    CHUNK_HEADER_LEN as u64 + hd.stored_len as u64
                ),
            ));
        }
        out.clear();
        if hd.codec == CODEC_RAW {
            out.resize(hd.stored_len as usize, 0);
            f.read_exact(out).ctx("read", &path)?;
        } else {
            SCRATCH.with_borrow_mut(|(payload, dctx)| {
                payload.resize(hd.stored_len as usize, 0);
                f.read_exact(payload).ctx("read", &path)?;
                decompress(dctx, payload, hd.raw_len, out, &what(), &path)
            })?;
        }
        if !check_hash {
            return Ok(());
        }
        let actual = self.hash.hash(out);
        if actual != *id {
            return Err(Error::corrupt(
                what(),
                &path,
                format!("content hashes to {actual}"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// An empty store in a temporary directory (kept while the directory lives).
    fn store() -> (tempfile::TempDir, ChunkStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::new(dir.path().to_path_buf(), HashAlgorithm::Blake3, false);
        (dir, store)
    }

    /// Stores `data` compressed: its id, its file and the file's bytes.
    fn stored(store: &ChunkStore, data: &[u8]) -> (ChunkId, PathBuf, Vec<u8>) {
        let id = HashAlgorithm::Blake3.hash(data);
        store
            .put(&id, &Encoder::new(3).unwrap().encode(data))
            .unwrap();
        let p = store.path(&id);
        let bytes = std::fs::read(&p).unwrap();
        (id, p, bytes)
    }

    #[test]
    fn round_trip_compressible_and_random() {
        let (_dir, store) = store();
        let mut enc = Encoder::new(3).unwrap();
        let text = b"hello world ".repeat(5000);
        let mut random = vec![0u8; 65536];
        getrandom::fill(&mut random).unwrap();
        for data in [&text[..], &random[..]] {
            let id = HashAlgorithm::Blake3.hash(data);
            assert!(!store.is_present(&id).unwrap());
            store.put(&id, &enc.encode(data)).unwrap();
            assert!(store.is_present(&id).unwrap());
            assert_eq!(store.get(&id).unwrap(), data);
        }
        // random data is stored raw, text compressed
        let rid = HashAlgorithm::Blake3.hash(&random);
        let len = std::fs::metadata(store.path(&rid)).unwrap().len();
        assert!(len > 0);
        assert_eq!(len, 65536 + CHUNK_HEADER_LEN as u64);
    }

    #[test]
    fn flipped_byte_and_truncation_are_reported() {
        let (_dir, store) = store();
        let (id, p, mut bytes) = stored(&store, &b"abcdefgh".repeat(1000));
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        std::fs::write(&p, &bytes).unwrap();
        assert!(matches!(store.get(&id), Err(Error::Corrupt { .. })));
        std::fs::write(&p, &bytes[..10]).unwrap();
        assert!(!store.is_present(&id).unwrap());
        assert!(matches!(store.get(&id), Err(Error::Corrupt { .. })));
        std::fs::remove_file(&p).unwrap();
        assert!(matches!(store.get(&id), Err(Error::MissingChunk { .. })));
    }

    #[test]
    fn a_chunk_of_the_next_version_is_unsupported_not_damaged() {
        let (_dir, store) = store();
        let (id, p, mut bytes) = stored(&store, &b"next version".repeat(100));
        bytes[4] = CHUNK_VERSION + 1;
        std::fs::write(&p, &bytes).unwrap();
        let unsupported = |r: Result<_>| {
            matches!(r, Err(Error::UnsupportedVersion { what: "chunk", found, supported, .. })
                if found == u32::from(CHUNK_VERSION) + 1 && supported == u32::from(CHUNK_VERSION))
        };
        assert!(unsupported(store.get(&id).map(|_| ())));
        assert!(unsupported(store.check_cheap(&id).map(|_| ())));
        assert!(unsupported(store.is_present(&id).map(|_| ())));
    }

    #[test]
    fn cheap_check_and_quarantine() {
        let (_dir, store) = store();
        let data = b"0123456789".repeat(700);
        let id = HashAlgorithm::Blake3.hash(&data);
        assert_eq!(store.check_cheap(&id).unwrap(), ChunkHealth::Missing);
        assert_eq!(store.quarantine(&id).unwrap(), None);
        let enc_bytes = {
            let mut enc = Encoder::new(3).unwrap();
            let e = enc.encode(&data);
            let mut v = e.header.to_vec();
            v.extend_from_slice(e.payload);
            v
        };
        let p = store.path(&id);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, &enc_bytes).unwrap();
        assert_eq!(store.check_cheap(&id).unwrap(), ChunkHealth::Good);
        // Broken magic, a length that disagrees with the header, a directory in its place.
        let mut bad = enc_bytes.clone();
        bad[0] = b'X';
        std::fs::write(&p, &bad).unwrap();
        assert!(
            matches!(store.check_cheap(&id).unwrap(), ChunkHealth::Damaged(d) if d.contains("magic"))
        );
        let mut long = enc_bytes.clone();
        long.push(0);
        std::fs::write(&p, &long).unwrap();
        assert!(matches!(
            store.check_cheap(&id).unwrap(),
            ChunkHealth::Damaged(_)
        ));
        // Quarantine keeps every damaged copy under a free name.
        let first = store.quarantine(&id).unwrap().unwrap();
        assert_eq!(first, store.quarantine_path(&id, 0));
        assert_eq!(std::fs::read(&first).unwrap(), long);
        assert_eq!(store.check_cheap(&id).unwrap(), ChunkHealth::Missing);
        std::fs::write(&p, &bad).unwrap();
        let second = store.quarantine(&id).unwrap().unwrap();
        assert_eq!(second, store.quarantine_path(&id, 1));
        assert_eq!(std::fs::read(&second).unwrap(), bad);
        std::fs::create_dir(&p).unwrap();
        assert!(matches!(
            store.check_cheap(&id).unwrap(),
            ChunkHealth::Damaged(_)
        ));
    }

    proptest! {
        #[test]
        fn header_parser_never_panics(h in proptest::collection::vec(any::<u8>(), 0..40)) {
            let _ = parse_header(&h, &ChunkId([0; 32]), Path::new("chunk"));
        }
    }
}
