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

/// SO_LINGER {on, 0}: closing the socket then sends RST instead of FIN.
pub fn set_linger_zero(fd: &impl AsRawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    set_opt(fd, libc::SOL_SOCKET, libc::SO_LINGER, &linger);
}
