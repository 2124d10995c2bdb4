//! Prometheus text format: histograms the event loop fills, the text it
//! renders, and `--metrics ADDR`, a small HTTP server that serves it.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::time::Duration;

use super::{Call, Request};

/// Upper bounds of the latency buckets, in seconds.
pub const LATENCY_BUCKETS: [f64; 14] = [
    25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3,
    1.0,
];

/// A latency histogram with [`LATENCY_BUCKETS`] (plus +Inf).
#[derive(Clone, Debug, Default)]
pub struct Histogram {
    counts: [u64; LATENCY_BUCKETS.len() + 1],
    sum_ns: u128,
    count: u64,
}

impl Histogram {
    /// Counts one observation of `ns` nanoseconds.
    pub fn observe(&mut self, ns: u64) {
        let s = ns as f64 / 1e9;
        let i = LATENCY_BUCKETS
            .iter()
            .position(|&b| s <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.counts[i] += 1;
        self.sum_ns += u128::from(ns);
        self.count += 1;
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Appends the histogram as Prometheus text (`name_bucket`, `_sum`, `_count`).
    pub fn render(&self, out: &mut String, name: &str, help: &str, labels: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut acc = 0;
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
            acc += self.counts[i];
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {acc}");
        }
        acc += self.counts[LATENCY_BUCKETS.len()];
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {acc}");
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(
            out,
            "{name}_sum{braces} {}\n{name}_count{braces} {}",
            self.sum_ns as f64 / 1e9,
            self.count
        );
    }
}

/// Appends one counter or gauge.
pub fn metric(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, v) in samples {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {v}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {v}");
        }
    }
}

/// Serves `GET /metrics` on `addr` from a thread: each scrape asks the event
/// loop for the text (through `calls`, then `wake`).
pub fn serve(
    addr: SocketAddr,
    calls: SyncSender<Call>,
    wake: impl Fn() + Send + 'static,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).map_err(|e| {
        std::io::Error::new(e.kind(), format!("--metrics: listening on {addr}: {e}"))
    })?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new()
        .name("falcon-metrics".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else {
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                };
                // One scrape at a time: Prometheus scrapes rarely, and a
                // stalled client is cut off by the timeouts.
                answer(stream, &calls, &wake);
            }
        })?;
    Ok(bound)
}

fn answer(mut stream: TcpStream, calls: &SyncSender<Call>, wake: &dyn Fn()) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    // The whole request within 2 s (not 2 s per byte).
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > 8192 {
            let _ = stream.write_all(b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
            return;
        }
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, body) = if method != "GET" {
        ("405 Method Not Allowed", "only GET\n".to_string())
    } else if path != "/metrics" && path != "/" {
        ("404 Not Found", "falcon serves /metrics\n".to_string())
    } else {
        let (reply, rx) = sync_channel(1);
        let text = if calls
            .send(Call {
                request: Request::Metrics,
                reply,
            })
            .is_ok()
        {
            wake();
            rx.recv_timeout(Duration::from_secs(2))
                .ok()
                .and_then(|v| v.get("text").and_then(|t| t.as_str()).map(String::from))
        } else {
            None
        };
        match text {
            Some(t) => ("200 OK", t),
            None => (
                "503 Service Unavailable",
                "the replica did not answer\n".to_string(),
            ),
        }
    };
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_renders_cumulative_buckets() {
        let mut h = Histogram::default();
        for ns in [10_000, 40_000, 2_000_000, 5_000_000_000] {
            h.observe(ns);
        }
        let mut s = String::new();
        h.render(&mut s, "x_seconds", "x", "");
        assert!(s.contains("x_seconds_bucket{le=\"0.000025\"} 1"), "{s}");
        assert!(s.contains("x_seconds_bucket{le=\"0.00005\"} 2"), "{s}");
        assert!(s.contains("x_seconds_bucket{le=\"0.0025\"} 3"), "{s}");
        assert!(s.contains("x_seconds_bucket{le=\"1\"} 3"), "{s}");
        assert!(s.contains("x_seconds_bucket{le=\"+Inf\"} 4"), "{s}");
        assert!(s.contains("x_seconds_count 4"), "{s}");
    }
}
