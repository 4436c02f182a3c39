//! `/etc/edgelora/update.toml`: where this box keeps its root slots, its ESP, its update key
//! and its version, and which boot loader switches between the slots (`boot`: systemd-boot on
//! x86_64, NVIDIA's UEFI and `nvbootctrl` on Jetson), so the update code has no built-in device
//! paths and tests can point every one of them (the `nvbootctrl` program too) into a temporary
//! directory.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::loader::Slot;

/// Where the layout lives unless `--layout` or `EDGELORA_UPDATE_LAYOUT` says otherwise.
pub const DEFAULT_LAYOUT: &str = "/etc/edgelora/update.toml";
/// Overrides `DEFAULT_LAYOUT` when `--layout` is not given.
pub const LAYOUT_ENV: &str = "EDGELORA_UPDATE_LAYOUT";
/// The kernel command line key naming the running slot (the boot entry sets it).
pub const SLOT_KEY: &str = "edgelora.slot";

/// What switches the boot between the slots and counts failed boots.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Boot {
    /// systemd-boot's Boot Loader Specification entries on the ESP, with automatic boot
    /// assessment (`+tries` in the entry name); the running slot is `edgelora.slot=` on the
    /// kernel command line.
    #[default]
    SystemdBoot,
    /// NVIDIA Jetson (L4T r36, UEFI): rootfs A/B slots `APP` / `APP_b`, switched and confirmed
    /// with `nvbootctrl -t rootfs`; the firmware keeps the retry count and falls back itself.
    Jetson,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct LayoutFile {
    compatible: String,
    public_key: PathBuf,
    #[serde(default = "default_version_file")]
    version_file: PathBuf,
    #[serde(default)]
    boot: Boot,
    /// Required for systemd-boot; Jetson has none.
    esp: Option<PathBuf>,
    #[serde(default = "default_cmdline_file")]
    cmdline_file: PathBuf,
    #[serde(default)]
    kernel_cmdline: String,
    #[serde(default = "default_tries")]
    tries: u32,
    #[serde(default)]
    jetson: JetsonFile,
    slots: SlotsFile,
}

/// `[jetson]`: only read when `boot = "jetson"`.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct JetsonFile {
    #[serde(default = "default_nvbootctrl")]
    nvbootctrl: PathBuf,
    #[serde(default = "default_state_file")]
    state_file: PathBuf,
    #[serde(default)]
    set_extlinux_root: bool,
}

impl Default for JetsonFile {
    fn default() -> JetsonFile {
        JetsonFile {
            nvbootctrl: default_nvbootctrl(),
            state_file: default_state_file(),
            set_extlinux_root: false,
        }
    }
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct SlotsFile {
    a: PathBuf,
    b: PathBuf,
}

fn default_version_file() -> PathBuf {
    PathBuf::from("/etc/edgelora/version")
}

fn default_cmdline_file() -> PathBuf {
    PathBuf::from("/proc/cmdline")
}

fn default_tries() -> u32 {
    3
}

/// Where NVIDIA's `nvidia-l4t-tools` package installs it.
pub const DEFAULT_NVBOOTCTRL: &str = "/usr/sbin/nvbootctrl";

fn default_nvbootctrl() -> PathBuf {
    PathBuf::from(DEFAULT_NVBOOTCTRL)
}

/// On the data partition: it must outlive the root slots it describes.
pub const DEFAULT_STATE_FILE: &str = "/var/lib/edgelora/update-state.json";

fn default_state_file() -> PathBuf {
    PathBuf::from(DEFAULT_STATE_FILE)
}

/// The Jetson part of a layout.
#[derive(Clone, Debug)]
pub struct JetsonLayout {
    /// The `nvbootctrl` program (a fake in tests).
    pub nvbootctrl: PathBuf,
    /// Which slot holds an update on trial (JSON), kept across the reboot.
    pub state_file: PathBuf,
    /// After writing a slot, point `root=` in its `/boot/extlinux/extlinux.conf` at that slot's
    /// partition (L4T's launcher passes the file's `APPEND` line to the kernel unchanged, and a
    /// bundle's image is the same for both slots). Needs `mount`; off in tests with plain files.
    pub set_extlinux_root: bool,
}

/// The loaded layout, every path absolute (or as given, when the layout path was relative).
#[derive(Clone, Debug)]
pub struct Layout {
    /// The file it was read from.
    pub path: PathBuf,
    /// Bundles must carry exactly this `compatible` string.
    pub compatible: String,
    /// The fleet's `update.pub` (a verifier key line).
    pub public_key: PathBuf,
    /// The running image's semantic version, one line.
    pub version_file: PathBuf,
    /// Which boot loader this box has.
    pub boot: Boot,
    /// The mounted EFI system partition (systemd-boot only; empty on Jetson).
    pub esp: PathBuf,
    /// The kernel command line (`/proc/cmdline` on a box).
    pub cmdline_file: PathBuf,
    /// Extra kernel options appended to new boot entries.
    pub kernel_cmdline: String,
    /// Boot attempts a new slot gets before the loader falls back (systemd-boot; on Jetson the
    /// firmware's ROOTFS_RETRY_COUNT_MAX, set when flashing, decides).
    pub tries: u32,
    /// `boot = "jetson"` settings (defaults otherwise).
    pub jetson: JetsonLayout,
    slot_a: PathBuf,
    slot_b: PathBuf,
}

impl Layout {
    /// `--layout`, else `$EDGELORA_UPDATE_LAYOUT`, else `DEFAULT_LAYOUT`.
    pub fn locate(cli: Option<&Path>) -> PathBuf {
        if let Some(p) = cli {
            return p.to_path_buf();
        }
        match std::env::var_os(LAYOUT_ENV) {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => PathBuf::from(DEFAULT_LAYOUT),
        }
    }

    /// Reads and checks a layout file; relative paths in it resolve against its directory.
    pub fn load(path: &Path) -> Result<Layout> {
        let text = fs::read_to_string(path)
            .with_context(|| format!("reading the update layout {}", path.display()))?;
        Layout::parse(&text, path)
    }

    /// `load` on text already read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Layout> {
        let f: LayoutFile =
            toml::from_str(text).with_context(|| format!("update layout {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let abs = |p: &Path| -> PathBuf {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        let bad = |what: &str| anyhow::anyhow!("update layout {}: {what}", path.display());
        if f.compatible.trim().is_empty() {
            return Err(bad("`compatible` is empty"));
        }
        if f.tries == 0 || f.tries > 100 {
            return Err(bad("`tries` must be 1..=100"));
        }
        if f.kernel_cmdline.contains(['\n', '\r']) {
            return Err(bad("`kernel_cmdline` must be one line"));
        }
        if f.slots.a == f.slots.b {
            return Err(bad("slots a and b are the same device"));
        }
        let esp = match (f.boot, &f.esp) {
            (Boot::SystemdBoot, Some(e)) => abs(e),
            (Boot::SystemdBoot, None) => {
                return Err(bad("`esp` is needed with boot = \"systemd-boot\""));
            }
            (Boot::Jetson, None) => PathBuf::new(),
            (Boot::Jetson, Some(_)) => {
                return Err(bad("`esp` has no meaning with boot = \"jetson\""));
            }
        };
        Ok(Layout {
            path: path.to_path_buf(),
            compatible: f.compatible,
            public_key: abs(&f.public_key),
            version_file: abs(&f.version_file),
            boot: f.boot,
            esp,
            cmdline_file: abs(&f.cmdline_file),
            kernel_cmdline: f.kernel_cmdline.trim().to_string(),
            tries: f.tries,
            jetson: JetsonLayout {
                nvbootctrl: abs(&f.jetson.nvbootctrl),
                state_file: abs(&f.jetson.state_file),
                set_extlinux_root: f.jetson.set_extlinux_root,
            },
            slot_a: abs(&f.slots.a),
            slot_b: abs(&f.slots.b),
        })
    }

    /// The block device (a file in tests) holding `slot`'s root file system.
    pub fn slot_device(&self, slot: Slot) -> &Path {
        match slot {
            Slot::A => &self.slot_a,
            Slot::B => &self.slot_b,
        }
    }

    /// The running slot, from `edgelora.slot=` on the kernel command line.
    pub fn current_slot(&self) -> Result<Slot> {
        let cmdline = fs::read_to_string(&self.cmdline_file)
            .with_context(|| format!("reading {}", self.cmdline_file.display()))?;
        slot_from_cmdline(&cmdline)
            .with_context(|| format!("kernel command line {}", self.cmdline_file.display()))
    }

    /// The running image's version, as written in `version_file`.
    pub fn running_version_text(&self) -> Result<String> {
        let text = fs::read_to_string(&self.version_file)
            .with_context(|| format!("reading {}", self.version_file.display()))?;
        Ok(text.trim().to_string())
    }

    /// The running image's version, parsed.
    pub fn running_version(&self) -> Result<semver::Version> {
        let text = self.running_version_text()?;
        semver::Version::parse(&text).with_context(|| {
            format!(
                "{}: {text:?} is not a semantic version",
                self.version_file.display()
            )
        })
    }

    /// The fleet's update verification key.
    pub fn load_public_key(&self) -> Result<edgelora_ledger::PublicKey> {
        edgelora_image::bundle::load_public_key(&self.public_key)
            .context("loading the update verification key")
    }
}

/// The slot named by the last `edgelora.slot=` on a kernel command line (the kernel, too, lets
/// a later option win).
pub fn slot_from_cmdline(cmdline: &str) -> Result<Slot> {
    let prefix = format!("{SLOT_KEY}=");
    let Some(value) = cmdline
        .split_whitespace()
        .filter_map(|w| w.strip_prefix(&prefix))
        .next_back()
    else {
        bail!(
            "no `{SLOT_KEY}=a|b` option: not booted from an edgelora A/B entry, so the running \
             slot is unknown"
        );
    };
    Slot::parse(value).with_context(|| format!("`{SLOT_KEY}={value}`: expected a or b"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAYOUT: &str = r#"
compatible = "edgelora-x86_64"
public_key = "update.pub"
version_file = "/etc/edgelora/version"
esp = "esp"
kernel_cmdline = "console=ttyS0 rootwait"
[slots]
a = "slot-a.img"
b = "/dev/disk/by-partlabel/edgelora-root-b"
"#;

    #[test]
    fn relative_paths_resolve_against_the_layout_dir() {
        let l = Layout::parse(LAYOUT, Path::new("/box/etc/update.toml")).unwrap();
        assert_eq!(l.public_key, Path::new("/box/etc/update.pub"));
        assert_eq!(l.esp, Path::new("/box/etc/esp"));
        assert_eq!(l.version_file, Path::new("/etc/edgelora/version"));
        assert_eq!(l.cmdline_file, Path::new("/proc/cmdline"));
        assert_eq!(l.slot_device(Slot::A), Path::new("/box/etc/slot-a.img"));
        assert_eq!(
            l.slot_device(Slot::B),
            Path::new("/dev/disk/by-partlabel/edgelora-root-b")
        );
        assert_eq!(l.tries, 3);
    }

    #[test]
    fn jetson_layouts() {
        let text = r#"
compatible = "edgelora-aarch64"
public_key = "/etc/edgelora/update.pub"
boot = "jetson"
[jetson]
nvbootctrl = "fake-nvbootctrl"
[slots]
a = "/dev/disk/by-partlabel/APP"
b = "/dev/disk/by-partlabel/APP_b"
"#;
        let l = Layout::parse(text, Path::new("/box/etc/update.toml")).unwrap();
        assert_eq!(l.boot, Boot::Jetson);
        assert_eq!(l.jetson.nvbootctrl, Path::new("/box/etc/fake-nvbootctrl"));
        assert_eq!(l.jetson.state_file, Path::new(DEFAULT_STATE_FILE));
        assert!(!l.jetson.set_extlinux_root);
        assert_eq!(
            l.slot_device(Slot::B),
            Path::new("/dev/disk/by-partlabel/APP_b")
        );
        // Defaults: systemd-boot, which needs an ESP; Jetson has none.
        let l = Layout::parse(LAYOUT, Path::new("/x/update.toml")).unwrap();
        assert_eq!(l.boot, Boot::SystemdBoot);
        assert_eq!(l.jetson.nvbootctrl, Path::new(DEFAULT_NVBOOTCTRL));
        let no_esp = LAYOUT.replace("esp = \"esp\"\n", "");
        let e = Layout::parse(&no_esp, Path::new("/x/update.toml")).unwrap_err();
        assert!(e.to_string().contains("`esp` is needed"), "{e}");
        let with_esp = text.replace(
            "boot = \"jetson\"",
            "boot = \"jetson\"\nesp = \"/boot/efi\"",
        );
        assert!(Layout::parse(&with_esp, Path::new("/x/update.toml")).is_err());
        let bad = text.replace("\"jetson\"", "\"grub\"");
        assert!(Layout::parse(&bad, Path::new("/x/update.toml")).is_err());
    }

    #[test]
    fn unknown_fields_are_refused() {
        let text = format!("{LAYOUT}\nextra = 1\n");
        assert!(Layout::parse(&text, Path::new("/x/update.toml")).is_err());
    }

    #[test]
    fn slot_from_the_command_line() {
        assert_eq!(
            slot_from_cmdline("root=X edgelora.slot=b quiet\n").unwrap(),
            Slot::B
        );
        assert!(slot_from_cmdline("root=X quiet").is_err());
        assert!(slot_from_cmdline("edgelora.slot=c").is_err());
    }
}
