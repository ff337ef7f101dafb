//! Keys, key wrapping, sealing and keyed block ids.
//!
//! A random 32-byte master key is wrapped by a key derived from the password
//! (Argon2id). Subkeys are derived from the master key with BLAKE3's key
//! derivation: one for metadata objects, one root for data volumes (each volume
//! gets its own subkey from its random id, so a nonce collision across the
//! whole box is impossible in practice), and one for keyed block ids.

use rand::RngCore;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Length of a nonce in a sealed payload.
pub const NONCE_LEN: usize = 12;
/// Length of the authentication tag appended by AES-GCM.
pub const TAG_LEN: usize = 16;
/// Bytes a sealed payload adds to its plaintext.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + TAG_LEN;

/// A 32-byte keyed BLAKE3 hash identifying a block by its plaintext content.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub [u8; 32]);

impl BlockId {
    /// Lower-case hex of all 32 bytes.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut a = [0u8; 32];
        hex::decode_to_slice(s, &mut a).ok()?;
        Some(Self(a))
    }
}

impl std::fmt::Debug for BlockId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", &self.to_hex()[..16])
    }
}

/// Fills a fresh array with random bytes from the OS generator.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut a = [0u8; N];
    rand::rngs::OsRng.fill_bytes(&mut a);
    a
}

/// An AES-256-GCM key, ready to seal and open payloads.
///
/// Backed by `ring`, whose AES-GCM uses AES-NI and carry-less multiplication (with the
/// AVX2/VAES code paths where the CPU has them), several times faster than a portable
/// implementation; the bytes it produces are standard AES-256-GCM.
#[derive(Clone)]
pub struct Cipher(LessSafeKey);

impl Cipher {
    /// A cipher for a 256-bit key.
    pub fn new(key: &[u8; 32]) -> Self {
        Self(LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("AES-256 takes a 32-byte key")))
    }
}

/// The unwrapped keys of a repository.
#[derive(Clone)]
pub struct Keys {
    master: [u8; 32],
    meta: Cipher,
    data_root: [u8; 32],
    id_key: [u8; 32],
}

impl Keys {
    /// Derives all subkeys from a master key.
    pub fn from_master(master: [u8; 32]) -> Self {
        let meta = blake3::derive_key("brickbox v1 metadata object key", &master);
        Self {
            master,
            meta: Cipher::new(&meta),
            data_root: blake3::derive_key("brickbox v1 data volume root key", &master),
            id_key: blake3::derive_key("brickbox v1 block id key", &master),
        }
    }

    /// A new random master key.
    pub fn generate() -> Self {
        Self::from_master(random_bytes())
    }

    /// The keyed id of a block's plaintext.
    pub fn block_id(&self, data: &[u8]) -> BlockId {
        BlockId(*blake3::keyed_hash(&self.id_key, data).as_bytes())
    }

    /// The cipher for sealing blocks of the volume with this random id.
    pub fn volume_cipher(&self, volume_id: &[u8; 16]) -> Cipher {
        let key = blake3::keyed_hash(&self.data_root, volume_id);
        Cipher::new(key.as_bytes())
    }

    /// The cipher for metadata objects (indexes, manifests).
    pub fn meta_cipher(&self) -> &Cipher {
        &self.meta
    }
}

/// Encrypts `plaintext` with a fresh random nonce; output is `nonce || ciphertext || tag`.
pub fn seal(cipher: &Cipher, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(SEAL_OVERHEAD + plaintext.len());
    seal_into(cipher, aad, plaintext, &mut out);
    out
}

/// Like [`seal`], appending `nonce || ciphertext || tag` to `out` (no other allocation).
pub fn seal_into(cipher: &Cipher, aad: &[u8], plaintext: &[u8], out: &mut Vec<u8>) {
    let nonce: [u8; NONCE_LEN] = random_bytes();
    out.reserve(SEAL_OVERHEAD + plaintext.len());
    out.extend_from_slice(&nonce);
    let start = out.len();
    out.extend_from_slice(plaintext);
    let tag = cipher
        .0
        .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut out[start..])
        .expect("AES-GCM encryption of an in-memory buffer cannot fail");
    out.extend_from_slice(tag.as_ref());
}

/// Decrypts and authenticates a payload produced by [`seal`]; `object` names it in errors.
pub fn open(cipher: &Cipher, aad: &[u8], sealed: &[u8], object: &str) -> Result<Vec<u8>> {
    if sealed.len() < SEAL_OVERHEAD {
        return Err(too_short(object));
    }
    let (nonce, ct) = sealed.split_at(NONCE_LEN);
    let mut buf = ct.to_vec();
    let len = open_parts(cipher, nonce, aad, &mut buf, object)?;
    buf.truncate(len);
    Ok(buf)
}

/// Decrypts and authenticates `sealed` where it lies, returning the plaintext (a part of
/// `sealed`, which is overwritten); `object` names it in errors.
pub fn open_in_place<'a>(cipher: &Cipher, aad: &[u8], sealed: &'a mut [u8], object: &str) -> Result<&'a mut [u8]> {
    if sealed.len() < SEAL_OVERHEAD {
        return Err(too_short(object));
    }
    let (nonce, ct) = sealed.split_at_mut(NONCE_LEN);
    let len = open_parts(cipher, nonce, aad, ct, object)?;
    Ok(&mut ct[..len])
}

fn too_short(object: &str) -> Error {
    Error::damaged(object, "too short to be a sealed payload")
}

/// Opens `ciphertext || tag` in place; returns the plaintext length.
fn open_parts(cipher: &Cipher, nonce: &[u8], aad: &[u8], ct_and_tag: &mut [u8], object: &str) -> Result<usize> {
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| too_short(object))?;
    cipher
        .0
        .open_in_place(nonce, Aad::from(aad), ct_and_tag)
        .map(|plain| plain.len())
        .map_err(|_| Error::damaged(object, "authentication failed (corrupted or tampered)"))
}

/// Argon2id parameters stored in a key file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct KdfParams {
    /// Always "argon2id" in format version 1.
    pub algorithm: String,
    /// Memory cost in KiB.
    pub memory_kib: u32,
    /// Number of passes.
    pub iterations: u32,
    /// Degree of parallelism.
    pub parallelism: u32,
    /// Random salt, hex.
    pub salt: String,
}

impl KdfParams {
    /// Default parameters with a fresh salt.
    pub fn new_default() -> Self {
        Self {
            algorithm: "argon2id".into(),
            memory_kib: 32 * 1024,
            iterations: 2,
            parallelism: 1,
            salt: hex::encode(random_bytes::<16>()),
        }
    }

    /// Checks the parameters and the salt without running the key derivation. Every key file
    /// is checked like this before its derivation runs, so a damaged or planted key file can
    /// neither exhaust memory nor make opening a box take minutes.
    pub fn validate(&self) -> Result<()> {
        self.checked().map(|_| ())
    }

    /// The Argon2 parameters and the decoded salt, after the checks of [`Self::validate`].
    fn checked(&self) -> Result<(argon2::Params, Vec<u8>)> {
        if self.algorithm != "argon2id" {
            return Err(Error::Format(format!("key file: unknown key derivation '{}'", self.algorithm)));
        }
        let work = u64::from(self.memory_kib) * u64::from(self.iterations);
        if self.memory_kib > MAX_KDF_MEMORY_KIB || work > MAX_KDF_WORK_KIB || self.parallelism > MAX_KDF_PARALLELISM {
            return Err(Error::Format(format!(
                "key file: KDF parameters too large (memory {} KiB, {} passes, parallelism {}; at most {} KiB, \
                 {} KiB x passes, parallelism {})",
                self.memory_kib,
                self.iterations,
                self.parallelism,
                MAX_KDF_MEMORY_KIB,
                MAX_KDF_WORK_KIB,
                MAX_KDF_PARALLELISM
            )));
        }
        let salt = hex::decode(&self.salt).map_err(|_| Error::Format("key file: salt is not hex".into()))?;
        if salt.len() < argon2::MIN_SALT_LEN {
            return Err(Error::Format(format!(
                "key file: salt of {} bytes (must be at least {})",
                salt.len(),
                argon2::MIN_SALT_LEN
            )));
        }
        let params = argon2::Params::new(self.memory_kib, self.iterations, self.parallelism, Some(32))
            .map_err(|e| Error::Format(format!("key file: bad KDF parameters: {e}")))?;
        Ok((params, salt))
    }

    fn derive(&self, password: &[u8]) -> Result<[u8; 32]> {
        let (params, salt) = self.checked()?;
        let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut out = [0u8; 32];
        argon
            .hash_password_into(password, &salt, &mut out)
            .map_err(|e| Error::Format(format!("key file: key derivation failed: {e}")))?;
        Ok(out)
    }
}

/// Largest Argon2 memory cost a key file may ask for, in KiB (1 GiB).
const MAX_KDF_MEMORY_KIB: u32 = 1 << 20;
/// Largest Argon2 work (memory in KiB times passes) a key file may ask for: 32 times the
/// default (32 MiB, 2 passes), e.g. 1 GiB and 2 passes; ~3 s on one core of the 2-core
/// development machine (the default takes ~0.1 s).
const MAX_KDF_WORK_KIB: u64 = 1 << 21;
/// Largest Argon2 parallelism a key file may ask for.
const MAX_KDF_PARALLELISM: u32 = 16;

/// A key file: the master key wrapped by a password-derived key.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyFile {
    /// Format version of the key file (1).
    pub version: u32,
    /// How the wrapping key is derived from the password.
    pub kdf: KdfParams,
    /// `nonce || AES-256-GCM(master key) || tag`, hex; AAD is `brickbox-key-v1`.
    pub wrapped: String,
    /// When the key was created (RFC 3339).
    pub created: String,
    /// The box's `config` object as it was when this key was written, byte for byte: the
    /// config is not sealed, so every key file carries a copy to check it against and to
    /// restore it from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    /// Hex BLAKE3 of the other fields (see [`KeyFile::checksum`]), so that a damaged key file
    /// is told apart from a wrong password. Absent in key files written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<String>,
}

const KEY_AAD: &[u8] = b"brickbox-key-v1";
/// Length of a wrapped master key: nonce, the 32-byte key, tag.
const WRAPPED_LEN: usize = 32 + SEAL_OVERHEAD;

impl KeyFile {
    /// Wraps `keys`' master key under `password`, with a copy of the box's `config` text.
    pub fn wrap(keys: &Keys, password: &[u8], created: String, config: &str) -> Result<Self> {
        let kdf = KdfParams::new_default();
        let kek = kdf.derive(password)?;
        let cipher = Cipher::new(&kek);
        let mut kf = Self {
            version: 1,
            kdf,
            wrapped: hex::encode(seal(&cipher, KEY_AAD, &keys.master)),
            created,
            config: Some(config.to_string()),
            check: None,
        };
        kf.check = Some(kf.checksum());
        Ok(kf)
    }

    /// Hex BLAKE3 of `"brickbox key file check v1\n"` followed by the fields, each ended by a
    /// newline: version, algorithm, memory_kib, iterations, parallelism, salt, wrapped, created;
    /// then, if there is a config copy, its length in bytes and a newline, the copy and a newline.
    pub fn checksum(&self) -> String {
        let mut text = format!(
            "brickbox key file check v1\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n",
            self.version,
            self.kdf.algorithm,
            self.kdf.memory_kib,
            self.kdf.iterations,
            self.kdf.parallelism,
            self.kdf.salt,
            self.wrapped,
            self.created
        );
        if let Some(c) = &self.config {
            text.push_str(&format!("{}\n{c}\n", c.len()));
        }
        blake3::hash(text.as_bytes()).to_hex().to_string()
    }

    /// Parses a key file and checks its checksum (when it has one).
    pub fn parse(bytes: &[u8]) -> std::result::Result<Self, String> {
        let kf: KeyFile = serde_json::from_slice(bytes).map_err(|e| format!("not a valid key file: {e}"))?;
        match &kf.check {
            Some(c) if *c != kf.checksum() => Err("the key file's checksum does not match: it is damaged".into()),
            _ => Ok(kf),
        }
    }

    /// Unwraps the master key; `Ok(None)` when the password does not fit.
    pub fn unwrap(&self, password: &[u8]) -> Result<Option<Keys>> {
        // Everything that can be checked without the password is checked before the costly derivation.
        self.kdf.validate()?;
        let sealed =
            hex::decode(&self.wrapped).map_err(|_| Error::Format("key file: wrapped key is not hex".into()))?;
        if sealed.len() != WRAPPED_LEN {
            return Err(Error::Format(format!(
                "key file: wrapped key of {} bytes (must be {WRAPPED_LEN})",
                sealed.len()
            )));
        }
        let kek = self.kdf.derive(password)?;
        let cipher = Cipher::new(&kek);
        match open(&cipher, KEY_AAD, &sealed, "key") {
            Ok(master) => {
                let mut m = [0u8; 32];
                m.copy_from_slice(&master);
                Ok(Some(Keys::from_master(m)))
            }
            Err(_) => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn key_wrap_round_trip_and_wrong_password() {
        let keys = Keys::generate();
        let kf = KeyFile::wrap(&keys, b"secret", "now".into(), "{}").unwrap();
        let back = kf.unwrap(b"secret").unwrap().unwrap();
        assert_eq!(back.master, keys.master);
        assert!(kf.unwrap(b"other").unwrap().is_none());
        let json = serde_json::to_vec(&kf).unwrap();
        assert!(KeyFile::parse(&json).is_ok());
        // Any change to a field is seen as damage, not as a wrong password.
        let mut changed = kf.clone();
        changed.created.push('x');
        assert!(KeyFile::parse(&serde_json::to_vec(&changed).unwrap()).unwrap_err().contains("damaged"));
        let mut changed = kf.clone();
        changed.config = Some("{ }".into());
        assert!(KeyFile::parse(&serde_json::to_vec(&changed).unwrap()).is_err());
        // Key files without a checksum are still read.
        let mut old = kf;
        old.check = None;
        assert!(KeyFile::parse(&serde_json::to_vec(&old).unwrap()).is_ok());
    }

    #[test]
    fn absurd_kdf_costs_are_refused_before_deriving() {
        let keys = Keys::from_master([3; 32]);
        let good = KeyFile::wrap(&keys, b"pw", "now".into(), "cfg").unwrap();
        // Each of these would take a minute or more, or gigabytes, if it were run.
        for (m, t, p) in [(4 << 20, 64, 1), (2 << 20, 1, 1), (1 << 20, 3, 1), (32 << 10, 65, 1), (32 << 10, 2, 64)] {
            let mut kf = good.clone();
            (kf.kdf.memory_kib, kf.kdf.iterations, kf.kdf.parallelism) = (m, t, p);
            let e = kf.unwrap(b"pw").err().expect("refused");
            assert!(e.to_string().contains("KDF parameters too large"), "{m} {t} {p}: {e}");
        }
        let mut kf = good.clone();
        (kf.kdf.memory_kib, kf.kdf.iterations) = (1 << 20, 2);
        assert!(kf.kdf.validate().is_ok(), "the largest allowed cost stays allowed");
    }

    #[test]
    fn damaged_key_files_are_clear_errors() {
        let keys = Keys::from_master([4; 32]);
        let good = KeyFile::wrap(&keys, b"pw", "now".into(), "cfg").unwrap();
        type Damage = fn(&mut KeyFile);
        let cases: [(&str, Damage); 7] = [
            ("unknown key derivation", |k| k.kdf.algorithm = "scrypt".into()),
            ("salt is not hex", |k| k.kdf.salt = "zz".into()),
            ("salt of 4 bytes", |k| k.kdf.salt = "00112233".into()),
            ("bad KDF parameters", |k| k.kdf.iterations = 0),
            ("bad KDF parameters", |k| (k.kdf.memory_kib, k.kdf.parallelism) = (8, 2)),
            ("wrapped key is not hex", |k| k.wrapped.push('x')),
            ("wrapped key of 59 bytes", |k| k.wrapped.truncate(118)),
        ];
        for (want, damage) in cases {
            let mut kf = good.clone();
            damage(&mut kf);
            let e = kf.unwrap(b"pw").err().expect("refused");
            assert!(matches!(e, Error::Format(_)) && e.to_string().contains(want), "{want}: {e}");
        }
    }

    proptest! {
        #[test]
        fn seal_round_trip(data: Vec<u8>, aad: Vec<u8>, flip in 0usize..1000) {
            let keys = Keys::from_master([7; 32]);
            let c = keys.volume_cipher(&[1; 16]);
            let sealed = seal(&c, &aad, &data);
            prop_assert_eq!(open(&c, &aad, &sealed, "t").unwrap(), data.clone());
            let mut bad = sealed.clone();
            let i = flip % bad.len();
            bad[i] ^= 1;
            prop_assert!(open(&c, &aad, &bad, "t").is_err());
            let other = keys.volume_cipher(&[2; 16]);
            prop_assert!(open(&other, &aad, &sealed, "t").is_err());
            let mut in_place = sealed.clone();
            prop_assert_eq!(&*open_in_place(&c, &aad, &mut in_place, "t").unwrap(), &data[..]);
            prop_assert!(open_in_place(&c, &aad, &mut bad, "t").is_err());
        }
    }
}
