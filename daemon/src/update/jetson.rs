//! `edgelorad update` on NVIDIA Jetson (Jetson Linux r36 / JetPack 6, UEFI, flashed with
//! `ROOTFS_AB=1`): the root slots are the GPT partitions `APP` (slot A, nvbootctrl slot 0) and
//! `APP_b` (slot B, slot 1), and NVIDIA's firmware, not a boot entry, decides what boots:
//!
//! - `nvbootctrl -t rootfs get-current-slot` names the running slot (`0` or `1`);
//! - `nvbootctrl -t rootfs set-active-boot-slot N` makes slot N the next boot;
//! - `nvbootctrl -t rootfs mark-boot-successful` confirms the running boot. The firmware counts
//!   unconfirmed boots (`ROOTFS_RETRY_COUNT_MAX`, 3 by default) and, when a slot runs out, marks
//!   it unbootable and boots the other one: three failed boots roll back by themselves;
//! - `nvbootctrl -t rootfs dump-slots-info` shows both slots (`status: normal|unbootable`).
//!
//! `apply` runs the same checks as the systemd-boot path before its first write, makes the
//! running slot the next boot (so the slot being written never is), writes, syncs and reads
//! back the other slot, and only then switches the next boot to it. Which slot holds an update
//! on trial is kept in a small state file on the data partition, so `apply` can refuse to
//! overwrite the only proven slot while the running one has not been confirmed yet.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::apply::{open_bundle, open_target_verified, verify_rootfs, write_slot};
use super::fsutil::replace_file;
use super::health;
use super::layout::Layout;
use super::loader::Slot;

/// `mark-good` exit status when the daemon is healthy but `nvbootctrl` refused to record it:
/// the boot-ok unit lists it in `SuccessExitStatus=`, so a tool mismatch does not reboot a
/// healthy box in a loop (NVIDIA's own `nv-l4t-bootloader-config.service`, ordered after the
/// unit, still confirms the boot with `nvbootctrl verify`).
pub const EXIT_BOOTLOADER_REFUSED: i32 = 3;

/// nvbootctrl's number for a slot.
pub fn slot_number(slot: Slot) -> u8 {
    match slot {
        Slot::A => 0,
        Slot::B => 1,
    }
}

/// A slot as nvbootctrl prints it: `0`/`1` (get-current-slot) or `A`/`B` (dump-slots-info).
pub fn parse_slot(s: &str) -> Option<Slot> {
    match s.trim() {
        "0" | "A" | "a" => Some(Slot::A),
        "1" | "B" | "b" => Some(Slot::B),
        _ => None,
    }
}

/// NVIDIA's `nvbootctrl`, always with `-t rootfs`.
pub struct Nvbootctrl<'a> {
    program: &'a Path,
}

impl<'a> Nvbootctrl<'a> {
    pub fn new(layout: &'a Layout) -> Nvbootctrl<'a> {
        Nvbootctrl {
            program: &layout.jetson.nvbootctrl,
        }
    }

    /// Runs `nvbootctrl -t rootfs ARGS`; its stdout, or an error naming the command and
    /// carrying what it printed.
    fn run(&self, args: &[&str]) -> Result<String> {
        let shown = format!("{} -t rootfs {}", self.program.display(), args.join(" "));
        let out = Command::new(self.program)
            .args(["-t", "rootfs"])
            .args(args)
            .output()
            .with_context(|| format!("running {shown} (is this a Jetson with L4T r36?)"))?;
        if !out.status.success() {
            let mut text = String::from_utf8_lossy(&out.stderr).trim().to_string();
            let stdout = String::from_utf8_lossy(&out.stdout);
            if !stdout.trim().is_empty() {
                text.push_str(&format!(" {}", stdout.trim()));
            }
            bail!("`{shown}` failed ({}): {text}", out.status);
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The running rootfs slot.
    pub fn current_slot(&self) -> Result<Slot> {
        let out = self.run(&["get-current-slot"])?;
        parse_slot(&out).with_context(|| {
            format!(
                "`{} -t rootfs get-current-slot` printed {:?}, not 0 or 1",
                self.program.display(),
                out.trim()
            )
        })
    }

    /// Makes `slot` the slot the next boot uses.
    pub fn set_active(&self, slot: Slot) -> Result<()> {
        let n = slot_number(slot).to_string();
        self.run(&["set-active-boot-slot", &n]).map(drop)
    }

    /// Confirms the running boot: the firmware stops counting it as a try.
    pub fn mark_successful(&self) -> Result<()> {
        self.run(&["mark-boot-successful"]).map(drop)
    }

    pub fn slots_info(&self) -> Result<SlotsInfo> {
        Ok(parse_slots_info(&self.run(&["dump-slots-info"])?))
    }
}

/// One slot's line of `dump-slots-info`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SlotInfo {
    pub retry_count: Option<u32>,
    /// `normal` or `unbootable`.
    pub status: String,
}

/// What `nvbootctrl -t rootfs dump-slots-info` says, as far as it could be read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SlotsInfo {
    pub current: Option<Slot>,
    pub active: Option<Slot>,
    pub slots: BTreeMap<Slot, SlotInfo>,
}

/// Parses `dump-slots-info` output (r35/r36):
///
/// ```text
/// Current rootfs slot: A
/// Active rootfs slot: A
/// num_slots: 2
/// slot: 0,             retry_count: 3,             status: normal
/// slot: 1,             retry_count: 3,             status: normal
/// ```
pub fn parse_slots_info(text: &str) -> SlotsInfo {
    let mut info = SlotsInfo::default();
    for line in text.lines() {
        let line = line.trim();
        if let Some(v) = line.strip_prefix("Current rootfs slot:") {
            info.current = parse_slot(v);
        } else if let Some(v) = line.strip_prefix("Active rootfs slot:") {
            info.active = parse_slot(v);
        } else if line.starts_with("slot:") {
            let mut slot = None;
            let mut retry_count = None;
            let mut status = None;
            for field in line.split(',') {
                match field.split_once(':').map(|(k, v)| (k.trim(), v.trim())) {
                    Some(("slot", v)) => slot = parse_slot(v),
                    Some(("retry_count", v)) => retry_count = v.parse().ok(),
                    Some(("status", v)) => status = Some(v.to_string()),
                    _ => {}
                }
            }
            if let (Some(slot), Some(status)) = (slot, status) {
                info.slots.insert(
                    slot,
                    SlotInfo {
                        retry_count,
                        status,
                    },
                );
            }
        }
    }
    info
}

/// An installed update whose boot has not been confirmed yet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trial {
    pub slot: Slot,
    pub version: String,
    pub previous_version: String,
}

/// The state file (`[jetson] state_file`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub trial: Option<Trial>,
}

/// The state file's contents; none yet is an empty state.
pub fn read_state(path: &Path) -> Result<State> {
    match fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .with_context(|| format!("{}: not an update state file", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Replaces the state file as a whole (synced temporary, rename, synced directory).
pub fn write_state(path: &Path, state: &State) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp"));
    let text = serde_json::to_string_pretty(state)?;
    replace_file(&tmp, path, |f| {
        f.write_all(text.as_bytes())?;
        f.write_all(b"\n")?;
        Ok(())
    })
}

/// What `apply` installed.
#[derive(Serialize, Debug, Clone)]
pub struct ApplyReport {
    pub version: String,
    pub previous_version: String,
    pub slot: Slot,
    pub fallback_slot: Slot,
    pub device: PathBuf,
    /// The nvbootctrl slot number now set as the next boot.
    pub active_boot_slot: u8,
}

/// Checks `bundle_path` against this box and installs it into the slot that is not running.
pub fn apply(layout: &Layout, bundle_path: &Path, force: bool) -> Result<ApplyReport> {
    let nv = Nvbootctrl::new(layout);
    // Every check first: nothing below changes the box until the last one has passed.
    let current = nv.current_slot()?;
    let target = current.other();
    let (bundle, running) = open_bundle(layout, bundle_path, force)?;
    let m = bundle.manifest();
    let state = read_state(&layout.jetson.state_file)?;
    if let Some(t) = state.trial.as_ref().filter(|t| t.slot == current && !force) {
        bail!(
            "the running slot has not been marked good yet (slot {current}, edgelora {} is on \
             trial); run `edgelorad update mark-good` first, or --force",
            t.version
        );
    }
    let Some(rootfs) = m.payload("rootfs").cloned() else {
        bail!("refusing the bundle: it has no `rootfs` payload");
    };
    let device_path = layout.slot_device(target);
    let mut device = open_target_verified(layout, &bundle, &rootfs, target)?;

    // The writes. Until the very last step the running slot is the next boot, so a power cut
    // or a kill anywhere before it boots the old system.
    nv.set_active(current)
        .context("making the running slot the next boot before writing the other one")?;
    write_state(&layout.jetson.state_file, &State { trial: None })?;
    write_slot(&bundle, &rootfs, &mut device, device_path, target)?;
    drop(device);
    verify_rootfs(device_path, &rootfs)?;
    if layout.jetson.set_extlinux_root {
        extlinux::point_root_at(device_path)?;
    }
    let version = m.version.clone();
    let trial = Trial {
        slot: target,
        version: version.clone(),
        previous_version: running.to_string(),
    };
    write_state(
        &layout.jetson.state_file,
        &State {
            trial: Some(trial.clone()),
        },
    )?;
    nv.set_active(target)
        .context("switching the next boot to the new slot")?;
    Ok(ApplyReport {
        version,
        previous_version: trial.previous_version,
        slot: target,
        fallback_slot: current,
        device: device_path.to_path_buf(),
        active_boot_slot: slot_number(target),
    })
}

pub fn cmd_apply(layout: &Layout, bundle: &Path, force: bool, json: bool) -> Result<()> {
    let r = apply(layout, bundle, force)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "installed edgelora {} into slot {} ({}); nvbootctrl boots rootfs slot {} next",
            r.version,
            r.slot,
            r.device.display(),
            r.active_boot_slot
        );
    }
    eprintln!(
        "reboot to try it; failed boots (ROOTFS_RETRY_COUNT_MAX, 3 by default) roll back to slot \
         {} ({})",
        r.fallback_slot, r.previous_version
    );
    Ok(())
}

/// Waits for the daemon's health (unless `wait` is None), then confirms the running boot to the
/// firmware. Every boot is confirmed, not only the first of an update: the firmware counts
/// each unconfirmed one.
pub fn cmd_mark_good(layout: &Layout, wait: Option<(&str, Duration)>) -> Result<()> {
    let nv = Nvbootctrl::new(layout);
    let current = nv.current_slot()?;
    let state = read_state(&layout.jetson.state_file)?;
    if let Some((url, timeout)) = wait {
        eprintln!(
            "slot {current}: waiting up to {}s for {url} before confirming the boot",
            timeout.as_secs()
        );
        health::wait_healthy(url, timeout)?;
    }
    if let Err(e) = nv.mark_successful() {
        eprintln!(
            "error: the daemon is healthy but the boot could not be confirmed: {e:#}\n\
             (exit status {EXIT_BOOTLOADER_REFUSED}: not a failed boot)"
        );
        std::process::exit(EXIT_BOOTLOADER_REFUSED);
    }
    match state.trial {
        Some(t) if t.slot == current => {
            write_state(&layout.jetson.state_file, &State { trial: None })?;
            println!(
                "marked slot {current} good (edgelora {}, was on trial)",
                t.version
            );
        }
        _ => println!("marked slot {current} good"),
    }
    Ok(())
}

/// One slot in `status`.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct SlotStatus {
    pub device: PathBuf,
    /// nvbootctrl's `status`: `normal`, `unbootable`, or `unknown` when it could not be read.
    pub state: String,
    pub retry_count: Option<u32>,
    /// The running version for the running slot, the trial's for the slot it was installed to.
    pub version: Option<String>,
}

/// The slot the next boot uses.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct NextBoot {
    pub slot: Slot,
}

/// `edgelorad update status` on Jetson.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct StatusReport {
    pub boot: &'static str,
    pub current_slot: Option<Slot>,
    pub current_version: Option<String>,
    pub slots: BTreeMap<&'static str, SlotStatus>,
    pub next_boot: Option<NextBoot>,
    /// An update not confirmed yet.
    pub trial: Option<Trial>,
    /// The firmware gave up on the slot an update was installed to and booted the other one.
    pub rolled_back: bool,
}

/// Gathers `status`, tolerant of an nvbootctrl that says less than expected.
pub fn status(layout: &Layout) -> Result<StatusReport> {
    let nv = Nvbootctrl::new(layout);
    let info = nv.slots_info().unwrap_or_default();
    let current_slot = nv.current_slot().ok().or(info.current);
    let current_version = layout.running_version_text().ok();
    let trial = read_state(&layout.jetson.state_file)?.trial;
    let slots = Slot::ALL
        .iter()
        .map(|&s| {
            let i = info.slots.get(&s);
            let version = if Some(s) == current_slot {
                current_version.clone()
            } else {
                trial
                    .as_ref()
                    .filter(|t| t.slot == s)
                    .map(|t| t.version.clone())
            };
            let st = SlotStatus {
                device: layout.slot_device(s).to_path_buf(),
                state: i.map_or_else(|| "unknown".to_string(), |i| i.status.clone()),
                retry_count: i.and_then(|i| i.retry_count),
                version,
            };
            (s.as_str(), st)
        })
        .collect::<BTreeMap<_, _>>();
    let rolled_back = trial.as_ref().is_some_and(|t| {
        Some(t.slot) != current_slot && slots[t.slot.as_str()].state == "unbootable"
    });
    Ok(StatusReport {
        boot: "jetson",
        current_slot,
        current_version,
        slots,
        next_boot: info.active.map(|slot| NextBoot { slot }),
        trial,
        rolled_back,
    })
}

pub fn cmd_status(layout: &Layout, json: bool) -> Result<()> {
    let s = status(layout)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    match s.current_slot {
        Some(slot) => println!(
            "running: slot {slot} (nvbootctrl slot {}), version {}",
            slot_number(slot),
            s.current_version.as_deref().unwrap_or("unknown")
        ),
        None => println!("running: unknown slot (nvbootctrl did not say)"),
    }
    for (name, st) in &s.slots {
        println!(
            "slot {name}: {}{}, edgelora {} ({})",
            st.state,
            st.retry_count
                .map_or_else(String::new, |r| format!(", {r} tries left")),
            st.version.as_deref().unwrap_or("?"),
            st.device.display()
        );
    }
    match &s.next_boot {
        Some(n) => println!("next boot: slot {}", n.slot),
        None => println!("next boot: unknown (nvbootctrl dump-slots-info did not say)"),
    }
    if let Some(t) = &s.trial {
        println!(
            "on trial: edgelora {} in slot {} (not confirmed yet)",
            t.version, t.slot
        );
    }
    if s.rolled_back {
        println!("rolled back: the firmware gave up on the updated slot; running the previous one");
    }
    Ok(())
}

/// L4T's launcher boots the kernel with the `APPEND` line of the slot's own
/// `/boot/extlinux/extlinux.conf`, so that line must name the slot's partition as `root=`;
/// a bundle's image is the same for both slots, so `apply` points it at the slot it wrote
/// (as NVIDIA's flashing tools do for APP and APP_b), by PARTUUID.
pub mod extlinux {
    use std::fs;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    use anyhow::{Context, Result, bail};

    use super::super::fsutil::replace_file;

    pub const CONF: &str = "boot/extlinux/extlinux.conf";

    /// `text` with `root=` on every `APPEND` line set to `root` (added where missing); the number
    /// of `APPEND` lines.
    pub fn set_root(text: &str, root: &str) -> (String, usize) {
        let mut n = 0;
        let mut out = String::with_capacity(text.len() + 64);
        for line in text.split_inclusive('\n') {
            let body = line.trim_end_matches(['\n', '\r']);
            let ending = &line[body.len()..];
            let trimmed = body.trim_start();
            let is_append = trimmed
                .split_whitespace()
                .next()
                .is_some_and(|w| w.eq_ignore_ascii_case("APPEND"));
            if !is_append {
                out.push_str(line);
                continue;
            }
            n += 1;
            let indent = &body[..body.len() - trimmed.len()];
            let mut words: Vec<String> = trimmed.split_whitespace().map(str::to_string).collect();
            let mut found = false;
            for w in words.iter_mut().skip(1) {
                if w.starts_with("root=") {
                    *w = format!("root={root}");
                    found = true;
                }
            }
            if !found {
                words.push(format!("root={root}"));
            }
            out.push_str(indent);
            out.push_str(&words.join(" "));
            out.push_str(ending);
        }
        (out, n)
    }

    /// `PARTUUID=<uuid>` of the partition `device` names, from /dev/disk/by-partuuid.
    pub fn partuuid(device: &Path) -> Result<String> {
        let want =
            fs::canonicalize(device).with_context(|| format!("resolving {}", device.display()))?;
        let dir = Path::new("/dev/disk/by-partuuid");
        for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let e = e?;
            if fs::canonicalize(e.path()).is_ok_and(|p| p == want) {
                return Ok(format!("PARTUUID={}", e.file_name().to_string_lossy()));
            }
        }
        bail!("{} ({}) has no PARTUUID", device.display(), want.display())
    }

    /// Unmounts on drop.
    struct Mounted(PathBuf);

    impl Drop for Mounted {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
            let _ = fs::remove_dir(&self.0);
        }
    }

    fn run(cmd: &mut Command) -> Result<()> {
        let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
        if !out.status.success() {
            bail!(
                "{cmd:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Mounts the written slot, points its extlinux.conf at it, syncs and unmounts.
    pub fn point_root_at(device: &Path) -> Result<()> {
        let root = partuuid(device)?;
        let dir = PathBuf::from(format!("/run/edgelora-update-{}", std::process::id()));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        if let Err(e) = run(Command::new("mount")
            .args(["-t", "ext4"])
            .arg(device)
            .arg(&dir))
        {
            let _ = fs::remove_dir(&dir);
            return Err(e);
        }
        let mounted = Mounted(dir);
        let conf = mounted.0.join(CONF);
        let text = fs::read_to_string(&conf).with_context(|| {
            format!(
                "the new slot has no /{CONF} (was the bundle made from the root filesystem \
                 after apply_binaries.sh?)"
            )
        })?;
        let (new, n) = set_root(&text, &root);
        if n == 0 {
            bail!("/{CONF} in the new slot has no APPEND line");
        }
        let tmp = conf.with_file_name(".extlinux.conf.edgelora.tmp");
        replace_file(&tmp, &conf, |f| {
            use std::io::Write;
            f.write_all(new.as_bytes())?;
            Ok(())
        })?;
        eprintln!("pointed /{CONF} of {} at {root}", device.display());
        run(Command::new("umount").arg(&mounted.0))?;
        drop(mounted);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_info_as_nvbootctrl_prints_it() {
        let text = "Current rootfs slot: B\nActive rootfs slot: A\nnum_slots: 2\n\
                    slot: 0,             retry_count: 3,             status: normal\n\
                    slot: 1,             retry_count: 0,             status: unbootable\n";
        let i = parse_slots_info(text);
        assert_eq!(i.current, Some(Slot::B));
        assert_eq!(i.active, Some(Slot::A));
        assert_eq!(
            i.slots[&Slot::B],
            SlotInfo {
                retry_count: Some(0),
                status: "unbootable".into()
            }
        );
        assert_eq!(i.slots[&Slot::A].retry_count, Some(3));
        assert_eq!(parse_slots_info("garbage"), SlotsInfo::default());
        assert_eq!(parse_slot("1\n"), Some(Slot::B));
        assert_eq!(parse_slot("2"), None);
    }

    #[test]
    fn extlinux_root_is_pointed_at_the_slot() {
        let text = "TIMEOUT 30\nDEFAULT primary\n\nLABEL primary\n      MENU LABEL primary kernel\n      \
                    LINUX /boot/Image\n      INITRD /boot/initrd\n      APPEND ${cbootargs} \
                    root=PARTUUID=aaaa rw rootwait rootfstype=ext4\n\n# APPEND root=/dev/sda1\n";
        let (out, n) = extlinux::set_root(text, "PARTUUID=bbbb");
        assert_eq!(n, 1);
        assert!(out.contains("      APPEND ${cbootargs} root=PARTUUID=bbbb rw rootwait"));
        assert!(out.contains("# APPEND root=/dev/sda1\n"), "comments stay");
        assert_eq!(out.len(), text.len());
        let (out, n) = extlinux::set_root("append quiet\r\n", "PARTUUID=c");
        assert_eq!((out.as_str(), n), ("append quiet root=PARTUUID=c\r\n", 1));
        assert_eq!(extlinux::set_root("LINUX /boot/Image\n", "x").1, 0);
    }

    #[test]
    fn state_round_trip() {
        let dir = std::env::temp_dir().join(format!("edgelora-state-{}", std::process::id()));
        let p = dir.join("sub/state.json");
        assert_eq!(read_state(&p).unwrap(), State::default());
        let s = State {
            trial: Some(Trial {
                slot: Slot::B,
                version: "1.1.0".into(),
                previous_version: "1.0.0".into(),
            }),
        };
        write_state(&p, &s).unwrap();
        assert_eq!(read_state(&p).unwrap(), s);
        fs::write(&p, "{").unwrap();
        assert!(read_state(&p).is_err());
        let _ = fs::remove_dir_all(&dir);
    }
}
