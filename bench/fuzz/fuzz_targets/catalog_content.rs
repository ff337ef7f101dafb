//! Content blobs of the catalog's change-detection rows (`catalog::decode_content`).
#![no_main]
use brickbox_core::catalog;
use brickbox_core::wire::Writer;
use brickbox_fuzz::assert_format;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match catalog::decode_content(data) {
        Ok(blocks) => {
            let mut w = Writer::new();
            w.uvar(blocks.len() as u64);
            for b in &blocks {
                w.raw(&b.id.0);
                w.uvar(u64::from(b.len));
            }
            assert_eq!(catalog::decode_content(&w.into_bytes()).unwrap(), blocks);
        }
        Err(e) => assert_format(&e),
    }
});
