//! Results: one line per figure, beside the yardstick it is judged against (measured in the same
//! run), as a human table or as one JSON object per line.

use serde_json::{Value, json};

/// One figure.
#[derive(Clone, Debug)]
pub struct Row {
    pub bench: &'static str,
    pub metric: String,
    pub value: f64,
    pub unit: &'static str,
    /// What the figure is compared with, e.g. "bandwidth bound" or "llama.cpp".
    pub yardstick: Option<String>,
    pub yardstick_value: Option<f64>,
    pub ratio: Option<f64>,
    /// A free-form note (configuration, caveat) shown after the row.
    pub note: Option<String>,
}

impl Row {
    pub fn new(
        bench: &'static str,
        metric: impl Into<String>,
        value: f64,
        unit: &'static str,
    ) -> Self {
        Self {
            bench,
            metric: metric.into(),
            value,
            unit,
            yardstick: None,
            yardstick_value: None,
            ratio: None,
            note: None,
        }
    }

    /// Compares with `yardstick` (same unit): ratio = value / yardstick.
    pub fn vs(mut self, yardstick: impl Into<String>, yardstick_value: f64) -> Self {
        self.yardstick = Some(yardstick.into());
        self.yardstick_value = Some(yardstick_value);
        self.ratio = (yardstick_value > 0.0).then(|| self.value / yardstick_value);
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.note = Some(note.into());
        self
    }
}

/// The context every row of a run shares.
#[derive(Clone, Debug, Default)]
pub struct Context {
    pub threads: usize,
    pub batch: Option<usize>,
    pub model: Option<String>,
}

/// Collects rows and prints them at the end.
pub struct Report {
    pub json: bool,
    pub ctx: Context,
    rows: Vec<Row>,
    cpu: String,
    date: String,
}

impl Report {
    pub fn new(json: bool, ctx: Context) -> Self {
        Self {
            json,
            ctx,
            rows: Vec::new(),
            cpu: cpu_name(),
            date: utc_now(),
        }
    }

    pub fn push(&mut self, row: Row) {
        self.rows.push(row);
    }

    fn to_json(&self, r: &Row) -> Value {
        json!({
            "bench": r.bench,
            "metric": r.metric,
            "value": r.value,
            "unit": r.unit,
            "yardstick": r.yardstick,
            "yardstick_value": r.yardstick_value,
            "ratio": r.ratio,
            "threads": self.ctx.threads,
            "batch": self.ctx.batch,
            "model": self.ctx.model,
            "cpu": self.cpu,
            "date": self.date,
            "note": r.note,
        })
    }

    /// Prints every row: JSON lines, or a table with a header naming the machine and the run.
    pub fn print(&self) {
        if self.json {
            for r in &self.rows {
                println!("{}", self.to_json(r));
            }
            return;
        }
        let mut head = format!("cpu: {} | threads: {}", self.cpu, self.ctx.threads);
        if let Some(b) = self.ctx.batch {
            head += &format!(" | batch: {b}");
        }
        if let Some(m) = &self.ctx.model {
            head += &format!(" | model: {m}");
        }
        head += &format!(" | {}", self.date);
        println!("{head}");
        let cells: Vec<[String; 6]> = self
            .rows
            .iter()
            .map(|r| {
                [
                    r.bench.to_string(),
                    r.metric.clone(),
                    format!("{} {}", fmt_num(r.value), r.unit),
                    r.yardstick.clone().unwrap_or_default(),
                    r.yardstick_value
                        .map(|v| format!("{} {}", fmt_num(v), r.unit))
                        .unwrap_or_default(),
                    r.ratio.map(|x| format!("{x:.3}")).unwrap_or_default(),
                ]
            })
            .collect();
        let titles = [
            "bench",
            "metric",
            "value",
            "yardstick",
            "yardstick value",
            "ratio",
        ];
        let mut width = titles.map(str::len);
        for c in &cells {
            for (w, s) in width.iter_mut().zip(c) {
                *w = (*w).max(s.chars().count());
            }
        }
        let line = |c: &[String]| {
            let mut s = String::new();
            for (i, (cell, w)) in c.iter().zip(width).enumerate() {
                // Numbers right-aligned, words left-aligned.
                if i == 2 || i == 4 || i == 5 {
                    s += &format!("{cell:>w$}  ");
                } else {
                    s += &format!("{cell:<w$}  ");
                }
            }
            s.trim_end().to_string()
        };
        println!("{}", line(&titles.map(String::from)));
        println!("{}", line(&width.map(|w| "-".repeat(w))));
        for (c, r) in cells.iter().zip(&self.rows) {
            println!("{}", line(c));
            if let Some(n) = &r.note {
                println!("    {n}");
            }
        }
    }
}

/// Three significant figures or so, without exponent for everyday magnitudes.
pub fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 || a == 0.0 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 10.0 {
        format!("{v:.2}")
    } else if a >= 0.01 {
        format!("{v:.3}")
    } else {
        format!("{v:.3e}")
    }
}

/// The CPU's model name from /proc/cpuinfo (or the architecture where there is none).
pub fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name") || l.starts_with("Model"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (y, m, d, hh, mm, ss) = edgelora_daemon::cli::utc_fields(secs);
    format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_is_value_over_yardstick() {
        let r = Row::new("decode", "tokens/s", 50.0, "tok/s").vs("bound", 100.0);
        assert_eq!(r.ratio, Some(0.5));
    }

    #[test]
    fn date_has_iso_shape() {
        let d = utc_now();
        assert_eq!(d.len(), 20);
        assert!(d.starts_with("20") && d.ends_with('Z'));
    }
}
