//! Volume index payloads (`VolumeIndex::decode`).
#![no_main]
use brickbox_core::objects::VolumeIndex;
use brickbox_fuzz::assert_format;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match VolumeIndex::decode(data) {
        Ok(index) => {
            for e in &index.entries {
                assert!(e.offset + u64::from(e.length) <= index.volume_size);
            }
            assert_eq!(VolumeIndex::decode(&index.encode()).unwrap(), index);
        }
        Err(e) => assert_format(&e),
    }
});
