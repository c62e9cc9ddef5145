//! Socket options the tests set on their own peer sockets; included by `kit.rs` (`#[path]`),
//! which every helper module includes, so one `setsockopt` wrapper serves them all.
#![allow(dead_code)]

use std::os::fd::AsRawFd;

/// `setsockopt` with a value of any plain type; panics with the OS error on failure.
pub fn set_opt<T>(fd: &impl AsRawFd, level: libc::c_int, name: libc::c_int, value: &T) {
    // SAFETY: `value` points to a live T of the size passed; the fd is borrowed for the call.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "setsockopt: {}", std::io::Error::last_os_error());
}

/// `getsockopt` of an option whose value is the plain C type `T`, starting from `val`;
/// panics with the OS error on failure.
pub fn get_opt<T: Copy>(fd: &impl AsRawFd, level: libc::c_int, name: libc::c_int, mut val: T) -> T {
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: `val` and `len` are live locals of the sizes getsockopt is told; the kernel
    // writes at most `len` bytes of the option's plain C value.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut val as *mut T).cast(),
            &mut len,
        )
    };
    assert_eq!(r, 0, "getsockopt: {}", std::io::Error::last_os_error());
    val
}

/// SO_LINGER {on, `secs`}.
pub fn set_linger(fd: &impl AsRawFd, secs: libc::c_int) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: secs,
    };
    set_opt(fd, libc::SOL_SOCKET, libc::SO_LINGER, &linger);
}

/// SO_LINGER {on, 0}: closing the socket then sends RST instead of FIN.
pub fn set_linger_zero(fd: &impl AsRawFd) {
    set_linger(fd, 0);
}
