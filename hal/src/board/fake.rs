//! Fakes of the board's hardware, for this crate's tests and the daemon's: they record what was
//! done to them, and clones share the record so a test keeps a handle after moving one into the
//! code under test.

use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use embedded_hal::digital::{ErrorType, OutputPin};

use super::watchdog::Watchdog;
use crate::HalError;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An output pin that records every level written to it.
#[derive(Debug, Clone, Default)]
pub struct FakePin {
    writes: Arc<Mutex<Vec<bool>>>,
}

impl FakePin {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every level written, in order (`true` = high).
    pub fn writes(&self) -> Vec<bool> {
        lock(&self.writes).clone()
    }

    /// The last level written, if any.
    pub fn level(&self) -> Option<bool> {
        lock(&self.writes).last().copied()
    }
}

impl ErrorType for FakePin {
    type Error = Infallible;
}

impl OutputPin for FakePin {
    fn set_low(&mut self) -> Result<(), Infallible> {
        lock(&self.writes).push(false);
        Ok(())
    }

    fn set_high(&mut self) -> Result<(), Infallible> {
        lock(&self.writes).push(true);
        Ok(())
    }
}

/// What was done to a [`FakeWatchdog`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchdogEvent {
    Start(Duration),
    Pet,
    MagicClose,
}

#[derive(Debug, Default)]
struct FakeWatchdogState {
    events: Vec<WatchdogEvent>,
    armed: bool,
    failing: bool,
}

/// A watchdog that records starts, pets and magic closes. Like the real one, petting before
/// `start` is an error.
#[derive(Debug, Clone, Default)]
pub struct FakeWatchdog {
    state: Arc<Mutex<FakeWatchdogState>>,
}

impl FakeWatchdog {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn events(&self) -> Vec<WatchdogEvent> {
        lock(&self.state).events.clone()
    }

    /// Successful pets so far.
    pub fn pets(&self) -> usize {
        lock(&self.state)
            .events
            .iter()
            .filter(|e| **e == WatchdogEvent::Pet)
            .count()
    }

    /// Started and not magic-closed.
    pub fn is_armed(&self) -> bool {
        lock(&self.state).armed
    }

    /// Makes pets fail (as a vanished device would) until set back.
    pub fn set_failing(&self, failing: bool) {
        lock(&self.state).failing = failing;
    }
}

const FAKE_PATH: &str = "fake-watchdog";

impl Watchdog for FakeWatchdog {
    fn start(&mut self, timeout: Duration) -> Result<Option<Duration>, HalError> {
        let mut state = lock(&self.state);
        state.events.push(WatchdogEvent::Start(timeout));
        state.armed = true;
        Ok(Some(timeout))
    }

    fn pet(&mut self) -> Result<(), HalError> {
        let mut state = lock(&self.state);
        if !state.armed {
            return Err(HalError::WatchdogNotStarted {
                path: FAKE_PATH.into(),
            });
        }
        if state.failing {
            return Err(HalError::Write {
                path: FAKE_PATH.into(),
                source: std::io::Error::other("fake pet failure"),
            });
        }
        state.events.push(WatchdogEvent::Pet);
        Ok(())
    }

    fn stop_magic(&mut self) -> Result<(), HalError> {
        let mut state = lock(&self.state);
        if state.armed {
            state.events.push(WatchdogEvent::MagicClose);
            state.armed = false;
        }
        Ok(())
    }
}
