//! Test helpers every helper module needs (`tests/util`, `tests/reliability_util`,
//! `tests/example_util`), included by each with `#[path]`: loopback pairs, a seeded PRNG,
//! one-line completion dumps, and the socket options of `sockopt.rs`.
#![allow(dead_code)]

#[path = "limits.rs"]
mod limits;
#[path = "sockopt.rs"]
mod sockopt;
#[allow(unused_imports)] // re-exported for the helper modules
pub use limits::{raise_fd_limit, somaxconn};
#[allow(unused_imports)] // not every helper module sets raw options
pub use sockopt::{get_opt, set_linger, set_linger_zero, set_opt};

use std::fmt::Write as _;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;

use proactor::{Buf, Completion};

/// One listener handing out many pairs (connect, then accept at once, so the backlog never
/// fills however many pairs are made).
pub struct Pairs {
    listener: TcpListener,
}

impl Pairs {
    pub fn new() -> Pairs {
        raise_fd_limit();
        Pairs {
            listener: TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"),
        }
    }

    /// (client, server)
    pub fn pair(&self) -> (TcpStream, TcpStream) {
        let client = self.connect();
        (client, self.accept())
    }

    /// A client end only; take its server end later with `accept`.
    pub fn connect(&self) -> TcpStream {
        TcpStream::connect(self.listener.local_addr().unwrap()).expect("connect")
    }

    pub fn accept(&self) -> TcpStream {
        self.listener.accept().expect("accept").0
    }
}

/// xorshift64*: a tiny seeded PRNG, good enough for test data and choices.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform enough in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// In `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below((hi - lo + 1) as u64) as usize
    }

    /// Fills `buf`. Two generators with the same seed produce the same stream as long as
    /// every call but the last fills a multiple of 8 bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let x = self.next_u64().to_le_bytes();
            let k = rest.len();
            rest.copy_from_slice(&x[..k]);
        }
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0; n];
        self.fill(&mut v);
        v
    }
}

/// `len` deterministic pseudo-random bytes for `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    Rng::new(seed).bytes(len)
}

/// One line per completion, without dumping buffers.
pub fn describe(c: &Completion) -> String {
    let buf = match &c.buf {
        Buf::None => "None".to_string(),
        Buf::Vec(v) => format!("Vec(len {})", v.len()),
        Buf::Bytes(b) => format!("Bytes(len {})", b.len()),
        Buf::Fd(fd, unread) => format!("Fd({}, {} unread)", fd.as_raw_fd(), unread.len()),
        _ => "?".to_string(),
    };
    format!(
        "{{{:?} {:?} tag {} n {} buf {} result {:?}}}",
        c.conn.id(),
        c.op,
        c.tag,
        c.n,
        buf,
        c.result
    )
}

pub fn describe_all(cs: &[Completion]) -> String {
    let mut s = String::new();
    for c in cs {
        let _ = writeln!(s, "  {}", describe(c));
    }
    s
}
