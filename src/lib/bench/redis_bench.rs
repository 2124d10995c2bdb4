//! `falcon bench --redis`: falcon beside Redis's own replication, in one time
//! window, alternating: (a) one bare redis-server, (b) a primary with two
//! replicas (asynchronous replication), (c) the same with every SET followed
//! by `WAIT 2 0` (synchronous replication; our own small client, since
//! redis-benchmark cannot send it), (d) falcon with three replicas, and
//! variants of it: (e) without fdatasync, (f) without divergence
//! detection, (g) with `program_protocol = "resp"` (every client's
//! commands down one pipelined connection to each Redis).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use super::stats::{Summary, summarize};
use super::{BenchArgs, BenchError, Procs};
use crate::output::{self, Status, Ui};

/// `n` ports free on 127.0.0.1 now (fewer if binding fails).
pub(crate) fn free_ports(n: usize) -> Vec<u16> {
    let ls: Vec<TcpListener> = (0..n)
        .filter_map(|_| TcpListener::bind("127.0.0.1:0").ok())
        .collect();
    ls.iter()
        .filter_map(|l| l.local_addr().ok())
        .map(|a| a.port())
        .collect()
}

/// One command to a Redis-protocol server at `addr`: the reply line
/// (`+OK`, `:2`, …), or a bulk string's content, or `(nil)`. None when the
/// server refuses, closes or does not answer within 3 s.
pub fn resp_command(addr: SocketAddr, args: &[&str]) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(req.as_bytes()).ok()?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let line = line.trim_end().to_string();
    if let Some(n) = line.strip_prefix('$') {
        let n: i64 = n.parse().ok()?;
        if n < 0 {
            return Some("(nil)".into());
        }
        let mut b = vec![0u8; n as usize + 2];
        std::io::Read::read_exact(&mut r, &mut b).ok()?;
        return Some(String::from_utf8_lossy(&b[..n as usize]).into_owned());
    }
    Some(line)
}

fn redis_cmd(port: u16, args: &[&str]) -> Option<String> {
    resp_command(SocketAddr::from(([127, 0, 0, 1], port)), args)
}

fn wait_for(mut f: impl FnMut() -> bool, within: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < within {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// redis-server on loopback at `port`, without persistence.
fn redis_args(port: &str) -> [&str; 9] {
    [
        "redis-server",
        "--port",
        port,
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ]
}

fn redis_server(port: u16, extra: &[&str]) -> std::io::Result<Child> {
    let port = port.to_string();
    let [program, args @ ..] = redis_args(&port);
    Command::new(program)
        .args(args)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
}

/// One measurement.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Run {
    /// Which setup.
    pub setup: String,
    /// Connections.
    pub clients: usize,
    /// Requests per second.
    pub ops_per_s: f64,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 99th percentile latency, ms.
    pub p99_ms: f64,
    /// falcon setups: CPU time (user + system) of the three falcon
    /// processes per request, µs (the programs' own time not counted).
    pub falcon_cpu_us_per_op: Option<f64>,
    /// CPU time the whole host was busy (user, nice, system, irq, softirq:
    /// every process, the client and the kernel's disk and network work
    /// included) per request, µs; none where /proc/stat cannot be read.
    pub host_cpu_us_per_op: Option<f64>,
}

/// CPU time the whole host has been busy so far, ms (first line of /proc/stat).
fn host_busy_ms() -> Option<f64> {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let f: Vec<f64> = line
        .split_whitespace()
        .map(|x| x.parse::<f64>().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq ...
    let busy = [0, 1, 2, 5, 6]
        .iter()
        .map(|&i| f.get(i).copied())
        .sum::<Option<f64>>()?;
    Some(busy * 1000.0 / hz)
}

/// CPU time (user + system) the processes used so far, ms (from /proc).
fn cpu_ms(pids: &[u32]) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .map(|stat| {
            // After the command name in parentheses: state is field 3, utime 14, stime 15.
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
            (ticks(11) + ticks(12)) * 1000.0 / hz
        })
        .sum()
}

/// redis-benchmark -t set against `port`; parses its CSV.
fn redis_benchmark(
    port: u16,
    clients: usize,
    requests: usize,
) -> Result<(f64, f64, f64), BenchError> {
    let out = Command::new("redis-benchmark")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
            "set",
            "-P",
            "1",
            "--csv",
        ])
        .args(["-c", &clients.to_string(), "-n", &requests.to_string()])
        .output()
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("running redis-benchmark (apt-get install redis-tools): {e}"),
            )
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
    let row = text
        .lines()
        .find(|l| l.starts_with("\"SET\""))
        .ok_or_else(|| {
            std::io::Error::other(format!("redis-benchmark printed no SET row: {text}"))
        })?;
    let f: Vec<f64> = row
        .split(',')
        .skip(1)
        .map(|x| x.trim_matches('"').parse().unwrap_or(0.0))
        .collect();
    Ok((f[0], f[3], f[5]))
}

/// SET followed by WAIT 2 0 on each of `clients` connections, `requests` in all.
fn set_wait(port: u16, clients: usize, requests: usize) -> Result<(f64, Summary), BenchError> {
    let per = requests.div_ceil(clients);
    let start = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            std::thread::spawn(move || -> std::io::Result<Vec<Duration>> {
                let s = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port)))?;
                s.set_nodelay(true)?;
                let mut w = s.try_clone()?;
                let mut r = BufReader::new(s);
                let mut lat = Vec::with_capacity(per);
                let mut line = String::new();
                for i in 0..per {
                    let key = format!("key:{c}:{i}");
                    let req = format!("*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n$3\r\nxxx\r\n*3\r\n$4\r\nWAIT\r\n$1\r\n2\r\n$1\r\n0\r\n", key.len());
                    let t = Instant::now();
                    w.write_all(req.as_bytes())?;
                    for _ in 0..2 {
                        line.clear();
                        r.read_line(&mut line)?;
                    }
                    lat.push(t.elapsed());
                }
                Ok(lat)
            })
        })
        .collect();
    let mut all = Vec::new();
    for h in handles {
        all.extend(
            h.join()
                .map_err(|_| std::io::Error::other("client thread panicked"))??,
        );
    }
    let secs = start.elapsed().as_secs_f64();
    Ok((all.len() as f64 / secs, summarize(&mut all)))
}

fn falcon_cluster(
    dir: &Path,
    ports: &[u16],
    sync: &str,
    more_toml: &str,
) -> Result<(Procs, u16, Vec<u32>), BenchError> {
    let exe = std::env::current_exe()?;
    std::fs::create_dir_all(dir)?;
    let toml = crate::config::loopback_cluster(
        &format!(
            "cluster = \"bench-{}\"\nkey_file = \"cluster.key\"\nsync = \"{sync}\"\n{more_toml}",
            dir.file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
        ),
        &ports[..9],
    );
    std::fs::write(dir.join("cluster.toml"), toml)?;
    let st = Command::new(&exe)
        .args(["replicate", "--new-key"])
        .arg(dir.join("cluster.key"))
        .stderr(Stdio::null())
        .status()?;
    if !st.success() {
        return Err(std::io::Error::other("could not write a cluster key").into());
    }
    let mut procs = Procs(Vec::new());
    for i in 0..3 {
        let app = ports[3 * i + 2].to_string();
        procs.0.push(
            Command::new(&exe)
                .current_dir(dir)
                .args([
                    "-q",
                    "replicate",
                    "--config",
                    "cluster.toml",
                    "--node",
                    &(i + 1).to_string(),
                    "--follower-clients",
                    "refuse",
                    "--",
                ])
                .args(redis_args(&app))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        );
    }
    let mut leader = None;
    wait_for(
        || {
            leader = (0..3)
                .map(|i| ports[3 * i + 1])
                .find(|&p| redis_cmd(p, &["PING"]).as_deref() == Some("+PONG"));
            leader.is_some()
        },
        Duration::from_secs(20),
    );
    let leader = leader
        .ok_or_else(|| std::io::Error::other("the falcon cluster elected no leader within 20 s"))?;
    let pids = procs.0.iter().map(std::process::Child::id).collect();
    Ok((procs, leader, pids))
}

/// Runs the comparison.
pub fn run(args: &BenchArgs, ui: &Ui, out: &mut dyn Write) -> Result<Status, BenchError> {
    let dir = std::env::temp_dir().join(format!("falcon-bench-redis-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let _cleanup = super::Scratch(dir.clone());
    let ports = free_ports(4 + 9 * 5);
    let (bare, primary, r1, r2) = (ports[0], ports[1], ports[2], ports[3]);
    let mut procs = Procs(vec![
        redis_server(bare, &[])?,
        redis_server(primary, &[])?,
        redis_server(r1, &["--replicaof", "127.0.0.1", &primary.to_string()])?,
        redis_server(r2, &["--replicaof", "127.0.0.1", &primary.to_string()])?,
    ]);
    let up = wait_for(
        || {
            [bare, primary, r1, r2]
                .iter()
                .all(|&p| redis_cmd(p, &["PING"]).as_deref() == Some("+PONG"))
        },
        Duration::from_secs(10),
    ) && wait_for(
        || redis_cmd(primary, &["WAIT", "2", "100"]).as_deref() == Some(":2"),
        Duration::from_secs(20),
    );
    if !up {
        return Err(std::io::Error::other(
            "redis-server (apt-get install redis-server) did not come up with two replicas",
        )
        .into());
    }
    // The falcon setups: name, scratch directory, sync policy, more of the
    // cluster file. Nine ports each.
    const FALCON_SETUPS: [(&str, &str, &str, &str); 5] = [
        ("d: falcon, 3 replicas, sync batch", "batch", "batch", ""),
        ("e: falcon, 3 replicas, sync never", "never", "never", ""),
        (
            "f: as d, divergence detection off",
            "unchecked",
            "batch",
            "divergence_chunk = \"off\"\n",
        ),
        (
            "g: as d, program_protocol resp",
            "resp",
            "batch",
            "program_protocol = \"resp\"\n",
        ),
        (
            "h: as g, sync never",
            "resp-never",
            "never",
            "program_protocol = \"resp\"\n",
        ),
    ];
    let mut clusters = Vec::new();
    for (i, &(name, sub, sync, more)) in FALCON_SETUPS.iter().enumerate() {
        let at = 4 + 9 * i;
        let (mut falcon, leader, pids) =
            falcon_cluster(&dir.join(sub), &ports[at..at + 9], sync, more)?;
        procs.0.append(&mut falcon.0);
        clusters.push((name, leader, pids));
    }
    let requests = args.requests;
    let mut runs: Vec<Run> = Vec::new();
    // Each setup: its name, the port its clients use, whether every SET is
    // followed by WAIT 2 0 (our own client) instead of redis-benchmark, and
    // the falcon processes whose CPU time counts.
    let none: &[u32] = &[];
    let mut setups = vec![
        ("a: redis-server alone", bare, false, none),
        (
            "b: redis async replication, 2 replicas",
            primary,
            false,
            none,
        ),
        ("c: redis SET + WAIT 2 0", primary, true, none),
    ];
    for (name, leader, pids) in &clusters {
        setups.push((name, *leader, false, &pids[..]));
    }
    for round in 0..args.rounds {
        for clients in [50usize, 1] {
            let n = if clients == 1 {
                requests / 10
            } else {
                requests
            };
            for &(setup, port, wait, pids) in &setups {
                let cpu_before = cpu_ms(pids);
                let host_before = host_busy_ms();
                let (ops_per_s, p50_ms, p99_ms) = if wait {
                    let (ops, lat) = set_wait(port, clients, n)?;
                    (ops, lat.p50_us / 1000.0, lat.p99_us / 1000.0)
                } else {
                    redis_benchmark(port, clients, n)?
                };
                runs.push(Run {
                    setup: setup.into(),
                    clients,
                    ops_per_s,
                    p50_ms,
                    p99_ms,
                    falcon_cpu_us_per_op: (!pids.is_empty())
                        .then(|| (cpu_ms(pids) - cpu_before) * 1000.0 / n as f64),
                    host_cpu_us_per_op: host_busy_ms()
                        .zip(host_before)
                        .map(|(after, before)| (after - before) * 1000.0 / n as f64),
                });
            }
        }
        // The next round runs the setups in another order (no setup always last).
        setups.rotate_left(1);
        ui.detail(&format!("round {} done", round + 1));
    }
    setups.sort_by_key(|s| s.0);
    drop(procs);
    // Median of the rounds per setup and client count.
    let mut rows = Vec::new();
    for clients in [50usize, 1] {
        for &(setup, ..) in &setups {
            let mut rs: Vec<&Run> = runs
                .iter()
                .filter(|r| r.setup == setup && r.clients == clients)
                .collect();
            rs.sort_by(|a, b| a.ops_per_s.total_cmp(&b.ops_per_s));
            let m = rs[rs.len() / 2];
            rows.push(m.clone());
        }
    }
    let mut setup = super::setup_lines(None);
    setup.push(("workload".into(), format!("SET, P=1, {requests} requests at 50 connections, {} at 1; median of {} rounds, setups alternating (each round in another order)", requests / 10, args.rounds)));
    setup.push(("durability".into(), "a, b: memory only; c: in memory on 3 copies; d, f, g: on disk (fdatasync) on a majority of 3 before the answer; e, h: as d, g without fdatasync (show what the disk costs)".into()));
    setup.push(("placement".into(), "every process on this host, loopback; falcon: 3 falcon + 3 redis-server processes per cluster, the other clusters idle while a setup runs; d, e, f: one Redis connection per client on every replica, each command handed over after the last one's answer; g, h: every client's commands down one pipelined connection per Redis".into()));
    setup.push(("cpu".into(), "falcon CPU: the three falcon processes' user + system time per request; host CPU: the whole host's busy time per request (every process of the setup, the client — redis-benchmark, or falcon's own threaded client for c — and the kernel's network and disk work; the idle setups' background included)".into()));
    setup.push(("divergence".into(), "d, e, g, h: every replica hashes Redis's output (16 KiB chunks, xxh3) and compares the leader's; f: off".into()));
    if ui.json {
        output::json_line(
            out,
            &json!({"setup": super::setup_json(&setup), "rows": rows, "runs": runs}),
        )?;
        return Ok(Status::Success);
    }
    super::print_setup(out, &setup)?;
    let mut t = ui.table();
    t.set_header(vec![
        "setup",
        "clients",
        "ops/s",
        "p50 ms",
        "p99 ms",
        "ops/s vs c",
        "falcon CPU µs/op",
        "host CPU µs/op",
    ]);
    for r in &rows {
        let c = rows
            .iter()
            .find(|x| x.clients == r.clients && x.setup.starts_with("c:"))
            .map(|x| x.ops_per_s)
            .unwrap_or(0.0);
        t.add_row(vec![
            r.setup.clone(),
            r.clients.to_string(),
            format!("{:.0}", r.ops_per_s),
            format!("{:.3}", r.p50_ms),
            format!("{:.3}", r.p99_ms),
            if c > 0.0 {
                format!("{:.2}", r.ops_per_s / c)
            } else {
                "-".into()
            },
            r.falcon_cpu_us_per_op
                .map_or_else(|| "-".into(), |us| format!("{us:.1}")),
            r.host_cpu_us_per_op
                .map_or_else(|| "-".into(), |us| format!("{us:.1}")),
        ]);
    }
    writeln!(out, "{t}")?;
    for clients in [50usize, 1] {
        let of = |p: &str| {
            rows.iter()
                .find(|r| r.clients == clients && r.setup.starts_with(p))
        };
        if let (Some(d), Some(f)) = (of("d:"), of("f:")) {
            if f.ops_per_s > 0.0 {
                writeln!(
                    out,
                    "divergence detection at {clients} client{}: {:+.1}% ops/s, p50 {:+.3} ms, falcon CPU {:+.1} µs/op (d vs f)",
                    if clients == 1 { "" } else { "s" },
                    (d.ops_per_s / f.ops_per_s - 1.0) * 100.0,
                    d.p50_ms - f.p50_ms,
                    d.falcon_cpu_us_per_op.unwrap_or(0.0) - f.falcon_cpu_us_per_op.unwrap_or(0.0)
                )?;
            }
        }
    }
    Ok(Status::Success)
}
