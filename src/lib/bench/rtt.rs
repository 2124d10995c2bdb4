//! `falcon bench --rtt`: ping-pong with one message outstanding, perftest
//! style (`ib_write_lat`): the physical floor under one round of consensus.
//!
//! Two hosts: `--serve ADDR` on one, `--peer ADDR` on the other. One host:
//! `--local` runs both ends here. Over TCP the client first sends a header
//! (magic, message size, iterations), then every message is echoed back.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use serde_json::json;

use super::stats::{Summary, summarize};
use super::{BenchArgs, BenchError};
use crate::output::{self, Status, Ui};

const MAGIC: &[u8; 8] = b"FALCONRT";
/// The largest message --size accepts (and a server accepts).
pub const SIZE_MAX: usize = 16 << 20;
/// The most messages one session may ask a server to echo.
const ITERS_MAX: u64 = 1 << 32;

/// What one run measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RttResult {
    /// Transport used.
    pub transport: String,
    /// Network device the connection went through.
    pub device: String,
    /// Local and remote address.
    pub path: String,
    /// Message size, bytes.
    pub size: usize,
    /// Measured iterations (after the warm-up).
    pub iterations: usize,
    /// Round trip.
    pub rtt: Summary,
    /// One way (round trip / 2).
    pub one_way: Summary,
    /// Every round trip, ns (not serialised; for `--raw`).
    #[serde(skip)]
    pub samples_ns: Vec<u64>,
}

impl RttResult {
    /// Summarises the measured round trips (and their halves, one way).
    fn new(
        transport: String,
        device: String,
        path: String,
        size: usize,
        mut samples: Vec<Duration>,
    ) -> RttResult {
        let samples_ns = samples.iter().map(|d| d.as_nanos() as u64).collect();
        let mut halves: Vec<Duration> = samples.iter().map(|d| *d / 2).collect();
        RttResult {
            transport,
            device,
            path,
            size,
            iterations: samples.len(),
            rtt: summarize(&mut samples),
            one_way: summarize(&mut halves),
            samples_ns,
        }
    }
}

fn usage(msg: impl Into<String>) -> BenchError {
    BenchError::Usage(msg.into())
}

/// Checks the transport name: tcp and shm always, rdma in a build with the
/// `rdma` feature on a host with a device.
pub fn check_transport(name: &str) -> Result<(), BenchError> {
    match name {
        "tcp" | "shm" => Ok(()),
        #[cfg(feature = "rdma")]
        "rdma" => match crate::transport::rdma::verbs::device_names() {
            Ok(d) if !d.is_empty() => Ok(()),
            Ok(_) => Err(BenchError::NotBuilt(
                "--transport rdma is not available: no RDMA device on this host (load Soft-RoCE: modprobe rdma_rxe; rdma link add rxe0 type rxe netdev eth0)".into(),
            )),
            Err(e) => Err(BenchError::NotBuilt(format!(
                "--transport rdma is not available: {e}"
            ))),
        },
        "mem" => Err(usage(
            "--transport mem exists only inside one process (tests, --consensus): a round trip needs tcp, shm or rdma",
        )),
        #[cfg(not(feature = "rdma"))]
        "rdma" => Err(BenchError::NotBuilt(format!(
            "--transport rdma is not available: {}",
            rdma_absent_reason()
        ))),
        other => Err(usage(format!(
            "unknown transport {other:?}: choose tcp, shm or rdma"
        ))),
    }
}

/// Why RDMA cannot run here, in words.
#[cfg(not(feature = "rdma"))]
fn rdma_absent_reason() -> String {
    let devices = std::fs::read_dir("/sys/class/infiniband")
        .map(|d| d.count())
        .unwrap_or(0);
    if devices == 0 {
        "this host has no RDMA device (/sys/class/infiniband is empty or missing), and this falcon is built without the rdma feature (issue #6)".into()
    } else {
        "this falcon is built without the rdma feature (issue #6)".into()
    }
}

/// The network interface that carries traffic from local address `ip`.
fn device_of(ip: std::net::IpAddr) -> String {
    if ip.is_loopback() {
        return "lo (loopback)".into();
    }
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for a in addrs {
            let matches = a.address.as_ref().is_some_and(|s| {
                s.as_sockaddr_in()
                    .map(|v4| std::net::IpAddr::V4(v4.ip()) == ip)
                    .or_else(|| {
                        s.as_sockaddr_in6()
                            .map(|v6| std::net::IpAddr::V6(v6.ip()) == ip)
                    })
                    .unwrap_or(false)
            });
            if matches {
                return a.interface_name;
            }
        }
    }
    "unknown".into()
}

/// Serves echo sessions on `listener` until `stop` is set.
pub fn serve(
    listener: TcpListener,
    ui: &Ui,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<(), BenchError> {
    listener.set_nonblocking(true)?;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, peer)) => {
                stream.set_nonblocking(false)?;
                ui.detail(&format!("round-trip session from {peer}"));
                std::thread::spawn(move || {
                    let _ = echo_session(stream);
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// One client: header, then echo `iters` messages of `size` bytes.
fn echo_session(mut s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut head = [0u8; 8 + 4 + 8];
    s.read_exact(&mut head)?;
    let bad = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_string());
    if &head[..8] != MAGIC {
        return Err(bad("not a falcon round-trip client"));
    }
    let size = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes")) as usize;
    let iters = u64::from_le_bytes(head[12..20].try_into().expect("8 bytes"));
    if size == 0 || size > SIZE_MAX || iters > ITERS_MAX {
        return Err(bad("message size or count out of range"));
    }
    let mut buf = vec![0u8; size];
    for _ in 0..iters {
        s.read_exact(&mut buf)?;
        s.write_all(&buf)?;
    }
    Ok(())
}

/// Runs the client side against `addr`.
pub fn client(
    addr: SocketAddr,
    size: usize,
    warmup: usize,
    iters: usize,
    plain_echo: bool,
) -> Result<RttResult, BenchError> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("connecting to the round-trip server at {addr}: {e} (is `falcon bench --rtt --serve {addr}` running there?)"),
        )
    })?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    if !plain_echo {
        let mut head = MAGIC.to_vec();
        head.extend_from_slice(&(size as u32).to_le_bytes());
        head.extend_from_slice(&((warmup + iters) as u64).to_le_bytes());
        s.write_all(&head)?;
    }
    let msg = vec![0x5au8; size];
    let mut back = vec![0u8; size];
    let mut samples = Vec::with_capacity(iters);
    for i in 0..warmup + iters {
        let t = Instant::now();
        s.write_all(&msg)?;
        s.read_exact(&mut back)?;
        if i >= warmup {
            samples.push(t.elapsed());
        }
    }
    let local = s.local_addr()?;
    Ok(RttResult::new(
        "tcp".into(),
        device_of(local.ip()),
        format!("{local} -> {addr}"),
        size,
        samples,
    ))
}

/// `--local`: both ends on this host, the server a second `falcon` process
/// (as replicas are), so the round trip crosses processes the way a
/// replica's messages do.
pub fn local(size: usize, warmup: usize, iters: usize) -> Result<RttResult, BenchError> {
    let exe = std::env::current_exe()?;
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut server = std::process::Command::new(exe)
        .args(["-q", "bench", "--rtt", "--serve", &addr.to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let up = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        TcpStream::connect(addr).is_ok()
    });
    let r = if up {
        client(addr, size, warmup, iters, false)
    } else {
        Err(std::io::Error::other("the round-trip server process did not start").into())
    };
    let _ = server.kill();
    let _ = server.wait();
    r
}

/// Both ends in this process (the server on a thread): for tests, whose
/// executable is not falcon.
pub fn in_process(size: usize, warmup: usize, iters: usize) -> Result<RttResult, BenchError> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        let (s, _) = listener.accept()?;
        echo_session(s)
    });
    let r = client(addr, size, warmup, iters, false);
    let _ = server.join();
    r
}

/// sockperf's own TCP ping-pong on this host, as a reference (one way = RTT/2,
/// as sockperf reports it). None when sockperf is not installed.
pub fn sockperf_reference(size: usize, seconds: u32) -> Option<Result<Summary, String>> {
    use std::process::{Command, Stdio};
    if Command::new("sockperf")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_err()
    {
        return None;
    }
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .ok()?;
    let mut server = match Command::new("sockperf")
        .args([
            "server",
            "--tcp",
            "-i",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return Some(Err(format!("starting sockperf server: {e}"))),
    };
    let up = (0..50).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let result = if up {
        Command::new("sockperf")
            .args([
                "ping-pong",
                "--tcp",
                "-i",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .args(["-m", &size.max(14).to_string(), "-t", &seconds.to_string()])
            .output()
            .map_err(|e| format!("running sockperf ping-pong: {e}"))
            .and_then(|o| parse_sockperf(&String::from_utf8_lossy(&o.stdout)))
    } else {
        Err("sockperf server did not start".into())
    };
    let _ = server.kill();
    let _ = server.wait();
    Some(result)
}

/// Reads min, median, average, stdev, 99%, 99.9% and max from sockperf's summary.
fn parse_sockperf(text: &str) -> Result<Summary, String> {
    let num = |line: &str| -> Option<f64> {
        line.rsplit(['=', ' '])
            .find(|t| !t.is_empty())
            .and_then(|t| t.trim().parse().ok())
    };
    let mut s = Summary::default();
    for line in text.lines() {
        let l = line.trim();
        if let Some(rest) = l.split("avg-latency=").nth(1) {
            let mut it = rest.split(|c: char| !(c.is_ascii_digit() || c == '.'));
            s.avg_us = it.next().and_then(|x| x.parse().ok()).unwrap_or(0.0);
            if let Some(sd) = rest.split("std-dev=").nth(1) {
                s.stdev_us = sd
                    .split(|c: char| !(c.is_ascii_digit() || c == '.'))
                    .next()
                    .and_then(|x| x.parse().ok())
                    .unwrap_or(0.0);
            }
        } else if l.contains("<MAX> observation") {
            s.max_us = num(l).unwrap_or(0.0);
        } else if l.contains("<MIN> observation") {
            s.min_us = num(l).unwrap_or(0.0);
        } else if l.contains("percentile 50.000") {
            s.p50_us = num(l).unwrap_or(0.0);
        } else if l.contains("percentile 99.000") {
            s.p99_us = num(l).unwrap_or(0.0);
        } else if l.contains("percentile 99.900") {
            s.p999_us = num(l).unwrap_or(0.0);
        } else if let Some(rest) = l.split("Total ").nth(1) {
            s.samples = rest
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|x| x.parse().ok())
                .unwrap_or(0);
        }
    }
    if s.p50_us <= 0.0 {
        return Err(format!("could not read sockperf's output: {text}"));
    }
    Ok(s)
}

/// `--transport shm --local`: engine messages (a Prepare carrying one entry
/// of `size` bytes) over the shm transport between two endpoints, the echo
/// side on a thread, waiting as `poll` says.
pub fn shm_local(
    size: usize,
    warmup: usize,
    iters: usize,
    poll: crate::transport::shm::PollMode,
) -> Result<RttResult, BenchError> {
    use crate::transport::shm::{ShmOptions, ShmTransport};
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        std::path::PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("falcon-rtt-{}", std::process::id()));
    let mk = |id| {
        let mut o = ShmOptions::new(0x5117, id, 2, dir.clone());
        o.ring_bytes = (4 * size + (1 << 20)).next_power_of_two();
        o.poll = poll;
        ShmTransport::bind(o)
    };
    let a = mk(0)?;
    let b = mk(1)?;
    let samples = echo_pair(a, b, size, warmup, iters, "shm", 0x5117)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(RttResult::new(
        format!("shm (poll {poll:?})").to_lowercase(),
        format!("shared memory ({})", base.display()),
        format!("{} (ring files, echo on a thread)", dir.display()),
        size,
        samples,
    ))
}

/// `--rtt --transport rdma --local`: two rdma endpoints in this process
/// (the echo on a thread), their queue pairs set up over loopback TCP.
#[cfg(feature = "rdma")]
pub fn rdma_local(
    size: usize,
    warmup: usize,
    iters: usize,
    poll: crate::transport::shm::PollMode,
) -> Result<RttResult, BenchError> {
    use crate::transport::Transport;
    use crate::transport::rdma::{RdmaOptions, RdmaTransport};
    let ports: Vec<TcpListener> = (0..2)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()?;
    let addrs: Vec<_> = ports
        .iter()
        .map(|l| l.local_addr())
        .collect::<Result<_, _>>()?;
    drop(ports);
    let mut key = vec![0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut key)?;
    let mk = |id| {
        let mut o = RdmaOptions::new(0x5117, id, addrs.clone(), key.clone());
        o.ring_bytes = (4 * size + (1 << 20)).next_power_of_two();
        o.poll = poll;
        RdmaTransport::bind(o)
            .map_err(|e| BenchError::NotBuilt(format!("--transport rdma is not available: {e}")))
    };
    let mut a = mk(0)?;
    let mut b = mk(1)?;
    let device = a.device().to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    while a.connected().is_empty() || b.connected().is_empty() {
        if Instant::now() > deadline {
            return Err(
                std::io::Error::other("the rdma queue pairs did not connect within 20 s").into(),
            );
        }
        let mut sink = Vec::new();
        a.recv(Duration::from_millis(1), &mut sink)?;
        b.recv(Duration::from_millis(1), &mut sink)?;
    }
    let samples = echo_pair(a, b, size, warmup, iters, "rdma", 0x5117)?;
    Ok(RttResult::new(
        format!("rdma (poll {poll:?})").to_lowercase(),
        format!("RDMA device {device}"),
        format!(
            "RC queue pair, one-sided writes; set up over {} and {}",
            addrs[0], addrs[1]
        ),
        size,
        samples,
    ))
}

/// Round trips between two endpoints of one transport: `b` echoes on a
/// thread, `a` measures one message outstanding.
fn echo_pair<T: crate::transport::Transport + Send + 'static>(
    mut a: T,
    mut b: T,
    size: usize,
    warmup: usize,
    iters: usize,
    what: &'static str,
    cluster: u64,
) -> Result<Vec<Duration>, BenchError> {
    use crate::consensus::{Envelope, Message};
    let total = warmup + iters;
    let server = std::thread::spawn(move || -> std::io::Result<T> {
        let mut inbox = Vec::new();
        let mut echoed = 0;
        let started = Instant::now();
        while echoed < total && started.elapsed() < Duration::from_secs(120) {
            b.recv(Duration::from_millis(100), &mut inbox)?;
            for mut env in inbox.drain(..) {
                std::mem::swap(&mut env.from, &mut env.to);
                let _ = b.send(&env);
                b.flush();
                echoed += 1;
            }
        }
        Ok(b)
    });
    let msg = Message::Prepare {
        view: 1,
        op_start: 1,
        entries: vec![crate::log::Entry {
            view: 1,
            op: 1,
            kind: crate::log::Kind::Data,
            conn: 1,
            time_ns: 0,
            payload: vec![0x5a; size].into(),
        }],
        commit: 0,
    };
    let env = Envelope {
        cluster,
        from: 0,
        to: 1,
        msg,
    };
    let mut samples = Vec::with_capacity(iters);
    let mut got = Vec::new();
    for i in 0..total {
        let t = Instant::now();
        a.send(&env)
            .map_err(|e| std::io::Error::other(format!("{what} send: {e}")))?;
        a.flush();
        got.clear();
        while got.is_empty() {
            if t.elapsed() > Duration::from_secs(10) {
                return Err(
                    std::io::Error::other(format!("no echo over {what} within 10 s")).into(),
                );
            }
            a.recv(Duration::from_millis(100), &mut got)?;
        }
        if i >= warmup {
            samples.push(t.elapsed());
        }
    }
    let b = server
        .join()
        .map_err(|_| std::io::Error::other("the echo thread panicked"))??;
    // The echo side goes first: it may still hold a message for `a`.
    drop(b);
    drop(a);
    Ok(samples)
}

/// A latency histogram for the terminal: log-spaced buckets, one bar each.
pub fn histogram(samples_ns: &[u64], width: usize) -> Vec<String> {
    if samples_ns.is_empty() {
        return Vec::new();
    }
    let min = *samples_ns.iter().min().expect("not empty") as f64;
    let max = *samples_ns.iter().max().expect("not empty") as f64;
    let buckets = 12usize;
    let (lo, hi) = (min.max(1.0).ln(), (max.max(1.0) * 1.0001).ln());
    let step = ((hi - lo) / buckets as f64).max(1e-9);
    let mut counts = vec![0usize; buckets];
    for &s in samples_ns {
        let i = (((s.max(1) as f64).ln() - lo) / step) as usize;
        counts[i.min(buckets - 1)] += 1;
    }
    let most = *counts.iter().max().expect("buckets").max(&1);
    counts
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            let from = (lo + step * i as f64).exp() / 1e3;
            let to = (lo + step * (i + 1) as f64).exp() / 1e3;
            let bar = "#".repeat((c * width).div_ceil(most));
            format!("{from:>9.1} – {to:>9.1} µs {c:>8} {bar}")
        })
        .collect()
}

/// Runs `falcon bench --rtt`.
pub fn run(
    args: &BenchArgs,
    ui: &Ui,
    out: &mut dyn Write,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<Status, BenchError> {
    check_transport(&args.transport)?;
    if args.size == 0 || args.size > SIZE_MAX {
        return Err(usage(format!(
            "--size {} is out of range: 1 to {SIZE_MAX} bytes",
            args.size
        )));
    }
    if args.iters == 0 {
        return Err(usage("--iters must be at least 1"));
    }
    let modes = [args.serve.is_some(), args.peer.is_some(), args.local]
        .iter()
        .filter(|&&m| m)
        .count();
    if modes != 1 {
        return Err(usage(
            "choose one: --local (both ends here), --serve ADDR (this host answers) or --peer ADDR (this host measures against a --serve)",
        ));
    }
    if let Some(addr) = args.serve {
        let listener = TcpListener::bind(addr)
            .map_err(|e| std::io::Error::new(e.kind(), format!("listening on {addr}: {e}")))?;
        ui.note(&format!(
            "serving round trips on {}; on the other host: falcon bench --rtt --peer {} (Ctrl-C stops)",
            listener.local_addr()?,
            listener.local_addr()?
        ));
        serve(listener, ui, stop)?;
        return Ok(Status::Success);
    }
    if args.transport != "tcp" && !args.local {
        return Err(usage(format!(
            "--transport {} measures on one host: use --local (--serve/--peer are for tcp between hosts)",
            args.transport
        )));
    }
    let r = match args.peer {
        Some(addr) => client(addr, args.size, args.warmup, args.iters, args.plain_echo)?,
        None if args.transport == "shm" => {
            shm_local(args.size, args.warmup, args.iters, args.poll)?
        }
        #[cfg(feature = "rdma")]
        None if args.transport == "rdma" => {
            rdma_local(args.size, args.warmup, args.iters, args.poll)?
        }
        None => local(args.size, args.warmup, args.iters)?,
    };
    if let Some(path) = &args.raw {
        let mut f = std::io::BufWriter::new(std::fs::File::create(path).map_err(|e| {
            std::io::Error::new(e.kind(), format!("creating {}: {e}", path.display()))
        })?);
        writeln!(f, "rtt_ns")?;
        for s in &r.samples_ns {
            writeln!(f, "{s}")?;
        }
        f.flush()?;
    }
    report(&r, args, ui, out)?;
    Ok(Status::Success)
}

fn setup_of(r: &RttResult, args: &BenchArgs) -> Vec<(String, String)> {
    let mut setup = super::setup_lines(None);
    setup.push((
        "transport".into(),
        format!("{} via {}", r.transport, r.device),
    ));
    setup.push(("path".into(), r.path.clone()));
    setup.push((
        "mode".into(),
        if args.local {
            "--local: both ends on this host, the server a second falcon process (blocking sockets, TCP_NODELAY)".into()
        } else {
            "--peer: against a --serve on another host".into()
        },
    ));
    setup.push((
        "load".into(),
        format!(
            "{} B messages, one outstanding, {} iterations after {} warm-up",
            r.size, r.iterations, args.warmup
        ),
    ));
    setup
}

/// Prints one result, perftest style.
pub fn report(
    r: &RttResult,
    args: &BenchArgs,
    ui: &Ui,
    out: &mut dyn Write,
) -> Result<(), BenchError> {
    let mut setup = setup_of(r, args);
    let reference = if args.local && args.transport == "tcp" {
        sockperf_reference(r.size, 2)
    } else {
        None
    };
    match &reference {
        Some(Ok(_)) => setup.push((
            "reference".into(),
            "sockperf ping-pong --tcp on 127.0.0.1, same size, 2 s, in the same run (it reports one way = RTT/2)".into(),
        )),
        Some(Err(e)) => setup.push(("reference".into(), format!("sockperf failed: {e}"))),
        None if args.local && args.transport == "tcp" => setup.push((
            "reference".into(),
            "none: sockperf is not installed (apt-get install sockperf)".into(),
        )),
        None => {}
    }
    let reference = reference.and_then(Result::ok);
    if ui.json {
        output::json_line(
            out,
            &json!({"setup": super::setup_json(&setup), "result": r, "sockperf_one_way": reference}),
        )?;
        return Ok(());
    }
    super::print_setup(out, &setup)?;
    let mut t = ui.table();
    t.set_header(vec![
        "",
        "#bytes",
        "#iters",
        "t_min µs",
        "t_typical µs",
        "t_avg µs",
        "t_stdev µs",
        "99% µs",
        "99.9% µs",
        "t_max µs",
    ]);
    let mut rows = vec![
        ("falcon: round trip", &r.rtt, r.iterations),
        ("falcon: one way (RTT/2)", &r.one_way, r.iterations),
    ];
    if let Some(s) = &reference {
        rows.push(("sockperf: one way (RTT/2)", s, s.samples));
    }
    for (name, s, iters) in rows {
        t.add_row(vec![
            name.to_string(),
            r.size.to_string(),
            iters.to_string(),
            format!("{:.2}", s.min_us),
            format!("{:.2}", s.p50_us),
            format!("{:.2}", s.avg_us),
            format!("{:.2}", s.stdev_us),
            format!("{:.2}", s.p99_us),
            format!("{:.2}", s.p999_us),
            format!("{:.2}", s.max_us),
        ]);
    }
    writeln!(out, "{t}")?;
    writeln!(out, "round trips:")?;
    for line in histogram(&r.samples_ns, 40) {
        writeln!(out, "  {line}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_shm_round_trip_is_measured() {
        let r = shm_local(64, 10, 300, crate::transport::shm::PollMode::Adaptive).unwrap();
        assert_eq!(r.samples_ns.len(), 300);
        assert!(r.rtt.min_us > 0.0 && r.rtt.min_us <= r.rtt.p50_us);
        assert!(r.transport.starts_with("shm"));
    }

    #[test]
    fn histogram_counts_every_sample() {
        let s: Vec<u64> = (1..=1000).map(|i| i * 1000).collect();
        let h = histogram(&s, 20);
        let total: usize = h
            .iter()
            .map(|l| {
                l.split_whitespace()
                    .nth(4)
                    .and_then(|c| c.parse::<usize>().ok())
                    .unwrap()
            })
            .sum();
        assert_eq!(total, 1000);
    }

    #[test]
    fn a_local_round_trip_is_measured() {
        let r = in_process(64, 10, 200).unwrap();
        assert_eq!(r.iterations, 200);
        assert_eq!(r.samples_ns.len(), 200);
        assert!(r.rtt.min_us > 0.0 && r.rtt.min_us <= r.rtt.p50_us);
        assert!((r.one_way.p50_us * 2.0 - r.rtt.p50_us).abs() < 0.01);
        assert_eq!(r.device, "lo (loopback)");
    }

    #[test]
    fn sockperf_output_is_read() {
        let text = "sockperf: ====> avg-latency=38.112 (std-dev=17.980)\n\
            sockperf: Total 20318 observations; each percentile contains 203.18 observations\n\
            sockperf: ---> <MAX> observation = 2067.332\n\
            sockperf: ---> percentile 99.900 =   80.750\n\
            sockperf: ---> percentile 99.000 =   58.633\n\
            sockperf: ---> percentile 50.000 =   37.604\n\
            sockperf: ---> <MIN> observation =    2.549\n";
        let s = parse_sockperf(text).unwrap();
        assert_eq!(
            (s.samples, s.min_us, s.p50_us, s.p99_us, s.p999_us, s.max_us),
            (20318, 2.549, 37.604, 58.633, 80.75, 2067.332)
        );
        assert_eq!((s.avg_us, s.stdev_us), (38.112, 17.98));
        assert!(parse_sockperf("nothing").is_err());
    }

    #[test]
    fn garbage_is_refused_by_the_server() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            echo_session(s)
        });
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let r = t.join().unwrap();
        assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::InvalidData);
    }
}
