//! The OS layer: every `unsafe` block of the crate lives below this module.
//!
//! Each backend (`epoll.rs` for Linux and Android, `kqueue.rs` for macOS, iOS and FreeBSD)
//! exports the same names, picked by one `cfg` ladder, with no trait and no dynamic dispatch:
//!
//! - `Selector`: `new()`, `register(fd, token)` (read and write interest, edge-triggered),
//!   `deregister(fd)`, `select(&mut Events, Option<Duration>)` (EINTR returns no events);
//! - `Events`: `with_capacity(n)`, `iter()` yielding [`Event`] (token, readable, writable);
//! - `Waker`: `new(&Selector, token)`, `wake()` (any thread), `reset()` (poller thread).
//!
//! The socket helpers below are plain POSIX and shared by both backends.

use std::io;

mod socket;
#[cfg(all(target_os = "linux", feature = "uring"))]
pub(crate) use socket::peer_addr;
pub(crate) use socket::{
    accept, connect_finished, is_listener, listener, prepare_socket, recv, recv_spare, send,
    send_vectored, shutdown_write, start_connect, SocketKind,
};

pub(crate) mod dgram;

#[cfg(any(target_os = "linux", target_os = "android"))]
mod epoll;
#[cfg(all(target_os = "linux", feature = "uring"))]
pub(crate) mod uring;
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) use epoll::{Events, Selector, Waker};

// kqueue backends: the targets with EVFILT_USER (used by the waker) that CI type-checks.
#[cfg(any(target_os = "macos", target_os = "ios", target_os = "freebsd"))]
mod kqueue;
#[cfg(any(target_os = "macos", target_os = "ios", target_os = "freebsd"))]
pub(crate) use kqueue::{Events, Selector, Waker};

#[cfg(not(any(
    target_os = "linux",
    target_os = "android",
    target_os = "macos",
    target_os = "ios",
    target_os = "freebsd"
)))]
compile_error!("proactor supports Linux/Android (epoll) and macOS/iOS/FreeBSD (kqueue) only");

/// One readiness event, already reduced to what the driver needs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Event {
    pub(crate) token: u64,
    /// Readable, or hung up / errored: a reader should try and see what the socket says.
    pub(crate) readable: bool,
    /// Writable, or hung up / errored: a writer should try and see what the socket says.
    pub(crate) writable: bool,
    /// Hang-up or error: the peer closed or reset, or the socket failed.
    pub(crate) hup: bool,
}

/// Turns a `-1` return into the thread's `errno`.
pub(crate) fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

pub(crate) fn cvt_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// Pins the calling thread to one CPU.
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "cpu index out of range",
        ));
    }
    // SAFETY: cpu_set_t is a plain bit array; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` < CPU_SETSIZE (checked above), so the bit is inside `set`.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a live cpu_set_t of the size passed; pid 0 is the calling thread.
    cvt(unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) })?;
    Ok(())
}

/// The CPUs the calling thread may run on that [`pin_to_cpu`] can name, ascending: its
/// affinity mask, which `taskset` and a cgroup cpuset narrow (pinning to a CPU outside a
/// cpuset fails with EINVAL).
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) fn allowed_cpus() -> io::Result<Vec<usize>> {
    // The kernel refuses (EINVAL) a mask shorter than its count of possible CPUs, which can
    // exceed cpu_set_t's 1,024: grow the mask until it fits.
    let mut words = std::mem::size_of::<libc::cpu_set_t>() / std::mem::size_of::<libc::c_ulong>();
    loop {
        let mut mask: Vec<libc::c_ulong> = vec![0; words];
        let bytes = words * std::mem::size_of::<libc::c_ulong>();
        // SAFETY: `mask` is live, writable memory of `bytes` bytes, laid out as the kernel's
        // cpumask (an array of unsigned longs, cpu_set_t's own layout); pid 0 is this thread.
        let r = unsafe { libc::sched_getaffinity(0, bytes, mask.as_mut_ptr().cast()) };
        match cvt(r) {
            Ok(_) => return Ok(cpus_in_mask(&mask)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && words < 1 << 16 => words *= 2,
            Err(e) => return Err(e),
        }
    }
}

/// The CPU numbers set in an affinity mask, below `CPU_SETSIZE` (what `pin_to_cpu` takes).
#[cfg(any(target_os = "linux", target_os = "android"))]
fn cpus_in_mask(mask: &[libc::c_ulong]) -> Vec<usize> {
    let bits = libc::c_ulong::BITS as usize;
    (0..(mask.len() * bits).min(libc::CPU_SETSIZE as usize))
        .filter(|&cpu| mask[cpu / bits] >> (cpu % bits) & 1 != 0)
        .collect()
}

/// The CPUs the calling thread may run on (pinning is not available on this OS).
#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub(crate) fn allowed_cpus() -> io::Result<Vec<usize>> {
    Err(no_affinity())
}

/// Pins the calling thread to one CPU (not available on this OS).
#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub(crate) fn pin_to_cpu(_cpu: usize) -> io::Result<()> {
    Err(no_affinity())
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn no_affinity() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "poller CPU affinity is only supported on Linux",
    )
}

#[cfg(all(test, any(target_os = "linux", target_os = "android")))]
mod tests {
    use super::cpus_in_mask;

    #[test]
    fn cpus_are_read_from_every_word_of_the_mask_below_cpu_setsize() {
        let bits = libc::c_ulong::BITS as usize;
        let mut mask = vec![0 as libc::c_ulong; 2048 / bits];
        for cpu in [0, 3, bits - 1, bits, 1023, 1024, 2047] {
            mask[cpu / bits] |= 1 << (cpu % bits);
        }
        assert_eq!(cpus_in_mask(&mask), [0, 3, bits - 1, bits, 1023]);
        // (`allowed_cpus` against /proc: the pinning tests in tests/pool.rs.)
    }
}
