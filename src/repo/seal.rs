//! What every repository object passes through on its way to and from disk: nothing in a
//! plain repository (format 1 and 2), a sealed record ([`crate::crypto`]) in an encrypted one
//! (format 3). Blob ids and the chunker's seed depend on it too, so that the layers above ask
//! one place and never test "is this repository encrypted" themselves.

use crate::crypto::{Keys, Kind};
use crate::error::{Error, Result};
use crate::hash::{ChunkId, HashAlgorithm};
use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;

/// A repository's sealing rule: plain, or encrypted under its keys.
#[derive(Debug, Clone)]
pub struct Sealer {
    keys: Option<Arc<Keys>>,
    hash: HashAlgorithm,
}

impl Sealer {
    /// No encryption: objects are stored as they are, blob ids are `hash` of the content.
    pub fn plain(hash: HashAlgorithm) -> Sealer {
        Sealer { keys: None, hash }
    }

    /// Encryption under `keys`: every object is a sealed record, blob ids are keyed BLAKE3.
    pub fn encrypted(keys: Arc<Keys>) -> Sealer {
        Sealer {
            keys: Some(keys),
            hash: HashAlgorithm::Blake3,
        }
    }

    pub fn is_encrypted(&self) -> bool {
        self.keys.is_some()
    }

    pub fn keys(&self) -> Option<&Arc<Keys>> {
        self.keys.as_ref()
    }

    /// Bytes a sealed object has beyond its plaintext (0 when plain).
    pub fn overhead(&self) -> usize {
        if self.keys.is_some() {
            crate::crypto::SEAL_OVERHEAD
        } else {
            0
        }
    }

    /// The stored form of `plain`: itself, or a sealed record of `kind` named `name`.
    pub fn seal<'a>(&self, kind: Kind, name: &[u8], plain: &'a [u8]) -> Result<Cow<'a, [u8]>> {
        match &self.keys {
            None => Ok(Cow::Borrowed(plain)),
            Some(k) => k
                .seal(kind, name, plain)
                .map(Cow::Owned)
                .map_err(|e| Error::internal("encryption", format!("no random numbers: {e}"))),
        }
    }

    /// Appends the stored form of `plain` to `out`.
    pub fn seal_into(
        &self,
        kind: Kind,
        name: &[u8],
        plain: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<()> {
        match &self.keys {
            None => {
                out.extend_from_slice(plain);
                Ok(())
            }
            Some(k) => k
                .seal_into(kind, name, plain, out)
                .map_err(|e| Error::internal("encryption", format!("no random numbers: {e}"))),
        }
    }

    /// Starts a stored object at the end of `out`: reserves room for a sealed record's salt
    /// (nothing when plain). Append the plaintext, then call [`Sealer::finish_seal`] with the
    /// returned start: the plaintext is sealed where it lies, without a copy.
    pub fn begin_seal(&self, out: &mut Vec<u8>) -> usize {
        let start = out.len();
        if self.keys.is_some() {
            out.resize(start + crate::crypto::SALT_LEN, 0);
        }
        start
    }

    /// Seals `out[start..]` in place ([`Sealer::begin_seal`]): `out[start..]` becomes the
    /// stored form of the plaintext appended after the reserved salt.
    pub fn finish_seal(
        &self,
        kind: Kind,
        name: &[u8],
        out: &mut Vec<u8>,
        start: usize,
    ) -> Result<()> {
        match &self.keys {
            None => Ok(()),
            Some(k) => k
                .seal_in_place(kind, name, out, start)
                .map_err(|e| Error::internal("encryption", format!("no random numbers: {e}"))),
        }
    }

    /// Opens `stored` in place: returns where its plaintext lies in it (all of it when
    /// plain). Authentication failures are [`Error::Corrupt`] naming `what` and `path`.
    pub fn open_in_place(
        &self,
        kind: Kind,
        name: &[u8],
        stored: &mut [u8],
        what: &str,
        path: &Path,
    ) -> Result<std::ops::Range<usize>> {
        match &self.keys {
            None => Ok(0..stored.len()),
            Some(k) => k
                .open_in_place(kind, name, stored)
                .map_err(|e| Error::corrupt(what, path, e.to_string())),
        }
    }

    /// The plaintext of `stored`, authenticated. A record that does not authenticate is
    /// [`Error::Corrupt`] naming `what` (e.g. "snapshot 1a2b…") and `path`.
    pub fn open<'a>(
        &self,
        kind: Kind,
        name: &[u8],
        stored: &'a [u8],
        what: &str,
        path: &Path,
    ) -> Result<Cow<'a, [u8]>> {
        match &self.keys {
            None => Ok(Cow::Borrowed(stored)),
            Some(k) => k
                .open(kind, name, stored)
                .map(Cow::Owned)
                .map_err(|e| Error::corrupt(what, path, e.to_string())),
        }
    }

    /// The id of a blob with this content.
    pub fn blob_id(&self, content: &[u8]) -> ChunkId {
        match &self.keys {
            None => self.hash.hash(content),
            Some(k) => k.blob_id(content),
        }
    }

    /// The file stem of the resume journal and lock of volume `key`: the key itself when
    /// plain; in an encrypted repository a keyed hash of it (32 hex digits), so that a file
    /// name does not confirm which volume (filesystem UUID, path) an unfinished backup is of.
    pub fn journal_stem(&self, key: &str) -> String {
        match &self.keys {
            None => key.to_string(),
            Some(k) => {
                let mut input = b"volback journal name\0".to_vec();
                input.extend_from_slice(key.as_bytes());
                hex::encode(&k.blob_id(&input).0[..16])
            }
        }
    }

    /// The seed of the XXH3 that cuts blobs (0, XXH3's default, when plain).
    pub fn chunker_seed(&self) -> u64 {
        self.keys.as_ref().map_or(0, |k| k.chunker_seed())
    }
}

/// Test support: repositories whose objects are sealed before `init`/`open` know about
/// format 3 (H1's config v3), and sealers to build them with.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use crate::crypto::MasterKey;

    /// A sealer for repository `repo_id` under a fixed master key.
    pub fn encrypted(repo_id: &str) -> Sealer {
        Sealer::encrypted(Arc::new(Keys::derive(
            &MasterKey::from_bytes([0x5e; 32]),
            repo_id,
        )))
    }

    impl crate::repo::Repository {
        /// Replaces how this repository stores objects (before its blob store is opened).
        pub(crate) fn set_sealer_for_tests(&mut self, sealer: Sealer) {
            self.sealer = sealer;
        }

        /// This repository, its objects sealed under [`encrypted`] of its id.
        pub(crate) fn encrypted_for_tests(mut self) -> crate::repo::Repository {
            let s = encrypted(&self.config().id);
            self.set_sealer_for_tests(s);
            self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_sealing_changes_nothing_and_encrypted_sealing_round_trips() {
        let plain = Sealer::plain(HashAlgorithm::Blake3);
        let mut out = b"head".to_vec();
        let start = plain.begin_seal(&mut out);
        out.extend_from_slice(b"body");
        plain
            .finish_seal(Kind::Frame, b"", &mut out, start)
            .unwrap();
        assert_eq!((start, &out[..]), (4, &b"headbody"[..]));
        let mut stored = b"body".to_vec();
        let r = plain
            .open_in_place(Kind::Frame, b"", &mut stored, "x", Path::new("x"))
            .unwrap();
        assert_eq!(&stored[r], b"body");
        assert_eq!(plain.blob_id(b"abc"), HashAlgorithm::Blake3.hash(b"abc"));
        assert_eq!((plain.chunker_seed(), plain.overhead()), (0, 0));

        let sealed = testing::encrypted("r");
        let mut out = b"head".to_vec();
        let start = sealed.begin_seal(&mut out);
        out.extend_from_slice(b"body");
        sealed
            .finish_seal(Kind::Index, b"n", &mut out, start)
            .unwrap();
        assert_eq!(out.len(), 4 + 4 + sealed.overhead());
        let mut stored = out[4..].to_vec();
        let e = sealed
            .open_in_place(
                Kind::Index,
                b"m",
                &mut stored.clone(),
                "index file x",
                Path::new("p"),
            )
            .unwrap_err();
        assert!(matches!(e, Error::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains("index file x"), "{e}");
        let r = sealed
            .open_in_place(Kind::Index, b"n", &mut stored, "x", Path::new("p"))
            .unwrap();
        assert_eq!(&stored[r], b"body");
        assert_ne!(sealed.blob_id(b"abc"), plain.blob_id(b"abc"));
        assert_ne!(sealed.chunker_seed(), 0);
    }
}
