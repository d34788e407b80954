//! Index files (docs/FORMAT.md, F2.3) and the in-memory index: where each blob is.
//!
//! ```text
//! 0   16  magic "VBINDEX\n", u32 version 1, u32 pack count p
//! 16  …   p × ([32] pack id, u32 entry count m, m × 52-byte blob-table entries)
//! end 32  BLAKE3 of every byte before; its hex is the file name
//! ```
//!
//! In an encrypted repository (format 3) the whole file is one sealed record of those bytes
//! and its name is the BLAKE3 of the stored record (checked before it is opened).
//!
//! Index files are immutable. The in-memory [`Index`] is the union of the files loaded; a
//! prune replaces files by compacted ones (written before the old ones are deleted), so a
//! file that vanishes between listing and reading is skipped and the directory listed again.

use super::Repository;
use super::backend::{self, PutMode, ReadBackend, WriteBackend};
use super::blob::{BlobEntry, Location};
use super::format::{
    BLOB_ENTRY_LEN, INDEX_HEADER_LEN, INDEX_MAGIC, INDEX_PACK_HEADER_LEN, INDEX_TRAILER_LEN,
    INDEX_VERSION, MAX_INDEX_FILE, le_u32,
};
use super::fsio;
use super::pack::{decode_entry, encode_entry};
use super::seal::Sealer;
use crate::crypto::Kind;
use crate::error::{Error, Result};
use crate::hash::ChunkId;
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// The content of one index file: packs and their blob tables.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IndexFile {
    pub packs: Vec<(ChunkId, Vec<BlobEntry>)>,
}

impl IndexFile {
    /// The file's bytes, trailing BLAKE3 included (plain: what a format-2 repository stores).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    /// Appends [`IndexFile::encode`]'s bytes to `out`.
    fn encode_into(&self, out: &mut Vec<u8>) {
        let entries: usize = self.packs.iter().map(|(_, e)| e.len()).sum();
        out.reserve(
            INDEX_HEADER_LEN
                + self.packs.len() * INDEX_PACK_HEADER_LEN
                + entries * BLOB_ENTRY_LEN
                + INDEX_TRAILER_LEN
                + crate::crypto::SEAL_OVERHEAD,
        );
        let start = out.len();
        out.extend_from_slice(&INDEX_MAGIC);
        out.extend_from_slice(&INDEX_VERSION.to_le_bytes());
        out.extend_from_slice(&(self.packs.len() as u32).to_le_bytes());
        for (pack, entries) in &self.packs {
            out.extend_from_slice(&pack.0);
            out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
            for e in entries {
                encode_entry(e, out);
            }
        }
        let sum = blake3::hash(&out[start..]);
        out.extend_from_slice(sum.as_bytes());
    }

    /// The stored file ([`IndexFile::encode`], sealed in an encrypted repository) and its
    /// id: the hex of its trailing BLAKE3 (plain), of the BLAKE3 of the record (sealed).
    pub fn encode_stored(&self, sealer: &Sealer) -> Result<(Vec<u8>, String)> {
        let mut out = Vec::new();
        let start = sealer.begin_seal(&mut out);
        self.encode_into(&mut out);
        if !sealer.is_encrypted() {
            let id = hex::encode(&out[out.len() - INDEX_TRAILER_LEN..]);
            return Ok((out, id));
        }
        sealer.finish_seal(Kind::Index, b"", &mut out, start)?;
        let id = blake3::hash(&out).to_hex().to_string();
        Ok((out, id))
    }

    /// Parses and checks an index file read from `path`: magic, version
    /// ([`Error::UnsupportedVersion`] for another), checksum, every count against the bytes
    /// left before anything is allocated, every entry. The name is [`IndexFile::read`]'s to
    /// check. `bytes` are plain (opened first when sealed); `overhead` is what sealing adds
    /// to a frame in this repository ([`decode_entry`]).
    pub fn decode(bytes: &[u8], path: &Path) -> Result<IndexFile> {
        Self::decode_with(bytes, path, 0)
    }

    fn decode_with(bytes: &[u8], path: &Path, overhead: usize) -> Result<IndexFile> {
        let bad = |detail: String| Error::corrupt("index file", path, detail);
        let len = bytes.len();
        if len < INDEX_HEADER_LEN + INDEX_TRAILER_LEN {
            return Err(bad(format!("file has only {len} bytes")));
        }
        if len as u64 > MAX_INDEX_FILE {
            return Err(bad(format!("file has {len} bytes, more than allowed")));
        }
        if bytes[..8] != INDEX_MAGIC {
            return Err(bad("bad magic (not a volback index file)".into()));
        }
        let version = le_u32(bytes, 8);
        if version != INDEX_VERSION {
            return Err(Error::UnsupportedVersion {
                what: "index file",
                path: path.to_path_buf(),
                found: version,
                supported: INDEX_VERSION,
            });
        }
        let body_end = len - INDEX_TRAILER_LEN;
        if blake3::hash(&bytes[..body_end]).as_bytes()[..] != bytes[body_end..] {
            return Err(bad("checksum mismatch".into()));
        }
        let pack_count = le_u32(bytes, 12) as usize;
        if pack_count > (body_end - INDEX_HEADER_LEN) / INDEX_PACK_HEADER_LEN {
            return Err(bad(format!(
                "{pack_count} packs announced in a {len}-byte file"
            )));
        }
        let mut packs = Vec::with_capacity(pack_count);
        let mut pos = INDEX_HEADER_LEN;
        for p in 0..pack_count {
            if body_end - pos < INDEX_PACK_HEADER_LEN {
                return Err(bad(format!("pack {p} of {pack_count} is cut off")));
            }
            let mut id = [0u8; 32];
            id.copy_from_slice(&bytes[pos..pos + 32]);
            let count = le_u32(bytes, pos + 32) as usize;
            pos += INDEX_PACK_HEADER_LEN;
            if count > (body_end - pos) / BLOB_ENTRY_LEN {
                return Err(bad(format!(
                    "pack {p} announces {count} entries, more than the file holds"
                )));
            }
            let mut entries = Vec::with_capacity(count);
            for i in 0..count {
                let e = decode_entry(&bytes[pos..pos + BLOB_ENTRY_LEN], overhead)
                    .ok_or_else(|| bad(format!("entry {i} of pack {} is invalid", ChunkId(id))))?;
                entries.push(e);
                pos += BLOB_ENTRY_LEN;
            }
            packs.push((ChunkId(id), entries));
        }
        if pos != body_end {
            return Err(bad(format!(
                "{} bytes follow the last pack",
                body_end - pos
            )));
        }
        Ok(IndexFile { packs })
    }

    /// Writes the file durably into the repository's `index/`; returns its id.
    pub fn write(&self, repo: &Repository) -> Result<String> {
        self.write_to(repo.backend().as_ref(), "index", repo.sealer())
    }

    /// Writes the file durably into directory `dir` of `b`, stored as `sealer` says;
    /// returns its id.
    pub(crate) fn write_to(
        &self,
        b: &dyn WriteBackend,
        dir: &str,
        sealer: &Sealer,
    ) -> Result<String> {
        let (bytes, id) = self.encode_stored(sealer)?;
        b.put(&backend::key(dir, &id), &bytes, PutMode::Overwrite)?;
        Ok(id)
    }

    /// Reads and checks index file `key` of `b`, whose name must be the hex of its checksum
    /// (plain) or of the BLAKE3 of the stored record (sealed, checked before it is opened).
    pub fn read(b: &dyn ReadBackend, key: &str, sealer: &Sealer) -> Result<IndexFile> {
        let overhead = sealer.overhead();
        let path = &b.display_path(key);
        let mut bytes = b.get(key, MAX_INDEX_FILE + overhead as u64, "index file")?;
        let name = Some(backend::base_name(key));
        let what = || match &name {
            Some(n) => format!("index file {n}"),
            None => "index file".to_string(),
        };
        if sealer.is_encrypted() {
            let sum = blake3::hash(&bytes).to_hex();
            if name != Some(sum.as_str()) {
                return Err(Error::corrupt(
                    what(),
                    path,
                    format!("the BLAKE3 of its bytes is {sum}, not its name"),
                ));
            }
            let plain = sealer.open_in_place(Kind::Index, b"", &mut bytes, &what(), path)?;
            return IndexFile::decode_with(&bytes[plain], path, overhead);
        }
        let file = IndexFile::decode(&bytes, path)?;
        let sum = hex::encode(&bytes[bytes.len() - INDEX_TRAILER_LEN..]);
        if name != Some(sum.as_str()) {
            return Err(Error::corrupt(
                "index file",
                path,
                format!("its checksum is {sum}, not its name"),
            ));
        }
        Ok(file)
    }
}

/// True for a name that can be an index file, pack or pending id: lowercase hex digits.
pub(crate) fn is_hex_name(name: &str, len: usize) -> bool {
    name.len() == len && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Ids of the index files of `repo`, sorted (temporary and unknown names skipped).
pub fn list_index_files(repo: &Repository) -> Result<Vec<String>> {
    list_hex_names(repo.backend().as_ref(), "index", 64)
}

/// The names of the objects in directory `dir` of `b` that are `len` lowercase hex digits,
/// sorted (temporary objects skipped; a missing directory has none).
pub(crate) fn list_hex_names(b: &dyn ReadBackend, dir: &str, len: usize) -> Result<Vec<String>> {
    let mut ids = Vec::new();
    b.list(dir, &mut |m| {
        let name = backend::base_name(&m.name);
        if is_hex_name(name, len) {
            ids.push(name.to_string());
        }
        Ok(())
    })?;
    ids.sort();
    Ok(ids)
}

/// The in-memory union of index files: blob id → location. A blob listed in several packs
/// keeps its first location, unless that one is only a fallback (a pack of a pending
/// record, [`Index::insert_fallback`]) and the new one is not.
///
/// Compact: each pack's table is kept once; the map holds a pack number and an entry number.
#[derive(Debug, Default)]
pub struct Index {
    packs: Vec<ChunkId>,
    entries: Vec<Vec<BlobEntry>>,
    fallback: Vec<bool>,
    by_pack: HashMap<ChunkId, u32>,
    blobs: HashMap<ChunkId, (u32, u32)>,
    files: HashSet<String>,
    exclude: HashSet<ChunkId>,
}

/// Most times the index directory is listed again because files vanished while being read.
const MAX_RELISTS: usize = 100;

impl Index {
    /// Loads every index file of `repo`, leaving out the packs in `exclude_packs` (now and
    /// at every [`Index::refresh`]).
    pub fn load(repo: &Repository, exclude_packs: &HashSet<ChunkId>) -> Result<Index> {
        Index::load_dir(
            repo.backend().as_ref(),
            "index",
            exclude_packs,
            repo.sealer(),
        )
    }

    pub(crate) fn load_dir(
        b: &dyn ReadBackend,
        dir: &str,
        exclude_packs: &HashSet<ChunkId>,
        sealer: &Sealer,
    ) -> Result<Index> {
        let mut index = Index {
            exclude: exclude_packs.clone(),
            ..Index::default()
        };
        index.refresh_dir(b, dir, sealer)?;
        Ok(index)
    }

    /// Loads the index files not loaded yet; returns how many.
    pub fn refresh(&mut self, repo: &Repository) -> Result<usize> {
        self.refresh_dir(repo.backend().as_ref(), "index", repo.sealer())
    }

    pub(crate) fn refresh_dir(
        &mut self,
        b: &dyn ReadBackend,
        dir: &str,
        sealer: &Sealer,
    ) -> Result<usize> {
        let mut loaded = 0;
        for _ in 0..MAX_RELISTS {
            let mut vanished = false;
            for name in list_hex_names(b, dir, 64)? {
                if self.files.contains(&name) {
                    continue;
                }
                match IndexFile::read(b, &backend::key(dir, &name), sealer) {
                    Ok(file) => {
                        for (pack, entries) in file.packs {
                            if !self.exclude.contains(&pack) {
                                self.add_owned(pack, entries, false);
                            }
                        }
                        self.files.insert(name);
                        loaded += 1;
                    }
                    // Replaced by a compacted file, which the next listing shows.
                    Err(e) if fsio::is_not_found(&e) => vanished = true,
                    Err(e) => return Err(e),
                }
            }
            if !vanished {
                return Ok(loaded);
            }
        }
        Err(Error::io(
            "read index files in",
            b.display_path(dir),
            std::io::Error::other("they keep disappearing while being read"),
        ))
    }

    /// An index of the files of `dir` not in `known`, without the packs of `exclude`.
    pub(crate) fn load_new(
        b: &dyn ReadBackend,
        dir: &str,
        exclude: &HashSet<ChunkId>,
        known: &[String],
        sealer: &Sealer,
    ) -> Result<Index> {
        let mut index = Index {
            exclude: exclude.clone(),
            files: known.iter().cloned().collect(),
            ..Index::default()
        };
        index.refresh_dir(b, dir, sealer)?;
        Ok(index)
    }

    /// Adds every pack and file of `other`.
    pub(crate) fn merge(&mut self, other: &Index) {
        for (p, pack) in other.packs.iter().enumerate() {
            self.add(*pack, &other.entries[p], other.fallback[p]);
        }
        self.files.extend(other.files.iter().cloned());
    }

    /// Records index file `id` as loaded (a writer that wrote it knows its content).
    pub fn mark_loaded(&mut self, id: &str) {
        self.files.insert(id.to_string());
    }

    /// Where blob `id` is.
    pub fn get(&self, id: &ChunkId) -> Option<Location> {
        let &(p, i) = self.blobs.get(id)?;
        Some(Location {
            pack: *self.packs.get(p as usize)?,
            entry: *self.entries.get(p as usize)?.get(i as usize)?,
        })
    }

    pub fn contains(&self, id: &ChunkId) -> bool {
        self.blobs.contains_key(id)
    }

    /// Every location of blob `id`, the one [`Index::get`] gives first. Scans every table:
    /// for the rare reads whose first location failed (a pack missing or set aside).
    pub fn locations(&self, id: &ChunkId) -> Vec<Location> {
        let mut out: Vec<Location> = self.get(id).into_iter().collect();
        if out.is_empty() {
            return out;
        }
        for (p, entries) in self.entries.iter().enumerate() {
            for e in entries.iter().filter(|e| e.id == *id) {
                let loc = Location {
                    pack: self.packs[p],
                    entry: *e,
                };
                if !out.contains(&loc) {
                    out.push(loc);
                }
            }
        }
        out
    }

    /// Adds the table of `pack` (a pack already indexed keeps its first table).
    pub fn insert(&mut self, pack: ChunkId, entries: &[BlobEntry]) {
        self.add(pack, entries, false);
    }

    /// Adds the table of `pack` as a fallback: its blobs are found there only while no
    /// other pack holds them (a pack of a pending record, still readable until deleted).
    pub fn insert_fallback(&mut self, pack: ChunkId, entries: &[BlobEntry]) {
        self.add(pack, entries, true);
    }

    fn add(&mut self, pack: ChunkId, entries: &[BlobEntry], fallback: bool) {
        if self.by_pack.contains_key(&pack) {
            self.add_owned(pack, Vec::new(), fallback);
        } else {
            self.add_owned(pack, entries.to_vec(), fallback);
        }
    }

    fn add_owned(&mut self, pack: ChunkId, entries: Vec<BlobEntry>, fallback: bool) {
        let p = match self.by_pack.get(&pack) {
            // Indexed again (a compacted file, a rescue): the first table stays, but a
            // fallback pack becomes a proper one.
            Some(&p) if !fallback && self.fallback[p as usize] => {
                self.fallback[p as usize] = false;
                p
            }
            Some(_) => return,
            None => {
                let p = self.packs.len() as u32;
                self.packs.push(pack);
                self.entries.push(entries);
                self.fallback.push(fallback);
                self.by_pack.insert(pack, p);
                p
            }
        };
        let table = &self.entries[p as usize];
        self.blobs.reserve(table.len());
        for (i, e) in table.iter().enumerate() {
            let cur = self.blobs.entry(e.id).or_insert((p, i as u32));
            // A proper location replaces a fallback one.
            if self.fallback[cur.0 as usize] && !self.fallback[p as usize] {
                *cur = (p, i as u32);
            }
        }
    }

    /// Number of blobs.
    pub fn len(&self) -> usize {
        self.blobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blobs.is_empty()
    }

    /// Every indexed pack (fallback ones included).
    pub fn packs(&self) -> Vec<ChunkId> {
        self.packs.clone()
    }

    /// Every entry of `pack` as indexed.
    pub fn pack_entries(&self, pack: &ChunkId) -> Option<&[BlobEntry]> {
        let &p = self.by_pack.get(pack)?;
        self.entries.get(p as usize).map(|v| &v[..])
    }

    /// Ids of the index files loaded, sorted.
    pub fn files(&self) -> Vec<String> {
        let mut v: Vec<String> = self.files.iter().cloned().collect();
        v.sort();
        v
    }

    /// Approximate heap bytes held (tables and map), for sizing reports.
    pub fn heap_bytes(&self) -> usize {
        let entries: usize = self.entries.iter().map(|e| e.capacity()).sum();
        entries * std::mem::size_of::<BlobEntry>()
            + self.blobs.capacity() * (std::mem::size_of::<(ChunkId, (u32, u32))>() + 1)
            + self.packs.capacity() * (std::mem::size_of::<ChunkId>() * 2 + 32)
    }

    /// The packs left out of this index (a writer's known pending packs).
    pub fn excluded(&self) -> &HashSet<ChunkId> {
        &self.exclude
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::backend::local::LocalDir;
    use crate::repo::blob::BlobKind;
    use proptest::prelude::*;

    fn plain() -> Sealer {
        Sealer::plain(crate::hash::HashAlgorithm::Blake3)
    }

    fn entry(n: u8, frame_offset: u32) -> BlobEntry {
        BlobEntry {
            id: ChunkId([n; 32]),
            kind: if n.is_multiple_of(2) {
                BlobKind::Data
            } else {
                BlobKind::Tree
            },
            frame_offset,
            frame_len: 100,
            raw_offset: 0,
            raw_len: 1000,
        }
    }

    fn sample() -> IndexFile {
        IndexFile {
            packs: vec![
                (ChunkId([0xa0; 32]), vec![entry(1, 16), entry(2, 116)]),
                (ChunkId([0xb0; 32]), vec![]),
                (ChunkId([0xc0; 32]), vec![entry(3, 16)]),
            ],
        }
    }

    #[test]
    fn round_trip_and_name_check() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalDir::new(dir.path());
        let f = sample();
        let id = f.write_to(&b, "", &plain()).unwrap();
        assert_eq!(list_hex_names(&b, "", 64).unwrap(), vec![id.clone()]);
        assert_eq!(IndexFile::read(&b, &id, &plain()).unwrap(), f);
        let other = dir.path().join("f".repeat(64));
        std::fs::copy(dir.path().join(&id), &other).unwrap();
        assert!(matches!(
            IndexFile::read(&b, &"f".repeat(64), &plain()),
            Err(Error::Corrupt { .. })
        ));
        let empty = IndexFile::default();
        assert_eq!(
            IndexFile::decode(&empty.encode(), Path::new("x")).unwrap(),
            empty
        );
    }

    #[test]
    fn sealed_files_are_named_by_their_stored_bytes_and_authenticated() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalDir::new(dir.path());
        let sealer = crate::repo::seal::testing::encrypted("ab");
        let f = sample();
        let id = f.write_to(&b, "", &sealer).unwrap();
        let path = dir.path().join(&id);
        let stored = std::fs::read(&path).unwrap();
        assert_eq!(blake3::hash(&stored).to_hex().as_str(), id);
        assert_eq!(stored.len(), f.encode().len() + 40);
        assert!(!stored.windows(8).any(|w| w == INDEX_MAGIC));
        assert_eq!(IndexFile::read(&b, &id, &sealer).unwrap(), f);
        // Same content, another record (fresh salt), another name.
        assert_ne!(f.write_to(&b, "", &sealer).unwrap(), id);
        let mut idx = Index::load_dir(&b, "", &HashSet::new(), &sealer).unwrap();
        assert_eq!(idx.files().len(), 2);
        assert_eq!(idx.len(), 3);
        assert_eq!(idx.refresh_dir(&b, "", &sealer).unwrap(), 0);
        // Renamed: the name check fails before anything is opened.
        let other = dir.path().join("f".repeat(64));
        std::fs::copy(&path, &other).unwrap();
        let e = IndexFile::read(&b, &"f".repeat(64), &sealer).unwrap_err();
        assert!(matches!(e, Error::Corrupt { .. }) && e.to_string().contains("not its name"));
        std::fs::remove_file(&other).unwrap();
        // A changed byte, renamed to its new hash: authentication fails, naming the file.
        let mut bad = stored.clone();
        bad[30] ^= 1;
        let bad_id = blake3::hash(&bad).to_hex().to_string();
        std::fs::write(dir.path().join(&bad_id), &bad).unwrap();
        let e = IndexFile::read(&b, &bad_id, &sealer).unwrap_err();
        assert!(matches!(e, Error::Corrupt { .. }), "{e}");
        assert!(
            e.to_string().contains(&format!("index file {bad_id}")),
            "{e}"
        );
        assert!(Index::load_dir(&b, "", &HashSet::new(), &sealer).is_err());
        // Another repository's key, and a plain reader, read nothing.
        let other_key = crate::repo::seal::testing::encrypted("cd");
        assert!(IndexFile::read(&b, &id, &other_key).is_err());
        assert!(IndexFile::read(&b, &id, &plain()).is_err());
        // Hostile plaintext under the right key is still checked.
        let mut junk = Vec::new();
        let st = sealer.begin_seal(&mut junk);
        junk.extend_from_slice(&INDEX_MAGIC);
        junk.extend_from_slice(&1u32.to_le_bytes());
        junk.extend_from_slice(&u32::MAX.to_le_bytes());
        let sum = blake3::hash(&junk[st + 24..]);
        junk.extend_from_slice(sum.as_bytes());
        sealer.finish_seal(Kind::Index, b"", &mut junk, st).unwrap();
        let junk_id = blake3::hash(&junk).to_hex().to_string();
        std::fs::write(dir.path().join(&junk_id), &junk).unwrap();
        assert!(matches!(
            IndexFile::read(&b, &junk_id, &sealer),
            Err(Error::Corrupt { .. })
        ));
    }

    #[test]
    fn truncated_flipped_and_hostile_files_are_corrupt() {
        let p = Path::new("index/x");
        let good = sample().encode();
        for cut in [0, 8, 16, 47, good.len() - 1] {
            assert!(IndexFile::decode(&good[..cut], p).is_err(), "cut {cut}");
        }
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 1;
            assert!(IndexFile::decode(&bad, p).is_err(), "byte {i}");
        }
        // Hostile counts with a valid checksum: refused before allocating.
        let reseal = |mut b: Vec<u8>| {
            let n = b.len() - 32;
            let sum = blake3::hash(&b[..n]);
            b[n..].copy_from_slice(sum.as_bytes());
            b
        };
        let mut b = good.clone();
        b[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            IndexFile::decode(&reseal(b), p),
            Err(Error::Corrupt { .. })
        ));
        let mut b = good.clone();
        b[16 + 32..16 + 36].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            IndexFile::decode(&reseal(b), p),
            Err(Error::Corrupt { .. })
        ));
        let mut b = good.clone();
        b[8] = 2;
        assert!(matches!(
            IndexFile::decode(&reseal(b), p),
            Err(Error::UnsupportedVersion { found: 2, .. })
        ));
    }

    #[test]
    fn union_exclusion_fallback_and_vanishing_files() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalDir::new(dir.path());
        let f1 = sample();
        let id1 = f1.write_to(&b, "", &plain()).unwrap();
        let exclude: HashSet<ChunkId> = [ChunkId([0xc0; 32])].into();
        let mut idx = Index::load_dir(&b, "", &exclude, &plain()).unwrap();
        assert_eq!(idx.len(), 2);
        assert!(!idx.contains(&ChunkId([3; 32])));
        assert_eq!(idx.files(), vec![id1.clone()]);
        assert_eq!(idx.pack_entries(&ChunkId([0xa0; 32])).unwrap().len(), 2);
        assert_eq!(idx.pack_entries(&ChunkId([0xb0; 32])).unwrap().len(), 0);
        // Blob 1 also in a fallback pack and in a later pack: the first proper one wins.
        idx.insert_fallback(ChunkId([0xd0; 32]), &[entry(1, 500), entry(5, 16)]);
        assert_eq!(
            idx.get(&ChunkId([1; 32])).unwrap().pack,
            ChunkId([0xa0; 32])
        );
        assert_eq!(
            idx.get(&ChunkId([5; 32])).unwrap().pack,
            ChunkId([0xd0; 32])
        );
        idx.insert(ChunkId([0xe0; 32]), &[entry(5, 16)]);
        assert_eq!(
            idx.get(&ChunkId([5; 32])).unwrap().pack,
            ChunkId([0xe0; 32])
        );
        // A fallback pack indexed properly later becomes a proper location.
        idx.insert_fallback(ChunkId([0xf0; 32]), &[entry(7, 16)]);
        idx.insert(ChunkId([0xf0; 32]), &[entry(7, 16)]);
        idx.insert(ChunkId([0x10; 32]), &[entry(7, 32)]);
        assert_eq!(
            idx.get(&ChunkId([7; 32])).unwrap().pack,
            ChunkId([0xf0; 32])
        );
        // Refresh loads new files only; a file gone between listing and reading is skipped.
        let f2 = IndexFile {
            packs: vec![(ChunkId([0x20; 32]), vec![entry(9, 16)])],
        };
        let id2 = f2.write_to(&b, "", &plain()).unwrap();
        assert_eq!(idx.refresh_dir(&b, "", &plain()).unwrap(), 1);
        assert!(idx.contains(&ChunkId([9; 32])));
        assert_eq!(idx.refresh_dir(&b, "", &plain()).unwrap(), 0);
        std::fs::remove_file(dir.path().join(&id1)).unwrap();
        std::fs::remove_file(dir.path().join(&id2)).unwrap();
        let f3 = IndexFile {
            packs: vec![(ChunkId([0x30; 32]), vec![entry(11, 16)])],
        };
        f3.write_to(&b, "", &plain()).unwrap();
        assert_eq!(idx.refresh_dir(&b, "", &plain()).unwrap(), 1);
        assert!(idx.contains(&ChunkId([11; 32])));
        // Temporary files are not index files.
        std::fs::write(dir.path().join(".tmp-x"), b"junk").unwrap();
        assert_eq!(list_hex_names(&b, "", 64).unwrap().len(), 1);
    }

    proptest! {
        #[test]
        fn decoding_random_bytes_never_panics(
            b in proptest::collection::vec(any::<u8>(), 0..600),
            packs in 0u32..4,
        ) {
            let mut bytes = INDEX_MAGIC.to_vec();
            bytes.extend_from_slice(&1u32.to_le_bytes());
            bytes.extend_from_slice(&packs.to_le_bytes());
            bytes.extend_from_slice(&b);
            let n = bytes.len().saturating_sub(32);
            if n >= 16 {
                let sum = blake3::hash(&bytes[..n]);
                bytes[n..].copy_from_slice(sum.as_bytes());
            }
            let _ = IndexFile::decode(&bytes, Path::new("x"));
            let _ = IndexFile::decode(&b, Path::new("x"));
        }
    }
}
