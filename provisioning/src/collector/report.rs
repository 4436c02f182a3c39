//! Choosing the collector's store, and printing its totals (`edgelora-fleet report`).

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};

use super::postgres::PgStore;
use super::sqlite::SqliteStore;
use super::store::{Report, Store, Totals};

/// The SQLite file the collector uses when no database is named.
pub const DEFAULT_DB_FILE: &str = "collector.db";

/// The store `db` names: `None` is the SQLite file `<fleet_dir>/collector.db`; a
/// `postgres://` (or `postgresql://`) URL is a PostgreSQL database shared by collectors.
pub fn open_store(fleet_dir: &Path, db: Option<&str>) -> anyhow::Result<Arc<dyn Store>> {
    match db {
        None => {
            let path = fleet_dir.join(DEFAULT_DB_FILE);
            Ok(Arc::new(SqliteStore::open(&path)?))
        }
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            let store = PgStore::connect(url).context(
                "opening the collector's PostgreSQL database (is the server running, and does \
                 the URL name an existing database and user?)",
            )?;
            Ok(Arc::new(store))
        }
        Some(other) => bail!(
            "unsupported collector database {other:?}: give a postgres://user@host:port/db URL, \
             or leave it out to use the SQLite file {}",
            fleet_dir.join(DEFAULT_DB_FILE).display()
        ),
    }
}

/// The report as plain-text tables: per contributor and kind, per device, per kind.
pub fn render_table(report: &Report) -> String {
    let mut out = String::new();
    let totals = |t: &Totals| {
        vec![
            t.requests.to_string(),
            t.prompt_tokens.to_string(),
            t.completion_tokens.to_string(),
        ]
    };
    section(
        &mut out,
        "Contributors",
        &[
            "contributor",
            "kind",
            "requests",
            "prompt tokens",
            "completion tokens",
        ],
        report
            .contributors
            .iter()
            .map(|r| {
                [
                    vec![r.contributor.clone(), r.kind.clone()],
                    totals(&r.totals),
                ]
                .concat()
            })
            .collect(),
    );
    section(
        &mut out,
        "Devices",
        &[
            "device",
            "events",
            "next seq",
            "epoch",
            "lost",
            "prompt tokens",
            "completion tokens",
            "suspect",
        ],
        report
            .devices
            .iter()
            .map(|d| {
                vec![
                    d.device.clone(),
                    d.events.to_string(),
                    d.next_seq.to_string(),
                    d.epoch.to_string(),
                    d.lost.to_string(),
                    d.prompt_tokens.to_string(),
                    d.completion_tokens.to_string(),
                    match &d.suspect {
                        Some(reason) => format!("SUSPECT: {reason}"),
                        None => "-".to_string(),
                    },
                ]
            })
            .collect(),
    );
    section(
        &mut out,
        "Kinds",
        &["kind", "requests", "prompt tokens", "completion tokens"],
        report
            .kinds
            .iter()
            .map(|k| [vec![k.kind.clone()], totals(&k.totals)].concat())
            .collect(),
    );
    out
}

/// The report as one JSON object: `{"contributors": [...], "devices": [...], "kinds": [...]}`.
pub fn render_json(report: &Report) -> String {
    // Strings, integers and options only: serialising cannot fail.
    serde_json::to_string_pretty(report).expect("a Report always serialises to JSON")
}

/// Appends one titled table; numeric columns are right-aligned, the last column is not padded.
fn section(out: &mut String, title: &str, header: &[&str], rows: Vec<Vec<String>>) {
    if !out.is_empty() {
        out.push('\n');
    }
    let _ = writeln!(out, "{title}");
    if rows.is_empty() {
        let _ = writeln!(out, "  (none)");
        return;
    }
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let numeric: Vec<bool> = (0..header.len())
        .map(|i| rows.iter().all(|r| r[i].parse::<u64>().is_ok()))
        .collect();
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = String::from(" ");
        for (i, cell) in row.iter().enumerate() {
            let pad = widths[i] - cell.chars().count();
            line.push(' ');
            if numeric[i] {
                line.extend(std::iter::repeat_n(' ', pad));
                line.push_str(cell);
            } else {
                line.push_str(cell);
                if i + 1 < row.len() {
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            line.push(' ');
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
}
