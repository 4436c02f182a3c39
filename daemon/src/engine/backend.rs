//! Where a step runs: the CPU (the KV pool itself is the backend) or a CUDA device.
//!
//! Generation, evaluation and the scheduler call [`Backend::step`]; they never see which device
//! holds the weights and the KV pages. A sequence's [`SeqKv`] holds page ids of its backend's pool.

use edgelora_kernels::cpu::kv::{KvGeometry, KvPool, PageId};

use super::{EngineError, ForwardOptions, SeqKv, SeqStep, forward};
use crate::adapters::LoraAdapter;
use crate::model::Model;

/// A pool of KV pages: what a sequence's page table needs from it.
pub trait PagePool {
    fn geometry(&self) -> &KvGeometry;
    fn free_count(&self) -> usize;
    fn alloc(&mut self) -> Option<PageId>;
    fn free(&mut self, page: PageId);
}

impl PagePool for KvPool {
    fn geometry(&self) -> &KvGeometry {
        KvPool::geometry(self)
    }
    fn free_count(&self) -> usize {
        KvPool::free_count(self)
    }
    fn alloc(&mut self) -> Option<PageId> {
        KvPool::alloc(self)
    }
    fn free(&mut self, page: PageId) {
        KvPool::free(self, page)
    }
}

/// One forward step over a batch of sequences, on some device.
pub trait Backend {
    /// As [`forward`]: per sequence, `[n_new, vocab]` logits when `all_logits`, else `[vocab]`.
    fn step(
        &mut self,
        model: &Model,
        seqs: &mut [SeqStep<'_>],
        opts: &ForwardOptions,
    ) -> Result<Vec<Vec<f32>>, EngineError>;
    /// Returns a finished sequence's pages.
    fn release(&mut self, kv: &mut SeqKv);
    /// Tokens per KV page.
    fn page_size(&self) -> usize;
    /// KV pages free now.
    fn free_pages(&self) -> usize;
    /// "cpu" or "cuda:0 (NVIDIA H100 80GB HBM3, sm_90)".
    fn describe(&self) -> String;
    /// Bytes one page holds: the unit in which adapters are charged to the pool.
    fn page_bytes(&self) -> usize;
    /// Takes `n` free pages for something other than a sequence's KV (a resident adapter), all
    /// or none.
    fn take_pages(&mut self, n: usize) -> Option<Vec<PageId>>;
    /// Returns pages taken by [`Backend::take_pages`].
    fn give_pages(&mut self, pages: Vec<PageId>);
    /// An adapter became resident: a device backend starts copying it (asynchronously).
    fn adapter_resident(&mut self, _adapter: &LoraAdapter) -> Result<(), EngineError> {
        Ok(())
    }
    /// An adapter is about to be dropped: a device backend frees its copy.
    fn adapter_evicted(&mut self, _adapter: &LoraAdapter) -> Result<(), EngineError> {
        Ok(())
    }
}

/// [`Backend::take_pages`] over any page pool: all `n` or none.
pub fn take_pages(pool: &mut (impl PagePool + ?Sized), n: usize) -> Option<Vec<PageId>> {
    if pool.free_count() < n {
        return None;
    }
    let pages: Vec<PageId> = (0..n).map_while(|_| pool.alloc()).collect();
    if pages.len() < n {
        for p in pages {
            pool.free(p);
        }
        return None;
    }
    Some(pages)
}

impl Backend for KvPool {
    fn step(
        &mut self,
        model: &Model,
        seqs: &mut [SeqStep<'_>],
        opts: &ForwardOptions,
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        forward(model, self, seqs, opts)
    }
    fn release(&mut self, kv: &mut SeqKv) {
        kv.release(self)
    }
    fn page_size(&self) -> usize {
        KvPool::geometry(self).page_size
    }
    fn free_pages(&self) -> usize {
        KvPool::free_count(self)
    }
    fn describe(&self) -> String {
        "cpu".into()
    }
    fn page_bytes(&self) -> usize {
        KvPool::bytes_per_page(self)
    }
    fn take_pages(&mut self, n: usize) -> Option<Vec<PageId>> {
        take_pages(self, n)
    }
    fn give_pages(&mut self, pages: Vec<PageId>) {
        for p in pages {
            KvPool::free(self, p);
        }
    }
}
