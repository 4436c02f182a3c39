//! `--arch aarch64` without `--daemon`: cross-compile edgelorad for Jetson from the edgelora
//! workspace (the one this binary was built from, or `--source DIR`) with the aarch64 Rust
//! target and Debian's cross linker, showing cargo's progress, and use the result.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

pub const TARGET: &str = "aarch64-unknown-linux-gnu";
/// Cargo's per-target linker variable; it overrides `.cargo/config.toml`.
pub const LINKER_ENV: &str = "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER";
/// Debian's `gcc-aarch64-linux-gnu`.
pub const DEFAULT_LINKER: &str = "aarch64-linux-gnu-gcc";

/// The workspace this binary was built from, if it is still where it was.
pub fn default_source() -> Option<PathBuf> {
    let ws = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?;
    is_workspace(ws).then(|| ws.to_path_buf())
}

fn is_workspace(dir: &Path) -> bool {
    dir.join("Cargo.toml").is_file() && dir.join("daemon/Cargo.toml").is_file()
}

/// The linker cargo will use for the target, and whether it must be passed in the environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Linker {
    pub program: String,
    /// Where it came from: the environment, the workspace's `.cargo/config.toml`, or the default.
    pub from: &'static str,
    /// Neither the environment nor the workspace config names one: set `LINKER_ENV`.
    pub set_env: bool,
}

/// The linker as cargo resolves it: `$CARGO_TARGET_..._LINKER`, else the workspace's
/// `.cargo/config.toml` (`[target.aarch64-unknown-linux-gnu] linker`), else the default.
pub fn linker(source: &Path) -> Result<Linker> {
    if let Some(v) = std::env::var_os(LINKER_ENV).filter(|v| !v.is_empty()) {
        return Ok(Linker {
            program: v.to_string_lossy().into_owned(),
            from: "the environment",
            set_env: false,
        });
    }
    for name in [".cargo/config.toml", ".cargo/config"] {
        let p = source.join(name);
        let Ok(text) = std::fs::read_to_string(&p) else {
            continue;
        };
        let t: toml::Table =
            toml::from_str(&text).with_context(|| format!("{}: not valid TOML", p.display()))?;
        let configured = t
            .get("target")
            .and_then(|v| v.get(TARGET))
            .and_then(|v| v.get("linker"))
            .and_then(|v| v.as_str());
        if let Some(l) = configured {
            return Ok(Linker {
                program: l.to_string(),
                from: "the workspace's .cargo/config.toml",
                set_env: false,
            });
        }
    }
    Ok(Linker {
        program: DEFAULT_LINKER.to_string(),
        from: "the default",
        set_env: true,
    })
}

fn on_path(prog: &str) -> bool {
    if prog.contains('/') {
        return Path::new(prog).is_file();
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|d| d.join(prog).is_file())
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// Everything the cross-compile needs, checked in a second: the workspace, cargo, the Rust
/// target's standard library, the linker. The error names what is missing and how to get it.
pub fn check(source: &Path) -> Result<Linker> {
    if !is_workspace(source) {
        bail!(
            "{}: not the edgelora workspace (no Cargo.toml and daemon/); pass --source DIR, or \
             --daemon PATH with an edgelorad built for aarch64",
            source.display()
        );
    }
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .current_dir(source)
        .output()
        .with_context(|| format!("running `{rustc} --print sysroot`: is Rust installed?"))?;
    if !out.status.success() {
        bail!(
            "`{rustc} --print sysroot` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let std_dir = sysroot.join("lib/rustlib").join(TARGET).join("lib");
    if !std_dir.is_dir() {
        bail!(
            "the Rust target {TARGET} is not installed ({} is missing): rustup target add {TARGET}",
            std_dir.display()
        );
    }
    let l = linker(source)?;
    if !on_path(&l.program) {
        bail!(
            "the linker for {TARGET}, `{}` (from {}), is not installed: apt-get install \
             gcc-aarch64-linux-gnu",
            l.program,
            l.from
        );
    }
    let c = cargo();
    if !Command::new(&c)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        bail!("`{c}` does not run: install Rust (rustup) to cross-compile edgelorad");
    }
    Ok(l)
}

/// `cargo build --release --locked --target aarch64-unknown-linux-gnu -p edgelora-daemon
/// --bin edgelorad` in `source`, cargo's progress echoed with the elapsed time; returns the
/// binary cargo reports.
pub fn build_daemon(source: &Path) -> Result<PathBuf> {
    let linker = check(source)?;
    let args = [
        "build",
        "--release",
        "--locked",
        "--target",
        TARGET,
        "-p",
        "edgelora-daemon",
        "--bin",
        "edgelorad",
        "--message-format=json-render-diagnostics",
    ];
    eprintln!(
        "edgelora-image: cross-compiling edgelorad for {TARGET} in {} (linker {}, from {}); \
         several minutes the first time",
        source.display(),
        linker.program,
        linker.from
    );
    let mut cmd = Command::new(cargo());
    cmd.current_dir(source)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if linker.set_env {
        cmd.env(LINKER_ENV, &linker.program);
    }
    let start = Instant::now();
    let mut child = cmd.spawn().context("running cargo")?;
    let stderr = child.stderr.take().expect("piped");
    let err_thread = std::thread::spawn(move || {
        let mut seen = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let t = line.trim_start();
            if t.starts_with("Compiling")
                || t.starts_with("Finished")
                || t.starts_with("error")
                || t.starts_with("Blocking")
            {
                eprintln!(
                    "  [cross-compile {:>4.0}s] {t}",
                    start.elapsed().as_secs_f64()
                );
            }
            seen.push_str(&line);
            seen.push('\n');
        }
        seen
    });
    let mut exe = None;
    for line in BufReader::new(child.stdout.take().expect("piped"))
        .lines()
        .map_while(Result::ok)
    {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if v["reason"] == "compiler-artifact"
            && v["target"]["name"] == "edgelorad"
            && let Some(p) = v["executable"].as_str()
        {
            exe = Some(PathBuf::from(p));
        }
    }
    let status = child.wait()?;
    let log = err_thread.join().unwrap_or_default();
    if !status.success() {
        let start = log.len().saturating_sub(3000);
        let start = (start..log.len())
            .find(|&i| log.is_char_boundary(i))
            .unwrap_or(log.len());
        bail!(
            "cross-compiling edgelorad failed ({status}): cargo {}\n{}",
            args.join(" "),
            &log[start..]
        );
    }
    let exe = exe.context("cargo built edgelorad but did not say where")?;
    eprintln!(
        "edgelora-image: edgelorad for {TARGET}: {} ({:.0} s)",
        exe.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(exe)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_linker_comes_from_the_workspace_config_or_the_default() {
        if std::env::var_os(LINKER_ENV).is_some() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(linker(dir.path()).unwrap().program, DEFAULT_LINKER);
        assert!(linker(dir.path()).unwrap().set_env);
        std::fs::create_dir_all(dir.path().join(".cargo")).unwrap();
        std::fs::write(
            dir.path().join(".cargo/config.toml"),
            format!("[target.{TARGET}]\nlinker = \"my-gcc\"\n"),
        )
        .unwrap();
        let l = linker(dir.path()).unwrap();
        assert_eq!((l.program.as_str(), l.set_env), ("my-gcc", false));
        // Not the workspace: a clear refusal before anything runs.
        let e = check(dir.path()).unwrap_err().to_string();
        assert!(e.contains("not the edgelora workspace"), "{e}");
    }
}
