//! Encryption of repository objects (repository format 3; docs/FORMAT.md §F3, docs/SECURITY.md).
//!
//! One random 256-bit **master key** per repository, stored only wrapped in key slots
//! ([`keyslot`]). Everything else is derived from it with BLAKE3's key derivation mode:
//!
//! | derived key   | context string                         | used for                        |
//! |---------------|----------------------------------------|---------------------------------|
//! | data key      | `volback 2026-12 data key`             | sealing every object ([`Keys::seal`]) |
//! | blob-id key   | `volback 2026-12 blob id key`          | blob ids: keyed BLAKE3 of content |
//! | chunker seed  | `volback 2026-12 chunker seed`         | first 8 bytes (LE): seed of the XXH3 that cuts blobs |
//!
//! # A sealed record
//!
//! ```text
//! salt[24] | AES-256-GCM ciphertext (same length as the plaintext) | tag[16]
//! ```
//!
//! Every record gets a fresh random 192-bit salt and its own AES-256 key,
//! `record key = BLAKE3-keyed(data key, salt)`; the GCM nonce is 96 zero bits. Each key
//! encrypts exactly one message, so there is no nonce to count, store or reuse, and no
//! per-key message limit: two records share a key only if two random 192-bit salts collide.
//! A record can be copied byte for byte into another file (prune moves frames between
//! packs) and still opens.
//!
//! The associated data binds what the record is and, where the name is chosen rather than
//! computed from the stored bytes, its name:
//!
//! ```text
//! aad = "volback-v3" | 0x00 | kind name | 0x00 | repository id (ASCII hex) | 0x00 | name
//! ```
//!
//! A record opened as another kind, in another repository or under another name fails
//! authentication, as does any changed bit.

pub mod keyslot;

use crate::hash::ChunkId;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, Tag, UnboundKey};
use zeroize::{Zeroize, Zeroizing};

/// Name of the AEAD in `config` (`encryption.aead`).
pub const AEAD_NAME: &str = "aes-256-gcm";
/// Length of a record's salt.
pub const SALT_LEN: usize = 24;
/// Length of a record's authentication tag.
pub const TAG_LEN: usize = 16;
/// Bytes a sealed record adds to its plaintext.
pub const SEAL_OVERHEAD: usize = SALT_LEN + TAG_LEN;

const DATA_KEY_CONTEXT: &str = "volback 2026-12 data key";
const ID_KEY_CONTEXT: &str = "volback 2026-12 blob id key";
const CHUNKER_SEED_CONTEXT: &str = "volback 2026-12 chunker seed";

/// What a sealed record is; its name goes into the associated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A frame of a pack (compressed blobs).
    Frame,
    /// The blob table at the end of a pack.
    PackTable,
    /// An index file.
    Index,
    /// A snapshot file.
    Snapshot,
    /// The header of a resume journal (name: the journal's volume key).
    JournalHeader,
    /// One batch record of a resume journal (name: volume key and record number).
    JournalRecord,
    /// A pending record of a prune (name: the record's id).
    Pending,
    /// A writer marker (name: the marker's id).
    Writer,
    /// The sealed copy of the repository's config.
    Config,
}

impl Kind {
    /// The name bound into the associated data.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Frame => "frame",
            Kind::PackTable => "pack-table",
            Kind::Index => "index",
            Kind::Snapshot => "snapshot",
            Kind::JournalHeader => "journal-header",
            Kind::JournalRecord => "journal-record",
            Kind::Pending => "pending",
            Kind::Writer => "writer",
            Kind::Config => "config",
        }
    }
}

/// A sealed record did not authenticate: it was changed, damaged, truncated, or it is not
/// the object it was opened as. Callers turn it into an error naming the object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("authentication failed: the data was changed or damaged, or it is not this object")]
pub struct AuthError;

/// Random bytes from the operating system; failure is an error, never a weaker fallback.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], getrandom::Error> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b)?;
    Ok(b)
}

/// The repository's master key (256 random bits). Zeroed when dropped.
pub struct MasterKey(Zeroizing<[u8; 32]>);

impl MasterKey {
    /// A new random master key.
    pub fn generate() -> Result<MasterKey, getrandom::Error> {
        Ok(MasterKey(Zeroizing::new(random_bytes::<32>()?)))
    }

    pub fn from_bytes(bytes: [u8; 32]) -> MasterKey {
        MasterKey(Zeroizing::new(bytes))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

/// The keys of an open encrypted repository, derived from its master key.
pub struct Keys {
    data: [u8; 32],
    id: [u8; 32],
    chunker_seed: u64,
    repo_id: String,
}

impl Drop for Keys {
    fn drop(&mut self) {
        self.data.zeroize();
        self.id.zeroize();
        self.chunker_seed.zeroize();
    }
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keys(repository {})", self.repo_id)
    }
}

impl Keys {
    /// Derives the keys of repository `repo_id` (the `id` of its config) from its master key.
    pub fn derive(master: &MasterKey, repo_id: &str) -> Keys {
        let seed = blake3::derive_key(CHUNKER_SEED_CONTEXT, master.as_bytes());
        let mut s = [0u8; 8];
        s.copy_from_slice(&seed[..8]);
        Keys {
            data: blake3::derive_key(DATA_KEY_CONTEXT, master.as_bytes()),
            id: blake3::derive_key(ID_KEY_CONTEXT, master.as_bytes()),
            chunker_seed: u64::from_le_bytes(s),
            repo_id: repo_id.to_string(),
        }
    }

    /// The id of a blob with this content: BLAKE3 keyed with the blob-id key.
    pub fn blob_id(&self, content: &[u8]) -> ChunkId {
        ChunkId(*blake3::keyed_hash(&self.id, content).as_bytes())
    }

    /// The seed of the XXH3 that decides where blobs are cut.
    pub fn chunker_seed(&self) -> u64 {
        self.chunker_seed
    }

    fn aad(&self, kind: Kind, name: &[u8]) -> Vec<u8> {
        let mut aad = Vec::with_capacity(16 + kind.name().len() + self.repo_id.len() + name.len());
        aad.extend_from_slice(b"volback-v3\0");
        aad.extend_from_slice(kind.name().as_bytes());
        aad.push(0);
        aad.extend_from_slice(self.repo_id.as_bytes());
        aad.push(0);
        aad.extend_from_slice(name);
        aad
    }

    /// The AES-256-GCM key of the record with this salt: `BLAKE3-keyed(data key, salt)`.
    /// (ring's implementation: AES-NI/VAES and carry-less multiplication, several times the
    /// throughput of the portable crates here; docs/BENCHMARKS.md.)
    /// (`None` only if the library refused a 32-byte key, which AES-256 takes.)
    fn cipher(&self, salt: &[u8]) -> Option<LessSafeKey> {
        let mut key = *blake3::keyed_hash(&self.data, salt).as_bytes();
        let cipher = UnboundKey::new(&AES_256_GCM, &key)
            .map(LessSafeKey::new)
            .ok();
        key.zeroize();
        cipher
    }

    /// The nonce of every record: 96 zero bits (each record key seals exactly one message).
    fn nonce() -> Nonce {
        Nonce::assume_unique_for_key([0u8; 12])
    }

    /// Seals `plaintext` as a record of `kind` named `name` (empty where the name is a hash
    /// of the stored bytes). Fails only when the system has no random numbers.
    pub fn seal(
        &self,
        kind: Kind,
        name: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, getrandom::Error> {
        let mut out = Vec::with_capacity(plaintext.len() + SEAL_OVERHEAD);
        self.seal_into(kind, name, plaintext, &mut out)?;
        Ok(out)
    }

    /// Like [`Keys::seal`], appending the record to `out`.
    pub fn seal_into(
        &self,
        kind: Kind,
        name: &[u8],
        plaintext: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), getrandom::Error> {
        let salt = random_bytes::<SALT_LEN>()?;
        let cipher = self.cipher(&salt).ok_or(getrandom::Error::UNSUPPORTED)?;
        out.reserve(plaintext.len() + SEAL_OVERHEAD);
        out.extend_from_slice(&salt);
        let start = out.len();
        out.extend_from_slice(plaintext);
        let tag = cipher
            .seal_in_place_separate_tag(
                Self::nonce(),
                Aad::from(self.aad(kind, name)),
                &mut out[start..],
            )
            .map_err(|_| getrandom::Error::UNSUPPORTED)?;
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Opens a record sealed by [`Keys::seal`] with the same kind and name.
    pub fn open(&self, kind: Kind, name: &[u8], sealed: &[u8]) -> Result<Vec<u8>, AuthError> {
        if sealed.len() < SEAL_OVERHEAD {
            return Err(AuthError);
        }
        let (salt, rest) = sealed.split_at(SALT_LEN);
        let (ct, tag) = rest.split_at(rest.len() - TAG_LEN);
        let mut out = ct.to_vec();
        let tag = Tag::try_from(tag).map_err(|_| AuthError)?;
        self.cipher(salt)
            .ok_or(AuthError)?
            .open_in_place_separate_tag(
                Self::nonce(),
                Aad::from(self.aad(kind, name)),
                tag,
                &mut out,
                0..,
            )
            .map_err(|_| AuthError)?;
        Ok(out)
    }
}

impl Keys {
    /// Seals in place the plaintext `buf[start + SALT_LEN..]`, where the caller reserved
    /// `buf[start..start + SALT_LEN]` (any bytes) for the salt, and appends the tag: the
    /// record is then `buf[start..]`, exactly as [`Keys::seal_into`] would have appended it,
    /// without copying the plaintext. Fails only when the system has no random numbers
    /// (or `buf` is shorter than the reserved salt).
    pub fn seal_in_place(
        &self,
        kind: Kind,
        name: &[u8],
        buf: &mut Vec<u8>,
        start: usize,
    ) -> Result<(), getrandom::Error> {
        let body = start
            .checked_add(SALT_LEN)
            .filter(|&b| b <= buf.len())
            .ok_or(getrandom::Error::UNSUPPORTED)?;
        let salt = random_bytes::<SALT_LEN>()?;
        buf[start..body].copy_from_slice(&salt);
        let cipher = self.cipher(&salt).ok_or(getrandom::Error::UNSUPPORTED)?;
        let tag = cipher
            .seal_in_place_separate_tag(
                Self::nonce(),
                Aad::from(self.aad(kind, name)),
                &mut buf[body..],
            )
            .map_err(|_| getrandom::Error::UNSUPPORTED)?;
        buf.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Opens in place a record sealed with `kind` and `name`: on success the plaintext is
    /// `sealed[SALT_LEN..sealed.len() - TAG_LEN]` (the returned range); on failure the
    /// buffer's content is unspecified.
    pub fn open_in_place(
        &self,
        kind: Kind,
        name: &[u8],
        sealed: &mut [u8],
    ) -> Result<std::ops::Range<usize>, AuthError> {
        if sealed.len() < SEAL_OVERHEAD {
            return Err(AuthError);
        }
        let end = sealed.len() - TAG_LEN;
        let (head, tag) = sealed.split_at_mut(end);
        let tag = Tag::try_from(&*tag).map_err(|_| AuthError)?;
        let (salt, ct) = head.split_at_mut(SALT_LEN);
        self.cipher(salt)
            .ok_or(AuthError)?
            .open_in_place_separate_tag(
                Self::nonce(),
                Aad::from(self.aad(kind, name)),
                tag,
                ct,
                0..,
            )
            .map_err(|_| AuthError)?;
        Ok(SALT_LEN..end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Keys {
        Keys::derive(&MasterKey::from_bytes([7; 32]), "0123abcd")
    }

    #[test]
    fn seal_open_round_trip_and_overhead() {
        let k = keys();
        for len in [0usize, 1, 15, 16, 17, 4096, 1 << 20] {
            let pt: Vec<u8> = (0..len).map(|i| (i * 31) as u8).collect();
            let s = k.seal(Kind::Frame, b"", &pt).unwrap();
            assert_eq!(s.len(), len + SEAL_OVERHEAD);
            assert_eq!(k.open(Kind::Frame, b"", &s).unwrap(), pt);
        }
    }

    #[test]
    fn every_changed_bit_kind_name_or_repository_fails() {
        let k = keys();
        let s = k.seal(Kind::Snapshot, b"n", b"hello world").unwrap();
        for i in 0..s.len() * 8 {
            let mut t = s.clone();
            t[i / 8] ^= 1 << (i % 8);
            assert_eq!(k.open(Kind::Snapshot, b"n", &t), Err(AuthError), "bit {i}");
        }
        assert_eq!(k.open(Kind::Index, b"n", &s), Err(AuthError));
        assert_eq!(k.open(Kind::Snapshot, b"m", &s), Err(AuthError));
        let other = Keys::derive(&MasterKey::from_bytes([7; 32]), "ffff");
        assert_eq!(other.open(Kind::Snapshot, b"n", &s), Err(AuthError));
        for n in 0..SEAL_OVERHEAD {
            assert_eq!(k.open(Kind::Snapshot, b"n", &s[..n]), Err(AuthError));
        }
        assert_eq!(
            k.open(Kind::Snapshot, b"n", &s[..s.len() - 1]),
            Err(AuthError)
        );
    }

    #[test]
    fn in_place_sealing_and_opening_match_the_copying_ones() {
        let k = keys();
        for len in [0usize, 1, 17, 70_000] {
            let pt: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let mut buf = b"prefix".to_vec();
            buf.extend_from_slice(&[0; SALT_LEN]);
            buf.extend_from_slice(&pt);
            k.seal_in_place(Kind::Frame, b"n", &mut buf, 6).unwrap();
            assert_eq!(&buf[..6], b"prefix");
            assert_eq!(buf.len(), 6 + len + SEAL_OVERHEAD);
            assert_eq!(k.open(Kind::Frame, b"n", &buf[6..]).unwrap(), pt);
            let mut rec = buf[6..].to_vec();
            let r = k.open_in_place(Kind::Frame, b"n", &mut rec).unwrap();
            assert_eq!(&rec[r], &pt[..]);
            let mut rec = buf[6..].to_vec();
            assert_eq!(k.open_in_place(Kind::Frame, b"m", &mut rec), Err(AuthError));
        }
        let mut short = vec![0u8; 3];
        assert!(k.seal_in_place(Kind::Frame, b"", &mut short, 0).is_err());
        for n in 0..SEAL_OVERHEAD {
            assert_eq!(
                k.open_in_place(Kind::Frame, b"", &mut vec![0u8; n]),
                Err(AuthError)
            );
        }
    }

    #[test]
    fn records_of_equal_content_differ_and_ids_are_keyed() {
        let k = keys();
        let a = k.seal(Kind::Frame, b"", b"same").unwrap();
        let b = k.seal(Kind::Frame, b"", b"same").unwrap();
        assert_ne!(a, b);
        assert_ne!(k.blob_id(b"x").0, *blake3::hash(b"x").as_bytes());
        assert_eq!(k.blob_id(b"x"), keys().blob_id(b"x"));
        let other = Keys::derive(&MasterKey::from_bytes([8; 32]), "0123abcd");
        assert_ne!(k.blob_id(b"x"), other.blob_id(b"x"));
        assert_ne!(k.chunker_seed(), other.chunker_seed());
    }
}
