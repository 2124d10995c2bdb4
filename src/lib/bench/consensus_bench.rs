//! `falcon bench --consensus --transport mem`: the engine alone. Three
//! replicas in one process, messages handed over in memory, every append
//! durable at once (no disk), so the number is the engine's own ceiling.

use std::collections::VecDeque;
use std::io::Write;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::json;

use super::stats::{Summary, summarize};
use super::{BenchArgs, BenchError, cpu_time};
use crate::consensus::{Command, Config, Envelope, Event, Input, Replica};
use crate::log::Kind;
use crate::output::{self, Status, Ui};

/// One measured line.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Row {
    /// What ran.
    pub test: String,
    /// Clients with a request outstanding.
    pub clients: usize,
    /// Entries committed per second.
    pub entries_per_s: f64,
    /// CPU time per committed entry, ns (all replicas, one process).
    pub cpu_ns_per_entry: f64,
    /// Latency from proposal to commit at the leader.
    pub latency: Summary,
}

struct Cluster {
    replicas: Vec<Replica>,
    queue: VecDeque<(u32, Input)>,
    out: Vec<Command>,
    start: Instant,
    delivered: u64,
}

impl Cluster {
    fn new(n: u32) -> Cluster {
        let replicas = (0..n)
            .map(|id| {
                let cfg = Config {
                    batch_entries_max: 4096,
                    pipeline_ops_max: 1 << 20,
                    uncommitted_max: 1 << 20,
                    ..Config::new(0xbe7c, id, n)
                };
                Replica::new(cfg, u64::from(id), 0)
            })
            .collect();
        Cluster {
            replicas,
            queue: VecDeque::new(),
            out: Vec::new(),
            start: Instant::now(),
            delivered: 0,
        }
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// Feeds `input` to replica `id` and runs the cluster until no message is in flight.
    fn run(&mut self, id: u32, input: Input) {
        self.queue.push_back((id, input));
        while let Some((id, input)) = self.queue.pop_front() {
            let now = self.now();
            let mut out = std::mem::take(&mut self.out);
            self.replicas[id as usize].step(now, input, &mut out);
            for cmd in out.drain(..) {
                match cmd {
                    Command::Append(entries) => {
                        // No disk: durable at once.
                        let op = entries.last().map(|e| e.op).unwrap_or(0);
                        self.queue.push_back((id, Input::Durable { op }));
                    }
                    Command::Send { to, msg, .. } => {
                        self.queue.push_back((
                            to,
                            Input::Receive(Envelope {
                                cluster: 0xbe7c,
                                from: id,
                                to,
                                msg,
                            }),
                        ));
                    }
                    Command::Deliver(entries) if id == 0 => self.delivered += entries.len() as u64,
                    _ => {}
                }
            }
            self.out = out;
        }
    }

    fn compact(&mut self) {
        let below = self.delivered.saturating_sub(4096);
        for id in 0..self.replicas.len() {
            self.run(id as u32, Input::Compacted { below });
        }
    }
}

/// Runs with `clients` requests outstanding for `d`; returns the row.
fn measure(n: u32, clients: usize, payload: &Bytes, d: Duration) -> Row {
    let mut c = Cluster::new(n);
    let event = || Event {
        kind: Kind::Data,
        conn: 1,
        payload: payload.clone(),
    };
    let mut samples = Vec::new();
    let cpu0 = cpu_time();
    let t0 = Instant::now();
    let mut since_compact = 0u64;
    while t0.elapsed() < d {
        // Every client has one request outstanding; the leader gets them as one batch.
        let before = c.delivered;
        let t = Instant::now();
        let batch: Vec<Event> = (0..clients).map(|_| event()).collect();
        c.run(0, Input::Propose(batch));
        let done = c.delivered - before;
        assert_eq!(
            done, clients as u64,
            "every proposal commits in a lossless in-memory cluster"
        );
        samples.push(t.elapsed());
        since_compact += done;
        if since_compact >= 1 << 16 {
            c.compact();
            since_compact = 0;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = (cpu_time() - cpu0).as_nanos() as f64;
    Row {
        test: format!("falcon engine, {n} replicas"),
        clients,
        entries_per_s: c.delivered as f64 / secs,
        cpu_ns_per_entry: cpu / c.delivered.max(1) as f64,
        latency: summarize(&mut samples),
    }
}

/// The baseline: the same events, no replication — put in a log vector and delivered.
fn baseline(clients: usize, payload: &Bytes, d: Duration) -> Row {
    let mut log: Vec<Event> = Vec::new();
    let mut delivered = 0u64;
    let mut samples = Vec::new();
    let cpu0 = cpu_time();
    let t0 = Instant::now();
    while t0.elapsed() < d {
        let t = Instant::now();
        log.extend((0..clients).map(|_| Event {
            kind: Kind::Data,
            conn: 1,
            payload: payload.clone(),
        }));
        delivered += log
            .drain(..)
            .map(|e| {
                std::hint::black_box(e);
                1u64
            })
            .sum::<u64>();
        samples.push(t.elapsed());
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = (cpu_time() - cpu0).as_nanos() as f64;
    Row {
        test: "baseline: no replication".into(),
        clients,
        entries_per_s: delivered as f64 / secs,
        cpu_ns_per_entry: cpu / delivered.max(1) as f64,
        latency: summarize(&mut samples),
    }
}

/// Runs the benchmark.
pub fn run(args: &BenchArgs, ui: &Ui, out: &mut dyn Write) -> Result<Status, BenchError> {
    let payload = Bytes::from(vec![0x42u8; 64]);
    let d = args.duration;
    let mut setup = super::setup_lines(None);
    setup.push(("per test".into(), humantime::format_duration(d).to_string()));
    setup.push((
        "cluster".into(),
        "3 replicas in one process, one thread, in-memory transport, no disk (durable at once)"
            .into(),
    ));
    setup.push(("payload".into(), "64 bytes per entry".into()));
    setup.push((
        "baseline".into(),
        "the same events without replication (appended and delivered in place)".into(),
    ));
    let mut rows = Vec::new();
    for clients in [1usize, 256] {
        rows.push(measure(3, clients, &payload, d));
        rows.push(baseline(clients, &payload, d));
    }
    if ui.json {
        output::json_line(
            out,
            &json!({
                "setup": super::setup_json(&setup),
                "rows": rows,
            }),
        )?;
        return Ok(Status::Success);
    }
    super::print_setup(out, &setup)?;
    let mut t = ui.table();
    t.set_header(vec![
        "test",
        "clients",
        "entries/s",
        "CPU ns/entry",
        "p50 µs",
        "p99 µs",
        "p99.9 µs",
    ]);
    for r in &rows {
        t.add_row(vec![
            r.test.clone(),
            r.clients.to_string(),
            format!("{:.0}", r.entries_per_s),
            format!("{:.0}", r.cpu_ns_per_entry),
            format!("{:.1}", r.latency.p50_us),
            format!("{:.1}", r.latency.p99_us),
            format!("{:.1}", r.latency.p999_us),
        ]);
    }
    writeln!(out, "{t}")?;
    writeln!(
        out,
        "latency: one proposal round (all outstanding requests) from Propose to commit at the leader"
    )?;
    writeln!(
        out,
        "for scale: openraft's README gives 33,000/s (1 client) and 3,548,000/s (4,096 clients) in process on an M1 Max"
    )?;
    Ok(Status::Success)
}
