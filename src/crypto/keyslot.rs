//! Key slots: the master key wrapped under a key derived from a password with Argon2id
//! (docs/FORMAT.md §F3.2). A slot is a small JSON document, stored as `keys/<slot id>`.
//!
//! ```json
//! { "version": 1, "kdf": "argon2id", "memory_kib": 65536, "iterations": 3,
//!   "parallelism": 1, "salt": "<hex, 32 bytes>", "aead": "aes-256-gcm",
//!   "wrapped": "<hex: nonce[12] | ciphertext of the master key[32] | tag[16]>",
//!   "created": "<RFC 3339 UTC>" }
//! ```
//!
//! The wrapping key is `Argon2id(password, salt, memory_kib, iterations, parallelism)`, 32
//! bytes, Argon2 version 0x13. The associated data is
//! `"volback-v3" 0 "keyslot" 0 <repository id> 0 <slot id>`. Parameters are checked against
//! [`LIMITS`] before any work, so a hostile slot cannot make an open allocate or spin.

use super::{AuthError, MasterKey, random_bytes};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, Tag, UnboundKey};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

/// Version of the slot document this volback reads and writes.
pub const SLOT_VERSION: u32 = 1;

/// Argon2id cost parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfParams {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl Default for KdfParams {
    /// 64 MiB, 3 passes, 4 lanes (RFC 9106's second recommended setting): the lanes run on
    /// all cores, about 0.07 s on two cores here (docs/SECURITY.md).
    fn default() -> Self {
        KdfParams {
            memory_kib: 64 * 1024,
            iterations: 3,
            parallelism: 4,
        }
    }
}

/// Bounds on what a slot may ask for. Outside them a slot is refused before any work.
pub struct Limits {
    pub memory_kib: std::ops::RangeInclusive<u32>,
    pub iterations: std::ops::RangeInclusive<u32>,
    pub parallelism: std::ops::RangeInclusive<u32>,
    pub salt_len: std::ops::RangeInclusive<usize>,
}

/// 8 KiB … 4 GiB of memory, 1 … 64 passes, 1 … 16 lanes, salts of 16 … 64 bytes.
pub const LIMITS: Limits = Limits {
    memory_kib: 8..=4 * 1024 * 1024,
    iterations: 1..=64,
    parallelism: 1..=16,
    salt_len: 16..=64,
};

impl KdfParams {
    /// Refuses parameters outside [`LIMITS`] (and memory below Argon2's 8 KiB per lane).
    pub fn check(&self) -> Result<(), String> {
        let l = &LIMITS;
        if !l.iterations.contains(&self.iterations) {
            return Err(format!(
                "Argon2 iterations {} outside {}..={}",
                self.iterations,
                l.iterations.start(),
                l.iterations.end()
            ));
        }
        if !l.parallelism.contains(&self.parallelism) {
            return Err(format!(
                "Argon2 parallelism {} outside {}..={}",
                self.parallelism,
                l.parallelism.start(),
                l.parallelism.end()
            ));
        }
        if !l.memory_kib.contains(&self.memory_kib) || self.memory_kib < 8 * self.parallelism {
            return Err(format!(
                "Argon2 memory {} KiB outside {}..={} KiB (and at least 8 KiB per lane)",
                self.memory_kib,
                l.memory_kib.start(),
                l.memory_kib.end()
            ));
        }
        Ok(())
    }
}

/// Why a slot did not give the master key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotError {
    /// The document is not a slot this volback reads (syntax, version, lengths, limits).
    #[error("{0}")]
    Invalid(String),
    /// The password does not open this slot (or the slot was changed).
    #[error("the password does not open it")]
    WrongPassword,
    /// No random numbers from the operating system.
    #[error("no random numbers from the operating system: {0}")]
    Random(String),
}

/// A key slot document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeySlot {
    pub version: u32,
    pub kdf: String,
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
    pub salt: String,
    pub aead: String,
    pub wrapped: String,
    pub created: String,
}

fn aad(repo_id: &str, slot_id: &str) -> Vec<u8> {
    let mut a = b"volback-v3\0keyslot\0".to_vec();
    a.extend_from_slice(repo_id.as_bytes());
    a.push(0);
    a.extend_from_slice(slot_id.as_bytes());
    a
}

/// Argon2's working memory. Zeroed pages that the system maps on first touch, so the lanes'
/// threads fault them in where they work rather than one thread writing all of them first,
/// and huge pages where the system offers them: about a third of a derivation's time here was
/// page faults of its 64 MiB.
struct KdfMemory {
    buf: crate::buffer::AlignedBuf,
    blocks: usize,
}

impl KdfMemory {
    fn new(blocks: usize) -> KdfMemory {
        let mut buf = crate::buffer::AlignedBuf::new(blocks * argon2::Block::SIZE);
        crate::platform::advise_huge_pages(&mut buf);
        KdfMemory { buf, blocks }
    }

    fn blocks(&mut self) -> &mut [argon2::Block] {
        const _: () =
            assert!(crate::buffer::ALIGN.is_multiple_of(std::mem::align_of::<argon2::Block>()));
        // SAFETY: the buffer is aligned to ALIGN, a multiple of Block's alignment (checked
        // above), holds at least `blocks * Block::SIZE` initialised (zero) bytes, and is
        // borrowed mutably for the slice's lifetime; a Block is plain `u64`s, for which every
        // bit pattern, zero included, is a valid value.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.buf.as_mut_ptr().cast::<argon2::Block>(),
                self.blocks,
            )
        }
    }
}

/// The AES-256-GCM key that wraps the master key in a slot.
fn wrapping_cipher(key: &[u8; 32]) -> Result<LessSafeKey, ring::error::Unspecified> {
    UnboundKey::new(&AES_256_GCM, key).map(LessSafeKey::new)
}

fn derive(password: &[u8], salt: &[u8], p: &KdfParams) -> Result<Zeroizing<[u8; 32]>, SlotError> {
    p.check().map_err(SlotError::Invalid)?;
    let params = argon2::Params::new(p.memory_kib, p.iterations, p.parallelism, Some(32))
        .map_err(|e| SlotError::Invalid(format!("Argon2 parameters: {e}")))?;
    let mut memory = KdfMemory::new(params.block_count());
    let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = Zeroizing::new([0u8; 32]);
    a.hash_password_into_with_memory(password, salt, &mut out[..], memory.blocks())
        .map_err(|e| SlotError::Invalid(format!("Argon2: {e}")))?;
    Ok(out)
}

impl KeySlot {
    /// Wraps `master` under `password` for slot `slot_id` of repository `repo_id`.
    pub fn wrap(
        master: &MasterKey,
        password: &[u8],
        params: KdfParams,
        repo_id: &str,
        slot_id: &str,
        created: String,
    ) -> Result<KeySlot, SlotError> {
        let rnd = |e: getrandom::Error| SlotError::Random(e.to_string());
        let salt = random_bytes::<32>().map_err(rnd)?;
        let nonce = random_bytes::<12>().map_err(rnd)?;
        let key = derive(password, &salt, &params)?;
        let failed = |_| SlotError::Invalid("cannot encrypt the master key".into());
        let cipher = wrapping_cipher(&key).map_err(failed)?;
        let mut buf = Zeroizing::new(*master.as_bytes());
        let tag = cipher
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(repo_id, slot_id)),
                &mut buf[..],
            )
            .map_err(failed)?;
        let mut wrapped = nonce.to_vec();
        wrapped.extend_from_slice(&buf[..]);
        wrapped.extend_from_slice(tag.as_ref());
        Ok(KeySlot {
            version: SLOT_VERSION,
            kdf: "argon2id".into(),
            memory_kib: params.memory_kib,
            iterations: params.iterations,
            parallelism: params.parallelism,
            salt: hex::encode(salt),
            aead: super::AEAD_NAME.into(),
            wrapped: hex::encode(wrapped),
            created,
        })
    }

    /// The slot's parameters, checked.
    pub fn params(&self) -> Result<KdfParams, SlotError> {
        let p = KdfParams {
            memory_kib: self.memory_kib,
            iterations: self.iterations,
            parallelism: self.parallelism,
        };
        p.check().map_err(SlotError::Invalid)?;
        Ok(p)
    }

    /// Parses a slot document, checking everything that can be checked without the password.
    pub fn parse(bytes: &[u8]) -> Result<KeySlot, SlotError> {
        let slot: KeySlot = serde_json::from_slice(bytes)
            .map_err(|e| SlotError::Invalid(format!("not a key slot document: {e}")))?;
        if slot.version != SLOT_VERSION {
            return Err(SlotError::Invalid(format!(
                "key slot version {} (this volback reads {SLOT_VERSION})",
                slot.version
            )));
        }
        if slot.kdf != "argon2id" || slot.aead != super::AEAD_NAME {
            return Err(SlotError::Invalid(format!(
                "key slot uses {} and {} (this volback knows argon2id and {})",
                slot.kdf,
                slot.aead,
                super::AEAD_NAME
            )));
        }
        slot.params()?;
        let salt_len = slot.salt.len() / 2;
        if !slot.salt.len().is_multiple_of(2) || !LIMITS.salt_len.contains(&salt_len) {
            return Err(SlotError::Invalid(format!(
                "key slot salt of {} hex digits",
                slot.salt.len()
            )));
        }
        if slot.wrapped.len() != 2 * (12 + 32 + 16) {
            return Err(SlotError::Invalid(format!(
                "wrapped key of {} hex digits (expected {})",
                slot.wrapped.len(),
                2 * (12 + 32 + 16)
            )));
        }
        hex::decode(&slot.salt)
            .and_then(|_| hex::decode(&slot.wrapped))
            .map_err(|e| SlotError::Invalid(format!("key slot is not hex: {e}")))?;
        Ok(slot)
    }

    /// The master key, if `password` opens this slot.
    pub fn unwrap_key(
        &self,
        password: &[u8],
        repo_id: &str,
        slot_id: &str,
    ) -> Result<MasterKey, SlotError> {
        let params = self.params()?;
        let bad = |e: hex::FromHexError| SlotError::Invalid(format!("key slot is not hex: {e}"));
        let salt = hex::decode(&self.salt).map_err(bad)?;
        if !LIMITS.salt_len.contains(&salt.len()) {
            return Err(SlotError::Invalid(format!(
                "key slot salt of {} bytes",
                salt.len()
            )));
        }
        let wrapped = hex::decode(&self.wrapped).map_err(bad)?;
        if wrapped.len() != 12 + 32 + 16 {
            return Err(SlotError::Invalid(format!(
                "wrapped key of {} bytes",
                wrapped.len()
            )));
        }
        let key = derive(password, &salt, &params)?;
        let cipher = wrapping_cipher(&key).map_err(|_| SlotError::WrongPassword)?;
        let nonce: [u8; 12] = wrapped[..12]
            .try_into()
            .map_err(|_| SlotError::WrongPassword)?;
        let tag = Tag::try_from(&wrapped[44..]).map_err(|_| SlotError::WrongPassword)?;
        let mut buf = Zeroizing::new([0u8; 32]);
        buf.copy_from_slice(&wrapped[12..44]);
        cipher
            .open_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(repo_id, slot_id)),
                tag,
                &mut buf[..],
                0..,
            )
            .map_err(|_| SlotError::WrongPassword)?;
        let master = MasterKey::from_bytes(*buf);
        buf.zeroize();
        Ok(master)
    }
}

impl From<AuthError> for SlotError {
    fn from(_: AuthError) -> Self {
        SlotError::WrongPassword
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHEAP: KdfParams = KdfParams {
        memory_kib: 64,
        iterations: 1,
        parallelism: 1,
    };

    #[test]
    fn wrap_unwrap_and_wrong_password() {
        let m = MasterKey::from_bytes([3; 32]);
        let s = KeySlot::wrap(&m, b"pw", CHEAP, "repo", "slot", "t".into()).unwrap();
        let parsed = KeySlot::parse(&serde_json::to_vec(&s).unwrap()).unwrap();
        let back = parsed.unwrap_key(b"pw", "repo", "slot").unwrap();
        assert_eq!(back.as_bytes(), m.as_bytes());
        assert_eq!(
            parsed.unwrap_key(b"px", "repo", "slot").err(),
            Some(SlotError::WrongPassword)
        );
        assert_eq!(
            parsed.unwrap_key(b"pw", "repo", "other").err(),
            Some(SlotError::WrongPassword)
        );
        assert_eq!(
            parsed.unwrap_key(b"pw", "other", "slot").err(),
            Some(SlotError::WrongPassword)
        );
    }

    #[test]
    fn hostile_parameters_are_refused_before_work() {
        let m = MasterKey::from_bytes([3; 32]);
        let s = KeySlot::wrap(&m, b"pw", CHEAP, "repo", "slot", "t".into()).unwrap();
        for (mem, it, par) in [
            (u32::MAX, 1, 1),
            (4 * 1024 * 1024 + 1, 1, 1),
            (64, 0, 1),
            (64, 1_000_000, 1),
            (64, 1, 0),
            (64, 1, 17),
            (7, 1, 1),
            (64, 1, 16),
        ] {
            let mut h = s.clone();
            h.memory_kib = mem;
            h.iterations = it;
            h.parallelism = par;
            let bytes = serde_json::to_vec(&h).unwrap();
            assert!(
                matches!(KeySlot::parse(&bytes), Err(SlotError::Invalid(_))),
                "{mem} {it} {par}"
            );
            assert!(matches!(
                h.unwrap_key(b"pw", "repo", "slot"),
                Err(SlotError::Invalid(_))
            ));
        }
    }

    #[test]
    fn damaged_documents_are_invalid_not_panics() {
        let m = MasterKey::from_bytes([3; 32]);
        let s = KeySlot::wrap(&m, b"pw", CHEAP, "repo", "slot", "t".into()).unwrap();
        let bytes = serde_json::to_vec(&s).unwrap();
        for n in 0..bytes.len() {
            assert!(KeySlot::parse(&bytes[..n]).is_err());
        }
        let mut h = s.clone();
        h.wrapped.pop();
        assert!(KeySlot::parse(&serde_json::to_vec(&h).unwrap()).is_err());
        let mut h = s.clone();
        h.salt = "zz".repeat(16);
        assert!(KeySlot::parse(&serde_json::to_vec(&h).unwrap()).is_err());
        let mut h = s;
        h.version = 2;
        assert!(KeySlot::parse(&serde_json::to_vec(&h).unwrap()).is_err());
    }
}
