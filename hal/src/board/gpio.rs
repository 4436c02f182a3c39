//! An LED on a GPIO line (a 40-pin header pin, say), through the GPIO character device
//! (`/dev/gpiochipN`) and `linux-embedded-hal`'s [`CdevPin`], which implements `OutputPin`.

use std::path::Path;

use linux_embedded_hal::gpio_cdev::{Chip, LineRequestFlags};

pub use linux_embedded_hal::CdevPin;

use crate::HalError;

/// Requests `line` of GPIO chip `chip` as an output, initially low, labelled `consumer` (what
/// `gpioinfo` shows as its user).
pub fn open_gpio_output(chip: &Path, line: u32, consumer: &str) -> Result<CdevPin, HalError> {
    let gpio_err = |source| HalError::Gpio {
        chip: chip.to_path_buf(),
        line,
        source,
    };
    let mut gpio_chip = Chip::new(chip).map_err(gpio_err)?;
    let handle = gpio_chip
        .get_line(line)
        .and_then(|l| l.request(LineRequestFlags::OUTPUT, 0, consumer))
        .map_err(gpio_err)?;
    CdevPin::new(handle).map_err(gpio_err)
}
