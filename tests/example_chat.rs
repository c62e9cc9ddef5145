//! The chat-server example, run as a process and checked against its contract
//! (/work/shared/CONTRACTS.md, "chat-server") clause by clause over real sockets.

mod example_util;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use example_util::{
    burst_room, burst_tells_backlogs_apart, connect_while_stopped, reset, small_rcvbuf, Client,
    Server,
};

fn chat(args: &[&str]) -> Server {
    Server::start("chat-server", args)
}

/// Connects `n` clients one after the other; each gets its welcome, and every earlier one
/// its `joined` line. Client i is `guest{i+1}`.
fn join(server: &Server, n: usize) -> Vec<Client> {
    let mut clients: Vec<Client> = Vec::new();
    for i in 1..=n {
        let mut c = Client::connect(server.addr);
        c.expect(&format!("* welcome guest{i}"));
        for earlier in &mut clients {
            earlier.expect(&format!("* guest{i} joined"));
        }
        clients.push(c);
    }
    clients
}

/// `from` says `text`; every client in `to` must get exactly `NAME: text` as its next line.
/// Used as a barrier too: whatever a receiver would have got before is already checked.
fn say(from: &mut Client, name: &str, text: &str, to: &mut [&mut Client]) {
    from.send(format!("{text}\n"));
    for c in to.iter_mut() {
        c.expect(&format!("{name}: {text}"));
    }
}

/// `c` asks /who; returns the reply (also a barrier for `c`: nothing else came before it).
fn who(c: &mut Client) -> String {
    c.send("/who\n");
    c.line()
}

#[test]
fn welcome_numbers_in_connection_order_and_joined_goes_to_the_others() {
    let server = chat(&[]);
    let mut cs = join(&server, 3);
    // The newcomer got no `joined` line of its own: its next line is its /who reply.
    assert_eq!(who(&mut cs[2]), "* online: guest1 guest2 guest3");
    assert_eq!(who(&mut cs[0]), "* online: guest1 guest2 guest3");
}

#[test]
fn lines_go_to_every_other_client_not_the_sender() {
    let server = chat(&[]);
    let [mut a, mut b, mut c]: [Client; 3] = join(&server, 3).try_into().ok().unwrap();
    say(&mut a, "guest1", "hello everyone", &mut [&mut b, &mut c]);
    say(&mut b, "guest2", "hi guest1", &mut [&mut a, &mut c]);
    // The senders got nothing back: their next lines are /who replies.
    assert_eq!(who(&mut a), "* online: guest1 guest2 guest3");
    assert_eq!(who(&mut b), "* online: guest1 guest2 guest3");
}

#[test]
fn crlf_stripped_empty_lines_ignored_lines_split_and_batched() {
    let server = chat(&[]);
    let [mut a, mut b]: [Client; 2] = join(&server, 2).try_into().ok().unwrap();
    a.send("\n\r\n\n");
    a.send("hi there\r\n");
    b.expect("guest1: hi there");
    // Only one trailing \r is stripped; a \r elsewhere is text.
    a.send("a\r\r\nb\rc\r\n");
    assert_eq!(b.line_bytes(), b"guest1: a\r\n");
    assert_eq!(b.line_bytes(), b"guest1: b\rc\n");
    // A line in pieces, and several lines in one packet.
    a.send("hel");
    a.send("lo wor");
    a.send("ld\n");
    b.expect("guest1: hello world");
    a.send("one\ntwo\n\nthree\n");
    b.expect("guest1: one");
    b.expect("guest1: two");
    b.expect("guest1: three");
    // Commands with \r\n work too.
    a.send("/who\r\n");
    a.expect("* online: guest1 guest2");
}

#[test]
fn non_utf8_bytes_are_relayed_as_they_are() {
    let server = chat(&[]);
    let [mut a, mut b]: [Client; 2] = join(&server, 2).try_into().ok().unwrap();
    a.send(b"\xff\xfe caf\xe9 \xc3\x28 \x80\n");
    assert_eq!(b.line_bytes(), b"guest1: \xff\xfe caf\xe9 \xc3\x28 \x80\n");
    a.send(b"/\xff\n"); // a command that is not UTF-8 either
    a.expect("! unknown command");
    a.send(b"/nick \xff\n");
    assert!(a.line().starts_with("! "));
    say(&mut a, "guest1", "still fine", &mut [&mut b]);
}

#[test]
fn who_lists_every_name_sorted_by_bytes() {
    let server = chat(&[]);
    let mut cs = join(&server, 6);
    let names = ["Zed", "alpha", "_x", "Alpha", "9x", "-x"];
    for (i, name) in names.iter().enumerate() {
        cs[i].send(format!("/nick {name}\n"));
        for c in &mut cs {
            c.expect(&format!("* guest{} is now {name}", i + 1));
        }
    }
    for c in &mut cs {
        assert_eq!(who(c), "* online: -x 9x Alpha Zed _x alpha");
    }
}

#[test]
fn nick_validation_uniqueness_and_case() {
    let server = chat(&[]);
    let [mut a, mut b, mut c]: [Client; 3] = join(&server, 3).try_into().ok().unwrap();
    let rejected = |cl: &mut Client, line: &str| {
        cl.send(format!("{line}\n"));
        let reply = cl.line();
        assert!(reply.starts_with("! "), "{line:?} got {reply:?}");
    };
    rejected(&mut a, "/nick bad name"); // the whole rest of the line is the name
    rejected(&mut a, "/nick ");
    rejected(&mut a, "/nick");
    rejected(&mut a, "/nick a.b");
    rejected(&mut a, "/nick caf\u{e9}");
    rejected(&mut a, &format!("/nick {}", "x".repeat(33)));
    // The name would begin with a space.
    rejected(&mut a, "/nick  lead");
    // Nobody else heard of any of it, and the name is unchanged.
    say(&mut a, "guest1", "still guest1", &mut [&mut b, &mut c]);

    let long = "A_-9".repeat(8); // 32 characters: the longest valid name
    a.send(format!("/nick {long}\n"));
    for cl in [&mut a, &mut b, &mut c] {
        cl.expect(&format!("* guest1 is now {long}"));
    }
    // In use, by someone else or by oneself.
    rejected(&mut b, &format!("/nick {long}"));
    rejected(&mut a, &format!("/nick {long}"));
    // Names are case-sensitive: a different case is a different name.
    let lower = long.to_lowercase();
    b.send(format!("/nick {lower}\n"));
    for cl in [&mut a, &mut b, &mut c] {
        cl.expect(&format!("* guest2 is now {lower}"));
    }
    // The new names are used from now on, and an old name is free again.
    say(&mut a, &long, "renamed", &mut [&mut b, &mut c]);
    c.send("/nick guest1\n");
    for cl in [&mut a, &mut b, &mut c] {
        cl.expect("* guest3 is now guest1");
    }
    assert_eq!(who(&mut c), format!("* online: {long} {lower} guest1"));
}

#[test]
fn unknown_commands() {
    let server = chat(&[]);
    let [mut a, mut b]: [Client; 2] = join(&server, 2).try_into().ok().unwrap();
    for cmd in [
        "/",
        "/foo",
        "/WHO",
        "/who am i",
        "/nickname x",
        "/nick",
        "/quit now",
    ] {
        a.send(format!("{cmd}\n"));
        a.expect("! unknown command");
    }
    // None of it was relayed.
    say(&mut a, "guest1", "done", &mut [&mut b]);
}

#[test]
fn quit_closes_and_the_others_get_left_exactly_once() {
    let server = chat(&[]);
    let [mut a, mut b, mut c]: [Client; 3] = join(&server, 3).try_into().ok().unwrap();
    a.send("/nick alice\n");
    for cl in [&mut a, &mut b, &mut c] {
        cl.expect("* guest1 is now alice");
    }
    // A /who reply queued just before /quit is still delivered, then the connection closes.
    a.send("/who\n/quit\nnever relayed\n");
    a.expect("* online: alice guest2 guest3");
    a.expect_closed(1024);
    b.expect("* alice left");
    c.expect("* alice left");
    // Exactly once: the next lines are ordinary messages.
    say(&mut b, "guest2", "after", &mut [&mut c]);
    say(&mut c, "guest3", "after too", &mut [&mut b]);
    assert_eq!(who(&mut b), "* online: guest2 guest3");
}

#[test]
fn eof_and_reset_mid_line_give_left_exactly_once() {
    let server = chat(&[]);
    let [a, mut b, c, mut d]: [Client; 4] = join(&server, 4).try_into().ok().unwrap();
    // End of stream, with a partial line that is never relayed.
    let mut a = a;
    a.send("unfinished");
    a.shutdown_write();
    b.expect("* guest1 left");
    d.expect("* guest1 left");
    drop(a);
    // A reset in the middle of a line.
    let mut c = c;
    c.send("half a li");
    reset(c.reader.into_inner());
    b.expect("* guest3 left");
    d.expect("* guest3 left");
    say(&mut b, "guest2", "still here", &mut [&mut d]);
    say(&mut d, "guest4", "me too", &mut [&mut b]);
    assert_eq!(who(&mut d), "* online: guest2 guest4");
}

#[test]
fn line_of_4096_bytes_is_relayed_4097_is_too_long() {
    let server = chat(&[]);
    let [mut a, mut b, mut c]: [Client; 3] = join(&server, 3).try_into().ok().unwrap();
    let x = "x".repeat(4096);
    a.send(format!("{x}\n"));
    b.expect(&format!("guest1: {x}"));
    c.expect(&format!("guest1: {x}"));
    // 4095 bytes and a \r: 4096 before the \n, relayed without the \r.
    let y = "y".repeat(4095);
    a.send(format!("{y}\r\n"));
    b.expect(&format!("guest1: {y}"));
    c.expect(&format!("guest1: {y}"));
    // 4096 bytes and a \r: 4097 before the \n, too long.
    a.send(format!("{x}\r\n"));
    a.expect("! line too long");
    a.expect_closed(1024);
    b.expect("* guest1 left");
    c.expect("* guest1 left");
    say(&mut b, "guest2", "after", &mut [&mut c]);
}

#[test]
fn disconnected_as_soon_as_4097_bytes_without_newline_arrived() {
    let server = chat(&[]);
    let [mut a, mut b, mut c]: [Client; 3] = join(&server, 3).try_into().ok().unwrap();
    // 4096 bytes without a newline are fine: the server waits for the rest of the line.
    c.send("z".repeat(4000));
    c.send("z".repeat(96));
    say(&mut b, "guest2", "meanwhile", &mut [&mut a, &mut c]);
    c.send("\n");
    a.expect(&format!("guest3: {}", "z".repeat(4096)));
    b.expect(&format!("guest3: {}", "z".repeat(4096)));
    // One more byte, and no newline ever: the sender is told and disconnected.
    a.send("w".repeat(3000));
    a.send("w".repeat(1097));
    a.expect("! line too long");
    a.expect_closed(1024);
    b.expect("* guest1 left");
    c.expect("* guest1 left");
    say(&mut c, "guest3", "after", &mut [&mut b]);
    assert_eq!(who(&mut b), "* online: guest2 guest3");
}

#[test]
fn every_line_reaches_every_receiver_in_order() {
    let server = chat(&[]);
    let [mut a, mut b, mut c]: [Client; 3] = join(&server, 3).try_into().ok().unwrap();
    // Two senders at once, 2,000 lines each, in writes of many lines.
    let batch = |who: &str, from: usize| -> String {
        (from..from + 100).map(|i| format!("{who} {i}\n")).collect()
    };
    let mut a_writer = a.stream().try_clone().unwrap();
    let sender = thread::spawn(move || {
        use std::io::Write;
        for k in 0..20 {
            a_writer.write_all(batch("a", k * 100).as_bytes()).unwrap();
        }
    });
    for k in 0..20 {
        b.send(batch("b", k * 100));
    }
    sender.join().unwrap();
    let (mut next_a, mut next_b) = (0, 0);
    while next_a < 2000 || next_b < 2000 {
        let line = c.line();
        if let Some(n) = line.strip_prefix("guest1: a ") {
            assert_eq!(n, next_a.to_string());
            next_a += 1;
        } else if let Some(n) = line.strip_prefix("guest2: b ") {
            assert_eq!(n, next_b.to_string());
            next_b += 1;
        } else {
            panic!("unexpected line {line:?}");
        }
    }
    for i in 0..2000 {
        b.expect(&format!("guest1: a {i}"));
        a.expect(&format!("guest2: b {i}"));
    }
}

#[test]
fn slow_consumer_is_disconnected_and_the_others_are_served_on() {
    // Above what one read of the sender's (64 KiB of lines) puts in a receiver's queue at once.
    let server = chat(&["--max-backlog", "262144"]);
    let [slow, writer, mut reader]: [Client; 3] = join(&server, 3).try_into().ok().unwrap();
    // From now on guest1 reads nothing at all.
    small_rcvbuf(slow.stream(), 4096);
    let rss_before = server.rss_kib();
    // guest2 writes numbered 1 KB lines until told to stop (bounded in count and time), never
    // more than AHEAD lines past what the reader has: the reader keeps reading, so it must
    // not be cut off as slow, even when a busy machine stalls this test's reader thread while
    // the writer runs on (the server reads the writer as fast as it writes). AHEAD KB is half
    // the backlog limit.
    const AHEAD: usize = 128;
    let stop = Arc::new(AtomicBool::new(false));
    // A credit per line the writer may send: AHEAD to start with, one back per line read.
    let (credit, credits) = std::sync::mpsc::sync_channel::<()>(AHEAD);
    for _ in 0..AHEAD {
        credit.send(()).unwrap();
    }
    let mut w = writer;
    let stop2 = stop.clone();
    let sender = thread::spawn(move || {
        let pad = "p".repeat(1000);
        let start = Instant::now();
        let mut sent = 0;
        while !stop2.load(Ordering::SeqCst)
            && sent < 50_000
            && start.elapsed() < Duration::from_secs(30)
        {
            // (Bounded, to look at `stop` again while the reader is behind.)
            if credits.recv_timeout(Duration::from_millis(50)).is_err() {
                continue;
            }
            w.send(format!("{sent} {pad}\n"));
            sent += 1;
        }
        w.send("done\n");
        (w, sent)
    });
    // The reader gets every line in order, and `* guest1 left` once along the way.
    let mut next = 0;
    let mut left = 0;
    loop {
        let line = reader.line();
        if line == "* guest1 left" {
            left += 1;
            stop.store(true, Ordering::SeqCst);
        } else if line == "guest2: done" {
            break;
        } else {
            let n = line
                .strip_prefix("guest2: ")
                .and_then(|l| l.split(' ').next());
            assert_eq!(
                n,
                Some(next.to_string().as_str()),
                "line {next} out of order"
            );
            next += 1;
            // (Full only once the writer stopped taking them.)
            let _ = credit.try_send(());
        }
    }
    let (mut w, sent) = sender.join().unwrap();
    let rss_after = server.rss_kib();
    assert!(
        rss_after < rss_before + 32 * 1024,
        "server RSS {rss_before} -> {rss_after} KiB"
    );
    assert_eq!(left, 1, "`* guest1 left` exactly once");
    assert_eq!(next, sent, "the reader got every line");
    // The slow client was disconnected. Its socket may still hold megabytes for it, trickling
    // out through a tiny window, so rather than read them all: bytes sent to a closed socket
    // make the server's kernel answer with a reset, and the client sees the end at once.
    let mut slow = slow;
    slow.send("anyone there?\n");
    slow.expect_closed(64 << 20);
    // And the others go on.
    say(&mut w, "guest2", "still here", &mut [&mut reader]);
    assert_eq!(who(&mut reader), "* online: guest2 guest3");
}

/// With `--idle-timeout 1`, a client that only listens is disconnected after about 1 s (no
/// sooner than 0.9 s; the upper bound, 1 s + 5 s, is only there to fail rather than hang)
/// although it is sent a message every 200 ms; the others are told it left and go on.
#[test]
fn idle_client_is_disconnected_even_while_being_sent_messages() {
    let server = chat(&["--idle-timeout", "1"]);
    let [mut quiet, mut chatty]: [Client; 2] = join(&server, 2).try_into().ok().unwrap();
    let start = Instant::now();
    // guest2 talks every 200 ms (and so stays alive); guest1 only listens.
    let mut i = 0;
    loop {
        chatty.send(format!("ping {i}\n"));
        let line = quiet.line();
        if line == "! idle timeout" {
            break;
        }
        assert_eq!(line, format!("guest2: ping {i}"));
        assert!(
            start.elapsed() < Duration::from_secs(6),
            "guest1 still connected after 6 s"
        );
        i += 1;
        thread::sleep(Duration::from_millis(200)); // the pace of the conversation
    }
    quiet.expect_closed(1 << 20);
    let idle_for = start.elapsed();
    assert!(
        idle_for >= Duration::from_millis(900) && idle_for < Duration::from_secs(6),
        "disconnected after {idle_for:?}, want about 1 s"
    );
    chatty.expect("* guest1 left");
    // guest2 is alive and served; a newcomer too.
    let mut late = Client::connect(server.addr);
    late.expect("* welcome guest3");
    chatty.expect("* guest3 joined");
    say(&mut chatty, "guest2", "hello late", &mut [&mut late]);
    assert_eq!(who(&mut chatty), "* online: guest2 guest3");
}

#[test]
fn no_idle_timeout_by_default() {
    let server = chat(&[]);
    let [mut a, mut b]: [Client; 2] = join(&server, 2).try_into().ok().unwrap();
    thread::sleep(Duration::from_millis(1500)); // silence is the scenario
    say(&mut a, "guest1", "still here", &mut [&mut b]);
    say(&mut b, "guest2", "me too", &mut [&mut a]);
}

fn exits_cleanly_on(sig: i32) {
    let mut server = chat(&["--max-backlog", "100000000"]);
    let [mut a, mut b, stuck]: [Client; 3] = join(&server, 3).try_into().ok().unwrap();
    // One client stops reading with a lot queued for it.
    small_rcvbuf(stuck.stream(), 4096);
    let big = "q".repeat(4000);
    for _ in 0..500 {
        a.send(format!("{big}\n"));
    }
    for _ in 0..500 {
        b.expect(&format!("guest1: {big}"));
    }
    server.stop_cleanly(sig);
    b.expect_closed(1024);
}

signal_exit_tests!(exits_cleanly_on);

#[test]
fn two_watchers_one_chat_every_line_relayed_in_order() {
    let server = chat(&["--watchers", "2"]);
    let mut cs = join(&server, 4);
    for round in 0..20 {
        for i in 0..4 {
            let (before, rest) = cs.split_at_mut(i);
            let (me, after) = rest.split_first_mut().unwrap();
            let mut others: Vec<&mut Client> = before.iter_mut().chain(after.iter_mut()).collect();
            say(
                me,
                &format!("guest{}", i + 1),
                &format!("round {round}"),
                &mut others,
            );
        }
    }
    assert_eq!(who(&mut cs[3]), "* online: guest1 guest2 guest3 guest4");
    let mut quitter = cs.pop().unwrap();
    quitter.send("/quit\n");
    for c in &mut cs {
        c.expect("* guest4 left");
    }
}

/// A burst of connects faster than the server accepts (here: while it is stopped) waits in
/// the listener's queue instead of losing SYNs beyond std's backlog of 128, and the welcomes
/// still number the clients in the order they connected.
#[test]
fn a_burst_of_connections_waits_in_the_accept_queue_and_is_welcomed_in_order() {
    if !burst_tells_backlogs_apart() {
        return;
    }
    let server = Server::start("chat-server", &[]);
    let n = burst_room().min(300);
    let clients = connect_while_stopped(&server, n);
    for (i, stream) in clients.into_iter().enumerate() {
        let mut c = Client::from_stream(stream);
        c.expect(&format!("* welcome guest{}", i + 1));
    }
}
