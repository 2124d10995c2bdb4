//! Prometheus text format: histograms the event loop fills, the text it
//! renders, and `--metrics ADDR`, a small HTTP server that serves it.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

/// Scrapes served at once; more are answered 503 at once.
const SCRAPES_MAX: usize = 8;
/// A text this fresh is served again instead of asking the loop: however
/// often the endpoint is asked, the loop renders at most once per period.
const TEXT_FRESH: Duration = Duration::from_secs(1);

/// What every scrape shares: the way to the loop and the last text.
struct Scrapes {
    calls: SyncSender<Call>,
    wake: Box<dyn Fn() + Send + Sync>,
    last: Mutex<Option<(Instant, String)>>,
    serving: AtomicUsize,
}

/// Serves `GET /metrics` on `addr`, a thread per scrape (at most
/// [`SCRAPES_MAX`]): a scrape asks the event loop for the text (through
/// `calls`, then `wake`) unless the last one is under a second old.
pub fn serve(
    addr: SocketAddr,
    calls: SyncSender<Call>,
    wake: impl Fn() + Send + Sync + 'static,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).map_err(|e| {
        std::io::Error::new(e.kind(), format!("--metrics: listening on {addr}: {e}"))
    })?;
    let bound = listener.local_addr()?;
    let shared = Arc::new(Scrapes {
        calls,
        wake: Box::new(wake),
        last: Mutex::new(None),
        serving: AtomicUsize::new(0),
    });
    std::thread::Builder::new()
        .name("falcon-metrics".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else {
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                };
                // A few silent or slow clients cannot hold every scrape up.
                if shared.serving.fetch_add(1, Ordering::AcqRel) >= SCRAPES_MAX {
                    shared.serving.fetch_sub(1, Ordering::AcqRel);
                    let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
                    let _ = respond(
                        &mut stream,
                        "503 Service Unavailable",
                        "too many scrapes at once\n",
                    );
                    continue;
                }
                let sh = shared.clone();
                let spawned = std::thread::Builder::new()
                    .name("falcon-scrape".into())
                    .spawn(move || {
                        answer(stream, &sh);
                        sh.serving.fetch_sub(1, Ordering::AcqRel);
                    });
                if spawned.is_err() {
                    shared.serving.fetch_sub(1, Ordering::AcqRel);
                }
            }
        })?;
    Ok(bound)
}

fn respond(stream: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    // One write: the connection may be closed with the request unread
    // (a 503 at once), which resets it and drops what is not sent yet.
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes())
}

/// The metrics text: the last one if fresh, else the loop's (None when the
/// loop does not answer within 2 s or its queue is full).
fn text(sh: &Scrapes) -> Option<String> {
    // One scrape asks the loop at a time; the others then take its text.
    let mut last = sh.last.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((at, t)) = last.as_ref() {
        if at.elapsed() < TEXT_FRESH {
            return Some(t.clone());
        }
    }
    let (reply, rx) = sync_channel(1);
    let call = Call {
        request: Request::Metrics,
        reply,
        asked: Instant::now(),
    };
    // (A full queue is an answer too: the loop is behind.)
    if sh.calls.try_send(call).is_err() {
        return None;
    }
    (sh.wake)();
    let t = rx
        .recv_timeout(Duration::from_secs(2))
        .ok()
        .and_then(|v| v.get("text").and_then(|t| t.as_str()).map(String::from))?;
    *last = Some((Instant::now(), t.clone()));
    Some(t)
}

fn answer(mut stream: TcpStream, sh: &Scrapes) {
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
        match text(sh) {
            Some(t) => ("200 OK", t),
            None => (
                "503 Service Unavailable",
                "the replica did not answer\n".to_string(),
            ),
        }
    };
    let _ = respond(&mut stream, status, &body);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silent_clients_hold_up_no_scrape_and_scrapes_share_one_text_a_second() {
        let (tx, rx) = sync_channel::<Call>(64);
        let asked = Arc::new(AtomicUsize::new(0));
        let a = asked.clone();
        std::thread::spawn(move || {
            for c in rx {
                a.fetch_add(1, Ordering::SeqCst);
                let _ = c
                    .reply
                    .send(serde_json::json!({"ok": true, "text": "falcon_up 1\n"}));
            }
        });
        let addr = serve("127.0.0.1:0".parse().unwrap(), tx, || {}).unwrap();
        let get = |req: &[u8]| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(req).unwrap();
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            out
        };
        // As many silent clients as scrapes are served at once: one more
        // is told at once, not made to wait.
        let silent: Vec<TcpStream> = (0..SCRAPES_MAX)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        let over = get(b"GET /metrics HTTP/1.0\r\n\r\n");
        assert!(
            over.starts_with("HTTP/1.1 503") && over.contains("too many"),
            "{over}"
        );
        drop(silent);
        // Once their threads saw them go, every scrape is answered; many
        // scrapes in a second ask the loop once.
        let gone = Instant::now();
        while !get(b"GET /metrics HTTP/1.0\r\n\r\n").starts_with("HTTP/1.1 200") {
            assert!(gone.elapsed() < Duration::from_secs(5), "still refused");
            std::thread::sleep(Duration::from_millis(10));
        }
        let start = Instant::now();
        for _ in 0..20 {
            let ok = get(b"GET /metrics HTTP/1.0\r\n\r\n");
            assert!(
                ok.starts_with("HTTP/1.1 200") && ok.ends_with("falcon_up 1\n"),
                "{ok}"
            );
        }
        let secs = start.elapsed().as_secs();
        let n = asked.load(Ordering::SeqCst);
        assert!(n >= 1 && n as u64 <= secs + 2, "{n} renders in {secs} s");
    }

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
