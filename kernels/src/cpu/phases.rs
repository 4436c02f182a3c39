//! Where a decode step's time goes, by phase, for the benchmarks (`decode --phases`): off unless
//! [`set_enabled`] turns it on, and then a clock read or two per projection region and attention
//! call. Wall time unless a phase says otherwise; summed over every call until [`take`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// The phases counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Projection regions ([`crate::cpu::matmul::project_q8`]), whole.
    Regions,
    /// The part of each region until the last program has computed its share of the base
    /// product (the adapters' bytes stream in meanwhile, see `project_q8`).
    BaseProducts,
    /// Thread time (summed over the programs, so up to threads × wall) in the adapter units: the
    /// shrinks run while the base product finishes, the wait for it, and the expands.
    AdapterUnits,
    /// Paged attention ([`crate::cpu::attention::paged_attention_rows`]).
    Attention,
}

/// How many phases there are ([`take`]'s length).
pub const PHASES: usize = 4;

static ON: AtomicBool = AtomicBool::new(false);
static NS: [AtomicU64; PHASES] = [const { AtomicU64::new(0) }; PHASES];

/// Turns the accounting on or off (it starts off).
pub fn set_enabled(on: bool) {
    ON.store(on, Ordering::Relaxed);
}

#[inline]
pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

/// A clock started only while the accounting is on.
#[derive(Clone, Copy)]
pub struct Clock(Option<Instant>);

impl Clock {
    #[inline]
    pub fn start() -> Self {
        Self(enabled().then(Instant::now))
    }

    /// Whether the accounting was on when it started (what it times gets counted).
    #[inline]
    pub fn is_on(&self) -> bool {
        self.0.is_some()
    }

    /// Nanoseconds since [`Clock::start`] (none when the accounting was off then).
    #[inline]
    pub fn ns(&self) -> Option<u64> {
        self.0.map(|t| t.elapsed().as_nanos() as u64)
    }

    /// Adds the time since the start to `phase`.
    #[inline]
    pub fn add_to(&self, phase: Phase) {
        if let Some(ns) = self.ns() {
            add(phase, ns);
        }
    }
}

pub fn add(phase: Phase, ns: u64) {
    NS[phase as usize].fetch_add(ns, Ordering::Relaxed);
}

/// Nanoseconds per phase since the last call, in [`Phase`] order; resets them.
pub fn take() -> [u64; PHASES] {
    std::array::from_fn(|i| NS[i].swap(0, Ordering::Relaxed))
}

/// Held by the tests that turn the accounting on (it is process-wide).
#[cfg(test)]
pub(crate) static TEST_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_only_while_enabled_and_take_resets() {
        let _one = TEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        set_enabled(false);
        take();
        let off = Clock::start();
        std::thread::sleep(std::time::Duration::from_millis(2));
        off.add_to(Phase::Attention);
        assert_eq!(take(), [0; PHASES], "nothing is counted while off");

        set_enabled(true);
        let on = Clock::start();
        std::thread::sleep(std::time::Duration::from_millis(2));
        on.add_to(Phase::Attention);
        add(Phase::Regions, 5);
        set_enabled(false);
        // (Other tests' products may add to the counters while it is on: lower bounds only.)
        let got = take();
        assert!(got[Phase::Attention as usize] >= 2_000_000, "{got:?}");
        assert!(got[Phase::Regions as usize] >= 5, "{got:?}");
        assert_eq!(
            take(),
            [0; PHASES],
            "take resets, and nothing is counted while off"
        );
    }
}
