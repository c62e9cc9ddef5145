//! Process-wide settings: the open-file limit (some tests hold 8,000 to 16,000
//! descriptors), and a child process for a test that changes one (a lower limit, CPU
//! affinity). Included by `kit.rs` (so by every helper module) and by test files that use
//! no helper module (`#[path]`).
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

/// Runs `body` in a child process (this test binary, filtered to `name`, which must be the
/// calling test's name), so what it does to the process does not touch the other tests.
pub fn in_child(name: &str, body: impl FnOnce()) {
    if std::env::var_os("PROACTOR_CHILD").is_some() {
        return body();
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env("PROACTOR_CHILD", "1")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed:\n{text}");
    assert!(text.contains("1 passed"), "child ran no test:\n{text}");
}

/// The kernel's cap on a listener's backlog (`net.core.somaxconn`; 128 if unreadable).
pub fn somaxconn() -> u32 {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(128)
}
