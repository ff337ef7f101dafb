//! Sealed metadata objects whose decrypted plaintext (codec byte || payload) is the input:
//! the codec layer (zstd bombs included), then the index, manifest or lock parser.
#![no_main]
use brickbox_core::objects::{self, ObjectKind, VolumeIndex};
use brickbox_core::{lock, time};
use brickbox_fuzz::{assert_damaged, index_name, keys, manifest_name, seal_meta, LOCK_NAME, VOLUME_ID};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, plain)) = data.split_first() else { return };
    match kind % 3 {
        0 => {
            let name = index_name();
            match objects::open_index(keys(), &name, &seal_meta(ObjectKind::Index, &name, plain)) {
                Ok(index) => {
                    assert_eq!(index.volume_id, VOLUME_ID);
                    assert_eq!(VolumeIndex::decode(&index.encode()).unwrap(), index);
                    for e in &index.entries {
                        assert!(e.offset + u64::from(e.length) <= index.volume_size);
                    }
                }
                Err(e) => assert_damaged(&e, &name),
            }
        }
        1 => {
            let name = manifest_name();
            match objects::open_manifest(keys(), &name, &seal_meta(ObjectKind::Manifest, &name, plain)) {
                Ok(m) => {
                    // What listing a version does with it.
                    let _ = m.root_id();
                    let _ = time::format_rfc3339(m.time_ns);
                    let _ = time::format_short(m.time_ns);
                    let _ = time::format_folder_name(m.time_ns);
                }
                Err(e) => assert_damaged(&e, &name),
            }
        }
        _ => match lock::read_lock(keys(), LOCK_NAME, &seal_meta(ObjectKind::Lock, LOCK_NAME, plain)) {
            Ok(info) => {
                // What meeting a lock does with it.
                let _ = info.stale_reason();
                let _ = info.describe();
            }
            Err(e) => assert!(!e.is_empty()),
        },
    }
});
