//! Delivery of completions into channels, and back-pressure from bounded ones.
//!
//! An unbounded channel (the default mailbox) takes every completion at once. A bounded one
//! (a mailbox or a `register_with` route the user made bounded) may be full: its completions
//! then wait here, in order, one queue per channel, so a receiver that stops draining holds
//! back its own completions only. The head of each queue is sent with flume's `send_async`,
//! polled with a waker that wakes the poller when the receiver makes room: no timer, no
//! polling loop, and a rendezvous channel (capacity 0) works at one wake-up per completion.
//!
//! A completion counts as in flight for its connection until it is delivered (`op_done`), so
//! `max_ops_per_conn` bounds what waits here: a producer that keeps sending to a connection
//! whose completions cannot be delivered is refused with `SendError::Full`.
//!
//! At `close` the poller hands what still waits to a thread of its own (`drain`), which goes
//! on delivering as room is made and drops what is left for a channel whose receivers are all
//! gone; it holds only the senders of the channels that still owe something, so a stuck
//! receiver delays nobody else, and the watcher's mailbox disconnects as soon as it is owed
//! nothing.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::thread;

use flume::r#async::SendFut;

use crate::{Completion, Conn, Op};

/// Whether this completion ends an operation counted in flight (all but `Free` and `Detach`,
/// which `Shared::submit` does not count).
#[inline(always)]
pub(crate) fn counts(c: &Completion) -> bool {
    !matches!(c.op, Op::Free | Op::Detach)
}

/// Hands `c` to an unbounded channel (or drops it, if every receiver is gone) and counts it
/// delivered. Called by the thread driving the watcher, the only writer of `done`.
#[inline(always)]
pub(crate) fn send_unbounded(to: &flume::Sender<Completion>, c: Completion) {
    if counts(&c) {
        c.conn.op_done();
    }
    let _ = to.send(c);
}

/// The completions waiting for room in one full bounded channel, oldest first.
pub(crate) struct Stalled {
    to: flume::Sender<Completion>,
    /// The oldest, being sent: taken by the receiver as soon as it makes room, which wakes
    /// whoever polled it last. The handle counts it delivered then.
    sending: Option<(SendFut<'static, Completion>, Option<Conn>)>,
    queue: VecDeque<Completion>,
}

/// What a [`Stalled::pump`] did.
pub(crate) struct Pumped {
    /// Something reached the channel (a waiter must be woken).
    pub(crate) posted: bool,
    /// Nothing is left to deliver (delivered, or dropped for lack of a receiver).
    pub(crate) done: bool,
}

impl Stalled {
    /// Whether this queue is for the channel of `to`.
    pub(crate) fn is(&self, to: &flume::Sender<Completion>) -> bool {
        self.to.same_channel(to)
    }

    /// Queues `c` behind the others.
    pub(crate) fn push(&mut self, c: Completion) {
        self.queue.push_back(c);
    }

    pub(crate) fn len(&self) -> usize {
        self.queue.len() + usize::from(self.sending.is_some())
    }

    /// Delivers as much as the channel takes now; the rest waits for `cx`'s waker.
    pub(crate) fn pump(&mut self, cx: &mut Context<'_>) -> Pumped {
        let mut posted = false;
        loop {
            if let Some((fut, conn)) = &mut self.sending {
                let r = match Pin::new(fut).poll(cx) {
                    Poll::Pending => {
                        return Pumped {
                            posted,
                            done: false,
                        }
                    }
                    Poll::Ready(r) => r,
                };
                if let Some(conn) = conn.take() {
                    conn.op_done();
                }
                self.sending = None;
                match r {
                    Ok(()) => posted = true,
                    Err(_) => {
                        // No receiver is left: nothing more can be delivered here.
                        self.drop_rest();
                        return Pumped { posted, done: true };
                    }
                }
            }
            let Some(c) = self.queue.pop_front() else {
                return Pumped { posted, done: true };
            };
            match try_bounded(&self.to, c) {
                Ok(delivered) => posted |= delivered,
                Err(c) => {
                    let conn = counts(&c).then(|| c.conn.clone());
                    self.sending = Some((self.to.clone().into_send_async(c), conn));
                }
            }
        }
    }

    /// Drops what is left, counting each completion done (its receiver is gone).
    fn drop_rest(&mut self) {
        for c in self.queue.drain(..) {
            if counts(&c) {
                c.conn.op_done();
            }
        }
    }
}

/// Posts `c` to a bounded channel without waiting: `Ok(true)` delivered, `Ok(false)` dropped
/// for lack of a receiver (counted done either way), `Err(c)` full. (The completion comes
/// back by value, as `try_send` gives it: no allocation to box it on this path.)
#[allow(clippy::result_large_err)]
fn try_bounded(to: &flume::Sender<Completion>, c: Completion) -> Result<bool, Completion> {
    // The handle is needed after `try_send` took the completion; only bounded channels pay
    // for the clone.
    let conn = counts(&c).then(|| c.conn.clone());
    match to.try_send(c) {
        Err(flume::TrySendError::Full(c)) => Err(c),
        r => {
            if let Some(conn) = conn {
                conn.op_done();
            }
            Ok(r.is_ok())
        }
    }
}

/// Delivers `c` to `to`, or starts a queue for it in `backlog` when that bounded channel is
/// full (or already has one). Returns whether it reached a channel.
pub(crate) fn deliver(
    backlog: &mut Vec<Stalled>,
    to: &flume::Sender<Completion>,
    c: Completion,
) -> bool {
    if let Some(s) = backlog.iter_mut().find(|s| s.is(to)) {
        s.push(c);
        return false;
    }
    if to.capacity().is_none() {
        send_unbounded(to, c);
        return true;
    }
    match try_bounded(to, c) {
        Ok(delivered) => delivered,
        Err(c) => {
            backlog.push(Stalled {
                to: to.clone(),
                sending: None,
                queue: VecDeque::from([c]),
            });
            false
        }
    }
}

/// Pumps every stalled queue, keeping those with something left. Returns whether anything
/// reached a channel.
pub(crate) fn pump_all(backlog: &mut Vec<Stalled>, cx: &mut Context<'_>) -> bool {
    let mut posted = false;
    backlog.retain_mut(|s| {
        let p = s.pump(cx);
        posted |= p.posted;
        !p.done
    });
    posted
}

/// The completions waiting in `backlog`.
pub(crate) fn waiting(backlog: &[Stalled]) -> usize {
    backlog.iter().map(Stalled::len).sum()
}

/// A waker that sets a flag and signals a condition variable: the drain thread's.
#[derive(Default)]
struct Signal {
    woken: Mutex<bool>,
    cond: Condvar,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        *self.woken.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.cond.notify_one();
    }
}

/// Delivers what `backlog` still holds after the poller stopped, on a thread of its own so
/// that `close` never waits for a receiver (perhaps its own caller). `posted` runs after each
/// pass that delivered something and once at the end, after every sender held here is gone.
/// Only if no thread can be started does the caller deliver itself, blocking.
pub(crate) fn drain(backlog: Vec<Stalled>, posted: impl Fn() + Send + 'static) {
    if backlog.is_empty() {
        return;
    }
    let slot = Arc::new(Mutex::new(Some((backlog, posted))));
    let theirs = slot.clone();
    let run = move || {
        if let Some((backlog, posted)) = theirs.lock().unwrap_or_else(|p| p.into_inner()).take() {
            drain_here(backlog, &posted);
        }
    };
    if thread::Builder::new()
        .name("proactor-drain".into())
        .spawn(run)
        .is_err()
    {
        let taken = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some((backlog, posted)) = taken {
            drain_here(backlog, &posted);
        }
    }
}

fn drain_here(mut backlog: Vec<Stalled>, posted: &dyn Fn()) {
    let signal = Arc::new(Signal::default());
    let waker = Waker::from(signal.clone());
    let mut cx = Context::from_waker(&waker);
    loop {
        if pump_all(&mut backlog, &mut cx) {
            posted();
        }
        if backlog.is_empty() {
            break;
        }
        let mut woken = signal.woken.lock().unwrap_or_else(|p| p.into_inner());
        while !*woken {
            woken = signal.cond.wait(woken).unwrap_or_else(|p| p.into_inner());
        }
        *woken = false;
    }
    drop(backlog);
    posted();
}
