//! Volumes read without their index (`volume::scan_entries`, `entries_without_index`), and
//! each entry found opened as repair does.
#![no_main]
use brickbox_core::volume;
use brickbox_fuzz::{assert_damaged, keys, volume_cipher, volume_name};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let scanned = volume::scan_entries(bytes);
    let entries = volume::entries_without_index(bytes);
    let vol = volume_name();
    for e in &scanned {
        assert!(entries.contains(e), "an entry of the local headers was dropped");
    }
    for &(id, offset, length) in &entries {
        // Callers slice the volume with these: they must lie inside it.
        let end = offset.checked_add(u64::from(length)).expect("entry end overflows");
        assert!(end <= bytes.len() as u64, "entry past the end of the volume");
        let sealed = &bytes[offset as usize..end as usize];
        // Not sealed with the fuzzing key: authentication fails, naming the volume.
        if let Err(e) = volume::open_unindexed(keys(), volume_cipher(), &vol, &id, sealed, 64 << 20) {
            assert_damaged(&e, &vol);
        }
    }
});
