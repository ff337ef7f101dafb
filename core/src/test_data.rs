//! Data for unit tests.

/// `len` reproducible pseudo-random bytes (xorshift), different for each `seed`: file
/// content that neither compresses nor deduplicates.
pub(crate) fn pseudo(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}
