//! Printing results for people (plain text) and for scripts (`--json`).

use quiver_core::Value;
use quiver_store::value_to_json;
use serde::Serialize;

/// Prints `value` as JSON (one line).
pub fn json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}

/// Prints rows as an aligned text table.
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(headers.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

/// A SQL value for a text table.
pub fn cell(v: &Value) -> String {
    match v {
        Value::Null => "NULL".into(),
        Value::Text(t) => t.clone(),
        Value::Blob(b) => format!("<{} bytes>", b.len()),
        other => value_to_json(other).to_string(),
    }
}

/// An error under `--json`: one JSON object on standard error, with the
/// message and the exit code (1 for a failed command, 2 for bad usage).
pub fn json_error(message: &str, code: u8) {
    eprintln!(
        "{}",
        serde_json::json!({"error": message.trim_end(), "exit_code": code})
    );
}

/// Progress of a long command on standard error: a bar with rate and time
/// left for a person at a terminal; a plain line every few seconds when
/// standard error is a file or a pipe; nothing under `--json`.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    plain: Option<std::cell::Cell<std::time::Instant>>,
    started: std::time::Instant,
    what: &'static str,
}

impl Progress {
    /// Progress over `total` bytes of input.
    pub fn bytes(total: u64, what: &'static str, json: bool) -> Progress {
        use std::io::IsTerminal;
        let terminal = std::io::stderr().is_terminal();
        let bar = (terminal && !json).then(|| {
            let b = indicatif::ProgressBar::new(total);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {bytes}/{total_bytes} {bytes_per_sec}, {eta} left  {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b
        });
        let now = std::time::Instant::now();
        Progress {
            bar,
            plain: (!terminal && !json).then(|| std::cell::Cell::new(now)),
            started: now,
            what,
        }
    }

    /// `pos` bytes done, `count` items of kind `unit` so far.
    pub fn at(&self, pos: u64, count: usize, unit: &str) {
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = format!("{:.0} {unit}/s", count as f64 / secs);
        if let Some(b) = &self.bar {
            b.set_position(pos);
            b.set_message(format!("{count} {unit}, {rate}"));
        }
        if let Some(last) = &self.plain {
            if last.get().elapsed() >= std::time::Duration::from_secs(5) {
                last.set(std::time::Instant::now());
                eprintln!("{}: {count} {unit} in {secs:.0} s ({rate})", self.what);
            }
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
