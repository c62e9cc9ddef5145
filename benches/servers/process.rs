//! What the benches that run each server in a process of its own share (benches/chat,
//! benches/udp, benches/tls): starting a server process pinned to the server's CPU and reading its
//! `listening on HOST:PORT` line, its CPU time and peak memory from `/proc`, how busy each CPU
//! was (to tell a run that other processes disturbed), and the figures' formatting.

use std::fs;
use std::io::{self, BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// Pins the calling process (or a forked child not yet exec'd) to `cpu`.
pub fn set_affinity(cpu: usize) -> io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: cpu_set_t is a plain bit array; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` < CPU_SETSIZE, so the bit is inside `set`.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a live cpu_set_t of the size passed; pid 0 is the calling process.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Clock ticks per second (`/proc` counts CPU time in them: 10 ms here).
pub fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no memory effects.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as u64
}

/// This thread's CPU time (the load generator's), user + system, microseconds.
pub fn thread_cpu_us() -> u64 {
    // SAFETY: rusage is a plain C struct; all-zero is a valid value for getrusage to fill.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a live rusage; RUSAGE_THREAD is a valid `who` on Linux.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) } != 0 {
        return 0;
    }
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    us(ru.ru_utime) + us(ru.ru_stime)
}

/// A running server process, killed when dropped.
pub struct ServerProc {
    child: Child,
    pub addr: SocketAddr,
}

impl ServerProc {
    /// Starts `cmd` (its program, arguments and environment set by the caller, `--addr
    /// 127.0.0.1:0` among them) pinned to the server's CPU, and waits up to 30 s for its first
    /// line, `listening on HOST:PORT`. What it prints later is shown, tagged with `name`.
    pub fn start(name: &str, mut cmd: Command) -> Result<ServerProc, String> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(cpu) = super::pins().server {
            // SAFETY: the closure runs in the child between fork and exec and only makes one
            // system call (no allocation, no lock).
            unsafe { cmd.pre_exec(move || set_affinity(cpu)) };
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("{name}: cannot start {:?}: {e}", cmd.get_program()))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        let tag = name.to_string();
        thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            for line in lines.map_while(Result::ok) {
                eprintln!("  [{tag}] {line}");
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Some(Ok(line))) => line
                .strip_prefix("listening on ")
                .and_then(|a| a.trim().parse::<SocketAddr>().ok())
                .ok_or(format!(
                    "{name}: first line {line:?}, not `listening on HOST:PORT`"
                )),
            Ok(_) => Err(format!("{name}: exited before printing its address")),
            Err(_) => Err(format!("{name}: no `listening on` line within 30 s")),
        };
        // Killed on the way out if its address is no good.
        let mut srv = ServerProc {
            child,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        };
        srv.addr = addr?;
        Ok(srv)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's CPU time so far, user + system, every thread, in microseconds
    /// (`/proc/PID/stat`, in clock ticks).
    pub fn cpu_us(&self) -> Result<u64, String> {
        let path = format!("/proc/{}/stat", self.pid());
        let text = fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
        // Fields after the command name (which may hold spaces): utime is field 14, stime 15.
        let rest = text.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<u64> = rest
            .split_whitespace()
            .skip(1)
            .take(13)
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        let (Some(utime), Some(stime)) = (f.get(10), f.get(11)) else {
            return Err(format!("bad {path}: {text:?}"));
        };
        Ok((utime + stime) * 1_000_000 / clock_ticks())
    }

    /// The server's peak resident set size (`VmHWM`), KiB.
    pub fn peak_rss_kib(&self) -> Result<u64, String> {
        self.status_kib("VmHWM")
    }

    /// The server's resident memory (`VmRSS`), KiB.
    pub fn rss_kib(&self) -> Result<u64, String> {
        self.status_kib("VmRSS")
    }

    /// Field `field` of `/proc/PID/status`, in KiB.
    fn status_kib(&self, field: &str) -> Result<u64, String> {
        let path = format!("/proc/{}/status", self.pid());
        let text = fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
        text.lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .ok_or_else(|| format!("no {field} in {path}"))
    }

    /// Checks that it is still running.
    pub fn alive(&mut self, name: &str) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!("{name} exited: {status}")),
            Err(e) => Err(format!("{name}: {e}")),
        }
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Which of `/proc/stat`'s columns count as a CPU's busy time.
#[derive(Clone, Copy)]
pub enum Busy {
    /// User, nice and system.
    Tasks,
    /// Those and the irq and softirq columns: with tick-based accounting a tick that lands
    /// in a softirq counts there, not as the running task's system time, and on loopback
    /// much of a datagram's delivery runs in softirqs.
    WithIrq,
}

/// Time CPU `cpu` was busy, every process together, in microseconds (`/proc/stat`).
pub fn cpu_busy_us(cpu: usize, busy: Busy) -> Option<u64> {
    let stat = fs::read_to_string("/proc/stat").ok()?;
    let name = format!("cpu{cpu}");
    let line = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name.as_str()))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(7)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user, nice, system, idle, iowait, irq, softirq
    let ticks = match (busy, f.len()) {
        (Busy::Tasks, 3..) => f[0] + f[1] + f[2],
        (Busy::WithIrq, 7) => f[0] + f[1] + f[2] + f[5] + f[6],
        _ => return None,
    };
    Some(ticks * 1_000_000 / clock_ticks())
}

/// CPU times at one moment: the server's, the load generator's (as the bench measures it),
/// and the busy time of their two CPUs (every process on them).
pub struct Meter {
    /// When it was read.
    pub at: Instant,
    server_us: u64,
    gen_us: u64,
    cpu_us: Option<u64>,
    gen_cpu_us: Option<u64>,
}

/// What a [`Meter`] saw between two readings.
pub struct Span {
    /// Between the two readings, seconds.
    pub wall_s: f64,
    pub server_cpu_s: f64,
    pub gen_cpu_s: f64,
    /// The share of the server's CPU, and of the load generator's, that other processes
    /// took (NaN when not pinned).
    pub others: f64,
    pub others_gen: f64,
}

impl Meter {
    /// Now, with `gen_us` the load generator's CPU time so far, in microseconds.
    pub fn now(srv: &ServerProc, gen_us: u64, busy: Busy) -> Result<Meter, String> {
        let pins = super::pins();
        Ok(Meter {
            at: Instant::now(),
            server_us: srv.cpu_us()?,
            gen_us,
            cpu_us: pins.server.and_then(|c| cpu_busy_us(c, busy)),
            gen_cpu_us: pins.client.and_then(|c| cpu_busy_us(c, busy)),
        })
    }

    /// From `self` to `later`.
    pub fn since(&self, later: &Meter) -> Span {
        let server_us = later.server_us.saturating_sub(self.server_us);
        let gen_us = later.gen_us.saturating_sub(self.gen_us);
        let span_us = later.at.duration_since(self.at).as_micros().max(1) as f64;
        let share = |a: Option<u64>, b: Option<u64>, own_us: u64| match (a, b) {
            (Some(a), Some(b)) => b.saturating_sub(a).saturating_sub(own_us) as f64 / span_us,
            _ => f64::NAN,
        };
        Span {
            wall_s: span_us / 1e6,
            server_cpu_s: server_us as f64 / 1e6,
            gen_cpu_s: gen_us as f64 / 1e6,
            others: share(self.cpu_us, later.cpu_us, server_us),
            others_gen: share(self.gen_cpu_us, later.gen_cpu_us, gen_us),
        }
    }
}

pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// A figure with three significant digits.
pub fn sig3(v: f64) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    let digits = if v == 0.0 {
        2
    } else {
        (2 - v.abs().log10().floor() as i32).clamp(0, 6) as usize
    };
    format!("{v:.digits$}")
}

pub fn millions(v: f64) -> String {
    format!("{} M", sig3(v / 1e6))
}

pub fn percent(v: f64) -> String {
    if v.is_finite() {
        format!("{:.0}%", v * 100.0)
    } else {
        "-".into()
    }
}
