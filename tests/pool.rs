//! Watcher pools (issue 7): spreading connections, the shared MPMC mailbox, per-watcher
//! mailboxes, per-connection routes (`register_with`), pinned pollers.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use proactor::{Cmd, Completion, Op, Pool, Watcher};

#[path = "common/limits.rs"]
mod limits;

const LONG: Duration = Duration::from_secs(10);

fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (s, _) = l.accept().unwrap();
    (c, s)
}

fn take(rx: &proactor::flume::Receiver<Completion>, n: usize) -> Vec<Completion> {
    let deadline = Instant::now() + LONG;
    (0..n)
        .map(|i| {
            rx.recv_deadline(deadline)
                .unwrap_or_else(|e| panic!("completion {i} of {n}: {e}"))
        })
        .collect()
}

/// Polls `f` until it returns true (stats are published once per poller round).
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + LONG;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::yield_now();
    }
}

#[test]
fn register_spreads_evenly_over_the_watchers() {
    let pool = Pool::builder().watchers(3).build().unwrap();
    let mut keep = Vec::new();
    for _ in 0..30 {
        let (client, server) = pair();
        keep.push((client, pool.register(server).unwrap()));
    }
    eventually("30 connections registered", || {
        pool.watchers()
            .iter()
            .map(|w| w.stats().connections)
            .sum::<u64>()
            == 30
    });
    let per: Vec<u64> = pool
        .watchers()
        .iter()
        .map(|w| w.stats().connections)
        .collect();
    assert_eq!(per, vec![10, 10, 10]);
}

#[test]
fn accepted_connections_go_to_the_least_loaded_watcher() {
    let pool = Pool::builder().watchers(2).build().unwrap();
    let std_listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = std_listener.local_addr().unwrap();
    let listener = pool.listen(std_listener).unwrap(); // lives on watcher 0
    const N: usize = 41;
    for _ in 0..N {
        listener.send(Cmd::Accept).unwrap();
    }
    let mut clients: Vec<TcpStream> = (0..N).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let mailbox = pool.mailbox().unwrap();
    let mut conns = Vec::new();
    for c in take(&mailbox, N) {
        assert_eq!(c.op, Op::Accept);
        assert!(c.is_ok(), "{:?}", c.result);
        conns.push(c.buf.into_accepted().unwrap().0);
    }
    eventually("all connections registered", || {
        pool.watchers()
            .iter()
            .map(|w| w.stats().connections)
            .sum::<u64>()
            == N as u64 + 1
    });
    let per: Vec<u64> = pool
        .watchers()
        .iter()
        .map(|w| w.stats().connections)
        .collect();
    // 42 sockets (the listener included) split evenly: 21 each.
    assert_eq!(per, vec![21, 21], "listener + accepted per watcher");
    // The accepted connections work wherever they landed.
    for (i, conn) in conns.iter().enumerate() {
        conn.send(Cmd::Write(vec![i as u8; 3])).unwrap();
    }
    assert!(take(&mailbox, N)
        .iter()
        .all(|c| c.op == Op::Write && c.is_ok()));
    let mut seen = HashSet::new();
    for client in &mut clients {
        let mut b = [0; 3];
        client.read_exact(&mut b).unwrap();
        assert!(b[0] == b[1] && b[1] == b[2]);
        seen.insert(b[0]);
    }
    assert_eq!(seen.len(), N);
}

#[test]
fn shared_mailbox_feeds_several_worker_threads() {
    const CONNS: usize = 200;
    const ROUNDS: usize = 20;
    let pool = Pool::builder().watchers(2).build().unwrap();
    let mut clients = Vec::new();
    for _ in 0..CONNS {
        let (client, server) = pair();
        let conn = pool.register(server).unwrap();
        conn.send(Cmd::ReadInternal).unwrap();
        client.set_read_timeout(Some(LONG)).unwrap(); // a lost echo fails, not hangs
        clients.push(client);
    }
    let total = CONNS * ROUNDS;
    let deadline = Instant::now() + 6 * LONG;
    let done = std::sync::atomic::AtomicUsize::new(0);
    let per_worker: Vec<usize> = std::thread::scope(|s| {
        // Three workers echo whatever any watcher completed.
        let workers: Vec<_> = (0..3)
            .map(|_| {
                let (rx, done) = (pool.mailbox().unwrap(), &done);
                s.spawn(move || {
                    let mut handled = 0;
                    while done.load(std::sync::atomic::Ordering::SeqCst) < total {
                        assert!(Instant::now() < deadline, "the echoes never all came");
                        let Ok(c) = rx.recv_timeout(Duration::from_millis(50)) else {
                            continue;
                        };
                        handled += 1;
                        match c.op {
                            Op::Read => {
                                assert!(c.is_ok(), "{:?}", c.result);
                                c.conn.send(Cmd::Write(c.buf.into_bytes())).unwrap();
                            }
                            Op::Write => {
                                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                c.conn.send(Cmd::ReadInternal).unwrap();
                            }
                            op => panic!("unexpected {op:?}"),
                        }
                    }
                    handled
                })
            })
            .collect();
        for round in 0..ROUNDS {
            for (i, client) in clients.iter_mut().enumerate() {
                let msg = format!("{i:05}-{round:03}");
                client.write_all(msg.as_bytes()).unwrap();
                let mut back = [0; 9];
                client.read_exact(&mut back).unwrap();
                assert_eq!(&back, msg.as_bytes());
            }
        }
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    assert_eq!(done.into_inner(), total);
    // Several workers took part: the mailbox is shared, not one per worker. (With 8,000
    // completions, one worker taking them all would mean the others never got to wait.)
    let busy = per_worker.iter().filter(|&&n| n > 0).count();
    assert!(busy >= 2, "completions per worker: {per_worker:?}");
}

#[test]
fn per_watcher_mailboxes_keep_completions_with_their_watcher() {
    let pool = Pool::builder()
        .watchers(2)
        .per_watcher_mailboxes()
        .build()
        .unwrap();
    let (w0, w1) = (&pool.watchers()[0], &pool.watchers()[1]);
    let (mut c0, s0) = pair();
    let (mut c1, s1) = pair();
    let a = w0.register(s0).unwrap();
    let b = w1.register(s1).unwrap();
    a.send(Cmd::ReadInternal.tag(0)).unwrap();
    b.send(Cmd::ReadInternal.tag(1)).unwrap();
    c0.write_all(b"zero").unwrap();
    c1.write_all(b"one").unwrap();
    let got0 = take(&w0.mailbox(), 1);
    let got1 = take(&w1.mailbox(), 1);
    assert_eq!((got0[0].tag, got0[0].data()), (0, &b"zero"[..]));
    assert_eq!((got1[0].tag, got1[0].data()), (1, &b"one"[..]));
    assert!(w0.mailbox().is_empty() && w1.mailbox().is_empty());
}

#[test]
fn register_with_routes_one_connection_to_its_own_mailbox() {
    let w = Watcher::new().unwrap();
    let (lobby_tx, lobby_rx) = proactor::flume::unbounded();
    let (mut routed_client, routed) = pair();
    let (mut plain_client, plain) = pair();
    let routed = w.register_with(routed, lobby_tx.clone()).unwrap();
    let plain = w.register(plain).unwrap();
    routed.send(Cmd::ReadInternal.tag(1)).unwrap();
    plain.send(Cmd::ReadInternal.tag(2)).unwrap();
    routed_client.write_all(b"lobby").unwrap();
    plain_client.write_all(b"main").unwrap();
    let lobby = take(&lobby_rx, 1);
    let main = take(&w.mailbox(), 1);
    assert_eq!((lobby[0].tag, lobby[0].data()), (1, &b"lobby"[..]));
    assert_eq!((main[0].tag, main[0].data()), (2, &b"main"[..]));
    assert!(lobby_rx.is_empty() && w.mailbox().is_empty());
    // Closing the watcher completes the routed connection's pending work on its route.
    routed.send(Cmd::ReadInternal.tag(3)).unwrap();
    w.close();
    let closed = take(&lobby_rx, 1);
    assert_eq!(closed[0].tag, 3);
    assert!(matches!(
        closed[0].result,
        Err(proactor::Error::WatcherClosed)
    ));
}

#[cfg(target_os = "linux")]
#[test]
fn pinned_pollers_run() {
    let pool = Pool::builder()
        .watchers(2)
        .pin_pollers(true)
        .build()
        .unwrap();
    let (mut client, server) = pair();
    let conn = pool.register(server).unwrap();
    conn.send(Cmd::ReadInternal).unwrap();
    client.write_all(b"pinned").unwrap();
    assert_eq!(take(&pool.mailbox().unwrap(), 1)[0].data(), b"pinned");
}

/// The CPUs a thread may run on, from `Cpus_allowed_list` in `/proc/<path>/status`.
#[cfg(target_os = "linux")]
fn cpus_allowed(path: &str) -> Vec<usize> {
    let status = std::fs::read_to_string(format!("/proc/{path}/status")).unwrap();
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list");
    let mut cpus = Vec::new();
    for part in list.trim().split(',') {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        cpus.extend(lo.parse::<usize>().unwrap()..=hi.parse().unwrap());
    }
    cpus
}

/// The CPUs each poller thread of this process may run on.
#[cfg(target_os = "linux")]
fn poller_cpus() -> Vec<Vec<usize>> {
    let mut pollers = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap();
        if comm.trim() == "proactor-poller" {
            let tid = task.file_name().into_string().unwrap();
            pollers.push(cpus_allowed(&format!("self/task/{tid}")));
        }
    }
    pollers
}

/// Pinned pollers stay on the CPUs the building thread may run on (its affinity mask, as
/// `taskset` or a cgroup cpuset leaves it), not on CPUs `0..n`: under a cpuset that lacks
/// CPU 0, pinning there fails. In a child process, which narrows its own affinity to its
/// last CPU and then reads every poller thread's.
#[cfg(target_os = "linux")]
#[test]
fn pinned_pollers_stay_on_the_cpus_the_builder_may_use() {
    limits::in_child(
        "pinned_pollers_stay_on_the_cpus_the_builder_may_use",
        || {
            let last = *cpus_allowed("thread-self").last().unwrap();
            // SAFETY: cpu_set_t is a plain bit array; all-zero is the empty set.
            let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
            // SAFETY: `last` is a CPU the kernel listed, below CPU_SETSIZE.
            unsafe { libc::CPU_SET(last, &mut set) };
            // SAFETY: a live cpu_set_t of the size passed; 0 is the calling thread.
            let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
            assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
            let pool = Pool::builder()
                .watchers(3)
                .pin_pollers(true)
                .build()
                .unwrap();
            assert_eq!(poller_cpus(), vec![vec![last]; 3]);
            let (mut client, server) = pair();
            let conn = pool.register(server).unwrap();
            conn.send(Cmd::ReadInternal).unwrap();
            client.write_all(b"pinned").unwrap();
            assert_eq!(take(&pool.mailbox().unwrap(), 1)[0].data(), b"pinned");
        },
    );
}

#[test]
fn an_inline_watcher_posts_routed_completions_to_the_route() {
    let w = Watcher::builder().inline(true).build().unwrap();
    let (lobby_tx, lobby_rx) = proactor::flume::unbounded();
    let (_client, server) = pair();
    let conn = w.register_with(server, lobby_tx).unwrap();
    conn.send(Cmd::ReadInternal.tag(1)).unwrap();
    conn.send(Cmd::Free.tag(2)).unwrap();
    let (mut out, deadline) = (Vec::new(), Instant::now() + Duration::from_secs(10));
    while lobby_rx.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the route got {}",
            lobby_rx.len()
        );
        w.try_wait_io(&mut out).unwrap();
        std::thread::yield_now();
    }
    assert!(
        out.is_empty(),
        "routed completions went to the driving call"
    );
    let got = take(&lobby_rx, 2);
    assert_eq!((got[0].tag, got[0].op), (1, Op::Read));
    assert!(matches!(got[0].result, Err(proactor::Error::Freed)));
    assert_eq!((got[1].tag, got[1].op), (2, Op::Free));
}

/// A watcher of a pool closed on its own has no connections left, which made it the least
/// loaded: every accept and every `pool.register` went to it and failed, though the other
/// watcher ran.
#[test]
fn a_pool_skips_a_closed_watcher() {
    let pool = Pool::builder().watchers(2).build().unwrap();
    let std_listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = std_listener.local_addr().unwrap();
    let listener = pool.listen(std_listener).unwrap();
    pool.watchers()[1].close();
    let mut clients = Vec::new();
    for tag in 0..4 {
        listener.send(Cmd::Accept.tag(tag)).unwrap();
        clients.push(TcpStream::connect(addr).unwrap());
    }
    let mut conns = Vec::new();
    for c in take(&pool.mailbox().unwrap(), 4) {
        assert_eq!(c.op, Op::Accept);
        assert!(c.is_ok(), "{:?}", c.result);
        conns.push(c.buf.into_accepted().unwrap().0);
    }
    for _ in 0..4 {
        let (client, server) = pair();
        conns.push(pool.register(server).unwrap());
        clients.push(client);
    }
    // The listener and the eight, all on the open watcher.
    eventually("nine connections on watcher 0", || {
        pool.watchers()[0].stats().connections == 9
    });
}

/// `watcher_options` may carry a mailbox or a CPU; the pool's own choices replace them.
#[test]
fn a_pool_replaces_the_mailbox_and_cpu_of_its_watcher_options() {
    let options_mailbox = proactor::Mailbox::unbounded();
    let rx = options_mailbox.receiver().clone();
    let pool = Pool::builder()
        .watchers(2)
        .per_watcher_mailboxes()
        .watcher_options(Watcher::builder().mailbox(&options_mailbox))
        .build()
        .unwrap();
    let (m0, m1) = (pool.watchers()[0].mailbox(), pool.watchers()[1].mailbox());
    assert!(
        !m0.same_channel(&m1),
        "the watchers share the options' mailbox"
    );
    assert!(!m0.same_channel(&rx));
    // An inline pool with per-watcher mailboxes builds even if the options named a mailbox.
    Pool::builder()
        .watchers(2)
        .per_watcher_mailboxes()
        .watcher_options(Watcher::builder().inline(true).mailbox(&options_mailbox))
        .build()
        .unwrap();
}

/// `WatcherBuilder::poller_cpu` on a threaded watcher: the poller runs pinned to that CPU,
/// and a CPU the kernel refuses fails `build` instead of leaving the poller unpinned. In a
/// child process, so that no other test's poller thread is counted.
#[cfg(target_os = "linux")]
#[test]
fn poller_cpu_pins_the_poller_or_fails_the_build() {
    limits::in_child("poller_cpu_pins_the_poller_or_fails_the_build", || {
        let last = *cpus_allowed("thread-self").last().unwrap();
        let w = Watcher::builder().poller_cpu(last).build().unwrap();
        assert_eq!(poller_cpus(), [vec![last]]);
        let (mut client, server) = pair();
        let conn = w.register(server).unwrap();
        conn.send(Cmd::ReadInternal).unwrap();
        client.write_all(b"pinned").unwrap();
        assert_eq!(take(&w.mailbox(), 1)[0].data(), b"pinned");
        // No such CPU (EINVAL from the kernel), and one past the kernel's CPU set.
        for cpu in [1000, usize::MAX] {
            let err = Watcher::builder().poller_cpu(cpu).build().unwrap_err();
            assert_eq!(
                err.kind(),
                std::io::ErrorKind::InvalidInput,
                "cpu {cpu}: {err}"
            );
        }
    });
}
