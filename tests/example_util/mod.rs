//! Shared helpers of the `example_*` tests: build an example once, run it as a real process,
//! talk to it over real sockets with read timeouts, signal it, watch its memory.
#![allow(dead_code)]

#[path = "../common/kit.rs"]
mod kit;
#[allow(unused_imports)] // not every example test sends patterns
pub use kit::pattern;
use kit::{raise_fd_limit, set_linger_zero, set_opt, somaxconn};

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How long a client waits for any one reply before the test fails.
pub const REPLY: Duration = Duration::from_secs(5);

/// How long a started example may take to print its first line.
const STARTUP: Duration = Duration::from_secs(10);

/// Builds `examples/NAME.rs` (once per test binary) and returns the executable's path.
pub fn example(name: &str) -> PathBuf {
    example_with(name, &[])
}

/// Builds `examples/NAME.rs` with the crate's `features` on besides the default ones (once
/// per test binary and feature set), and returns the executable's path: a copy of its own
/// (`NAME.FEATURES`, `NAME.default`), so that another build of the same example does not
/// replace it.
pub fn example_with(name: &str, features: &[&str]) -> PathBuf {
    static BUILT: Mutex<Option<HashMap<String, PathBuf>>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    let built = built.get_or_insert_with(HashMap::new);
    let key = format!("{name}.{}", features.join(","));
    if let Some(path) = built.get(&key) {
        return path.clone();
    }
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args([
        "build",
        "--quiet",
        "--example",
        name,
        "--message-format=json",
    ])
    .current_dir(env!("CARGO_MANIFEST_DIR"))
    .stderr(Stdio::inherit());
    // Same profile as this test binary, so nothing is rebuilt needlessly.
    let exe = std::env::current_exe().expect("test executable path");
    if exe.components().any(|c| c.as_os_str() == "release") {
        cmd.arg("--release");
    }
    if !features.is_empty() {
        cmd.args(["--features", &features.join(",")]);
    }
    let out = cmd.output().expect("run cargo build");
    assert!(out.status.success(), "cargo build --example {name} failed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let field = "\"executable\":\"";
    let path = stdout
        .lines()
        .filter(|l| {
            l.contains("\"compiler-artifact\"") && l.contains(&format!("\"name\":\"{name}\""))
        })
        .find_map(|l| {
            let start = l.find(field)? + field.len();
            let len = l[start..].find('"')?;
            Some(PathBuf::from(&l[start..start + len]))
        })
        .unwrap_or_else(|| panic!("no executable for example {name} in cargo's output"));
    // (Copied: a later build of the same example with other features, by this test binary
    // or another, replaces the executable cargo names.)
    let tag = if features.is_empty() {
        "default".to_string()
    } else {
        features.join(",")
    };
    let own = path.with_file_name(format!("{name}.{tag}"));
    std::fs::copy(&path, &own).expect("copy the example's executable");
    let path = own;
    built.insert(key, path.clone());
    path
}

/// A running example server, killed when dropped.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    _stdout: BufReader<ChildStdout>,
}

impl Server {
    /// Starts `example` with `--addr 127.0.0.1:0` and `args`, and reads its first line,
    /// which must be `listening on HOST:PORT`.
    pub fn start(example_name: &str, args: &[&str]) -> Server {
        Server::start_with(example_name, &[], args)
    }

    /// [`Server::start`] with the example built with `features` (see [`example_with`]).
    pub fn start_with(example_name: &str, features: &[&str], args: &[&str]) -> Server {
        raise_fd_limit(); // for the test's clients, and inherited by the server
        let mut child = Command::new(example_with(example_name, features))
            .args(["--addr", "127.0.0.1:0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the example");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        // Read on a thread, so that a server that never prints fails the test instead of
        // hanging it; one that dies first gives EOF (an empty line).
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut first = String::new();
            let read = stdout.read_line(&mut first);
            let _ = tx.send((read, first, stdout));
        });
        let (read, first, stdout) = match rx.recv_timeout(STARTUP) {
            Ok(got) => got,
            Err(_) => {
                let _ = child.kill(); // which ends the reading thread with EOF
                let _ = child.wait();
                panic!("{example_name} printed no line within {STARTUP:?}")
            }
        };
        read.expect("read the first line");
        let addr = first
            .strip_prefix("listening on ")
            .and_then(|a| a.trim_end().parse().ok())
            .unwrap_or_else(|| {
                let _ = child.kill();
                panic!("first stdout line of {example_name} is {first:?}, not `listening on HOST:PORT`")
            });
        Server {
            child,
            addr,
            _stdout: stdout,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn connect(&self) -> TcpStream {
        connect(self.addr)
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let r = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(r, 0, "kill: {}", io::Error::last_os_error());
    }

    /// Sends `sig` and returns the exit status, failing the test if the server takes longer
    /// than `within` to exit.
    pub fn stop_with(&mut self, sig: i32, within: Duration) -> ExitStatus {
        let start = Instant::now();
        self.signal(sig);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                start.elapsed() < within,
                "server still running {within:?} after signal {sig}"
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Signals `sig` and requires exit status 0 within 2 s (the contract of every example).
    pub fn stop_cleanly(&mut self, sig: i32) {
        let status = self.stop_with(sig, Duration::from_secs(2));
        assert!(
            status.success(),
            "exit status {status:?} after signal {sig}"
        );
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Nanoseconds each of the server's threads has run on a CPU so far, by thread id (Linux:
    /// the first field of /proc/PID/task/TID/schedstat). The main thread's id is [`Server::pid`].
    pub fn thread_cpu_ns(&self) -> Vec<(i32, u64)> {
        let tasks = format!("/proc/{}/task", self.pid());
        let mut threads: Vec<(i32, u64)> = std::fs::read_dir(&tasks)
            .expect("read /proc/PID/task")
            .map(|t| {
                let t = t.expect("a /proc/PID/task entry");
                let tid = t.file_name().to_str().and_then(|n| n.parse().ok());
                let stat = std::fs::read_to_string(t.path().join("schedstat"))
                    .expect("read /proc/PID/task/TID/schedstat");
                let ns = stat.split(' ').next().and_then(|n| n.parse().ok());
                (
                    tid.expect("a thread id"),
                    ns.expect("run time in schedstat"),
                )
            })
            .collect();
        threads.sort_unstable();
        threads
    }

    /// How many descriptors the server process holds.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .expect("read /proc/PID/fd")
            .count()
    }

    /// The server's resident set size in KiB (Linux: `VmRSS` in /proc/PID/status).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/PID/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connects `n` clients while the server process is stopped (SIGSTOP), so it accepts none of
/// them meanwhile: each handshake must wait in the listener's accept queue, and a connect
/// beyond the queue's room would have its SYN dropped (and time out here after [`REPLY`]).
/// The server is continued before the clients are returned, in connection order.
pub fn connect_while_stopped(server: &Server, n: usize) -> Vec<TcpStream> {
    server.signal(libc::SIGSTOP);
    let mut clients = Vec::with_capacity(n);
    let mut failed = None;
    for i in 0..n {
        match TcpStream::connect_timeout(&server.addr, REPLY) {
            Ok(c) => clients.push(c),
            Err(e) => {
                failed = Some((i, e));
                break;
            }
        }
    }
    server.signal(libc::SIGCONT);
    if let Some((i, e)) = failed {
        panic!("connect {i} of {n} with the server stopped: {e}");
    }
    for c in &clients {
        c.set_read_timeout(Some(REPLY)).unwrap();
        c.set_write_timeout(Some(REPLY)).unwrap();
    }
    clients
}

/// How many connects a listener with the examples' backlog (4,096) can hold before the
/// server accepts: the kernel caps the backlog at `net.core.somaxconn`.
pub fn burst_room() -> usize {
    somaxconn().min(4096) as usize
}

/// Whether [`burst_room`] exceeds what std's listen backlog of 128 holds (129 connects), so
/// a burst test tells the examples' listener from std's. Says so when it does not.
pub fn burst_tells_backlogs_apart() -> bool {
    let room = burst_room();
    if room <= 129 {
        eprintln!(
            "skipped: net.core.somaxconn allows {room} queued connects, no more than std's backlog"
        );
    }
    room > 129
}

/// A client socket with read and write timeouts of [`REPLY`].
pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(REPLY)).unwrap();
    s.set_write_timeout(Some(REPLY)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Closes `s` with a TCP reset (SO_LINGER of zero) instead of a FIN.
pub fn reset(s: TcpStream) {
    set_linger_zero(&s);
    drop(s);
}

/// Shrinks the socket's receive buffer so that a peer writing to it blocks early.
pub fn small_rcvbuf(s: &TcpStream, bytes: libc::c_int) {
    set_opt(s, libc::SOL_SOCKET, libc::SO_RCVBUF, &bytes);
}

/// A client socket that takes next to nothing before its peer's writes block: SO_RCVBUF at
/// its minimum and TCP_MAXSEG at 536, both set before connecting. The server's kernel sizes
/// the connection's send buffer from the MSS it learns at the handshake: some 100 KiB for
/// 536, megabytes for loopback's 64 KiB. (A buffer shrunk only after connecting, as by
/// [`small_rcvbuf`], leaves the window already offered: the server's segments are dropped
/// rather than held back, and in trials this client's own sends then stalled.) Write
/// timeout [`REPLY`].
pub fn connect_tiny_window(addr: SocketAddr) -> TcpStream {
    let SocketAddr::V4(v4) = addr else {
        panic!("IPv4 only: {addr}")
    };
    // SAFETY: socket(2) with constant arguments; the fd is owned by the TcpStream at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
    // SAFETY: a fresh fd nobody else owns.
    let s = unsafe { TcpStream::from_raw_fd(fd) };
    // Not inherited by the servers other tests start meanwhile.
    // SAFETY: fcntl(2) on the fd `s` owns.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    set_opt(&s, libc::SOL_SOCKET, libc::SO_RCVBUF, &(1 as libc::c_int));
    set_opt(
        &s,
        libc::IPPROTO_TCP,
        libc::TCP_MAXSEG,
        &(536 as libc::c_int),
    );
    // SAFETY: all-zero is a valid sockaddr_in; the fields that matter are set below.
    let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sin.sin_family = libc::AF_INET as libc::sa_family_t;
    sin.sin_port = v4.port().to_be();
    sin.sin_addr.s_addr = u32::from_ne_bytes(v4.ip().octets());
    // SAFETY: `sin` is a live sockaddr_in of the size passed.
    let r = unsafe {
        libc::connect(
            fd,
            (&sin as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "connect: {}", io::Error::last_os_error());
    s.set_write_timeout(Some(REPLY)).unwrap();
    s
}

/// A line-oriented client: every read waits at most [`REPLY`].
pub struct Client {
    pub reader: BufReader<TcpStream>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        Client::from_stream(connect(addr))
    }

    pub fn from_stream(stream: TcpStream) -> Client {
        Client {
            reader: BufReader::new(stream),
        }
    }

    pub fn stream(&self) -> &TcpStream {
        self.reader.get_ref()
    }

    pub fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.reader
            .get_mut()
            .write_all(bytes.as_ref())
            .expect("send to server");
    }

    /// The next line, `\n` included; panics on timeout or end of stream.
    pub fn line_bytes(&mut self) -> Vec<u8> {
        let mut line = Vec::new();
        match self.reader.read_until(b'\n', &mut line) {
            Ok(_) if line.ends_with(b"\n") => line,
            Ok(_) => panic!("end of stream after {:?}", String::from_utf8_lossy(&line)),
            Err(e) => panic!(
                "no line within {REPLY:?} ({e}); got {:?}",
                String::from_utf8_lossy(&line)
            ),
        }
    }

    /// The next line without its `\n`, as text.
    pub fn line(&mut self) -> String {
        let line = self.line_bytes();
        String::from_utf8(line[..line.len() - 1].to_vec()).expect("UTF-8 line")
    }

    pub fn expect(&mut self, want: &str) {
        let got = self.line();
        assert_eq!(got, want);
    }

    /// Reads until the server closes: end of stream, or a reset. Fails on timeout or if more
    /// than `limit` bytes arrive first. Returns the bytes read.
    pub fn expect_closed(&mut self, limit: usize) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = [0u8; 65536];
        loop {
            match self.reader.read(&mut buf) {
                Ok(0) => return got,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return got,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => panic!("not closed within {REPLY:?} ({e}); got {} bytes", got.len()),
            }
            assert!(got.len() <= limit, "still open after {} bytes", got.len());
        }
    }

    pub fn shutdown_write(&self) {
        self.stream().shutdown(Shutdown::Write).expect("shutdown");
    }
}

/// Waits up to `timeout` for `s` to accept more bytes (poll(2) for POLLOUT).
pub fn wait_writable(s: &TcpStream, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd, for the duration of the call.
    let r = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) };
    r > 0
}

/// The two signal tests every example has, each running `$exits_cleanly_on(signal)`.
#[macro_export]
macro_rules! signal_exit_tests {
    ($exits_cleanly_on:ident) => {
        #[test]
        fn sigint_exits_0_within_2s_with_clients_connected() {
            $exits_cleanly_on(libc::SIGINT);
        }

        #[test]
        fn sigterm_exits_0_within_2s_with_clients_connected() {
            $exits_cleanly_on(libc::SIGTERM);
        }
    };
}
