//! The boot loader side of A/B updates: the entry files edgelora puts on the EFI system
//! partition, and a model of how systemd-boot (252) picks among them and counts boot attempts.
//!
//! The update code must reason about what the *firmware-side* loader will do after a reboot
//! (will the new slot be tried? will a failed slot roll back?), and tests must emulate boots on
//! a host; both use this one model so they cannot disagree. Everything here except `scan`,
//! `next_boot` and `simulate_boot_attempt` is pure.
//!
//! Convention (the image builder writes the first entry exactly like this):
//!
//! ```text
//! loader/entries/edgelora-<slot>[+LEFT[-DONE]].conf
//! edgelora/<slot>/vmlinuz
//! edgelora/<slot>/initrd.img
//! ```
//!
//! The counter suffix is systemd's automatic boot assessment: `+3` is new, each boot attempt
//! renames `+L-D` to `+(L-1)-(D+1)`, `+0-D` is bad (sorted last), no suffix is good.

use std::cmp::Ordering;
use std::fs;
use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Where systemd-boot reads Boot Loader Specification type 1 entries, relative to the ESP.
pub const ENTRIES_DIR: &str = "loader/entries";
/// Every edgelora entry carries this sort key, so they group together and sort by generation.
pub const SORT_KEY: &str = "edgelora";
/// File name prefix of edgelora entries (`edgelora-a.conf`, `edgelora-b+3.conf`).
pub const ENTRY_PREFIX: &str = "edgelora-";

/// One of the two root slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub const ALL: [Slot; 2] = [Slot::A, Slot::B];

    pub fn as_str(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }

    /// The slot an update installs into while this one runs.
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    pub fn parse(s: &str) -> Option<Slot> {
        match s {
            "a" => Some(Slot::A),
            "b" => Some(Slot::B),
            _ => None,
        }
    }
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// systemd-boot's boot counter: tries left and tries done.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Counter {
    pub left: u32,
    pub done: u32,
}

impl Counter {
    /// What systemd-boot renames the entry to when it boots it: one try used. An entry with no
    /// tries left keeps its name (it is only booted when nothing better exists).
    pub fn after_attempt(self) -> Counter {
        if self.left == 0 {
            return self;
        }
        Counter {
            left: self.left - 1,
            done: self.done.saturating_add(1),
        }
    }

    /// `+L` for a fresh counter, `+L-D` once tried, as systemd-boot writes it.
    pub fn suffix(self) -> String {
        if self.done == 0 {
            format!("+{}", self.left)
        } else {
            format!("+{}-{}", self.left, self.done)
        }
    }
}

/// An entry file name split into its id (the name without counter and `.conf`, lowercased,
/// which is what the loader sorts by) and its counter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryName {
    pub id: String,
    pub counter: Option<Counter>,
}

/// Parses a file name in `loader/entries`; `None` for files systemd-boot does not read as
/// entries (not ending in `.conf`, hidden, `auto-*`).
pub fn parse_file_name(name: &str) -> Option<EntryName> {
    if name.starts_with('.') || name.to_ascii_lowercase().starts_with("auto-") {
        return None;
    }
    let lower = name.to_ascii_lowercase();
    let stem = lower.strip_suffix(".conf")?;
    if stem.is_empty() {
        return None;
    }
    Some(match stem.rsplit_once('+') {
        Some((base, tail)) => match parse_counter(tail) {
            Some(counter) => EntryName {
                id: base.to_string(),
                counter: Some(counter),
            },
            None => EntryName {
                id: stem.to_string(),
                counter: None,
            },
        },
        None => EntryName {
            id: stem.to_string(),
            counter: None,
        },
    })
}

/// `LEFT` or `LEFT-DONE`, both decimal; anything else is not a counter (the `+` is then part
/// of the id, as in systemd-boot).
fn parse_counter(tail: &str) -> Option<Counter> {
    let (left, done) = match tail.split_once('-') {
        Some((l, d)) => (l, Some(d)),
        None => (tail, None),
    };
    let num = |s: &str| -> Option<u32> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    Some(Counter {
        left: num(left)?,
        done: match done {
            Some(d) => num(d)?,
            None => 0,
        },
    })
}

/// The file name of slot `slot`'s entry with `counter`.
pub fn entry_file_name(slot: Slot, counter: Option<Counter>) -> String {
    let suffix = counter.map(Counter::suffix).unwrap_or_default();
    format!("{ENTRY_PREFIX}{slot}{suffix}.conf")
}

/// The kernel's path relative to the ESP root (the entry names it with a leading `/`).
pub fn kernel_path(slot: Slot) -> String {
    format!("edgelora/{slot}/vmlinuz")
}

/// The initrd's path relative to the ESP root.
pub fn initrd_path(slot: Slot) -> String {
    format!("edgelora/{slot}/initrd.img")
}

/// The entry text for `slot` running image `version`; `generation` orders it against the other
/// slot's entry (higher boots first). `kernel_cmdline` (may be empty) ends the options line.
/// The image builder writes slot A's first entry with the same function.
pub fn render_entry(slot: Slot, version: &str, generation: u64, kernel_cmdline: &str) -> String {
    let c = if slot == Slot::A { 'a' } else { 'b' };
    edgelora_image::files::boot_entry(c, version, generation, kernel_cmdline)
}

/// The keys of an entry file this model (and edgelora) cares about.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EntryConf {
    pub title: Option<String>,
    pub sort_key: Option<String>,
    pub version: Option<String>,
    pub machine_id: Option<String>,
    pub linux: Option<String>,
    pub initrd: Vec<String>,
    pub options: Vec<String>,
}

/// Parses entry text as systemd-boot does: one `key value` per line, `#` comments and blank
/// lines skipped, later single-valued keys override earlier ones.
pub fn parse_entry(text: &str) -> EntryConf {
    let mut c = EntryConf::default();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = match line.split_once(char::is_whitespace) {
            Some((k, v)) => (k, v.trim().to_string()),
            None => (line, String::new()),
        };
        match key {
            "title" => c.title = Some(value),
            "sort-key" => c.sort_key = Some(value),
            "version" => c.version = Some(value),
            "machine-id" => c.machine_id = Some(value),
            "linux" => c.linux = Some(value),
            "initrd" => c.initrd.push(value),
            "options" => c.options.push(value),
            _ => {}
        }
    }
    c
}

/// The state of an entry as boot assessment sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "state")]
pub enum Assessment {
    /// No counter: marked good (or never counted).
    Good,
    /// Counter with tries left: being tried.
    Trying { left: u32, done: u32 },
    /// Counter at zero tries left: failed every try; only booted when nothing else is.
    Bad { done: u32 },
}

/// One entry file as found on the ESP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The file name in `loader/entries`.
    pub file_name: String,
    pub id: String,
    pub counter: Option<Counter>,
    pub conf: EntryConf,
    /// Whether the `linux` file exists: systemd-boot drops entries whose kernel is missing.
    pub kernel_present: bool,
}

impl Entry {
    /// Builds an entry from its file name and text; `None` if the name is not an entry name.
    pub fn from_parts(file_name: &str, text: &str, kernel_present: bool) -> Option<Entry> {
        let name = parse_file_name(file_name)?;
        Some(Entry {
            file_name: file_name.to_string(),
            id: name.id,
            counter: name.counter,
            conf: parse_entry(text),
            kernel_present,
        })
    }

    pub fn assessment(&self) -> Assessment {
        match self.counter {
            None => Assessment::Good,
            Some(Counter { left: 0, done }) => Assessment::Bad { done },
            Some(Counter { left, done }) => Assessment::Trying { left, done },
        }
    }

    pub fn is_bad(&self) -> bool {
        matches!(self.assessment(), Assessment::Bad { .. })
    }

    /// The edgelora slot this entry boots, from its id (`edgelora-a`, `edgelora-b`).
    pub fn slot(&self) -> Option<Slot> {
        Slot::parse(self.id.strip_prefix(ENTRY_PREFIX)?)
    }

    /// The `version` key as an integer: edgelora's generation number.
    pub fn generation(&self) -> Option<u64> {
        self.conf.version.as_deref()?.parse().ok()
    }

    /// The image version from a title `edgelora <version> (slot <slot>)`.
    pub fn image_version(&self) -> Option<&str> {
        let rest = self.conf.title.as_deref()?.strip_prefix("edgelora ")?;
        rest.split_whitespace().next()
    }

    /// Whether systemd-boot would list it at all: it needs a kernel that exists.
    pub fn bootable(&self) -> bool {
        self.conf.linux.is_some() && self.kernel_present
    }
}

/// Compares version-like strings the way `strverscmp` does for the strings edgelora uses:
/// digit runs numerically, everything else bytewise.
pub fn version_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let (na, ra) = split_run(a, true);
                let (nb, rb) = split_run(b, true);
                let r = numeric_cmp(na, nb);
                if r != Ordering::Equal {
                    return r;
                }
                (a, b) = (ra, rb);
            }
            (Some(_), Some(_)) => {
                let (sa, ra) = split_run(a, false);
                let (sb, rb) = split_run(b, false);
                // Compare the non-digit runs; the shorter one that is a prefix is followed by
                // a digit or the end, which both sort before any other character here.
                let n = sa.len().min(sb.len());
                let r = sa[..n].cmp(&sb[..n]);
                if r != Ordering::Equal {
                    return r;
                }
                if sa.len() != sb.len() {
                    return sa.len().cmp(&sb.len());
                }
                (a, b) = (ra, rb);
            }
        }
    }
}

/// Splits off the leading run of digits (`digits`) or non-digits.
fn split_run(s: &[u8], digits: bool) -> (&[u8], &[u8]) {
    let n = s
        .iter()
        .position(|c| c.is_ascii_digit() != digits)
        .unwrap_or(s.len());
    s.split_at(n)
}

/// Compares two digit strings as numbers of any length.
fn numeric_cmp(a: &[u8], b: &[u8]) -> Ordering {
    let strip = |s: &[u8]| -> usize { s.iter().position(|&c| c != b'0').unwrap_or(s.len()) };
    let (a, b) = (&a[strip(a)..], &b[strip(b)..]);
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

/// systemd-boot 252's `config_entry_compare`: `Less` means `a` is listed (and preferred)
/// before `b`.
pub fn compare(a: &Entry, b: &Entry) -> Ordering {
    let bad = |e: &Entry| e.counter.is_some_and(|c| c.left == 0);
    // Entries with no tries left go last.
    let r = bad(a).cmp(&bad(b));
    if r != Ordering::Equal {
        return r;
    }
    // Entries with a sort key before those without.
    let r = a.conf.sort_key.is_none().cmp(&b.conf.sort_key.is_none());
    if r != Ordering::Equal {
        return r;
    }
    if let (Some(ka), Some(kb)) = (&a.conf.sort_key, &b.conf.sort_key) {
        let r = ka
            .cmp(kb)
            .then_with(|| a.conf.machine_id.cmp(&b.conf.machine_id))
            .then_with(|| {
                let va = a.conf.version.as_deref().unwrap_or("");
                let vb = b.conf.version.as_deref().unwrap_or("");
                version_cmp(vb, va)
            });
        if r != Ordering::Equal {
            return r;
        }
    }
    let r = version_cmp(&b.id, &a.id);
    if r != Ordering::Equal {
        return r;
    }
    match (a.counter, b.counter) {
        // More tries left first, then fewer tries done.
        (Some(ca), Some(cb)) => cb.left.cmp(&ca.left).then(ca.done.cmp(&cb.done)),
        _ => Ordering::Equal,
    }
}

/// The loader's menu: bootable entries in its order.
pub fn menu(entries: &[Entry]) -> Vec<&Entry> {
    let mut m: Vec<&Entry> = entries.iter().filter(|e| e.bootable()).collect();
    m.sort_by(|a, b| compare(a, b));
    m
}

/// The entry systemd-boot boots without user input (no `default` set in loader.conf, no
/// one-shot EFI variable): the first in its order.
pub fn choose(entries: &[Entry]) -> Option<&Entry> {
    menu(entries).into_iter().next()
}

/// Every entry file in `<esp>/loader/entries` (an absent directory has none).
pub fn scan(esp: &Path) -> io::Result<Vec<Entry>> {
    let dir = esp.join(ENTRIES_DIR);
    let rd = match fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(with_path(e, &dir)),
    };
    let mut out = Vec::new();
    for de in rd {
        let de = de.map_err(|e| with_path(e, &dir))?;
        let Some(name) = de.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if parse_file_name(&name).is_none() || !de.file_type()?.is_file() {
            continue;
        }
        let path = dir.join(&name);
        let text = fs::read_to_string(&path).map_err(|e| with_path(e, &path))?;
        let conf = parse_entry(&text);
        let kernel_present = conf
            .linux
            .as_deref()
            .is_some_and(|l| esp.join(l.trim_start_matches('/')).is_file());
        out.extend(Entry::from_parts(&name, &text, kernel_present));
    }
    out.sort_by(|a, b| a.file_name.cmp(&b.file_name));
    Ok(out)
}

/// The entry the next boot picks.
pub fn next_boot(esp: &Path) -> io::Result<Option<Entry>> {
    Ok(choose(&scan(esp)?).cloned())
}

/// Does what systemd-boot does on one boot: picks an entry and, when it carries a counter with
/// tries left, renames it to count the attempt. Returns the chosen entry as it was picked.
pub fn simulate_boot_attempt(esp: &Path) -> io::Result<Option<Entry>> {
    let Some(chosen) = next_boot(esp)? else {
        return Ok(None);
    };
    if let Some(c) = chosen.counter {
        let next = c.after_attempt();
        if next != c {
            let dir = esp.join(ENTRIES_DIR);
            let new_name = format!("{}{}.conf", original_base(&chosen.file_name), next.suffix());
            fs::rename(dir.join(&chosen.file_name), dir.join(&new_name))
                .map_err(|e| with_path(e, &dir.join(&chosen.file_name)))?;
        }
    }
    Ok(Some(chosen))
}

/// The file name without counter and `.conf`, in its original case.
fn original_base(file_name: &str) -> &str {
    let stem = &file_name[..file_name.len() - ".conf".len()];
    stem.rsplit_once('+').map_or(stem, |(base, _)| base)
}

fn with_path(e: io::Error, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, generation: u64) -> Entry {
        let slot = Slot::parse(&name[9..10]).unwrap();
        Entry::from_parts(name, &render_entry(slot, "1.0.0", generation, ""), true).unwrap()
    }

    #[test]
    fn file_names_round_trip() {
        let n = parse_file_name("edgelora-b+2-1.conf").unwrap();
        assert_eq!(n.id, "edgelora-b");
        assert_eq!(n.counter, Some(Counter { left: 2, done: 1 }));
        assert_eq!(
            parse_file_name("edgelora-a+3.conf").unwrap().counter,
            Some(Counter { left: 3, done: 0 })
        );
        assert_eq!(parse_file_name("edgelora-a.conf").unwrap().counter, None);
        // Not a counter: the `+` stays in the id.
        assert_eq!(parse_file_name("x+y.conf").unwrap().id, "x+y");
        assert_eq!(parse_file_name(".edgelora-b.tmp"), None);
        assert_eq!(parse_file_name("edgelora-b.conf.tmp"), None);
        assert_eq!(
            entry_file_name(Slot::B, Some(Counter { left: 0, done: 3 })),
            "edgelora-b+0-3.conf"
        );
        assert_eq!(original_base("edgelora-b+2-1.conf"), "edgelora-b");
    }

    #[test]
    fn rendered_entry_matches_convention() {
        let text = render_entry(Slot::B, "1.2.0", 7, "console=ttyS0 rootwait");
        assert_eq!(
            text,
            "title edgelora 1.2.0 (slot b)\nsort-key edgelora\nversion 7\n\
             linux /edgelora/b/vmlinuz\ninitrd /edgelora/b/initrd.img\n\
             options root=PARTLABEL=edgelora-root-b edgelora.slot=b edgelora.version=1.2.0 \
             console=ttyS0 rootwait\n"
        );
        let e = Entry::from_parts("edgelora-b+3.conf", &text, true).unwrap();
        assert_eq!(e.slot(), Some(Slot::B));
        assert_eq!(e.generation(), Some(7));
        assert_eq!(e.image_version(), Some("1.2.0"));
    }

    #[test]
    fn newer_generation_first_bad_last() {
        let a = entry("edgelora-a.conf", 9);
        let b = entry("edgelora-b+3.conf", 10);
        assert_eq!(choose(&[a.clone(), b.clone()]).unwrap().id, "edgelora-b");
        let bad = entry("edgelora-b+0-3.conf", 10);
        assert_eq!(choose(&[a.clone(), bad.clone()]).unwrap().id, "edgelora-a");
        // A bad entry still boots when it is the only one.
        assert_eq!(choose(std::slice::from_ref(&bad)).unwrap().id, "edgelora-b");
        // Numeric, not lexicographic: generation 10 beats 9.
        assert_eq!(version_cmp("10", "9"), Ordering::Greater);
        assert_eq!(version_cmp("edgelora-b", "edgelora-a"), Ordering::Greater);
    }

    #[test]
    fn missing_kernel_is_not_bootable() {
        let mut b = entry("edgelora-b.conf", 2);
        b.kernel_present = false;
        let a = entry("edgelora-a.conf", 1);
        assert_eq!(choose(&[a, b]).unwrap().id, "edgelora-a");
    }

    #[test]
    fn counter_steps() {
        let c = Counter { left: 3, done: 0 };
        let c = c.after_attempt();
        assert_eq!(c.suffix(), "+2-1");
        let c = c.after_attempt().after_attempt();
        assert_eq!(c.suffix(), "+0-3");
        assert_eq!(c.after_attempt(), c);
    }
}
