//! Petting the watchdog only while the engine is alive.
//!
//! The engine's step loop calls [`Heartbeat::beat`] once per step. A [`WatchdogGuard`] thread
//! pets the hardware watchdog every `pet_every`, but only if the last beat is at most
//! `stall_after` old. A stuck step loop (a hung kernel, a deadlock) stops the beats, the guard stops
//! petting, and the board resets `hardware_timeout` later: at most
//! `stall_after + pet_every + hardware_timeout` after the last beat.
//!
//! The step loop must beat while idle too: wait for work with a timeout shorter than
//! `stall_after` and beat on every wake-up, or an idle box reboots. Model loading happens before
//! the step loop starts; start the guard after it, or beat from the loader.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::watchdog::Watchdog;
use crate::HalError;
use crate::clock::{Clock, as_nanos};

/// The engine's sign of life: cheap to clone, cheap to [`beat`](Self::beat) (one clock read and
/// one atomic store).
#[derive(Debug, Clone)]
pub struct Heartbeat {
    clock: Arc<dyn Clock>,
    last_beat_ns: Arc<AtomicU64>,
}

impl Heartbeat {
    /// A heartbeat whose creation counts as the first beat.
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        let now = as_nanos(clock.now());
        Self {
            clock,
            last_beat_ns: Arc::new(AtomicU64::new(now)),
        }
    }

    /// The engine made progress.
    pub fn beat(&self) {
        let now = as_nanos(self.clock.now());
        self.last_beat_ns.fetch_max(now, Ordering::Relaxed);
    }

    /// Time since the last beat.
    pub fn since_last_beat(&self) -> Duration {
        let last = Duration::from_nanos(self.last_beat_ns.load(Ordering::Relaxed));
        self.clock.now().saturating_sub(last)
    }

    /// Whether the last beat is at most `stall_after` old.
    pub fn is_alive(&self, stall_after: Duration) -> bool {
        self.since_last_beat() <= stall_after
    }
}

/// Timing of a [`WatchdogGuard`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuardConfig {
    /// The hardware timeout asked of the watchdog.
    pub hardware_timeout: Duration,
    /// A step loop silent for longer than this is stuck.
    pub stall_after: Duration,
    /// How often the guard considers petting.
    pub pet_every: Duration,
}

impl Default for GuardConfig {
    /// A minute of hardware grace, 30 s for the longest legitimate step (a long prefill on a
    /// small board), a pet every second.
    fn default() -> Self {
        Self {
            hardware_timeout: Duration::from_secs(60),
            stall_after: Duration::from_secs(30),
            pet_every: Duration::from_secs(1),
        }
    }
}

impl GuardConfig {
    /// Rejects timings under which a healthy engine could still get the board reset.
    pub fn validate(&self) -> Result<(), HalError> {
        if self.pet_every.is_zero() || self.stall_after.is_zero() {
            return Err(HalError::Config(format!(
                "watchdog pet_every ({:?}) and stall_after ({:?}) must be positive",
                self.pet_every, self.stall_after
            )));
        }
        self.check_against(self.hardware_timeout)
    }

    /// Petting must happen at least twice per hardware timeout, or scheduling jitter resets a
    /// healthy board.
    fn check_against(&self, hardware_timeout: Duration) -> Result<(), HalError> {
        if self.pet_every * 2 > hardware_timeout {
            return Err(HalError::Config(format!(
                "watchdog petted every {:?} but its timeout is {hardware_timeout:?}; \
                 pet at least twice per timeout",
                self.pet_every
            )));
        }
        Ok(())
    }
}

/// What one round of the guard did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tick {
    Petted,
    Withheld,
    PetFailed,
}

#[derive(Debug, Default)]
struct GuardStats {
    rounds: AtomicU64,
    pets: AtomicU64,
    pet_failures: AtomicU64,
    withholding: AtomicBool,
}

/// The decision and the petting, without the thread: one call per round.
struct Petter {
    watchdog: Box<dyn Watchdog>,
    heartbeat: Heartbeat,
    config: GuardConfig,
    stats: Arc<GuardStats>,
}

impl Petter {
    fn tick(&mut self) -> Tick {
        let tick = self.decide_and_pet();
        self.stats.rounds.fetch_add(1, Ordering::Relaxed);
        tick
    }

    fn decide_and_pet(&mut self) -> Tick {
        let since = self.heartbeat.since_last_beat();
        if since > self.config.stall_after {
            if !self.stats.withholding.swap(true, Ordering::Relaxed) {
                tracing::error!(
                    silent_for = ?since,
                    resets_within = ?self.config.hardware_timeout,
                    "engine step loop stalled; no longer petting the watchdog"
                );
            }
            return Tick::Withheld;
        }
        match self.watchdog.pet() {
            Ok(()) => {
                self.stats.pets.fetch_add(1, Ordering::Relaxed);
                if self.stats.withholding.swap(false, Ordering::Relaxed) {
                    tracing::warn!("engine step loop beating again; petting the watchdog");
                }
                Tick::Petted
            }
            Err(e) => {
                // Counted and logged; the next round tries again. If the device is gone for good
                // the board resets, which is what a watchdog is for.
                if self.stats.pet_failures.fetch_add(1, Ordering::Relaxed) == 0 {
                    tracing::error!(error = %e, "petting the watchdog failed");
                }
                Tick::PetFailed
            }
        }
    }
}

/// Owns the watchdog and pets it from a thread of its own while the [`Heartbeat`] is alive.
///
/// [`shutdown`](Self::shutdown) disarms the watchdog (clean exit, e.g. on SIGTERM). Dropping
/// the guard stops the petting but leaves the watchdog armed: the board resets unless a new
/// daemon takes over the watchdog in time.
#[derive(Debug)]
pub struct WatchdogGuard {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<Box<dyn Watchdog>>>,
    stats: Arc<GuardStats>,
    effective_timeout: Option<Duration>,
}

impl WatchdogGuard {
    /// Validates `config`, arms `watchdog` with `config.hardware_timeout` and starts petting.
    pub fn start(
        mut watchdog: Box<dyn Watchdog>,
        heartbeat: Heartbeat,
        config: GuardConfig,
    ) -> Result<Self, HalError> {
        config.validate()?;
        let effective_timeout = watchdog.start(config.hardware_timeout)?;
        match effective_timeout {
            Some(effective) => {
                if let Err(e) = config.check_against(effective) {
                    watchdog.stop_magic()?;
                    return Err(e);
                }
            }
            None => tracing::warn!(
                "watchdog does not report its timeout; assuming {:?}",
                config.hardware_timeout
            ),
        }
        let stats = Arc::new(GuardStats::default());
        let mut petter = Petter {
            watchdog,
            heartbeat,
            config,
            stats: Arc::clone(&stats),
        };
        let (stop, stopped) = mpsc::channel::<()>();
        // Should the thread fail to start, the watchdog goes down with the closure, still armed:
        // a box that cannot start a thread is better reset.
        let thread = std::thread::Builder::new()
            .name("edgelora-watchdog".to_owned())
            .spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(config.pet_every)
                {
                    petter.tick();
                }
                petter.watchdog
            })
            .map_err(|source| HalError::Thread {
                name: "edgelora-watchdog",
                source,
            })?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
            stats,
            effective_timeout,
        })
    }

    /// Rounds completed so far (each one petted, withheld or failed).
    pub fn rounds(&self) -> u64 {
        self.stats.rounds.load(Ordering::Relaxed)
    }

    /// Pets so far.
    pub fn pets(&self) -> u64 {
        self.stats.pets.load(Ordering::Relaxed)
    }

    /// Pets that failed so far.
    pub fn pet_failures(&self) -> u64 {
        self.stats.pet_failures.load(Ordering::Relaxed)
    }

    /// Whether the last round found the engine stalled and did not pet.
    pub fn is_withholding(&self) -> bool {
        self.stats.withholding.load(Ordering::Relaxed)
    }

    /// The timeout the device reported using, if it did.
    pub fn effective_timeout(&self) -> Option<Duration> {
        self.effective_timeout
    }

    /// Stops petting and disarms the watchdog (magic close).
    pub fn shutdown(mut self) -> Result<(), HalError> {
        match self.stop_thread() {
            Some(mut watchdog) => watchdog.stop_magic(),
            None => Err(HalError::Config(
                "watchdog thread panicked; watchdog left armed".to_owned(),
            )),
        }
    }

    fn stop_thread(&mut self) -> Option<Box<dyn Watchdog>> {
        drop(self.stop.take());
        self.thread.take().and_then(|t| t.join().ok())
    }
}

impl Drop for WatchdogGuard {
    fn drop(&mut self) {
        // Dropped without shutdown: the watchdog is closed still armed.
        drop(self.stop_thread());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::board::fake::{FakeWatchdog, WatchdogEvent};
    use crate::clock::FakeClock;

    const STALL: Duration = Duration::from_secs(10);

    fn petter(clock: &FakeClock, watchdog: &FakeWatchdog) -> (Petter, Heartbeat) {
        let heartbeat = Heartbeat::new(Arc::new(clock.clone()));
        let mut wd: Box<dyn Watchdog> = Box::new(watchdog.clone());
        wd.start(Duration::from_secs(20)).unwrap();
        let petter = Petter {
            watchdog: wd,
            heartbeat: heartbeat.clone(),
            config: GuardConfig {
                hardware_timeout: Duration::from_secs(20),
                stall_after: STALL,
                pet_every: Duration::from_secs(1),
            },
            stats: Arc::default(),
        };
        (petter, heartbeat)
    }

    #[test]
    fn pets_while_beats_are_fresh_and_withholds_once_they_are_stale() {
        let clock = FakeClock::new();
        let watchdog = FakeWatchdog::new();
        let (mut petter, heartbeat) = petter(&clock, &watchdog);

        for _ in 0..5 {
            clock.advance(Duration::from_secs(1));
            heartbeat.beat();
            assert_eq!(petter.tick(), Tick::Petted);
        }
        // Silent, but exactly at the limit: still alive.
        clock.advance(STALL);
        assert_eq!(petter.tick(), Tick::Petted);
        // One nanosecond more: stuck.
        clock.advance(Duration::from_nanos(1));
        assert_eq!(petter.tick(), Tick::Withheld);
        clock.advance(Duration::from_secs(100));
        assert_eq!(petter.tick(), Tick::Withheld);
        assert!(petter.stats.withholding.load(Ordering::Relaxed));
        assert_eq!(watchdog.pets(), 6);

        // A late beat revives the petting.
        heartbeat.beat();
        assert_eq!(petter.tick(), Tick::Petted);
        assert!(!petter.stats.withholding.load(Ordering::Relaxed));
        assert_eq!(watchdog.pets(), 7);
    }

    #[test]
    fn a_failing_pet_is_counted_and_retried() {
        let clock = FakeClock::new();
        let watchdog = FakeWatchdog::new();
        let (mut petter, _heartbeat) = petter(&clock, &watchdog);
        watchdog.set_failing(true);
        assert_eq!(petter.tick(), Tick::PetFailed);
        assert_eq!(petter.tick(), Tick::PetFailed);
        watchdog.set_failing(false);
        assert_eq!(petter.tick(), Tick::Petted);
        assert_eq!(petter.stats.pet_failures.load(Ordering::Relaxed), 2);
        assert_eq!(
            watchdog.events(),
            [
                WatchdogEvent::Start(Duration::from_secs(20)),
                WatchdogEvent::Pet
            ]
        );
    }

    #[test]
    fn config_petting_less_than_twice_per_timeout_is_rejected() {
        let config = GuardConfig {
            hardware_timeout: Duration::from_secs(10),
            stall_after: Duration::from_secs(5),
            pet_every: Duration::from_secs(6),
        };
        assert!(matches!(config.validate(), Err(HalError::Config(_))));
        assert!(GuardConfig::default().validate().is_ok());
    }
}
