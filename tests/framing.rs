//! Framed reads (issue 19): `Cmd::ReadFrame` and `Cmd::ReadFrames` with lines, length
//! prefixes and a decoder of the caller's, on whichever engine `PROACTOR_ENGINE` picks (CI
//! runs the suite on both). A model test cuts random frames at random read boundaries; the
//! others try the bad inputs: too long, cut short, invalid, a panicking decoder, a trickling
//! peer, and switching framings mid-stream.

mod util;

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proactor::bytes::Bytes;
use proactor::{Buf, Cmd, Conn, Decoded, Decoder, Error, Framing, Op, Watcher};
use proptest::prelude::*;
use util::*;

/// Writes `data` and waits until the watcher has read all of it (so that the next write
/// arrives in a read of its own).
fn send_and_wait_read(watcher: &Watcher, client: &mut TcpStream, data: &[u8], total: &mut u64) {
    client.write_all(data).unwrap();
    *total += data.len() as u64;
    let want = *total;
    wait_stats(watcher, "the bytes read", |s| s.bytes_read >= want);
}

fn frame_of(c: &proactor::Completion) -> Bytes {
    match &c.buf {
        Buf::Bytes(b) => b.clone(),
        other => panic!("not a frame: {other:?}"),
    }
}

/// A framing and how to encode a payload with it.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Lines,
    LinesCr,
    Prefix(usize, bool),
    Custom,
}

impl Kind {
    fn framing(self, max: usize) -> Framing {
        match self {
            Kind::Lines => Framing::lines(max),
            Kind::LinesCr => Framing::lines(max).strip_cr(true),
            Kind::Prefix(w, little) => {
                let f = Framing::length_prefixed(w, max);
                if little {
                    f.little_endian()
                } else {
                    f
                }
            }
            Kind::Custom => Framing::custom(Arc::new(Angles), max),
        }
    }

    fn encode(self, payload: &[u8], out: &mut Vec<u8>) {
        match self {
            Kind::Lines => {
                out.extend_from_slice(payload);
                out.push(b'\n');
            }
            Kind::LinesCr => {
                out.extend_from_slice(payload);
                out.extend_from_slice(b"\r\n");
            }
            Kind::Prefix(w, little) => {
                let len = payload.len() as u64;
                if little {
                    out.extend_from_slice(&len.to_le_bytes()[..w]);
                } else {
                    out.extend_from_slice(&len.to_be_bytes()[8 - w..]);
                }
                out.extend_from_slice(payload);
            }
            Kind::Custom => {
                out.push(b'<');
                out.extend_from_slice(payload);
                out.push(b'>');
            }
        }
    }

    /// Payload bytes the framing can carry (no delimiters inside lines or angles, no more
    /// than a one-byte prefix can count).
    fn clean(self, mut payload: Vec<u8>) -> Vec<u8> {
        if let Kind::Prefix(1, _) = self {
            payload.truncate(255);
        }
        for b in &mut payload {
            match self {
                Kind::Lines | Kind::LinesCr if *b == b'\n' || *b == b'\r' => *b = b'.',
                Kind::Custom if *b == b'<' || *b == b'>' => *b = b'.',
                _ => {}
            }
        }
        payload
    }
}

/// Frames of `'<' payload '>'`.
struct Angles;

impl Decoder for Angles {
    fn decode(&self, buf: &[u8]) -> Decoded {
        if buf[0] != b'<' {
            return Decoded::Invalid(format!("a frame starts with <, not {:?}", buf[0]));
        }
        match buf.iter().position(|&b| b == b'>') {
            Some(end) => Decoded::Frame {
                frame: 1..end,
                consumed: end + 1,
            },
            None => Decoded::NeedMore(1),
        }
    }
}

fn kind_strategy() -> impl Strategy<Value = Kind> {
    prop_oneof![
        Just(Kind::Lines),
        Just(Kind::LinesCr),
        (prop::sample::select(vec![1usize, 2, 4, 8]), any::<bool>())
            .prop_map(|(w, l)| Kind::Prefix(w, l)),
        Just(Kind::Custom),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Random frames of every framing, the stream cut at random points, each piece read on
    /// its own: every frame comes out whole and in order, by `ReadFrame` or in batches of
    /// `ReadFrames`, and what follows the last frame is served to a plain read.
    #[test]
    fn frames_come_out_whole_and_in_order_whatever_the_cuts(
        kind in kind_strategy(),
        payloads in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 1..30),
        cuts in prop::collection::vec(1usize..400, 1..40),
        batch in 0usize..4,
    ) {
        let payloads: Vec<Vec<u8>> = payloads.into_iter().map(|p| kind.clean(p)).collect();
        let max = 1000;
        let framing = kind.framing(max);
        let mut stream = Vec::new();
        for p in &payloads {
            kind.encode(p, &mut stream);
        }
        stream.extend_from_slice(b"TAIL");
        let watcher = Watcher::new().unwrap();
        let (mut client, server) = tcp_pair();
        client.set_nodelay(true).unwrap();
        let conn = watcher.register(server).unwrap();
        let mut got: Vec<Bytes> = Vec::new();
        // Reads pending all along: one frame at a time, or batches.
        let send_read = |conn: &Conn| {
            let cmd = if batch == 0 {
                Cmd::ReadFrame(framing.clone())
            } else {
                Cmd::ReadFrames(framing.clone(), batch)
            };
            conn.send(cmd).unwrap();
        };
        send_read(&conn);
        let (mut sent, mut at, mut cut) = (0u64, 0usize, 0usize);
        let mut batch_buf = Vec::new();
        let deadline = Instant::now() + TIMEOUT;
        while got.len() < payloads.len() {
            prop_assert!(Instant::now() < deadline, "stuck after {} frames", got.len());
            // The next piece goes out once the poller has read everything before it, so
            // each cut reaches the framing on its own.
            if at < stream.len() && watcher.stats().bytes_read >= sent {
                let end = (at + cuts[cut % cuts.len()]).min(stream.len());
                cut += 1;
                client.write_all(&stream[at..end]).unwrap();
                sent += (end - at) as u64;
                at = end;
            }
            watcher.wait_io_timeout(&mut batch_buf, Duration::from_millis(1)).unwrap();
            for c in batch_buf.drain(..) {
                prop_assert!(c.is_ok(), "{}", describe(&c));
                match c.op {
                    Op::ReadFrame => got.push(frame_of(&c)),
                    Op::ReadFrames => {
                        let frames = c.buf.frames();
                        prop_assert!(!frames.is_empty() && frames.len() <= batch);
                        prop_assert_eq!(c.n, frames.iter().map(<[u8]>::len).sum::<usize>());
                        // Looked at in place, or taken as `Bytes` each: the same frames.
                        let looked: Vec<Vec<u8>> = frames.iter().map(<[u8]>::to_vec).collect();
                        let taken: Vec<Bytes> = c.buf.into_frames().unwrap().into_iter().collect();
                        prop_assert_eq!(looked.len(), taken.len());
                        for (l, t) in looked.iter().zip(&taken) {
                            prop_assert_eq!(&l[..], &t[..]);
                        }
                        got.extend(taken);
                    }
                    op => prop_assert!(false, "{:?}", op),
                }
                if got.len() < payloads.len() {
                    send_read(&conn);
                }
            }
        }
        prop_assert_eq!(got.len(), payloads.len());
        for (g, p) in got.iter().zip(&payloads) {
            prop_assert_eq!(&g[..], &p[..]);
        }
        // What followed the frames was kept for the connection (or is still in the
        // socket): a plain read gets it.
        client.write_all(&stream[at..]).unwrap();
        conn.send(Cmd::ReadFull(vec![0; 4])).unwrap();
        let c = collect_one(&watcher, TIMEOUT);
        prop_assert!(c.is_ok(), "{}", describe(&c));
        prop_assert_eq!(c.data(), b"TAIL");
    }
}

/// A line longer than the maximum is refused as soon as `max + 1` bytes arrived without a
/// delimiter (not when the line ends), those bytes are dropped, and the connection goes on.
#[test]
fn a_line_too_long_is_refused_as_soon_as_it_is_proven() {
    let (watcher, conn, mut client) = watcher_pair();
    let framing = Framing::lines(8);
    conn.send(Cmd::ReadFrame(framing.clone()).tag(1)).unwrap();
    let mut sent = 0;
    // A peer trickling one byte at a time: up to the maximum, nothing completes.
    for _ in 0..8 {
        send_and_wait_read(&watcher, &mut client, b"x", &mut sent);
    }
    assert_quiet(&watcher, Duration::from_millis(30));
    send_and_wait_read(&watcher, &mut client, b"x", &mut sent);
    let c = collect_one(&watcher, TIMEOUT);
    assert!(
        matches!(c.result, Err(Error::FrameTooLong)),
        "{}",
        describe(&c)
    );
    // The rest of that line is still in the stream; the next frame starts there.
    client.write_all(b"yy\nok\n").unwrap();
    conn.send(Cmd::ReadFrame(framing.clone())).unwrap();
    assert_eq!(frame_of(&collect_one(&watcher, TIMEOUT)), &b"yy"[..]);
    conn.send(Cmd::ReadFrame(framing)).unwrap();
    assert_eq!(frame_of(&collect_one(&watcher, TIMEOUT)), &b"ok"[..]);
}

/// A length prefix announcing more than the maximum is refused at once, with the header
/// dropped; a negative adjusted length is a bad frame.
#[test]
fn a_length_prefix_too_long_or_negative_is_refused_at_the_header() {
    let (watcher, conn, mut client) = watcher_pair();
    conn.send(Cmd::ReadFrame(Framing::length_prefixed(2, 100)))
        .unwrap();
    client.write_all(&[0, 101]).unwrap();
    let c = collect_one(&watcher, TIMEOUT);
    assert!(
        matches!(c.result, Err(Error::FrameTooLong)),
        "{}",
        describe(&c)
    );
    let framing = Framing::length_prefixed(1, 100).length_adjust(-5);
    conn.send(Cmd::ReadFrame(framing)).unwrap();
    client.write_all(&[3]).unwrap();
    let c = collect_one(&watcher, TIMEOUT);
    match &c.result {
        Err(Error::BadFrame(why)) => assert!(why.contains("negative"), "{why}"),
        _ => panic!("{}", describe(&c)),
    }
}

/// End of stream inside a frame completes the read with `Eof` and the partial bytes.
#[test]
fn end_of_stream_inside_a_frame_gives_the_partial_bytes() {
    let (watcher, conn, mut client) = watcher_pair();
    conn.send(Cmd::ReadFrame(Framing::lines(100)).tag(7))
        .unwrap();
    let mut sent = 0;
    send_and_wait_read(&watcher, &mut client, b"half a li", &mut sent);
    drop(client);
    let c = collect_one(&watcher, TIMEOUT);
    assert!(c.is_eof(), "{}", describe(&c));
    assert_eq!((c.tag, c.n, c.data()), (7, 9, &b"half a li"[..]));
    // And with nothing begun, no bytes.
    conn.send(Cmd::ReadFrame(Framing::lines(100))).unwrap();
    let c = collect_one(&watcher, TIMEOUT);
    assert!(c.is_eof() && c.n == 0, "{}", describe(&c));
}

/// A reset inside a frame fails the framed read with the socket's error; as on the socket,
/// the next read sees end of stream, and gets the bytes of the unfinished frame with it:
/// none is lost.
#[test]
fn a_reset_inside_a_frame_fails_the_read() {
    let (watcher, conn, mut client) = watcher_pair();
    conn.send(Cmd::ReadFrame(Framing::lines(100)).tag(1))
        .unwrap();
    conn.send(Cmd::ReadFrame(Framing::lines(100)).tag(2))
        .unwrap();
    let mut sent = 0;
    send_and_wait_read(&watcher, &mut client, b"half a li", &mut sent);
    set_linger_zero(&client);
    drop(client);
    let got = collect(&watcher, 2, TIMEOUT);
    assert_eq!(got[0].tag, 1);
    match &got[0].result {
        Err(Error::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
        _ => panic!("{}", describe(&got[0])),
    }
    assert!(got[1].is_eof(), "{}", describe(&got[1]));
    assert_eq!((got[1].tag, got[1].data()), (2, &b"half a li"[..]));
}

struct Panics;

impl Decoder for Panics {
    fn decode(&self, buf: &[u8]) -> Decoded {
        if buf.contains(&b'!') {
            panic!("a decoder bug");
        }
        Decoded::NeedMore(1)
    }
}

/// A decoder that panics or says `Invalid` completes its read with `BadFrame`; the watcher
/// and its other connections go on.
#[test]
fn a_decoder_that_panics_or_refuses_fails_its_read_only() {
    let watcher = Watcher::new().unwrap();
    let (mut a_client, a) = tcp_pair();
    let (mut b_client, b) = tcp_pair();
    let a = watcher.register(a).unwrap();
    let b = watcher.register(b).unwrap();
    a.send(Cmd::ReadFrame(Framing::custom(Arc::new(Panics), 100)))
        .unwrap();
    b.send(Cmd::ReadFrame(Framing::custom(Arc::new(Angles), 100)))
        .unwrap();
    a_client.write_all(b"abc!").unwrap();
    b_client.write_all(b"nope").unwrap();
    let mut got = collect(&watcher, 2, TIMEOUT);
    got.sort_by_key(|c| c.conn != a);
    match &got[0].result {
        Err(Error::BadFrame(why)) => assert!(why.contains("a decoder bug"), "{why}"),
        _ => panic!("{}", describe(&got[0])),
    }
    assert!(matches!(&got[1].result, Err(Error::BadFrame(_))));
    assert!(!watcher.is_closed());
    b.send(Cmd::ReadFrame(Framing::custom(Arc::new(Angles), 100)))
        .unwrap();
    b_client.write_all(b"<fine>").unwrap();
    assert_eq!(frame_of(&collect_one(&watcher, TIMEOUT)), &b"fine"[..]);
}

/// Headers as lines, then a body of known length: the bytes read past the headers (the
/// whole request arrived in one read) are served to the body's `ReadFull`, then a plain
/// `Read` and an internal read get what follows, in order.
#[test]
fn a_protocol_switches_framing_mid_stream() {
    let (watcher, conn, mut client) = watcher_pair();
    let lines = Framing::lines(100).strip_cr(true);
    client
        .write_all(b"POST / x\r\nContent-Length: 5\r\n\r\nhelloNEXT")
        .unwrap();
    let mut headers = Vec::new();
    loop {
        conn.send(Cmd::ReadFrame(lines.clone())).unwrap();
        let line = frame_of(&collect_one(&watcher, TIMEOUT));
        if line.is_empty() {
            break;
        }
        headers.push(line);
    }
    assert_eq!(headers, [&b"POST / x"[..], &b"Content-Length: 5"[..]]);
    conn.send(Cmd::ReadFull(vec![0; 5])).unwrap();
    assert_eq!(collect_one(&watcher, TIMEOUT).data(), b"hello");
    conn.send(Cmd::Read(vec![0; 2])).unwrap();
    assert_eq!(collect_one(&watcher, TIMEOUT).data(), b"NE");
    conn.send(Cmd::ReadInternal).unwrap();
    assert_eq!(collect_one(&watcher, TIMEOUT).data(), b"XT");
}

/// Deadlines apply per frame: a frame begun and not finished by its deadline ends that read;
/// its bytes stay, and the next framed read completes the frame when the rest comes.
#[test]
fn a_deadline_ends_one_frame_and_keeps_its_bytes() {
    let (watcher, conn, mut client) = watcher_pair();
    let framing = Framing::lines(100);
    let start = Instant::now();
    conn.send(Cmd::ReadFrame(framing.clone()).timeout(Duration::from_millis(100)))
        .unwrap();
    let mut sent = 0;
    send_and_wait_read(&watcher, &mut client, b"slow ", &mut sent);
    let c = collect_one(&watcher, TIMEOUT);
    assert!(matches!(c.result, Err(Error::Deadline)), "{}", describe(&c));
    assert!(start.elapsed() >= Duration::from_millis(100));
    conn.send(Cmd::ReadFrame(framing)).unwrap();
    client.write_all(b"line\n").unwrap();
    assert_eq!(frame_of(&collect_one(&watcher, TIMEOUT)), &b"slow line"[..]);
}

/// Many small frames that arrived together complete in batches of at most `max`.
#[test]
fn read_frames_takes_every_whole_frame_up_to_its_maximum() {
    let (watcher, conn, mut client) = watcher_pair();
    let framing = Framing::lines(64);
    let text: String = (0..100).map(|i| format!("line {i}\n")).collect();
    // One write on loopback: the whole text is in the socket's receive queue when
    // write_all returns, so the first read sees all of it.
    client.write_all(text.as_bytes()).unwrap();
    let mut frames = Vec::new();
    let mut counts = Vec::new();
    while frames.len() < 100 {
        conn.send(Cmd::ReadFrames(framing.clone(), 64)).unwrap();
        let c = collect_one(&watcher, TIMEOUT);
        assert!(c.is_ok(), "{}", describe(&c));
        counts.push(c.buf.frames().len());
        let f = c.buf.frames();
        assert_eq!(f.bytes(f.len() - 1).as_deref(), f.get(f.len() - 1));
        assert!(f.get(f.len()).is_none() && f.bytes(f.len()).is_none());
        frames.extend(f.iter().map(Bytes::copy_from_slice));
    }
    assert_eq!(counts, [64, 36]);
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(&f[..], format!("line {i}").as_bytes());
    }
}

/// A read of another kind sent behind a framed read waiting for the rest of a frame is
/// served in order: the frame first, when it is whole.
#[test]
fn reads_behind_a_waiting_frame_keep_their_order() {
    let (watcher, conn, mut client) = watcher_pair();
    conn.send(Cmd::ReadFrame(Framing::length_prefixed(1, 10)).tag(1))
        .unwrap();
    conn.send(Cmd::Read(vec![0; 16]).tag(2)).unwrap();
    let mut sent = 0;
    send_and_wait_read(&watcher, &mut client, &[3, b'a'], &mut sent);
    assert_quiet(&watcher, Duration::from_millis(30));
    client.write_all(b"bcdef").unwrap();
    let got = collect(&watcher, 2, TIMEOUT);
    assert_eq!((got[0].tag, got[0].data()), (1, &b"abc"[..]));
    assert_eq!((got[1].tag, got[1].data()), (2, &b"def"[..]));
}
