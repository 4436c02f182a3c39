//! A QEMU virtual machine booting an appliance disk image: UEFI firmware (OVMF), the image as a
//! virtio disk, update bundles as extra read-only virtio disks (found on the box as
//! /dev/disk/by-id/virtio-<serial>), user networking forwarding a loopback port to the daemon,
//! and the serial console on a Unix socket, driven like a terminal.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// OVMF's code and variable-store templates (Debian package `ovmf`).
pub fn ovmf() -> Option<(PathBuf, PathBuf)> {
    let code = PathBuf::from("/usr/share/OVMF/OVMF_CODE_4M.fd");
    let vars = PathBuf::from("/usr/share/OVMF/OVMF_VARS_4M.fd");
    (code.is_file() && vars.is_file()).then_some((code, vars))
}

/// What a VM test needs on this machine, or why it cannot run.
pub fn prerequisites() -> Result<(), String> {
    if ovmf().is_none() {
        return Err("OVMF firmware missing (apt-get install ovmf)".into());
    }
    for (prog, pkg) in [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("debootstrap", "debootstrap"),
        ("mke2fs", "e2fsprogs"),
        ("mkfs.vfat", "dosfstools"),
        ("mcopy", "mtools"),
        ("sfdisk", "fdisk"),
        ("depmod", "kmod"),
    ] {
        if edgelora_image::tools::find(prog).is_err() {
            return Err(format!("{prog} missing (apt-get install {pkg})"));
        }
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        return Err("building an image needs root (debootstrap, file ownership)".into());
    }
    Ok(())
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

pub struct VmConfig {
    pub disk: PathBuf,
    /// (serial, file): extra read-only disks.
    pub drives: Vec<(String, PathBuf)>,
    pub http_port: u16,
    pub mem_mib: u32,
}

pub struct Vm {
    child: Child,
    serial: UnixStream,
    log: PathBuf,
    pub started: Instant,
    pub http_port: u16,
    /// Console output not yet consumed by `shell`.
    pending: String,
}

impl Vm {
    /// Boots the disk; `dir` holds the firmware variables, the console socket and its log.
    pub fn start(cfg: &VmConfig, dir: &Path) -> Vm {
        let (code, vars_template) = ovmf().expect("OVMF present");
        let vars = dir.join("OVMF_VARS.fd");
        if !vars.exists() {
            std::fs::copy(vars_template, &vars).expect("copying OVMF vars");
        }
        let sock = dir.join("console.sock");
        let log = dir.join("console.log");
        let _ = std::fs::remove_file(&sock);
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-machine", "q35", "-cpu", "max", "-smp", "2", "-m"])
            .arg(cfg.mem_mib.to_string())
            .args(["-display", "none", "-monitor", "none", "-nodefaults"])
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,readonly=on,file={}",
                code.display()
            ))
            .arg("-drive")
            .arg(format!("if=pflash,format=raw,file={}", vars.display()))
            .arg("-drive")
            .arg(format!(
                "file={},format=raw,if=none,id=disk,cache=unsafe",
                cfg.disk.display()
            ))
            // The firmware tries this disk first, not the bundle disks.
            .args(["-device", "virtio-blk-pci,drive=disk,bootindex=0"])
            .args(["-netdev"])
            .arg(format!(
                "user,id=n0,hostfwd=tcp:127.0.0.1:{}-:8080",
                cfg.http_port
            ))
            .args(["-device", "virtio-net-pci,netdev=n0", "-chardev"])
            .arg(format!(
                "socket,id=s0,path={},server=on,wait=off,logfile={},logappend=on",
                sock.display(),
                log.display()
            ))
            .args(["-serial", "chardev:s0"]);
        for (i, (serial, file)) in cfg.drives.iter().enumerate() {
            cmd.arg("-drive")
                .arg(format!(
                    "file={},if=none,id=x{i},format=raw,readonly=on",
                    file.display()
                ))
                .arg("-device")
                .arg(format!("virtio-blk-pci,drive=x{i},serial={serial}"));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting qemu-system-x86_64");
        let started = Instant::now();
        let serial = loop {
            match UnixStream::connect(&sock) {
                Ok(s) => break s,
                Err(_) if started.elapsed() < Duration::from_secs(30) => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(e) => panic!("connecting to the console {}: {e}", sock.display()),
            }
        };
        serial
            .set_read_timeout(Some(Duration::from_millis(500)))
            .expect("timeout");
        Vm {
            child,
            serial,
            log,
            started,
            http_port: cfg.http_port,
            pending: String::new(),
        }
    }

    /// GET `path` on the forwarded port; `None` while nothing answers.
    pub fn http_status(&self, path: &str) -> Option<u16> {
        let mut s = TcpStream::connect(("127.0.0.1", self.http_port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: box\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut head = [0u8; 64];
        let n = s.read(&mut head).ok()?;
        let text = std::str::from_utf8(&head[..n]).ok()?;
        text.split_whitespace().nth(1)?.parse().ok()
    }

    /// Waits until `path` answers 200; returns the time since the VM started.
    pub fn wait_http_ok(&mut self, path: &str, timeout: Duration) -> Duration {
        let until = Instant::now() + timeout;
        loop {
            if self.http_status(path) == Some(200) {
                return self.started.elapsed();
            }
            self.assert_running();
            assert!(
                Instant::now() < until,
                "{path} did not answer 200 within {timeout:?}; console tail:\n{}",
                self.console_tail(4000)
            );
            self.drain();
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Reads what the console has printed so far into `pending`. Call it while waiting on
    /// anything else: an unread console stalls the guest.
    pub fn drain(&mut self) {
        let mut buf = [0u8; 65536];
        loop {
            match self.serial.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => self.pending.push_str(&String::from_utf8_lossy(&buf[..n])),
                Err(_) => break,
            }
        }
        // Keep the tail only: a boot prints a lot.
        if self.pending.len() > 1 << 20 {
            let cut = self.pending.len() - (1 << 19);
            let cut = (cut..self.pending.len())
                .find(|&i| self.pending.is_char_boundary(i))
                .unwrap_or(0);
            self.pending.drain(..cut);
        }
    }

    /// Runs a shell command on the console (root, debug console) and returns (exit code, the
    /// output printed after the command line).
    pub fn shell(&mut self, cmd: &str, timeout: Duration) -> (i32, String) {
        self.drain();
        self.pending.clear();
        let nonce = format!(
            "{:x}",
            Instant::now().duration_since(self.started).as_nanos()
        );
        // The marker is printed by `echo` with the code substituted; the echoed command line
        // has `$?` literally, so it cannot match the pattern below.
        let line = format!("{cmd}; echo \"@@rc-{nonce}=$?@@\"\n");
        self.serial
            .write_all(line.as_bytes())
            .expect("console write");
        let until = Instant::now() + timeout;
        let pat = format!("@@rc-{nonce}=");
        loop {
            self.drain();
            if let Some((i, code)) = find_marker(&self.pending, &pat) {
                let out = self.pending[..i].to_string();
                let out = match out.find('\n') {
                    Some(nl) => out[nl + 1..].to_string(),
                    None => out,
                };
                self.pending.clear();
                return (code, strip_ansi(&out).replace('\r', ""));
            }
            self.assert_running();
            assert!(
                Instant::now() < until,
                "`{cmd}` did not finish within {timeout:?}; console:\n{}",
                self.console_tail(4000)
            );
        }
    }

    /// Waits for the console's root shell (autologin) to answer.
    pub fn wait_shell(&mut self, timeout: Duration) {
        let until = Instant::now() + timeout;
        loop {
            self.drain();
            self.serial.write_all(b"\necho @@up-$((40+2))@@\n").ok();
            std::thread::sleep(Duration::from_secs(2));
            self.drain();
            if self.pending.contains("@@up-42@@") {
                self.pending.clear();
                return;
            }
            self.assert_running();
            assert!(
                Instant::now() < until,
                "no shell on the console within {timeout:?}:\n{}",
                self.console_tail(4000)
            );
        }
    }

    /// Waits until the console prints `needle` (reading it as it comes: an unread console
    /// stalls the guest).
    pub fn wait_for_console(&mut self, needle: &str, timeout: Duration) {
        let until = Instant::now() + timeout;
        loop {
            self.drain();
            if self.pending.contains(needle) {
                self.pending.clear();
                return;
            }
            self.assert_running();
            assert!(
                Instant::now() < until,
                "{needle:?} not on the console within {timeout:?}:\n{}",
                self.console_tail(4000)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Sends a command without waiting for it (e.g. `reboot`).
    pub fn send(&mut self, cmd: &str) {
        self.serial
            .write_all(format!("{cmd}\n").as_bytes())
            .expect("console write");
    }

    fn assert_running(&mut self) {
        if let Ok(Some(st)) = self.child.try_wait() {
            panic!(
                "qemu exited ({st}); console tail:\n{}",
                self.console_tail(4000)
            );
        }
    }

    /// The last `n` bytes of everything the console printed (its log file).
    pub fn console_tail(&self, n: usize) -> String {
        let text = std::fs::read(&self.log).unwrap_or_default();
        let start = text.len().saturating_sub(n);
        String::from_utf8_lossy(&text[start..]).into_owned()
    }

    /// Pulls the plug: SIGKILL to qemu, no shutdown.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Removes terminal control sequences (ESC [ ... final byte) the shell prints around lines.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for d in chars.by_ref() {
                    if ('@'..='~').contains(&d) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// The first `<pat><digits>@@` in `text`: (its offset, the number). The echoed command line
/// has `<pat>$?@@` there, which does not match.
fn find_marker(text: &str, pat: &str) -> Option<(usize, i32)> {
    text.match_indices(pat).find_map(|(i, _)| {
        let rest = &text[i + pat.len()..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let code = digits.parse().ok()?;
        rest[digits.len()..].starts_with("@@").then_some((i, code))
    })
}
