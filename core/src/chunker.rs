//! Content-defined chunking (FastCDC 2020) with the repository's parameters.

use std::io::Read;

use crate::objects::ChunkerParams;

/// Iterates over the content-defined chunks of a reader.
pub struct Chunks<R: Read> {
    inner: fastcdc::v2020::StreamCDC<R>,
}

impl<R: Read> Chunks<R> {
    /// Chunks `reader` with `params` (validated when the config was parsed).
    pub fn new(reader: R, params: ChunkerParams) -> Self {
        Self { inner: fastcdc::v2020::StreamCDC::new(reader, params.min_size, params.avg_size, params.max_size) }
    }
}

impl<R: Read> Iterator for Chunks<R> {
    type Item = std::io::Result<Vec<u8>>;

    fn next(&mut self) -> Option<Self::Item> {
        self.inner.next().map(|r| {
            r.map(|c| c.data).map_err(|e| match e {
                fastcdc::v2020::Error::IoError(io) => io,
                other => std::io::Error::other(other.to_string()),
            })
        })
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
        fn an_insertion_changes_only_nearby_chunks(seed: u64, at in 0usize..200_000, byte: u8) {
            let data = pseudo_random(200_000, seed);
            let mut edited = data.clone();
            edited.insert(at, byte);
            let before: std::collections::HashSet<Vec<u8>> = Chunks::new(&data[..], SMALL).map(|c| c.unwrap()).collect();
            let new = Chunks::new(&edited[..], SMALL).map(|c| c.unwrap()).filter(|c| !before.contains(c)).count();
            prop_assert!(new <= 3, "{new} new chunks after a one-byte insertion");
        }
    }
}
