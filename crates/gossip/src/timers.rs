//! A queue of things due at a time, earliest first, ties in the order they were pushed:
//! the core's timers (at an `Instant`) and the simulator's events (at a `Duration` since
//! its start) are the same structure.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

struct Entry<A, T> {
    at: A,
    seq: u64,
    item: T,
}

impl<A: Ord, T> PartialEq for Entry<A, T> {
    fn eq(&self, o: &Self) -> bool {
        self.at == o.at && self.seq == o.seq
    }
}
impl<A: Ord, T> Eq for Entry<A, T> {}
impl<A: Ord, T> PartialOrd for Entry<A, T> {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl<A: Ord, T> Ord for Entry<A, T> {
    fn cmp(&self, o: &Self) -> Ordering {
        // Reversed: the max-heap pops the earliest first, ties in submission order.
        o.at.cmp(&self.at).then(o.seq.cmp(&self.seq))
    }
}

pub(crate) struct TimerQueue<A, T> {
    heap: BinaryHeap<Entry<A, T>>,
    seq: u64,
}

impl<A: Ord + Copy, T> TimerQueue<A, T> {
    pub(crate) fn new() -> Self {
        Self {
            heap: BinaryHeap::new(),
            seq: 0,
        }
    }

    pub(crate) fn push(&mut self, at: A, item: T) {
        self.seq += 1;
        self.heap.push(Entry {
            at,
            seq: self.seq,
            item,
        });
    }

    /// How many entries are queued.
    pub(crate) fn len(&self) -> usize {
        self.heap.len()
    }

    /// When the earliest entry is due.
    pub(crate) fn next_at(&self) -> Option<A> {
        self.heap.peek().map(|e| e.at)
    }

    /// The earliest entry if it is due at or before `now`.
    pub(crate) fn pop_due(&mut self, now: A) -> Option<(A, T)> {
        if self.heap.peek()?.at > now {
            return None;
        }
        self.heap.pop().map(|e| (e.at, e.item))
    }

    pub(crate) fn clear(&mut self) {
        self.heap.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::TimerQueue;

    #[test]
    fn earliest_first_ties_in_push_order() {
        let mut q = TimerQueue::new();
        q.push(5u32, "b");
        q.push(3, "a");
        q.push(5, "c");
        assert_eq!(q.next_at(), Some(3));
        assert_eq!(q.pop_due(2), None);
        assert_eq!(q.pop_due(10), Some((3, "a")));
        assert_eq!(q.pop_due(10), Some((5, "b")));
        assert_eq!(q.pop_due(10), Some((5, "c")));
        assert_eq!(q.pop_due(10), None);
    }
}
