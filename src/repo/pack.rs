//! Pack files (docs/FORMAT.md, "Repository format 2", F2.2): frames of blobs followed by a
//! blob table and a trailer. Written once by a [`PackWriter`] into a temporary file, renamed
//! to `packs/XX/<id>` where `<id>` is the BLAKE3 of the whole file, never modified after.
//!
//! ```text
//! 0      16   magic "VBPACK\r\n", u32 version 1, u32 reserved
//! 16     …    frames (chunk encodings, FORMAT §3), back to back
//! T      52·n blob table (encode_entry)
//! T+52n  56   u64 T, u32 n, u32 reserved, [32] BLAKE3 of the table, magic "VBPKEND\n"
//! ```
//!
//! In an encrypted repository (format 3) each frame is one sealed record of its chunk
//! encoding, and the table one sealed record of its 52·n bytes (`n·52 + 40` stored bytes,
//! which the trailer's BLAKE3 covers); entries describe the records ([`Sealer`]).

pub use super::format::{
    BLOB_ENTRY_LEN, PACK_HEADER_LEN, PACK_MAGIC, PACK_TRAILER_LEN, PACK_VERSION,
};

use super::backend::{self, ReadBackend, Staged, WriteBackend};
use super::blob::{BlobEntry, BlobKind};
use super::chunks;
use super::format::{CHUNK_HEADER_LEN, MAX_FRAME_RAW, PACK_END_MAGIC, le_u32, le_u64};
use super::seal::Sealer;
use crate::crypto::Kind;
use crate::error::{Error, Result};
use crate::hash::ChunkId;
use std::path::Path;

/// Longest frame a pack may hold: a header and a stored payload (raw, or zstd's worst case)
/// of a frame of the largest raw content.
pub const MAX_FRAME_LEN: u32 =
    CHUNK_HEADER_LEN as u32 + MAX_FRAME_RAW + (MAX_FRAME_RAW >> 6) + 1024;

/// Largest pack file: frame offsets are u32.
const MAX_PACK_LEN: u64 = u32::MAX as u64;

/// Appends the 52-byte table encoding of `e` to `out`.
pub fn encode_entry(e: &BlobEntry, out: &mut Vec<u8>) {
    out.extend_from_slice(&e.id.0);
    out.push(e.kind.code());
    out.extend_from_slice(&[0; 3]);
    out.extend_from_slice(&e.frame_offset.to_le_bytes());
    out.extend_from_slice(&e.frame_len.to_le_bytes());
    out.extend_from_slice(&e.raw_offset.to_le_bytes());
    out.extend_from_slice(&e.raw_len.to_le_bytes());
}

/// Decodes one 52-byte table entry; `None` for a short slice, an unknown kind, non-zero
/// reserved bytes, or lengths no writer produces (frame before the pack header, shorter than
/// a chunk header or longer than the longest frame, each plus `overhead`, the bytes sealing
/// adds to a frame; empty blob, blob beyond the largest frame content).
pub fn decode_entry(b: &[u8], overhead: usize) -> Option<BlobEntry> {
    let b = b.get(..BLOB_ENTRY_LEN)?;
    let mut id = [0u8; 32];
    id.copy_from_slice(&b[..32]);
    let kind = BlobKind::from_code(b[32])?;
    if b[33..36] != [0; 3] {
        return None;
    }
    let e = BlobEntry {
        id: ChunkId(id),
        kind,
        frame_offset: le_u32(b, 36),
        frame_len: le_u32(b, 40),
        raw_offset: le_u32(b, 44),
        raw_len: le_u32(b, 48),
    };
    let blob_end = u64::from(e.raw_offset) + u64::from(e.raw_len);
    let sane = e.frame_offset as usize >= PACK_HEADER_LEN
        && e.frame_len as usize > CHUNK_HEADER_LEN + overhead
        && u64::from(e.frame_len) <= u64::from(MAX_FRAME_LEN) + overhead as u64
        && e.raw_len >= 1
        && blob_end <= u64::from(MAX_FRAME_RAW);
    sane.then_some(e)
}

/// Reads and checks the blob table of pack `pack` at `path`: header magic and version
/// ([`Error::UnsupportedVersion`] for another version), trailer, counts against the file
/// length (before anything is allocated), the table's BLAKE3, its authenticity (sealed
/// tables), and every entry's frame within the frame area. The pack's own id is not
/// re-hashed (verify --read-data does that).
pub fn read_pack_table(
    b: &dyn ReadBackend,
    pack: &ChunkId,
    sealer: &Sealer,
) -> Result<Vec<BlobEntry>> {
    let key = backend::pack_key(pack);
    let path = &b.display_path(&key);
    let len = match b.head(&key)? {
        Some(m) => m.size,
        None => {
            return Err(Error::io(
                "open",
                path,
                std::io::Error::from(std::io::ErrorKind::NotFound),
            ));
        }
    };
    let what = || format!("pack {pack}");
    let bad = |detail: String| Error::corrupt(what(), path, detail);
    if len < (PACK_HEADER_LEN + PACK_TRAILER_LEN) as u64 {
        return Err(bad(format!("file has only {len} bytes")));
    }
    if len > MAX_PACK_LEN {
        return Err(bad(format!("file has {len} bytes, more than a pack can")));
    }
    let mut head = [0u8; PACK_HEADER_LEN];
    b.get_range(&key, 0, &mut head)?;
    if head[..8] != PACK_MAGIC {
        return Err(bad("bad magic (not a volback pack)".into()));
    }
    let version = le_u32(&head, 8);
    if version != PACK_VERSION {
        return Err(Error::UnsupportedVersion {
            what: "pack",
            path: path.to_path_buf(),
            found: version,
            supported: PACK_VERSION,
        });
    }
    let mut trailer = [0u8; PACK_TRAILER_LEN];
    b.get_range(&key, len - PACK_TRAILER_LEN as u64, &mut trailer)?;
    if trailer[48..56] != PACK_END_MAGIC {
        return Err(bad("bad trailer magic (truncated or not a pack)".into()));
    }
    if head[12..16] != [0; 4] || trailer[12..16] != [0; 4] {
        return Err(bad("reserved bytes are not zero".into()));
    }
    let table_offset = le_u64(&trailer, 0);
    let count = le_u32(&trailer, 8);
    let overhead = sealer.overhead();
    let expected_len = (count as u64)
        .checked_mul(BLOB_ENTRY_LEN as u64)
        .and_then(|t| t.checked_add(overhead as u64))
        .and_then(|t| t.checked_add(table_offset))
        .and_then(|t| t.checked_add(PACK_TRAILER_LEN as u64));
    if table_offset < PACK_HEADER_LEN as u64 || expected_len != Some(len) {
        return Err(bad(format!(
            "trailer says {count} entries at offset {table_offset}, which does not fit a \
             {len}-byte file"
        )));
    }
    // Bounded by the file length checked above.
    let mut table = vec![0u8; count as usize * BLOB_ENTRY_LEN + overhead];
    b.get_range(&key, table_offset, &mut table)?;
    if blake3::hash(&table).as_bytes()[..] != trailer[16..48] {
        return Err(bad("blob table checksum mismatch".into()));
    }
    let plain = sealer.open_in_place(
        Kind::PackTable,
        b"",
        &mut table,
        &format!("blob table of pack {pack}"),
        path,
    )?;
    let mut out = Vec::with_capacity(count as usize);
    for (i, raw) in table[plain].chunks_exact(BLOB_ENTRY_LEN).enumerate() {
        let e = decode_entry(raw, overhead)
            .ok_or_else(|| bad(format!("blob table entry {i} is invalid")))?;
        if u64::from(e.frame_offset) + u64::from(e.frame_len) > table_offset {
            return Err(bad(format!(
                "blob table entry {i}: frame at {} of {} bytes runs past the frames",
                e.frame_offset, e.frame_len
            )));
        }
        out.push(e);
    }
    Ok(out)
}

/// Reads the frame of `e` from pack `pack` of `b`, opens it (a sealed record is
/// authenticated), checks its header against the entry, decompresses it and checks that the
/// blob lies within its content. Returns the frame's whole raw content. The blob's id is the
/// caller's to check.
pub fn read_frame_raw(
    b: &dyn ReadBackend,
    pack: &ChunkId,
    e: &BlobEntry,
    sealer: &Sealer,
) -> Result<Vec<u8>> {
    let key = backend::pack_key(pack);
    let path = &b.display_path(&key);
    let what = format!("frame at offset {} (blob {})", e.frame_offset, e.id);
    let overhead = sealer.overhead();
    if (e.frame_len as usize) <= CHUNK_HEADER_LEN + overhead
        || u64::from(e.frame_len) > u64::from(MAX_FRAME_LEN) + overhead as u64
    {
        return Err(Error::corrupt(
            what,
            path,
            format!("indexed frame length {} is impossible", e.frame_len),
        ));
    }
    let mut frame = vec![0u8; e.frame_len as usize];
    b.get_range(&key, u64::from(e.frame_offset), &mut frame)?;
    let plain = sealer.open_in_place(Kind::Frame, b"", &mut frame, &what, path)?;
    let mut raw = Vec::new();
    chunks::decode_encoded(&frame[plain], &what, path, &mut raw)?;
    if u64::from(e.raw_offset) + u64::from(e.raw_len) > raw.len() as u64 {
        return Err(Error::corrupt(
            what,
            path,
            format!(
                "blob at {}+{} lies beyond the frame's {} bytes of content",
                e.raw_offset,
                e.raw_len,
                raw.len()
            ),
        ));
    }
    Ok(raw)
}

/// Compresses frames and seals them (in an encrypted repository), reusing its buffers: one
/// per thread, so that compression and encryption run where the data is, not under the
/// packer's lock.
pub struct FrameEncoder {
    encoder: chunks::Encoder,
    sealer: Sealer,
    out: Vec<u8>,
}

impl std::fmt::Debug for FrameEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameEncoder")
            .field("sealed", &self.sealer.is_encrypted())
            .finish_non_exhaustive()
    }
}

impl FrameEncoder {
    pub fn new(zstd_level: i32, sealer: &Sealer) -> Result<FrameEncoder> {
        Ok(FrameEncoder {
            encoder: chunks::Encoder::new(zstd_level)?,
            sealer: sealer.clone(),
            out: Vec::new(),
        })
    }

    /// The stored form of a frame whose raw content is `raw` (1 ..= 16 MiB): its chunk
    /// encoding (FORMAT §3), sealed as one record in an encrypted repository. Valid until
    /// the next call.
    pub fn encode(&mut self, raw: &[u8]) -> Result<&[u8]> {
        self.out.clear();
        let start = self.sealer.begin_seal(&mut self.out);
        let enc = self.encoder.encode(raw);
        self.out.reserve(enc.len() + self.sealer.overhead());
        self.out.extend_from_slice(&enc.header);
        self.out.extend_from_slice(enc.payload);
        self.sealer
            .finish_seal(Kind::Frame, b"", &mut self.out, start)?;
        Ok(&self.out)
    }
}

/// Writes one pack file: a temporary file in the repository's `tmp/`, hashed while written,
/// renamed to its name by [`PackWriter::finish`]. Dropped unfinished, the file is removed.
pub struct PackWriter {
    tmp: Box<dyn Staged>,
    hasher: blake3::Hasher,
    len: u64,
    entries: Vec<BlobEntry>,
    sealer: Sealer,
}

impl std::fmt::Debug for PackWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackWriter")
            .field("len", &self.len)
            .field("entries", &self.entries.len())
            .finish()
    }
}

impl PackWriter {
    /// Starts a pack staged by `b` (a temporary file, or memory); its frames and table are
    /// stored as `sealer` says.
    pub fn create(b: &dyn WriteBackend, sealer: &Sealer) -> Result<PackWriter> {
        let tmp = b.stage()?;
        let mut head = [0u8; PACK_HEADER_LEN];
        head[..8].copy_from_slice(&PACK_MAGIC);
        head[8..12].copy_from_slice(&PACK_VERSION.to_le_bytes());
        let mut w = PackWriter {
            tmp,
            hasher: blake3::Hasher::new(),
            len: 0,
            entries: Vec::new(),
            sealer: sealer.clone(),
        };
        w.write(&head)?;
        Ok(w)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.tmp.write(bytes)?;
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Appends one frame. `stored`: the frame as stored ([`FrameEncoder::encode`]: a whole
    /// chunk encoding, 16-byte VBCK header + payload, sealed in an encrypted repository);
    /// `raw_len`: the length of its raw content; `blobs`: (id, kind, raw_offset, raw_len) of
    /// the blobs inside that content. A frame that is not a valid encoding (plain) or cannot
    /// be one (sealed), or blobs outside its content, are refused (an [`Error::Internal`]:
    /// the caller built them).
    pub fn add_frame(
        &mut self,
        stored: &[u8],
        raw_len: u32,
        blobs: &[(ChunkId, BlobKind, u32, u32)],
    ) -> Result<()> {
        let overhead = self.sealer.overhead();
        if overhead == 0 {
            let (header_raw, stored_len) =
                chunks::encoded_lengths(stored, "new frame", Path::new("new pack"))
                    .map_err(|e| Error::internal("pack writer", e.to_string()))?;
            if stored.len() as u64 != CHUNK_HEADER_LEN as u64 + u64::from(stored_len)
                || header_raw != raw_len
            {
                return Err(Error::internal(
                    "pack writer",
                    "frame length disagrees with its header",
                ));
            }
        } else if stored.len() <= CHUNK_HEADER_LEN + overhead
            || stored.len() as u64 > u64::from(MAX_FRAME_LEN) + overhead as u64
        {
            return Err(Error::internal(
                "pack writer",
                format!("a sealed frame of {} bytes", stored.len()),
            ));
        }
        if blobs.is_empty() {
            return Err(Error::internal("pack writer", "a frame without blobs"));
        }
        for &(id, _, off, len) in blobs {
            if len == 0 || u64::from(off) + u64::from(len) > u64::from(raw_len) {
                return Err(Error::internal(
                    "pack writer",
                    format!("blob {id} at {off}+{len} is outside its frame of {raw_len} bytes"),
                ));
            }
        }
        let frame_offset = self.len;
        if frame_offset + stored.len() as u64 > MAX_PACK_LEN - (1 << 30) {
            return Err(Error::internal("pack writer", "pack grew past 3 GiB"));
        }
        self.write(stored)?;
        for &(id, kind, raw_offset, raw_len) in blobs {
            self.entries.push(BlobEntry {
                id,
                kind,
                frame_offset: frame_offset as u32,
                frame_len: stored.len() as u32,
                raw_offset,
                raw_len,
            });
        }
        Ok(())
    }

    /// Bytes written so far (header and frames).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when no frame was added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries of the frames added so far (frame offsets final, pack id not known yet).
    pub fn entries(&self) -> &[BlobEntry] {
        &self.entries
    }

    /// Writes the table and trailer and publishes the pack as `packs/XX/<id>`, durable at
    /// the backend's next barrier (the caller calls it before naming the pack anywhere).
    /// Returns the pack id and its table.
    pub fn finish(mut self) -> Result<(ChunkId, Vec<BlobEntry>)> {
        let table_offset = self.len;
        let mut table =
            Vec::with_capacity(self.entries.len() * BLOB_ENTRY_LEN + self.sealer.overhead());
        let start = self.sealer.begin_seal(&mut table);
        for e in &self.entries {
            encode_entry(e, &mut table);
        }
        self.sealer
            .finish_seal(Kind::PackTable, b"", &mut table, start)?;
        let mut trailer = Vec::with_capacity(PACK_TRAILER_LEN);
        trailer.extend_from_slice(&table_offset.to_le_bytes());
        trailer.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        trailer.extend_from_slice(&[0; 4]);
        trailer.extend_from_slice(blake3::hash(&table).as_bytes());
        trailer.extend_from_slice(&PACK_END_MAGIC);
        self.write(&table)?;
        self.write(&trailer)?;
        let id = ChunkId(*self.hasher.finalize().as_bytes());
        // Named by its content: an existing pack of that name is this very pack.
        self.tmp.finish(&backend::pack_key(&id))?;
        Ok((id, self.entries))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::HashAlgorithm;
    use crate::repo::chunks::Encoder;
    use proptest::prelude::*;

    fn encode(data: &[u8]) -> Vec<u8> {
        let mut enc = Encoder::new(3).unwrap();
        let e = enc.encode(data);
        let mut v = e.header.to_vec();
        v.extend_from_slice(e.payload);
        v
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        tmp: std::path::PathBuf,
        packs: std::path::PathBuf,
        b: crate::repo::backend::local::LocalDir,
        sealer: Sealer,
    }

    fn plain() -> Sealer {
        Sealer::plain(HashAlgorithm::Blake3)
    }

    fn sealed() -> Sealer {
        crate::repo::seal::testing::encrypted("0123")
    }

    fn fixture() -> Fixture {
        fixture_with(plain())
    }

    fn fixture_with(sealer: Sealer) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join("tmp");
        let packs = dir.path().join("packs");
        std::fs::create_dir_all(&tmp).unwrap();
        for i in 0..=255u8 {
            std::fs::create_dir_all(packs.join(format!("{i:02x}"))).unwrap();
        }
        Fixture {
            b: crate::repo::backend::local::LocalDir::new(dir.path()),
            _dir: dir,
            tmp,
            packs,
            sealer,
        }
    }

    /// A pack of two frames: two blobs in the first, one in the second.
    fn sample(f: &Fixture) -> (ChunkId, Vec<BlobEntry>, Vec<Vec<u8>>, std::path::PathBuf) {
        let h = HashAlgorithm::Blake3;
        let a = b"aaaa".repeat(1000);
        let b = b"bbbb".repeat(3000);
        let mut random = vec![0u8; 5000];
        getrandom::fill(&mut random).unwrap();
        let mut frame1 = a.clone();
        frame1.extend_from_slice(&b);
        let mut enc = FrameEncoder::new(3, &f.sealer).unwrap();
        let mut w = PackWriter::create(&f.b, &f.sealer).unwrap();
        assert!(w.is_empty());
        w.add_frame(
            enc.encode(&frame1).unwrap(),
            frame1.len() as u32,
            &[
                (h.hash(&a), BlobKind::Data, 0, a.len() as u32),
                (h.hash(&b), BlobKind::Data, a.len() as u32, b.len() as u32),
            ],
        )
        .unwrap();
        w.add_frame(
            enc.encode(&random).unwrap(),
            random.len() as u32,
            &[(h.hash(&random), BlobKind::Tree, 0, random.len() as u32)],
        )
        .unwrap();
        let (id, entries) = w.finish().unwrap();
        let hex = id.to_hex();
        let path = f.packs.join(&hex[..2]).join(&hex);
        (id, entries, vec![a, b, random], path)
    }

    #[test]
    fn round_trip() {
        for sealer in [plain(), sealed()] {
            round_trip_with(sealer);
        }
    }

    fn round_trip_with(sealer: Sealer) {
        let f = fixture_with(sealer);
        let (id, entries, blobs, path) = sample(&f);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(ChunkId(*blake3::hash(&bytes).as_bytes()), id);
        assert_eq!(std::fs::read_dir(&f.tmp).unwrap().count(), 0);
        let table = read_pack_table(&f.b, &id, &f.sealer).unwrap();
        assert_eq!(table, entries);
        let overhead = f.sealer.overhead();
        assert_eq!(
            bytes.len(),
            crate::prune::plan::pack_file_len(&table, overhead as u64) as usize
        );
        for (e, content) in table.iter().zip(&blobs) {
            let raw = read_frame_raw(&f.b, &id, e, &f.sealer).unwrap();
            let blob = &raw[e.raw_offset as usize..(e.raw_offset + e.raw_len) as usize];
            assert_eq!(blob, &content[..]);
            assert_eq!(HashAlgorithm::Blake3.hash(blob), e.id);
        }
        assert_eq!(table[2].kind, BlobKind::Tree);
        let mut enc = Vec::new();
        encode_entry(&table[1], &mut enc);
        assert_eq!(enc.len(), BLOB_ENTRY_LEN);
        assert_eq!(decode_entry(&enc, overhead), Some(table[1]));
        if f.sealer.is_encrypted() {
            // Nothing of the blobs or of the table is in the file in the clear; the wrong
            // key reads nothing.
            for content in &blobs {
                assert!(!bytes.windows(64).any(|w| w == &content[..64]));
            }
            assert!(!bytes.windows(32).any(|w| w == entries[0].id.0));
            let other = crate::repo::seal::testing::encrypted("4567");
            assert!(matches!(
                read_pack_table(&f.b, &id, &other),
                Err(Error::Corrupt { .. })
            ));
            let e = read_frame_raw(&f.b, &id, &table[0], &other).unwrap_err();
            assert!(matches!(e, Error::Corrupt { .. }));
            let msg = e.to_string();
            assert!(
                msg.contains("frame at offset 16") && msg.contains(&id.to_hex()),
                "{msg}"
            );
            // A plain reader sees no valid frame, a sealed reader no plain one.
            assert!(read_pack_table(&f.b, &id, &plain()).is_err());
        }
    }

    #[test]
    fn truncated_and_flipped_packs_are_corrupt() {
        for sealer in [plain(), sealed()] {
            truncated_and_flipped_with(sealer);
        }
    }

    fn truncated_and_flipped_with(sealer: Sealer) {
        let f = fixture_with(sealer);
        let (id, entries, _, path) = sample(&f);
        let good = std::fs::read(&path).unwrap();
        let corrupt = |bytes: &[u8]| {
            std::fs::write(&path, bytes).unwrap();
            read_pack_table(&f.b, &id, &f.sealer)
        };
        for cut in [0, 10, 16, 71, good.len() - 1, good.len() - 57] {
            assert!(
                matches!(corrupt(&good[..cut]), Err(Error::Corrupt { .. })),
                "cut {cut}"
            );
        }
        let mut longer = good.clone();
        longer.push(0);
        assert!(matches!(corrupt(&longer), Err(Error::Corrupt { .. })));
        // Every single flipped bit of the table or trailer is caught.
        let table_start =
            good.len() - PACK_TRAILER_LEN - entries.len() * BLOB_ENTRY_LEN - f.sealer.overhead();
        for i in (table_start..good.len()).step_by(7) {
            let mut bad = good.clone();
            bad[i] ^= 0x10;
            assert!(corrupt(&bad).is_err(), "byte {i}");
        }
        // A flipped payload byte: the table is fine, the frame is not.
        let mut bad = good.clone();
        bad[PACK_HEADER_LEN + 20] ^= 0xff;
        std::fs::write(&path, &bad).unwrap();
        let table = read_pack_table(&f.b, &id, &f.sealer).unwrap();
        assert!(read_frame_raw(&f.b, &id, &table[0], &f.sealer).is_err());
        if f.sealer.is_encrypted() {
            // A changed byte of a sealed frame fails its authentication.
            let e = read_frame_raw(&f.b, &id, &table[0], &f.sealer).unwrap_err();
            assert!(e.to_string().contains("authentication failed"), "{e}");
        }
        // Next version of the pack format.
        let mut next = good.clone();
        next[8] = 2;
        assert!(matches!(
            corrupt(&next),
            Err(Error::UnsupportedVersion {
                what: "pack",
                found: 2,
                ..
            })
        ));
    }

    #[test]
    fn hostile_counts_and_offsets_are_refused_before_allocating() {
        let f = fixture();
        let (id, _, _, path) = sample(&f);
        let good = std::fs::read(&path).unwrap();
        let n = good.len();
        let with_trailer = |t_off: u64, count: u32| {
            let mut b = good.clone();
            b[n - 56..n - 48].copy_from_slice(&t_off.to_le_bytes());
            b[n - 48..n - 44].copy_from_slice(&count.to_le_bytes());
            std::fs::write(&path, &b).unwrap();
            read_pack_table(&f.b, &id, &f.sealer)
        };
        for (t, c) in [
            (u64::MAX, u32::MAX),
            (0, 1),
            (16, u32::MAX),
            (u64::MAX - 10, 3),
        ] {
            assert!(matches!(with_trailer(t, c), Err(Error::Corrupt { .. })));
        }
        // An entry whose frame runs into the table (table checksum fixed up).
        std::fs::write(&path, &good).unwrap();
        let mut entries = read_pack_table(&f.b, &id, &f.sealer).unwrap();
        entries[2].frame_len += 1;
        let table_off = n - 56 - 3 * BLOB_ENTRY_LEN;
        let mut table = Vec::new();
        for e in &entries {
            encode_entry(e, &mut table);
        }
        let mut b = good.clone();
        b[table_off..n - 56].copy_from_slice(&table);
        b[n - 40..n - 8].copy_from_slice(blake3::hash(&table).as_bytes());
        std::fs::write(&path, &b).unwrap();
        assert!(matches!(
            read_pack_table(&f.b, &id, &f.sealer),
            Err(Error::Corrupt { .. })
        ));
        // Entries with impossible lengths, and a frame read with a lying entry.
        let mut e = entries[0];
        e.raw_len = 0;
        let mut enc = Vec::new();
        encode_entry(&e, &mut enc);
        assert_eq!(decode_entry(&enc, 0), None);
        enc[32] = 9;
        assert_eq!(decode_entry(&enc, 0), None);
        assert_eq!(decode_entry(&enc[..51], 0), None);
        std::fs::write(&path, &good).unwrap();
        let mut lying = entries[0];
        lying.raw_offset = 1 << 20;
        assert!(read_frame_raw(&f.b, &id, &lying, &f.sealer).is_err());
        lying = entries[0];
        lying.frame_len = u32::MAX;
        assert!(read_frame_raw(&f.b, &id, &lying, &f.sealer).is_err());
        lying = entries[0];
        lying.frame_len -= 1;
        assert!(read_frame_raw(&f.b, &id, &lying, &f.sealer).is_err());
        // Sealed: a frame length that leaves no room for a record, or a cut record.
        let s = sealed();
        lying = entries[0];
        lying.frame_len = (CHUNK_HEADER_LEN + s.overhead()) as u32;
        assert!(read_frame_raw(&f.b, &id, &lying, &s).is_err());
        let mut enc = Vec::new();
        encode_entry(&lying, &mut enc);
        assert_eq!(decode_entry(&enc, s.overhead()), None);
        lying.frame_len = MAX_FRAME_LEN + s.overhead() as u32;
        encode_entry(&lying, &mut enc);
        assert!(decode_entry(&enc[52..], s.overhead()).is_some());
        assert_eq!(decode_entry(&enc[52..], 0), None);
        assert!(read_frame_raw(&f.b, &id, &lying, &s).is_err());
    }

    #[test]
    fn writer_refuses_bad_frames() {
        let f = fixture();
        let mut w = PackWriter::create(&f.b, &f.sealer).unwrap();
        let enc = encode(b"hello hello hello");
        let id = ChunkId([1; 32]);
        assert!(
            w.add_frame(&enc, 17, &[(id, BlobKind::Data, 10, 10)])
                .is_err()
        );
        assert!(
            w.add_frame(&enc[..10], 17, &[(id, BlobKind::Data, 0, 1)])
                .is_err()
        );
        assert!(
            w.add_frame(&enc, 18, &[(id, BlobKind::Data, 0, 1)])
                .is_err()
        );
        assert!(w.add_frame(&enc, 17, &[]).is_err());
        assert!(w.is_empty());
        drop(w);
        assert_eq!(std::fs::read_dir(&f.tmp).unwrap().count(), 0);
        let s = sealed();
        let mut w = PackWriter::create(&f.b, &s).unwrap();
        assert!(
            w.add_frame(&enc, 17, &[(id, BlobKind::Data, 0, 1)])
                .is_err()
        );
        let mut fe = FrameEncoder::new(3, &s).unwrap();
        let stored = fe.encode(b"hello hello hello").unwrap().to_vec();
        assert!(
            w.add_frame(&stored, 17, &[(id, BlobKind::Data, 9, 9)])
                .is_err()
        );
        w.add_frame(&stored, 17, &[(id, BlobKind::Data, 0, 17)])
            .unwrap();
        assert!(!w.is_empty());
    }

    proptest! {
        #[test]
        fn decoding_random_bytes_never_panics(
            b in proptest::collection::vec(any::<u8>(), 0..200),
            frame in proptest::collection::vec(any::<u8>(), 0..100),
        ) {
            let _ = decode_entry(&b, 0);
            let _ = decode_entry(&b, 40);
            let mut out = Vec::new();
            let _ = chunks::decode_encoded(&frame, "frame", Path::new("p"), &mut out);
        }

        #[test]
        fn random_pack_files_never_panic(b in proptest::collection::vec(any::<u8>(), 0..400)) {
            let dir = tempfile::tempdir().unwrap();
            let lb = crate::repo::backend::local::LocalDir::new(dir.path());
            let p = dir.path().join("packs/00");
            std::fs::create_dir_all(&p).unwrap();
            let p = p.join("00".repeat(32));
            let mut bytes = PACK_MAGIC.to_vec();
            bytes.extend_from_slice(&1u32.to_le_bytes());
            bytes.extend_from_slice(&b);
            std::fs::write(&p, &bytes).unwrap();
            let _ = read_pack_table(&lb, &ChunkId([0; 32]), &plain());
            let _ = read_pack_table(&lb, &ChunkId([0; 32]), &sealed());
        }
    }
}
