//! Writer markers and pending records (docs/FORMAT.md, F2.8): how a prune learns which
//! running backups may still use the packs it condemned.
//!
//! - `pending/<id>`: JSON `{"created", "packs": [pack ids], "index": [index file ids]}`,
//!   written atomically by prune; removed once its packs are deleted.
//! - `writers/<id>`: one per running backup, exclusively `flock`ed by it for its lifetime,
//!   JSON `{"pid", "host", "started", "knows": [pending record ids]}`. A marker whose lock
//!   can be taken belongs to a dead process. A marker being written (unparsable) belongs to a
//!   live writer that knows nothing yet.
//!
//! In an encrypted repository (format 3) each file is one sealed record of its JSON, named
//! by its id (a record moved to another name does not open); a marker that does not open is
//! read as a live writer that knows nothing, the safe reading.

use super::Repository;
use super::backend::{self, Marker, PutMode, ReadBackend};
use super::fsio;
use super::index::{self, is_hex_name, list_hex_names};
use super::seal::Sealer;
use crate::crypto::Kind;
use crate::error::{Error, Result};
use crate::hash::ChunkId;
use crate::platform;
use serde::{Deserialize, Serialize};

/// Largest pending record or marker read (against hostile files): a million packs.
const MAX_RECORD_LEN: u64 = 256 << 20;

/// A prune's condemnation record, `pending/<id>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingRecord {
    /// The file name.
    pub id: String,
    pub created: String,
    pub packs: Vec<ChunkId>,
    pub index: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct PendingJson {
    created: String,
    packs: Vec<String>,
    index: Vec<String>,
}

/// Every pending record of `repo`, sorted by id. A record removed while being listed is
/// skipped; a damaged one is an error naming it.
pub fn read_pending(repo: &Repository) -> Result<Vec<PendingRecord>> {
    read_pending_dir(repo.backend().as_ref(), PENDING_DIR, repo.sealer())
}

/// Where pending records are.
const PENDING_DIR: &str = "pending";

pub(crate) fn read_pending_dir(
    b: &dyn ReadBackend,
    dir: &str,
    sealer: &Sealer,
) -> Result<Vec<PendingRecord>> {
    let mut out = Vec::new();
    for id in list_hex_names(b, dir, 32)? {
        if let Some(r) = read_record(b, dir, id, sealer)? {
            out.push(r);
        }
    }
    Ok(out)
}

/// The pending records of `dir` that can be read; damaged ones are skipped (a reader only
/// uses them to find packs still readable, `verify` and `prune` report the damage).
pub(crate) fn read_pending_dir_lenient(
    b: &dyn ReadBackend,
    dir: &str,
    sealer: &Sealer,
) -> Result<Vec<PendingRecord>> {
    let mut out = Vec::new();
    for id in list_hex_names(b, dir, 32)? {
        match read_record(b, dir, id, sealer) {
            Ok(Some(r)) => out.push(r),
            Ok(None) | Err(Error::Corrupt { .. }) | Err(Error::NotRegularFile { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Pending record `id` of `dir`; `None` when it was removed meanwhile.
fn read_record(
    b: &dyn ReadBackend,
    dir: &str,
    id: String,
    sealer: &Sealer,
) -> Result<Option<PendingRecord>> {
    let key = backend::key(dir, &id);
    let path = b.display_path(&key);
    let limit = MAX_RECORD_LEN + sealer.overhead() as u64;
    let mut bytes = match b.get(&key, limit, "pending record") {
        Ok(b) => b,
        Err(e) if fsio::is_not_found(&e) => return Ok(None),
        Err(e) => return Err(e),
    };
    let what = format!("pending record {id}");
    let plain = sealer.open_in_place(Kind::Pending, id.as_bytes(), &mut bytes, &what, &path)?;
    let bad = |detail: String| Error::corrupt("pending record", &path, detail);
    let json: PendingJson =
        serde_json::from_slice(&bytes[plain]).map_err(|e| bad(e.to_string()))?;
    let packs = json
        .packs
        .iter()
        .map(|p| ChunkId::from_hex(p).ok_or_else(|| bad(format!("bad pack id {p:?}"))))
        .collect::<Result<Vec<_>>>()?;
    if let Some(i) = json.index.iter().find(|i| !is_hex_name(i, 64)) {
        return Err(bad(format!("bad index file id {i:?}")));
    }
    Ok(Some(PendingRecord {
        id,
        created: json.created,
        packs,
        index: json.index,
    }))
}

/// Writes a pending record durably; returns its id.
pub fn write_pending(repo: &Repository, packs: &[ChunkId], index: &[String]) -> Result<String> {
    let json = PendingJson {
        created: crate::time::rfc3339(crate::time::now_unix()),
        packs: packs.iter().map(|p| p.to_hex()).collect(),
        index: index.to_vec(),
    };
    let bytes =
        serde_json::to_vec(&json).map_err(|e| Error::internal("pending record", e.to_string()))?;
    let id = fsio::random_hex(16);
    let stored = repo.sealer().seal(Kind::Pending, id.as_bytes(), &bytes)?;
    let key = backend::key(PENDING_DIR, &id);
    repo.backend().put(&key, &stored, PutMode::Overwrite)?;
    Ok(id)
}

/// Removes pending record `id` durably; a record already gone is fine.
pub fn remove_pending(repo: &Repository, id: &str) -> Result<()> {
    repo.backend()
        .delete(&backend::key(PENDING_DIR, id))
        .map(|_| ())
}

#[derive(Serialize, Deserialize)]
struct MarkerJson {
    pid: u32,
    host: String,
    started: String,
    knows: Vec<String>,
}

/// A running writer's marker `writers/<id>`, kept alive by its backend (locked, or a
/// refreshed lease) until dropped, which removes it.
pub struct WriterMarker {
    id: String,
    marker: std::sync::Arc<std::sync::Mutex<Box<dyn Marker>>>,
    sealer: Sealer,
}

impl std::fmt::Debug for WriterMarker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriterMarker")
            .field("id", &self.id)
            .finish()
    }
}

impl WriterMarker {
    /// The marker's id (its object name).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Ok while the marker surely still protects this writer (a lease that could not be
    /// refreshed in time is an error: stop before relying on it).
    pub fn check(&self) -> Result<()> {
        self.lock().check()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Box<dyn Marker>> {
        self.marker.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A check of this marker for a [`backend::Fence`], usable while the marker lives (and
    /// harmless after: a dropped marker's check is its last state).
    pub fn fence_check(&self) -> std::sync::Arc<dyn Fn() -> Result<()> + Send + Sync> {
        let m = self.marker.clone();
        std::sync::Arc::new(move || m.lock().unwrap_or_else(|p| p.into_inner()).check())
    }

    /// Replaces the marker's content, atomically or so that a reader of a half-written
    /// marker takes it for a live writer that knows nothing, the safe reading.
    fn write(&mut self, json: &MarkerJson) -> Result<()> {
        let bytes = seal_marker(&self.sealer, &self.id, json)?;
        self.lock().write(&bytes)
    }
}

fn seal_marker(sealer: &Sealer, id: &str, json: &MarkerJson) -> Result<Vec<u8>> {
    let json =
        serde_json::to_vec(json).map_err(|e| Error::internal("writer marker", e.to_string()))?;
    sealer
        .seal(Kind::Writer, id.as_bytes(), &json)
        .map(|c| c.into_owned())
}

/// Creates this process's writer marker, reads the pending records, and records in the
/// marker that it knows them, in that order (docs/FORMAT.md F2.8): a prune that wrote a
/// record after the read waits for this writer, one whose record was read has its packs left
/// out of this writer's index.
pub fn register_writer(repo: &Repository) -> Result<(WriterMarker, Vec<PendingRecord>)> {
    let mut json = MarkerJson {
        pid: std::process::id(),
        host: platform::hostname(),
        started: crate::time::rfc3339(crate::time::now_unix()),
        knows: Vec::new(),
    };
    let mut last = None;
    for _ in 0..100 {
        let id = fsio::random_hex(16);
        let payload = seal_marker(repo.sealer(), &id, &json)?;
        match repo.backend().create_marker(&id, &payload) {
            Ok(marker) => {
                let mut marker = WriterMarker {
                    id,
                    marker: std::sync::Arc::new(std::sync::Mutex::new(marker)),
                    sealer: repo.sealer().clone(),
                };
                let pending = read_pending(repo)?;
                json.knows = pending.iter().map(|p| p.id.clone()).collect();
                marker.write(&json)?;
                return Ok((marker, pending));
            }
            // Taken away by a cleaner between its creation and its lock: another name.
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::AlreadyExists => {
                last = Some(source);
            }
            Err(e) => return Err(e),
        }
    }
    Err(Error::io(
        "create writer marker in",
        repo.backend().display_path("writers"),
        last.unwrap_or_else(|| std::io::Error::other("it keeps disappearing after creation")),
    ))
}

/// What a live writer's marker says (pid 0 and empty fields while it is being written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriterInfo {
    pub id: String,
    pub pid: u32,
    pub host: String,
    pub started: String,
    pub knows: Vec<String>,
}

/// The live writers of `repo`, sorted by id. Markers of dead writers (their lock can be
/// taken) are removed.
pub fn live_writers(repo: &Repository) -> Result<Vec<WriterInfo>> {
    let mut out = Vec::new();
    for (id, bytes) in repo.backend().live_markers()? {
        if !index::is_hex_name(&id, 32) {
            continue;
        }
        let path = repo.backend().display_path(&backend::key("writers", &id));
        let what = format!("writer marker {id}");
        let json = bytes.and_then(|mut bytes| {
            let plain = repo
                .sealer()
                .open_in_place(Kind::Writer, id.as_bytes(), &mut bytes, &what, &path)
                .ok()?;
            serde_json::from_slice::<MarkerJson>(bytes.get(plain)?).ok()
        });
        let info = match json {
            Some(j) => WriterInfo {
                id,
                pid: j.pid,
                host: j.host,
                started: j.started,
                knows: j.knows,
            },
            None => WriterInfo {
                id,
                pid: 0,
                host: String::new(),
                started: String::new(),
                knows: Vec::new(),
            },
        };
        out.push(info);
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::InitOptions;

    fn repo() -> (tempfile::TempDir, Repository) {
        let dir = tempfile::tempdir().unwrap();
        let r = Repository::init(&dir.path().join("r"), &InitOptions::default()).unwrap();
        (dir, r)
    }

    #[test]
    fn pending_records_round_trip() {
        let (_d, r) = repo();
        assert!(read_pending(&r).unwrap().is_empty());
        let packs = [ChunkId([1; 32]), ChunkId([2; 32])];
        let index = vec!["ab".repeat(32)];
        let id = write_pending(&r, &packs, &index).unwrap();
        let list = read_pending(&r).unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].id, id);
        assert_eq!(list[0].packs, packs);
        assert_eq!(list[0].index, index);
        std::fs::write(r.pending_dir().join(".tmp-x"), b"junk").unwrap();
        assert_eq!(read_pending(&r).unwrap().len(), 1);
        std::fs::write(r.pending_dir().join("cd".repeat(16)), b"{junk").unwrap();
        assert!(matches!(read_pending(&r), Err(Error::Corrupt { .. })));
        // Readers skip it: they only look for packs still readable.
        assert_eq!(
            read_pending_dir_lenient(r.backend().as_ref(), "pending", r.sealer())
                .unwrap()
                .len(),
            1
        );
        crate::repo::blobs::BlobStore::open(&r).unwrap();
        std::fs::remove_file(r.pending_dir().join("cd".repeat(16))).unwrap();
        remove_pending(&r, &id).unwrap();
        remove_pending(&r, &id).unwrap();
        assert!(read_pending(&r).unwrap().is_empty());
    }

    #[test]
    fn writers_are_live_while_registered_and_dead_markers_are_removed() {
        let (_d, r) = repo();
        let pending = write_pending(&r, &[ChunkId([3; 32])], &[]).unwrap();
        let (marker, known) = register_writer(&r).unwrap();
        assert_eq!(known.len(), 1);
        let live = live_writers(&r).unwrap();
        assert_eq!(live.len(), 1);
        assert_eq!(live[0].id, marker.id());
        assert_eq!(live[0].pid, std::process::id());
        assert_eq!(live[0].knows, vec![pending]);
        // A dead writer's marker (nobody holds its lock) is removed.
        let dead = r.writers_dir().join("ef".repeat(16));
        std::fs::write(&dead, b"{}").unwrap();
        assert_eq!(live_writers(&r).unwrap().len(), 1);
        assert!(!dead.exists());
        drop(marker);
        assert!(live_writers(&r).unwrap().is_empty());
        assert_eq!(std::fs::read_dir(r.writers_dir()).unwrap().count(), 0);
    }

    #[test]
    fn sealed_records_and_markers_are_bound_to_their_names() {
        let dir = tempfile::tempdir().unwrap();
        let r = Repository::init(&dir.path().join("r"), &InitOptions::default())
            .unwrap()
            .encrypted_for_tests();
        let packs = [ChunkId([1; 32])];
        let index = vec!["ab".repeat(32)];
        let id = write_pending(&r, &packs, &index).unwrap();
        let path = r.pending_dir().join(&id);
        let stored = std::fs::read(&path).unwrap();
        assert!(!stored.windows(5).any(|w| w == b"packs"));
        let list = read_pending(&r).unwrap();
        assert_eq!(
            (list[0].packs.as_slice(), &list[0].index),
            (&packs[..], &index)
        );
        // Under another name it does not open: an error naming it; readers skip it.
        let moved = "cd".repeat(16);
        std::fs::write(r.pending_dir().join(&moved), &stored).unwrap();
        let e = read_pending(&r).unwrap_err();
        assert!(matches!(e, Error::Corrupt { .. }), "{e}");
        assert!(
            e.to_string().contains(&format!("pending record {moved}")),
            "{e}"
        );
        assert_eq!(
            read_pending_dir_lenient(r.backend().as_ref(), "pending", r.sealer())
                .unwrap()
                .len(),
            1
        );
        std::fs::remove_file(r.pending_dir().join(&moved)).unwrap();
        // A plain reader sees no JSON.
        let plain = Sealer::plain(crate::hash::HashAlgorithm::Blake3);
        assert!(read_pending_dir(r.backend().as_ref(), "pending", &plain).is_err());
        // Markers: sealed, read back; one that does not open knows nothing.
        let (marker, known) = register_writer(&r).unwrap();
        assert_eq!(known.len(), 1);
        let mpath = r.writers_dir().join(marker.id());
        let bytes = std::fs::read(&mpath).unwrap();
        assert!(!bytes.windows(5).any(|w| w == b"knows"));
        let live = live_writers(&r).unwrap();
        assert_eq!(live[0].knows, vec![id.clone()]);
        assert_eq!(live[0].pid, std::process::id());
        let mut flipped = bytes.clone();
        flipped[30] ^= 1;
        std::fs::write(&mpath, &flipped).unwrap();
        let live = live_writers(&r).unwrap();
        assert_eq!((live.len(), live[0].knows.len(), live[0].pid), (1, 0, 0));
        drop(marker);
        assert!(live_writers(&r).unwrap().is_empty());
    }

    #[test]
    fn an_unparsable_live_marker_knows_nothing() {
        let (_d, r) = repo();
        let (marker, _) = register_writer(&r).unwrap();
        let path = r.writers_dir().join(marker.id());
        std::fs::write(&path, b"{\"pid\": 1").unwrap();
        let live = live_writers(&r).unwrap();
        assert_eq!(live.len(), 1);
        assert!(live[0].knows.is_empty());
    }
}
