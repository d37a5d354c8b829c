//! The data layer's deterministic random numbers.
//!
//! ChaCha8 (`rand_chacha`) keyed by `(seed, purpose)` with one stream per epoch or per image,
//! and our own integer/float draws on top of its raw output, so that shuffles and synthetic
//! scenes depend only on the ChaCha8 stream (a fixed algorithm) and not on how a `rand`
//! release implements ranges or shuffles.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A seeded generator for one purpose and one stream.
pub(crate) struct DetRng(ChaCha8Rng);

impl DetRng {
    /// `purpose` separates users of the same seed (the loader, the scene generator);
    /// `stream` separates epochs or images.
    pub(crate) fn new(seed: u64, purpose: &[u8; 8], stream: u64) -> Self {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&seed.to_le_bytes());
        key[8..16].copy_from_slice(purpose);
        let mut rng = ChaCha8Rng::from_seed(key);
        rng.set_stream(stream);
        DetRng(rng)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in `0..n` (Lemire's multiply-and-reject, unbiased). `n` must be positive.
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = (self.next_u64() as u128) * (n as u128);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }

    /// Uniform in `lo..=hi`.
    pub(crate) fn int(&mut self, lo: usize, hi: usize) -> usize {
        debug_assert!(lo <= hi);
        lo + self.below((hi - lo) as u64 + 1) as usize
    }

    /// Uniform in `[0, 1)` with 24 random bits.
    pub(crate) fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in `[lo, hi)`.
    pub(crate) fn float(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.unit()
    }

    /// Fisher-Yates shuffle.
    pub(crate) fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_are_in_range_and_cover_it() {
        let mut rng = DetRng::new(7, b"testtest", 0);
        let mut seen = [0usize; 5];
        for _ in 0..5000 {
            let v = rng.int(3, 7);
            assert!((3..=7).contains(&v));
            seen[v - 3] += 1;
            let f = rng.float(-2.0, 3.0);
            assert!((-2.0..3.0).contains(&f));
        }
        // Each of 5 values expected 1000 times; 800 is > 6 standard deviations away.
        assert!(seen.iter().all(|&n| n > 800), "{seen:?}");
    }

    #[test]
    fn streams_and_purposes_differ_and_repeat() {
        let draw = |seed, purpose: &[u8; 8], stream| {
            let mut r = DetRng::new(seed, purpose, stream);
            (0..4).map(|_| r.next_u64()).collect::<Vec<_>>()
        };
        assert_eq!(draw(1, b"aaaaaaaa", 0), draw(1, b"aaaaaaaa", 0));
        assert_ne!(draw(1, b"aaaaaaaa", 0), draw(1, b"aaaaaaaa", 1));
        assert_ne!(draw(1, b"aaaaaaaa", 0), draw(1, b"bbbbbbbb", 0));
        assert_ne!(draw(1, b"aaaaaaaa", 0), draw(2, b"aaaaaaaa", 0));
    }

    #[test]
    fn shuffle_is_a_permutation() {
        let mut v: Vec<usize> = (0..100).collect();
        DetRng::new(3, b"testtest", 0).shuffle(&mut v);
        let mut sorted = v.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_ne!(v, sorted);
    }
}
