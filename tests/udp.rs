//! Datagram sockets: UDP and Unix datagram sockets, connected or not. One completion per
//! datagram, the sender's address on reads, `SendTo`, truncation said, errors per datagram,
//! the stream-only commands refused. Run on each engine by `scripts/test.sh`.

mod util;

use std::net::{SocketAddr, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use proactor::{Cmd, Error, Op, PeerAddr, SendError, Watcher};
use util::*;

/// A watcher with an unconnected UDP socket registered, and a client socket.
fn udp_pair() -> (Watcher, proactor::Conn, SocketAddr, UdpSocket) {
    let watcher = Watcher::new().unwrap();
    let server = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = server.local_addr().unwrap();
    let conn = watcher.register(server).unwrap();
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client.set_read_timeout(Some(TIMEOUT)).unwrap();
    (watcher, conn, addr, client)
}

fn recv(client: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = vec![0; 70_000];
    let (n, from) = client.recv_from(&mut buf).expect("a datagram");
    buf.truncate(n);
    (buf, from)
}

#[test]
fn each_read_gets_one_datagram_and_its_sender_and_send_to_answers() {
    let (watcher, conn, addr, client) = udp_pair();
    let me = PeerAddr::from(client.local_addr().unwrap());
    for payload in [&b"first"[..], b"", b"third, longer"] {
        client.send_to(payload, addr).unwrap();
    }
    // One read of each kind; the third datagram waits in the socket for the next read.
    conn.send(Cmd::Read(vec![0; 100]).tag(1)).unwrap();
    conn.send(Cmd::ReadInternal.tag(2)).unwrap();
    let got = collect(&watcher, 2, TIMEOUT);
    assert_eq!(
        (got[0].tag, got[0].op, got[0].data()),
        (1, Op::Read, &b"first"[..])
    );
    assert_eq!((got[1].tag, got[1].n), (2, 0), "{}", describe(&got[1]));
    assert!(
        got[1].is_ok(),
        "an empty datagram is a datagram: {}",
        describe(&got[1])
    );
    for c in &got {
        assert_eq!(c.peer.as_ref(), Some(&me));
    }
    conn.send(Cmd::ReadInternal).unwrap();
    let c = collect_one(&watcher, TIMEOUT);
    assert_eq!(c.data(), b"third, longer");
    // Answer each by address: three datagrams, in order, empty one included.
    for payload in ["a", "", "ccc"] {
        conn.send(Cmd::SendTo(me.clone(), payload)).unwrap();
    }
    let sent = collect(&watcher, 3, TIMEOUT);
    for (c, len) in sent.iter().zip([1, 0, 3]) {
        assert!(c.is_ok() && c.op == Op::SendTo, "{}", describe(c));
        assert_eq!((c.n, c.peer.as_ref()), (len, Some(&me)));
    }
    let server = PeerAddr::from(addr);
    for want in [&b"a"[..], b"", b"ccc"] {
        let (got, from) = recv(&client);
        assert_eq!((&got[..], PeerAddr::from(from)), (want, server.clone()));
    }
}

#[test]
fn a_datagram_longer_than_the_buffer_is_cut_and_says_so() {
    let (watcher, conn, addr, client) = udp_pair();
    let long: Vec<u8> = (0..100u8).collect();
    client.send_to(&long, addr).unwrap();
    client.send_to(b"next", addr).unwrap();
    conn.send(Cmd::Read(vec![0; 10])).unwrap();
    let c = collect_one(&watcher, TIMEOUT);
    match c.result {
        Err(Error::Truncated { len }) => {
            // Linux says how long it was.
            #[cfg(target_os = "linux")]
            assert_eq!(len, Some(100));
            let _ = len;
        }
        _ => panic!("{}", describe(&c)),
    }
    assert_eq!((c.n, c.data()), (10, &long[..10]));
    // The rest of it is gone, not served to the next read.
    conn.send(Cmd::Read(vec![0; 10])).unwrap();
    assert_eq!(collect_one(&watcher, TIMEOUT).data(), b"next");
}

#[test]
fn writes_on_a_connected_socket_are_datagrams_never_merged() {
    let watcher = Watcher::new().unwrap();
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(TIMEOUT)).unwrap();
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.connect(peer.local_addr().unwrap()).unwrap();
    let socket_addr = socket.local_addr().unwrap();
    let conn = watcher.register(socket).unwrap();
    let sizes = [1usize, 1200, 0, 7, 65_507, 3];
    for (i, &n) in sizes.iter().enumerate() {
        conn.send(Cmd::Write(vec![i as u8; n]).tag(i as u64))
            .unwrap();
    }
    let done = collect(&watcher, sizes.len(), TIMEOUT);
    for (c, (i, &n)) in done.iter().zip(sizes.iter().enumerate()) {
        assert!(
            c.is_ok() && c.tag == i as u64 && c.n == n,
            "{}",
            describe(c)
        );
    }
    for (i, &n) in sizes.iter().enumerate() {
        let (got, _) = recv(&peer);
        assert_eq!(got, vec![i as u8; n]);
    }
    // Reads on a connected socket: the peer's datagrams.
    peer.send_to(b"back", socket_addr).unwrap();
    conn.send(Cmd::Read(vec![0; 16])).unwrap();
    let c = collect_one(&watcher, TIMEOUT);
    assert_eq!(c.data(), b"back");
    assert_eq!(c.peer, Some(peer.local_addr().unwrap().into()));
}

#[test]
fn a_datagram_too_large_fails_alone_and_the_next_goes() {
    let watcher = Watcher::new().unwrap();
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(TIMEOUT)).unwrap();
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.connect(peer.local_addr().unwrap()).unwrap();
    let conn = watcher.register(socket).unwrap();
    conn.send(Cmd::Write(vec![0; 70_000]).tag(1)).unwrap();
    conn.send(Cmd::Write("fits").tag(2)).unwrap();
    let got = collect(&watcher, 2, TIMEOUT);
    match &got[0].result {
        Err(Error::Io(e)) => assert_eq!(e.raw_os_error(), Some(libc::EMSGSIZE)),
        _ => panic!("{}", describe(&got[0])),
    }
    assert!(got[1].is_ok(), "{}", describe(&got[1]));
    assert_eq!(recv(&peer).0, b"fits");
}

#[test]
fn stream_commands_are_refused_on_datagram_sockets_and_send_to_on_streams() {
    let (watcher, conn, _addr, _client) = udp_pair();
    let refused = [
        Cmd::ReadFull(vec![0; 4]),
        Cmd::ReadFrame(proactor::Framing::lines(10)),
        Cmd::ReadFrames(proactor::Framing::lines(10), 4),
        Cmd::Accept,
        Cmd::Shutdown,
    ];
    let n = refused.len();
    for cmd in refused {
        conn.send(cmd).unwrap();
    }
    for c in collect(&watcher, n, TIMEOUT) {
        assert!(
            matches!(c.result, Err(Error::Unsupported(_))),
            "{}",
            describe(&c)
        );
    }
    // An empty write is an empty datagram, not refused as on a stream.
    assert!(!matches!(
        conn.send(Cmd::Write("")),
        Err(SendError::EmptyBuffer(_))
    ));
    let (w, tcp, _client) = watcher_pair();
    tcp.send(Cmd::SendTo(
        "127.0.0.1:9".parse::<SocketAddr>().unwrap(),
        "x",
    ))
    .unwrap();
    let c = collect_one(&w, TIMEOUT);
    assert!(
        matches!(c.result, Err(Error::Unsupported(_))),
        "{}",
        describe(&c)
    );
    assert_eq!(c.buf.as_slice(), b"x");
}

/// A UDP socket connected to a port with nobody on it (bound, then closed): its sends bring
/// back ICMP port-unreachable errors.
fn connected_to_a_closed_port() -> UdpSocket {
    let gone = UdpSocket::bind("127.0.0.1:0").unwrap();
    let gone_addr = gone.local_addr().unwrap();
    drop(gone);
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.connect(gone_addr).unwrap();
    socket
}

#[test]
fn an_icmp_error_fails_one_command_and_the_socket_stays_usable() {
    let watcher = Watcher::new().unwrap();
    let socket = connected_to_a_closed_port();
    let conn = watcher.register(socket).unwrap();
    conn.send(Cmd::Read(vec![0; 8]).tag(1)).unwrap();
    conn.send(Cmd::Write("ping").tag(2)).unwrap();
    // The write goes; the port-unreachable that comes back fails the pending read.
    let got = collect(&watcher, 2, TIMEOUT);
    let by_tag = |t| got.iter().find(|c| c.tag == t).unwrap();
    assert!(by_tag(2).is_ok(), "{}", describe(by_tag(2)));
    match &by_tag(1).result {
        Err(Error::Io(e)) => assert_eq!(e.raw_os_error(), Some(libc::ECONNREFUSED)),
        _ => panic!("{}", describe(by_tag(1))),
    }
    // Still usable: a read with a deadline ends by it, a write still goes out.
    conn.send(Cmd::Read(vec![0; 8]).timeout(Duration::from_millis(50)))
        .unwrap();
    let c = collect_one(&watcher, TIMEOUT);
    assert!(matches!(c.result, Err(Error::Deadline)), "{}", describe(&c));
    conn.send(Cmd::Write("again")).unwrap();
    let c = collect_one(&watcher, TIMEOUT);
    // (The kernel may report the second unreachable on this send, or not.)
    assert!(
        c.is_ok()
            || matches!(&c.result, Err(Error::Io(e)) if e.raw_os_error() == Some(libc::ECONNREFUSED)),
        "{}",
        describe(&c)
    );
}

#[test]
fn many_reads_pending_take_a_burst_in_order_one_datagram_each() {
    let (watcher, conn, addr, client) = udp_pair();
    const N: usize = 200;
    for i in 0..N {
        let cmd = if i % 2 == 0 {
            Cmd::ReadInternal
        } else {
            Cmd::Read(vec![0; 64])
        };
        conn.send(cmd.tag(i as u64)).unwrap();
    }
    for i in 0..N {
        client
            .send_to(format!("dgram {i}").as_bytes(), addr)
            .unwrap();
    }
    let got = collect(&watcher, N, TIMEOUT);
    for (i, c) in got.iter().enumerate() {
        assert_eq!(c.tag, i as u64);
        assert_eq!(c.data(), format!("dgram {i}").as_bytes(), "{}", describe(c));
    }
    let s = watcher.stats();
    assert_eq!(s.reads_in_flight, 0);
}

#[test]
fn deadlines_free_and_detach_hold_for_datagram_sockets() {
    let (watcher, conn, addr, client) = udp_pair();
    conn.send(Cmd::ReadInternal.timeout(Duration::from_millis(30)).tag(1))
        .unwrap();
    let c = collect_one(&watcher, TIMEOUT);
    assert!(matches!(c.result, Err(Error::Deadline)), "{}", describe(&c));
    // A datagram that arrives later goes to the next read.
    client.send_to(b"late", addr).unwrap();
    conn.send(Cmd::ReadInternal.tag(2)).unwrap();
    assert_eq!(collect_one(&watcher, TIMEOUT).data(), b"late");
    // Detach with a read pending: the read is freed, the socket comes back and works.
    conn.send(Cmd::Read(vec![0; 8]).tag(3)).unwrap();
    conn.send(Cmd::Detach.tag(4)).unwrap();
    let got = collect(&watcher, 2, TIMEOUT);
    assert!(
        matches!(got[0].result, Err(Error::Freed)),
        "{}",
        describe(&got[0])
    );
    let fd = got
        .into_iter()
        .nth(1)
        .unwrap()
        .buf
        .into_fd()
        .expect("the socket");
    let socket = UdpSocket::from(fd);
    socket.set_nonblocking(false).unwrap();
    socket.set_read_timeout(Some(TIMEOUT)).unwrap();
    client.send_to(b"after", addr).unwrap();
    let mut buf = [0; 16];
    let n = socket.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"after");
    assert!(matches!(watcher.stats().connections, 0));
}

#[test]
fn unix_datagrams_carry_paths_and_unnamed_senders() {
    let dir = std::env::temp_dir().join(format!("proactor-udp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let server_path = dir.join("server.sock");
    let client_path = dir.join("client.sock");
    let _ = std::fs::remove_file(&server_path);
    let _ = std::fs::remove_file(&client_path);
    let watcher = Watcher::new().unwrap();
    let conn = watcher
        .register(UnixDatagram::bind(&server_path).unwrap())
        .unwrap();
    let named = UnixDatagram::bind(&client_path).unwrap();
    named.set_read_timeout(Some(TIMEOUT)).unwrap();
    let unnamed = UnixDatagram::unbound().unwrap();
    named.send_to(b"from a path", &server_path).unwrap();
    unnamed.send_to(b"from nowhere", &server_path).unwrap();
    conn.send(Cmd::ReadInternal).unwrap();
    conn.send(Cmd::ReadInternal).unwrap();
    let got = collect(&watcher, 2, TIMEOUT);
    assert_eq!(got[0].data(), b"from a path");
    assert_eq!(got[0].peer, Some(PeerAddr::Unix(client_path.clone())));
    assert_eq!(got[1].peer, Some(PeerAddr::UnixUnnamed));
    // Answer by path.
    conn.send(Cmd::SendTo(client_path.as_path(), "answer"))
        .unwrap();
    assert!(collect_one(&watcher, TIMEOUT).is_ok());
    let mut buf = [0; 16];
    let n = named.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"answer");
    // Sending to an unnamed peer is an error of that command.
    conn.send(Cmd::SendTo(PeerAddr::UnixUnnamed, "x")).unwrap();
    let c = collect_one(&watcher, TIMEOUT);
    assert!(matches!(c.result, Err(Error::Io(_))), "{}", describe(&c));
    drop(watcher);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A peer that does not read fills the socket's queue (a Unix datagram pair: sends block
/// when the receiver's queue is full, where UDP on loopback would drop): the writes wait
/// for room, then every datagram goes, in order, each whole.
#[test]
fn a_full_send_queue_waits_then_every_datagram_goes() {
    let watcher = Watcher::new().unwrap();
    let (ours, peer) = UnixDatagram::pair().unwrap();
    peer.set_read_timeout(Some(TIMEOUT)).unwrap();
    let conn = watcher.register(ours).unwrap();
    const N: usize = 300;
    for i in 0..N {
        conn.send(Cmd::Write(vec![(i % 251) as u8; 1000]).tag(i as u64))
            .unwrap();
    }
    // Some go, then the queue is full and the rest wait: their completions stop coming.
    let mut done = Vec::new();
    loop {
        let before = done.len();
        watcher
            .wait_io_timeout(&mut done, Duration::from_millis(50))
            .unwrap();
        if done.len() == before {
            break;
        }
    }
    assert!(
        !done.is_empty() && done.len() < N,
        "{} of {N} went",
        done.len()
    );
    assert_eq!(watcher.stats().writes_in_flight as usize, N - done.len());
    // A Unix datagram socket has no GSO: it would take the batch for one datagram.
    assert_eq!(watcher.stats().datagrams_segmented, 0);
    let mut buf = [0u8; 2000];
    for i in 0..N {
        let n = peer.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], &vec![(i % 251) as u8; 1000][..], "datagram {i}");
    }
    let rest = N - done.len();
    done.extend(collect(&watcher, rest, TIMEOUT));
    for (i, c) in done.iter().enumerate() {
        assert!(
            c.is_ok() && c.n == 1000 && c.tag == i as u64,
            "{}",
            describe(c)
        );
    }
}

/// The datagrams of the GSO tests: (peer index, length), in the order they are queued. Runs
/// of equal sizes to one peer (what a GSO send carries), a shorter one ending a run, a
/// longer one starting the next, peers interleaved, empty datagrams, and a run longer than
/// one send takes (64 segments).
fn gso_plan() -> Vec<(usize, usize)> {
    // (Small datagrams, under 100 per peer: the peers read only after every send completed,
    // and what a socket's receive buffer cannot hold the kernel drops.)
    let mut plan = Vec::new();
    plan.extend(std::iter::repeat((0, 100)).take(20));
    plan.push((0, 50)); // ends the run
    plan.push((0, 100)); // a new one: longer than the last
    plan.extend(std::iter::repeat((1, 100)).take(3)); // another peer
    plan.extend(std::iter::repeat((0, 120)).take(70)); // over 64 segments
    plan.extend([(0, 0), (0, 0), (1, 0)]); // empty datagrams, alone each
    plan.extend(std::iter::repeat((1, 60)).take(10));
    plan.push((1, 1300));
    plan
}

/// A peer of the GSO tests: it reads only once every send completed, so its receive buffer
/// is made large (1 MiB asked; the kernel caps it at `net.core.rmem_max`) for what a plan
/// queues there.
fn gso_peer(ip: &str) -> UdpSocket {
    let peer = UdpSocket::bind(ip).unwrap();
    peer.set_read_timeout(Some(TIMEOUT)).unwrap();
    set_opt(&peer, libc::SOL_SOCKET, libc::SO_RCVBUF, &(1 << 20));
    peer
}

/// Queues `plan` on `conn` (an inline watcher's: every write is queued before the poller
/// looks), each datagram's first bytes its index; checks that each completes once, in
/// order, and that each peer gets exactly its datagrams, whole, alone and in order.
fn send_plan(
    watcher: &Watcher,
    conn: &proactor::Conn,
    peers: &[UdpSocket],
    plan: &[(usize, usize)],
) {
    for (i, &(to, len)) in plan.iter().enumerate() {
        let mut b = vec![(i % 251) as u8; len];
        b.iter_mut()
            .zip((i as u32).to_le_bytes())
            .for_each(|(b, x)| *b = x);
        let to = PeerAddr::from(peers[to].local_addr().unwrap());
        conn.send(Cmd::SendTo(to, b).tag(i as u64)).unwrap();
    }
    let done = collect(watcher, plan.len(), TIMEOUT);
    for (i, c) in done.iter().enumerate() {
        assert!(
            c.is_ok() && c.tag == i as u64 && c.n == plan[i].1,
            "{}",
            describe(c)
        );
    }
    for (p, peer) in peers.iter().enumerate() {
        for (i, &(_, len)) in plan.iter().enumerate().filter(|(_, &(to, _))| to == p) {
            let (got, _) = recv(peer);
            let mut want = vec![(i % 251) as u8; len];
            want.iter_mut()
                .zip((i as u32).to_le_bytes())
                .for_each(|(b, x)| *b = x);
            assert_eq!(got, want, "peer {p}, datagram {i}");
        }
        peer.set_nonblocking(true).unwrap();
        let extra = peer.recv_from(&mut [0; 16]);
        assert!(
            extra.is_err(),
            "peer {p} got a datagram too many: {extra:?}"
        );
        peer.set_nonblocking(false).unwrap(); // (the next plan's reads wait again)
    }
}

#[test]
fn queued_datagrams_to_one_peer_go_in_gso_sends_and_arrive_one_by_one() {
    for (ip, gso) in [
        ("127.0.0.1:0", true),
        ("[::1]:0", true),
        ("127.0.0.1:0", false),
    ] {
        let watcher = Watcher::builder()
            .inline(true)
            .udp_gso(gso)
            .build()
            .unwrap();
        let conn = watcher.register(UdpSocket::bind(ip).unwrap()).unwrap();
        let peers: Vec<UdpSocket> = (0..2).map(|_| gso_peer(ip)).collect();
        send_plan(&watcher, &conn, &peers, &gso_plan());
        let segmented = watcher.stats().datagrams_segmented;
        if gso && cfg!(target_os = "linux") {
            // The runs: 20 + 1 (the 50 ends it), 3, 64 + 6, 10 + 1 (the 1,300 is longer:
            // alone); the 100 between and the empty ones alone.
            assert_eq!(segmented, 21 + 3 + 70 + 10, "{ip}");
        } else {
            assert_eq!(segmented, 0, "{ip}, gso {gso}");
        }
        // One send carries at most 60,000 bytes: five datagrams of 12,500 (62,500 bytes, a
        // size a UDP datagram could have) go as four and one.
        send_plan(&watcher, &conn, &peers, &[(0, 12_500); 5]);
        let more = watcher.stats().datagrams_segmented - segmented;
        let want = if gso && cfg!(target_os = "linux") {
            4
        } else {
            0
        };
        assert_eq!(more, want, "{ip}, gso {gso}");
    }
}

#[test]
#[cfg(target_os = "linux")] // (SO_NO_CHECK, and GSO, are Linux's)
fn a_socket_that_refuses_gso_sends_every_datagram_alone_and_loses_none() {
    let watcher = Watcher::builder().inline(true).build().unwrap();
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    // No checksums: Linux refuses GSO sends on such a socket (EINVAL), which the poller
    // learns from the first one it tries.
    set_opt(&socket, libc::SOL_SOCKET, libc::SO_NO_CHECK, &1);
    let conn = watcher.register(socket).unwrap();
    let peers: Vec<UdpSocket> = (0..2).map(|_| gso_peer("127.0.0.1:0")).collect();
    send_plan(&watcher, &conn, &peers, &gso_plan());
    assert_eq!(watcher.stats().datagrams_segmented, 0);
}

#[test]
fn an_icmp_error_met_by_a_gso_send_fails_its_first_write_only() {
    let watcher = Watcher::builder().inline(true).build().unwrap();
    let socket = connected_to_a_closed_port();
    let watch = socket.try_clone().unwrap();
    let conn = watcher.register(socket).unwrap();
    conn.send(Cmd::Write("ping")).unwrap();
    assert!(collect_one(&watcher, TIMEOUT).is_ok());
    // Wait until the port-unreachable has come back: the socket reports an error.
    let mut pfd = libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(&watch),
        events: 0,
        revents: 0,
    };
    // SAFETY: one live pollfd.
    let r = unsafe { libc::poll(&mut pfd, 1, TIMEOUT.as_millis() as libc::c_int) };
    assert!(
        r == 1 && pfd.revents & libc::POLLERR != 0,
        "no ICMP error came back"
    );
    // Ten equal datagrams, one GSO send: the error is the socket's, so it fails the first
    // write, as it would have failed the first datagram sent alone; the rest go.
    for i in 0..10u64 {
        conn.send(Cmd::Write(vec![i as u8; 100]).tag(i)).unwrap();
    }
    let got = collect(&watcher, 10, TIMEOUT);
    match &got[0].result {
        Err(Error::Io(e)) => assert_eq!(e.raw_os_error(), Some(libc::ECONNREFUSED)),
        _ => panic!("{}", describe(&got[0])),
    }
    for (i, c) in got.iter().enumerate().skip(1) {
        assert!(c.is_ok() && c.tag == i as u64, "{}", describe(c));
    }
    if cfg!(target_os = "linux") {
        assert_eq!(watcher.stats().datagrams_segmented, 9);
    }
}
