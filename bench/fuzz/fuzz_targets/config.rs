//! The plaintext `config` object (`Config::parse`).
#![no_main]
use brickbox_core::objects::{Config, CONFIG_NAME};
use brickbox_core::Error;
use brickbox_fuzz::assert_damaged;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match Config::parse(data) {
        Ok(c) => assert!(c.chunker.min_size <= c.chunker.avg_size && c.chunker.avg_size <= c.chunker.max_size),
        Err(Error::UnsupportedVersion { found, .. }) => assert_ne!(found, brickbox_core::objects::FORMAT_VERSION),
        Err(e) => assert_damaged(&e, CONFIG_NAME),
    }
});
