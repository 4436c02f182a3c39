//! `edgelorad update`: A/B root slot updates from signed bundles, with systemd-boot's
//! automatic boot assessment as the safety net.
//!
//! - `apply BUNDLE` checks a bundle (signature, compatibility, version, digests, size) and
//!   installs it into the slot that is not running, with a boot entry on trial (`+<tries>`).
//! - After the reboot, a unit runs `mark-good`: once the daemon answers its health endpoint the
//!   running slot's entry loses its counter. If it never does, the unit fails, the box reboots,
//!   and after `tries` failed boots systemd-boot prefers the old slot again.
//! - `status` shows both slots, which entry boots next, and whether a rollback happened.
//!
//! Paths come from the layout file (`layout`), the boot entry convention and the loader's
//! choice from `loader`, so tests run all of it against a fake box in a directory.
//!
//! On Jetson (`boot = "jetson"` in the layout) NVIDIA's firmware switches and counts instead;
//! `jetson` drives it with `nvbootctrl` and shares the checks and the slot writing with `apply`.

pub mod apply;
pub mod fsutil;
pub mod health;
pub mod jetson;
pub mod layout;
pub mod loader;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use serde::Serialize;

use fsutil::fsync_dir;
use layout::{Boot, Layout};
use loader::{Assessment, ENTRIES_DIR, Entry, Slot};

#[derive(Args, Debug, Clone)]
pub struct LayoutArg {
    /// The update layout file (default: $EDGELORA_UPDATE_LAYOUT, else
    /// /etc/edgelora/update.toml).
    #[arg(long, value_name = "PATH")]
    pub layout: Option<PathBuf>,
}

impl LayoutArg {
    fn load(&self) -> Result<Layout> {
        Layout::load(&Layout::locate(self.layout.as_deref()))
    }
}

#[derive(Subcommand, Debug)]
pub enum UpdateCommand {
    /// Check a signed update bundle and install it into the root slot that is not running,
    /// with a boot entry systemd-boot tries a few times before falling back.
    Apply {
        /// The bundle file (from `edgelora-image bundle`).
        bundle: PathBuf,
        /// Allow a downgrade or reinstall, and installing while the running slot is on trial.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        layout: LayoutArg,
        /// Print what was installed as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The running slot, each slot's boot entry and which one boots next.
    Status {
        #[command(flatten)]
        layout: LayoutArg,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Mark the running slot good once the daemon is healthy (run by a unit at boot; exits 1
    /// if it never gets healthy, so the boot counts as failed; on Jetson, exits 3 if healthy
    /// but nvbootctrl would not record it).
    MarkGood {
        /// Polled until it answers HTTP 200.
        #[arg(long, default_value = health::DEFAULT_HEALTH_URL)]
        health_url: String,
        /// Seconds to wait for health.
        #[arg(long, default_value_t = health::DEFAULT_TIMEOUT_SECS)]
        timeout: u64,
        /// Mark good now, without the health check.
        #[arg(long, conflicts_with_all = ["health_url", "timeout"])]
        no_wait: bool,
        #[command(flatten)]
        layout: LayoutArg,
    },
}

/// Runs an `update` subcommand.
pub fn run(cmd: UpdateCommand) -> Result<()> {
    match cmd {
        UpdateCommand::Apply {
            bundle,
            force,
            layout,
            json,
        } => {
            let layout = layout.load()?;
            match layout.boot {
                Boot::SystemdBoot => cmd_apply(&layout, &bundle, force, json),
                Boot::Jetson => jetson::cmd_apply(&layout, &bundle, force, json),
            }
        }
        UpdateCommand::Status { layout, json } => {
            let layout = layout.load()?;
            match layout.boot {
                Boot::SystemdBoot => cmd_status(&layout, json),
                Boot::Jetson => jetson::cmd_status(&layout, json),
            }
        }
        UpdateCommand::MarkGood {
            health_url,
            timeout,
            no_wait,
            layout,
        } => {
            let wait = (!no_wait).then(|| (health_url.as_str(), Duration::from_secs(timeout)));
            let layout = layout.load()?;
            match layout.boot {
                Boot::SystemdBoot => cmd_mark_good(&layout, wait),
                Boot::Jetson => jetson::cmd_mark_good(&layout, wait),
            }
        }
    }
}

fn cmd_apply(layout: &Layout, bundle: &Path, force: bool, json: bool) -> Result<()> {
    let r = apply::apply(layout, bundle, force)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "installed edgelora {} into slot {} ({}), boot entry {} (generation {})",
            r.version,
            r.slot,
            r.device.display(),
            r.entry,
            r.generation
        );
    }
    eprintln!(
        "reboot to try it; {} failed boots roll back to slot {} ({})",
        r.tries, r.fallback_slot, r.previous_version
    );
    Ok(())
}

fn cmd_mark_good(layout: &Layout, wait: Option<(&str, Duration)>) -> Result<()> {
    let (slot, entry) = running_entry(layout)?;
    if entry.counter.is_none() {
        println!("slot {slot} is already marked good ({})", entry.file_name);
        return Ok(());
    }
    if let Some((url, timeout)) = wait {
        eprintln!(
            "slot {slot} is on trial ({}); waiting up to {}s for {url}",
            entry.file_name,
            timeout.as_secs()
        );
        health::wait_healthy(url, timeout)?;
    }
    let name = mark_good(layout, slot)?;
    println!("marked slot {slot} good ({name})");
    Ok(())
}

/// The entry of `slot` the loader would pick among that slot's entries (normally its only
/// one), or, when none is bootable, the first.
pub fn slot_entry(entries: &[Entry], slot: Slot) -> Option<&Entry> {
    let mine: Vec<Entry> = entries
        .iter()
        .filter(|e| e.slot() == Some(slot))
        .cloned()
        .collect();
    let best = loader::menu(&mine)
        .first()
        .map(|e| e.file_name.clone())
        .or_else(|| mine.first().map(|e| e.file_name.clone()))?;
    entries.iter().find(|e| e.file_name == best)
}

/// The running slot and its boot entry.
pub fn running_entry(layout: &Layout) -> Result<(Slot, Entry)> {
    let slot = layout.current_slot()?;
    let entries = scan(layout)?;
    let entry = slot_entry(&entries, slot).with_context(|| {
        format!(
            "no boot entry for the running slot {slot} in {}",
            layout.esp.join(ENTRIES_DIR).display()
        )
    })?;
    Ok((slot, entry.clone()))
}

fn scan(layout: &Layout) -> Result<Vec<Entry>> {
    loader::scan(&layout.esp)
        .with_context(|| format!("reading boot entries on {}", layout.esp.display()))
}

/// Drops the counter from `slot`'s entry (renaming `edgelora-<slot>+L-D.conf` to
/// `edgelora-<slot>.conf`, which systemd-boot then boots without counting), removes any other
/// entry of the slot, and syncs the directory. Returns the entry's new name.
pub fn mark_good(layout: &Layout, slot: Slot) -> Result<String> {
    let entries = scan(layout)?;
    let Some(entry) = slot_entry(&entries, slot) else {
        bail!("no boot entry for slot {slot} to mark good");
    };
    let dir = layout.esp.join(ENTRIES_DIR);
    let good = loader::entry_file_name(slot, None);
    if entry.file_name != good {
        std::fs::rename(dir.join(&entry.file_name), dir.join(&good)).with_context(|| {
            format!(
                "renaming {} to {good}",
                dir.join(&entry.file_name).display()
            )
        })?;
    }
    for other in entries
        .iter()
        .filter(|e| e.slot() == Some(slot) && e.file_name != entry.file_name && e.file_name != good)
    {
        fsutil::remove_if_exists(&dir.join(&other.file_name))?;
    }
    fsync_dir(&dir)?;
    Ok(good)
}

/// One slot in `status`.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct SlotStatus {
    pub device: PathBuf,
    /// "good", "trying", "bad" or "none" (no boot entry).
    pub state: &'static str,
    pub tries_left: Option<u32>,
    pub tries_done: Option<u32>,
    /// The image version from the entry's title.
    pub version: Option<String>,
    pub generation: Option<u64>,
    pub entry: Option<String>,
}

/// The entry the next boot picks.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct NextBoot {
    pub entry: String,
    pub slot: Option<Slot>,
    pub version: Option<String>,
}

/// `edgelorad update status`.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct StatusReport {
    /// None when the kernel command line names no slot (not booted from an edgelora entry).
    pub current_slot: Option<Slot>,
    pub current_version: Option<String>,
    pub slots: BTreeMap<&'static str, SlotStatus>,
    pub next_boot: Option<NextBoot>,
    /// The other slot failed its tries after an update and the box fell back to this one.
    pub rolled_back: bool,
}

/// Gathers `status`; tolerant of a missing slot option or version file, so it can explain a
/// box that is not in the expected state.
pub fn status(layout: &Layout) -> Result<StatusReport> {
    let entries = scan(layout)?;
    let current_slot = layout.current_slot().ok();
    let current_version = layout.running_version_text().ok();
    let slots = Slot::ALL
        .iter()
        .map(|&s| (s.as_str(), slot_status(layout, &entries, s)))
        .collect();
    let next_boot = loader::choose(&entries).map(|e| NextBoot {
        entry: e.file_name.clone(),
        slot: e.slot(),
        version: e.image_version().map(str::to_string),
    });
    let rolled_back = current_slot.is_some_and(|cur| rolled_back(&entries, cur));
    Ok(StatusReport {
        current_slot,
        current_version,
        slots,
        next_boot,
        rolled_back,
    })
}

fn slot_status(layout: &Layout, entries: &[Entry], slot: Slot) -> SlotStatus {
    let device = layout.slot_device(slot).to_path_buf();
    let Some(e) = slot_entry(entries, slot) else {
        return SlotStatus {
            device,
            state: "none",
            tries_left: None,
            tries_done: None,
            version: None,
            generation: None,
            entry: None,
        };
    };
    let state = match e.assessment() {
        Assessment::Good => "good",
        Assessment::Trying { .. } => "trying",
        Assessment::Bad { .. } => "bad",
    };
    SlotStatus {
        device,
        state,
        tries_left: e.counter.map(|c| c.left),
        tries_done: e.counter.map(|c| c.done),
        version: e.image_version().map(str::to_string),
        generation: e.generation(),
        entry: Some(e.file_name.clone()),
    }
}

/// The running slot is older than a bad entry of the other slot: an update was tried and the
/// loader fell back.
fn rolled_back(entries: &[Entry], current: Slot) -> bool {
    let Some(cur_gen) = slot_entry(entries, current).and_then(Entry::generation) else {
        return false;
    };
    entries
        .iter()
        .filter(|e| e.slot() == Some(current.other()) && e.is_bad())
        .filter_map(Entry::generation)
        .any(|g| g > cur_gen)
}

fn cmd_status(layout: &Layout, json: bool) -> Result<()> {
    let s = status(layout)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    match s.current_slot {
        Some(slot) => println!(
            "running: slot {slot}, version {}",
            s.current_version.as_deref().unwrap_or("unknown")
        ),
        None => println!("running: unknown slot (no edgelora.slot= on the kernel command line)"),
    }
    for (name, st) in &s.slots {
        println!("slot {name}: {}", describe_slot(st));
    }
    match &s.next_boot {
        Some(n) => println!(
            "next boot: {} ({})",
            n.slot
                .map_or_else(|| "not an edgelora slot".into(), |s| format!("slot {s}")),
            n.entry
        ),
        None => println!("next boot: no bootable entry"),
    }
    if s.rolled_back {
        let other = s.current_slot.expect("rolled back implies a slot").other();
        println!("rolled back: slot {other} failed every try; running the previous slot");
    }
    Ok(())
}

fn describe_slot(st: &SlotStatus) -> String {
    let state = match (st.state, st.tries_left, st.tries_done) {
        ("trying", Some(l), Some(d)) => format!("trying: {l} left after {d}"),
        (s, _, _) => s.to_string(),
    };
    match (&st.entry, &st.version, st.generation) {
        (Some(entry), v, g) => format!(
            "{state}, edgelora {} (generation {}, {entry})",
            v.as_deref().unwrap_or("?"),
            g.map_or_else(|| "?".into(), |g| g.to_string())
        ),
        _ => format!("{state} ({})", st.device.display()),
    }
}

/// Progress of a long step on stderr, one line per tenth, so it reads well in a journal.
pub struct Progress {
    label: String,
    started: Instant,
    last_tenth: Option<u64>,
}

impl Progress {
    pub fn new(label: &str) -> Progress {
        Progress {
            label: label.to_string(),
            started: Instant::now(),
            last_tenth: None,
        }
    }

    pub fn update(&mut self, done: u64, total: u64) {
        let pct = (done.saturating_mul(100)).checked_div(total).unwrap_or(100);
        let tenth = pct / 10;
        if self.last_tenth != Some(tenth) {
            self.last_tenth = Some(tenth);
            eprintln!(
                "{}: {pct:>3}% ({} / {} MiB)",
                self.label,
                done >> 20,
                total >> 20
            );
        }
    }

    pub fn finish(&mut self) {
        eprintln!(
            "{}: done in {:.1}s",
            self.label,
            self.started.elapsed().as_secs_f64()
        );
    }
}
