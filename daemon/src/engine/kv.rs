//! A sequence's page table: which pool pages hold its tokens, in order.

use edgelora_kernels::cpu::kv::PageId;

use super::EngineError;
use super::backend::PagePool;

#[derive(Debug, Default)]
pub struct SeqKv {
    pub pages: Vec<PageId>,
    /// Tokens written so far.
    pub len: usize,
}

impl SeqKv {
    pub fn new() -> Self {
        Self::default()
    }

    /// Pages needed to grow to `new_len` tokens.
    pub fn pages_needed(&self, pool: &(impl PagePool + ?Sized), new_len: usize) -> usize {
        new_len
            .div_ceil(pool.geometry().page_size)
            .saturating_sub(self.pages.len())
    }

    /// Allocates pages so `new_len` tokens fit; on failure nothing is allocated.
    pub fn reserve(
        &mut self,
        pool: &mut (impl PagePool + ?Sized),
        new_len: usize,
    ) -> Result<(), EngineError> {
        let needed = self.pages_needed(pool, new_len);
        if needed > pool.free_count() {
            return Err(EngineError::KvExhausted {
                needed,
                free: pool.free_count(),
            });
        }
        for _ in 0..needed {
            let p = pool
                .alloc()
                .ok_or(EngineError::KvExhausted { needed, free: 0 })?;
            self.pages.push(p);
        }
        Ok(())
    }

    /// Returns every page to the pool.
    pub fn release(&mut self, pool: &mut (impl PagePool + ?Sized)) {
        for p in self.pages.drain(..) {
            pool.free(p);
        }
        self.len = 0;
    }
}
