//! `Cmd::WriteAll`: many buffers, one operation, one completion; gathered, in order, the
//! buffers handed back in their `Vec`; deadlines and frees end it with the exact count.

mod util;

use std::io::Read;
use std::time::Duration;

use proactor::bytes::Bytes;
use proactor::{Buf, Cmd, Error, Op, SendError};
use util::*;

/// Buffers of varied sizes (empty ones among them), and their concatenation.
fn buffers(seed: u64, n: usize, max: usize) -> (Vec<Bytes>, Vec<u8>) {
    let mut rng = Rng::new(seed);
    let mut all = Vec::new();
    let bufs: Vec<Bytes> = (0..n)
        .map(|i| {
            let len = if i % 7 == 3 {
                0
            } else {
                rng.below(max as u64) as usize + 1
            };
            let b = rng.bytes(len);
            all.extend_from_slice(&b);
            Bytes::from(b)
        })
        .collect();
    (bufs, all)
}

#[test]
fn every_buffer_goes_in_order_with_one_completion_and_the_vec_comes_back() {
    let (watcher, conn, mut client) = watcher_pair();
    let (bufs, all) = buffers(1, 1000, 300);
    let ptr = bufs.as_ptr();
    // Around it, plain writes: the order of the connection's writes holds.
    conn.send(Cmd::Write("<").tag(1)).unwrap();
    conn.send(Cmd::WriteAll(bufs).tag(2)).unwrap();
    conn.send(Cmd::Write(">").tag(3)).unwrap();
    let mut want = b"<".to_vec();
    want.extend_from_slice(&all);
    want.push(b'>');
    let mut got = vec![0; want.len()];
    client.set_read_timeout(Some(TIMEOUT)).unwrap();
    client.read_exact(&mut got).unwrap();
    assert!(got == want, "the bytes differ");
    let done = collect(&watcher, 3, TIMEOUT);
    assert_eq!(done.iter().map(|c| c.tag).collect::<Vec<_>>(), [1, 2, 3]);
    let c = &done[1];
    assert!(
        c.is_ok() && c.op == Op::WriteAll && c.n == all.len(),
        "{}",
        describe(c)
    );
    let Buf::Many(back) = &c.buf else {
        panic!("{}", describe(c))
    };
    // The same `Vec` (its allocation), with its buffers in it.
    assert_eq!((back.as_ptr(), back.len()), (ptr, 1000));
    assert_eq!(back.iter().map(Bytes::len).sum::<usize>(), all.len());
}

#[test]
fn a_deadline_ends_a_stalled_write_all_with_the_exact_count() {
    let (watcher, conn, mut client) = watcher_pair();
    // Far more than the socket buffers hold, and a peer that is not reading.
    let (bufs, all) = buffers(2, 4000, 4096);
    assert!(all.len() > 6 << 20);
    conn.send(Cmd::WriteAll(bufs).timeout(Duration::from_millis(200)))
        .unwrap();
    let c = collect_one(&watcher, TIMEOUT);
    assert!(matches!(c.result, Err(Error::Deadline)), "{}", describe(&c));
    assert!(c.n > 0 && c.n < all.len(), "{}", describe(&c));
    // The peer gets exactly those bytes, then whatever follows on the connection.
    conn.send(Cmd::Write("END")).unwrap();
    let mut got = vec![0; c.n + 3];
    client.set_read_timeout(Some(TIMEOUT)).unwrap();
    client.read_exact(&mut got).unwrap();
    assert!(got[..c.n] == all[..c.n], "the bytes written differ");
    assert_eq!(&got[c.n..], b"END");
    assert!(collect_one(&watcher, TIMEOUT).is_ok());
}

#[test]
fn free_ends_a_write_all_in_flight_and_hands_the_buffers_back() {
    let (watcher, conn, _client) = watcher_pair();
    let (bufs, all) = buffers(3, 3000, 4096);
    conn.send(Cmd::WriteAll(bufs).tag(1)).unwrap();
    wait_stats(&watcher, "part written", |s| s.bytes_written > 0);
    conn.send(Cmd::Free.tag(2)).unwrap();
    let done = collect(&watcher, 2, TIMEOUT);
    let c = &done[0];
    assert!(matches!(c.result, Err(Error::Freed)), "{}", describe(c));
    assert!(c.n < all.len());
    let Buf::Many(back) = &c.buf else {
        panic!("{}", describe(c))
    };
    assert_eq!(back.iter().map(Bytes::len).sum::<usize>(), all.len());
}

#[test]
fn empty_write_all_is_refused_and_datagram_sockets_refuse_it() {
    let (_watcher, conn, _client) = watcher_pair();
    for bufs in [vec![], vec![Bytes::new(), Bytes::new()]] {
        assert!(matches!(
            conn.send(Cmd::WriteAll(bufs)),
            Err(SendError::EmptyBuffer(_))
        ));
    }
    let watcher = proactor::Watcher::new().unwrap();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let conn = watcher.register(udp).unwrap();
    conn.send(Cmd::WriteAll(vec![Bytes::from_static(b"x")]))
        .unwrap();
    let c = collect_one(&watcher, TIMEOUT);
    assert!(
        matches!(c.result, Err(Error::Unsupported(_))),
        "{}",
        describe(&c)
    );
}
