//! Compact binary encoding shared by tree blocks and volume indexes.
//!
//! Unsigned integers are LEB128 varints, signed integers are zig-zag varints,
//! byte strings are a varint length followed by the bytes. `docs/FORMAT.md`
//! describes the same rules for independent readers.

use crate::error::{Error, Result};

/// Appends encoded values to a byte buffer.
#[derive(Default)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    /// An empty writer.
    pub fn new() -> Self {
        Self::default()
    }

    /// The bytes written so far.
    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    /// A single byte.
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }

    /// An unsigned LEB128 varint.
    pub fn uvar(&mut self, mut v: u64) {
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                self.buf.push(byte);
                return;
            }
            self.buf.push(byte | 0x80);
        }
    }

    /// A zig-zag encoded signed varint.
    pub fn ivar(&mut self, v: i64) {
        self.uvar(((v << 1) ^ (v >> 63)) as u64);
    }

    /// Raw bytes without a length prefix.
    pub fn raw(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// A length-prefixed byte string.
    pub fn bytes(&mut self, bytes: &[u8]) {
        self.uvar(bytes.len() as u64);
        self.buf.extend_from_slice(bytes);
    }
}

/// Reads values written by [`Writer`], failing cleanly on truncated or malformed input.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// A reader over `buf`; `what` names the object kind in error messages.
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, pos: 0, what }
    }

    fn err(&self, msg: &str) -> Error {
        Error::Format(format!("{}: {msg} at byte {}", self.what, self.pos))
    }

    /// Whether all input has been consumed.
    pub fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    /// A single byte.
    pub fn u8(&mut self) -> Result<u8> {
        let v = *self.buf.get(self.pos).ok_or_else(|| self.err("truncated"))?;
        self.pos += 1;
        Ok(v)
    }

    /// An unsigned LEB128 varint (at most 10 bytes).
    pub fn uvar(&mut self) -> Result<u64> {
        let mut v: u64 = 0;
        for shift in (0..70).step_by(7) {
            let b = self.u8()?;
            if shift == 63 && b > 1 {
                return Err(self.err("varint overflow"));
            }
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(self.err("varint too long"))
    }

    /// A varint that must fit in `usize` and be at most `max`.
    pub fn len(&mut self, max: usize) -> Result<usize> {
        let v = self.uvar()?;
        if v > max as u64 {
            return Err(self.err("length out of range"));
        }
        Ok(v as usize)
    }

    /// A varint that must fit in `u32`.
    pub fn u32var(&mut self) -> Result<u32> {
        u32::try_from(self.uvar()?).map_err(|_| self.err("value out of range"))
    }

    /// A zig-zag encoded signed varint.
    pub fn ivar(&mut self) -> Result<i64> {
        let v = self.uvar()?;
        Ok(((v >> 1) as i64) ^ -((v & 1) as i64))
    }

    /// `n` raw bytes.
    pub fn raw(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).ok_or_else(|| self.err("length overflow"))?;
        let s = self.buf.get(self.pos..end).ok_or_else(|| self.err("truncated"))?;
        self.pos = end;
        Ok(s)
    }

    /// A fixed-size array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let s = self.raw(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    /// A length-prefixed byte string.
    pub fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.len(self.buf.len())?;
        self.raw(n)
    }

    /// A length-prefixed UTF-8 string.
    pub fn string(&mut self) -> Result<String> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| self.err("invalid UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(a: u64, b: i64, s: Vec<u8>) {
            let mut w = Writer::new();
            w.uvar(a);
            w.ivar(b);
            w.bytes(&s);
            let bytes = w.into_bytes();
            let mut r = Reader::new(&bytes, "test");
            prop_assert_eq!(r.uvar().unwrap(), a);
            prop_assert_eq!(r.ivar().unwrap(), b);
            prop_assert_eq!(r.bytes().unwrap(), &s[..]);
            prop_assert!(r.is_empty());
        }

        #[test]
        fn garbage_never_panics(data: Vec<u8>) {
            let mut r = Reader::new(&data, "test");
            let _ = r.uvar();
            let _ = r.bytes();
            let _ = r.ivar();
        }
    }
}
