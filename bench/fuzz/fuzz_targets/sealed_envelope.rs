//! Sealed metadata objects (indexes, manifests, locks) as raw bytes from the box: whatever
//! they hold, they fail authentication with an error naming the object.
#![no_main]
use brickbox_core::{lock, objects};
use brickbox_fuzz::{assert_damaged, index_name, keys, manifest_name, LOCK_NAME};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, bytes)) = data.split_first() else { return };
    match kind % 3 {
        0 => {
            let name = index_name();
            assert_damaged(&objects::open_index(keys(), &name, bytes).unwrap_err(), &name);
        }
        1 => {
            let name = manifest_name();
            assert_damaged(&objects::open_manifest(keys(), &name, bytes).unwrap_err(), &name);
        }
        _ => {
            let e = lock::read_lock(keys(), LOCK_NAME, bytes).unwrap_err();
            assert!(e.contains(LOCK_NAME), "{e}");
        }
    }
});
