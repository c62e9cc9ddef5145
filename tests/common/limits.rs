//! The open-file limit: some tests hold 8,000 to 16,000 descriptors. Included by `kit.rs`
//! (so by every helper module) and by test files that use no helper module (`#[path]`).
#![allow(dead_code)]

use std::sync::Once;

/// Raises this process's soft limit on open files to its hard limit, once per process (child
/// processes inherit it). Many systems start processes at a soft limit of 1,024 under a much
/// higher hard limit, which any process may raise itself to; a test that still needs more
/// than the hard limit fails with `EMFILE`, naming the descriptor it could not open.
pub fn raise_fd_limit() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `lim` is a live rlimit the call fills in.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
            return;
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            // SAFETY: a valid rlimit; raising the soft limit up to the hard one is allowed.
            unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
        }
    });
}
