//! Content-defined chunking (FastCDC 2020) with the repository's parameters.
//!
//! [`Chunker`] finds the same cut points as `fastcdc::v2020::StreamCDC` (normalisation
//! level 1, the standard gear table), but reads in large pieces into one buffer and hands
//! out each chunk as a slice of it: no copy per chunk, and the buffer can be reused from
//! file to file.

use std::io::{ErrorKind, Read};

use fastcdc::v2020::{cut, logarithm2, Normalization, MASKS};

use crate::objects::ChunkerParams;

/// Buffer size of a chunker: room for several of the largest chunks, so refilling moves
/// little data compared to what it reads.
pub fn buffer_size(params: ChunkerParams) -> usize {
    (params.max_size as usize * 4).max(64 << 10)
}

/// Splits a reader into content-defined chunks.
pub struct Chunker<R: Read> {
    reader: R,
    buf: Vec<u8>,
    /// First byte not yet handed out.
    start: usize,
    /// End of the bytes read.
    end: usize,
    eof: bool,
    min: usize,
    avg: usize,
    max: usize,
    mask_s: u64,
    mask_l: u64,
}

impl<R: Read> Chunker<R> {
    /// Chunks `reader` with `params` (validated when the config was parsed).
    pub fn new(reader: R, params: ChunkerParams) -> Self {
        Self::with_buffer(reader, params, Vec::new())
    }

    /// Like [`Self::new`], reusing `buf` (see [`Self::into_buffer`]) instead of allocating.
    pub fn with_buffer(reader: R, params: ChunkerParams, mut buf: Vec<u8>) -> Self {
        let size = buffer_size(params);
        if buf.len() < size {
            buf.resize(size, 0);
        }
        let bits = logarithm2(params.avg_size);
        let level = Normalization::Level1.bits();
        Self {
            reader,
            buf,
            start: 0,
            end: 0,
            eof: false,
            min: params.min_size as usize,
            avg: params.avg_size as usize,
            max: params.max_size as usize,
            mask_s: MASKS[(bits + level) as usize],
            mask_l: MASKS[(bits - level) as usize],
        }
    }

    /// The buffer, for the next chunker.
    pub fn into_buffer(self) -> Vec<u8> {
        self.buf
    }

    /// The next chunk, `None` at the end of the input.
    pub fn next_chunk(&mut self) -> Option<std::io::Result<&[u8]>> {
        if self.end - self.start < self.max && !self.eof {
            if let Err(e) = self.refill() {
                return Some(Err(e));
            }
        }
        if self.start == self.end {
            return None;
        }
        let (m, a, x) = (self.min, self.avg, self.max);
        let (_, len) =
            cut(&self.buf[self.start..self.end], m, a, x, self.mask_s, self.mask_l, self.mask_s << 1, self.mask_l << 1);
        // A cut is never empty: at least `min` bytes, or all that is left.
        let len = len.max(1);
        let chunk = &self.buf[self.start..self.start + len];
        self.start += len;
        Some(Ok(chunk))
    }

    /// Moves the unread rest to the front and reads until the buffer is full or the input ends.
    fn refill(&mut self) -> std::io::Result<()> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        while !self.eof && self.end < self.buf.len() {
            match self.reader.read(&mut self.buf[self.end..]) {
                Ok(0) => self.eof = true,
                Ok(n) => self.end += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Iterates over the chunks of a reader as owned buffers (a copy per chunk; the backup
/// uses [`Chunker`] directly).
pub struct Chunks<R: Read> {
    inner: Chunker<R>,
}

impl<R: Read> Chunks<R> {
    /// Chunks `reader` with `params` (validated when the config was parsed).
    pub fn new(reader: R, params: ChunkerParams) -> Self {
        Self { inner: Chunker::new(reader, params) }
    }
}

impl<R: Read> Iterator for Chunks<R> {
    type Item = std::io::Result<Vec<u8>>;

    fn next(&mut self) -> Option<Self::Item> {
        self.inner.next_chunk().map(|r| r.map(<[u8]>::to_vec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    const SMALL: ChunkerParams = ChunkerParams { min_size: 2048, avg_size: 8192, max_size: 32768 };

    /// A reader that returns at most `step` bytes per read, like a pipe or a slow disk.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            let n = out.len().min(self.step).min(self.data.len());
            out[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn chunks_cover_the_input_within_bounds(len in 0usize..300_000, seed: u64) {
            let data = pseudo_random(len, seed);
            let chunks: Vec<Vec<u8>> = Chunks::new(&data[..], SMALL).map(|c| c.unwrap()).collect();
            prop_assert_eq!(chunks.concat(), data);
            for (i, c) in chunks.iter().enumerate() {
                prop_assert!(c.len() <= SMALL.max_size as usize);
                if i + 1 < chunks.len() {
                    prop_assert!(c.len() >= SMALL.min_size as usize);
                }
            }
        }

        #[test]
        fn cut_points_are_those_of_fastcdc_stream_cdc(len in 0usize..400_000, seed: u64, step in 1usize..100_000) {
            // Boxes written by earlier versions were chunked by StreamCDC: the same cut points
            // keep deduplicating against them.
            let data = pseudo_random(len, seed);
            let theirs: Vec<Vec<u8>> =
                fastcdc::v2020::StreamCDC::new(&data[..], SMALL.min_size, SMALL.avg_size, SMALL.max_size)
                    .map(|c| c.unwrap().data)
                    .collect();
            let mut ours = Vec::new();
            let mut chunker = Chunker::new(Trickle { data: &data, step }, SMALL);
            while let Some(c) = chunker.next_chunk() {
                ours.push(c.unwrap().to_vec());
            }
            prop_assert_eq!(ours, theirs);
        }

        #[test]
        fn an_insertion_leaves_the_chunks_before_it_alone(seed: u64, at in 0usize..200_000, byte: u8) {
            let data = pseudo_random(200_000, seed);
            let mut edited = data.clone();
            edited.insert(at, byte);
            let before: Vec<Vec<u8>> = Chunks::new(&data[..], SMALL).map(|c| c.unwrap()).collect();
            let after: Vec<Vec<u8>> = Chunks::new(&edited[..], SMALL).map(|c| c.unwrap()).collect();
            // Chunking runs front to back, so every chunk that ends before the edit is found
            // again, unchanged. (Not one that ends just at it: whether a chunk is cut after a
            // byte depends on the byte that follows.)
            let mut end = 0;
            for (old, new) in before.iter().zip(&after) {
                end += old.len();
                if end >= at {
                    break;
                }
                prop_assert_eq!(old, new);
            }
        }
    }

    /// Chunk boundaries find their way back soon after an edit: over a fixed set of inputs (so
    /// the test is deterministic), a one-byte insertion changes little more than the chunk it
    /// falls in (1.04 chunks on average, 3 at most). Content-defined chunking gives no hard bound
    /// for a single input, so a random one would make a flaky test.
    #[test]
    fn an_insertion_changes_few_chunks_on_average() {
        let (mut total, mut worst) = (0usize, 0usize);
        let cases = 200u64;
        for seed in 0..cases {
            let data = pseudo_random(200_000, seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            let mut edited = data.clone();
            edited.insert((seed as usize * 7919) % data.len(), seed as u8);
            let before: std::collections::HashSet<Vec<u8>> =
                Chunks::new(&data[..], SMALL).map(|c| c.unwrap()).collect();
            let new = Chunks::new(&edited[..], SMALL).map(|c| c.unwrap()).filter(|c| !before.contains(c)).count();
            total += new;
            worst = worst.max(new);
        }
        let mean = total as f64 / cases as f64;
        assert!((1.0..=1.5).contains(&mean), "{mean} new chunks per one-byte insertion on average");
        assert!(worst <= 4, "{worst} new chunks after one insertion");
    }
}
