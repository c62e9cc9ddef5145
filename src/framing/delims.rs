//! Finding every delimiter in a run of bytes, for `Framing::parse_many`.
//!
//! `memchr_iter` is built for needles that are rare: each match restarts a vector search
//! with its set-up and tail handling, about 8 ns a match here, which is most of what a 64-byte
//! line costs the poller. Where delimiters are dense, this scanner compares 64 bytes at a time
//! into a bit mask and hands out its set bits (a `tzcnt` each: 3.3 ns a line at 64 B, 2.3x
//! faster, measured on 64 KiB of lines); after four blocks in a row without one (a line over
//! 256 bytes), the rest of the line is found with `memchr`, so long lines cost what they did.

/// The positions of `delim` in `buf`, in order.
pub(super) fn delims(delim: u8, buf: &[u8]) -> Delims<'_> {
    Delims {
        buf,
        delim,
        base: 0,
        mask: 0,
        next: 0,
        empty: 0,
    }
}

/// After this many blocks in a row without a delimiter, the rest of the line is searched
/// with `memchr`, which is faster over long stretches but costs a call each time.
const JUMP_AFTER: u32 = 4;

pub(super) struct Delims<'a> {
    buf: &'a [u8],
    delim: u8,
    /// Where the block of `mask` starts.
    base: usize,
    /// The delimiters of the block at `base` not handed out yet, one bit each.
    mask: u64,
    /// Where the next block starts: everything before it is in `mask` or handed out.
    next: usize,
    /// Blocks in a row without a delimiter.
    empty: u32,
}

impl Iterator for Delims<'_> {
    type Item = usize;

    #[inline]
    fn next(&mut self) -> Option<usize> {
        loop {
            if self.mask != 0 {
                let at = self.base + self.mask.trailing_zeros() as usize;
                self.mask &= self.mask - 1;
                return Some(at);
            }
            let rest = &self.buf[self.next..];
            let Some(block) = rest.get(..64).and_then(|b| <&[u8; 64]>::try_from(b).ok()) else {
                // The tail, under 64 bytes.
                let at = self.next + memchr::memchr(self.delim, rest)?;
                self.next = at + 1;
                return Some(at);
            };
            let mask = mask64(block, self.delim);
            if mask != 0 {
                (self.base, self.mask, self.empty) = (self.next, mask, 0);
                self.next += 64;
                continue;
            }
            self.empty += 1;
            if self.empty < JUMP_AFTER {
                self.next += 64;
                continue;
            }
            // A long line: the rest of it found the way `memchr` finds it.
            match memchr::memchr(self.delim, &rest[64..]) {
                Some(i) => {
                    let at = self.next + 64 + i;
                    self.next = at + 1;
                    self.empty = 0;
                    return Some(at);
                }
                None => {
                    self.next = self.buf.len();
                    return None;
                }
            }
        }
    }
}

/// Bit `i` set where `block[i] == delim`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[allow(unsafe_code)]
fn mask64(block: &[u8; 64], delim: u8) -> u64 {
    use std::arch::x86_64::{
        __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_set1_epi8,
    };
    // SAFETY: SSE2 is part of the x86_64 baseline, so every x86_64 CPU runs these; each load
    // reads 16 bytes at `p + 16 * k` for k < 4, inside the 64 bytes `block` borrows, and
    // `_mm_loadu_si128` takes any alignment.
    unsafe {
        let d = _mm_set1_epi8(delim as i8);
        let p = block.as_ptr().cast::<__m128i>();
        let m = |k: usize| {
            let eq = _mm_cmpeq_epi8(_mm_loadu_si128(p.add(k)), d);
            u64::from(_mm_movemask_epi8(eq) as u16)
        };
        m(0) | m(1) << 16 | m(2) << 32 | m(3) << 48
    }
}

/// Bit `i` set where `block[i] == delim`, in plain code: what `mask64` is elsewhere, and
/// what the tests hold the SSE2 version to.
#[cfg_attr(all(target_arch = "x86_64", not(test)), allow(dead_code))]
#[inline]
fn mask64_plain(block: &[u8; 64], delim: u8) -> u64 {
    let mut mask = 0;
    for (i, &b) in block.iter().enumerate() {
        mask |= u64::from(b == delim) << i;
    }
    mask
}

#[cfg(not(target_arch = "x86_64"))]
use mask64_plain as mask64;

#[cfg(test)]
mod tests {
    use super::delims;
    #[cfg(target_arch = "x86_64")]
    use super::{mask64, mask64_plain};

    proptest::proptest! {
        /// The scanner finds what a byte loop finds, over runs long and short, dense and sparse.
        #[test]
        fn finds_every_delimiter_in_order(
            buf in proptest::collection::vec(proptest::sample::select(b"aaaaaaaaaaaaaaa\n".to_vec()), 0..600),
            sparse in proptest::collection::vec(0usize..4000, 0..6),
        ) {
            let mut buf = buf;
            let mut long = vec![b'a'; 4000];
            for i in sparse {
                long[i] = b'\n';
            }
            buf.extend(long);
            let want: Vec<usize> = buf.iter().enumerate().filter(|(_, &b)| b == b'\n').map(|(i, _)| i).collect();
            proptest::prop_assert_eq!(delims(b'\n', &buf).collect::<Vec<_>>(), want);
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")] // (elsewhere `mask64` is the plain one)
    fn the_vector_mask_agrees_with_the_plain_one() {
        let mut block = [0u8; 64];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..10_000 {
            for b in block.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // Around 0x80, where a signed compare would go wrong, and zero.
                *b = [0x7e, 0x7f, 0x80, 0x81, 0][(x % 5) as usize];
            }
            for delim in [0x7e, 0x7f, 0x80, 0x81, 0] {
                assert_eq!(mask64(&block, delim), mask64_plain(&block, delim));
            }
        }
    }

    #[test]
    fn every_position_of_a_block_and_the_tail() {
        for len in [0, 1, 63, 64, 65, 127, 128, 129, 200] {
            for at in 0..len {
                let mut buf = vec![0u8; len];
                buf[at] = 7;
                assert_eq!(
                    delims(7, &buf).collect::<Vec<_>>(),
                    vec![at],
                    "len {len} at {at}"
                );
            }
            assert_eq!(delims(7, &vec![7u8; len]).count(), len);
        }
    }

    /// Not a test: the figures behind this module, printed (docs/benchmarks.md):
    /// `cargo test --release --lib delims_against_memchr -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement; run it by name"]
    fn delims_against_memchr() {
        use std::hint::black_box;
        use std::time::Instant;
        for line in [64usize, 200, 4096] {
            let mut buf = Vec::new();
            while buf.len() + line <= 65536 {
                buf.extend(std::iter::repeat(b'a').take(line - 1));
                buf.push(b'\n');
            }
            let lines = buf.len() / line;
            let rounds = 20_000;
            // Each position used, as the framing uses it (`count` alone has a shortcut in
            // `memchr`).
            fn walk(found: impl Iterator<Item = usize>) -> usize {
                let mut n = 0;
                for at in found {
                    black_box(at);
                    n += 1;
                }
                n
            }
            let time = |find: &dyn Fn(&[u8]) -> usize| {
                let t = Instant::now();
                for _ in 0..rounds {
                    assert_eq!(find(black_box(&buf)), lines);
                }
                t.elapsed().as_nanos() as f64 / (rounds * lines) as f64
            };
            let m = time(&|b| walk(memchr::memchr_iter(b'\n', b)));
            let d = time(&|b| walk(delims(b'\n', b)));
            println!(
                "{line:>5} B lines: memchr_iter {m:.2} ns/line, delims {d:.2} ns/line, {:.2}x",
                m / d
            );
        }
    }
}
