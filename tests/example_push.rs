//! The push-server example, run as a process: every interval the current time goes to every
//! client; a client that stops reading misses a write deadline and is freed.

mod example_util;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use example_util::{reset, small_rcvbuf, Client, Server};

/// Milliseconds since midnight UTC from a push line `HH:MM:SS.mmm UTC` (padding dots allowed).
fn parse_time(line: &str) -> u64 {
    let t = line.trim_end_matches('.');
    let t = t
        .strip_suffix(" UTC")
        .unwrap_or_else(|| panic!("not a time line: {:.60}", line));
    let (hms, ms) = t.split_once('.').expect("HH:MM:SS.mmm");
    let parts: Vec<u64> = hms.split(':').map(|p| p.parse().expect("number")).collect();
    assert_eq!(parts.len(), 3, "HH:MM:SS in {t:?}");
    assert!(
        parts[0] < 24 && parts[1] < 60 && parts[2] < 60 && ms.len() == 3,
        "{t:?}"
    );
    (parts[0] * 3600 + parts[1] * 60 + parts[2]) * 1000 + ms.parse::<u64>().unwrap()
}

fn now_ms_of_day() -> u64 {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    (d.as_millis() % 86_400_000) as u64
}

/// Distance between two times of day, across midnight too.
fn apart(a: u64, b: u64) -> u64 {
    let d = a.abs_diff(b);
    d.min(86_400_000 - d)
}

/// With no options the server pushes the current time once a second: three pushes span
/// about 2 s, by their times and by the wait for them. The pushes keep to a fixed grid, so a
/// late push shortens the gap after it: the bounds (0.7 to 1.5 of 2 s) let the first push be
/// late by up to 0.6 s, and the last by up to 1 s.
#[test]
fn pushes_the_time_every_second_by_default() {
    let server = Server::start("push-server", &[]);
    let mut c = Client::connect(server.addr);
    let first = parse_time(&c.line());
    let t0 = Instant::now();
    assert!(
        apart(first, now_ms_of_day()) < 5_000,
        "the time pushed is the current time"
    );
    parse_time(&c.line());
    let third = parse_time(&c.line());
    let waited = t0.elapsed();
    let span = apart(first, third);
    assert!(
        (1400..=3000).contains(&span),
        "3 pushes span {span} ms, want about 2000"
    );
    assert!(
        waited >= Duration::from_millis(1400),
        "third push {waited:?} after the first"
    );
}

/// Every client, a talking one too, gets the pushes of a 100 ms interval: 10 in a row span
/// about 9 intervals (0.7 to 1.5 of that, so that one late push, which shortens the gap
/// after it, or a skipped one does not fail it), and the same pushes go to all.
#[test]
fn every_client_gets_every_push() {
    let server = Server::start("push-server", &["--interval-ms", "100"]);
    let mut clients: Vec<Client> = (0..4).map(|_| Client::connect(server.addr)).collect();
    // A client that talks: what it sends is ignored, and it keeps getting pushes.
    clients[3].send("hello? anyone?\n");
    let lines: Vec<Vec<u64>> = clients
        .iter_mut()
        .map(|c| (0..10).map(|_| parse_time(&c.line())).collect())
        .collect();
    for times in &lines {
        let span = apart(times[0], times[9]);
        assert!(
            (630..=1350).contains(&span),
            "10 pushes span {span} ms at a 100 ms interval: {times:?}"
        );
    }
    // The same pushes went to all: every client has pushes in common with the first.
    for times in &lines[1..] {
        assert!(
            times.iter().any(|t| lines[0].contains(t)),
            "{times:?} vs {:?}",
            lines[0]
        );
    }
}

#[test]
fn clients_that_leave_do_not_disturb_the_others() {
    let server = Server::start("push-server", &["--interval-ms", "100"]);
    let mut stay = Client::connect(server.addr);
    stay.line();
    let fds = server.fd_count();
    for i in 0..10 {
        let mut c = Client::connect(server.addr);
        c.line();
        if i % 2 == 0 {
            reset(c.reader.into_inner());
        } else {
            drop(c);
        }
        stay.line();
    }
    for _ in 0..5 {
        parse_time(&stay.line());
    }
    // Every one that left was freed: a reset one at its read, one that closed (a half-close
    // is no goodbye) at a push it could not take.
    let start = Instant::now();
    while server.fd_count() != fds {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "server holds {} fds, {fds} before the others came and went",
            server.fd_count()
        );
        stay.line();
    }
}

/// A client that shuts down its sending side (as `nc -N` does) still reads: it goes on
/// getting pushes; end of stream from it is not a goodbye.
#[test]
fn a_client_that_half_closes_still_gets_pushes() {
    let server = Server::start("push-server", &["--interval-ms", "50"]);
    let mut c = Client::connect(server.addr);
    c.line();
    c.shutdown_write();
    for _ in 0..3 {
        parse_time(&c.line());
    }
}

#[test]
fn a_client_that_stops_reading_misses_its_write_deadline_and_is_freed() {
    // 256 KiB pushes every 100 ms, each write due within 300 ms.
    let server = Server::start(
        "push-server",
        &[
            "--interval-ms",
            "100",
            "--write-timeout-ms",
            "300",
            "--size",
            "262144",
        ],
    );
    let stuck = Client::connect(server.addr);
    small_rcvbuf(stuck.stream(), 4096);
    let mut good = Client::connect(server.addr);
    let rss_before = server.rss_kib();
    // Twenty pushes (2 s) for the good client: the stuck one had many deadlines to miss.
    for _ in 0..20 {
        let line = good.line();
        assert_eq!(line.len(), 262_143, "a padded push");
        parse_time(&line);
    }
    let rss_after = server.rss_kib();
    assert!(
        rss_after < rss_before + 32 * 1024,
        "RSS {rss_before} -> {rss_after} KiB"
    );
    // The stuck client's socket is closed: bytes sent to it make the server's kernel answer
    // with a reset (reading what it still holds could take long through a tiny window).
    let mut stuck = stuck;
    stuck.send("still here\n");
    stuck.expect_closed(64 << 20);
    // The good one goes on.
    for _ in 0..3 {
        parse_time(&good.line());
    }
}

fn exits_cleanly_on(sig: i32) {
    let mut server = Server::start("push-server", &["--interval-ms", "50", "--size", "65536"]);
    let mut reading = Client::connect(server.addr);
    let _not_reading = Client::connect(server.addr);
    // Seven pushes of 64 KiB (each line is one interval): the non-reader falls behind by as
    // many, unread.
    for _ in 0..7 {
        reading.line();
    }
    server.stop_cleanly(sig);
    reading.expect_closed(64 << 20);
}

signal_exit_tests!(exits_cleanly_on);
