//! Choosing a watcher's I/O engine: [`Engine`] (what to use), [`EngineKind`] (what runs),
//! [`Unavailable`] (why io_uring does not).

use std::fmt;
use std::io;
use std::str::FromStr;

/// Which I/O engine a watcher runs on ([`WatcherBuilder::engine`]). Every engine gives the
/// same commands, ordering, deadlines and completions; only the I/O underneath differs.
///
/// Without an explicit choice the environment variable `PROACTOR_ENGINE` (`auto`, `uring`,
/// or `epoll`; `kqueue` on BSD and macOS) decides, and without it [`Engine::Auto`].
///
/// ```
/// use proactor::{Engine, Watcher};
///
/// # fn main() -> std::io::Result<()> {
/// let watcher = Watcher::builder().engine(Engine::Auto).build()?;
/// println!("running on {}", watcher.stats().engine); // io_uring, epoll or kqueue
/// if let Some(why) = watcher.stats().uring_unavailable {
///     eprintln!("io_uring unavailable: {why}");
/// }
/// # Ok(()) }
/// ```
///
/// [`WatcherBuilder::engine`]: crate::WatcherBuilder::engine
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Engine {
    /// io_uring where the kernel offers what the engine needs (and the crate was built with
    /// the `uring` feature), else the readiness engine; the watcher's
    /// [`Stats::uring_unavailable`](crate::Stats::uring_unavailable) says why not.
    #[default]
    Auto,
    /// io_uring (Linux, the `uring` feature): building fails if it cannot be used, with an
    /// error that names the cause and the fix.
    Uring,
    /// The readiness engine: epoll on Linux and Android, kqueue on macOS, iOS and FreeBSD.
    Readiness,
}

impl FromStr for Engine {
    type Err = io::Error;

    /// `auto`, `uring` (or `io_uring`), `epoll` (Linux), `kqueue` (BSD, macOS), `readiness`.
    fn from_str(s: &str) -> io::Result<Engine> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Engine::Auto),
            "uring" | "io_uring" | "io-uring" => Ok(Engine::Uring),
            "readiness" => Ok(Engine::Readiness),
            "epoll" if cfg!(any(target_os = "linux", target_os = "android")) => {
                Ok(Engine::Readiness)
            }
            "kqueue" if cfg!(not(any(target_os = "linux", target_os = "android"))) => {
                Ok(Engine::Readiness)
            }
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("unknown engine {s:?} (expected auto, uring or {READINESS})"),
            )),
        }
    }
}

/// The name of this platform's readiness engine.
const READINESS: &str = if cfg!(any(target_os = "linux", target_os = "android")) {
    "epoll"
} else {
    "kqueue"
};

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Engine::Auto => "auto",
            Engine::Uring => "uring",
            Engine::Readiness => READINESS,
        })
    }
}

/// The engine a watcher runs on ([`Stats::engine`](crate::Stats::engine)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EngineKind {
    /// epoll, edge-triggered.
    Epoll,
    /// kqueue, `EV_CLEAR`.
    Kqueue,
    /// io_uring.
    Uring,
}

impl EngineKind {
    /// This platform's readiness engine.
    pub(crate) const READINESS: EngineKind =
        if cfg!(any(target_os = "linux", target_os = "android")) {
            EngineKind::Epoll
        } else {
            EngineKind::Kqueue
        };
}

impl Default for EngineKind {
    fn default() -> EngineKind {
        EngineKind::READINESS
    }
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EngineKind::Epoll => "epoll",
            EngineKind::Kqueue => "kqueue",
            EngineKind::Uring => "io_uring",
        })
    }
}

/// Why io_uring cannot be used here: what [`Engine::Auto`] fell back for
/// ([`Stats::uring_unavailable`](crate::Stats::uring_unavailable)), and the error inside what
/// [`WatcherBuilder::build`](crate::WatcherBuilder::build) returns for [`Engine::Uring`]
/// (`io::Error::get_ref` and `downcast_ref::<Unavailable>()` give it back). Its message names
/// the cause and the fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Unavailable {
    /// Not on this platform, or the crate was built without its `uring` feature.
    NotBuilt,
    /// The `kernel.io_uring_disabled` sysctl forbids it (1: only for privileged users or
    /// the `kernel.io_uring_group` group; 2: for everyone).
    Disabled {
        /// The sysctl's value.
        sysctl: u8,
    },
    /// `io_uring_setup` failed with `EPERM` or `EACCES` otherwise: a seccomp filter (Docker's
    /// default profile blocks io_uring) or a security module.
    Forbidden {
        /// The errno.
        errno: i32,
    },
    /// `ENOSYS`: a kernel built without io_uring (or a filter that answers so).
    NoKernelSupport,
    /// `ENOMEM`: the ring does not fit in `RLIMIT_MEMLOCK`.
    MemoryLimit,
    /// The kernel lacks an operation the engine needs (it names it; kernels before 5.19).
    MissingOperation(&'static str),
    /// Receiving into a ring of provided buffers does not work (kernels before 5.19).
    NoBufferRing,
    /// Another error.
    Other {
        /// The errno (0 if none).
        errno: i32,
    },
}

impl Unavailable {
    /// What an `io_uring_setup` (or registration) error means.
    pub(crate) fn from_setup(e: &io::Error) -> Unavailable {
        match e.raw_os_error() {
            Some(libc::EPERM) => match io_uring_disabled() {
                Some(v) if v > 0 => Unavailable::Disabled { sysctl: v },
                _ => Unavailable::Forbidden { errno: libc::EPERM },
            },
            Some(libc::EACCES) => Unavailable::Forbidden {
                errno: libc::EACCES,
            },
            Some(libc::ENOSYS) => Unavailable::NoKernelSupport,
            Some(libc::ENOMEM) => Unavailable::MemoryLimit,
            Some(errno) => Unavailable::Other { errno },
            None => Unavailable::Other { errno: 0 },
        }
    }

    /// The error `build` returns when io_uring was asked for.
    pub(crate) fn into_io_error(self) -> io::Error {
        let kind = match self {
            Unavailable::Disabled { .. } | Unavailable::Forbidden { .. } => {
                io::ErrorKind::PermissionDenied
            }
            Unavailable::MemoryLimit => io::ErrorKind::OutOfMemory,
            Unavailable::Other { .. } => io::ErrorKind::Other,
            _ => io::ErrorKind::Unsupported,
        };
        io::Error::new(kind, self)
    }
}

/// `kernel.io_uring_disabled` (Linux 6.6 and later), if it can be read.
fn io_uring_disabled() -> Option<u8> {
    std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .ok()?
        .trim()
        .parse()
        .ok()
}

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unavailable::NotBuilt => write!(
                f,
                "io_uring is Linux-only and needs the crate's `uring` feature (on by default)"
            ),
            Unavailable::Disabled { sysctl } => write!(
                f,
                "io_uring_setup: permission denied: kernel.io_uring_disabled is {sysctl} \
                 (set it to 0, e.g. `sysctl kernel.io_uring_disabled=0`, or run as a member \
                 of kernel.io_uring_group when it is 1)"
            ),
            Unavailable::Forbidden { errno } => write!(
                f,
                "io_uring_setup: {}: probably a seccomp filter (Docker's default profile \
                 blocks io_uring: run with a profile that allows io_uring_setup, \
                 io_uring_enter and io_uring_register) or a security module",
                io::Error::from_raw_os_error(*errno)
            ),
            Unavailable::NoKernelSupport => write!(
                f,
                "io_uring_setup: not implemented: a kernel without io_uring \
                 (CONFIG_IO_URING), or a filter that hides it"
            ),
            Unavailable::MemoryLimit => write!(
                f,
                "io_uring_setup: out of memory: the ring does not fit in RLIMIT_MEMLOCK \
                 (raise it with `ulimit -l`, or make the ring smaller: \
                 WatcherBuilder::uring_entries)"
            ),
            Unavailable::MissingOperation(op) => write!(
                f,
                "this kernel's io_uring lacks the {op} operation (a kernel of 5.19 or later \
                 has every operation the engine uses)"
            ),
            Unavailable::NoBufferRing => write!(
                f,
                "this kernel's io_uring cannot receive into a ring of provided buffers \
                 (needs Linux 5.19 or later)"
            ),
            Unavailable::Other { errno } => write!(
                f,
                "io_uring could not be set up: {}",
                io::Error::from_raw_os_error(*errno)
            ),
        }
    }
}

impl std::error::Error for Unavailable {}
