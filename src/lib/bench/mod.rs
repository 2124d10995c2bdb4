//! `falcon bench`: measurements that compare falcon with its baseline side
//! by side, in one run, and print their setup.

pub mod consensus_bench;
pub mod consensus_tcp;
pub mod log_bench;
pub mod redis_bench;
pub mod rtt;
pub mod stats;

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::output::{Status, Ui};

/// Arguments of `falcon bench`.
#[derive(Clone, Debug, clap::Args)]
#[command(after_help = EXAMPLES)]
pub struct BenchArgs {
    /// The durable log: append throughput and append-to-durable latency for
    /// 64 B and 4 KiB records per sync policy, group commit with many
    /// writers, and `--verify` speed, beside the disk's own write+fdatasync rate.
    #[arg(long, group = "what")]
    pub log: bool,

    /// Round trip of the transport with one message outstanding, perftest
    /// style (t_min, t_typical, t_avg, t_stdev, 99%, 99.9%, t_max; round trip
    /// and one way). Needs --local, or --serve ADDR on one host and --peer
    /// ADDR on the other.
    #[arg(long, group = "what")]
    pub rtt: bool,

    /// --rtt: both ends on this host.
    #[arg(long)]
    pub local: bool,

    /// --rtt: answer round trips on ADDR (the other host runs --peer ADDR) until Ctrl-C.
    #[arg(long, value_name = "ADDR", conflicts_with_all = ["peer", "local"])]
    pub serve: Option<SocketAddr>,

    /// --rtt: measure against a --serve at ADDR.
    #[arg(long, value_name = "ADDR", conflicts_with = "local")]
    pub peer: Option<SocketAddr>,

    /// --rtt --peer: the server is a plain echo server (TCP port 7 style,
    /// such as the test guest's), not `falcon bench --rtt --serve`.
    #[arg(long, requires = "peer")]
    pub plain_echo: bool,

    /// --rtt: message size; --consensus: entry size (bytes).
    #[arg(long, value_name = "BYTES", default_value_t = 64)]
    pub size: usize,

    /// --rtt: measured iterations.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub iters: usize,

    /// --rtt: iterations run first and not measured.
    #[arg(long, value_name = "N", default_value_t = 1_000)]
    pub warmup: usize,

    /// --transport shm: how a receiver waits (spin: never sleeps; adaptive:
    /// spins 50 µs, then sleeps on a futex; sleep: sleeps at once).
    #[arg(long, value_enum, value_name = "MODE", default_value = "adaptive")]
    pub poll: crate::transport::shm::PollMode,

    /// --rtt: write every round trip (ns, one per line) to FILE.
    #[arg(long, value_name = "FILE")]
    pub raw: Option<PathBuf>,

    /// Consensus: a local cluster of --replicas processes (falcon replicate
    /// without a program) driven by closed-loop clients; commits/s, commit
    /// latency, CPU per 1,000 commits. With --transport mem: the engine alone,
    /// 3 replicas in one process without a disk.
    #[arg(long, group = "what")]
    pub consensus: bool,

    /// --consensus: replicas in the local cluster.
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub replicas: usize,

    /// --consensus: closed-loop clients, one entry outstanding each (default: 1, then 256).
    #[arg(long, value_name = "N")]
    pub clients: Option<usize>,

    /// --consensus: connections the clients share (default 8).
    #[arg(long, value_name = "N")]
    pub connections: Option<usize>,

    /// --consensus: the cluster's sync policy: always, batch (default) or never.
    #[arg(long, value_name = "POLICY")]
    pub sync: Option<String>,

    /// --consensus: drive an already running cluster (its replicas started
    /// with `falcon replicate --null-program`) instead of starting one.
    #[arg(long, value_name = "FILE")]
    pub cluster: Option<PathBuf>,

    /// --consensus: every replica in a network namespace of its own, joined
    /// by a bridge (root only), instead of on 127.0.0.x.
    #[arg(long)]
    pub netns: bool,

    /// --consensus: the same measurements twice in one run, on plain TCP
    /// peer links and with mutual TLS on them (certificates made by
    /// scripts/tls-certs.sh), side by side.
    #[arg(long)]
    pub tls: bool,

    /// --consensus: also measure the TCP round trip (--rtt --local) in the
    /// same run and print commit latency as a multiple of it.
    #[arg(long)]
    pub compare: bool,

    /// Redis replicated by falcon beside Redis alone, Redis's asynchronous
    /// replication and its synchronous `WAIT 2 0`, alternating in one window
    /// (needs redis-server and redis-benchmark).
    #[arg(long, group = "what")]
    pub redis: bool,

    /// Requests per run for --redis at 50 connections (a tenth at 1).
    #[arg(long, value_name = "N", default_value_t = 20_000)]
    pub requests: usize,

    /// Rounds for --redis (the median is reported).
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub rounds: usize,

    /// The transport: tcp or shm (replicas on this host, over shared memory);
    /// for --consensus also mem, the engine alone in one process without a disk.
    #[arg(long, value_name = "NAME", default_value = "tcp")]
    pub transport: String,

    /// Where --log puts its scratch log (on the disk to measure; removed afterwards).
    #[arg(long, value_name = "DIR", default_value = "/var/tmp")]
    pub dir: PathBuf,

    /// How long each measurement runs.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = humantime::parse_duration)]
    pub duration: Duration,

    /// Size of the log that --log builds to measure --verify speed.
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    pub verify_mib: u64,
}

const EXAMPLES: &str = "\
Examples:
  falcon bench --log                         the log on /var/tmp's disk, 2 s per test
  falcon bench --log --dir /data --duration 5s
  falcon bench --log --json > log-bench.json
  falcon bench --rtt --local                 TCP round trip on this host, perftest style
  falcon bench --rtt --serve 10.0.0.1:7400   on host A; then on host B:
  falcon bench --rtt --peer 10.0.0.1:7400 --size 4096 --raw rtt.txt
  falcon bench --consensus                   3 replicas over TCP, 1 then 256 clients
  falcon bench --consensus --clients 256 --sync never --duration 5s
  falcon bench --consensus --clients 1 --compare   commit latency vs the round trip
  falcon bench --consensus --transport mem   the engine alone, 3 replicas in process
  falcon bench --consensus --tls             plain TCP peer links, then mutual TLS
  falcon bench --redis                       Redis via falcon beside Redis's own replication

Every benchmark prints its setup and measures its baseline in the same run:
for --log, the disk's own write+fdatasync rate for the same write pattern.";

/// Why a benchmark failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The log failed.
    #[error(transparent)]
    Log(#[from] crate::log::LogError),
    /// Any other I/O.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A mode that a later release builds, or that this host cannot run.
    #[error("{0}")]
    NotBuilt(String),
    /// Arguments that do not fit together.
    #[error("{0}")]
    Usage(String),
}

/// Runs `falcon bench`.
pub fn run(
    args: &BenchArgs,
    ui: &Ui,
    out: &mut dyn Write,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<Status, BenchError> {
    if args.rtt {
        return rtt::run(args, ui, out, stop);
    }
    if args.log {
        return log_bench::run(args, ui, out);
    }
    if args.consensus {
        if args.transport == "mem" {
            return consensus_bench::run(args, ui, out);
        }
        rtt::check_transport(&args.transport)?;
        return consensus_tcp::run(args, ui, out, stop);
    }
    if args.redis {
        return redis_bench::run(args, ui, out);
    }
    Err(BenchError::Usage(
        "choose what to measure: --rtt, --consensus, --log or --redis (falcon bench --help)".into(),
    ))
}

/// Child processes (servers, replicas), sent SIGTERM and waited for when dropped.
pub struct Procs(pub Vec<std::process::Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        for c in &mut self.0 {
            let _ = c.wait();
        }
    }
}

/// CPU time (user + system) this process has used so far.
pub fn cpu_time() -> Duration {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the struct we own.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// A scratch directory, removed when dropped.
pub struct Scratch(pub std::path::PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The setup as a JSON object (for `--json`).
pub fn setup_json(setup: &[(String, String)]) -> serde_json::Value {
    setup
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::json!(v)))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// Prints the setup, one `key: value` line each, keys aligned.
pub fn print_setup(out: &mut dyn Write, setup: &[(String, String)]) -> std::io::Result<()> {
    let width = setup
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    for (k, v) in setup {
        writeln!(out, "{k:>width$}: {v}")?;
    }
    out.flush()
}

/// The machine, and the directory when the benchmark uses a disk, printed
/// beside every result.
pub fn setup_lines(dir: Option<&std::path::Path>) -> Vec<(String, String)> {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let mut lines = vec![
        ("date".into(), crate::output::rfc3339(crate::log::now_ns())),
        ("cpu".into(), format!("{cpu} ({cores} cores)")),
        ("kernel".into(), kernel),
        ("falcon".into(), env!("CARGO_PKG_VERSION").into()),
    ];
    if let Some(dir) = dir {
        lines.push((
            "directory".into(),
            format!("{} ({})", dir.display(), filesystem_of(dir)),
        ));
    }
    lines
}

/// The file system type and device a path lives on, from /proc/mounts.
pub fn filesystem_of(path: &std::path::Path) -> String {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mut best: Option<(usize, String)> = None;
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 {
            continue;
        }
        if path.starts_with(f[1]) && best.as_ref().is_none_or(|b| f[1].len() >= b.0) {
            best = Some((f[1].len(), format!("{} on {}", f[2], f[0])));
        }
    }
    best.map(|b| b.1)
        .unwrap_or_else(|| "unknown file system".into())
}
