//! The status LED with a fake pin and a fake clock, the sysfs LED against a fake tree, the
//! watchdog against a regular file, and the watchdog guard with fakes. No assertion depends on how
//! fast this machine runs: waits poll with generous deadlines, and "no more pets" is counted in
//! guard rounds that provably started after the engine went silent, not in sleeps.

use std::sync::Arc;
use std::time::{Duration, Instant};

use edgelora_hal::HalError;
use edgelora_hal::board::fake::{FakePin, FakeWatchdog, WatchdogEvent};
use edgelora_hal::board::{
    ACTIVITY_WINDOW, BoardState, BoardStatus, GuardConfig, Heartbeat, LinuxWatchdog, StatusLed,
    SysfsLed, Watchdog, WatchdogGuard, led_level,
};
use edgelora_hal::clock::{Clock, FakeClock, MonotonicClock};
use embedded_hal::digital::OutputPin;

const MS: Duration = Duration::from_millis(1);

/// Polls `done` until it holds or 10 s pass (a loaded CI box is slow, not that slow).
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(MS);
    }
}

/// Rising edges of the pattern over `span`, sampled every millisecond.
fn rising_edges(state: BoardState, span: Duration, last_activity: Option<Duration>) -> usize {
    let mut previous = led_level(state, Duration::ZERO, last_activity);
    let mut edges = 0;
    for ms in 1..span.as_millis() as u64 {
        let level = led_level(state, Duration::from_millis(ms), last_activity);
        edges += usize::from(level && !previous);
        previous = level;
    }
    edges
}

fn lit_fraction(state: BoardState, span: Duration) -> f64 {
    let lit = (0..span.as_millis() as u64)
        .filter(|ms| led_level(state, Duration::from_millis(*ms), None))
        .count();
    lit as f64 / span.as_millis() as f64
}

#[test]
fn each_state_has_its_own_pattern() {
    let ten_s = Duration::from_secs(10);
    // Booting: 1 Hz at half duty. Loading: 5 Hz at half duty.
    assert_eq!(rising_edges(BoardState::Booting, ten_s, None), 9);
    assert_eq!(lit_fraction(BoardState::Booting, ten_s), 0.5);
    assert_eq!(rising_edges(BoardState::Loading, ten_s, None), 49);
    assert_eq!(lit_fraction(BoardState::Loading, ten_s), 0.5);
    // Ready, and serving with nothing going on: solid.
    assert_eq!(lit_fraction(BoardState::Ready, ten_s), 1.0);
    assert_eq!(lit_fraction(BoardState::Serving, ten_s), 1.0);
    // Error: two short pulses every 1.5 s (first pulse starts at 0, not an edge).
    let fifteen_s = Duration::from_secs(15);
    assert_eq!(rising_edges(BoardState::Error, fifteen_s, None), 19);
    assert_eq!(lit_fraction(BoardState::Error, fifteen_s), 0.2);
}

#[test]
fn serving_flickers_only_right_after_activity() {
    let at = Duration::from_secs(5);
    let levels: Vec<bool> = (0..ACTIVITY_WINDOW.as_millis() as u64)
        .map(|ms| {
            led_level(
                BoardState::Serving,
                at + Duration::from_millis(ms),
                Some(at),
            )
        })
        .collect();
    assert!(levels.contains(&false), "dark moments while active");
    assert!(levels.contains(&true), "lit moments while active");
    // Once the window has passed: solid again.
    for ms in 0..1000 {
        let now = at + ACTIVITY_WINDOW + Duration::from_millis(ms);
        assert!(led_level(BoardState::Serving, now, Some(at)), "at {now:?}");
    }
}

#[test]
fn status_led_writes_the_pin_only_when_the_level_changes() {
    let clock = FakeClock::new();
    let status = BoardStatus::new(Arc::new(clock.clone()));
    let pin = FakePin::new();
    let mut led = StatusLed::new(pin.clone(), status.clone());
    assert_eq!(status.state(), BoardState::Booting);

    assert!(led.update().unwrap()); // t = 0: booting, lit
    clock.set(100 * MS);
    assert!(led.update().unwrap()); // still lit: no write
    clock.set(500 * MS);
    assert!(!led.update().unwrap()); // dark
    status.set(BoardState::Ready);
    clock.set(600 * MS);
    assert!(led.update().unwrap());
    clock.set(2000 * MS);
    assert!(led.update().unwrap());
    assert_eq!(pin.writes(), [true, false, true]);

    // Serving: activity at t = 2000 ms flickers the LED (dark in the first half of each
    // 100 ms period) until the activity window has passed.
    status.set(BoardState::Serving);
    status.activity();
    clock.set(2020 * MS);
    assert!(!led.update().unwrap(), "flicker's dark half");
    clock.set(2070 * MS);
    assert!(led.update().unwrap(), "flicker's lit half");
    clock.set(2000 * MS + ACTIVITY_WINDOW + 20 * MS);
    assert!(led.update().unwrap(), "solid again after the window");
    assert_eq!(pin.writes(), [true, false, true, false, true]);
}

#[test]
fn led_thread_follows_the_status() {
    let clock = FakeClock::new();
    let status = BoardStatus::new(Arc::new(clock.clone()));
    let pin = FakePin::new();
    let task = StatusLed::new(pin.clone(), status.clone())
        .spawn(MS)
        .unwrap();
    wait_until("the booting LED is lit", || pin.level() == Some(true));
    clock.set(700 * MS);
    wait_until("the booting LED goes dark", || pin.level() == Some(false));
    status.set(BoardState::Ready);
    wait_until("the ready LED is lit", || pin.level() == Some(true));
    drop(task);
    let writes = pin.writes().len();
    status.set(BoardState::Error);
    clock.set(Duration::from_millis(1500 + 200));
    std::thread::sleep(20 * MS);
    assert_eq!(
        pin.writes().len(),
        writes,
        "no writes after the task is dropped"
    );
}

fn led_tree(trigger: Option<&str>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let led = dir.path().join("sys/class/leds/status");
    std::fs::create_dir_all(&led).unwrap();
    std::fs::write(led.join("brightness"), "0\n").unwrap();
    std::fs::write(led.join("max_brightness"), "255\n").unwrap();
    if let Some(trigger) = trigger {
        std::fs::write(led.join("trigger"), trigger).unwrap();
    }
    dir
}

#[test]
fn sysfs_led_takes_the_led_from_its_trigger_and_writes_brightness() {
    let tree = led_tree(Some("none [heartbeat] timer mmc0\n"));
    let dir = tree.path().join("sys/class/leds/status");
    let mut led = SysfsLed::open(tree.path(), "status").unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.join("trigger")).unwrap(),
        "none"
    );
    led.set_high().unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.join("brightness")).unwrap(),
        "255"
    );
    led.set_low().unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.join("brightness")).unwrap(),
        "0"
    );

    // Driven by the pattern.
    let clock = FakeClock::new();
    let status = BoardStatus::new(Arc::new(clock.clone()));
    status.set(BoardState::Ready);
    let mut status_led = StatusLed::new(led, status);
    status_led.update().unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.join("brightness")).unwrap(),
        "255"
    );
}

#[test]
fn sysfs_led_errors_name_the_led() {
    let tree = led_tree(None);
    match SysfsLed::open(tree.path(), "power") {
        Err(e @ HalError::Missing { .. }) => {
            assert!(e.to_string().contains("leds/power/brightness"), "{e}")
        }
        other => panic!("expected Missing, got {other:?}"),
    }
    for bad in ["", "..", "status/../../x"] {
        assert!(matches!(
            SysfsLed::open(tree.path(), bad),
            Err(HalError::Config(_))
        ));
    }
    // A LED that vanishes (driver unbound) is a write error, not a new regular file.
    let mut led = SysfsLed::open(tree.path(), "status").unwrap();
    std::fs::remove_file(led.brightness_path()).unwrap();
    assert!(matches!(led.set_high(), Err(HalError::Write { .. })));
    assert!(!led.brightness_path().exists());
}

#[test]
fn linux_watchdog_pets_with_writes_and_disarms_with_the_magic_v() {
    let dir = tempfile::tempdir().unwrap();
    let device = dir.path().join("watchdog");
    std::fs::write(&device, b"").unwrap();
    let mut watchdog = LinuxWatchdog::new(&device);

    assert!(matches!(
        watchdog.pet(),
        Err(HalError::WatchdogNotStarted { .. })
    ));
    // A regular file takes no ioctl: the timeout is not known, and that is not an error.
    assert_eq!(watchdog.start(Duration::from_secs(30)).unwrap(), None);
    watchdog.pet().unwrap();
    watchdog.pet().unwrap();
    watchdog.stop_magic().unwrap();
    assert_eq!(std::fs::read(&device).unwrap(), b"\0\0V");
    assert!(watchdog.pet().is_err(), "closed after the magic close");
    watchdog.stop_magic().unwrap(); // idempotent

    let mut missing = LinuxWatchdog::new(dir.path().join("watchdog1"));
    match missing.start(Duration::from_secs(30)) {
        Err(e @ HalError::Write { .. }) => assert!(e.to_string().contains("watchdog1"), "{e}"),
        other => panic!("expected a write error, got {other:?}"),
    }
}

fn fast_config() -> GuardConfig {
    GuardConfig {
        hardware_timeout: Duration::from_secs(2),
        stall_after: 50 * MS,
        pet_every: MS,
    }
}

#[test]
fn guard_pets_while_the_engine_beats_and_stops_when_it_stalls() {
    let clock = FakeClock::new();
    let heartbeat = Heartbeat::new(Arc::new(clock.clone()));
    let watchdog = FakeWatchdog::new();
    let guard =
        WatchdogGuard::start(Box::new(watchdog.clone()), heartbeat.clone(), fast_config()).unwrap();
    assert_eq!(guard.effective_timeout(), Some(Duration::from_secs(2)));

    // Beating: pets keep coming.
    for _ in 0..3 {
        let before = guard.pets();
        clock.advance(10 * MS);
        heartbeat.beat();
        wait_until("the guard pets", || guard.pets() > before);
    }
    assert!(!guard.is_withholding());

    // The engine stops beating; time passes beyond stall_after.
    clock.advance(51 * MS);
    let rounds = guard.rounds();
    wait_until("two more rounds", || guard.rounds() >= rounds + 2);
    assert!(guard.is_withholding());
    let pets = guard.pets();
    let recorded = watchdog.pets();
    let seen = guard.rounds();
    wait_until("ten more rounds", || guard.rounds() >= seen + 10);
    assert_eq!(guard.pets(), pets, "no pets while stalled");
    assert_eq!(watchdog.pets(), recorded);
    assert!(watchdog.is_armed(), "left armed: the board will reset");

    // The engine recovers before the hardware fires: petting resumes.
    heartbeat.beat();
    wait_until("petting resumes", || guard.pets() > pets);
    assert!(!guard.is_withholding());

    // Clean shutdown disarms.
    guard.shutdown().unwrap();
    let events = watchdog.events();
    assert_eq!(
        events.first(),
        Some(&WatchdogEvent::Start(Duration::from_secs(2)))
    );
    assert_eq!(events.last(), Some(&WatchdogEvent::MagicClose));
    assert!(!watchdog.is_armed());
}

#[test]
fn a_stuck_engine_thread_stops_the_pets_on_the_real_clock() {
    let clock: Arc<dyn Clock> = Arc::new(MonotonicClock::new());
    let heartbeat = Heartbeat::new(clock);
    let watchdog = FakeWatchdog::new();
    let guard = WatchdogGuard::start(
        Box::new(watchdog.clone()),
        heartbeat.clone(),
        GuardConfig {
            hardware_timeout: Duration::from_secs(5),
            stall_after: 100 * MS,
            pet_every: 5 * MS,
        },
    )
    .unwrap();

    // An engine that steps until told to hang, says so, then hangs.
    let (hang, hung) = std::sync::mpsc::channel::<()>();
    let (stuck, is_stuck) = std::sync::mpsc::channel::<()>();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let engine = {
        let heartbeat = heartbeat.clone();
        std::thread::spawn(move || {
            while hung.try_recv().is_err() {
                heartbeat.beat();
                std::thread::sleep(MS);
            }
            stuck.send(()).unwrap();
            let _ = released.recv();
        })
    };
    wait_until("pets while the engine steps", || guard.pets() >= 5);
    hang.send(()).unwrap();
    is_stuck.recv().unwrap();
    // No beat comes any more. Once the last one is older than stall_after, every round that
    // starts withholds; the second round completed after that point started after it.
    wait_until("the last beat is stale", || {
        heartbeat.since_last_beat() > 100 * MS
    });
    let rounds = guard.rounds();
    wait_until("two more rounds", || guard.rounds() >= rounds + 2);
    assert!(guard.is_withholding());
    let pets = guard.pets();
    let seen = guard.rounds();
    wait_until("ten more rounds", || guard.rounds() >= seen + 10);
    assert_eq!(guard.pets(), pets, "no pets while the engine is stuck");

    // Dropped without shutdown (the daemon is going down hard): still armed.
    drop(guard);
    assert!(watchdog.is_armed());
    assert_ne!(watchdog.events().last(), Some(&WatchdogEvent::MagicClose));
    release.send(()).unwrap();
    engine.join().unwrap();
}

#[test]
fn guard_over_a_linux_watchdog_file_pets_then_magic_closes() {
    let dir = tempfile::tempdir().unwrap();
    let device = dir.path().join("watchdog");
    std::fs::write(&device, b"").unwrap();
    let clock = FakeClock::new();
    let heartbeat = Heartbeat::new(Arc::new(clock));
    let guard = WatchdogGuard::start(
        Box::new(LinuxWatchdog::new(&device)),
        heartbeat,
        fast_config(),
    )
    .unwrap();
    wait_until("two pets", || guard.pets() >= 2);
    guard.shutdown().unwrap();
    let bytes = std::fs::read(&device).unwrap();
    let (last, pets) = bytes.split_last().unwrap();
    assert_eq!(*last, b'V');
    assert!(pets.len() >= 2 && pets.iter().all(|b| *b == 0), "{bytes:?}");
}

/// A watchdog whose driver insists on a fixed timeout.
#[derive(Clone, Default)]
struct FixedTimeout(FakeWatchdog);

impl Watchdog for FixedTimeout {
    fn start(&mut self, timeout: Duration) -> Result<Option<Duration>, HalError> {
        self.0.start(timeout)?;
        Ok(Some(Duration::from_secs(1)))
    }
    fn pet(&mut self) -> Result<(), HalError> {
        self.0.pet()
    }
    fn stop_magic(&mut self) -> Result<(), HalError> {
        self.0.stop_magic()
    }
}

#[test]
fn guard_refuses_a_device_timeout_it_cannot_pet_in_time_and_disarms_it() {
    let fixed = FixedTimeout::default();
    let heartbeat = Heartbeat::new(Arc::new(FakeClock::new()));
    let config = GuardConfig {
        hardware_timeout: Duration::from_secs(60),
        stall_after: Duration::from_secs(30),
        pet_every: Duration::from_secs(1),
    };
    match WatchdogGuard::start(Box::new(fixed.clone()), heartbeat, config) {
        Err(HalError::Config(message)) => assert!(message.contains("1s"), "{message}"),
        other => panic!("expected a config error, got {other:?}"),
    }
    assert!(!fixed.0.is_armed());
    assert_eq!(fixed.0.events().last(), Some(&WatchdogEvent::MagicClose));
}

#[cfg(target_os = "linux")]
#[test]
fn a_missing_gpio_chip_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let chip = dir.path().join("gpiochip9");
    match edgelora_hal::board::open_gpio_output(&chip, 3, "edgelora-test") {
        Err(e @ HalError::Gpio { .. }) => {
            let message = e.to_string();
            assert!(
                message.contains("gpiochip9") && message.contains("line 3"),
                "{message}"
            );
        }
        other => panic!("expected a GPIO error, got {:?}", other.err()),
    }
}
