//! The host tools the builder drives (debootstrap, mke2fs, mkfs.vfat, mtools, sfdisk, tar), run
//! with clear errors that name the tool, its Debian package and what it printed.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

/// (program, Debian package that provides it).
pub const TOOLS: &[(&str, &str)] = &[
    ("debootstrap", "debootstrap"),
    ("mke2fs", "e2fsprogs"),
    ("mkfs.vfat", "dosfstools"),
    ("mcopy", "mtools"),
    ("mmd", "mtools"),
    ("sfdisk", "fdisk"),
    ("tar", "tar"),
    ("depmod", "kmod"),
];

/// Finds `prog` on $PATH or in the sbin directories (root's tools live there and a non-login
/// shell may not have them on $PATH).
pub fn find(prog: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain(
        ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
            .iter()
            .map(PathBuf::from),
    );
    for d in dirs {
        let p = d.join(prog);
        if p.is_file() {
            return Ok(p);
        }
    }
    let pkg = TOOLS
        .iter()
        .find(|(p, _)| *p == prog)
        .map(|(_, k)| *k)
        .unwrap_or(prog);
    bail!("`{prog}` not found: install it (Debian: apt-get install {pkg})")
}

/// Runs a command to completion; on failure the error names the command and carries its
/// output's tail.
pub fn run(prog: &str, args: &[&std::ffi::OsStr]) -> Result<()> {
    let exe = find(prog)?;
    let out = Command::new(&exe)
        .args(args)
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .with_context(|| format!("running {}", exe.display()))?;
    if !out.status.success() {
        let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stdout));
        bail!(
            "{prog} {} failed ({}):\n{}",
            display_args(args),
            out.status,
            tail(&text, 2000)
        );
    }
    Ok(())
}

/// Runs a long command and shows its progress: every line it prints that `show` selects is
/// echoed with the elapsed time, so a minute-long debootstrap is not silent.
pub fn run_with_progress(
    prog: &str,
    args: &[&std::ffi::OsStr],
    step: &str,
    show: &dyn Fn(&str) -> bool,
) -> Result<()> {
    let exe = find(prog)?;
    let start = Instant::now();
    let mut child = Command::new(&exe)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", exe.display()))?;
    let stderr = child.stderr.take().expect("piped");
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            s.push_str(&line);
            s.push('\n');
        }
        s
    });
    let mut seen = String::new();
    for line in BufReader::new(child.stdout.take().expect("piped"))
        .lines()
        .map_while(Result::ok)
    {
        if show(&line) {
            eprintln!("  [{step} {:>4.0}s] {line}", start.elapsed().as_secs_f64());
        }
        seen.push_str(&line);
        seen.push('\n');
    }
    let status = child.wait()?;
    let err = err_thread.join().unwrap_or_default();
    if !status.success() {
        seen.push_str(&err);
        bail!(
            "{prog} {} failed ({status}):\n{}",
            display_args(args),
            tail(&seen, 3000)
        );
    }
    Ok(())
}

fn display_args(args: &[&std::ffi::OsStr]) -> String {
    args.iter()
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

fn tail(s: &str, n: usize) -> &str {
    let start = s.len().saturating_sub(n);
    let mut i = start;
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

/// `path` as an argument.
pub fn os(p: &Path) -> &std::ffi::OsStr {
    p.as_os_str()
}

/// Shorthand for string arguments.
pub fn s(v: &str) -> &std::ffi::OsStr {
    std::ffi::OsStr::new(v)
}
