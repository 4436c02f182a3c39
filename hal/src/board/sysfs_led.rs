//! An LED of the kernel's LED class (`/sys/class/leds/<name>/brightness`) as an `embedded-hal`
//! output pin: the simplest real LED on a Jetson carrier board, wired by the device tree.

use std::io::Write;
use std::path::{Path, PathBuf};

use embedded_hal::digital::{ErrorType, OutputPin};

use crate::HalError;
use crate::sysfs::{read_optional, read_optional_number};

/// A sysfs LED; high writes its `max_brightness`, low writes 0.
#[derive(Debug, Clone)]
pub struct SysfsLed {
    brightness: PathBuf,
    on_value: u32,
}

impl SysfsLed {
    /// Opens LED `name` under `root` (`/` on a real board). Takes the LED from whatever kernel
    /// trigger drives it (heartbeat, mmc activity) by setting its trigger to `none`.
    pub fn open(root: &Path, name: &str) -> Result<Self, HalError> {
        if name.is_empty() || name == "." || name == ".." || name.contains('/') {
            return Err(HalError::Config(format!(
                "LED name {name:?} is not a single path component"
            )));
        }
        let dir = root.join("sys/class/leds").join(name);
        let brightness = dir.join("brightness");
        if !brightness.is_file() {
            return Err(HalError::Missing {
                path: brightness,
                what: "LED brightness file",
            });
        }
        let max_path = dir.join("max_brightness");
        let on_value = read_optional_number::<u32>(&max_path, "a brightness")?
            .filter(|max| *max > 0)
            .unwrap_or(1);
        let trigger = dir.join("trigger");
        if read_optional(&trigger)?.is_some() {
            write_existing(&trigger, b"none")?;
        }
        Ok(Self {
            brightness,
            on_value,
        })
    }

    pub fn brightness_path(&self) -> &Path {
        &self.brightness
    }
}

/// Writes to a file that must already exist: a vanished sysfs attribute is an error, not a
/// regular file to create.
fn write_existing(path: &Path, bytes: &[u8]) -> Result<(), HalError> {
    std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(|source| HalError::Write {
            path: path.to_path_buf(),
            source,
        })
}

impl ErrorType for SysfsLed {
    type Error = HalError;
}

impl OutputPin for SysfsLed {
    fn set_low(&mut self) -> Result<(), HalError> {
        write_existing(&self.brightness, b"0")
    }

    fn set_high(&mut self) -> Result<(), HalError> {
        write_existing(&self.brightness, self.on_value.to_string().as_bytes())
    }
}
