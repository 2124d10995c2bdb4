//! `falcon failover drill`: kill a replica with SIGKILL under load, round
//! after round; measure detection, election and first commit; start it
//! again, wait for it to catch up, and check that no write a client saw
//! acknowledged is missing.
//!
//! The load is a checker: a few connections that each append numbered items
//! to a Redis list of their own (`RPUSH`), one at a time, and remember which
//! ones were acknowledged. After each round, every acknowledged item must be
//! in the list the (new) leader serves.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{FailoverError, Seen, leader_of, survey};
use crate::admin::{self, NodeStatus};
use crate::config::ClusterConfig;
use crate::log::now_ns;
use crate::output::{self, Status, Ui};

/// Which replica a round kills.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Victim {
    /// The leader: a real failover.
    Leader,
    /// A follower: the service must not notice.
    Follower,
    /// Either, at random.
    Random,
}

/// `falcon failover drill`.
#[derive(Debug, clap::Args)]
pub struct DrillArgs {
    /// A cluster the operator started on this host (its replicas run
    /// redis-server); without it the drill starts its own 3-replica Redis
    /// cluster on 127.0.0.1 and removes it afterwards.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Which replica each round kills.
    #[arg(long, value_enum, value_name = "WHICH", default_value_t = Victim::Leader)]
    pub kill: Victim,

    /// Rounds.
    #[arg(long, value_name = "N", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub rounds: u32,

    /// The drill's own cluster: its election timeout.
    #[arg(long, value_name = "DURATION", default_value = "150ms", value_parser = humantime::parse_duration, conflicts_with = "config")]
    pub election_timeout: Duration,

    /// Checker connections writing during the drill.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub clients: u32,

    /// Writes per second the checker connections send together, at most
    /// (0: as fast as the cluster answers). Headroom matters: a replica that
    /// restarts replays the log into its program and must apply faster
    /// than the cluster commits to catch up.
    #[arg(long, value_name = "N", default_value_t = 500)]
    pub rate: u32,

    /// Load before each kill.
    #[arg(long, value_name = "DURATION", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub settle: Duration,

    /// A round that has not recovered after this long fails (a restarted
    /// replica replays the whole log into a fresh program: this grows with
    /// the log).
    #[arg(long, value_name = "DURATION", default_value = "120s", value_parser = humantime::parse_duration)]
    pub round_timeout: Duration,

    /// The drill's own cluster: keep its directory (logs, data) afterwards,
    /// and its replicas running when a round fails.
    #[arg(long, conflicts_with = "config")]
    pub keep: bool,
}

/// `--help` text after the options.
pub const DRILL_HELP: &str = "\
Each round: checker clients write (Redis RPUSH of numbered items, each
acknowledgement remembered); after --settle, one replica is killed with
SIGKILL; the drill measures
  detect   kill → a surviving replica starts a view change
  elect    kill → a new leader leads (a majority agreed on its view)
  commit   kill → the new leader's first commit (the failover time)
  client   kill → the first write acknowledged by the new leader
then starts the killed replica again (same command, directory, environment
and network namespace), waits until it has caught up, and checks on the
leader that every acknowledged item is in its list. Exit status 1 when a
round fails or an acknowledged write is missing.

Examples:
  falcon failover drill --rounds 50
  falcon failover drill --rounds 50 --election-timeout 20ms --json
  falcon failover drill --config cluster.toml --kill random --rounds 10";

/// One round's results.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Round {
    /// Its number, from 1.
    pub round: u32,
    /// The replica killed.
    pub killed: u32,
    /// Whether it was the leader.
    pub was_leader: bool,
    /// The leader afterwards.
    pub leader: u32,
    /// kill → first view change on a survivor, ms (leader kills).
    pub detect_ms: Option<f64>,
    /// kill → a new leader, ms (leader kills).
    pub elect_ms: Option<f64>,
    /// kill → the new leader's first commit, ms (leader kills).
    pub commit_ms: Option<f64>,
    /// kill → first client write acknowledged after the takeover, ms.
    pub client_ms: Option<f64>,
    /// restart → the killed replica has applied everything committed when it started, ms.
    pub catch_up_ms: Option<f64>,
    /// View changes while the killed replica came back (0 when it rejoined
    /// without disturbing the leader).
    pub rejoin_view_changes: u64,
    /// Writes acknowledged to the checker in this round.
    pub acked: u64,
    /// Of those, missing on the leader afterwards.
    pub lost: u64,
    /// Why the round failed, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Percentiles of one measure over the rounds.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Spread {
    /// Rounds with a value.
    pub n: usize,
    /// Median, ms.
    pub p50_ms: f64,
    /// 90th percentile, ms.
    pub p90_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Largest, ms.
    pub max_ms: f64,
}

fn spread(mut v: Vec<f64>) -> Option<Spread> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let pct = |p: f64| v[((n as f64 * p).ceil() as usize).clamp(1, n) - 1];
    Some(Spread {
        n,
        p50_ms: pct(0.5),
        p90_ms: pct(0.9),
        p99_ms: pct(0.99),
        max_ms: v[n - 1],
    })
}

/// How to start a replica again exactly as it was started.
struct Launch {
    exe: PathBuf,
    argv: Vec<OsString>,
    cwd: PathBuf,
    env: Vec<(OsString, OsString)>,
    /// Its network namespace, when it is not ours.
    netns: Option<OwnedFd>,
}

/// One replica of the cluster under drill.
struct Member {
    id: u32,
    data_dir: PathBuf,
    launch: Option<Launch>,
    /// Started by the drill (reaped by it).
    child: Option<Child>,
}

/// Reads how process `pid` was started from /proc.
fn launch_of(pid: u32) -> std::io::Result<Launch> {
    use std::os::unix::ffi::OsStringExt;
    use std::os::unix::fs::MetadataExt;
    let p = PathBuf::from(format!("/proc/{pid}"));
    let exe = std::fs::read_link(p.join("exe"))?;
    let split = |b: Vec<u8>| -> Vec<OsString> {
        b.split(|&c| c == 0)
            .filter(|s| !s.is_empty())
            .map(|s| OsString::from_vec(s.to_vec()))
            .collect()
    };
    // Arguments may be empty (`--save ""`): split on NUL, dropping only the last one.
    let argv = {
        let mut b = std::fs::read(p.join("cmdline"))?;
        if b.last() == Some(&0) {
            b.pop();
        }
        b.split(|&c| c == 0)
            .map(|s| OsString::from_vec(s.to_vec()))
            .collect::<Vec<_>>()
    };
    let cwd = std::fs::read_link(p.join("cwd"))?;
    let env = split(std::fs::read(p.join("environ"))?)
        .into_iter()
        .filter_map(|kv| {
            let b = kv.into_vec();
            let eq = b.iter().position(|&c| c == b'=')?;
            Some((
                OsString::from_vec(b[..eq].to_vec()),
                OsString::from_vec(b[eq + 1..].to_vec()),
            ))
        })
        .collect();
    let theirs = std::fs::metadata(p.join("ns/net"));
    let ours = std::fs::metadata("/proc/self/ns/net");
    let netns = match (theirs, ours) {
        (Ok(t), Ok(o)) if t.ino() != o.ino() || t.dev() != o.dev() => {
            Some(OwnedFd::from(std::fs::File::open(p.join("ns/net"))?))
        }
        _ => None,
    };
    Ok(Launch {
        exe,
        argv,
        cwd,
        env,
        netns,
    })
}

/// falcon processes working in `dir` (the drill's own replicas).
fn drill_processes(dir: &Path) -> Vec<u32> {
    let exe = std::env::current_exe().ok();
    std::fs::read_dir("/proc")
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter(|&pid| pid != std::process::id())
                .filter(|pid| {
                    let p = PathBuf::from(format!("/proc/{pid}"));
                    std::fs::read_link(p.join("cwd")).is_ok_and(|c| c == dir)
                        && std::fs::read_link(p.join("exe")).ok() == exe
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Whether process `pid` is gone (or a zombie nobody reaped yet).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // "pid (comm) S …": the state follows the last ')'.
        Ok(s) => s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

impl Member {
    fn start(&mut self, log: &Path) -> std::io::Result<()> {
        let l = self
            .launch
            .as_ref()
            .ok_or_else(|| std::io::Error::other("no launch recorded"))?;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let mut cmd = Command::new(&l.exe);
        cmd.args(l.argv.iter().skip(1))
            .current_dir(&l.cwd)
            .env_clear()
            .envs(l.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f);
        let netns = l.netns.as_ref().map(|ns| ns.as_raw_fd());
        // SAFETY: setsid and setns only; between fork and exec nothing else runs.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || {
                // A session of its own: a Ctrl-C that stops the drill must
                // not stop the replicas it started again.
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(fd) = netns {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        self.child = Some(cmd.spawn()?);
        Ok(())
    }

    /// SIGKILL to falcon (its program gets SIGTERM from the kernel).
    fn kill(&mut self, pid: u32) {
        // SAFETY: a plain kill(2).
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
        if let Some(c) = &mut self.child {
            if c.id() == pid {
                let _ = c.wait();
                self.child = None;
            }
        }
    }
}

/// Acknowledged items per (round, writer), with when each was acknowledged.
type Acked = Arc<Mutex<HashMap<(u64, u32), Vec<(u64, u64)>>>>;

/// The checker: connections that append numbered items to their own lists.
struct Checker {
    round: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    acked: Acked,
    /// The first acknowledgement at or after `watch_from` (ns since the epoch).
    watch_from: Arc<AtomicU64>,
    first_after: Arc<AtomicU64>,
    /// The round each writer is writing now (u64::MAX: between writes).
    writing: Arc<Vec<AtomicU64>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    prefix: String,
}

/// Encodes one Redis command.
fn resp(args: &[&str]) -> Vec<u8> {
    let mut s = format!("*{}\r\n", args.len());
    for a in args {
        s.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.into_bytes()
}

/// Reads one reply line (`:5`, `+OK`, `-ERR …`).
fn reply_line(r: &mut impl BufRead) -> std::io::Result<String> {
    let mut l = String::new();
    if r.read_line(&mut l)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(l.trim_end().to_string())
}

fn key(prefix: &str, round: u64, writer: u32) -> String {
    format!("{prefix}:{round}:{writer}")
}

impl Checker {
    fn start(clients: &[SocketAddr], writers: u32, rate: u32) -> Checker {
        // Each writer's time between two writes.
        let gap = if rate == 0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(f64::from(writers) / f64::from(rate))
        };
        let prefix = format!("falcon-drill:{}:{}", std::process::id(), now_ns());
        let mut c = Checker {
            round: Arc::new(AtomicU64::new(1)),
            stop: Arc::new(AtomicBool::new(false)),
            acked: Arc::default(),
            watch_from: Arc::new(AtomicU64::new(u64::MAX)),
            first_after: Arc::new(AtomicU64::new(u64::MAX)),
            writing: Arc::new((0..writers).map(|_| AtomicU64::new(u64::MAX)).collect()),
            threads: Vec::new(),
            prefix,
        };
        for w in 0..writers {
            let (round, stop, acked, watch, first, writing, clients, prefix) = (
                c.round.clone(),
                c.stop.clone(),
                c.acked.clone(),
                c.watch_from.clone(),
                c.first_after.clone(),
                c.writing.clone(),
                clients.to_vec(),
                c.prefix.clone(),
            );
            c.threads.push(std::thread::spawn(move || {
                let mut seq = 0u64;
                let mut at = w as usize;
                let mut conn: Option<(TcpStream, BufReader<TcpStream>)> = None;
                let mut next_at = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    if !gap.is_zero() {
                        let now = Instant::now();
                        if next_at > now {
                            std::thread::sleep(next_at - now);
                        }
                        next_at = next_at.max(now) + gap;
                    }
                    if conn.is_none() {
                        let addr = clients[at % clients.len()];
                        at += 1;
                        conn = TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                            .ok()
                            .and_then(|s| {
                                s.set_nodelay(true).ok()?;
                                s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
                                let r = BufReader::new(s.try_clone().ok()?);
                                Some((s, r))
                            });
                        if conn.is_none() {
                            std::thread::sleep(Duration::from_millis(5));
                            continue;
                        }
                    }
                    let r = round.load(Ordering::Acquire);
                    writing[w as usize].store(r, Ordering::Release);
                    seq += 1;
                    let (s, rd) = conn.as_mut().expect("connected");
                    let k = key(&prefix, r, w);
                    let ok = s
                        .write_all(&resp(&["RPUSH", &k, &seq.to_string()]))
                        .and_then(|_| reply_line(rd))
                        .is_ok_and(|l| l.starts_with(':'));
                    if ok {
                        let t = now_ns();
                        acked
                            .lock()
                            .expect("checker lock")
                            .entry((r, w))
                            .or_default()
                            .push((seq, t));
                        if t >= watch.load(Ordering::Acquire) {
                            first.fetch_min(t, Ordering::AcqRel);
                        }
                    } else {
                        // Closed, reset, refused or unanswered: not
                        // acknowledged; try the next replica.
                        conn = None;
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    writing[w as usize].store(u64::MAX, Ordering::Release);
                }
            }));
        }
        c
    }

    /// Starts watching for the first acknowledgement from now on.
    fn watch(&self, from_ns: u64) {
        self.first_after.store(u64::MAX, Ordering::Release);
        self.watch_from.store(from_ns, Ordering::Release);
    }

    fn first_ack(&self) -> Option<u64> {
        Some(self.first_after.load(Ordering::Acquire)).filter(|&t| t != u64::MAX)
    }

    /// Moves the writers to round `r`'s lists and waits until none writes an older one.
    /// False when a writer is still on an older round after 5 s (its
    /// acknowledgements could then escape the check).
    fn next_round(&self, r: u64) -> bool {
        self.round.store(r, Ordering::Release);
        let t = Instant::now();
        while self.writing.iter().any(|w| w.load(Ordering::Acquire) < r) {
            if t.elapsed() > Duration::from_secs(5) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// Items of round `r` acknowledged, how many of them the cluster lost
    /// (read back through `clients`; the lists are deleted afterwards), and
    /// the first acknowledgement at or after `after_ns`.
    fn verify(
        &self,
        r: u64,
        clients: &[SocketAddr],
        after_ns: u64,
    ) -> Result<(u64, u64, Option<u64>), String> {
        let acked: Vec<(u32, Vec<(u64, u64)>)> = {
            let mut m = self.acked.lock().expect("checker lock");
            let keys: Vec<(u64, u32)> = m.keys().filter(|k| k.0 == r).copied().collect();
            keys.into_iter()
                .filter_map(|k| m.remove(&k).map(|v| (k.1, v)))
                .collect()
        };
        let (mut total, mut lost) = (0, 0);
        let first = acked
            .iter()
            .flat_map(|(_, items)| items.iter().map(|&(_, t)| t))
            .filter(|&t| t >= after_ns)
            .min();
        for (w, items) in acked {
            let k = key(&self.prefix, r, w);
            let have = retrying(|| read_list(clients, &k))?;
            let have: std::collections::HashSet<u64> = have.into_iter().collect();
            total += items.len() as u64;
            lost += items.iter().filter(|(i, _)| !have.contains(i)).count() as u64;
            let _ = retrying(|| {
                clients
                    .iter()
                    .find_map(|&a| crate::bench::redis_bench::resp_command(a, &["DEL", &k]))
                    .ok_or_else(|| "no replica answered DEL".to_string())
            });
        }
        Ok((total, lost, first))
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Tries `f` on the replicas until one answers, for up to 10 s (a view
/// change may be under way: connections close, followers refuse).
fn retrying<T>(mut f: impl FnMut() -> Result<T, String>) -> Result<T, String> {
    let t = Instant::now();
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if t.elapsed() > Duration::from_secs(10) => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// LRANGE key 0 -1 through whichever replica answers, as numbers.
fn read_list(clients: &[SocketAddr], key: &str) -> Result<Vec<u64>, String> {
    let mut last = String::from("no replica");
    for addr in clients {
        let r = (|| -> std::io::Result<Vec<u64>> {
            let mut s = TcpStream::connect_timeout(addr, Duration::from_millis(500))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(&resp(&["LRANGE", key, "0", "-1"]))?;
            let mut r = BufReader::new(s);
            let head = reply_line(&mut r)?;
            let n: i64 = head
                .strip_prefix('*')
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| std::io::Error::other(format!("LRANGE answered {head:?}")))?;
            let mut items = Vec::with_capacity(n.max(0) as usize);
            for _ in 0..n.max(0) {
                let len: usize = reply_line(&mut r)?
                    .strip_prefix('$')
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| std::io::Error::other("not a bulk string"))?;
                let mut b = vec![0u8; len + 2];
                r.read_exact(&mut b)?;
                items.push(
                    std::str::from_utf8(&b[..len])
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(|| std::io::Error::other("not a number"))?,
                );
            }
            Ok(items)
        })();
        match r {
            Ok(v) => return Ok(v),
            Err(e) => last = format!("{addr}: {e}"),
        }
    }
    Err(last)
}

/// The drill's own cluster: 3 replicas of redis-server on 127.0.0.1.
fn own_cluster(dir: &Path, args: &DrillArgs) -> Result<PathBuf, FailoverError> {
    let redis = which("redis-server").ok_or_else(|| {
        FailoverError::Failed(
            "the drill's cluster runs redis-server, which is not installed (apt-get install redis-server), or give --config for a cluster of your own".into(),
        )
    })?;
    std::fs::create_dir_all(dir)?;
    let ports = crate::bench::redis_bench::free_ports(9);
    if ports.len() < 9 {
        return Err(FailoverError::Failed(
            "no free ports on 127.0.0.1 for the drill's cluster".into(),
        ));
    }
    let toml = crate::config::loopback_cluster(
        &format!(
            "cluster = \"drill\"\nkey_file = \"cluster.key\"\ntransport = \"tcp\"\nsync = \"batch\"\nelection_timeout = \"{}\"\n",
            humantime::format_duration(args.election_timeout)
        ),
        &ports,
    );
    let path = dir.join("cluster.toml");
    std::fs::write(&path, toml)?;
    crate::config::generate_key(&dir.join("cluster.key"))?;
    let exe = std::env::current_exe()?;
    for i in 0..3 {
        let data = dir.join(format!("data/{}", i + 1));
        std::fs::create_dir_all(&data)?;
        let log = std::fs::File::create(data.join("falcon.log"))?;
        Command::new(&exe)
            .current_dir(dir)
            .args(["replicate", "--config", "cluster.toml", "--node"])
            .arg((i + 1).to_string())
            .arg("--")
            .arg(&redis)
            .args(["--port", &ports[3 * i + 2].to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
    }
    Ok(path)
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
}

fn elapsed_ms(from_ns: u64, to_ns: u64) -> f64 {
    to_ns.saturating_sub(from_ns) as f64 / 1e6
}

/// Waits until every replica answers, one leads, all are in its view, and
/// the checker's writes are acknowledged again. The statuses then.
fn healthy(
    cfg: &ClusterConfig,
    checker: &Checker,
    within: Duration,
) -> Result<Vec<NodeStatus>, String> {
    let t = Instant::now();
    let mut why;
    loop {
        let seen: Vec<Seen> = survey(cfg);
        let st: Vec<&NodeStatus> = seen.iter().filter_map(|s| s.status.as_ref()).collect();
        why = match leader_of(&st) {
            _ if st.len() < seen.len() => format!(
                "replica {} does not answer",
                seen.iter().find(|s| !s.up).map_or(0, |s| s.id)
            ),
            None => "no leader".into(),
            Some(l)
                if st
                    .iter()
                    .any(|s| s.view != l.view || s.role == "view-change") =>
            {
                "the replicas are not all in the leader's view".into()
            }
            Some(_) => {
                let now = now_ns();
                checker.watch(now);
                let w = Instant::now();
                while checker.first_ack().is_none() && w.elapsed() < Duration::from_secs(5) {
                    std::thread::sleep(Duration::from_millis(2));
                }
                if checker.first_ack().is_some() {
                    return Ok(st.into_iter().cloned().collect());
                }
                "no write is acknowledged".into()
            }
        };
        if t.elapsed() > within {
            return Err(format!("the cluster is not healthy: {why}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Runs the drill.
pub fn run(
    args: &DrillArgs,
    ui: &Ui,
    out: &mut dyn Write,
    stop: &Arc<AtomicBool>,
) -> Result<Status, FailoverError> {
    let own_dir = std::env::temp_dir().join(format!("falcon-drill-{}", std::process::id()));
    let (cfg_path, own) = match &args.config {
        Some(p) => (ClusterConfig::find(Some(p))?, false),
        None => (own_cluster(&own_dir, args)?, true),
    };
    let result = drill(&cfg_path, own, args, ui, out, stop);
    let failed = !matches!(result, Ok(Status::Success));
    if own && args.keep && failed {
        let pids = drill_processes(&own_dir);
        ui.note(&format!(
            "a round failed: the drill's cluster is left running for inspection in {} (falcon pids {}; falcon failover status --config {})",
            own_dir.display(),
            pids.iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(" "),
            cfg_path.display()
        ));
        return result;
    }
    if own {
        // SIGTERM to the drill's replicas (they flush and stop their
        // programs), found by their working directory (a busy one may not
        // answer its admin socket); SIGKILL to any still there after 10 s.
        let ours = drill_processes(&own_dir);
        for &pid in &ours {
            // SAFETY: a plain kill(2).
            unsafe {
                libc::kill(pid as i32, libc::SIGTERM);
            }
        }
        let t = Instant::now();
        while ours.iter().any(|&p| !gone(p)) && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        for &pid in ours.iter().filter(|&&p| !gone(p)) {
            // SAFETY: a plain kill(2).
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
        }
        if args.keep {
            ui.note(&format!(
                "kept the drill's cluster in {}",
                own_dir.display()
            ));
        } else {
            let _ = std::fs::remove_dir_all(&own_dir);
        }
    }
    result
}

fn drill(
    cfg_path: &Path,
    own: bool,
    args: &DrillArgs,
    ui: &Ui,
    out: &mut dyn Write,
    stop: &Arc<AtomicBool>,
) -> Result<Status, FailoverError> {
    let cfg = ClusterConfig::load(cfg_path)?;
    if cfg.replicas.len() < 3 {
        return Err(FailoverError::Usage(format!(
            "{}: a drill needs at least 3 replicas (a majority must survive a kill)",
            cfg.path.display()
        )));
    }
    let clients: Vec<SocketAddr> = cfg.replicas.iter().map(|r| r.client).collect();
    let setup = format!(
        "{} replicas ({}, transport {}, sync {}, election timeout {}){}; {} checker connections (RPUSH, {}), {} of load before each kill; kill the {} with SIGKILL",
        cfg.replicas.len(),
        if own {
            "redis-server on 127.0.0.1, started by the drill".to_string()
        } else {
            cfg.path.display().to_string()
        },
        format!("{:?}", cfg.transport).to_lowercase(),
        format!("{:?}", cfg.sync).to_lowercase(),
        humantime::format_duration(cfg.election_timeout),
        if own {
            ""
        } else {
            " (a --election-timeout on the replicas' command lines overrides the file's)"
        },
        args.clients,
        if args.rate == 0 {
            "as fast as answered".to_string()
        } else {
            format!("{} writes/s", args.rate)
        },
        humantime::format_duration(args.settle),
        match args.kill {
            Victim::Leader => "leader",
            Victim::Follower => "a follower",
            Victim::Random => "leader or a follower, at random,",
        }
    );
    ui.note(&format!("drill: {setup}"));
    let checker = Checker::start(&clients, args.clients, args.rate);
    let mut members: Vec<Member> = cfg
        .replicas
        .iter()
        .map(|r| Member {
            id: r.id,
            data_dir: r.data_dir.clone(),
            launch: None,
            child: None,
        })
        .collect();
    let first = match healthy(
        &cfg,
        &checker,
        Duration::from_secs(if own { 30 } else { 10 }),
    ) {
        Ok(st) => st,
        Err(e) => {
            checker.stop();
            return Err(FailoverError::Failed(e));
        }
    };
    for (m, st) in members.iter_mut().zip(cfg.replicas.iter()) {
        let pid = first.iter().find(|s| s.id == st.id).map(|s| s.pid);
        if let Some(pid) = pid {
            m.launch = Some(launch_of(pid).map_err(|e| {
                FailoverError::Failed(format!(
                    "reading how replica {} (pid {pid}) was started from /proc: {e} (the drill restarts replicas; run it as their user or root)",
                    m.id
                ))
            })?);
        }
    }
    let pb = ui.progress_with(
        u64::from(args.rounds),
        "{msg} [{bar:40}] round {pos}/{len} eta {eta}",
        "drill",
    );
    let mut rng = Rng(now_ns() | 1);
    let mut rounds = Vec::new();
    for n in 1..=args.rounds {
        if stop.load(Ordering::Relaxed) {
            ui.warn("stopped by Ctrl-C");
            break;
        }
        let r = one_round(n, &cfg, &mut members, &checker, &clients, args, &mut rng);
        if let Some(e) = &r.error {
            pb.suspend(|| ui.warn(&format!("round {n}: {e}")));
        }
        if !ui.json && !ui.stderr_tty {
            ui.detail(&format!(
                "round {n}: killed {} ({}), commit {} ms, lost {}",
                r.killed,
                if r.was_leader { "leader" } else { "follower" },
                r.commit_ms.map_or("-".into(), |v| format!("{v:.1}")),
                r.lost
            ));
        }
        let failed = r.error.is_some();
        rounds.push(r);
        pb.inc(1);
        if failed {
            break;
        }
    }
    pb.finish_and_clear();
    checker.stop();
    report(&rounds, args, &setup, ui, out)
}

fn one_round(
    n: u32,
    cfg: &ClusterConfig,
    members: &mut [Member],
    checker: &Checker,
    clients: &[SocketAddr],
    args: &DrillArgs,
    rng: &mut Rng,
) -> Round {
    let mut round = Round {
        round: n,
        ..Round::default()
    };
    let r = u64::from(n);
    let before = match healthy(cfg, checker, args.round_timeout) {
        Ok(st) => st,
        Err(e) => {
            round.error = Some(e);
            return round;
        }
    };
    std::thread::sleep(args.settle);
    let leader = leader_of(&before.iter().collect::<Vec<_>>())
        .cloned()
        .expect("healthy means a leader");
    let kill_leader = match args.kill {
        Victim::Leader => true,
        Victim::Follower => false,
        Victim::Random => rng.next() % 2 == 0,
    };
    let victim = if kill_leader {
        leader.clone()
    } else {
        let fs: Vec<&NodeStatus> = before.iter().filter(|s| s.id != leader.id).collect();
        fs[(rng.next() % fs.len() as u64) as usize].clone()
    };
    round.killed = victim.id;
    round.was_leader = kill_leader;
    let Some(mi) = members.iter().position(|m| m.id == victim.id) else {
        round.error = Some(format!("replica {} is not in the cluster file", victim.id));
        return round;
    };
    let kill_ns = now_ns();
    checker.watch(kill_ns);
    members[mi].kill(victim.pid);
    // Wait for the cluster to serve again: a leader in a newer view that has
    // committed (leader kills), and a checker write acknowledged.
    let t = Instant::now();
    let survivors: Vec<&Member> = members.iter().filter(|m| m.id != victim.id).collect();
    let new_leader = loop {
        let st: Vec<NodeStatus> = survivors
            .iter()
            .filter_map(|m| admin::status(&m.data_dir, Duration::from_secs(1)).ok())
            .collect();
        let l = leader_of(&st.iter().collect::<Vec<_>>()).cloned();
        let served = match &l {
            Some(l) if kill_leader => l.view > leader.view && l.leader_first_commit_ns.is_some(),
            Some(_) => true,
            None => false,
        };
        if served && checker.first_ack().is_some() {
            if kill_leader {
                round.detect_ms = st
                    .iter()
                    .filter_map(|s| s.view_change_at_ns)
                    .filter(|&at| at >= kill_ns)
                    .min()
                    .map(|at| elapsed_ms(kill_ns, at));
            }
            break l.expect("served means a leader");
        }
        if t.elapsed() > args.round_timeout {
            round.error = Some(format!(
                "no {} within {} of the kill",
                if served {
                    "acknowledged write"
                } else {
                    "new leader that commits"
                },
                humantime::format_duration(args.round_timeout)
            ));
            return round;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    round.leader = new_leader.id;
    if kill_leader {
        round.elect_ms = Some(elapsed_ms(kill_ns, new_leader.role_since_ns));
        round.commit_ms = new_leader
            .leader_first_commit_ns
            .map(|c| elapsed_ms(kill_ns, c));
    }
    // Start the killed replica again once it and its program are gone.
    let t = Instant::now();
    while !(gone(victim.pid) && victim.program.as_ref().is_none_or(|p| gone(p.pid))) {
        if t.elapsed() > Duration::from_secs(10) {
            round.error = Some(format!(
                "replica {} (pid {}) or its program did not exit after SIGKILL",
                victim.id, victim.pid
            ));
            return round;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let m = &mut members[mi];
    let restarted = Instant::now();
    if let Err(e) = m.start(&m.data_dir.join("falcon-drill.log")) {
        round.error = Some(format!("starting replica {} again: {e}", victim.id));
        return round;
    }
    // Caught up: it applied everything the leader had committed when it started.
    let target = members
        .iter()
        .find(|m| m.id == new_leader.id)
        .and_then(|m| admin::status(&m.data_dir, Duration::from_secs(1)).ok())
        .map_or(new_leader.commit, |s| s.commit);
    loop {
        if let Ok(s) = admin::status(&members[mi].data_dir, Duration::from_secs(1)) {
            // (It may have become the leader: a restarted replica that
            // hears from nobody within the election timeout starts a view
            // change; counted below.)
            if s.role != "view-change" && s.applied >= target {
                round.catch_up_ms = Some(restarted.elapsed().as_secs_f64() * 1e3);
                round.rejoin_view_changes = s.view.saturating_sub(new_leader.view);
                break;
            }
        }
        if restarted.elapsed() > args.round_timeout {
            let now = match admin::status(&members[mi].data_dir, Duration::from_secs(1)) {
                Ok(s) => format!(
                    "it is {} in view {}, has applied op {} of {} committed ({} queued{})",
                    s.role,
                    s.view,
                    s.applied,
                    s.commit,
                    s.apply_queue,
                    s.awaiting_answer.map_or(String::new(), |(c, ms)| format!(
                        ", waiting {ms:.0} ms for the program's answer on connection {c}"
                    ))
                ),
                Err(e) => format!("it does not answer: {e}"),
            };
            round.error = Some(format!(
                "replica {} did not catch up within {} of its restart: {now} (the leader's commit was {target}; see {})",
                victim.id,
                humantime::format_duration(args.round_timeout),
                members[mi].data_dir.join("falcon-drill.log").display()
            ));
            return round;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // The round's lists are complete once the writers moved on.
    if !checker.next_round(r + 1) {
        round.error = Some(
            "a checker connection stayed on this round's list for 5 s: its writes could not be checked".into(),
        );
        return round;
    }
    // The first write the cluster acknowledged after the kill — for a
    // leader, after the new leader took over (an answer the old leader sent
    // just before it died may arrive after the kill).
    let served_from = if kill_leader {
        new_leader.role_since_ns
    } else {
        kill_ns
    };
    match checker.verify(r, clients, served_from) {
        Ok((acked, lost, first)) => {
            round.acked = acked;
            round.lost = lost;
            round.client_ms = first.map(|t| elapsed_ms(kill_ns, t));
            if lost > 0 {
                round.error = Some(format!(
                    "{lost} of {acked} acknowledged writes are missing on the leader"
                ));
            }
        }
        Err(e) => round.error = Some(format!("reading the checker's lists back: {e}")),
    }
    round
}

fn report(
    rounds: &[Round],
    args: &DrillArgs,
    setup: &str,
    ui: &Ui,
    out: &mut dyn Write,
) -> Result<Status, FailoverError> {
    let col = |f: fn(&Round) -> Option<f64>| -> Option<Spread> {
        spread(rounds.iter().filter_map(f).collect())
    };
    let summary = serde_json::json!({
        "detect": col(|r| r.detect_ms),
        "elect": col(|r| r.elect_ms),
        "commit": col(|r| r.commit_ms),
        "client": col(|r| r.client_ms),
        "catch_up": col(|r| r.catch_up_ms),
    });
    let disturbed = rounds.iter().filter(|r| r.rejoin_view_changes > 0).count();
    let lost: u64 = rounds.iter().map(|r| r.lost).sum();
    let acked: u64 = rounds.iter().map(|r| r.acked).sum();
    let failed = rounds.iter().filter(|r| r.error.is_some()).count();
    let ok = failed == 0 && lost == 0 && rounds.len() == args.rounds as usize;
    if ui.json {
        output::json_line(
            out,
            &serde_json::json!({
                "setup": setup,
                "rounds": rounds,
                "summary": summary,
                "acked": acked,
                "lost": lost,
                "failed_rounds": failed,
                "rejoins_with_view_changes": disturbed,
                "ok": ok,
            }),
        )?;
    } else {
        let f = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.1}"));
        let mut t = ui.table();
        t.set_header([
            "round",
            "killed",
            "detect ms",
            "elect ms",
            "commit ms",
            "client ms",
            "catch-up ms",
            "rejoin vc",
            "acked",
            "lost",
        ]);
        for r in rounds {
            t.add_row([
                r.round.to_string(),
                format!(
                    "{} ({})",
                    r.killed,
                    if r.was_leader { "leader" } else { "follower" }
                ),
                f(r.detect_ms),
                f(r.elect_ms),
                f(r.commit_ms),
                f(r.client_ms),
                f(r.catch_up_ms),
                r.rejoin_view_changes.to_string(),
                r.acked.to_string(),
                if r.lost > 0 {
                    ui.bad(&r.lost.to_string())
                } else {
                    r.lost.to_string()
                },
            ]);
        }
        writeln!(out, "{setup}\n{t}")?;
        let mut s = ui.table();
        s.set_header(["measure", "rounds", "p50 ms", "p90 ms", "p99 ms", "max ms"]);
        for (name, v) in [
            ("detect", col(|r| r.detect_ms)),
            ("elect", col(|r| r.elect_ms)),
            ("commit (failover)", col(|r| r.commit_ms)),
            ("client", col(|r| r.client_ms)),
            ("catch-up", col(|r| r.catch_up_ms)),
        ] {
            if let Some(v) = v {
                s.add_row([
                    name.to_string(),
                    v.n.to_string(),
                    format!("{:.1}", v.p50_ms),
                    format!("{:.1}", v.p90_ms),
                    format!("{:.1}", v.p99_ms),
                    format!("{:.1}", v.max_ms),
                ]);
            }
        }
        writeln!(out, "{s}")?;
        writeln!(
            out,
            "{} of {} rounds passed; {acked} writes acknowledged, {} lost",
            rounds.len() - failed,
            args.rounds,
            if lost == 0 {
                ui.good("0")
            } else {
                ui.bad(&lost.to_string())
            }
        )?;
        let disturbed = rounds.iter().filter(|r| r.rejoin_view_changes > 0).count();
        if disturbed > 0 {
            writeln!(
                out,
                "in {disturbed} rounds the restarted replica started view changes of its own before it heard from the leader (rejoin vc)"
            )?;
        }
    }
    Ok(if ok { Status::Success } else { Status::Failure })
}
