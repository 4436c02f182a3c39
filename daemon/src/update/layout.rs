//! `/etc/edgelora/update.toml`: where this box keeps its root slots, its ESP, its update key
//! and its version, so the update code has no built-in device paths and tests can point every
//! one of them into a temporary directory.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use super::loader::Slot;

/// Where the layout lives unless `--layout` or `EDGELORA_UPDATE_LAYOUT` says otherwise.
pub const DEFAULT_LAYOUT: &str = "/etc/edgelora/update.toml";
/// Overrides `DEFAULT_LAYOUT` when `--layout` is not given.
pub const LAYOUT_ENV: &str = "EDGELORA_UPDATE_LAYOUT";
/// The kernel command line key naming the running slot (the boot entry sets it).
pub const SLOT_KEY: &str = "edgelora.slot";

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct LayoutFile {
    compatible: String,
    public_key: PathBuf,
    #[serde(default = "default_version_file")]
    version_file: PathBuf,
    esp: PathBuf,
    #[serde(default = "default_cmdline_file")]
    cmdline_file: PathBuf,
    #[serde(default)]
    kernel_cmdline: String,
    #[serde(default = "default_tries")]
    tries: u32,
    slots: SlotsFile,
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
    /// The mounted EFI system partition.
    pub esp: PathBuf,
    /// The kernel command line (`/proc/cmdline` on a box).
    pub cmdline_file: PathBuf,
    /// Extra kernel options appended to new boot entries.
    pub kernel_cmdline: String,
    /// Boot attempts a new slot gets before the loader falls back.
    pub tries: u32,
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
        Ok(Layout {
            path: path.to_path_buf(),
            compatible: f.compatible,
            public_key: abs(&f.public_key),
            version_file: abs(&f.version_file),
            esp: abs(&f.esp),
            cmdline_file: abs(&f.cmdline_file),
            kernel_cmdline: f.kernel_cmdline.trim().to_string(),
            tries: f.tries,
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
