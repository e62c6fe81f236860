//! A small, portable, seedable random number generator (SplitMix64) and a stable string hash.
//!
//! Written here rather than taken from `rand` so that a dataset generated with a given seed is
//! byte-identical on every platform and every future version of the dependency tree.

/// SplitMix64 (Steele, Lea & Flood 2014): 64-bit state, passes BigCrush, trivially seedable.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// A generator derived from a seed and a list of stream ids (e.g. example index, attempt),
    /// independent of how many numbers other streams drew.
    pub fn derive(seed: u64, streams: &[u64]) -> Self {
        let mut s = Rng::new(seed ^ 0x5851_F42D_4C95_7F2D);
        for &x in streams {
            s.state ^= x.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            s.next_u64();
        }
        s
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform float in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// A uniform integer in `0..n` (`n > 0`), without modulo bias.
    pub fn below(&mut self, n: usize) -> usize {
        assert!(n > 0, "Rng::below(0)");
        let n = n as u64;
        let zone = u64::MAX - (u64::MAX % n);
        loop {
            let x = self.next_u64();
            if x < zone {
                return (x % n) as usize;
            }
        }
    }

    /// A uniformly chosen element (`items` non-empty).
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// An index chosen with probability proportional to `weights` (not all zero).
    pub fn weighted(&mut self, weights: &[u32]) -> usize {
        let total: u64 = weights.iter().map(|&w| w as u64).sum();
        assert!(total > 0, "Rng::weighted: all weights are zero");
        let mut x = self.next_u64() % total;
        for (i, &w) in weights.iter().enumerate() {
            if x < w as u64 {
                return i;
            }
            x -= w as u64;
        }
        unreachable!()
    }

    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }
}

/// FNV-1a, 64 bit: a stable hash for strings (ids, shingles) that does not change between
/// runs, platforms or Rust versions (unlike `std`'s `DefaultHasher`).
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_deterministic_and_roughly_uniform() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        let xs: Vec<u64> = (0..5).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..5).map(|_| b.next_u64()).collect();
        assert_eq!(xs, ys);
        // Reference value of SplitMix64 seeded with 0 (first output).
        assert_eq!(Rng::new(0).next_u64(), 0xE220_A839_7B1D_CDAF);
        let mut r = Rng::new(1);
        let mut counts = [0u32; 4];
        for _ in 0..40_000 {
            counts[r.below(4)] += 1;
        }
        assert!(counts.iter().all(|&c| (9_000..11_000).contains(&c)), "{counts:?}");
        let mut w = [0u32; 2];
        for _ in 0..30_000 {
            w[r.weighted(&[1, 2])] += 1;
        }
        assert!((9_000..11_000).contains(&w[0]), "{w:?}");
    }

    #[test]
    fn derived_streams_differ() {
        let x = Rng::derive(7, &[1, 0]).next_u64();
        let y = Rng::derive(7, &[0, 1]).next_u64();
        let z = Rng::derive(7, &[1, 0]).next_u64();
        assert_ne!(x, y);
        assert_eq!(x, z);
    }

    #[test]
    fn stable_hash_matches_fnv1a_reference() {
        assert_eq!(stable_hash(b""), 0xCBF2_9CE4_8422_2325);
        assert_eq!(stable_hash(b"a"), 0xAF63_DC4C_8601_EC8C);
    }
}
