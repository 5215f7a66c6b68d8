//! Buffers of one size kept for reuse once their users drop them, process-wide.
//!
//! Why: fresh memory is not free. A new buffer is zeroed, and on a VM whose host takes
//! back the pages its guest frees (free page reporting, as on the machines we measure)
//! every first touch of a page is a fault in the host: ~9 µs per 4 KiB page, ~2.3 s
//! per GiB. Bulk paths that allocate a large buffer per use (a direct writer's blocks,
//! the chunker's read windows) take them from here instead.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// At most `max` spare buffers of `size` bytes.
pub(crate) struct SpareBuffers {
    size: usize,
    max: usize,
    spares: Mutex<Vec<Vec<u8>>>,
}

impl SpareBuffers {
    pub(crate) const fn new(size: usize, max: usize) -> Self {
        Self {
            size,
            max,
            spares: Mutex::new(Vec::new()),
        }
    }

    /// A spare buffer, or a new zeroed one; `size` bytes long either way.
    pub(crate) fn take(&self) -> Vec<u8> {
        let spare = self.lock().pop();
        spare.unwrap_or_else(|| vec![0; self.size])
    }

    /// Keeps `buffer` for the next [`Self::take`] if it is of this pool's size and the
    /// pool is not full; otherwise frees it.
    pub(crate) fn give_back(&self, buffer: Vec<u8>) {
        let mut spares = self.lock();
        if buffer.len() == self.size && spares.len() < self.max {
            spares.push(buffer);
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Vec<u8>>> {
        self.spares.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::SpareBuffers;

    #[test]
    fn buffers_given_back_are_taken_again_up_to_the_bound_and_only_of_the_right_size() {
        let pool = SpareBuffers::new(8, 2);
        let (a, b, c) = (pool.take(), pool.take(), pool.take());
        assert_eq!((a.len(), b.len(), c.len()), (8, 8, 8));
        let (a_at, b_at) = (a.as_ptr(), b.as_ptr());
        pool.give_back(a);
        pool.give_back(b);
        pool.give_back(c); // over the bound: freed
        pool.give_back(vec![0; 7]); // wrong size: freed
        let taken = [pool.take(), pool.take()];
        let mut at: Vec<_> = taken.iter().map(Vec::as_ptr).collect();
        at.sort();
        let mut expected = vec![a_at, b_at];
        expected.sort();
        assert_eq!(at, expected, "the two kept buffers come back");
        assert_eq!(pool.lock().len(), 0);
    }
}
