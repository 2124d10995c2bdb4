//! How commands talk to people and scripts: JSON or tables, colour, quiet and
//! verbose, warnings on stderr, and the exit status.

use std::io::{IsTerminal, Write};

/// When to use colour.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ColorChoice {
    /// When standard output is a terminal and `NO_COLOR` is not set.
    #[default]
    Auto,
    /// Always.
    Always,
    /// Never.
    Never,
}

/// What a command reports back to `main`, which turns it into the exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Exit 0.
    Success,
    /// Exit 1: the command ran and found a problem it has already reported.
    Failure,
}

/// The output settings every command gets.
#[derive(Clone, Debug)]
pub struct Ui {
    /// Machine output.
    pub json: bool,
    /// Colour on standard output and standard error.
    pub color: bool,
    /// Only errors on standard error.
    pub quiet: bool,
    /// Extra detail on standard error (0, 1, 2 …).
    pub verbose: u8,
    /// Standard error is a terminal (progress bars go there).
    pub stderr_tty: bool,
    /// A log subscriber is installed ([`Ui::install_logs`]).
    pub logs: bool,
    /// Messages are log lines of this replica (see [`Ui::for_node`]).
    pub node: Option<u32>,
}

impl Ui {
    /// Settings from the global flags.
    pub fn new(json: bool, color: ColorChoice, quiet: bool, verbose: u8) -> Ui {
        let color = match color {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => {
                std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
            }
        };
        Ui {
            json,
            color,
            quiet,
            verbose,
            stderr_tty: std::io::stderr().is_terminal(),
            logs: false,
            node: None,
        }
    }

    /// Makes messages structured log lines (tracing): a timestamp, the
    /// level and, from [`Ui::for_node`] on, the replica's id on every line;
    /// JSON lines with `json`. Levels: `-q` errors only, then info, `-v`
    /// debug, `-vv` trace. For long-running commands (`replicate`,
    /// `tap-attach`) whose output is a log.
    pub fn install_logs(&mut self, json: bool) {
        use tracing::Level;
        let level = match (self.quiet, self.verbose) {
            (true, _) => Level::ERROR,
            (false, 0) => Level::INFO,
            (false, 1) => Level::DEBUG,
            _ => Level::TRACE,
        };
        let ansi = self.stderr_tty && std::env::var_os("NO_COLOR").is_none();
        let b = tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_max_level(level)
            .with_target(false)
            .with_ansi(ansi);
        let installed = if json {
            b.json()
                .with_current_span(true)
                .with_span_list(false)
                .try_init()
                .is_ok()
        } else {
            b.try_init().is_ok()
        };
        self.logs = installed;
    }

    /// The same settings, for replica `id`: once logs are installed, every
    /// message is a log line that names it (`node{id=2}`).
    pub fn for_node(&self, id: u32) -> Ui {
        Ui {
            node: self.logs.then_some(id),
            ..self.clone()
        }
    }

    /// Plain settings for tests and library callers.
    pub fn plain() -> Ui {
        Ui {
            json: false,
            color: false,
            quiet: false,
            verbose: 0,
            stderr_tty: false,
            logs: false,
            node: None,
        }
    }

    fn paint(&self, code: &str, s: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    }

    /// A warning on standard error (hidden by `-q`).
    pub fn warn(&self, msg: &str) {
        if let Some(id) = self.node {
            let _s = tracing::error_span!("node", id).entered();
            tracing::warn!("{msg}");
            return;
        }
        if !self.quiet {
            eprintln!("{} {msg}", self.paint("1;33", "warning:"));
        }
    }

    /// An error on standard error (never hidden).
    pub fn error(&self, msg: &str) {
        if let Some(id) = self.node {
            let _s = tracing::error_span!("node", id).entered();
            tracing::error!("{msg}");
            return;
        }
        eprintln!("{} {msg}", self.paint("1;31", "error:"));
    }

    /// A note on standard error (hidden by `-q`).
    pub fn note(&self, msg: &str) {
        if let Some(id) = self.node {
            let _s = tracing::error_span!("node", id).entered();
            tracing::info!("{msg}");
            return;
        }
        if !self.quiet {
            eprintln!("{msg}");
        }
    }

    /// Extra detail at `-v` or more.
    pub fn detail(&self, msg: &str) {
        if let Some(id) = self.node {
            let _s = tracing::error_span!("node", id).entered();
            tracing::debug!("{msg}");
            return;
        }
        if self.verbose > 0 && !self.quiet {
            eprintln!("{msg}");
        }
    }

    /// Green (success) text when colour is on.
    pub fn good(&self, s: &str) -> String {
        self.paint("32", s)
    }

    /// Red (failure) text when colour is on.
    pub fn bad(&self, s: &str) -> String {
        self.paint("31", s)
    }

    /// A table styled for people.
    pub fn table(&self) -> comfy_table::Table {
        let mut t = comfy_table::Table::new();
        t.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
        if !self.color {
            t.force_no_tty();
        }
        t
    }

    /// A progress bar on standard error, or a hidden one when it is not a
    /// terminal, when `-q` is given, or when the work is small.
    pub fn progress(&self, total_bytes: u64, min_bytes: u64, what: &str) -> indicatif::ProgressBar {
        if total_bytes < min_bytes {
            return indicatif::ProgressBar::hidden();
        }
        self.progress_with(
            total_bytes,
            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            what,
        )
    }

    /// A progress bar with an indicatif `template` (hidden as for [`Ui::progress`]).
    pub fn progress_with(&self, total: u64, template: &str, what: &str) -> indicatif::ProgressBar {
        if !self.stderr_tty || self.quiet {
            return indicatif::ProgressBar::hidden();
        }
        let pb = indicatif::ProgressBar::new(total);
        if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
            pb.set_style(style.progress_chars("=> "));
        }
        pb.set_message(what.to_string());
        pb.tick();
        pb
    }
}

/// Writes one JSON value as a line.
pub fn json_line(out: &mut dyn Write, value: &serde_json::Value) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, value)?;
    out.write_all(b"\n")
}

/// Bytes for people: `1.5 MiB (1572864 bytes)` style, short form.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A timestamp (ns since the Unix epoch) as RFC 3339 with microseconds, UTC.
pub fn rfc3339(ns: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns);
    humantime::format_rfc3339_micros(t).to_string()
}

/// Standard base64 (RFC 4648, with padding).
pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        s.push(T[(n >> 18) as usize & 63] as char);
        s.push(T[(n >> 12) as usize & 63] as char);
        s.push(if c.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        s.push(if c.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    s
}

/// A printable, one-line preview of bytes: ASCII as is, `\r` `\n` `\t`
/// escaped, other bytes as `\xNN`, cut at `max` characters with `…`.
pub fn preview(data: &[u8], max: usize) -> String {
    let mut s = String::new();
    for &b in data {
        let piece = match b {
            b'\r' => "\\r".to_string(),
            b'\n' => "\\n".to_string(),
            b'\t' => "\\t".to_string(),
            b'\\' => "\\\\".to_string(),
            0x20..=0x7e => (b as char).to_string(),
            _ => format!("\\x{b:02x}"),
        };
        if s.len() + piece.len() > max {
            s.push('…');
            return s;
        }
        s.push_str(&piece);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }

    #[test]
    fn preview_escapes_and_cuts() {
        assert_eq!(preview(b"SET k v\r\n", 40), "SET k v\\r\\n");
        assert_eq!(preview(&[0, 255], 40), "\\x00\\xff");
        assert_eq!(preview(b"abcdefgh", 4), "abcd…");
    }

    #[test]
    fn human_bytes_units() {
        assert_eq!(human_bytes(12), "12 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }
}
