//! Which adapters occupy the pool now: loads on a miss, sharing, pinning, eviction.
//!
//! The pool is the backend's page pool — the same pages that hold KV (S-LoRA's unified paging):
//! a resident adapter is charged whole pages in proportion to its size (rank × targets), taken
//! from the free list when its load starts, so a box with few adapters in use has more KV and
//! vice versa. On a miss the scheduler asks [`Residency::acquire`], which reserves pages (evicting
//! idle adapters least-recently-used when needed) and hands the pack to the loader thread; the
//! step loop keeps running other sequences meanwhile. Requests for an adapter already loading
//! wait for that one load. Adapters of running sequences are pinned (never evicted); adapters
//! wanted by queued requests are evicted only when nothing else is idle. A failed load (digest
//! mismatch, I/O error) marks that pack version failed: its requests get the error, others go on.
//!
//! The loader thread streams the pack with the hal's reader (io_uring with O_DIRECT, or pread
//! where io_uring is unavailable), checks it and builds the runtime adapter; a CUDA backend then
//! copies it to the device on its upload stream ([`Backend::adapter_resident`]).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgelora_hal::storage::{FileReader, ReaderConfig, StorageKind};
use edgelora_kernels::cpu::kv::PageId;
use edgelora_kernels::cpu::lora::AdapterBits;

use super::LoraAdapter;
use super::pack::{self, PackError, PackInfo};
use crate::engine::Backend;
use crate::engine::metrics::EngineMetrics;
use crate::model::ModelConfig;

/// A pack version: its id and payload digest (a re-imported adapter is a different key, so a
/// stale copy is never served).
pub type AdapterKey = (String, [u8; 32]);

pub fn key_of(info: &PackInfo) -> AdapterKey {
    (info.id().to_string(), info.payload_digest)
}

#[derive(Clone, Debug, Default)]
pub struct ResidencyConfig {
    /// At most this many adapters resident (loading included); 0: only the page budget limits.
    pub max_adapters: usize,
    pub reader: ReaderConfig,
    /// The integer form adapters are decoded to (int8 unless the daemon was asked for int4).
    pub adapter_bits: AdapterBits,
}

/// What [`Residency::acquire`] found.
#[derive(Debug)]
pub enum Acquire {
    /// Resident and now pinned for the caller (unpin with [`Residency::release`]).
    Ready(Arc<LoraAdapter>),
    /// Loading (or waiting for room to load); ask again after the next poll.
    Pending,
    /// This pack cannot be loaded; the message names the adapter and why.
    Failed(String),
}

/// An adapter's state as the admin API shows it.
#[derive(Clone, Debug, PartialEq)]
pub enum ResidentState {
    Loading,
    Resident { pins: usize, pages: usize },
    Failed(String),
}

enum Slot {
    Loading {
        pages: Vec<PageId>,
    },
    Resident {
        adapter: Arc<LoraAdapter>,
        pages: Vec<PageId>,
        pins: usize,
        last_used: u64,
    },
    Failed(String),
}

struct Job {
    key: AdapterKey,
    info: Arc<PackInfo>,
}

struct Done {
    key: AdapterKey,
    result: Result<LoraAdapter, PackError>,
    bytes: u64,
    secs: f64,
}

/// Counters for tests and the bench (the Prometheus metrics carry the same per adapter).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ResidencyStats {
    pub hits: u64,
    pub misses: u64,
    pub loads: u64,
    pub evictions: u64,
    pub failures: u64,
    pub bytes_read: u64,
    pub load_secs: f64,
}

pub struct Residency {
    cfg: ResidencyConfig,
    slots: HashMap<AdapterKey, Slot>,
    /// Resident adapters by address, for [`Residency::release`].
    by_ptr: HashMap<usize, AdapterKey>,
    tick: u64,
    jobs: Sender<Job>,
    done: Receiver<Done>,
    /// Finished loads received while waiting, applied at the next poll.
    arrived: Vec<Done>,
    storage: (StorageKind, String),
    pub stats: ResidencyStats,
    metrics: Option<EngineMetrics>,
    /// What the admin API reads: id → state, republished on every change.
    view: Arc<Mutex<HashMap<String, ResidentState>>>,
}

impl Residency {
    /// Starts the loader thread (it owns the storage reader).
    pub fn new(cfg: ResidencyConfig, config: ModelConfig) -> Self {
        let reader = FileReader::new(cfg.reader.clone());
        let storage = (reader.kind(), reader.why().to_string());
        let (jobs, job_rx) = std::sync::mpsc::channel::<Job>();
        let (done_tx, done) = std::sync::mpsc::channel::<Done>();
        let bits = cfg.adapter_bits;
        std::thread::Builder::new()
            .name("edgelora-adapter-loader".into())
            .spawn(move || loader(reader, config, bits, job_rx, done_tx))
            .expect("spawning the adapter loader thread");
        Self {
            cfg,
            slots: HashMap::new(),
            by_ptr: HashMap::new(),
            tick: 0,
            jobs,
            done,
            arrived: Vec::new(),
            storage,
            stats: ResidencyStats::default(),
            metrics: None,
            view: Arc::default(),
        }
    }

    pub fn set_metrics(&mut self, m: EngineMetrics) {
        m.storage_reader
            .get_or_create(&crate::engine::metrics::StorageLabel {
                reader: self.storage.0.to_string(),
            })
            .set(1);
        self.metrics = Some(m);
    }

    /// The reader in use and why (io_uring, or pread and the reason).
    pub fn storage(&self) -> (StorageKind, &str) {
        (self.storage.0, &self.storage.1)
    }

    /// The state of every adapter the pool knows, by id, shared with the API.
    pub fn view(&self) -> Arc<Mutex<HashMap<String, ResidentState>>> {
        self.view.clone()
    }

    /// Pins `info`'s adapter when resident; otherwise starts its load when there is room (or
    /// room can be made by evicting idle adapters not in `wanted` — or any idle adapter when
    /// `must_progress`, i.e. nothing else runs) without touching the `reserve` pages the running
    /// sequences need next.
    pub fn acquire(
        &mut self,
        info: &Arc<PackInfo>,
        backend: &mut (impl Backend + ?Sized),
        wanted: &HashSet<AdapterKey>,
        reserve: usize,
        must_progress: bool,
    ) -> Acquire {
        let key = key_of(info);
        self.tick += 1;
        let tick = self.tick;
        match self.slots.get_mut(&key) {
            Some(Slot::Resident {
                adapter,
                pins,
                last_used,
                ..
            }) => {
                *pins += 1;
                *last_used = tick;
                let a = adapter.clone();
                self.publish(&key);
                Acquire::Ready(a)
            }
            Some(Slot::Loading { .. }) => Acquire::Pending,
            Some(Slot::Failed(msg)) => Acquire::Failed(msg.clone()),
            None => {
                self.start_load(info, backend, wanted, reserve, !must_progress);
                Acquire::Pending
            }
        }
    }

    /// Starts loading a queued request's adapter ahead of its admission when that needs no
    /// eviction of anything wanted. Returns whether a load is now under way or done.
    pub fn prefetch(
        &mut self,
        info: &Arc<PackInfo>,
        backend: &mut (impl Backend + ?Sized),
        wanted: &HashSet<AdapterKey>,
        reserve: usize,
    ) -> bool {
        match self.slots.get(&key_of(info)) {
            Some(Slot::Failed(_)) => false,
            Some(_) => true,
            None => self.start_load(info, backend, wanted, reserve, true),
        }
    }

    /// Whether `info`'s adapter is resident, loading or failed.
    pub fn known(&self, info: &PackInfo) -> bool {
        self.slots.contains_key(&key_of(info))
    }

    /// Counts a request for an adapter as a hit (resident when it arrived) or a miss.
    pub fn count_request(&mut self, info: &PackInfo) {
        let hit = matches!(self.slots.get(&key_of(info)), Some(Slot::Resident { .. }));
        if hit {
            self.stats.hits += 1;
        } else {
            self.stats.misses += 1;
        }
        if let Some(m) = &self.metrics {
            let l = EngineMetrics::adapter(info.id());
            if hit {
                m.adapter_hits.get_or_create(&l).inc();
            } else {
                m.adapter_misses.get_or_create(&l).inc();
            }
        }
    }

    /// Unpins an adapter acquired for a sequence that finished, was preempted or cancelled.
    pub fn release(&mut self, adapter: &Arc<LoraAdapter>) {
        let Some(key) = self.by_ptr.get(&(Arc::as_ptr(adapter) as usize)).cloned() else {
            return;
        };
        if let Some(Slot::Resident { pins, .. }) = self.slots.get_mut(&key) {
            *pins = pins.saturating_sub(1);
        }
        self.publish(&key);
    }

    /// Loads under way.
    pub fn loading(&self) -> usize {
        self.slots
            .values()
            .filter(|s| matches!(s, Slot::Loading { .. }))
            .count()
    }

    /// Pages held by adapters (resident or loading).
    pub fn pages_held(&self) -> usize {
        self.slots
            .values()
            .map(|s| match s {
                Slot::Loading { pages } | Slot::Resident { pages, .. } => pages.len(),
                Slot::Failed(_) => 0,
            })
            .sum()
    }

    pub fn resident(&self) -> usize {
        self.slots
            .values()
            .filter(|s| matches!(s, Slot::Resident { .. }))
            .count()
    }

    /// Blocks up to `timeout` for a load to finish (the engine has nothing else to run).
    pub fn wait(&mut self, timeout: Duration) {
        match self.done.recv_timeout(timeout) {
            Ok(d) => self.arrived.push(d),
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {}
        }
    }

    /// Applies finished loads: resident (and handed to the backend) or failed. Returns the
    /// keys that failed with their messages.
    pub fn poll(&mut self, backend: &mut (impl Backend + ?Sized)) -> Vec<(AdapterKey, String)> {
        let mut failed = Vec::new();
        let mut done: Vec<Done> = std::mem::take(&mut self.arrived);
        done.extend(self.done.try_iter());
        for d in done {
            let Some(Slot::Loading { pages }) = self.slots.remove(&d.key) else {
                continue;
            };
            let id = d.key.0.clone();
            self.stats.loads += 1;
            self.stats.bytes_read += d.bytes;
            self.stats.load_secs += d.secs;
            if let Some(m) = &self.metrics {
                let l = EngineMetrics::adapter(&id);
                m.adapter_bytes_read.get_or_create(&l).inc_by(d.bytes);
                m.adapter_load_seconds.get_or_create(&l).observe(d.secs);
            }
            let result = d.result.map_err(|e| e.to_string()).and_then(|a| {
                backend
                    .adapter_resident(&a)
                    .map(|()| a)
                    .map_err(|e| format!("adapter {id}: copying to the device: {e}"))
            });
            match result {
                Ok(a) => {
                    let a = Arc::new(a);
                    tracing::debug!(adapter = %id, bytes = d.bytes, secs = d.secs, "adapter resident");
                    self.by_ptr.insert(Arc::as_ptr(&a) as usize, d.key.clone());
                    self.tick += 1;
                    self.slots.insert(
                        d.key.clone(),
                        Slot::Resident {
                            adapter: a,
                            pages,
                            pins: 0,
                            last_used: self.tick,
                        },
                    );
                }
                Err(msg) => {
                    tracing::warn!(adapter = %id, "adapter load failed: {msg}");
                    backend.give_pages(pages);
                    self.stats.failures += 1;
                    if let Some(m) = &self.metrics {
                        m.adapter_load_failures
                            .get_or_create(&EngineMetrics::adapter(&id))
                            .inc();
                    }
                    self.slots.insert(d.key.clone(), Slot::Failed(msg.clone()));
                    failed.push((d.key.clone(), msg));
                }
            }
            self.publish(&d.key);
        }
        self.update_gauges();
        failed
    }

    /// Evicts idle adapters, least recently used first (those in `wanted` last), until `need`
    /// pages are free or nothing idle is left. Returns whether `need` pages are free.
    pub fn evict_for_pages(
        &mut self,
        need: usize,
        backend: &mut (impl Backend + ?Sized),
        wanted: &HashSet<AdapterKey>,
        spare_wanted: bool,
    ) -> bool {
        while backend.free_pages() < need {
            if !self.evict_one(backend, wanted, spare_wanted) {
                return false;
            }
        }
        true
    }

    /// Forgets every idle resident copy of adapter `id` (it was removed or replaced).
    pub fn forget(&mut self, id: &str, backend: &mut (impl Backend + ?Sized)) {
        let keys: Vec<AdapterKey> = self
            .slots
            .iter()
            .filter(|(k, s)| {
                k.0 == id
                    && match s {
                        Slot::Resident { pins, .. } => *pins == 0,
                        Slot::Failed(_) => true,
                        Slot::Loading { .. } => false,
                    }
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            self.drop_slot(&k, backend);
        }
    }

    fn start_load(
        &mut self,
        info: &Arc<PackInfo>,
        backend: &mut (impl Backend + ?Sized),
        wanted: &HashSet<AdapterKey>,
        reserve: usize,
        spare_wanted: bool,
    ) -> bool {
        let key = key_of(info);
        let need = pages_for(info, backend.page_bytes());
        // Room by count, then by pages; idle adapters nobody queued for go first.
        while self.cfg.max_adapters > 0 && self.slots_counted() >= self.cfg.max_adapters {
            if !self.evict_one(backend, wanted, spare_wanted) {
                return false;
            }
        }
        if !self.evict_for_pages(need + reserve, backend, wanted, spare_wanted) {
            return false;
        }
        let Some(pages) = backend.take_pages(need) else {
            return false;
        };
        self.slots.insert(key.clone(), Slot::Loading { pages });
        self.publish(&key);
        self.update_gauges();
        if self
            .jobs
            .send(Job {
                key: key.clone(),
                info: info.clone(),
            })
            .is_err()
        {
            // The loader thread is gone (it panicked): fail rather than wait forever.
            if let Some(Slot::Loading { pages }) = self.slots.remove(&key) {
                backend.give_pages(pages);
            }
            self.slots.insert(
                key.clone(),
                Slot::Failed(format!("adapter {}: the loader thread stopped", key.0)),
            );
            self.publish(&key);
        }
        true
    }

    /// Adapters counted against `max_adapters`: resident or loading.
    fn slots_counted(&self) -> usize {
        self.slots
            .values()
            .filter(|s| !matches!(s, Slot::Failed(_)))
            .count()
    }

    /// Evicts the least recently used idle adapter (one in `wanted` only when nothing else is
    /// idle, and only when `spare_wanted` is false). Returns whether one was evicted.
    fn evict_one(
        &mut self,
        backend: &mut (impl Backend + ?Sized),
        wanted: &HashSet<AdapterKey>,
        spare_wanted: bool,
    ) -> bool {
        let victim = self
            .slots
            .iter()
            .filter_map(|(k, s)| match s {
                Slot::Resident {
                    pins: 0, last_used, ..
                } => Some((wanted.contains(k), *last_used, k)),
                _ => None,
            })
            .filter(|(w, _, _)| !(spare_wanted && *w))
            .min()
            .map(|(_, _, k)| k.clone());
        let Some(k) = victim else {
            return false;
        };
        self.stats.evictions += 1;
        if let Some(m) = &self.metrics {
            m.adapter_evictions
                .get_or_create(&EngineMetrics::adapter(&k.0))
                .inc();
        }
        self.drop_slot(&k, backend);
        true
    }

    fn drop_slot(&mut self, k: &AdapterKey, backend: &mut (impl Backend + ?Sized)) {
        match self.slots.remove(k) {
            Some(Slot::Resident { adapter, pages, .. }) => {
                if let Err(e) = backend.adapter_evicted(&adapter) {
                    tracing::warn!(adapter = %k.0, "freeing the device copy: {e}");
                }
                self.by_ptr.remove(&(Arc::as_ptr(&adapter) as usize));
                backend.give_pages(pages);
            }
            Some(Slot::Loading { pages }) => backend.give_pages(pages),
            Some(Slot::Failed(_)) | None => {}
        }
        self.publish(k);
        self.update_gauges();
    }

    fn publish(&self, k: &AdapterKey) {
        let state = self.slots.get(k).map(|s| match s {
            Slot::Loading { .. } => ResidentState::Loading,
            Slot::Resident { pins, pages, .. } => ResidentState::Resident {
                pins: *pins,
                pages: pages.len(),
            },
            Slot::Failed(m) => ResidentState::Failed(m.clone()),
        });
        if let Ok(mut v) = self.view.lock() {
            match state {
                Some(s) => {
                    v.insert(k.0.clone(), s);
                }
                None => {
                    // Another version of the same id may still be known.
                    if !self.slots.keys().any(|o| o.0 == k.0) {
                        v.remove(&k.0);
                    }
                }
            }
        }
    }

    fn update_gauges(&self) {
        if let Some(m) = &self.metrics {
            m.adapters_resident.set(self.resident() as i64);
            m.pool_pages
                .get_or_create(&EngineMetrics::pool("adapters"))
                .set(self.pages_held() as i64);
        }
    }
}

/// Pages an adapter is charged: what its runtime copy holds (f32 A and B for the exact path,
/// their int8 forms for the fast path, an upper bound for int4 ones), in whole pages.
pub fn pages_for(info: &PackInfo, page_bytes: usize) -> usize {
    let elems: u64 = info
        .tensors
        .iter()
        .map(|t| t.rows as u64 * t.cols as u64)
        .sum();
    // f32 + Q8_0 (34 bytes per 32 values).
    let bytes = elems * 4 + elems.div_ceil(32) * 34;
    (bytes as usize).div_ceil(page_bytes.max(1)).max(1)
}

/// The loader thread: reads each pack with the storage reader and decodes it.
fn loader(
    mut reader: FileReader,
    config: ModelConfig,
    bits: AdapterBits,
    jobs: Receiver<Job>,
    done: Sender<Done>,
) {
    while let Ok(job) = jobs.recv() {
        let t0 = Instant::now();
        let path: PathBuf = job.info.path.clone();
        // Into the reader's staging buffer (registered once, reused by every load), decoded
        // from there.
        let (result, bytes) = match reader.read_file_staged(&path) {
            Ok(buf) => {
                let n = buf.len() as u64;
                (pack::decode_with(&job.info, buf, &config, bits), n)
            }
            Err(e) => (
                Err(PackError::Io {
                    adapter: job.info.id().to_string(),
                    path,
                    source: e,
                }),
                0,
            ),
        };
        let d = Done {
            key: job.key,
            result,
            bytes,
            secs: t0.elapsed().as_secs_f64(),
        };
        if done.send(d).is_err() {
            return;
        }
    }
}
