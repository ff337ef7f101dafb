//! Blocks: `codec::decode`, `codec::decode_up_to`, and `volume::open_block` /
//! `open_unindexed` on a valid seal around the input. Input: raw_len (u32 LE) || encoded.
#![no_main]
use brickbox_core::crypto::BlockId;
use brickbox_core::{codec, volume};
use brickbox_fuzz::{assert_damaged, assert_format, keys, seal_block, volume_cipher, volume_name};
use libfuzzer_sys::fuzz_target;

/// Largest plaintext length tried. The decoders take the same paths for any bound, and
/// decompressing tens of MiB per input (bombs up to the bound) made this target crawl.
const MAX_RAW: u32 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let raw_len = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
    if raw_len > MAX_RAW {
        return;
    }
    let encoded = &data[4..];
    let vol = volume_name();
    let decoded = match codec::decode(encoded, raw_len as usize) {
        Ok(p) => {
            assert_eq!(p.len(), raw_len as usize);
            Some(p)
        }
        Err(e) => {
            assert_format(&e);
            None
        }
    };
    let up_to = codec::decode_up_to(encoded, raw_len as usize);
    match &up_to {
        Ok(p) => assert!(p.len() <= raw_len as usize),
        Err(e) => assert_format(e),
    }
    // Sealed in a volume under the id of what it decodes to (or a wrong one).
    let id = match decoded.as_deref().or(up_to.as_deref().ok()) {
        Some(p) => keys().block_id(p),
        None => BlockId([7; 32]),
    };
    let sealed = seal_block(&id, encoded);
    match volume::open_block(keys(), volume_cipher(), &vol, &id, &sealed, raw_len) {
        Ok(p) => assert_eq!(Some(&p), decoded.as_ref()),
        Err(e) => {
            assert_damaged(&e, &vol);
            assert!(decoded.is_none());
        }
    }
    match volume::open_unindexed(keys(), volume_cipher(), &vol, &id, &sealed, raw_len as usize) {
        Ok((enc, len)) => {
            assert_eq!(enc, encoded);
            assert_eq!(Some(len as usize), up_to.as_ref().ok().map(Vec::len));
        }
        Err(e) => {
            assert_damaged(&e, &vol);
            assert!(up_to.is_err());
        }
    }
});
