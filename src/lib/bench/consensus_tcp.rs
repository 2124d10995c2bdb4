//! `falcon bench --consensus --transport tcp`: a real cluster — N `falcon
//! replicate --null-program` processes with their logs, fsync threads and TCP
//! peer links — driven by closed-loop clients. Each client has one entry
//! outstanding; the clients share a few connections to the leader, so the
//! entries of all clients that are ready go out in one write.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mio::net::TcpStream as MioStream;
use mio::{Events, Interest, Poll, Token};
use serde_json::json;

use super::stats::{Summary, summarize};
use super::{BenchArgs, BenchError, Procs};
use crate::output::{self, Status, Ui};

/// Network namespaces `<tag>-1..n` joined by a bridge, one per replica
/// (`--netns`, root only); removed when dropped.
pub struct Netns {
    tag: String,
    n: usize,
    /// The third byte of the 10.78.x.0/24 subnet.
    subnet: u8,
}

fn sh(cmd: &str) -> std::io::Result<()> {
    let o = Command::new("sh").arg("-c").arg(cmd).output()?;
    if o.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "{cmd}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )))
    }
}

impl Netns {
    /// Creates them; needs root and the `ip` tool.
    pub fn new(n: usize) -> Result<Netns, BenchError> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(BenchError::Usage(
                "--netns creates network namespaces and needs root".into(),
            ));
        }
        let pid = std::process::id();
        let net = Netns {
            tag: format!("fb{}", pid % 100_000),
            n,
            subnet: (pid % 250) as u8,
        };
        let (t, x) = (&net.tag, net.subnet);
        sh(&format!(
            "ip link add {t}br type bridge && ip addr add 10.78.{x}.254/24 dev {t}br && ip link set {t}br up"
        ))?;
        for i in 1..=n {
            sh(&format!(
                "ip netns add {t}-{i} && ip link add {t}v{i} type veth peer name {t}p{i} && \
                 ip link set {t}p{i} netns {t}-{i} && ip link set {t}v{i} master {t}br && ip link set {t}v{i} up && \
                 ip netns exec {t}-{i} ip link set lo up && \
                 ip netns exec {t}-{i} ip addr add 10.78.{x}.{i}/24 dev {t}p{i} && \
                 ip netns exec {t}-{i} ip link set {t}p{i} up"
            ))?;
        }
        Ok(net)
    }

    fn ip(&self, i: usize) -> [u8; 4] {
        [10, 78, self.subnet, i as u8]
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let t = &self.tag;
        for i in 1..=self.n {
            let _ = sh(&format!(
                "ip netns pids {t}-{i} | xargs -r kill -9; ip netns del {t}-{i}; ip link del {t}v{i}"
            ));
        }
        let _ = sh(&format!("ip link del {t}br"));
    }
}

/// One measured configuration.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TcpRow {
    /// Replicas.
    pub replicas: usize,
    /// Closed-loop clients.
    pub clients: usize,
    /// Connections they share.
    pub connections: usize,
    /// Entry payload, bytes.
    pub size: usize,
    /// `sync` of the cluster.
    pub sync: String,
    /// Peer links: "tcp", "tcp+tls" (--tls), "shm", "rdma".
    pub links: String,
    /// Committed entries per second.
    pub commits_per_s: f64,
    /// Client-observed commit latency.
    pub latency: Summary,
    /// Commit latency inside the leader: from proposing an entry to
    /// applying it once a majority has it (no client hops).
    pub leader_latency: Option<Summary>,
    /// CPU seconds of all replica processes per 1,000 commits (None for --cluster).
    pub replica_cpu_s_per_1000: Option<f64>,
    /// CPU seconds of the load generator per 1,000 commits.
    pub client_cpu_s_per_1000: f64,
}

fn ticks_per_s() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// utime + stime of a process (all its threads), seconds.
fn process_cpu_s(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) end with ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ut: f64 = f.get(11)?.parse().ok()?;
    let st: f64 = f.get(12)?.parse().ok()?;
    Some((ut + st) / ticks_per_s())
}

fn free_port(ip: [u8; 4]) -> std::io::Result<u16> {
    Ok(TcpListener::bind(SocketAddr::from((ip, 0)))?
        .local_addr()?
        .port())
}

/// Writes a cluster of `n` replicas on 127.0.0.1..n into `dir` and starts them.
/// Makes the CA and every replica's certificate for the cluster file in
/// `dir` with scripts/tls-certs.sh (from the source tree falcon was built in).
fn make_certs(dir: &Path) -> Result<(), BenchError> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/tls-certs.sh");
    if !script.is_file() {
        return Err(BenchError::Usage(format!(
            "--tls makes certificates with {}, which is not here (run the bench from falcon's source tree)",
            script.display()
        )));
    }
    let o = Command::new("bash")
        .arg(&script)
        .args(["--config", "cluster.toml", "--out", "tls"])
        .current_dir(dir)
        .output()?;
    if !o.status.success() {
        return Err(std::io::Error::other(format!(
            "tls-certs.sh: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ))
        .into());
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn start_cluster(
    dir: &Path,
    n: usize,
    sync: &str,
    transport: &str,
    poll: crate::transport::shm::PollMode,
    ui: &Ui,
    net: Option<&Netns>,
    tls: bool,
) -> Result<(Procs, Vec<SocketAddr>), BenchError> {
    let poll = format!("{poll:?}").to_lowercase();
    let exe = std::env::current_exe()?;
    // One cluster name per run: shm rings live in a directory named after it.
    let mut toml = format!(
        "cluster = \"bench-consensus-{}\"\nkey_file = \"cluster.key\"\nsync = \"{sync}\"\ntransport = \"{transport}\"\n",
        std::process::id()
    );
    let mut clients = Vec::new();
    for i in 0..n {
        let (ip, (p, c, a)) = match net {
            // A host of its own: the same ports on every one.
            Some(net) => (net.ip(i + 1), (7101, 7201, 7001)),
            None => {
                let ip = [127, 0, 0, (i + 1) as u8];
                (ip, (free_port(ip)?, free_port(ip)?, free_port(ip)?))
            }
        };
        let host = std::net::Ipv4Addr::from(ip).to_string();
        toml.push_str(&format!(
            "\n[[replica]]\nid = {}\npeer = \"{host}:{p}\"\nclient = \"{host}:{c}\"\napp = \"{host}:{a}\"\ndata_dir = \"data/{}\"\n",
            i + 1,
            i + 1
        ));
        clients.push(SocketAddr::from((ip, c)));
    }
    std::fs::write(dir.join("cluster.toml"), toml)?;
    crate::config::generate_key(&dir.join("cluster.key"))
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    if tls {
        make_certs(dir)?;
    }
    let mut procs = Procs(Vec::new());
    for i in 0..n {
        let log = std::fs::File::create(dir.join(format!("replica{}.log", i + 1)))?;
        let mut cmd = match net {
            Some(net) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &format!("{}-{}", net.tag, i + 1)])
                    .arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        procs.0.push(
            cmd.current_dir(dir)
                .args(["replicate", "--config", "cluster.toml", "--node"])
                .arg((i + 1).to_string())
                .args(["--null-program", "--follower-clients", "refuse"])
                .args(["--poll", &poll])
                .args(if tls {
                    vec![
                        "--tls-cert".to_string(),
                        format!("tls/replica-{}.pem", i + 1),
                        "--tls-key".to_string(),
                        format!("tls/replica-{}.key", i + 1),
                        "--tls-ca".to_string(),
                        "tls/ca.pem".to_string(),
                    ]
                } else {
                    Vec::new()
                })
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()?,
        );
    }
    ui.detail(&format!(
        "started {n} replicas in {} (logs: replicaN.log)",
        dir.display()
    ));
    Ok((procs, clients))
}

/// Bytes of one answer of a `--null-program` leader: the op, then the
/// leader's own proposal-to-commit time in ns.
const ACK: usize = 16;

/// One frame of `size` bytes.
fn frame(size: usize) -> Vec<u8> {
    let mut f = (size as u32).to_le_bytes().to_vec();
    f.resize(4 + size, 0x42);
    f
}

/// The replica whose client address commits a probe entry, within `within`.
fn find_leader(clients: &[SocketAddr], within: Duration) -> Option<SocketAddr> {
    let start = Instant::now();
    let probe = frame(8);
    while start.elapsed() < within {
        for &addr in clients {
            let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
                continue;
            };
            let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
            let mut ack = [0u8; ACK];
            if s.write_all(&probe).is_ok() && s.read_exact(&mut ack).is_ok() {
                return Some(addr);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

struct Conn {
    stream: MioStream,
    /// When each outstanding entry was sent, oldest first.
    sent: VecDeque<Instant>,
    inbuf: Vec<u8>,
    outbuf: Vec<u8>,
    last_op: u64,
}

/// One load: `clients` closed-loop clients over `connections` connections
/// to `leader`, `size`-byte entries, for `warmup` then `duration`.
struct Load {
    leader: SocketAddr,
    clients: usize,
    connections: usize,
    size: usize,
    warmup: Duration,
    duration: Duration,
}

/// Runs a load; latency and counts come from the measured part only.
fn drive(
    load: &Load,
    pb: &indicatif::ProgressBar,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<Driven, BenchError> {
    let Load {
        leader,
        clients,
        connections,
        size,
        warmup,
        duration,
    } = *load;
    let mut poll = Poll::new()?;
    let one = frame(size);
    let mut conns = Vec::new();
    for i in 0..connections {
        let s = TcpStream::connect_timeout(&leader, Duration::from_secs(2))?;
        s.set_nodelay(true)?;
        s.set_nonblocking(true)?;
        let mut stream = MioStream::from_std(s);
        poll.registry().register(
            &mut stream,
            Token(i),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        // Clients spread evenly; each starts with its one entry outstanding.
        let mine = clients / connections + usize::from(i < clients % connections);
        let mut c = Conn {
            stream,
            sent: VecDeque::with_capacity(mine),
            inbuf: Vec::new(),
            outbuf: Vec::with_capacity(mine * one.len()),
            last_op: 0,
        };
        let now = Instant::now();
        for _ in 0..mine {
            c.outbuf.extend_from_slice(&one);
            c.sent.push_back(now);
        }
        conns.push(c);
    }
    let mut events = Events::with_capacity(256);
    let mut buf = vec![0u8; 256 << 10];
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let mut samples = Vec::new();
    let mut leader_samples = Vec::new();
    let mut committed = 0u64;
    // Every acknowledgement, warm-up included, for the live rate.
    let mut acked = 0u64;
    let mut cpu0 = None;
    let mut last_tick = (Instant::now(), 0u64);
    for c in &mut conns {
        write_out(c)?;
    }
    while Instant::now() < end {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(std::io::Error::new(std::io::ErrorKind::Interrupted, "interrupted").into());
        }
        if cpu0.is_none() && Instant::now() >= measure_from {
            cpu0 = Some(super::cpu_time());
        }
        poll.poll(&mut events, Some(Duration::from_millis(20)))?;
        for ev in events.iter() {
            let c = &mut conns[ev.token().0];
            if ev.is_readable() || ev.is_read_closed() {
                loop {
                    match c.stream.read(&mut buf) {
                        Ok(0) => {
                            return Err(std::io::Error::other(
                                "the leader closed a client connection (a view change during the run?)",
                            )
                            .into());
                        }
                        Ok(n) => c.inbuf.extend_from_slice(&buf[..n]),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                let now = Instant::now();
                let acks = c.inbuf.len() / ACK;
                for k in 0..acks {
                    let at = k * ACK;
                    let op = u64::from_le_bytes(c.inbuf[at..at + 8].try_into().expect("8 bytes"));
                    let inside =
                        u64::from_le_bytes(c.inbuf[at + 8..at + 16].try_into().expect("8 bytes"));
                    if op <= c.last_op {
                        return Err(std::io::Error::other(format!(
                            "the leader acknowledged op {op} after op {}: commits out of order",
                            c.last_op
                        ))
                        .into());
                    }
                    c.last_op = op;
                    acked += 1;
                    let sent = c.sent.pop_front().ok_or_else(|| {
                        std::io::Error::other("an acknowledgement for an entry never sent")
                    })?;
                    if sent >= measure_from && now <= end {
                        samples.push(now - sent);
                        if inside > 0 {
                            leader_samples.push(Duration::from_nanos(inside));
                        }
                        committed += 1;
                    }
                    // The client sends its next entry at once.
                    c.outbuf.extend_from_slice(&one);
                    c.sent.push_back(now);
                }
                c.inbuf.drain(..acks * ACK);
            }
            write_out(c)?;
        }
        if last_tick.0.elapsed() >= Duration::from_millis(200) {
            let rate = (acked - last_tick.1) as f64 / last_tick.0.elapsed().as_secs_f64();
            let phase = if Instant::now() < measure_from {
                "warming up"
            } else {
                "measuring"
            };
            pb.set_message(format!("{clients} clients, {phase}: {rate:>9.0} commits/s"));
            pb.set_position(start.elapsed().as_millis() as u64);
            last_tick = (Instant::now(), acked);
        }
    }
    let cpu = cpu0.map_or(0.0, |c0| (super::cpu_time() - c0).as_secs_f64());
    Ok(Driven {
        committed,
        samples,
        leader_samples,
        client_cpu_s: cpu,
    })
}

/// What one load run measured.
struct Driven {
    committed: u64,
    /// Client-observed latencies.
    samples: Vec<Duration>,
    /// The leader's own proposal-to-commit times.
    leader_samples: Vec<Duration>,
    client_cpu_s: f64,
}

fn write_out(c: &mut Conn) -> std::io::Result<()> {
    let mut done = 0;
    while done < c.outbuf.len() {
        match c.stream.write(&c.outbuf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    c.outbuf.drain(..done);
    Ok(())
}

/// The client addresses of a running cluster's file (`--cluster`).
fn cluster_clients(path: &Path) -> Result<Vec<SocketAddr>, BenchError> {
    let cfg =
        crate::config::ClusterConfig::load(path).map_err(|e| BenchError::Usage(e.to_string()))?;
    Ok(cfg.replicas.iter().map(|r| r.client).collect())
}

/// Runs the benchmark.
pub fn run(
    args: &BenchArgs,
    ui: &Ui,
    out: &mut dyn Write,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<Status, BenchError> {
    if !matches!(args.replicas, 1 | 3 | 5 | 7 | 9) {
        return Err(BenchError::Usage(format!(
            "--replicas {}: a cluster has 1, 3, 5, 7 or 9 replicas",
            args.replicas
        )));
    }
    if args.size == 0 || args.size > crate::log::format::PAYLOAD_MAX {
        return Err(BenchError::Usage(format!(
            "--size {} is out of range",
            args.size
        )));
    }
    let sync = args.sync.clone().unwrap_or_else(|| "batch".into());
    if !matches!(sync.as_str(), "always" | "batch" | "never") {
        return Err(BenchError::Usage(format!(
            "--sync {sync:?}: choose always, batch or never"
        )));
    }
    let scratch_dir: PathBuf = args
        .dir
        .join(format!("falcon-bench-consensus-{}", std::process::id()));
    if args.netns && args.transport == "shm" {
        return Err(BenchError::Usage(
            "--transport shm keeps every replica on this host's shared memory; it does not go with --netns".into(),
        ));
    }
    if args.netns && args.cluster.is_some() {
        return Err(BenchError::Usage(
            "--netns starts its own cluster; it does not go with --cluster".into(),
        ));
    }
    if args.tls && (args.transport != "tcp" || args.cluster.is_some()) {
        return Err(BenchError::Usage(
            "--tls compares plain and TLS peer links of a cluster it starts: it goes with --transport tcp, not with --cluster".into(),
        ));
    }
    // Declared first, dropped last: after the replicas in it have stopped.
    let net = if args.netns {
        Some(Netns::new(args.replicas)?)
    } else {
        None
    };
    let warmup = Duration::from_millis(500).min(args.duration);
    // Removed last (each cluster's directory in it goes first).
    let _scratch_parent = args
        .cluster
        .is_none()
        .then(|| super::Scratch(scratch_dir.clone()));
    let modes: &[bool] = if args.tls { &[false, true] } else { &[false] };
    let mut rows = Vec::new();
    let mut leader = None;
    for &tls in modes {
        let (_procs, clients_addrs, scratch) = match &args.cluster {
            Some(path) => (Procs(Vec::new()), cluster_clients(path)?, None),
            None => {
                let scratch_dir = scratch_dir.join(if tls { "tls" } else { "tcp" });
                std::fs::create_dir_all(&scratch_dir)?;
                let scratch = super::Scratch(scratch_dir.clone());
                let (procs, addrs) = start_cluster(
                    &scratch_dir,
                    args.replicas,
                    &sync,
                    &args.transport,
                    args.poll,
                    ui,
                    net.as_ref(),
                    tls,
                )?;
                (procs, addrs, Some(scratch))
            }
        };
        let leader_now = find_leader(&clients_addrs, Duration::from_secs(20)).ok_or_else(|| {
            let logs = scratch
                .as_ref()
                .map(|s| {
                    (1..=args.replicas)
                        .map(|i| {
                            std::fs::read_to_string(s.0.join(format!("replica{i}.log")))
                                .unwrap_or_default()
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                })
                .unwrap_or_default();
            std::io::Error::other(format!(
                "no replica committed a probe entry within 20 s (for --cluster: are its replicas running with --null-program?)\n{logs}"
            ))
        })?;
        let client_counts = match args.clients {
            Some(c) if c > 0 => vec![c],
            Some(_) => return Err(BenchError::Usage("--clients must be at least 1".into())),
            None => vec![1, 256],
        };
        for &clients in &client_counts {
            let connections = args.connections.unwrap_or(8).clamp(1, clients);
            let pb = ui.progress_with(
                (warmup + args.duration).as_millis() as u64,
                "{msg} [{bar:40}] {elapsed}",
                &format!("{clients} clients"),
            );
            let pids: Vec<u32> = _procs.0.iter().map(Child::id).collect();
            let cpu_before: Option<f64> =
                (!pids.is_empty()).then(|| pids.iter().filter_map(|&p| process_cpu_s(p)).sum());
            // Replica CPU is read around the whole run; the warm-up is excluded by scaling.
            let t0 = Instant::now();
            let load = Load {
                leader: leader_now,
                clients,
                connections,
                size: args.size,
                warmup,
                duration: args.duration,
            };
            let Driven {
                committed,
                mut samples,
                mut leader_samples,
                client_cpu_s: client_cpu,
            } = drive(&load, &pb, stop)?;
            let total_secs = t0.elapsed().as_secs_f64();
            pb.finish_and_clear();
            let replica_cpu = cpu_before.map(|b| {
                let after: f64 = pids.iter().filter_map(|&p| process_cpu_s(p)).sum();
                (after - b) * (args.duration.as_secs_f64() / total_secs)
            });
            let per_1000 = |cpu: f64| cpu / committed.max(1) as f64 * 1000.0;
            rows.push(TcpRow {
                replicas: if args.cluster.is_some() {
                    clients_addrs.len()
                } else {
                    args.replicas
                },
                clients,
                connections,
                size: args.size,
                sync: if args.cluster.is_some() {
                    "(the cluster's)".into()
                } else {
                    sync.clone()
                },
                links: match args.transport.as_str() {
                    "tcp" if tls => "tcp+tls".into(),
                    t => t.into(),
                },
                commits_per_s: committed as f64 / args.duration.as_secs_f64(),
                latency: summarize(&mut samples),
                leader_latency: (!leader_samples.is_empty())
                    .then(|| summarize(&mut leader_samples)),
                replica_cpu_s_per_1000: replica_cpu.map(per_1000),
                client_cpu_s_per_1000: per_1000(client_cpu),
            });
        }
        leader = Some(leader_now);
    }
    let leader = leader.expect("one mode at least");
    let rtt = if args.compare {
        Some(super::rtt::local(64, 1_000, 10_000)?)
    } else {
        None
    };
    let mut setup = super::setup_lines(args.cluster.is_none().then_some(args.dir.as_path()));
    setup.push((
        "cluster".into(),
        match &args.cluster {
            Some(p) => format!("{} (already running), leader {leader}", p.display()),
            None => match &net {
                Some(n) => format!(
                    "{} `falcon replicate --null-program` processes, each in its own network namespace ({}-1..{}, veth pairs on a bridge, 10.78.{}.1-{}), TCP peer links, sync {sync}, leader {leader}",
                    args.replicas, n.tag, args.replicas, n.subnet, args.replicas
                ),
                None => format!(
                    "{} `falcon replicate --null-program` processes on 127.0.0.1-{}, {} peer links, sync {sync}, leader {leader}",
                    args.replicas,
                    args.replicas,
                    match args.transport.as_str() {
                        "shm" => format!("shared-memory (shm rings in /dev/shm, poll {})", format!("{:?}", args.poll).to_lowercase()),
                        "rdma" => format!("RDMA (one-sided writes into rings, RC queue pairs set up over TCP, poll {})", format!("{:?}", args.poll).to_lowercase()),
                        _ if args.tls => "TCP (plain, then mutual TLS 1.3 with ECDSA P-256 certificates; one cluster each, started in turn)".to_string(),
                        _ => "TCP".to_string(),
                    }
                ),
            },
        },
    ));
    setup.push((
        "load".into(),
        format!(
            "closed-loop clients (one entry outstanding each) sharing up to {} connections; {} B entries; {} measured after {} warm-up",
            args.connections.unwrap_or(8),
            args.size,
            humantime::format_duration(args.duration),
            humantime::format_duration(warmup)
        ),
    ));
    setup.push((
        "latency".into(),
        "from the client's write of an entry to its acknowledgement (the leader answers once a majority has it on disk, or in memory with sync never); leader: inside the leader, from proposing the entry to applying it (the round to the followers, without the client's hops)".into(),
    ));
    setup.push((
        "placement".into(),
        if args.netns {
            "all replicas and the load generator on this host, sharing its cores; the clients reach the leader over the bridge".into()
        } else {
            "all replicas and the load generator on this host, sharing its cores".into()
        },
    ));
    if ui.json {
        output::json_line(
            out,
            &json!({
                "setup": super::setup_json(&setup),
                "rows": rows,
                "rtt": rtt,
                "commit_p50_over_rtt_p50": rtt.as_ref().and_then(|r| rows.first().map(|row| row.latency.p50_us / r.rtt.p50_us)),
            }),
        )?;
        return Ok(Status::Success);
    }
    super::print_setup(out, &setup)?;
    let mut t = ui.table();
    t.set_header(vec![
        "replicas",
        "clients",
        "sync",
        "links",
        "commits/s",
        "p50 µs",
        "p99 µs",
        "p99.9 µs",
        "max µs",
        "leader p50 µs",
        "leader p99 µs",
        "replica CPU s/1k",
        "client CPU s/1k",
    ]);
    for r in &rows {
        t.add_row(vec![
            r.replicas.to_string(),
            r.clients.to_string(),
            r.sync.clone(),
            r.links.clone(),
            format!("{:.0}", r.commits_per_s),
            format!("{:.1}", r.latency.p50_us),
            format!("{:.1}", r.latency.p99_us),
            format!("{:.1}", r.latency.p999_us),
            format!("{:.1}", r.latency.max_us),
            r.leader_latency
                .as_ref()
                .map_or("-".into(), |l| format!("{:.1}", l.p50_us)),
            r.leader_latency
                .as_ref()
                .map_or("-".into(), |l| format!("{:.1}", l.p99_us)),
            r.replica_cpu_s_per_1000
                .map_or("-".into(), |c| format!("{c:.3}")),
            format!("{:.3}", r.client_cpu_s_per_1000),
        ]);
    }
    writeln!(out, "{t}")?;
    if let Some(r) = &rtt {
        writeln!(
            out,
            "TCP round trip on this host in the same run (bench --rtt --local, 64 B): p50 {:.1} µs, p99 {:.1} µs",
            r.rtt.p50_us, r.rtt.p99_us
        )?;
        for row in &rows {
            writeln!(
                out,
                "  {} clients: commit p50 = {:.1} × the round trip",
                row.clients,
                row.latency.p50_us / r.rtt.p50_us
            )?;
        }
    }
    Ok(Status::Success)
}
