//! Reading sysfs/procfs attribute files: one value per file, text, a trailing newline (device-tree
//! strings end in NUL instead). Every helper reports the path it was reading.

use std::io;
use std::path::Path;
use std::str::FromStr;

use crate::HalError;

/// The file's content without surrounding whitespace or a trailing NUL.
pub(crate) fn read_trimmed(path: &Path) -> Result<String, HalError> {
    let raw = std::fs::read(path).map_err(|source| HalError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let text = String::from_utf8(raw).map_err(|e| HalError::Parse {
        path: path.to_path_buf(),
        expected: "UTF-8 text",
        found: String::from_utf8_lossy(e.as_bytes()).into_owned(),
    })?;
    Ok(text
        .trim_matches(|c: char| c.is_whitespace() || c == '\0')
        .to_owned())
}

/// Like [`read_trimmed`], but a file that does not exist is `None`: sysfs attributes come and go
/// with drivers and kernel versions, and a missing one is a missing reading, not a fault.
pub(crate) fn read_optional(path: &Path) -> Result<Option<String>, HalError> {
    match read_trimmed(path) {
        Ok(text) => Ok(Some(text)),
        Err(HalError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Parses a value read from `path`; `expected` says what the kernel documents it to be.
pub(crate) fn parse<T: FromStr>(
    path: &Path,
    text: &str,
    expected: &'static str,
) -> Result<T, HalError> {
    text.parse().map_err(|_| HalError::Parse {
        path: path.to_path_buf(),
        expected,
        found: text.to_owned(),
    })
}

/// Reads and parses an optional numeric attribute.
pub(crate) fn read_optional_number<T: FromStr>(
    path: &Path,
    expected: &'static str,
) -> Result<Option<T>, HalError> {
    read_optional(path)?
        .map(|text| parse(path, &text, expected))
        .transpose()
}

/// The names of the entries of `dir`, sorted so that discovery is deterministic; a missing
/// directory, or a file where a directory was looked for, has no entries.
pub(crate) fn sorted_entries(dir: &Path) -> Result<Vec<String>, HalError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            return Ok(Vec::new());
        }
        Err(source) => {
            return Err(HalError::Read {
                path: dir.to_path_buf(),
                source,
            });
        }
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| HalError::Read {
            path: dir.to_path_buf(),
            source,
        })?;
        if let Some(name) = entry.file_name().to_str() {
            names.push(name.to_owned());
        }
    }
    names.sort_by_key(|name| natural_key(name));
    Ok(names)
}

/// Sort key that puts `thermal_zone2` before `thermal_zone10`.
fn natural_key(name: &str) -> (String, u64, String) {
    let digits_at = name
        .find(|c: char| c.is_ascii_digit())
        .unwrap_or(name.len());
    let (prefix, rest) = name.split_at(digits_at);
    let digits_end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    let number = rest[..digits_end].parse().unwrap_or(0);
    (prefix.to_owned(), number, rest[digits_end..].to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order_puts_zone2_before_zone10() {
        let mut names = vec!["thermal_zone10", "thermal_zone2", "cooling_device0"];
        names.sort_by_key(|name| natural_key(name));
        assert_eq!(
            names,
            ["cooling_device0", "thermal_zone2", "thermal_zone10"]
        );
    }

    #[test]
    fn trailing_nul_and_newline_are_stripped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model");
        std::fs::write(&path, b"NVIDIA Jetson AGX Orin\0").unwrap();
        assert_eq!(read_trimmed(&path).unwrap(), "NVIDIA Jetson AGX Orin");
        std::fs::write(&path, b"523\n").unwrap();
        assert_eq!(
            read_optional_number::<u32>(&path, "a number").unwrap(),
            Some(523)
        );
        assert_eq!(
            read_optional_number::<u32>(&dir.path().join("absent"), "a number").unwrap(),
            None
        );
    }
}
