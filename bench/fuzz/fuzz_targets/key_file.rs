//! Key files (`keys/*.key`): JSON, parameter checks before the costly derivation, unwrapping.
#![no_main]
use brickbox_core::crypto::KeyFile;
use brickbox_fuzz::{cheap_key_file, PASSWORD};
use libfuzzer_sys::fuzz_target;

/// Largest derivation (memory KiB x passes) run per input; dearer valid ones are only checked.
const MAX_WORK_RUN: u64 = 512;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode & 1 == 0 {
        // A key file as stored.
        let Ok(kf) = serde_json::from_slice::<KeyFile>(rest) else { return };
        if kf.kdf.validate().is_err() {
            // Refused before any derivation runs (or this input would take as long as it asks).
            assert!(kf.unwrap(PASSWORD).is_err());
        } else if u64::from(kf.kdf.memory_kib) * u64::from(kf.kdf.iterations) <= MAX_WORK_RUN {
            let _ = kf.unwrap(PASSWORD);
        }
    } else {
        // A well-formed key file whose wrapped master key is `rest`, sealed under the right
        // key: only a 32-byte master key may come out of it.
        match cheap_key_file(rest).unwrap(PASSWORD) {
            Ok(Some(_)) => assert_eq!(rest.len(), 32),
            Ok(None) => panic!("the right password was refused"),
            Err(e) => assert!(rest.len() != 32, "a 32-byte master key was refused: {e}"),
        }
    }
});
