//! A small persistent thread pool for the forward pass.
//!
//! A decode step of a 30-layer model has a few hundred parallel regions (every projection, every
//! attention), each only tens of microseconds long, so spawning threads or going through a
//! general-purpose scheduler per region costs more than the work. Workers here spin briefly on an
//! epoch counter between regions (the next region usually starts within microseconds) and only
//! then sleep on a condition variable, so an idle daemon does not burn its cores. The calling
//! thread takes part in every region: `threads = n` means n - 1 workers, no oversubscription.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;

/// Iterations a worker spins on the epoch before it sleeps (~tens of microseconds).
const SPIN_ITERS: usize = 20_000;

type Job = *const (dyn Fn(usize) + Sync);

/// One parallel region. A worker that arrives late holds an exhausted region: it can no longer
/// claim a task, so it never calls a job whose region has ended.
struct Region {
    job: Job,
    n_tasks: usize,
    next: AtomicUsize,
    done: AtomicUsize,
}

// SAFETY: `job` points to a `Sync` closure; it is only called for a claimed task, and a task can
// only be claimed while `run` is still waiting for the region (so the closure is alive).
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Region {
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.n_tasks {
                break;
            }
            // SAFETY: task `i` was claimed, so the region has not completed and `run` keeps the
            // closure alive until `done` reaches `n_tasks`.
            unsafe { (*self.job)(i) };
            self.done.fetch_add(1, Ordering::Release);
        }
    }
}

struct Shared {
    /// Incremented after `current` is replaced, to publish a region.
    epoch: AtomicUsize,
    current: Mutex<Option<Arc<Region>>>,
    stop: AtomicBool,
    sleepers: Mutex<usize>,
    wake: Condvar,
}

pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Serializes callers: one region at a time.
    region: Mutex<()>,
}

impl ThreadPool {
    /// A pool whose regions run on `threads` threads (the caller plus `threads - 1` workers).
    pub fn new(threads: usize) -> Self {
        let shared = Arc::new(Shared {
            epoch: AtomicUsize::new(0),
            current: Mutex::new(None),
            stop: AtomicBool::new(false),
            sleepers: Mutex::new(0),
            wake: Condvar::new(),
        });
        let workers = (1..threads.max(1))
            .map(|i| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name(format!("edgelora-worker-{i}"))
                    .spawn(move || worker(s))
                    .expect("spawning a worker thread")
            })
            .collect();
        Self {
            shared,
            workers,
            region: Mutex::new(()),
        }
    }

    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Items per task when `0..n` is split into about `4 * threads` contiguous chunks (a multiple
    /// of `align`; the tasks are `n.div_ceil` of it): enough tasks to even out the threads, few
    /// enough to keep each worth its hand-out.
    pub fn chunk(&self, n: usize, align: usize) -> usize {
        let align = align.max(1);
        let units = n.div_ceil(align);
        let tasks = (self.threads() * 4).min(units).max(1);
        units.div_ceil(tasks).max(1) * align
    }

    /// Runs `f(0..n_tasks)` across the pool and returns when every task is done. Tasks are handed
    /// out dynamically, so uneven tasks balance.
    pub fn run(&self, n_tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if n_tasks == 0 {
            return;
        }
        if self.workers.is_empty() || n_tasks == 1 {
            (0..n_tasks).for_each(f);
            return;
        }
        let _guard = self.region.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        // SAFETY: only the lifetime is erased. The region is completed (every claimed task has
        // returned) before this function returns, and no task can be claimed after that.
        let job: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(f) };
        let region = Arc::new(Region {
            job,
            n_tasks,
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
        });
        *s.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(region.clone());
        s.epoch.fetch_add(1, Ordering::Release);
        if *s.sleepers.lock().unwrap_or_else(|e| e.into_inner()) > 0 {
            s.wake.notify_all();
        }
        region.work();
        while region.done.load(Ordering::Acquire) < n_tasks {
            std::hint::spin_loop();
        }
        *s.current.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

fn worker(s: Arc<Shared>) {
    let mut seen = 0usize;
    loop {
        let mut spins = 0;
        let epoch = loop {
            let e = s.epoch.load(Ordering::Acquire);
            if e != seen || s.stop.load(Ordering::Relaxed) {
                break e;
            }
            spins += 1;
            if spins < SPIN_ITERS {
                std::hint::spin_loop();
            } else {
                let mut sleepers = s.sleepers.lock().unwrap_or_else(|e| e.into_inner());
                *sleepers += 1;
                // Re-check under the lock: `run` publishes the epoch before looking at sleepers.
                while s.epoch.load(Ordering::Acquire) == seen && !s.stop.load(Ordering::Relaxed) {
                    sleepers = s.wake.wait(sleepers).unwrap_or_else(|e| e.into_inner());
                }
                *sleepers -= 1;
                spins = 0;
            }
        };
        if s.stop.load(Ordering::Relaxed) {
            return;
        }
        seen = epoch;
        let region = s.current.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(r) = region {
            r.work();
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        {
            let _g = self
                .shared
                .sleepers
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// An output buffer that the tasks of one parallel region write at disjoint places (each task
/// owns some rows or heads). Callers promise the disjointness; bounds are checked here.
#[derive(Clone, Copy)]
pub struct SharedOut {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: tasks write disjoint elements (the callers' contract on `write` and `slice_mut`), and a
// region ends before the `&mut` borrow the buffer came from does.
unsafe impl Send for SharedOut {}
// SAFETY: as above.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    pub fn new(out: &mut [f32]) -> Self {
        Self {
            ptr: out.as_mut_ptr(),
            len: out.len(),
        }
    }

    /// # Safety
    /// No other task reads or writes element `i` during the region.
    #[inline]
    pub unsafe fn write(self, i: usize, v: f32) {
        assert!(i < self.len, "shared output index {i} out of {}", self.len);
        // SAFETY: in bounds (checked); exclusive by the caller's contract.
        unsafe { *self.ptr.add(i) = v };
    }

    /// # Safety
    /// No other task touches `start .. start + len` while the slice lives.
    #[inline]
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut(&self, start: usize, len: usize) -> &mut [f32] {
        assert!(
            start + len <= self.len,
            "shared output range {start}+{len} out of {}",
            self.len
        );
        // SAFETY: in bounds (checked); exclusive by the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len) }
    }
}

static GLOBAL: OnceLock<ThreadPool> = OnceLock::new();
static REQUESTED: AtomicUsize = AtomicUsize::new(0);

/// Sets the number of threads of the global pool; only effective before its first use.
/// Returns false when the pool already exists with another size.
pub fn set_threads(n: usize) -> bool {
    REQUESTED.store(n.max(1), Ordering::Relaxed);
    GLOBAL.get().is_none_or(|p| p.threads() == n.max(1))
}

/// The global pool: `set_threads`, else `EDGELORA_THREADS`, else the available cores.
pub fn global() -> &'static ThreadPool {
    GLOBAL.get_or_init(|| {
        let n = match REQUESTED.load(Ordering::Relaxed) {
            0 => std::env::var("EDGELORA_THREADS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
            n => n,
        };
        ThreadPool::new(n)
    })
}

/// Splits `0..n` into about `4 * threads` contiguous chunks (multiples of `align`) and runs `f` on
/// each across the global pool.
pub fn parallel_ranges(n: usize, align: usize, f: &(dyn Fn(std::ops::Range<usize>) + Sync)) {
    let pool = global();
    let per = pool.chunk(n, align);
    let tasks = n.div_ceil(per);
    pool.run(tasks, &|t| f(t * per..((t + 1) * per).min(n)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_exactly_once_across_many_regions() {
        let pool = ThreadPool::new(3);
        for round in 0..2000 {
            let n = 1 + round % 37;
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            pool.run(n, &|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(
                hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                "round {round}"
            );
        }
    }

    #[test]
    fn workers_wake_after_sleeping() {
        let pool = ThreadPool::new(2);
        pool.run(4, &|_| {});
        std::thread::sleep(std::time::Duration::from_millis(50));
        let sum = AtomicUsize::new(0);
        pool.run(100, &|i| {
            sum.fetch_add(i, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 4950);
    }

    #[test]
    fn parallel_ranges_cover_exactly_once_with_alignment() {
        for n in [1usize, 7, 64, 1000, 49152] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            parallel_ranges(n, 4, &|r| {
                assert!(r.start % 4 == 0);
                for i in r {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                }
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "n {n}");
        }
    }
}
