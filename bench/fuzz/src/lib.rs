//! What the fuzz targets share: a fixed test key, fixed object names, and sealing of fuzzed
//! payloads, so that the inner parsers are reached past authentication. Also used by the
//! seed generator (`examples/seeds.rs`).

use std::sync::OnceLock;

use brickbox_core::crypto::{self, BlockId, Cipher, KdfParams, KeyFile, Keys};
use brickbox_core::objects::{self, ObjectKind};
use brickbox_core::Error;

/// Master key of every sealed input the targets build.
pub const MASTER: [u8; 32] = [0x42; 32];
/// Volume id named by [`index_name`] and [`volume_name`].
pub const VOLUME_ID: [u8; 16] = [0x11; 16];
/// Version id named by [`manifest_name`].
pub const VERSION_ID: &str = "0123456789abcdef";
/// Name of the lock object the targets open.
pub const LOCK_NAME: &str = "locks/0123456789abcdef.lock";
/// Password of the cheap key files built by [`cheap_key_file`].
pub const PASSWORD: &[u8] = b"fuzz";

/// Magic of a sealed metadata object (`docs/FORMAT.md`, section 10).
const SEALED_MAGIC: &[u8; 4] = b"BBO1";
/// AAD of a wrapped master key (`docs/FORMAT.md`, section 3.1).
const KEY_AAD: &[u8] = b"brickbox-key-v1";

/// The keys derived from [`MASTER`].
pub fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| Keys::from_master(MASTER))
}

/// `index/<VOLUME_ID hex>.dindex`.
pub fn index_name() -> String {
    objects::index_name(&VOLUME_ID)
}

/// `data/<VOLUME_ID hex>.dblock.zip`.
pub fn volume_name() -> String {
    objects::volume_name(&VOLUME_ID)
}

/// `versions/<VERSION_ID>.dlist`.
pub fn manifest_name() -> String {
    objects::manifest_name(VERSION_ID)
}

/// The cipher of the volume [`VOLUME_ID`].
pub fn volume_cipher() -> &'static Cipher {
    static CIPHER: OnceLock<Cipher> = OnceLock::new();
    CIPHER.get_or_init(|| keys().volume_cipher(&VOLUME_ID))
}

/// A sealed metadata object of `kind` stored as `name` whose plaintext (codec byte ||
/// payload) is `plain` as given, so that any codec byte and payload reach the reader.
pub fn seal_meta(kind: ObjectKind, name: &str, plain: &[u8]) -> Vec<u8> {
    let mut out = SEALED_MAGIC.to_vec();
    out.push(kind as u8);
    out.extend_from_slice(&crypto::seal(keys().meta_cipher(), name.as_bytes(), plain));
    out
}

/// A sealed block of volume [`VOLUME_ID`] holding `encoded` (codec byte || payload).
pub fn seal_block(id: &BlockId, encoded: &[u8]) -> Vec<u8> {
    crypto::seal(volume_cipher(), &id.0, encoded)
}

/// Argon2 parameters cheap enough to run on every input (8 KiB, one pass).
pub fn cheap_kdf() -> KdfParams {
    KdfParams {
        algorithm: "argon2id".into(),
        memory_kib: 8,
        iterations: 1,
        parallelism: 1,
        salt: "00112233445566778899aabbccddeeff".into(),
    }
}

/// A key file with [`cheap_kdf`] whose wrapped content is `wrapped_plain` sealed under the
/// key that [`PASSWORD`] derives, so the checks after authentication are reached.
pub fn cheap_key_file(wrapped_plain: &[u8]) -> KeyFile {
    static KEK: OnceLock<Cipher> = OnceLock::new();
    let kek = KEK.get_or_init(|| {
        let kdf = cheap_kdf();
        let params = argon2::Params::new(kdf.memory_kib, kdf.iterations, kdf.parallelism, Some(32)).expect("params");
        let salt = hex::decode(&kdf.salt).expect("salt");
        let mut key = [0u8; 32];
        argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
            .hash_password_into(PASSWORD, &salt, &mut key)
            .expect("argon2");
        Cipher::new(&key)
    });
    KeyFile {
        version: 1,
        kdf: cheap_kdf(),
        wrapped: hex::encode(crypto::seal(kek, KEY_AAD, wrapped_plain)),
        created: "2026-01-01T00:00:00+00:00".into(),
        config: None,
        check: None,
    }
}

/// Panics unless `e` is a damaged-object error naming `object`: every bad object must be
/// reported with the name a user can find it under.
pub fn assert_damaged(e: &Error, object: &str) {
    match e {
        Error::Damaged { object: o, reason } if o == object && !reason.is_empty() => {}
        other => panic!("expected a damaged-object error naming {object}, got {other:?}"),
    }
}

/// Panics unless `e` is a malformed-data error.
pub fn assert_format(e: &Error) {
    assert!(matches!(e, Error::Format(m) if !m.is_empty()), "expected a malformed-data error, got {e:?}");
}
