//! The status LED: one output pin, one blink pattern per board state, so whoever stands next to the
//! box can tell booting from loading from serving from broken without a screen.
//!
//! | state     | pattern                                                              |
//! |-----------|----------------------------------------------------------------------|
//! | Booting   | slow blink, 1 Hz (500 ms on, 500 ms off)                              |
//! | Loading   | fast blink, 5 Hz (100 ms on, 100 ms off)                              |
//! | Ready     | solid on                                                             |
//! | Serving   | on, flickering (50 ms off every 100 ms) while activity keeps arriving |
//! | Error     | double blink every 1.5 s                                             |
//!
//! The pattern is a pure function of (state, time, last activity): [`led_level`]. [`StatusLed`]
//! applies it to a pin, writing only on changes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use embedded_hal::digital::OutputPin;

use crate::HalError;
use crate::clock::{Clock, as_nanos};

/// What the box is doing, as the LED shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum BoardState {
    Booting = 0,
    Loading = 1,
    Ready = 2,
    Serving = 3,
    Error = 4,
}

impl BoardState {
    pub const ALL: [BoardState; 5] = [
        BoardState::Booting,
        BoardState::Loading,
        BoardState::Ready,
        BoardState::Serving,
        BoardState::Error,
    ];

    fn from_u8(v: u8) -> Self {
        Self::ALL
            .into_iter()
            .find(|s| *s as u8 == v)
            .unwrap_or(BoardState::Error)
    }
}

/// How long after the last activity the serving pattern keeps flickering.
pub const ACTIVITY_WINDOW: Duration = Duration::from_millis(150);

/// Whether the LED is lit in `state` at time `now`; `last_activity` matters only when serving.
pub fn led_level(state: BoardState, now: Duration, last_activity: Option<Duration>) -> bool {
    let ms = now.as_millis();
    match state {
        BoardState::Booting => ms % 1000 < 500,
        BoardState::Loading => ms % 200 < 100,
        BoardState::Ready => true,
        BoardState::Serving => match last_activity {
            Some(at) if now.saturating_sub(at) < ACTIVITY_WINDOW => ms % 100 >= 50,
            _ => true,
        },
        BoardState::Error => {
            let phase = ms % 1500;
            phase < 150 || (300..450).contains(&phase)
        }
    }
}

/// The board's state as the rest of the daemon sets it: cheap to clone, shared between the LED
/// driver and whoever reports state changes and activity.
#[derive(Debug, Clone)]
pub struct BoardStatus {
    shared: Arc<Shared>,
    clock: Arc<dyn Clock>,
}

#[derive(Debug)]
struct Shared {
    state: AtomicU8,
    /// Clock time of the last activity in nanoseconds plus one; 0 means none yet.
    last_activity: AtomicU64,
}

impl BoardStatus {
    /// A status that starts as [`BoardState::Booting`].
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            shared: Arc::new(Shared {
                state: AtomicU8::new(BoardState::Booting as u8),
                last_activity: AtomicU64::new(0),
            }),
            clock,
        }
    }

    pub fn set(&self, state: BoardState) {
        self.shared.state.store(state as u8, Ordering::Relaxed);
    }

    pub fn state(&self) -> BoardState {
        BoardState::from_u8(self.shared.state.load(Ordering::Relaxed))
    }

    /// Something was served (a request admitted, a token streamed): makes the serving pattern
    /// flicker for [`ACTIVITY_WINDOW`].
    pub fn activity(&self) {
        let now = as_nanos(self.clock.now()).saturating_add(1);
        self.shared.last_activity.fetch_max(now, Ordering::Relaxed);
    }

    /// Whether the LED should be lit now.
    pub fn level_now(&self) -> bool {
        let last = self.shared.last_activity.load(Ordering::Relaxed);
        let last_activity = (last > 0).then(|| Duration::from_nanos(last - 1));
        led_level(self.state(), self.clock.now(), last_activity)
    }
}

/// A status LED on any `embedded-hal` output pin (high = lit).
#[derive(Debug)]
pub struct StatusLed<P> {
    pin: P,
    status: BoardStatus,
    lit: Option<bool>,
}

impl<P: OutputPin> StatusLed<P> {
    pub fn new(pin: P, status: BoardStatus) -> Self {
        Self {
            pin,
            status,
            lit: None,
        }
    }

    pub fn status(&self) -> &BoardStatus {
        &self.status
    }

    /// Drives the pin to the pattern's level for now, writing only when the level changes.
    /// Returns the level.
    pub fn update(&mut self) -> Result<bool, P::Error> {
        let level = self.status.level_now();
        if self.lit != Some(level) {
            if level {
                self.pin.set_high()?;
            } else {
                self.pin.set_low()?;
            }
            self.lit = Some(level);
        }
        Ok(level)
    }

    pub fn into_pin(self) -> P {
        self.pin
    }
}

impl<P: OutputPin + Send + 'static> StatusLed<P> {
    /// Runs [`update`](Self::update) every `every` on a thread of its own until the returned
    /// task is dropped. 20 ms is smooth enough for every pattern. A failing pin is logged once
    /// and retried.
    pub fn spawn(mut self, every: Duration) -> Result<LedTask, HalError> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("edgelora-led".to_owned())
            .spawn(move || {
                let mut failing = false;
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                    match self.update() {
                        Ok(_) => failing = false,
                        Err(e) if !failing => {
                            tracing::warn!(error = ?e, "status LED write failed");
                            failing = true;
                        }
                        Err(_) => {}
                    }
                }
            })
            .map_err(|source| HalError::Thread {
                name: "edgelora-led",
                source,
            })?;
        Ok(LedTask {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

/// The LED thread; dropping it stops the thread (the LED keeps its last level).
#[derive(Debug)]
pub struct LedTask {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for LedTask {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
