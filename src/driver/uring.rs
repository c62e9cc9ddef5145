//! The io_uring engine (work in progress).

use std::time::Duration;

use super::{ConnState, Core, Engine, Pending};
use crate::conn::Key;
use crate::fifo::Slab;

pub(crate) struct Uring;

impl Engine for Uring {
    fn runnable(&self, _st: &ConnState, _ops: &Slab<Pending>) -> bool {
        false
    }
    fn run(&mut self, _core: &mut Core, _id: Key) {}
    fn wait(&mut self, _core: &mut Core, _timeout: Option<Duration>) {}
}
