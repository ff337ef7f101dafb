//! Per-block compression: zstd, deflate, LZMA or stored.
//!
//! Every sealed block's plaintext starts with a codec byte followed by the
//! (possibly compressed) payload. A block is stored raw when compressing it
//! does not save at least 1/32 of its size, or when its file's extension says
//! it is already compressed.

use std::io::{Read, Write};

use crate::error::{Error, Result};

/// How a block payload is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    /// Stored as is.
    None = 0,
    /// Zstandard frame.
    Zstd = 1,
    /// Raw deflate stream (RFC 1951).
    Deflate = 2,
    /// LZMA "alone" stream with its 13-byte header.
    Lzma = 3,
}

impl Codec {
    /// The codec for a codec byte.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Codec::None,
            1 => Codec::Zstd,
            2 => Codec::Deflate,
            3 => Codec::Lzma,
            _ => return None,
        })
    }

    /// Parses a user-facing name (`zstd`, `deflate`, `lzma`, `none`).
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name.to_ascii_lowercase().as_str() {
            "zstd" => Codec::Zstd,
            "deflate" => Codec::Deflate,
            "lzma" => Codec::Lzma,
            "none" | "stored" => Codec::None,
            _ => return None,
        })
    }

    /// The user-facing name.
    pub fn name(self) -> &'static str {
        match self {
            Codec::None => "none",
            Codec::Zstd => "zstd",
            Codec::Deflate => "deflate",
            Codec::Lzma => "lzma",
        }
    }
}

/// zstd level used for blocks: the fastest standard level; it keeps both cores ahead of the disk.
const ZSTD_LEVEL: i32 = 1;

thread_local! {
    static ZSTD_C: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> = const { std::cell::RefCell::new(None) };
    static ZSTD_D: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { std::cell::RefCell::new(None) };
}

/// zstd compression with a per-thread context (creating one per block is costly).
fn zstd_compress(data: &[u8]) -> Option<Vec<u8>> {
    ZSTD_C.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = zstd::bulk::Compressor::new(ZSTD_LEVEL).ok();
        }
        c.as_mut()?.compress(data).ok()
    })
}

fn zstd_decompress(data: &[u8], raw_len: usize) -> std::io::Result<Vec<u8>> {
    ZSTD_D.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = Some(zstd::bulk::Decompressor::new()?);
        }
        match d.as_mut() {
            Some(d) => d.decompress(data, raw_len),
            None => Err(std::io::Error::other("no zstd context")),
        }
    })
}

/// Encodes `data` as `codec byte || payload`, falling back to stored when compression does not pay.
pub fn encode(codec: Codec, data: &[u8]) -> Vec<u8> {
    let compressed = match codec {
        Codec::None => None,
        Codec::Zstd => zstd_compress(data),
        Codec::Deflate => {
            let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
            enc.write_all(data).and_then(|_| enc.finish()).ok()
        }
        Codec::Lzma => lzma_compress(data),
    };
    match compressed {
        Some(c) if c.len() + data.len() / 32 < data.len() => {
            let mut out = Vec::with_capacity(c.len() + 1);
            out.push(codec as u8);
            out.extend_from_slice(&c);
            out
        }
        _ => {
            let mut out = Vec::with_capacity(data.len() + 1);
            out.push(Codec::None as u8);
            out.extend_from_slice(data);
            out
        }
    }
}

fn lzma_compress(data: &[u8]) -> Option<Vec<u8>> {
    let opts = lzma_rust2::LzmaOptions::with_preset(6);
    let mut w = lzma_rust2::LzmaWriter::new_use_header(Vec::new(), &opts, Some(data.len() as u64)).ok()?;
    w.write_all(data).ok()?;
    w.finish().ok()
}

/// Like [`decode`], taking the encoded block by value: a stored block is returned in the same
/// buffer (its codec byte removed) instead of being copied.
pub fn decode_vec(mut encoded: Vec<u8>, raw_len: usize) -> Result<Vec<u8>> {
    if encoded.first() == Some(&(Codec::None as u8)) {
        encoded.remove(0);
        if encoded.len() != raw_len {
            return Err(Error::Format(format!("block decodes to {} bytes, expected {raw_len}", encoded.len())));
        }
        return Ok(encoded);
    }
    decode(&encoded, raw_len)
}

/// Decodes `codec byte || payload` back to the block's plaintext of `raw_len` bytes.
pub fn decode(encoded: &[u8], raw_len: usize) -> Result<Vec<u8>> {
    let (&tag, payload) = encoded.split_first().ok_or_else(|| Error::Format("empty block payload".into()))?;
    let codec = Codec::from_u8(tag).ok_or_else(|| Error::Format(format!("unknown codec byte {tag}")))?;
    let out = match codec {
        Codec::None => payload.to_vec(),
        Codec::Zstd => zstd_decompress(payload, raw_len).map_err(|e| Error::Format(format!("zstd: {e}")))?,
        Codec::Deflate => {
            let mut out = Vec::with_capacity(raw_len);
            flate2::read::DeflateDecoder::new(payload)
                .take(raw_len as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|e| Error::Format(format!("deflate: {e}")))?;
            out
        }
        Codec::Lzma => {
            let mut out = Vec::with_capacity(raw_len);
            let r = lzma_rust2::LzmaReader::new_mem_limit(payload, 64 * 1024, None)
                .map_err(|e| Error::Format(format!("lzma: {e}")))?;
            r.take(raw_len as u64 + 1).read_to_end(&mut out).map_err(|e| Error::Format(format!("lzma: {e}")))?;
            out
        }
    };
    if out.len() != raw_len {
        return Err(Error::Format(format!("block decodes to {} bytes, expected {raw_len}", out.len())));
    }
    Ok(out)
}

/// File extensions whose content is already compressed; their blocks are stored raw.
const INCOMPRESSIBLE: &[&str] = &[
    "7z", "aac", "apk", "avi", "avif", "br", "bz2", "cab", "deb", "docx", "epub", "flac", "gif", "gz", "heic", "jar",
    "jpeg", "jpg", "lz", "lz4", "lzma", "m4a", "m4v", "mkv", "mov", "mp3", "mp4", "odp", "ods", "odt", "ogg", "opus",
    "png", "pptx", "rar", "rpm", "tgz", "txz", "webm", "webp", "whl", "xlsx", "xz", "zip", "zst",
];

/// Whether a file name's extension marks already-compressed content.
pub fn is_precompressed(name: &[u8]) -> bool {
    let Some(dot) = name.iter().rposition(|&b| b == b'.') else { return false };
    let ext = &name[dot + 1..];
    if ext.len() > 5 {
        return false;
    }
    let ext = ext.to_ascii_lowercase();
    INCOMPRESSIBLE.iter().any(|e| e.as_bytes() == ext.as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn every_codec_round_trips_and_compresses() {
        let text: Vec<u8> = b"the quick brown fox jumps over the lazy dog. ".repeat(2000);
        for codec in [Codec::None, Codec::Zstd, Codec::Deflate, Codec::Lzma] {
            let enc = encode(codec, &text);
            assert_eq!(enc[0], codec as u8, "{codec:?} should be used for text");
            if codec != Codec::None {
                assert!(enc.len() < text.len() / 10, "{codec:?} compresses");
            }
            assert_eq!(decode(&enc, text.len()).unwrap(), text);
        }
    }

    #[test]
    fn random_data_is_stored() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        let enc = encode(Codec::Zstd, &crate::crypto::random_bytes::<4096>());
        assert_eq!(enc[0], Codec::None as u8);
        assert_eq!(decode(&encode(Codec::Zstd, &data), data.len()).unwrap(), data);
    }

    #[test]
    fn extensions() {
        assert!(is_precompressed(b"photo.JPG"));
        assert!(is_precompressed(b"a.tar.gz"));
        assert!(!is_precompressed(b"notes.txt"));
        assert!(!is_precompressed(b"Makefile"));
    }

    proptest! {
        #[test]
        fn codecs_round_trip(data: Vec<u8>, c in 0u8..4) {
            let codec = Codec::from_u8(c).unwrap();
            prop_assert_eq!(decode(&encode(codec, &data), data.len()).unwrap(), data.clone());
            prop_assert_eq!(decode_vec(encode(codec, &data), data.len()).unwrap(), data.clone());
            prop_assert!(decode_vec(encode(codec, &data), data.len() + 1).is_err());
        }

        #[test]
        fn decode_garbage_is_an_error_not_a_panic(data: Vec<u8>, n in 0usize..10000) {
            let _ = decode(&data, n);
        }
    }
}
