//! Many FIFO queues threaded through one slab.
//!
//! Every pending operation of every connection lives in one `Vec`; each connection's read and
//! write queues are doubly linked lists through it, held as two `u32` indices (the links
//! back let a timer remove its operation, by index, without walking the queue). A connection
//! with nothing pending costs 8 bytes per queue and no allocation, and a steady load reuses
//! freed slots instead of allocating (the slab keeps its peak size).

/// "No entry".
const NIL: u32 = u32::MAX;

/// One queue: indices of its first and last entries in the [`Slab`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fifo {
    head: u32,
    tail: u32,
}

impl Fifo {
    pub(crate) const EMPTY: Fifo = Fifo {
        head: NIL,
        tail: NIL,
    };

    pub(crate) fn is_empty(&self) -> bool {
        self.head == NIL
    }

    /// Exactly one entry.
    pub(crate) fn is_single(&self) -> bool {
        self.head != NIL && self.head == self.tail
    }
}

struct Entry<T> {
    /// `None` for a free slot.
    value: Option<T>,
    /// The next entry of the same queue, or of the free list.
    next: u32,
    /// The previous entry of the same queue.
    prev: u32,
}

/// The storage shared by all queues. A queue must only ever be used with one slab.
pub(crate) struct Slab<T> {
    entries: Vec<Entry<T>>,
    free: u32,
}

impl<T> Slab<T> {
    pub(crate) fn new() -> Slab<T> {
        Slab {
            entries: Vec::new(),
            free: NIL,
        }
    }

    /// Appends `value` to `q`; returns its index (for `get` and `unlink`).
    pub(crate) fn push_back(&mut self, q: &mut Fifo, value: T) -> u32 {
        let entry = Entry {
            value: Some(value),
            next: NIL,
            prev: q.tail,
        };
        let idx = if self.free != NIL {
            let idx = self.free;
            let e = &mut self.entries[idx as usize];
            self.free = e.next;
            *e = entry;
            idx
        } else {
            let idx =
                u32::try_from(self.entries.len()).expect("fewer than 2^32 pending operations");
            assert!(idx != NIL, "fewer than 2^32 - 1 pending operations");
            self.entries.push(entry);
            idx
        };
        if q.tail == NIL {
            q.head = idx;
        } else {
            self.entries[q.tail as usize].next = idx;
        }
        q.tail = idx;
        idx
    }

    /// The entry at `idx`, if it holds one.
    pub(crate) fn get(&self, idx: u32) -> Option<&T> {
        self.entries.get(idx as usize)?.value.as_ref()
    }

    pub(crate) fn get_mut(&mut self, idx: u32) -> Option<&mut T> {
        self.entries.get_mut(idx as usize)?.value.as_mut()
    }

    /// Takes the entry at `idx` out of `q` (which must be the queue it is in).
    pub(crate) fn unlink(&mut self, q: &mut Fifo, idx: u32) -> Option<T> {
        let e = self.entries.get_mut(idx as usize)?;
        let value = e.value.take()?;
        let (prev, next) = (e.prev, e.next);
        e.next = self.free;
        self.free = idx;
        if prev == NIL {
            debug_assert_eq!(q.head, idx, "the entry heads the queue it is taken from");
            q.head = next;
        } else {
            self.entries[prev as usize].next = next;
        }
        if next == NIL {
            q.tail = prev;
        } else {
            self.entries[next as usize].prev = prev;
        }
        Some(value)
    }

    pub(crate) fn front(&self, q: &Fifo) -> Option<&T> {
        self.entries.get(q.head as usize)?.value.as_ref()
    }

    pub(crate) fn front_mut(&mut self, q: &Fifo) -> Option<&mut T> {
        self.entries.get_mut(q.head as usize)?.value.as_mut()
    }

    pub(crate) fn pop_front(&mut self, q: &mut Fifo) -> Option<T> {
        self.unlink(q, q.head)
    }

    pub(crate) fn iter<'a>(&'a self, q: &Fifo) -> impl Iterator<Item = &'a T> + 'a {
        let mut idx = q.head;
        std::iter::from_fn(move || {
            let e = self.entries.get(idx as usize)?;
            idx = e.next;
            e.value.as_ref()
        })
    }

    /// Calls `f` on the entries of `q`, in order, until it returns `false`.
    #[cfg(any(all(target_os = "linux", feature = "uring"), feature = "tls"))]
    pub(crate) fn walk_mut(&mut self, q: &Fifo, mut f: impl FnMut(&mut T) -> bool) {
        let mut idx = q.head;
        while idx != NIL {
            let e = &mut self.entries[idx as usize];
            let next = e.next;
            if let Some(v) = e.value.as_mut() {
                if !f(v) {
                    break;
                }
            }
            idx = next;
        }
    }

    /// Unlinks and returns the first entry matching `pred` (a walk of the queue).
    #[cfg(test)]
    pub(crate) fn remove(&mut self, q: &mut Fifo, pred: impl Fn(&T) -> bool) -> Option<T> {
        let mut idx = q.head;
        while idx != NIL {
            let e = &self.entries[idx as usize];
            if e.value.as_ref().is_some_and(&pred) {
                return self.unlink(q, idx);
            }
            idx = e.next;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// xorshift64: a tiny seeded PRNG, so failures reproduce.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn matches_a_vecdeque_model_under_random_operations() {
        for seed in 1..=20u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let mut slab = Slab::new();
            let mut queues = [Fifo::EMPTY; 5];
            let mut model: [VecDeque<u64>; 5] = Default::default();
            let mut next = 0u64;
            for step in 0..5_000 {
                let q = (rng.next() % 5) as usize;
                match rng.next() % 10 {
                    0..=4 => {
                        slab.push_back(&mut queues[q], next);
                        model[q].push_back(next);
                        next += 1;
                    }
                    5..=7 => assert_eq!(slab.pop_front(&mut queues[q]), model[q].pop_front()),
                    8 if rng.next() % 2 == 0 => {
                        // By index, as a timer does: the k-th entry of the queue.
                        let k = (rng.next() % (model[q].len() as u64 + 1)) as usize;
                        let mut idx = queues[q].head;
                        for _ in 0..k {
                            if idx == NIL {
                                break;
                            }
                            idx = slab.entries[idx as usize].next;
                        }
                        if idx != NIL {
                            let got = slab.unlink(&mut queues[q], idx);
                            assert_eq!(got, model[q].remove(k), "seed {seed} step {step}");
                        }
                    }
                    8 => {
                        let pick = rng.next() % (next + 1);
                        let got = slab.remove(&mut queues[q], |&v| v == pick);
                        let pos = model[q].iter().position(|&v| v == pick);
                        assert_eq!(
                            got,
                            pos.and_then(|p| model[q].remove(p)),
                            "seed {seed} step {step}"
                        );
                    }
                    _ => {
                        if let Some(v) = slab.front_mut(&queues[q]) {
                            *v += 1_000_000;
                        }
                        if let Some(v) = model[q].front_mut() {
                            *v += 1_000_000;
                        }
                    }
                }
                for (q, m) in queues.iter().zip(&model) {
                    assert!(slab.iter(q).eq(m.iter()), "seed {seed} step {step}");
                    // And backwards, through the links back.
                    let mut back = Vec::new();
                    let mut idx = q.tail;
                    while idx != NIL {
                        back.push(slab.entries[idx as usize].value.as_ref().unwrap());
                        idx = slab.entries[idx as usize].prev;
                    }
                    assert!(
                        back.into_iter().rev().eq(m.iter()),
                        "seed {seed} step {step}"
                    );
                    assert_eq!(q.is_empty(), m.is_empty());
                    assert_eq!(slab.front(q), m.front());
                }
            }
            // Every slot is either live in a queue or on the free list: nothing leaks.
            let live: usize = model.iter().map(VecDeque::len).sum();
            let mut free = 0;
            let mut idx = slab.free;
            while idx != NIL {
                free += 1;
                idx = slab.entries[idx as usize].next;
            }
            assert_eq!(live + free, slab.entries.len());
        }
    }

    #[test]
    fn freed_slots_are_reused() {
        let mut slab = Slab::new();
        let mut q = Fifo::EMPTY;
        for round in 0..100 {
            for i in 0..8 {
                slab.push_back(&mut q, round * 8 + i);
            }
            for i in 0..8 {
                assert_eq!(slab.pop_front(&mut q), Some(round * 8 + i));
            }
            assert!(q.is_empty());
        }
        assert_eq!(slab.entries.len(), 8);
    }
}
