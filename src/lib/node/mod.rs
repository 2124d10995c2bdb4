//! One replica's event loop: the engine, the log, the transport, the proxy
//! front end and the program, driven by one thread (mio).
//!
//! Data flow: a client connection on the leader becomes Open/Data/Close
//! events; the engine orders them; every replica applies committed events to
//! its own copy of the program over its own local connections; the leader
//! sends the program's answers back to the client; followers read and
//! discard theirs so the program never blocks.

mod admin;
pub mod divergence;
pub mod normalize;
mod resync;

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use mio::net::{TcpListener, TcpStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use xxhash_rust::xxh3::xxh3_64;

use crate::app::{App, AppError};
use crate::config::ClusterConfig;
use crate::consensus::{
    Command, Config, Envelope, Event, Input, NodeId, PersistentState, Reject, Replica, Role,
};
use crate::log::{Entry, FsStorage, Kind, LogError, LogOptions, SegmentLog, commit_point, seal};
use crate::output::Ui;
use crate::snapshot;
use crate::transport::shm::{ShmOptions, ShmTransport};
use crate::transport::tcp::{TcpOptions, TcpTransport};
use crate::transport::{Transport, TransportEvent};

const CLIENTS: Token = Token(1);
const PEERS: Token = Token(2);
const SYNCED: Token = Token(3);
const TAP: Token = Token(4);
const VM: Token = Token(5);
const CLIENT_BASE: usize = 1 << 20;
const APP_BASE: usize = 1 << 40;
/// The transport's own timers get a turn at least this often.
const PEER_TIMERS: Duration = Duration::from_millis(5);
/// Bytes read from a socket at a time.
const READ_CHUNK: usize = 64 << 10;
/// How long the applier waits for the program to answer one connection before
/// it writes to another anyway (a request with no answer must not stall the
/// replica; past this, the order between the two connections is not assured).
const ANSWER_WAIT: Duration = Duration::from_secs(1);
/// Bytes of entries in one message that carries part of a log (a
/// DoViewChange, StartView or CatchUp) at most; larger logs move in chunks.
const CHUNK_BYTES: usize = 8 << 20;
/// Client events held for the fsync under way, at most (then they are proposed at once).
const PROPOSE_HOLD_MAX: usize = 256;
/// Over shm, how long the loop spins on the rings after a peer message.
const SHM_SPIN: Duration = Duration::from_micros(50);
/// How often the loop asks whether the program (or a hook) exited.
const EXIT_CHECK: Duration = Duration::from_millis(20);
/// The longest an idle loop sleeps when something may be due that no event
/// announces (and the shortest, once a timer is past).
const TICK: Duration = Duration::from_millis(1);

/// What `falcon replicate` runs.
pub struct NodeOptions {
    /// The cluster file.
    pub config: ClusterConfig,
    /// This replica's index in it.
    pub index: usize,
    /// The cluster key.
    pub key: Vec<u8>,
    /// The program and its arguments.
    pub program: Vec<String>,
    /// How long to wait for the program to listen.
    pub app_timeout: Duration,
    /// What a follower does with a client.
    pub follower_clients: FollowerClients,
    /// Run (with `sh -c`) when this replica becomes the leader.
    pub on_leader: Option<String>,
    /// Run (with `sh -c`) when this replica becomes a follower.
    pub on_follower: Option<String>,
    /// Run (with `sh -c`) before the program starts, to bring it to its initial state.
    pub reset_cmd: Option<String>,
    /// Run (with `sh -c`) when this replica finds that its program's output
    /// differs from the leader's.
    pub on_divergence: Option<String>,
    /// Run (with `sh -c`) to write the program's state into $FALCON_SNAPSHOT_DIR.
    pub snapshot_cmd: Option<String>,
    /// Run (with `sh -c`) before the program starts, to put the state in
    /// $FALCON_SNAPSHOT_DIR in place.
    pub restore_cmd: Option<String>,
    /// Entries applied between two snapshots.
    pub snapshot_every: u64,
    /// How long `snapshot_cmd` may run before it is stopped and the
    /// snapshot given up.
    pub snapshot_timeout: Duration,
    /// No program: clients send length-prefixed frames and the leader
    /// answers each committed frame with its op (`falcon bench --consensus`).
    pub null_program: bool,
    /// Delivered entries kept in memory.
    pub memory_entries: u64,
    /// How the loop waits for peers over shm and rdma.
    pub poll: crate::transport::shm::PollMode,
    /// `falcon tap-attach`: the program is QEMU, and its network is the
    /// TAP device, ordered through the engine.
    pub tap: Option<TapOptions>,
    /// Serve Prometheus metrics over HTTP here.
    pub metrics: Option<SocketAddr>,
    /// Mutual TLS on TCP peer links (None: plain TCP).
    pub tls: Option<Arc<crate::transport::tls::TlsContext>>,
}

/// What `falcon tap-attach` adds to a replica.
#[derive(Clone, Debug)]
pub struct TapOptions {
    /// The TAP device.
    pub name: String,
    /// Make it when missing.
    pub create: bool,
    /// Write the ordered inbound frames to this pcap file.
    pub capture: Option<PathBuf>,
    /// Serve a QEMU started separately that listens on this UNIX socket
    /// (`-netdev stream,server=on,addr.type=unix,addr.path=…`) instead of
    /// starting QEMU: connect, and connect again when it restarts.
    pub socket: Option<PathBuf>,
    /// When the leader's VM gets a frame.
    pub deliver: Deliver,
}

/// When the leader's VM receives an inbound frame (`tap-attach --deliver`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Deliver {
    /// As the leader proposes it; what the VM sends waits until that input
    /// is committed (output commit): the VM works while the replicas agree.
    #[default]
    Early,
    /// Once it is committed, like every backup's VM.
    Committed,
}

/// The netdev id falcon gives QEMU's stream backend (`-device …,netdev=falcon`).
pub const NETDEV_ID: &str = "falcon";

/// What a follower does with a client that connects to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum FollowerClients {
    /// Pass the connection on to the leader's client address (both ways, until either side closes).
    #[default]
    Forward,
    /// Close it: the client tries another replica.
    Refuse,
}

/// Something logged at most once a second, and how often it was held back.
#[derive(Default)]
struct OncePerSecond {
    at: Option<Instant>,
    held_back: u64,
}

impl OncePerSecond {
    /// Some(times held back since the last line) when a line may go now.
    fn due(&mut self) -> Option<u64> {
        if self
            .at
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            self.held_back += 1;
            return None;
        }
        self.at = Some(Instant::now());
        Some(std::mem::take(&mut self.held_back))
    }
}

/// Reads of a program connection's output in one turn of the loop (of
/// [`READ_CHUNK`] bytes each); the rest waits for the next turn.
const APP_READS_PER_TURN: usize = 64;

/// Forwarded connections at most, per replica.
const FORWARDS_MAX: usize = 1024;
/// How long a forwarded client may take to read one piece of its answers
/// ([`READ_CHUNK`]) before the forward lets it go (it reads none of them).
const FORWARD_WRITE_WAIT: Duration = Duration::from_secs(30);

/// Writes `buf` to a socket whose writes time out (SO_SNDTIMEO), giving up
/// once `within` has passed. (A client that reads nothing still lets the
/// kernel take a little more now and then, as its send buffer grows: a
/// timeout per write alone could go on for minutes.)
fn write_within(s: &mut std::net::TcpStream, mut buf: &[u8], within: Duration) -> io::Result<()> {
    let start = Instant::now();
    while !buf.is_empty() {
        match s.write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
        if !buf.is_empty() && start.elapsed() >= within {
            return Err(io::ErrorKind::TimedOut.into());
        }
    }
    Ok(())
}

/// TCP keepalive after 5 s idle (3 probes a second apart) and a limit of
/// `user_timeout_ms` on unacknowledged data: a peer whose host died is
/// noticed in seconds, not the kernel's default two hours (idle) or quarter
/// of an hour (data). (The limit also ends a connection whose reader does
/// not read, a zero window, that long: a client's socket gets more.)
fn keep_alive(s: &std::net::TcpStream, user_timeout_ms: libc::c_int) {
    use std::os::fd::AsRawFd;
    let fd = s.as_raw_fd();
    let set = |level, name, value: libc::c_int| {
        // SAFETY: setsockopt on an open socket with an int option.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
    };
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 5);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 1);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3);
    set(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, user_timeout_ms);
}

/// The connections a follower forwards to the leader: how many threads
/// carry them, and their sockets by the leader they go to, so that a change
/// of leader closes them at once (their sessions on the old leader are
/// closed on every replica anyway; a client told by the close tries again).
#[derive(Default)]
struct Forwards {
    /// Forwarding threads running (the limit is [`FORWARDS_MAX`]).
    threads: std::sync::atomic::AtomicUsize,
    next: std::sync::atomic::AtomicU64,
    /// Per forward: the leader's client address, the client's socket and,
    /// once connected, the leader's.
    live: std::sync::Mutex<HashMap<u64, (SocketAddr, Vec<std::net::TcpStream>)>>,
}

impl Forwards {
    fn live(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<u64, (SocketAddr, Vec<std::net::TcpStream>)>> {
        // A forwarding thread that panicked holding the lock left the map whole.
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Shuts down every forward that goes to another leader than `leader`;
    /// how many.
    fn close_all_but(&self, leader: SocketAddr) -> usize {
        let mut closed = 0;
        self.live().retain(|_, (to, socks)| {
            if *to == leader {
                return true;
            }
            for s in socks.iter() {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
            closed += 1;
            false
        });
        closed
    }
}

/// Passes a client connection on to the leader, on two threads (one per direction).
fn forward(client: std::net::TcpStream, leader: SocketAddr, set: Arc<Forwards>) {
    /// Gives the connection's place back however the thread ends (a panic
    /// included), so the count of forwards never leaks.
    struct Counted(Arc<Forwards>, u64);
    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.live().remove(&self.1);
            self.0.threads.fetch_sub(1, Ordering::Relaxed);
        }
    }
    set.threads.fetch_add(1, Ordering::Relaxed);
    let id = set.next.fetch_add(1, Ordering::Relaxed);
    if let Ok(c) = client.try_clone() {
        set.live().insert(id, (leader, vec![c]));
    }
    let counted = Counted(set, id);
    // If no thread can be started, the connection is dropped and its place
    // given back (the closure, and the guard in it, are dropped).
    let _ = std::thread::Builder::new()
        .name("falcon-forward".into())
        .spawn(move || {
            let counted = counted;
            let Ok(upstream) =
                std::net::TcpStream::connect_timeout(&leader, Duration::from_secs(1))
            else {
                return;
            };
            // The leader changed while this connected: the client goes.
            match (counted.0.live().get_mut(&counted.1), upstream.try_clone()) {
                (Some((_, socks)), Ok(u)) => socks.push(u),
                _ => return,
            }
            let _ = upstream.set_nodelay(true);
            let _ = client.set_nodelay(true);
            // A client that reads nothing, or whose host died, would hold
            // this forward's threads for good.
            let _ = client.set_write_timeout(Some(Duration::from_secs(1)));
            keep_alive(&client, 60_000);
            // A leader whose host dies sends no close: keepalive probes
            // (after 5 s idle, 3 one second apart) and a 10 s limit on
            // unacknowledged data end the forward, and the client, told
            // by the close, tries another replica.
            keep_alive(&upstream, 10_000);
            let (Ok(mut c2), Ok(mut u2)) = (client.try_clone(), upstream.try_clone()) else {
                return;
            };
            let (back_done, finished) = std::sync::mpsc::channel::<()>();
            let moved = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let moving = moved.clone();
            let back = std::thread::Builder::new()
                .name("falcon-forward".into())
                .spawn(move || {
                    let mut buf = vec![0u8; READ_CHUNK];
                    loop {
                        match u2.read(&mut buf) {
                            Ok(0) => break,
                            Ok(n) => {
                                if write_within(&mut c2, &buf[..n], FORWARD_WRITE_WAIT).is_err() {
                                    break;
                                }
                                moving.fetch_add(n as u64, Ordering::Relaxed);
                            }
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(_) => break,
                        }
                    }
                    let _ = c2.shutdown(std::net::Shutdown::Both);
                    let _ = back_done.send(());
                });
            let (mut c, mut u) = (client, upstream);
            // No thread for the leader's answers (the host's thread limit):
            // the client goes, and tries again.
            let Ok(back) = back else {
                let _ = u.shutdown(std::net::Shutdown::Both);
                let _ = c.shutdown(std::net::Shutdown::Both);
                return;
            };
            if io::copy(&mut c, &mut u).is_ok() {
                // The client may have closed only its writing side: the
                // leader's answers still come back (the other thread), as
                // long as they keep coming, within the leader's own waits
                // (a leader gone without a word must not hold this for good).
                let _ = u.shutdown(std::net::Shutdown::Write);
                let mut seen = u64::MAX;
                while finished.recv_timeout(HALF_CLOSED_WAIT + LINGER).is_err() {
                    let now = moved.load(Ordering::Relaxed);
                    if now == seen {
                        break;
                    }
                    seen = now;
                }
            }
            let _ = u.shutdown(std::net::Shutdown::Both);
            let _ = c.shutdown(std::net::Shutdown::Both);
            let _ = back.join();
        });
}

/// Why a node stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The log failed.
    #[error(transparent)]
    Log(#[from] LogError),
    /// The program failed.
    #[error(transparent)]
    App(#[from] AppError),
    /// A snapshot could not be used.
    #[error("{0}")]
    Snapshot(String),
    /// The node cannot start as configured (no RDMA device, …).
    #[error("{0}")]
    Setup(String),
    /// This replica's VM processed input the log does not hold.
    #[error("{0}")]
    VmDiverged(String),
    /// `program_protocol = "resp"`: the program's one connection failed.
    #[error("{0}")]
    Shared(String),
    /// Other I/O.
    #[error("{context}: {source}")]
    Io {
        /// What falcon was doing.
        context: String,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
}

/// tap-attach --capture: the pcap file, if asked for.
fn open_capture(t: &TapOptions) -> Result<Option<crate::capture::PcapWriter>, NodeError> {
    t.capture
        .as_ref()
        .map(|p| crate::capture::PcapWriter::create(p).map_err(|e| NodeError::Setup(e.to_string())))
        .transpose()
}

/// The TCP transport, its descriptor registered in `poll` as `PEERS`.
fn tcp_transport(
    cfg: &crate::config::ClusterConfig,
    me: NodeId,
    key: &[u8],
    tls: Option<Arc<crate::transport::tls::TlsContext>>,
    poll: &Poll,
) -> Result<Box<dyn Transport>, NodeError> {
    let peers = cfg.replicas.iter().map(|r| r.peer).collect();
    let t = TcpTransport::bind(TcpOptions {
        queue_bytes_max: cfg.limits.peer_queue,
        tls,
        ..TcpOptions::new(cfg.cluster_id, me, peers, key.to_vec())
    })
    .map_err(io_err("starting the peer transport"))?;
    let tfd = t.as_raw_fd();
    poll.registry()
        .register(&mut SourceFd(&tfd), PEERS, Interest::READABLE)
        .map_err(io_err("registering"))?;
    Ok(Box::new(t))
}

/// A transport with its event descriptors, for `transport = "rdma"`.
struct RdmaBox {
    t: Box<dyn Transport>,
    device: String,
    fds: Vec<std::os::fd::RawFd>,
}

impl RdmaBox {
    fn device(&self) -> &str {
        &self.device
    }
    fn fds(&self) -> Vec<std::os::fd::RawFd> {
        self.fds.clone()
    }
}

impl From<RdmaBox> for Box<dyn Transport> {
    fn from(b: RdmaBox) -> Box<dyn Transport> {
        b.t
    }
}

/// The rdma transport, or why there is none.
#[cfg(feature = "rdma")]
fn rdma_transport(
    cfg: &crate::config::ClusterConfig,
    me: NodeId,
    key: &[u8],
) -> Result<RdmaBox, String> {
    use crate::transport::rdma::{RdmaOptions, RdmaTransport};
    let peers = cfg.replicas.iter().map(|r| r.peer).collect();
    let mut o = RdmaOptions::new(cfg.cluster_id, me, peers, key.to_vec());
    o.device = cfg.rdma_device.clone();
    let t = RdmaTransport::bind(o).map_err(|e| format!("cannot use rdma: {e}"))?;
    Ok(RdmaBox {
        device: t.device().to_string(),
        fds: t.fds().to_vec(),
        t: Box::new(t),
    })
}

/// Without the `rdma` feature there is no rdma transport.
#[cfg(not(feature = "rdma"))]
fn rdma_transport(
    _cfg: &crate::config::ClusterConfig,
    _me: NodeId,
    _key: &[u8],
) -> Result<RdmaBox, String> {
    Err("this falcon was built without RDMA support (build it with `cargo build --release --features rdma`, which needs libibverbs)".into())
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> NodeError {
    let context = context.into();
    move |source| NodeError::Io { context, source }
}

/// How the node ended.
#[derive(Debug)]
pub enum NodeExit {
    /// Ctrl-C or a stop request.
    Stopped,
    /// The program exited on its own.
    ProgramExited(std::process::ExitStatus),
}

struct ClientConn {
    stream: TcpStream,
    conn: u64,
    /// The program's output on this connection (bytes read from it) when
    /// the client's last input was read: more since means the client may
    /// have waited for it, and its next input is ordered after it (`Await`).
    seen_out: u64,
    out: Vec<u8>,
    /// Bytes of a frame not complete yet (null-program mode).
    partial: Vec<u8>,
    /// Where the connection is in its ending.
    end: ClientEnd,
    /// The client's end of input was signalled (the read that finds it may
    /// come on a later turn: when input is held, or after 16 chunks).
    peer_closed: bool,
}

/// How far a client connection has gone in closing. A client may close its
/// writing side and still wait for the answers to what it sent (as with
/// `printf 'GET k\r\n' | nc -N`, or `shutdown(SHUT_WR)`): the program
/// answered such a client when it ran alone, so falcon does too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ClientEnd {
    /// Reading and writing.
    Open,
    /// The client sent all it will send (since the instant): the program's
    /// answers to it still go out, until the program ends the connection
    /// (or [`HALF_CLOSED_WAIT`] passes).
    HalfClosed(Instant),
    /// Only its last answers are left to write (the instant: when the
    /// client last took some); then, or after [`LINGER`] without the
    /// client reading, the connection closes.
    Ending(Instant),
}

/// How often the loop looks for client connections whose ending took too
/// long (their deadlines are many seconds: no need to look every turn).
const CLIENT_SWEEP: Duration = Duration::from_secs(1);
/// How often a replica over shm with a peer missing looks for it under the
/// other program_protocol (see `look_for_other_mode`).
const SHM_OTHER_MODE_CHECK: Duration = Duration::from_secs(5);
/// Refused Closes kept to propose again, at most (see `closes_owed`).
const CLOSES_OWED_MAX: usize = 65_536;
/// How long a client that closed its writing side waits for the program's
/// last answers at most (the program has [`SHUT_WAIT`] to end its side).
const HALF_CLOSED_WAIT: Duration = Duration::from_secs(15);
/// How long a closing client connection with answers left may go without
/// reading any, at most.
const LINGER: Duration = Duration::from_secs(30);

/// The entry that closes `conn` in the log (on every replica).
fn close_event(conn: u64) -> Event {
    Event {
        kind: Kind::Close,
        conn,
        payload: Bytes::new(),
    }
}

/// The largest frame a client may send in null-program mode.
const FRAME_MAX: usize = crate::log::format::PAYLOAD_MAX;

struct AppConn {
    stream: TcpStream,
    token: Token,
    out: Vec<u8>,
    /// Bytes the program wrote on it so far.
    read_total: u64,
    /// Output this copy is short of the leader's on this connection, learnt
    /// when an `Await` timed out (see [`Node::pump_apply`]).
    await_gap: u64,
    /// Opened again on a program restored from a snapshot: its output
    /// offsets do not line up with the leader's (no `Await` waits on it).
    reopened: bool,
    /// Closed in the log: close once everything written so far reached the program.
    closing: bool,
    /// Our side is shut (FIN sent): the program still reads what is left and
    /// answers; the connection goes once the program closes its side too.
    /// (Dropping it at once could reset the connection and lose requests the
    /// program has not read yet.)
    shut: Option<Instant>,
}

/// How long the program may take to accept a connection before the replica
/// stops (it cannot skip the input the connection carries).
const APP_CONNECT_WAIT: Duration = Duration::from_secs(30);

/// How long a half-closed program connection may stay open before it is dropped.
const SHUT_WAIT: Duration = Duration::from_secs(10);

/// `program_protocol = "resp"`: most answers owed (the program's and
/// falcon's own) before applying waits for some to come.
const OWED_MAX: usize = 1 << 16;

/// `program_protocol = "resp"`: the key of the one program connection every
/// client's commands go down (client connections are numbered from 1).
const SHARED: u64 = 0;

impl AppConn {
    /// Sends FIN after everything written so far.
    fn shut_write(&mut self) {
        self.closing = false;
        if self.shut.is_none() {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
            self.shut = Some(Instant::now());
        }
    }
}

/// Raises the soft limit on open files to the hard one (the program started
/// next inherits it): a leader holds two descriptors per client and a
/// follower three per forwarded one, where the usual soft limit is 1,024.
/// Says so when even the hard limit is below what the limits allow.
fn raise_open_file_limit(ui: &Ui, client_connections: usize) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim = raised;
        }
    }
    let needed = (2 * client_connections.max(FORWARDS_MAX) + 256) as u64;
    if lim.rlim_cur < needed {
        ui.warn(&format!(
            "the open-file limit is {} (hard limit {}): limits.client_connections = {client_connections} needs about {needed}; clients past it wait until descriptors free up (raise it with `ulimit -n` or LimitNOFILE=)",
            lim.rlim_cur, lim.rlim_max
        ));
    }
}

/// The state file next to the log: `view log_view`, written atomically.
fn save_state(dir: &Path, st: PersistentState) -> io::Result<()> {
    // (`view log_view`, then, while it rejoins after a lost disk, the view
    // it joined and the op it must reach before it votes again.)
    let text = if st.rejoin_upto > 0 {
        format!(
            "{} {} {} {}\n",
            st.view, st.log_view, st.rejoin_view, st.rejoin_upto
        )
    } else {
        format!("{} {}\n", st.view, st.log_view)
    };
    write_durably(dir, "state", text.as_bytes())
}

/// Writes `name` in `dir` so that a crash leaves the old file or the new
/// one, both whole, and the new one is on disk when this returns: a
/// temporary file, synced, renamed over it, the directory synced.
pub(super) fn write_durably(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}

fn load_state(dir: &Path) -> io::Result<Option<PersistentState>> {
    match std::fs::read_to_string(dir.join("state")) {
        Ok(s) => {
            let mut it = s.split_whitespace().map(str::parse::<u64>);
            match (it.next(), it.next(), it.next(), it.next(), it.next()) {
                (Some(Ok(view)), Some(Ok(log_view)), None, None, None) => {
                    Ok(Some(PersistentState {
                        view,
                        log_view,
                        ..PersistentState::default()
                    }))
                }
                (
                    Some(Ok(view)),
                    Some(Ok(log_view)),
                    Some(Ok(rejoin_view)),
                    Some(Ok(rejoin_upto)),
                    None,
                ) => Ok(Some(PersistentState {
                    view,
                    log_view,
                    rejoin_view,
                    rejoin_upto,
                })),
                _ => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: not a falcon state file", dir.join("state").display()),
                )),
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Runs the operator's commands (`sh -c`) with the replica's environment:
/// FALCON_NODE, FALCON_DATA_DIR, FALCON_APP (host:port), FALCON_APP_HOST, FALCON_APP_PORT.
struct Hooks {
    id: u32,
    data_dir: PathBuf,
    app: SocketAddr,
    /// Most bytes of falcon's RESP state a snapshot may carry: what the
    /// multiplexer can hold (unfinished commands, queued transactions) and
    /// room for every connection's record.
    resp_state_max: u64,
}

impl Hooks {
    fn command(&self, cmd: &str, extra: &[(&str, &std::ffi::OsStr)]) -> std::process::Command {
        let mut c = std::process::Command::new("sh");
        c.arg("-c")
            .arg(cmd)
            .env("FALCON_NODE", self.id.to_string())
            .env("FALCON_DATA_DIR", &self.data_dir)
            .env("FALCON_APP", self.app.to_string())
            .env("FALCON_APP_HOST", self.app.ip().to_string())
            .env("FALCON_APP_PORT", self.app.port().to_string())
            .stdin(std::process::Stdio::null());
        for (k, v) in extra {
            c.env(k, v);
        }
        c
    }

    /// Runs `cmd` to its end; an error unless it succeeds.
    fn run(
        &self,
        what: &str,
        cmd: &str,
        extra: &[(&str, &std::ffi::OsStr)],
    ) -> Result<(), NodeError> {
        let status = self
            .command(cmd, extra)
            .status()
            .map_err(io_err(format!("running {what} {cmd:?}")))?;
        if status.success() {
            Ok(())
        } else {
            Err(NodeError::Io {
                context: format!("{what} {cmd:?}"),
                source: io::Error::other(format!("it exited with {status}")),
            })
        }
    }

    /// Unpacks the snapshot file and runs `--restore-cmd` on it.
    fn restore(&self, cmd: &str, snap: &Path) -> Result<snapshot::SnapshotMeta, NodeError> {
        let dir = self.data_dir.join("snapshot.restore");
        let _ = std::fs::remove_dir_all(&dir);
        let mut meta =
            snapshot::unpack(snap, &dir).map_err(|e| NodeError::Snapshot(e.to_string()))?;
        // falcon's own part is for falcon, not for the restore hook.
        let state = dir.join(snapshot::RESP_STATE_FILE);
        // A state falcon cannot take is not a reason to stay down: the
        // program is restored; clients that were in the middle of a command
        // then may see errors (as when the state does not parse).
        let problem = match std::fs::symlink_metadata(&state) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => Some(e.to_string()),
            Ok(m) if !m.is_file() => Some("not a plain file".to_string()),
            Ok(m) if m.len() > self.resp_state_max => Some(format!(
                "{} bytes, more than this replica's limits allow ({}; limits.program_backlog_bytes)",
                m.len(),
                self.resp_state_max
            )),
            Ok(_) => match std::fs::read(&state) {
                Ok(bytes) => {
                    meta.resp_state = bytes;
                    None
                }
                Err(e) => Some(e.to_string()),
            },
        };
        let _ = std::fs::remove_file(&state);
        meta.resp_state_problem = problem.map(|why| {
            format!(
                "the snapshot's {} (falcon's state of its clients' unfinished commands) was not taken: {why}",
                snapshot::RESP_STATE_FILE
            )
        });
        let op = meta.op.to_string();
        self.run(
            "--restore-cmd",
            cmd,
            &[
                ("FALCON_SNAPSHOT_DIR", dir.as_os_str()),
                ("FALCON_OP", op.as_ref()),
            ],
        )?;
        let _ = std::fs::remove_dir_all(&dir);
        Ok(meta)
    }
}

/// Where this replica is in taking a snapshot of its program.
enum Snapshotting {
    Idle,
    /// Applying is paused until the program answered what it was given.
    Draining,
    /// `--snapshot-cmd` runs; applying stays paused.
    Running {
        child: std::process::Child,
        op: u64,
        open_conns: Vec<u64>,
        started: Instant,
        /// When to say again that it still runs (and applying waits).
        say_at: Duration,
    },
}

/// A `--snapshot-cmd` that runs this long is said to (applying waits for
/// it), and again every [`SNAPSHOT_CMD_SAY_EVERY`].
const SNAPSHOT_CMD_SAY_AFTER: Duration = Duration::from_secs(10);
const SNAPSHOT_CMD_SAY_EVERY: Duration = Duration::from_secs(30);

/// A snapshot being packed: the files `--snapshot-cmd` wrote, into
/// `snapshot.packed` beside the current one, on a thread of its own.
struct Packing {
    op: u64,
    /// How long `--snapshot-cmd` took.
    took: Duration,
    thread: std::thread::JoinHandle<Result<snapshot::SnapshotMeta, snapshot::SnapshotError>>,
}

/// A snapshot on its way here from another replica.
struct Fetch {
    from: NodeId,
    /// It must cover this op.
    need: u64,
    /// The op of the snapshot being received (0 before the first chunk).
    snap_op: u64,
    offset: u64,
    file: std::fs::File,
    asked: Instant,
    /// The last answer from `from`.
    heard: Instant,
    started: Instant,
}

/// A snapshot on its way from here to another replica.
struct Sending {
    op: u64,
    file: std::fs::File,
    total: u64,
    asked: Instant,
}

/// A download nobody asked the next chunk of for this long is over.
const SENDING_IDLE: Duration = Duration::from_secs(60);

/// How long a replica waits for a snapshot chunk before it asks again.
const FETCH_RETRY: Duration = Duration::from_secs(1);
/// How long a snapshot's source may stay silent before the download is
/// given up (and the leader asked again).
const FETCH_GIVE_UP: Duration = Duration::from_secs(15);
/// The longest wait before asking again after downloads were given up.
const FETCH_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Bytes of snapshot per message.
const SNAPSHOT_CHUNK: usize = 512 << 10;

/// How often a replica whose disk is full tries its log again.
const DISK_RETRY: Duration = Duration::from_secs(1);

struct Node<'a> {
    ui: &'a Ui,
    me: NodeId,
    cluster_id: u64,
    app_addr: SocketAddr,
    data_dir: PathBuf,
    engine: Replica,
    log: SegmentLog<FsStorage>,
    transport: Box<dyn Transport>,
    poll: Poll,
    clients: HashMap<Token, ClientConn>,
    client_of_conn: HashMap<u64, Token>,
    apps: HashMap<u64, AppConn>,
    app_tokens: HashMap<Token, u64>,
    /// Program connections still connecting, since when: nothing more is
    /// applied until they are up (the program must see their input in log
    /// order; see [`Node::connect_app`]).
    app_connecting: HashMap<u64, Instant>,
    next_token: usize,
    next_conn: u64,
    held: Vec<(u64, NodeId, crate::consensus::Message)>,
    /// Client input read in this turn of the loop, proposed as one batch at its end.
    proposals: Proposals,
    /// Entries the engine holds that the log could not take (its disk is
    /// full), oldest first, and when that started: retried every
    /// [`DISK_RETRY`]; no client input is read meanwhile.
    unwritten: Vec<Entry>,
    disk_full: Option<(Instant, Instant)>,
    /// An fsync of the log is under way on the fsync thread.
    sync_inflight: bool,
    /// Clients that had more to read when their turn ended.
    unread: Vec<Token>,
    /// Program connections whose output was not all read in their turn
    /// (at most [`APP_READS_PER_TURN`] reads each), and whether their
    /// event said the program closed: read again next turn.
    app_unread: Vec<(Token, bool)>,
    /// Clients not read while the program is behind (too many committed
    /// entries wait for it); read again once it catches up.
    paused: Vec<Token>,
    /// Reused for every socket read (no allocation per event).
    read_buf: Vec<u8>,
    /// The clock: `wall_base` (ns since the Unix epoch, read once) plus the
    /// monotonic time since `start`. Entries carry it, so `log-inspect` and
    /// pcap exports show real times, and it never steps back.
    start: Instant,
    wall_base: u64,
    role: Role,
    /// Operator ids of the replicas, by index (for messages and hooks).
    ids: Vec<u32>,
    hooks: (Option<String>, Option<String>),
    hook_children: Vec<std::process::Child>,
    follower_clients: FollowerClients,
    client_addrs: Vec<SocketAddr>,
    forwards: Arc<Forwards>,
    /// Entries applied to the program since start, and the log's end at start
    /// (reported once the replay reaches it).
    applied: u64,
    replay: Option<(u64, Instant, indicatif::ProgressBar)>,
    /// Committed entries not yet handed to the program.
    apply_queue: ApplyQueue,
    /// At start: committed ops (the saved commit point's) read from the
    /// log into the program in turn, before what the engine delivers.
    log_replay: Option<LogReplay>,
    /// The commit point last saved beside the log, and when.
    commit_saved: (u64, Instant),
    /// The last save failed (said once).
    commit_save_failed: bool,
    /// The connection written to last, and whether its answer is still due.
    last_written: Option<u64>,
    awaiting_answer: Option<Instant>,
    /// Since when an `Await` entry at the front waits for the program's output.
    await_since: Option<Instant>,
    clients_listener: TcpListener,
    /// The program, how it was started, and the commands around it.
    app: Option<App>,
    program: Vec<String>,
    /// Clients whose answers wait in `out` for the end of this delivery (null-program mode).
    acked_clients: Vec<Token>,
    /// Null-program mode: client bytes are frames, answers are ops.
    framed: bool,
    /// Delivered entries the engine keeps in memory (for retransmits);
    /// older ones are read back from the log.
    memory_entries: u64,
    /// `[limits]` of the cluster file.
    limits: crate::config::Limits,
    /// A follower's program is too far behind: no new entries are taken.
    behind: bool,
    /// Refused clients (over `client_connections`, or input refused as too
    /// much is pending), logged at most once a second.
    refused_client: OncePerSecond,
    /// Accepting a client failed (out of descriptors): when to try again
    /// (readiness that was reported once is not reported again).
    accept_again: Option<Instant>,
    accept_failed: OncePerSecond,
    /// Refused peer connections, logged at most once a second.
    refused_peer: OncePerSecond,
    /// When a message too large for a peer's queue was last logged.
    too_large_at: Option<Instant>,
    /// transport = "shm": where the rings of this cluster under the other
    /// program_protocol would be, and when that was last looked at (None:
    /// not shm, or already reported).
    shm_other: Option<(PathBuf, Instant)>,
    /// Connections whose Close the engine refused (busy): proposed again
    /// at the start of the next turn (at most one per connection).
    closes_owed: HashSet<u64>,
    app_timeout: Duration,
    hooks_env: Hooks,
    snapshot_cmd: Option<String>,
    restore_cmd: Option<String>,
    snapshot_every: u64,
    snapshot_timeout: Duration,
    /// The op of the last entry applied to the program, and the connections open then.
    applied_op: u64,
    open_conns: std::collections::BTreeSet<u64>,
    /// The op the snapshot file in the data dir covers (0: none).
    snapshot_op: u64,
    next_snapshot_at: u64,
    snapshotting: Snapshotting,
    /// A snapshot being packed on its own thread (the loop goes on).
    packing: Option<Packing>,
    fetch: Option<Fetch>,
    /// Downloads given up in a row, and when the leader is asked again
    /// after the last one (1 s, doubling up to 30 s: a disk too small for
    /// the snapshot is not filled again at once).
    fetch_failures: u32,
    /// Snapshots being sent, per replica asking: the file as it was when
    /// that download began, so that a newer snapshot taken meanwhile
    /// neither restarts it nor lets the log below it go.
    sending: HashMap<NodeId, Sending>,
    refetch_at: Option<Instant>,
    /// A fetched and checked snapshot file, to install.
    install: Option<PathBuf>,
    /// Said once: a snapshot is needed but there is no --restore-cmd.
    told_no_restore: bool,
    /// tap-attach: the TAP device and the VM's stream.
    vm: Option<crate::vm::front::VmFront>,
    /// The TAP device may hold more frames than the last turn read.
    tap_more: bool,
    /// The TAP device was not read because input is held (see on_tap).
    tap_paused: bool,
    /// The VM's stream failed (said once).
    vm_broken: bool,
    /// tap-attach: the leader gives its VM each frame as it proposes it.
    vm_early: bool,
    /// Reading from the VM stopped while its output waited for a commit: read again.
    vm_more: bool,
    /// The VM's stream is watched for room to write: frames wait for it.
    /// (Only then: a UNIX socket reports room each time its reader takes
    /// something, which would wake the loop once per frame for nothing.)
    vm_wait_writable: bool,
    /// Every entry up to this op is handed to the VM (frames written to it,
    /// the rest passed over), committed or, on the leader, given early.
    vm_given_op: u64,
    /// Frames given to the VM before they committed: their op and xxh3.
    vm_early_ops: VecDeque<(u64, u64)>,
    /// The view in which frames were last given early.
    vm_early_view: u64,
    /// The VM received input the log does not hold (a deposed leader's
    /// early frames that the new view dropped): why, to stop with.
    vm_lost: Option<String>,
    /// `program_protocol = "resp"`: every client's commands down one connection.
    mux: Option<crate::app::resp::Mux>,
    /// The shared program connection failed (or the program's answers no
    /// longer line up with the commands): why, to stop with.
    program_lost: Option<String>,
    /// tap-attach --qemu-socket: where QEMU listens.
    vm_socket: Option<PathBuf>,
    /// Requests from the admin socket and the metrics endpoint.
    admin_rx: Option<std::sync::mpsc::Receiver<crate::admin::Call>>,
    /// Hashes of the program's output, compared with the leader's.
    digests: divergence::Digests,
    /// This replica's program diverged from the leader's (kept in
    /// `diverged.json` in the data dir until a resync or replay matches).
    diverged: Option<crate::admin::Diverged>,
    on_divergence: Option<String>,
    reset_cmd: Option<String>,
    /// When a mismatch was last logged, and how many were not logged since.
    mismatch_said: Option<(Instant, u64)>,
    /// `falcon failover resync` under way, and how the last one ended.
    resync: Option<resync::Resync>,
    last_resync: Option<crate::admin::ResyncReport>,
    /// Where the replay at start began (0: from the first op).
    replay_base: u64,
    /// The replay at start handed its last entry to the program: check
    /// the divergence mark once the program's output is in.
    replay_done: Option<Instant>,
    /// When this replica last handed the leadership on because its program
    /// diverged (once per [`resync::HAND_OFF_EVERY`] at most).
    handed_off: Option<Instant>,
    /// A leader with a full disk tries to hand the leadership on again at this time.
    disk_hand_off: Option<Instant>,
    /// The engine asked for a snapshot while a resync fetched the leader's: asked after it.
    deferred_fetch: Option<(NodeId, u64)>,
    /// Counts and times for them.
    observed: admin::Observed,
}

/// The last op a restarting replica knows committed: its saved commit
/// point when that matches its log (ops `stored_first..`), else
/// `stored_first - 1` (what a snapshot covers, or nothing). A commit point
/// that does not match is said and set aside: it only saves time.
fn known_commit(
    data_dir: &Path,
    log: &SegmentLog<FsStorage>,
    owner: (u64, u32),
    stored_first: u64,
    ui: &Ui,
) -> u64 {
    let none = stored_first - 1;
    let cp = match commit_point::read(data_dir) {
        Ok(Some(cp)) if cp.op <= none => return none,
        Ok(Some(cp)) => cp,
        Ok(None) => return none,
        Err(why) => {
            ui.warn(&format!(
                "{why}: set aside; the commit point comes from the cluster"
            ));
            return none;
        }
    };
    let view_at = |op| log.entry(op).ok().map(|e| e.view);
    match commit_point::check(&cp, owner, stored_first, log.last_op(), view_at) {
        Ok(op) => {
            ui.note(&format!(
                "ops up to {op} are committed (the commit point saved in {}): the program replays them from the log at once",
                data_dir.join(commit_point::FILE_NAME).display()
            ));
            op
        }
        Err(why) => {
            ui.warn(&format!(
                "the commit point saved in {} is set aside: {why}; the commit point comes from the cluster",
                data_dir.join(commit_point::FILE_NAME).display()
            ));
            none
        }
    }
}

/// The connections open at op `upto`: those open at `from - 1`, and the
/// log's opens and closes from `from` to `upto` (read a batch at a time).
fn open_conns_at(
    log: &SegmentLog<FsStorage>,
    open: &[u64],
    from: u64,
    upto: u64,
) -> Result<Vec<u64>, NodeError> {
    let mut open: std::collections::BTreeSet<u64> = open.iter().copied().collect();
    let mut next = from;
    while next <= upto {
        let want = (upto + 1 - next) as usize;
        let batch = log.read(
            next,
            want.min(resync::RESYNC_BATCH),
            resync::RESYNC_BATCH_BYTES,
        )?;
        let Some(end) = batch.last().map(|e| e.op) else {
            break;
        };
        for e in &batch {
            e.track_open(&mut open);
        }
        next = end + 1;
    }
    Ok(open.into_iter().collect())
}

/// Committed ops read from the log into the program in turn: `next..=upto`.
struct LogReplay {
    next: u64,
    upto: u64,
}

/// The commit point is saved beside the log at most this often.
const COMMIT_SAVE_EVERY: Duration = Duration::from_secs(1);

/// Events read this turn, to propose as one batch, and their payload bytes.
#[derive(Default)]
struct Proposals {
    events: Vec<Event>,
    bytes: usize,
}

impl Proposals {
    fn push(&mut self, e: Event) {
        self.bytes += e.payload.len();
        self.events.push(e);
    }
    fn extend(&mut self, events: impl IntoIterator<Item = Event>) {
        for e in events {
            self.push(e);
        }
    }
    fn len(&self) -> usize {
        self.events.len()
    }
    fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
    fn take(&mut self) -> Vec<Event> {
        self.bytes = 0;
        std::mem::take(&mut self.events)
    }
}

/// Committed entries waiting for the program, and their bytes
/// ([`crate::consensus::entry_bytes`]).
#[derive(Default)]
struct ApplyQueue {
    entries: VecDeque<Entry>,
    bytes: usize,
}

impl ApplyQueue {
    fn len(&self) -> usize {
        self.entries.len()
    }
    fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    fn bytes(&self) -> usize {
        self.bytes
    }
    fn front(&self) -> Option<&Entry> {
        self.entries.front()
    }
    fn back(&self) -> Option<&Entry> {
        self.entries.back()
    }
    fn pop_front(&mut self) -> Option<Entry> {
        let e = self.entries.pop_front()?;
        self.bytes -= crate::consensus::entry_bytes(&e);
        Some(e)
    }
    fn extend(&mut self, entries: impl IntoIterator<Item = Entry>) {
        for e in entries {
            self.bytes += crate::consensus::entry_bytes(&e);
            self.entries.push_back(e);
        }
    }
    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }
    /// The program is `limits.program_backlog` entries or
    /// `limits.program_backlog_bytes` bytes behind (`half`: half of either).
    fn over(&self, limits: &crate::config::Limits, half: bool) -> bool {
        let d = if half { 2 } else { 1 };
        self.len() >= (limits.program_backlog / d).max(1)
            || self.bytes >= limits.program_backlog_bytes / d
    }

    /// Holds enough of a replay from the log to keep the program busy:
    /// four reads' worth (or half the backlog limits, if less). The log is
    /// read again as the program takes them, so memory does not grow with
    /// the log.
    fn read_ahead(&self, limits: &crate::config::Limits) -> bool {
        self.over(limits, true)
            || self.len() >= 4 * resync::RESYNC_BATCH
            || self.bytes >= 4 * resync::RESYNC_BATCH_BYTES
    }

    /// Queues ops `*next..=last` of a replay from the log, a batch at a
    /// time, until it holds a [`ApplyQueue::read_ahead`]; `*next` moves on.
    fn fill_from_log(
        &mut self,
        log: &SegmentLog<FsStorage>,
        limits: &crate::config::Limits,
        next: &mut u64,
        last: u64,
    ) -> Result<(), LogError> {
        while !self.read_ahead(limits) && *next <= last {
            let want = (last + 1 - *next) as usize;
            let batch = log.read(
                *next,
                want.min(resync::RESYNC_BATCH),
                resync::RESYNC_BATCH_BYTES,
            )?;
            let Some(end) = batch.last().map(|e| e.op) else {
                break;
            };
            *next = end + 1;
            self.extend(batch);
        }
        Ok(())
    }
}

impl Node<'_> {
    fn now(&self) -> u64 {
        self.wall_base + self.start.elapsed().as_nanos() as u64
    }

    /// How long an idle turn may sleep: until the engine's next timer, at
    /// most `max`. A timer already past (the last tick did not move it)
    /// gets [`TICK`], never a busy loop.
    fn idle_wait(&self, max: Duration) -> Duration {
        match self.engine.next_timer() {
            None => max,
            Some(at) => match at.checked_sub(self.now()) {
                Some(left) if left > 0 => Duration::from_nanos(left).min(max),
                _ => TICK.min(max),
            },
        }
    }

    /// Appends to the log. A full disk is not fatal: what did not fit waits
    /// in memory (the engine holds it anyway) and is not acknowledged, the
    /// replica takes no client input, and [`retry_unwritten`] tries again.
    fn append(&mut self, entries: Vec<Entry>) -> Result<(), NodeError> {
        match self.log.append(&entries) {
            Ok(()) => Ok(()),
            Err(e) if e.is_no_space() => {
                let written = self.log.last_op();
                self.unwritten = entries.into_iter().filter(|e| e.op > written).collect();
                if self.disk_full.is_none() {
                    self.ui.error(&format!(
                        "disk full: {e}; this replica takes no new input and acknowledges nothing past op {written} until space returns (the log is intact; retrying every {} s)",
                        DISK_RETRY.as_secs()
                    ));
                    self.disk_full = Some((Instant::now(), Instant::now()));
                }
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Client input is not read now: the program is behind, too much is
    /// proposed and not committed (in entries or bytes), or the log's disk
    /// is full.
    fn input_held(&self) -> bool {
        let pending_bytes = self.engine.memory().1 - self.engine.window().1 + self.proposals.bytes;
        self.apply_queue.over(&self.limits, false)
            || self.engine.last_op() - self.engine.commit() + self.proposals.len() as u64
                >= self.limits.pending_entries / 2
            || pending_bytes >= self.limits.pending_bytes / 2
            || self.disk_full.is_some()
            || self.resync.is_some()
            // A diverged replica elected leader serves no client while it
            // hands the leadership on.
            || (self.diverged.is_some() && self.engine.transferring_to().is_some())
    }

    /// A follower whose program is `program_backlog` entries (or
    /// `program_backlog_bytes`) behind takes no new entries until it is back
    /// under half of that; said once per episode.
    fn program_behind(&mut self) -> bool {
        if self.apply_queue.over(&self.limits, false) && !self.behind {
            self.behind = true;
            self.ui.warn(&format!(
                "the program is {} entries ({}) behind (limits.program_backlog, limits.program_backlog_bytes): taking no new entries from the leader until it catches up",
                self.apply_queue.len(),
                crate::output::human_bytes(self.apply_queue.bytes() as u64)
            ));
        } else if self.behind && !self.apply_queue.over(&self.limits, true) {
            self.behind = false;
            self.ui.note("the program caught up: taking entries again");
        }
        self.behind
    }

    /// Records where the log ends, at a clean stop (see [`seal`]). Not with
    /// `sync = "never"`: the log's tail is not on disk then, and a power loss
    /// would leave the seal ahead of the log.
    fn seal(&mut self) {
        if self.log.options().sync == crate::log::SyncPolicy::Never {
            return;
        }
        self.save_commit_point(true);
        let s = seal::Seal {
            cluster_id: self.cluster_id,
            node_id: self.me,
            last_op: self.log.last_op(),
            last_crc: self.log.last_crc(),
        };
        if let Err(e) = seal::write(&self.data_dir, &s) {
            self.ui.warn(&format!(
                "could not seal the log in {} ({e}): the next start cannot check that it is unchanged",
                self.data_dir.display()
            ));
        }
    }

    /// Saves the commit point beside the log (see [`commit_point`]): the
    /// engine's, as far as the log has it on disk. `now`: at a clean stop
    /// (synced); else at most every [`COMMIT_SAVE_EVERY`], not synced.
    fn save_commit_point(&mut self, now: bool) {
        let op = self.engine.commit().min(self.log.durable_op());
        let (saved, at) = self.commit_saved;
        // At a clean stop the same op again, synced this time.
        if op == 0 || op < saved || (!now && (op == saved || at.elapsed() < COMMIT_SAVE_EVERY)) {
            return;
        }
        let view = match self.engine.entry(op) {
            Some(e) => Some(e.view),
            None => self.log.entry(op).ok().map(|e| e.view),
        };
        let Some(view) = view else {
            return;
        };
        self.commit_saved = (op, Instant::now());
        let cp = commit_point::CommitPoint {
            cluster_id: self.cluster_id,
            node_id: self.me,
            op,
            view,
        };
        match commit_point::write(&self.data_dir, &cp, now) {
            Ok(()) => self.commit_save_failed = false,
            Err(e) if !self.commit_save_failed => {
                self.commit_save_failed = true;
                self.ui.warn(&format!(
                    "could not save the commit point in {} ({e}): a restart learns it from the cluster instead (said once until a save works again)",
                    self.data_dir.display()
                ));
            }
            Err(_) => {}
        }
    }

    /// Hands the program the committed ops of the replay at start, read
    /// from the log a batch at a time as it takes them.
    fn feed_replay(&mut self) -> Result<(), NodeError> {
        let Some(r) = &mut self.log_replay else {
            return Ok(());
        };
        let last = r.upto.min(self.log.last_op());
        self.apply_queue
            .fill_from_log(&self.log, &self.limits, &mut r.next, last)?;
        if r.next > r.upto {
            self.log_replay = None;
        }
        self.pump_apply();
        Ok(())
    }

    /// A leader whose disk is full takes no input: it hands the leadership to
    /// a replica that can write, so the cluster goes on without it (at the
    /// view change it stops, since it cannot record the new view behind
    /// entries it could not write). Tried again once a transfer could have
    /// timed out, or, with no replica reachable, after a longer while.
    fn hand_off_full_disk(&mut self) -> Result<(), NodeError> {
        if self.disk_full.is_none()
            || self.role != Role::Leader
            || self.ids.len() < 2
            || self.engine.transferring_to().is_some()
            || self.disk_hand_off.is_some_and(|t| Instant::now() < t)
        {
            return Ok(());
        }
        let again = if self.hand_off(self.engine.view(), "its log's disk is full")? {
            Duration::from_nanos(self.engine.config().transfer_timeout_ns) + DISK_RETRY
        } else {
            resync::HAND_OFF_EVERY
        };
        self.disk_hand_off = Some(Instant::now() + again);
        Ok(())
    }

    /// Tries the entries a full disk kept out of the log again, every
    /// [`DISK_RETRY`] (paused clients resume with the loop's others).
    fn retry_unwritten(&mut self) -> Result<(), NodeError> {
        match self.disk_full {
            Some((_, tried)) if tried.elapsed() >= DISK_RETRY => self.write_unwritten().map(|_| ()),
            _ => Ok(()),
        }
    }

    /// Appends what a full disk kept out of the log; true when all of it is
    /// written now (and the disk is no longer full).
    fn write_unwritten(&mut self) -> Result<bool, NodeError> {
        let Some((since, _)) = self.disk_full else {
            return Ok(true);
        };
        self.disk_full = Some((since, Instant::now()));
        let entries = std::mem::take(&mut self.unwritten);
        if !entries.is_empty() {
            self.append(entries)?;
        }
        if !self.unwritten.is_empty() {
            return Ok(false);
        }
        self.disk_full = None;
        self.ui.note(&format!(
            "disk space is back: the log grows again after {:.1} s; taking input",
            since.elapsed().as_secs_f64()
        ));
        Ok(true)
    }

    /// Whether a refusal (of a client connection, or of input) may be
    /// logged now: at most once a second.
    fn refusal_loggable(&mut self) -> bool {
        self.refused_client.due().is_some()
    }

    /// The log made more durable than the engine knows (an fsync, an
    /// append under sync = "always", a save on the loop): held messages
    /// go, and the engine hears of it (the leader counts its own entries
    /// only so).
    fn tell_durable(&mut self) -> Result<(), NodeError> {
        let d = self.log.durable_op();
        if d.min(self.engine.last_op()) > self.engine.durable() {
            self.release();
            self.step(Input::Durable { op: d })?;
        }
        Ok(())
    }

    fn step(&mut self, input: Input) -> Result<(), NodeError> {
        let mut out = Vec::new();
        let now = self.now();
        self.engine.step(now, input, &mut out);
        for cmd in out {
            self.execute(cmd)?;
        }
        Ok(())
    }

    fn execute(&mut self, cmd: Command) -> Result<(), NodeError> {
        match cmd {
            Command::Append(entries) => {
                if self.vm_early {
                    self.give_early(&entries);
                }
                if self.unwritten.is_empty() {
                    self.append(entries)?;
                } else {
                    self.unwritten.extend(entries);
                }
            }
            Command::Truncate { after } => {
                self.unwritten.retain(|e| e.op <= after);
                self.log.truncate_after(after)?;

                self.held.retain(|h| h.0 <= after);
            }
            Command::SaveState(st) => {
                // A new view's state must never be on disk ahead of the
                // entries it stands for (a restart would offer a short log
                // as the newest): write them now, or stop.
                if !self.write_unwritten()? {
                    // It stops here. So that the others need not wait out an
                    // election timeout to notice, it tells them the view it
                    // was moving to (as a leader handing the leadership on):
                    // that vote needs nothing on disk, since this replica
                    // never acts in that view.
                    for to in 0..self.ids.len() as NodeId {
                        if to != self.me {
                            self.send(
                                to,
                                crate::consensus::Message::StartViewChange { view: st.view },
                            );
                        }
                    }
                    self.transport.flush();
                    return Err(NodeError::Io {
                        context: format!(
                            "disk full while changing views: the log in {} cannot take ops from {}; stopping rather than record a view whose entries are not on disk (free space and restart the replica)",
                            self.data_dir.display(),
                            self.unwritten[0].op
                        ),
                        source: io::Error::from_raw_os_error(libc::ENOSPC),
                    });
                }
                self.sync()?;
                save_state(&self.data_dir, st).map_err(io_err(format!(
                    "saving the view state in {}",
                    self.data_dir.display()
                )))?;
            }
            Command::Send {
                to,
                msg,
                after_durable,
            } => {
                if after_durable <= self.log.durable_op() {
                    self.send(to, msg);
                } else {
                    self.held.push((after_durable, to, msg));
                }
            }
            Command::Deliver(entries) => {
                let clock = self.now();
                self.observed
                    .committed(&entries, self.role == Role::Leader, clock);
                match (&mut self.resync, &mut self.log_replay) {
                    // The program is being rebuilt from the log: these
                    // entries are in it, and are read from it in turn.
                    (Some(r), _) if !r.fetching() => r.delivered(&entries),
                    // So at start, until the replay has read what the
                    // saved commit point covered.
                    (_, Some(r)) => {
                        if let Some(e) = entries.last() {
                            r.upto = r.upto.max(e.op);
                        }
                    }
                    _ => {
                        // Ops a rebuilt program already has (it was rebuilt
                        // from a snapshot ahead of this replica) are skipped.
                        let have = self.apply_queue.back().map_or(self.applied_op, |e| e.op);
                        self.apply_queue
                            .extend(entries.into_iter().filter(|e| e.op > have));
                        self.pump_apply();
                    }
                }
                self.release_vm_output();
                // Memory holds a window of delivered entries; older ones are
                // read back from the log for a follower that needs them.
                let (keep, keep_bytes) = (self.memory_entries, self.limits.memory_window);
                let (held, held_bytes) = self.engine.window();
                if held > 2 * keep || held_bytes > keep_bytes {
                    let below = self.engine.window_start(keep, keep_bytes / 2);
                    self.step(Input::Forget { below })?;
                }
                // One write per client for all the answers of this delivery.
                for t in std::mem::take(&mut self.acked_clients) {
                    if let Some(c) = self.clients.get_mut(&t) {
                        flush(&mut c.stream, &mut c.out);
                    }
                }
            }
            Command::RoleChanged { role, view, leader } => {
                let was = self.role;
                self.role = role;
                self.observed.role_changed(was, role, view);
                // Only this view's leader may write our log from now on.
                self.transport
                    .grant(view, (role != Role::ViewChange).then_some(leader));
                let (me, lead) = (self.ids[self.me as usize], self.ids[leader as usize]);
                // Clients passed on to the old leader: their sessions there
                // end with its view, and a dead host would hold them until
                // TCP gives up. They are closed now, and reconnect.
                let closed = self
                    .forwards
                    .close_all_but(self.client_addrs[leader as usize]);
                if closed > 0 {
                    self.ui.note(&format!(
                        "closed {closed} client connection(s) forwarded to the old leader; their clients reconnect"
                    ));
                }
                let name = match role {
                    Role::Leader => "leader",
                    Role::Follower => "follower",
                    Role::ViewChange => "changing views",
                };
                // One line per change: a view change, then the role it ends in.
                self.ui.note(&match role {
                    Role::Leader => format!("role: replica {me} leads view {view}"),
                    Role::Follower => format!(
                        "role: replica {me} follows replica {lead} in view {view}"
                    ),
                    Role::ViewChange => format!(
                        "view change: replica {me} moves to view {view}, which replica {lead} would lead"
                    ),
                });
                let hook = match role {
                    Role::Leader => self.hooks.0.clone(),
                    Role::Follower => self.hooks.1.clone(),
                    Role::ViewChange => None,
                };
                if let (Some(cmd), true) = (hook, was != role) {
                    let spawned = std::process::Command::new("sh")
                        .arg("-c")
                        .arg(&cmd)
                        .env("FALCON_ROLE", name)
                        .env("FALCON_VIEW", view.to_string())
                        .env("FALCON_NODE", me.to_string())
                        .env("FALCON_LEADER", lead.to_string())
                        .stdin(std::process::Stdio::null())
                        .spawn();
                    match spawned {
                        Ok(child) => self.hook_children.push(child),
                        Err(e) => self
                            .ui
                            .error(&format!("running the {name} hook {cmd:?}: {e}")),
                    }
                }
                if role == Role::Leader && was != Role::Leader {
                    if let Some(vm) = &mut self.vm {
                        // The VM is reached through this host now.
                        match vm.announce() {
                            Ok(true) => self.ui.note(&format!(
                                "announced the VM on {} (gratuitous ARP)",
                                vm.tap_name()
                            )),
                            Ok(false) => self
                                .ui
                                .detail("the VM's address is not known yet: no gratuitous ARP"),
                            Err(e) => self
                                .ui
                                .warn(&format!("announcing the VM on {}: {e}", vm.tap_name())),
                        }
                    }
                }
                if role == Role::Leader
                    && was != Role::Leader
                    && (self.diverged.is_some() || self.resync.is_some())
                {
                    self.hand_off_diverged(view)?;
                }
                if was == Role::Leader && role != Role::Leader {
                    if let Some(vm) = &mut self.vm {
                        // Its VM's answers to input not yet committed never go out.
                        if vm.drop_held() {
                            self.vm_more = true;
                        }
                    }
                    // Clients of the old leader reconnect; the new view closes their connections everywhere.
                    let tokens: Vec<Token> = self.clients.keys().copied().collect();
                    for t in tokens {
                        self.drop_client(t, false);
                    }
                }
            }
            Command::Rejected { events, reason } => {
                if matches!(reason, Reject::Busy) && self.refusal_loggable() {
                    self.ui.warn(&format!(
                        "{} entries wait for a majority (limits.pending_entries); closing the clients whose input could not be taken",
                        self.engine.last_op() - self.engine.commit()
                    ));
                }
                // Input that cannot be ordered must not vanish silently: close its connection.
                for ev in events {
                    if ev.kind == Kind::Digest {
                        // Only a check of the program's output: nothing to close.
                        continue;
                    }
                    let client = self.client_of_conn.get(&ev.conn).copied();
                    if let Some(t) = client {
                        self.drop_client(t, false);
                    }
                    // Still the leader: the log must close the connection on
                    // every replica (or the program keeps it open there), so
                    // the Close is proposed again next turn, until it is taken.
                    if matches!(reason, Reject::Busy)
                        && (client.is_some() || ev.kind == Kind::Close)
                        && self.closes_owed.len() < CLOSES_OWED_MAX
                    {
                        self.closes_owed.insert(ev.conn);
                    }
                }
            }
            Command::FetchSnapshot { from, op } => self.start_fetch(from, op)?,
            Command::SendFromLog {
                to,
                mut msg,
                from,
                upto,
            } => {
                // A chunk: the receiver asks for the rest (a CatchUp's
                // follower, a DoViewChange's new leader).
                let count = (upto + 1).saturating_sub(from) as usize;
                let read = self
                    .log
                    .read(from, count, self.engine.config().chunk_bytes_max)?;
                if read.first().map(|e| e.op) != Some(from) {
                    self.ui.error(&format!(
                        "replica {} needs ops {from}..={upto}, but this log holds {}..={}",
                        self.ids[to as usize],
                        self.log.first_op(),
                        self.log.last_op()
                    ));
                    return Ok(());
                }
                if let Some(entries) = msg.entries_mut() {
                    *entries = read;
                }
                self.send(to, msg);
            }
        }
        Ok(())
    }

    /// Proposes the client input of this turn as one batch: one Prepare per
    /// follower and one log write for all of it.
    ///
    /// While an fsync of the log is under way, input waits for it (up to
    /// [`PROPOSE_HOLD_MAX`] events): it would wait for the next fsync anyway,
    /// and one batch then costs one Prepare, one append and one fsync on
    /// every replica instead of one each per request.
    fn propose(&mut self) -> Result<(), NodeError> {
        if self.sync_inflight && self.proposals.len() < PROPOSE_HOLD_MAX {
            return Ok(());
        }
        while !self.proposals.is_empty() {
            let events = self.proposals.take();
            self.step(Input::Propose(events))?;
        }
        Ok(())
    }

    fn send(&mut self, to: NodeId, msg: crate::consensus::Message) {
        let env = Envelope {
            cluster: self.cluster_id,
            from: self.me,
            to,
            msg,
        };
        // A full queue drops the message: the engine retransmits what matters.
        if let Err(e @ crate::transport::SendError::TooLarge { .. }) = self.transport.send(&env) {
            // It never fits: retransmitting it cannot help. Say so (every 10 s).
            if self
                .too_large_at
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
            {
                self.too_large_at = Some(Instant::now());
                self.ui
                    .error(&format!("{e} (a {} message)", env.msg.name()));
            }
        }
    }

    fn sync(&mut self) -> Result<(), NodeError> {
        self.log.sync()?;
        self.release();
        Ok(())
    }

    /// Sends every held message whose barrier the log has reached.
    fn release(&mut self) {
        let ready: Vec<_> = {
            let durable = self.log.durable_op();
            let (ready, held): (Vec<_>, Vec<_>) = std::mem::take(&mut self.held)
                .into_iter()
                .partition(|h| h.0 <= durable);
            self.held = held;
            ready
        };
        for (_, to, msg) in ready {
            self.send(to, msg);
        }
    }

    /// program_protocol = "resp": the clients' unfinished commands a
    /// snapshot carried, once its connections are open again.
    fn import_resp_state(&mut self, state: &[u8], problem: Option<&str>) {
        if let Some(why) = problem {
            self.ui.error(&format!(
                "snapshot: {why}; clients that were in the middle of a command then may see errors"
            ));
        }
        if state.is_empty() {
            return;
        }
        let Some(m) = &mut self.mux else {
            self.ui.warn("the snapshot holds falcon's state for program_protocol = \"resp\", which this replica's cluster file does not set: ignored");
            return;
        };
        if let Err(e) = m.import(state) {
            self.ui.error(&format!(
                "snapshot: {e}; clients that were in the middle of a command then may see errors"
            ));
        }
    }

    /// program_protocol = "resp": what the loop's turn handed the program
    /// goes in one write, at its end.
    fn flush_shared(&mut self) {
        if self.app_connecting.contains_key(&SHARED) {
            return;
        }
        if let Some(a) = self.apps.get_mut(&SHARED).filter(|a| !a.out.is_empty()) {
            flush(&mut a.stream, &mut a.out);
        }
    }

    /// Hands committed entries to the program, one connection at a time:
    /// before bytes go to another connection, the program answers the last
    /// one (or 200 ms pass), so the program sees requests of different
    /// connections in log order on every replica — also when a replica
    /// replays thousands of entries at once. (With `program_protocol =
    /// "resp"` everything goes down one connection, in log order: nothing
    /// waits for an answer.)
    fn pump_apply(&mut self) {
        if !matches!(self.snapshotting, Snapshotting::Idle) {
            // The program's state must stay at the snapshot's op until it is written.
            return;
        }
        while let Some(front) = self.apply_queue.front() {
            // A connection to the program still connecting holds everything
            // after it, however long (the replica stops after
            // APP_CONNECT_WAIT): the program sees the input in log order.
            // A replica that lost its program (it stops) applies no more.
            if !self.app_connecting.is_empty() || self.program_lost.is_some() {
                return;
            }
            // The leader's client waited for this much output before its
            // next input: so does this replica's program (or ANSWER_WAIT passes).
            // Down one connection the order is the connection's: nothing waits.
            if front.kind == Kind::Await && self.mux.is_none() {
                let (conn, want) = (front.conn, await_offset(front));
                let behind = self.awaits_output(front);
                let since = *self.await_since.get_or_insert_with(Instant::now);
                if behind && since.elapsed() < ANSWER_WAIT {
                    return;
                }
                if behind {
                    let have = self.out_count(conn);
                    // This copy wrote less than the leader's (its answer
                    // differs, or is late): later waits on the connection
                    // allow for the difference rather than time out each.
                    if let Some(a) = self.apps.get_mut(&conn) {
                        a.await_gap = want.saturating_sub(have);
                    }
                }
                self.await_since = None;
            }
            let Some(e) = self.apply_queue.front() else {
                return;
            };
            // Wait for the last connection's answer before bytes go to another
            // connection, and before that connection closes (a multi-threaded
            // program such as memcached would otherwise run the next
            // connection's request first).
            let must_wait = self.mux.is_none()
                && match e.kind {
                    Kind::Data => self
                        .last_written
                        .is_some_and(|c| c != e.conn && self.apps.contains_key(&c)),
                    Kind::Close => {
                        self.last_written == Some(e.conn) && self.apps.contains_key(&e.conn)
                    }
                    _ => false,
                };
            if must_wait
                && self
                    .awaiting_answer
                    .is_some_and(|t| t.elapsed() < ANSWER_WAIT)
            {
                return;
            }
            // The program reads slower than input commits: wait for its
            // connection to drain (the queue pushes back on clients) rather
            // than buffer past the limit. Waiting keeps the order; closing
            // the connection would depend on each replica's timing.
            // Commands falcon answers itself wait behind the program's
            // answers without a byte in the connection's buffer: the
            // queue of answers owed is bounded too.
            if e.kind == Kind::Data && self.mux.as_ref().is_some_and(|m| m.owed() >= OWED_MAX) {
                return;
            }
            let to = if self.mux.is_some() { SHARED } else { e.conn };
            if e.kind == Kind::Data
                && self.apps.get(&to).is_some_and(|a| {
                    !a.out.is_empty() && a.out.len() + e.payload.len() > self.limits.client_buffer
                })
            {
                return;
            }
            let e = self.apply_queue.pop_front().expect("checked");
            if e.kind == Kind::Data && self.apps.contains_key(&e.conn) {
                self.last_written = Some(e.conn);
                self.awaiting_answer = Some(Instant::now());
            }
            self.apply(e);
        }
    }

    // ---- snapshots ----

    fn snapshot_path(&self) -> PathBuf {
        self.data_dir.join(snapshot::FILE_NAME)
    }

    /// Takes a snapshot every `snapshot_every` applied entries: pause
    /// applying, wait for the program's last answer, run `--snapshot-cmd`,
    /// pack what it wrote, drop the log segments the snapshot covers.
    fn drive_snapshot(&mut self) -> Result<(), NodeError> {
        self.finish_packing()?;
        match &mut self.snapshotting {
            Snapshotting::Idle => {
                // A diverged program's state is not the cluster's: no
                // snapshot of it (and no log compaction) until a resync.
                if self.snapshot_cmd.is_some()
                    && self.applied_op >= self.next_snapshot_at
                    && self.fetch.is_none()
                    && self.install.is_none()
                    && self.packing.is_none()
                    && self.diverged.is_none()
                    && self.resync.is_none()
                {
                    self.snapshotting = Snapshotting::Draining;
                }
                Ok(())
            }
            Snapshotting::Draining => {
                let answered = self
                    .awaiting_answer
                    .is_none_or(|t| t.elapsed() >= ANSWER_WAIT)
                    && self.mux.as_ref().is_none_or(|m| m.owed() == 0);
                if !answered || self.apps.values().any(|a| !a.out.is_empty()) {
                    return Ok(());
                }
                let cmd = self.snapshot_cmd.clone().expect("checked");
                let work = self.data_dir.join("snapshot.work");
                let _ = std::fs::remove_dir_all(&work);
                std::fs::create_dir_all(&work)
                    .map_err(io_err(format!("creating {}", work.display())))?;
                let op = self.applied_op;
                let op_s = op.to_string();
                let mut command = self.hooks_env.command(
                    &cmd,
                    &[
                        ("FALCON_SNAPSHOT_DIR", work.as_os_str()),
                        ("FALCON_OP", op_s.as_ref()),
                    ],
                );
                // Its own process group: a timeout kills all it started.
                std::os::unix::process::CommandExt::process_group(&mut command, 0);
                let spawned = command.spawn();
                match spawned {
                    Ok(child) => {
                        self.snapshotting = Snapshotting::Running {
                            child,
                            op,
                            open_conns: self.open_conns.iter().copied().collect(),
                            started: Instant::now(),
                            say_at: SNAPSHOT_CMD_SAY_AFTER,
                        };
                    }
                    Err(e) => {
                        self.ui
                            .error(&format!("running --snapshot-cmd {cmd:?}: {e}"));
                        self.snapshotting = Snapshotting::Idle;
                        self.next_snapshot_at = self.applied_op + self.snapshot_every;
                    }
                }
                Ok(())
            }
            Snapshotting::Running {
                child,
                op,
                open_conns,
                started,
                say_at,
            } => {
                let status = match child.try_wait() {
                    Ok(None) if started.elapsed() >= self.snapshot_timeout => {
                        let pid = child.id();
                        self.ui.error(&format!(
                            "--snapshot-cmd (pid {pid}) ran past --snapshot-timeout ({}); killing it and everything it started",
                            humantime::format_duration(self.snapshot_timeout)
                        ));
                        // SAFETY: kill(2) on the process group the command leads.
                        unsafe { libc::kill(-(pid as libc::pid_t), libc::SIGKILL) };
                        child.wait()
                    }
                    Ok(None) => {
                        if started.elapsed() >= *say_at {
                            *say_at += SNAPSHOT_CMD_SAY_EVERY;
                            let (pid, secs) = (child.id(), started.elapsed().as_secs());
                            self.ui.warn(&format!(
                                "--snapshot-cmd (pid {pid}) has run for {secs} s; this replica applies nothing until it ends (kill it to go on without this snapshot; --snapshot-timeout kills it at {})",
                                humantime::format_duration(self.snapshot_timeout)
                            ));
                        }
                        return Ok(());
                    }
                    Ok(Some(status)) => Ok(status),
                    Err(e) => Err(e),
                };
                let (op, open_conns, took) = (*op, std::mem::take(open_conns), started.elapsed());
                self.snapshotting = Snapshotting::Idle;
                self.next_snapshot_at = self.applied_op + self.snapshot_every;
                let work = self.data_dir.join("snapshot.work");
                let cmd = self.snapshot_cmd.clone().unwrap_or_default();
                match status {
                    Ok(st) if st.success() => {
                        // program_protocol = "resp": clients in the middle
                        // of a command, and those cut off (applying has
                        // been paused since the snapshot's op).
                        let state = self.mux.as_ref().map(|m| m.export()).unwrap_or_default();
                        let saved = if state.is_empty() {
                            Ok(())
                        } else {
                            std::fs::write(work.join(snapshot::RESP_STATE_FILE), &state)
                        };
                        match saved {
                            // Packing reads and checksums every byte: on a
                            // thread, so that the loop goes on (a leader
                            // packing a large snapshot on it would miss its
                            // heartbeats). Applying goes on too: the files
                            // are written.
                            Ok(()) => {
                                let dest = self.data_dir.join("snapshot.packed");
                                let thread = std::thread::Builder::new()
                                    .name("falcon-snapshot".into())
                                    .spawn(move || {
                                        let r = snapshot::pack(&work, op, &open_conns, &dest);
                                        let _ = std::fs::remove_dir_all(&work);
                                        r
                                    })
                                    .map_err(io_err("starting the snapshot thread"))?;
                                self.packing = Some(Packing { op, took, thread });
                                self.pump_apply();
                                return Ok(());
                            }
                            Err(e) => self.ui.error(&format!(
                                "writing {} for the snapshot: {e}",
                                snapshot::RESP_STATE_FILE
                            )),
                        }
                    }
                    Ok(st) => self.ui.error(&format!(
                        "--snapshot-cmd {cmd:?} exited with {st}; no snapshot at op {op} (the log keeps every entry)"
                    )),
                    Err(e) => self
                        .ui
                        .error(&format!("waiting for --snapshot-cmd {cmd:?}: {e}")),
                }
                let _ = std::fs::remove_dir_all(&work);
                self.pump_apply();
                Ok(())
            }
        }
    }

    /// A snapshot packed on its thread takes the place of the last one, and
    /// the log segments it covers go.
    fn finish_packing(&mut self) -> Result<(), NodeError> {
        if !self
            .packing
            .as_ref()
            .is_some_and(|p| p.thread.is_finished())
        {
            return Ok(());
        }
        let p = self.packing.take().expect("checked");
        let packed = self.data_dir.join("snapshot.packed");
        let result = p.thread.join().unwrap_or_else(|_| {
            Err(snapshot::SnapshotError::Io {
                context: "packing the snapshot".into(),
                source: io::Error::other("the snapshot thread panicked"),
            })
        });
        match result {
            // The leader's snapshot was installed meanwhile: it is newer.
            Ok(_) if self.snapshot_op >= p.op || self.install.is_some() => {
                let _ = std::fs::remove_file(&packed);
            }
            Ok(meta) => {
                std::fs::rename(&packed, self.snapshot_path())
                    .map_err(io_err(format!("renaming {}", packed.display())))?;
                std::fs::File::open(&self.data_dir)
                    .and_then(|d| d.sync_all())
                    .map_err(io_err(format!("syncing {}", self.data_dir.display())))?;
                self.snapshot_op = p.op;
                self.ui.note(&format!(
                    "snapshot of the program at op {}: {} files, {} bytes, {:.0} ms",
                    p.op,
                    meta.files,
                    meta.bytes,
                    p.took.as_secs_f64() * 1e3
                ));
                self.compact(p.op)?;
            }
            Err(e) => {
                self.ui.error(&format!("packing the snapshot: {e}"));
                let _ = std::fs::remove_file(&packed);
            }
        }
        Ok(())
    }

    /// Drops log segments (and engine memory) the snapshot at `op` covers,
    /// keeping half an interval so a follower just behind needs no snapshot.
    fn compact(&mut self, op: u64) -> Result<(), NodeError> {
        self.sending.retain(|_, s| s.asked.elapsed() < SENDING_IDLE);
        // A replica still receiving an older snapshot needs the ops after it.
        let below = (op + 1)
            .saturating_sub(self.snapshot_every / 2)
            .min(
                self.sending
                    .values()
                    .map(|s| s.op + 1)
                    .min()
                    .unwrap_or(u64::MAX),
            )
            .max(1);
        let removed = self.log.remove_segments_below(below)?;
        if removed > 0 {
            self.ui.detail(&format!(
                "removed {removed} log segments; the log now starts at op {}",
                self.log.first_op()
            ));
        }
        self.step(Input::Compacted { below })
    }

    /// The engine needs a snapshot up to `op`: fetch it from `from`.
    fn start_fetch(&mut self, from: NodeId, op: u64) -> Result<(), NodeError> {
        if self.fetch.is_some() || self.install.is_some() {
            if self.resync.as_ref().is_some_and(|r| r.fetching()) {
                // Our own fetch for a resync: the engine's comes after it.
                self.deferred_fetch = Some((from, op));
            }
            return Ok(());
        }
        if self.restore_cmd.is_none() {
            if !self.told_no_restore {
                self.told_no_restore = true;
                self.ui.error(&format!(
                    "replica {} is too far behind: replica {} has compacted its log past op {} and offers a snapshot, but this replica has no --restore-cmd to install one; give --restore-cmd, or restart it with an empty data directory",
                    self.ids[self.me as usize],
                    self.ids[from as usize],
                    self.engine.commit()
                ));
            }
            return Ok(());
        }
        let path = self.data_dir.join("snapshot.incoming");
        let file =
            std::fs::File::create(&path).map_err(io_err(format!("creating {}", path.display())))?;
        self.ui.note(&format!(
            "fetching a snapshot covering op {op} from replica {}",
            self.ids[from as usize]
        ));
        self.fetch = Some(Fetch {
            from,
            need: op,
            snap_op: 0,
            offset: 0,
            file,
            asked: Instant::now(),
            heard: Instant::now(),
            started: Instant::now(),
        });
        self.ask_chunk();
        Ok(())
    }

    /// The snapshot on its way will not come (its source went silent, the
    /// leadership moved, this disk cannot hold it): the partial download
    /// goes and the leader is asked again — after a wait that grows when
    /// this replica's own disk failed (`local`). A resync's own download
    /// fails the resync instead.
    pub(super) fn drop_fetch(&mut self, why: &str, local: bool) -> Result<(), NodeError> {
        let Some(f) = self.fetch.take() else {
            return Ok(());
        };
        drop(f.file);
        let _ = std::fs::remove_file(self.data_dir.join("snapshot.incoming"));
        if self.resync.as_ref().is_some_and(|r| r.fetching()) {
            return self.fail_resync(&format!("{why}; run the resync again"));
        }
        let wait = if local {
            self.fetch_failures += 1;
            FETCH_RETRY
                .saturating_mul(1 << (self.fetch_failures - 1).min(5))
                .min(FETCH_BACKOFF_MAX)
        } else {
            Duration::ZERO
        };
        self.refetch_at = Some(Instant::now() + wait);
        self.ui.warn(&format!(
            "gave up the snapshot download from replica {}: {why}; the leader is asked again{}",
            self.ids[f.from as usize],
            if local {
                format!(" in {} s", wait.as_secs())
            } else {
                String::new()
            }
        ));
        Ok(())
    }

    /// Why the snapshot on its way should be given up, if it should.
    fn fetch_stalled(&self) -> Option<String> {
        let f = self.fetch.as_ref()?;
        if f.heard.elapsed() >= FETCH_GIVE_UP {
            Some(format!(
                "replica {} has not answered for {} s",
                self.ids[f.from as usize],
                FETCH_GIVE_UP.as_secs()
            ))
        } else if f.from != self.engine.leader() {
            Some(format!(
                "replica {} no longer leads",
                self.ids[f.from as usize]
            ))
        } else {
            None
        }
    }

    /// The chunk at `offset` of the snapshot `from` downloads (one that
    /// covers `op`): its bytes, the file's size and the snapshot's op; no
    /// bytes, size 0 and op 0 when this replica has none to give.
    fn snapshot_chunk(&mut self, from: NodeId, op: u64, offset: u64) -> (Vec<u8>, u64, u64) {
        self.sending.retain(|_, s| s.asked.elapsed() < SENDING_IDLE);
        let going_on = offset > 0 && self.sending.get(&from).is_some_and(|s| s.op >= op);
        if !going_on {
            self.sending.remove(&from);
            if self.snapshot_op < op || self.snapshot_op == 0 {
                return (Vec::new(), 0, 0);
            }
            let path = self.snapshot_path();
            match std::fs::File::open(&path).and_then(|f| Ok((f.metadata()?.len(), f))) {
                Ok((total, file)) => {
                    self.sending.insert(
                        from,
                        Sending {
                            op: self.snapshot_op,
                            file,
                            total,
                            asked: Instant::now(),
                        },
                    );
                }
                Err(e) => {
                    // A snapshot this replica cannot read is one it does
                    // not have (the asker waits, then asks the leader).
                    self.ui.warn(&format!(
                        "replica {} asked for the snapshot, and opening {} failed: {e}",
                        self.ids[from as usize],
                        path.display()
                    ));
                    return (Vec::new(), 0, 0);
                }
            }
        }
        let s = self.sending.get_mut(&from).expect("inserted");
        s.asked = Instant::now();
        match read_chunk(&s.file, s.total, offset) {
            // (Kept after the last chunk, which may be asked again, until
            // idle: a new download starts at offset 0.)
            Ok(data) => (data, s.total, s.op),
            Err(e) => {
                self.sending.remove(&from);
                self.ui.warn(&format!(
                    "replica {} asked for the snapshot, and reading it at byte {offset} failed: {e}",
                    self.ids[from as usize]
                ));
                (Vec::new(), 0, 0)
            }
        }
    }

    fn ask_chunk(&mut self) {
        let view = self.engine.view();
        let Some(f) = &mut self.fetch else {
            return;
        };
        f.asked = Instant::now();
        let (to, op, offset) = (f.from, f.need, f.offset);
        self.send(
            to,
            crate::consensus::Message::SnapshotRequest { view, op, offset },
        );
    }

    /// Snapshot messages are the node's business, not the engine's.
    fn on_snapshot_message(
        &mut self,
        from: NodeId,
        msg: crate::consensus::Message,
    ) -> Result<(), NodeError> {
        use crate::consensus::Message;
        match msg {
            Message::SnapshotRequest { op, offset, .. } => {
                let view = self.engine.view();
                let (data, total, snap_op) = self.snapshot_chunk(from, op, offset);
                self.send(
                    from,
                    Message::SnapshotChunk {
                        view,
                        op: snap_op,
                        offset,
                        total,
                        data: Bytes::from(data),
                    },
                );
            }
            Message::SnapshotChunk {
                op,
                offset,
                total,
                data,
                ..
            } => {
                let Some(f) = &mut self.fetch else {
                    return Ok(());
                };
                if from != f.from {
                    return Ok(());
                }
                f.heard = Instant::now();
                if op == 0 || op < f.need {
                    // It has none that covers what we need yet: ask again later.
                    return Ok(());
                }
                if op != f.snap_op {
                    // A newer snapshot there: start over with it.
                    f.snap_op = op;
                    f.offset = 0;
                    if let Err(e) = f.file.set_len(0) {
                        return self.drop_fetch(&format!("restarting the download: {e}"), true);
                    }
                    if offset != 0 {
                        self.ask_chunk();
                        return Ok(());
                    }
                }
                if offset != f.offset || (data.is_empty() && offset < total) {
                    return Ok(());
                }
                use std::os::unix::fs::FileExt;
                if let Err(e) = f.file.write_all_at(&data, offset) {
                    return self.drop_fetch(&format!("writing snapshot.incoming: {e}"), true);
                }
                f.offset += data.len() as u64;
                if f.offset < total {
                    self.ask_chunk();
                    return Ok(());
                }
                if let Err(e) = f.file.sync_all() {
                    return self.drop_fetch(&format!("syncing snapshot.incoming: {e}"), true);
                }
                let f = self.fetch.take().expect("checked");
                let path = self.data_dir.join("snapshot.incoming");
                match snapshot::read_meta(&path) {
                    Ok(meta) if meta.op >= f.need => {
                        self.fetch_failures = 0;
                        self.ui.note(&format!(
                            "received the snapshot at op {} ({} bytes in {:.1} s)",
                            meta.op,
                            meta.bytes,
                            f.started.elapsed().as_secs_f64()
                        ));
                        self.install = Some(path);
                    }
                    Ok(meta) => {
                        let _ = std::fs::remove_file(&path);
                        self.ui.warn(&format!(
                            "the snapshot received covers op {} only, {} is needed; asking again",
                            meta.op, f.need
                        ));
                        self.step(Input::SnapshotInstalled {
                            op: 0,
                            open_conns: Vec::new(),
                        })?;
                    }
                    Err(e) => {
                        let _ = std::fs::remove_file(&path);
                        self.ui.warn(&format!(
                            "the snapshot received is unusable: {e}; asking again"
                        ));
                        self.step(Input::SnapshotInstalled {
                            op: 0,
                            open_conns: Vec::new(),
                        })?;
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Puts a received snapshot in place: the program restarts from it and
    /// the log starts after it.
    fn install_snapshot(&mut self, incoming: PathBuf) -> Result<(), NodeError> {
        let meta =
            snapshot::read_meta(&incoming).map_err(|e| NodeError::Snapshot(e.to_string()))?;
        if meta.op <= self.engine.commit() {
            let _ = std::fs::remove_file(&incoming);
            return self.step(Input::SnapshotInstalled {
                op: 0,
                open_conns: Vec::new(),
            });
        }
        let cmd = self
            .restore_cmd
            .clone()
            .expect("fetching needs --restore-cmd");
        self.stop_program();
        // Acknowledgements of the old log must not go out for the new one.
        self.held.clear();
        let path = self.snapshot_path();
        std::fs::rename(&incoming, &path)
            .map_err(io_err(format!("renaming {}", incoming.display())))?;
        std::fs::File::open(&self.data_dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(format!("syncing {}", self.data_dir.display())))?;
        self.snapshot_op = meta.op;
        self.unwritten.clear();
        self.log.reset(meta.op + 1, 0)?;
        // Past anything the replay at start had left to read.
        self.log_replay = None;
        let restored = self.hooks_env.restore(&cmd, &path)?;
        let pid = self.start_program_at(meta.op, &meta.open_conns)?;
        self.import_resp_state(&restored.resp_state, restored.resp_state_problem.as_deref());
        self.next_snapshot_at = meta.op + self.snapshot_every;
        self.ui.note(&format!(
            "installed the snapshot at op {}: the program restarted from it (pid {pid})",
            meta.op,
        ));
        // The program's state is the leader's now.
        self.superseded_by_snapshot(meta.op);
        self.step(Input::SnapshotInstalled {
            op: meta.op,
            open_conns: meta.open_conns,
        })
    }

    /// Applies one committed entry to this replica's copy of the program.
    fn apply(&mut self, e: Entry) {
        self.applied += 1;
        self.applied_op = e.op;
        e.track_open(&mut self.open_conns);
        if let Some((target, started, pb)) = &self.replay {
            pb.set_position(self.applied.min(*target));
            if self.applied >= *target {
                pb.finish_and_clear();
                self.ui.note(&format!(
                    "replayed {target} entries of the log into the program in {:.1} s",
                    started.elapsed().as_secs_f64()
                ));
                self.replay = None;
                self.replay_done = Some(Instant::now());
            }
        }
        if self.vm.is_some() {
            self.apply_vm(&e);
            return;
        }
        match e.kind {
            Kind::Open if self.framed => {}
            Kind::Open => self.open_app(e.conn),
            Kind::Data if self.framed => {
                // No program: the leader's answer is the op the frame committed
                // at and how long the leader took from proposing it to
                // applying it (its clock stamped the entry; 0 if another
                // leader proposed it).
                let inside_ns = if e.view == self.engine.view() {
                    self.now().saturating_sub(e.time_ns)
                } else {
                    0
                };
                if let Some(&t) = self.client_of_conn.get(&e.conn) {
                    let limit = self.limits.client_buffer;
                    if let Some(c) = self.clients.get_mut(&t) {
                        // A client that does not read its answers is cut
                        // off, as when a program answers it (what it has
                        // room for goes first: it may be reading).
                        if c.out.len() + 16 > limit {
                            flush(&mut c.stream, &mut c.out);
                        }
                        if c.out.len() + 16 > limit {
                            self.drop_client(t, true);
                        } else {
                            if c.out.is_empty() {
                                self.acked_clients.push(t);
                            }
                            c.out.extend_from_slice(&e.op.to_le_bytes());
                            c.out.extend_from_slice(&inside_ns.to_le_bytes());
                        }
                    }
                }
            }
            Kind::Data if self.mux.is_some() => self.mux_data(e.conn, &e.payload),
            Kind::Data => {
                if let Some(a) = self.apps.get_mut(&e.conn) {
                    if a.out.len() + e.payload.len() > self.limits.client_buffer {
                        self.ui.warn(&format!(
                            "connection {} to the program is not draining; closing it",
                            e.conn
                        ));
                        self.close_app(e.conn);
                        return;
                    }
                    a.out.extend_from_slice(&e.payload);
                    if !self.app_connecting.contains_key(&e.conn) {
                        flush(&mut a.stream, &mut a.out);
                    }
                }
            }
            Kind::Close => {
                // Bytes still on their way to the program go first: a replica
                // replaying its log writes faster than the program reads.
                match self.apps.get_mut(&e.conn) {
                    Some(a) if !a.out.is_empty() || self.app_connecting.contains_key(&e.conn) => {
                        a.closing = true
                    }
                    Some(a) => {
                        a.shut_write();
                        self.digests.client_closed(e.conn);
                    }
                    None => {}
                }
                if let Some(m) = &mut self.mux {
                    let mut out = Vec::new();
                    // Delivers Ended once nothing more is owed (see end_client).
                    m.close(e.conn, &mut out);
                    self.deliver(out);
                }
                if let Some(&t) = self.client_of_conn.get(&e.conn) {
                    let waits =
                        !self.framed && (self.mux.is_some() || self.apps.contains_key(&e.conn));
                    match self.clients.get_mut(&t) {
                        Some(c) if waits && matches!(c.end, ClientEnd::HalfClosed(_)) => {
                            // Its client closed only its writing side: the
                            // program's last answers still go to it, until
                            // the program ends the connection (close_app,
                            // or Ended); the wait counts from now, when
                            // the program has all the client sent.
                            c.end = ClientEnd::HalfClosed(Instant::now());
                        }
                        _ => self.end_client(e.conn),
                    }
                }
            }
            Kind::Digest => self.leader_digest(&e),
            Kind::Frame | Kind::Noop | Kind::Await => {}
        }
    }

    /// tap-attach, early delivery: the leader writes frames to its VM as it
    /// appends them, in log order — only while every entry before them is
    /// handed already (otherwise they go at commit, and it gives early again
    /// once it has caught up), and in a view other than the one it last gave
    /// early in, only once what it gave then is applied and checked.
    fn give_early(&mut self, entries: &[Entry]) {
        if self.engine.role() != Role::Leader
            || (self.vm_early_view != self.engine.view() && self.vm_given_op > self.applied_op)
        {
            return;
        }
        self.vm_early_view = self.engine.view();
        let Some(vm) = &mut self.vm else {
            return;
        };
        for e in entries {
            if e.op != self.vm_given_op + 1 {
                return;
            }
            self.vm_given_op = e.op;
            if e.kind == Kind::Frame {
                self.vm_early_ops.push_back((e.op, xxh3_64(&e.payload)));
                vm.give(e.op, &e.payload, crate::log::now_ns());
            }
        }
    }

    /// tap-attach: a committed entry. A frame goes to the VM unless the
    /// leader gave it early; then it must be the very frame given (a
    /// deposed leader's early frames may have been dropped by the new view:
    /// its VM has input no other VM has, and this replica stops).
    fn apply_vm(&mut self, e: &Entry) {
        if let Some((op, _)) = self.vm_early_ops.front().copied().filter(|f| f.0 < e.op) {
            // Skipped: the log went on past a frame given early.
            self.vm_early_ops.clear();
            self.vm_lost_input(op, "never committed there");
        }
        if e.op <= self.vm_given_op {
            // Handed already (given early): it must be what was given.
            let given = self.vm_early_ops.front().filter(|f| f.0 == e.op).copied();
            if given.is_some() {
                self.vm_early_ops.pop_front();
            }
            let same = match given {
                Some((_, hash)) => e.kind == Kind::Frame && xxh3_64(&e.payload) == hash,
                None => e.kind != Kind::Frame,
            };
            if !same {
                self.vm_lost_input(e.op, "committed as other input");
            }
            return;
        }
        self.vm_given_op = e.op;
        if e.kind == Kind::Frame {
            let leader = self.role == Role::Leader;
            if let Some(vm) = &mut self.vm {
                vm.to_vm(&e.payload, crate::log::now_ns(), leader);
            }
        }
    }

    /// What the leader's VM sent after early input goes out once that input
    /// is committed and applied — applied, so that a frame given early was
    /// checked against what committed at its op before anything that may
    /// depend on it leaves the host (a replica whose VM lost input releases
    /// nothing more).
    fn release_vm_output(&mut self) {
        if self.vm_lost.is_some() {
            return;
        }
        let upto = self.engine.commit().min(self.applied_op);
        let Some(vm) = &mut self.vm else {
            return;
        };
        let (resume, err) = vm.commit_to(upto);
        if resume {
            self.vm_more = true;
        }
        if let Some(e) = err {
            if self.refusal_loggable() {
                self.ui.warn(&format!(
                    "writing the VM's frames to the TAP device: {e} (dropped)"
                ));
            }
        }
    }

    /// This replica's VM processed input, given early while it led, that the
    /// log does not hold at that op (the next view dropped it): its state is
    /// not the other VMs'. The replica stops (said once).
    fn vm_lost_input(&mut self, op: u64, what: &str) {
        if self.vm_lost.is_none() {
            self.vm_lost = Some(format!(
                "op {op}, given to this replica's VM before it committed while this replica led, {what}: the view that followed dropped input the VM had already processed, so its state is no longer the other replicas'; restart this replica (its VM starts over and replays the log)"
            ));
        }
    }

    /// Opens this replica's own connection to the program for `conn`.
    fn open_app(&mut self, conn: u64) {
        if let Some(m) = &mut self.mux {
            m.open(conn);
            self.digests.opened(conn);
            return;
        }
        self.connect_app(conn);
    }

    /// A connection to the program for `conn` (or [`SHARED`]). The connect
    /// does not wait: what the log gives the connection waits in its buffer
    /// until the program takes it (see [`Node::app_connected`]), and the
    /// loop goes on meanwhile (a program whose listen queue is full would
    /// otherwise hold it for the kernel's whole connect timeout).
    fn connect_app(&mut self, conn: u64) {
        let token = Token(APP_BASE + self.next_token);
        let registered = TcpStream::connect(self.app_addr).and_then(|mut stream| {
            self.poll
                .registry()
                .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
                .map(|()| stream)
        });
        match registered {
            Ok(stream) => {
                self.next_token += 1;
                let _ = stream.set_nodelay(true);
                self.app_tokens.insert(token, conn);
                if conn != SHARED {
                    self.digests.opened(conn);
                }
                self.apps.insert(
                    conn,
                    AppConn {
                        stream,
                        token,
                        out: Vec::new(),
                        read_total: 0,
                        await_gap: 0,
                        reopened: false,
                        closing: false,
                        shut: None,
                    },
                );
                self.app_connecting.insert(conn, Instant::now());
                // Over loopback the handshake is usually done already.
                self.app_connected(conn);
            }
            Err(e) => self.app_connect_failed(conn, &e.to_string()),
        }
    }

    /// The other replicas give this connection's input to their programs;
    /// skipping it here would make this copy differ without a word. Stop
    /// instead: a restart replays the log.
    fn app_connect_failed(&mut self, conn: u64, why: &str) {
        let what = if conn == SHARED {
            "falcon's connection"
        } else {
            "a client's connection"
        };
        self.lose_program(format!(
            "cannot connect to the program at {} for {what} (op {}): {why}; this replica stops rather than skip that client's input (if the program is running, check the open-file limit, `ulimit -n`, and that it accepts connections)",
            self.app_addr, self.applied_op,
        ));
    }

    /// [`Node::app_connected`] from the loop (an event, or the periodic
    /// check): once the last connection is up, applying resumes.
    fn check_app_connect(&mut self, conn: u64) -> bool {
        let held = !self.app_connecting.is_empty();
        let up = self.app_connected(conn);
        if held && self.app_connecting.is_empty() {
            self.pump_apply();
        }
        up
    }

    /// Whether the connection to the program for `conn` is up; one still
    /// connecting that failed, or waited [`APP_CONNECT_WAIT`], stops the replica.
    fn app_connected(&mut self, conn: u64) -> bool {
        let Some(a) = self.apps.get_mut(&conn) else {
            return false;
        };
        let Some(&since) = self.app_connecting.get(&conn) else {
            return true;
        };
        let failed = match a.stream.take_error() {
            Ok(Some(e)) | Err(e) => Some(e.to_string()),
            Ok(None) => match a.stream.peer_addr() {
                Ok(_) => None,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                    if since.elapsed() < APP_CONNECT_WAIT {
                        return false;
                    }
                    Some(format!(
                        "the program took no connection in {} s",
                        APP_CONNECT_WAIT.as_secs()
                    ))
                }
                Err(e) => Some(e.to_string()),
            },
        };
        self.app_connecting.remove(&conn);
        match failed {
            None => true,
            Some(why) => {
                let token = a.token;
                if let Some(mut a) = self.apps.remove(&conn) {
                    let _ = self.poll.registry().deregister(&mut a.stream);
                }
                self.app_tokens.remove(&token);
                self.app_connect_failed(conn, &why);
                false
            }
        }
    }

    /// Stops the program before it restarts from another state. Our
    /// connections go first (a program may wait for its clients before it
    /// stops: PostgreSQL's smart shutdown); nothing hashed of its output so
    /// far lines up with what comes.
    fn stop_program(&mut self) {
        self.close_all_apps();
        if let Some(app) = &mut self.app {
            app.stop(Duration::from_secs(5));
        }
        self.digests.reset();
    }

    /// Starts the program again as of op `op`, with `open_conns` (the
    /// connections open then) opened again; its pid.
    fn start_program_at(&mut self, op: u64, open_conns: &[u64]) -> Result<u32, NodeError> {
        let app = App::start(
            &self.program,
            self.app_addr,
            self.app_timeout,
            Some(&self.data_dir.join("program.log")),
        )?;
        let pid = app.pid();
        self.app = Some(app);
        self.observed.program_starts += 1;
        self.applied_op = op;
        // Everything up to `op` is in the program's state now.
        self.vm_given_op = op;
        self.vm_early_ops.clear();
        self.open_conns = open_conns.iter().copied().collect();
        for &c in open_conns {
            self.reopen_app(c);
        }
        Ok(pid)
    }

    /// Opens `conn` again on a program restored from a snapshot: its output
    /// here does not line up with the leader's, so nothing on it is
    /// compared or waited for.
    fn reopen_app(&mut self, conn: u64) {
        self.open_app(conn);
        self.digests.unaligned(conn);
        if let Some(a) = self.apps.get_mut(&conn) {
            a.reopened = true;
        }
    }

    /// Drops every connection to the program (it is about to restart).
    fn close_all_apps(&mut self) {
        let conns: Vec<u64> = self.apps.keys().copied().collect();
        for c in conns {
            self.close_app(c);
        }
        if let Some(m) = &mut self.mux {
            m.clear();
        }
        self.apply_queue.clear();
        self.last_written = None;
        self.awaiting_answer = None;
        self.await_since = None;
    }

    /// What the program wrote on `conn`, as `Await` entries count it: the
    /// normalized output when divergence detection follows the connection
    /// (PostgreSQL's pids make raw lengths differ between copies), else
    /// the bytes.
    fn out_count(&self, conn: u64) -> u64 {
        self.digests
            .total(conn)
            .unwrap_or_else(|| self.apps.get(&conn).map_or(0, |a| a.read_total))
    }

    /// The `Await` entry `e` still waits for this copy's program to write
    /// more on its connection (allowing for the shortfall learnt there).
    fn awaits_output(&self, e: &Entry) -> bool {
        let have = self.out_count(e.conn);
        self.apps.get(&e.conn).is_some_and(|a| {
            have.saturating_add(a.await_gap) < await_offset(e) && a.shut.is_none() && !a.reopened
        })
    }

    fn close_app(&mut self, conn: u64) {
        // Closed before the program ended its output (abandoned, or the
        // program restarts): nothing past here can be compared.
        if conn != SHARED {
            self.program_output(conn, &[], Some(false));
            // The client there gets what the program wrote, then the end,
            // as if it were talking to the program itself.
            self.end_client(conn);
        }
        self.app_connecting.remove(&conn);
        if let Some(mut a) = self.apps.remove(&conn) {
            let _ = self.poll.registry().deregister(&mut a.stream);
            self.app_tokens.remove(&a.token);
        }
    }

    fn drop_client(&mut self, t: Token, propose_close: bool) {
        if let Some(mut c) = self.clients.remove(&t) {
            let _ = self.poll.registry().deregister(&mut c.stream);
            self.client_of_conn.remove(&c.conn);
            // A client that closed its side had its Close proposed then.
            if propose_close && c.end == ClientEnd::Open && self.role == Role::Leader {
                self.proposals.push(close_event(c.conn));
            }
        }
    }

    /// tap-attach --qemu-socket: connects to QEMU when it listens.
    fn connect_vm(&mut self) {
        let (Some(path), Some(vm)) = (&self.vm_socket, &mut self.vm) else {
            return;
        };
        if vm.connected() {
            return;
        }
        let Ok(std) = std::os::unix::net::UnixStream::connect(path) else {
            return;
        };
        if std.set_nonblocking(true).is_err() {
            return;
        }
        let mut stream = mio::net::UnixStream::from_std(std);
        if self
            .poll
            .registry()
            .register(&mut stream, VM, Interest::READABLE)
            .is_ok()
        {
            vm.attach(stream);
            self.vm_wait_writable = false;
            self.observed.program_starts += 1;
            self.ui
                .note(&format!("connected to QEMU at {}", path.display()));
        }
    }

    /// tap-attach: says what went where, and closes the capture file.
    fn vm_report(&mut self) {
        let Some(vm) = self.vm.take() else {
            return;
        };
        let st = vm.stats;
        let tr = vm.translate_stats();
        self.ui.note(&format!(
            "tap {}: TCP translation: {} frames rewritten (flows with an offset: a backup's, and those opened under another leader), {} held, {} dropped; {:.2} µs per frame",
            vm.tap_name(),
            tr.rewritten,
            tr.held,
            tr.dropped,
            st.translate_ns as f64 / 1e3 / st.translated.max(1) as f64
        ));
        self.ui.note(&format!(
            "tap {}: {} frames proposed from the TAP device ({} ignored as a backup), {} frames to the VM ({} of them before they committed; {} dropped: VM too slow), {} from the VM out through the TAP device ({} of them after waiting for a commit; {} dropped by it), {} from the VM dropped as a backup ({} while waiting for a commit)",
            vm.tap_name(),
            st.tap_in,
            st.tap_in_ignored,
            st.to_vm,
            st.given_early,
            st.to_vm_dropped,
            st.from_vm,
            st.held_for_commit,
            st.tap_out_dropped,
            st.from_vm_dropped,
            st.held_dropped
        ));
        match vm.finish() {
            Some(Ok(n)) => self.ui.note(&format!("capture: {n} frames written")),
            Some(Err(e)) => self.ui.error(&format!("capture: {e}")),
            None => {}
        }
    }

    /// The applier waits for the program's answer on one connection: look
    /// for it now rather than at the next poll (the loop's turn may be long
    /// with peer traffic, and every request waits for the one before).
    fn look_for_answer(&mut self) {
        if self.awaiting_answer.is_none() {
            return;
        }
        let Some(token) = self
            .last_written
            .and_then(|c| self.apps.get(&c))
            .map(|a| a.token)
        else {
            return;
        };
        self.on_app(token, Ready::READ);
    }

    /// Watches the VM's stream for room to write while frames wait for it, and only then.
    fn vm_interest(&mut self) {
        let Some(vm) = &mut self.vm else {
            return;
        };
        let want = vm.wants_write();
        if want == self.vm_wait_writable {
            return;
        }
        if let Some(stream) = vm.vm_stream() {
            let interest = if want {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            if self
                .poll
                .registry()
                .reregister(stream, VM, interest)
                .is_ok()
            {
                self.vm_wait_writable = want;
            }
        }
    }

    /// Frames from the TAP device: the leader proposes them (in this turn's
    /// batch), a backup drops them.
    fn on_tap(&mut self) -> Result<(), NodeError> {
        let leader = self.role == Role::Leader;
        if leader && self.input_held() {
            // As for clients: too much proposed and not committed (in
            // entries or bytes), the disk full, a resync: frames wait in
            // the TAP device's queue (the kernel drops past it), read again
            // when the hold lifts.
            self.tap_more = false;
            self.tap_paused = true;
            return Ok(());
        }
        let Some(vm) = &mut self.vm else {
            return Ok(());
        };
        let mut frames = Vec::new();
        self.tap_more = vm
            .read_tap(leader, 256, &mut frames)
            .map_err(io_err(format!("reading the TAP device {}", vm.tap_name())))?;
        self.proposals
            .extend(frames.into_iter().map(|payload| Event {
                kind: Kind::Frame,
                conn: 0,
                payload,
            }));
        Ok(())
    }

    /// The VM's stream: what it sent (the leader's goes out through the TAP
    /// device), and room to write what is queued for it.
    fn on_vm(&mut self, ready: Ready) -> Result<(), NodeError> {
        let leader = self.role == Role::Leader;
        let Some(vm) = &mut self.vm else {
            return Ok(());
        };
        // A broken stream means QEMU is going away: the exit check stops the
        // replica then. Say what happened once.
        let mut broken = None;
        let mut garbled = false;
        if ready.writable {
            if let Err(e) = vm.flush_vm() {
                broken = Some(format!("writing to the VM: {e}"));
            }
        }
        if ready.readable {
            let read = vm.from_vm(leader);
            // Stopped at its budget: the rest next turn (no new event
            // would say so).
            self.vm_more |= vm.more;
            if let Err(e) = read {
                // Not QEMU going away: its stream's framing broke.
                garbled = e.kind() == io::ErrorKind::InvalidData;
                broken = Some(format!("reading from the VM: {e}"));
            }
        }
        if let Some(msg) = broken {
            if garbled && self.vm_socket.is_none() {
                // QEMU started by this replica still runs but its stream
                // cannot be read any more (nor left to pile up): the VM
                // gets no input here, so this replica stops (and QEMU with
                // it) rather than lead or follow without it.
                if let Some(mut stream) = vm.detach() {
                    let _ = self.poll.registry().deregister(&mut stream);
                }
                // As every stop: the log synced and sealed, the counters said.
                self.sync()?;
                self.seal();
                self.vm_report();
                return Err(NodeError::Io {
                    context: "the VM's network stream (QEMU's stream netdev)".into(),
                    source: io::Error::new(io::ErrorKind::InvalidData, msg),
                });
            }
            if let Some(path) = &self.vm_socket {
                // QEMU started separately went away: wait for it to come back.
                if let Some(mut stream) = vm.detach() {
                    let _ = self.poll.registry().deregister(&mut stream);
                }
                self.ui.warn(&format!(
                    "{msg}; waiting for QEMU to listen on {} again",
                    path.display()
                ));
            } else if !self.vm_broken {
                self.ui.warn(&msg);
                self.vm_broken = true;
            }
        }
        Ok(())
    }

    /// A connection id for a new client: the view, and a count of the
    /// view's connections. After 2^32 of them in one view the count comes
    /// round; an id still in use (a client connected since then, its
    /// program connection not closed yet, or open in the log's applied
    /// state) is skipped, and so is the shared program connection's.
    fn new_conn_id(&mut self) -> u64 {
        loop {
            let conn = (self.engine.view() << 32) | (self.next_conn & 0xffff_ffff);
            self.next_conn = self.next_conn.wrapping_add(1);
            if conn != SHARED
                && !self.client_of_conn.contains_key(&conn)
                && !self.apps.contains_key(&conn)
                && !self.open_conns.contains(&conn)
            {
                return conn;
            }
        }
    }

    fn accept_clients(&mut self) -> Result<(), NodeError> {
        loop {
            match self.clients_listener.accept() {
                Ok((mut stream, _)) => {
                    if self.vm.is_some() {
                        // tap-attach: the VM's clients come through the TAP device.
                        drop(stream);
                        continue;
                    }
                    if self.role != Role::Leader {
                        self.follower_client(stream);
                        continue;
                    }
                    if self.clients.len() >= self.limits.client_connections {
                        // Closed at once: the client sees the connection end.
                        drop(stream);
                        self.observed.clients_refused += 1;
                        if self.refusal_loggable() {
                            self.ui.warn(&format!(
                                "refusing client connections: {} are open, the limit (limits.client_connections) ({} refused so far)",
                                self.clients.len(),
                                self.observed.clients_refused
                            ));
                        }
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    self.observed.clients_accepted += 1;
                    let token = Token(CLIENT_BASE + self.next_token);
                    self.next_token += 1;
                    let conn = self.new_conn_id();
                    if self
                        .poll
                        .registry()
                        .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
                        .is_err()
                    {
                        continue;
                    }
                    self.clients.insert(
                        token,
                        ClientConn {
                            stream,
                            conn,
                            seen_out: 0,
                            out: Vec::new(),
                            partial: Vec::new(),
                            end: ClientEnd::Open,
                            peer_closed: false,
                        },
                    );
                    self.client_of_conn.insert(conn, token);
                    self.proposals.push(Event {
                        kind: Kind::Open,
                        conn,
                        payload: Bytes::new(),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
                Err(e) => {
                    // Out of descriptors or memory: the connections wait in
                    // the listen queue, the replica goes on, and accepting
                    // is tried again shortly.
                    self.accept_again = Some(Instant::now() + Duration::from_millis(100));
                    if let Some(held) = self.accept_failed.due() {
                        let hint = if e.raw_os_error() == Some(libc::EMFILE) {
                            " (raise the open-file limit, `ulimit -n`, or lower limits.client_connections)"
                        } else {
                            ""
                        };
                        self.ui.warn(&format!(
                            "cannot accept client connections: {e}{hint}; trying again ({held} more failures)"
                        ));
                    }
                    return Ok(());
                }
            }
        }
    }

    /// A client reached a follower: forward it to the leader, or refuse it.
    fn follower_client(&mut self, stream: TcpStream) {
        use std::os::fd::{FromRawFd, IntoRawFd};
        if self.follower_clients == FollowerClients::Refuse || self.role != Role::Follower {
            return;
        }
        if self.forwards.threads.load(Ordering::Relaxed) >= FORWARDS_MAX {
            self.observed.clients_refused += 1;
            if self.refusal_loggable() {
                self.ui.warn(&format!(
                    "refusing client connections: {FORWARDS_MAX} are being forwarded to the leader, the most a follower forwards ({} refused so far)",
                    self.observed.clients_refused
                ));
            }
            return;
        }
        let leader = self.client_addrs[self.engine.leader() as usize];
        // SAFETY: the descriptor comes from a stream we own and give up here.
        let std = unsafe { std::net::TcpStream::from_raw_fd(stream.into_raw_fd()) };
        if std.set_nonblocking(false).is_err() {
            return;
        }
        forward(std, leader, self.forwards.clone());
    }

    fn on_client(&mut self, t: Token, ready: Ready) -> Result<(), NodeError> {
        let Some(c) = self.clients.get_mut(&t) else {
            return Ok(());
        };
        c.peer_closed |= ready.closed;
        let before = c.out.len();
        let writes = !ready.writable || flush(&mut c.stream, &mut c.out);
        if matches!(c.end, ClientEnd::Ending(_)) && c.out.len() < before {
            // It reads: its time to go counts from now.
            c.end = ClientEnd::Ending(Instant::now());
        }
        if c.end != ClientEnd::Open {
            // Only its answers go. Input after the end (pipelined past
            // QUIT) is read and dropped: left unread, it would turn the
            // close into a reset that can discard answers still on the way.
            if ready.readable && matches!(c.end, ClientEnd::Ending(_)) {
                let (_, more) =
                    read_budgeted(&mut c.stream, &mut self.read_buf, c.peer_closed, 16, |_| {});
                if more {
                    // A client that floods cannot hold the loop.
                    self.unread.push(t);
                }
            }
            if !writes || (matches!(c.end, ClientEnd::Ending(_)) && c.out.is_empty()) {
                self.drop_client(t, false);
            }
            return Ok(());
        }
        if !ready.readable {
            return Ok(());
        }
        if self.input_held() {
            // The program is behind, the cluster has too much uncommitted,
            // or the log cannot grow: input waits in the client's socket
            // (TCP pushes back on the client), not in our memory.
            if !self.paused.contains(&t) {
                self.paused.push(t);
            }
            return Ok(());
        }
        let Some(conn) = self.clients.get(&t).map(|c| c.conn) else {
            return Ok(());
        };
        // The program answered since this client's last input: its next
        // input goes after that answer on every replica too.
        let out_now = if self.mux.is_none() {
            self.out_count(conn)
        } else {
            0
        };
        let Some(c) = self.clients.get_mut(&t) else {
            return Ok(());
        };
        let events = &mut self.proposals;
        let mut chunks = 0;
        let framed = self.framed;
        let mut wait_for = (out_now > c.seen_out).then_some(out_now);
        let seen_out = &mut c.seen_out;
        let partial = &mut c.partial;
        let mut bad_frame = false;
        let end = read_to_end(&mut c.stream, &mut self.read_buf, c.peer_closed, |bytes| {
            chunks += 1;
            if !framed {
                if let Some(out) = wait_for.take() {
                    *seen_out = out;
                    events.push(Event {
                        kind: Kind::Await,
                        conn,
                        payload: Bytes::copy_from_slice(&out.to_le_bytes()),
                    });
                }
                events.push(Event {
                    kind: Kind::Data,
                    conn,
                    payload: Bytes::copy_from_slice(bytes),
                });
                return chunks < 16;
            }
            // Null-program mode: one entry per [u32 length][payload] frame.
            partial.extend_from_slice(bytes);
            let mut at = 0;
            while partial.len() - at >= 4 {
                let len =
                    u32::from_le_bytes(partial[at..at + 4].try_into().expect("4 bytes")) as usize;
                if len > FRAME_MAX {
                    bad_frame = true;
                    return false;
                }
                if partial.len() - at - 4 < len {
                    break;
                }
                events.push(Event {
                    kind: Kind::Data,
                    conn,
                    payload: Bytes::copy_from_slice(&partial[at + 4..at + 4 + len]),
                });
                at += 4 + len;
            }
            partial.drain(..at);
            chunks < 16
        });
        let mut closed = end != End::Open;
        if bad_frame {
            self.ui.warn(&format!(
                "a client sent a frame over {FRAME_MAX} bytes; closing its connection"
            ));
            closed = true;
        }
        if chunks >= 16 && !closed {
            // Its turn is over; the rest is read next turn (no new event will say so).
            self.unread.push(t);
        }
        if closed {
            events.push(close_event(conn));
            if end == End::Eof && !bad_frame {
                // It closed only its writing side, perhaps: the answers to
                // what it sent still go to it, when the Close commits and
                // the program ends the connection (see end_client).
                if let Some(c) = self.clients.get_mut(&t) {
                    c.end = ClientEnd::HalfClosed(Instant::now());
                }
            } else {
                self.drop_client(t, false);
            }
        }
        Ok(())
    }

    /// The program ended `conn` (or the log closed it and nothing more is
    /// owed): a client still waiting there gets what is left, then its
    /// connection closes.
    fn end_client(&mut self, conn: u64) {
        let Some(&t) = self.client_of_conn.get(&conn) else {
            return;
        };
        self.client_of_conn.remove(&conn);
        let Some(c) = self.clients.get_mut(&t) else {
            return;
        };
        if c.end == ClientEnd::Open && self.role == Role::Leader {
            // The program (or falcon, for QUIT) ended a connection the
            // client still had open: the log closes it on every replica.
            self.proposals.push(close_event(conn));
        }
        if flush(&mut c.stream, &mut c.out) && !c.out.is_empty() {
            c.end = ClientEnd::Ending(Instant::now());
        } else {
            self.drop_client(t, false);
        }
    }

    /// transport = "shm": replicas whose cluster files differ only in
    /// program_protocol put their rings in different directories and never
    /// meet. Over TCP the handshake says so; here a replica missing for a
    /// while is looked for under the other mode's directory, once.
    fn look_for_other_mode(&mut self) {
        let Some((dir, at)) = &mut self.shm_other else {
            return;
        };
        if at.elapsed() < SHM_OTHER_MODE_CHECK {
            return;
        }
        *at = Instant::now();
        let there: Vec<u32> = (0..self.ids.len())
            .filter(|&p| p != self.me as usize && self.observed.peers[p] == 0)
            .filter(|p| dir.join(format!("bell-{p}")).exists())
            .map(|p| self.ids[p])
            .collect();
        if there.is_empty() {
            return;
        }
        let which = there
            .iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        self.ui.warn(&format!(
            "no link to replica {which}, whose shm doorbell is in {}: the directory of this cluster under the other program_protocol. If it runs, its cluster file differs from this one in program_protocol and the two never meet: every replica's file must set the same one",
            dir.display(),
        ));
        self.shm_other = None;
    }

    /// Closes client connections whose ending took too long.
    fn expire_clients(&mut self) {
        let expired: Vec<(Token, u64, bool)> = self
            .clients
            .iter()
            .filter_map(|(&t, c)| match c.end {
                ClientEnd::Open => None,
                ClientEnd::HalfClosed(at) => {
                    (at.elapsed() >= HALF_CLOSED_WAIT).then_some((t, c.conn, true))
                }
                ClientEnd::Ending(at) => (at.elapsed() >= LINGER).then_some((t, c.conn, false)),
            })
            .collect();
        for (t, conn, half) in expired {
            if half {
                // The program never ended it: what it did answer goes, then the close.
                self.end_client(conn);
            } else {
                self.drop_client(t, false);
            }
        }
    }

    fn on_app(&mut self, t: Token, ready: Ready) {
        let Some(&conn) = self.app_tokens.get(&t) else {
            return;
        };
        if !self.check_app_connect(conn) {
            return;
        }
        if conn == SHARED && self.mux.is_some() {
            self.on_shared(t, ready);
            return;
        }
        let Some(a) = self.apps.get_mut(&conn) else {
            return;
        };
        if ready.writable {
            flush(&mut a.stream, &mut a.out);
            if a.closing && a.out.is_empty() {
                a.shut_write();
                self.digests.client_closed(conn);
            }
        }
        if !ready.readable {
            return;
        }
        let mut answer = Vec::new();
        let (end, more) = read_budgeted(
            &mut a.stream,
            &mut self.read_buf,
            ready.closed,
            APP_READS_PER_TURN,
            |bytes| answer.extend_from_slice(bytes),
        );
        if more {
            // A program that writes faster than this loop reads must not
            // keep it from everything else.
            self.app_unread.push((t, ready.closed));
        }
        let eof = end != End::Open;
        a.read_total += answer.len() as u64;
        self.program_output(conn, &answer, eof.then_some(end == End::Eof));
        // The next input waited for this output (see Kind::Await).
        let awaited = self
            .apply_queue
            .front()
            .is_some_and(|e| e.kind == Kind::Await && e.conn == conn && !self.awaits_output(e));
        // Only the leader's client gets the answer; followers drain and drop theirs.
        let answered = !answer.is_empty() && self.last_written == Some(conn);
        self.answer_client(conn, &answer);
        if eof {
            self.close_app(conn);
        }
        if answered {
            self.awaiting_answer = None;
        }
        if answered || awaited {
            self.pump_apply();
        }
    }
}

impl Node<'_> {
    /// The program answered `conn`: the leader's client gets it (a
    /// follower has no client there).
    fn answer_client(&mut self, conn: u64, answer: &[u8]) {
        if answer.is_empty() {
            return;
        }
        if let Some(&ct) = self.client_of_conn.get(&conn) {
            if let Some(c) = self.clients.get_mut(&ct) {
                if let ClientEnd::HalfClosed(at) = &mut c.end {
                    // The program is still answering: the wait counts from now.
                    *at = Instant::now();
                }
                if c.out.len() + answer.len() > self.limits.client_buffer {
                    self.drop_client(ct, true);
                } else {
                    c.out.extend_from_slice(answer);
                    flush(&mut c.stream, &mut c.out);
                }
            }
        }
    }

    /// `program_protocol = "resp"`: a committed entry's input for `conn`;
    /// its whole commands go down the shared connection.
    fn mux_data(&mut self, conn: u64, payload: &[u8]) {
        if !self.apps.contains_key(&SHARED) {
            // (A failure stops the replica: connect_app says why.)
            self.connect_app(SHARED);
            if !self.apps.contains_key(&SHARED) {
                return;
            }
        }
        let (Some(m), Some(a)) = (&mut self.mux, self.apps.get_mut(&SHARED)) else {
            return;
        };
        let mut out = Vec::new();
        // Written at the end of the loop's turn (see flush_shared).
        m.data(conn, payload, &mut a.out, &mut out);
        self.deliver(out);
    }

    /// `program_protocol = "resp"`: the shared connection is ready.
    fn on_shared(&mut self, t: Token, ready: Ready) {
        let Some(a) = self.apps.get_mut(&SHARED) else {
            return;
        };
        if ready.writable {
            flush(&mut a.stream, &mut a.out);
        }
        if !ready.readable {
            // Room again: entries held back for it go on.
            self.pump_apply();
            return;
        }
        let mut got = Vec::new();
        let (end, more) = read_budgeted(
            &mut a.stream,
            &mut self.read_buf,
            ready.closed,
            APP_READS_PER_TURN,
            |bytes| got.extend_from_slice(bytes),
        );
        if more {
            self.app_unread.push((t, ready.closed));
        }
        let mut out = Vec::new();
        if let Some(m) = &mut self.mux {
            if let Err(why) = m.program_output(&got, &mut out) {
                self.lose_program(format!("program_protocol = \"resp\": {why}"));
            }
        }
        self.deliver(out);
        if end != End::Open {
            self.close_app(SHARED);
            let idle = self
                .mux
                .as_ref()
                .is_none_or(|m| m.outstanding() == 0 && m.between_answers());
            if idle && self.program_lost.is_none() {
                // Nothing lost (an idle timeout, CLIENT KILL from its own
                // port): the connection holds no state, the next command
                // opens another.
                self.ui.warn(
                    "the program closed falcon's connection to it while idle; the next command opens another (program_protocol = \"resp\")",
                );
            } else {
                self.lose_program(
                    "the program closed falcon's connection to it with answers owed (program_protocol = \"resp\": every client's commands go down that one connection); this replica stops, and a restart replays its log into a fresh program".into(),
                );
            }
        }
        self.pump_apply();
    }

    /// Hands out the shared connection's answers (and falcon's own).
    fn deliver(&mut self, out: Vec<crate::app::resp::Delivery>) {
        use crate::app::resp::Delivery;
        for d in out {
            match d {
                Delivery::Reply { conn, bytes } => {
                    self.program_output(conn, &bytes, None);
                    self.answer_client(conn, &bytes);
                }
                Delivery::Ended { conn } => {
                    self.program_output(conn, &[], Some(true));
                    self.end_client(conn);
                }
                Delivery::CloseClient { conn } => self.end_client(conn),
            }
        }
    }

    /// The replica stops at the end of the loop's turn, for the first reason
    /// given (later ones in the same turn, often the same, are not said).
    fn lose_program(&mut self, why: String) {
        if self.program_lost.is_none() {
            self.ui.error(&why);
            self.program_lost = Some(why);
        }
    }
}

/// An `Await` entry's output offset (0 if garbled: then nothing waits).
fn await_offset(e: &Entry) -> u64 {
    e.payload
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

/// What the event loop learned about one socket.
#[derive(Clone, Copy)]
struct Ready {
    readable: bool,
    writable: bool,
    /// The other side closed or failed: read to the end.
    closed: bool,
}

impl Ready {
    /// Read what is there (the loop looks again without an event).
    const READ: Ready = Ready {
        readable: true,
        writable: false,
        closed: false,
    };
}

/// Bytes `offset ..` (at most [`SNAPSHOT_CHUNK`]) of the file, and its length.
fn read_chunk(f: &std::fs::File, total: u64, offset: u64) -> io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let n = total.saturating_sub(offset).min(SNAPSHOT_CHUNK as u64) as usize;
    let mut buf = vec![0u8; n];
    f.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

/// How [`read_to_end`] left a socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// More may come.
    Open,
    /// The other side closed it: everything it wrote was read.
    Eof,
    /// It failed (reset): what it wrote may not all have arrived.
    Error,
}

/// Reads what the socket has, chunk by chunk, into `take` until it would
/// block or `take` returns false; says whether the stream ended, and how.
///
/// A read shorter than the buffer emptied the socket: the next byte raises
/// a new (edge-triggered) event, so there is no need for a read that only
/// says it would block — unless the other side closed, whose end of stream
/// raises no further event.
fn read_to_end(
    stream: &mut TcpStream,
    buf: &mut [u8],
    closed: bool,
    mut take: impl FnMut(&[u8]) -> bool,
) -> End {
    loop {
        match stream.read(buf) {
            Ok(0) => return End::Eof,
            Ok(n) => {
                if !take(&buf[..n]) || (n < buf.len() && !closed) {
                    return End::Open;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return End::Open,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return End::Error,
        }
    }
}

/// [`read_to_end`] with at most `reads_max` reads, each given to `take`;
/// also whether it stopped at that budget with the stream not known to be
/// empty (no new event will say so: the caller reads again next turn).
fn read_budgeted(
    stream: &mut TcpStream,
    buf: &mut [u8],
    closed: bool,
    reads_max: usize,
    mut take: impl FnMut(&[u8]),
) -> (End, bool) {
    let mut reads = 0;
    let end = read_to_end(stream, buf, closed, |bytes| {
        take(bytes);
        reads += 1;
        reads < reads_max
    });
    (end, end == End::Open && reads >= reads_max)
}

/// Writes as much of `out` as the socket takes now. False if the socket
/// failed (what is left can never be written).
fn flush(stream: &mut TcpStream, out: &mut Vec<u8>) -> bool {
    let mut done = 0;
    let mut ok = true;
    while done < out.len() {
        match stream.write(&out[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                ok = e.kind() == io::ErrorKind::WouldBlock;
                break;
            }
        }
    }
    out.drain(..done);
    ok
}

/// Runs one replica until `stop` is set or the program exits.
pub fn run(opts: NodeOptions, ui: &Ui, stop: Arc<AtomicBool>) -> Result<NodeExit, NodeError> {
    let cfg = &opts.config;
    let me = opts.index as NodeId;
    let rc = &cfg.replicas[opts.index];
    // Every line this replica logs names it.
    let ui = &ui.for_node(rc.id);
    std::fs::create_dir_all(&rc.data_dir)
        .map_err(io_err(format!("creating {}", rc.data_dir.display())))?;
    let storage = FsStorage::new(rc.data_dir.join("log"), true).map_err(io_err(format!(
        "opening {}",
        rc.data_dir.join("log").display()
    )))?;
    let (log, recovery) = SegmentLog::open(
        storage,
        LogOptions {
            sync: cfg.sync,
            segment_bytes_max: cfg.segment_bytes,
            preallocate_bytes: cfg.log_preallocate,
            ..LogOptions::new(cfg.cluster_id, me)
        },
    )?;
    let mut log = log;
    // A clean stop sealed where the log ended: it must still end there.
    let sealed = seal::read(&rc.data_dir).map_err(io_err("reading the log seal"))?;
    if let Some(s) = sealed {
        if let Some(reason) =
            seal::mismatch(&s, (cfg.cluster_id, me), log.last_op(), log.last_crc())
        {
            return Err(LogError::Sealed {
                dir: rc.data_dir.display().to_string(),
                reason,
            }
            .into());
        }
    }
    // The seal goes when the log first changes, after the checks below: a
    // start that fails them leaves it for the next start to check.
    let unseal = || seal::remove(&rc.data_dir).map_err(io_err("removing the log seal"));
    // What a stop in the middle of taking, packing or receiving a snapshot
    // left: none of it is the snapshot, and it may be large.
    for stale in ["snapshot.tmp", "snapshot.packed", "snapshot.incoming"] {
        let _ = std::fs::remove_file(rc.data_dir.join(stale));
    }
    for stale in ["snapshot.work", "snapshot.restore"] {
        let _ = std::fs::remove_dir_all(rc.data_dir.join(stale));
    }
    if recovery.after_failed_fsync {
        ui.warn(
            "an fsync of this log failed before this start: the log was read from the disk, not from the page cache",
        );
    }
    if let Some(t) = &recovery.torn {
        ui.warn(&format!(
            "cut a torn tail from the log: {} at byte offset {} ({} bytes)",
            t.file, t.offset, t.bytes
        ));
    }
    let engine_cfg = Config {
        election_timeout_ns: cfg.election_timeout.as_nanos() as u64,
        heartbeat_ns: cfg.heartbeat.as_nanos() as u64,
        uncommitted_max: cfg.limits.pending_entries,
        batch_entries_max: cfg.limits.batch_entries,
        batch_bytes_max: cfg.limits.batch_bytes,
        // Well inside what a peer's queue takes (one entry may add up to
        // a record's payload limit).
        chunk_bytes_max: CHUNK_BYTES.min(cfg.limits.peer_queue / 4),
        ..Config::new(cfg.cluster_id, me, cfg.replicas.len() as u32)
    };
    let seed = crate::log::now_ns() ^ u64::from(std::process::id());
    let state = load_state(&rc.data_dir).map_err(io_err("reading the view state"))?;
    // A snapshot in the data dir covers the ops before `base + 1`; the
    // program starts from it when --restore-cmd says how.
    let hooks = Hooks {
        id: rc.id,
        data_dir: rc.data_dir.clone(),
        app: rc.app,
        resp_state_max: cfg.limits.program_backlog_bytes as u64 + (64 << 20),
    };
    let snap_path = rc.data_dir.join(snapshot::FILE_NAME);
    let snap = if snap_path.exists() {
        Some(snapshot::read_meta(&snap_path).map_err(|e| NodeError::Snapshot(e.to_string()))?)
    } else {
        None
    };
    let restored = match (&snap, &opts.restore_cmd) {
        (Some(meta), Some(cmd)) => {
            if meta.op + 1 < log.first_op() {
                return Err(NodeError::Snapshot(format!(
                    "{}: the snapshot covers ops up to {}, but the log starts at op {}: ops {}..{} are nowhere; restart this replica with an empty data directory",
                    snap_path.display(),
                    meta.op,
                    log.first_op(),
                    meta.op + 1,
                    log.first_op() - 1
                )));
            }
            if log.last_op() < meta.op {
                // Installed from the leader, then stopped before new entries arrived.
                unseal()?;
                log.reset(meta.op + 1, 0)?;
            }
            let restored = hooks.restore(cmd, &snap_path)?;
            ui.note(&format!(
                "restored the program from the snapshot at op {} ({} bytes)",
                meta.op, meta.bytes
            ));
            Some(restored)
        }
        _ if log.first_op() > 1 => {
            return Err(NodeError::Snapshot(format!(
                "the log in {} starts at op {}: the ops before it are only in {}; give --restore-cmd so the program can start from it",
                rc.data_dir.join("log").display(),
                log.first_op(),
                snap_path.display()
            )));
        }
        _ => {
            if let Some(cmd) = &opts.reset_cmd {
                hooks.run("--reset-cmd", cmd, &[])?;
            }
            None
        }
    };
    let base = restored.as_ref().map_or(0, |m| m.op);
    let open_at_base = restored
        .as_ref()
        .map_or_else(Vec::new, |m| m.open_conns.clone());
    // From here on the log changes: no seal may outlive this start.
    unseal()?;
    let stored_first = base.max(log.first_op() - 1) + 1;
    // Ops up to the saved commit point are committed: they stay on disk
    // (replayed from there), and only the rest is held in memory.
    let known = known_commit(&rc.data_dir, &log, (cfg.cluster_id, me), stored_first, ui);
    let entries = log.read(known.max(stored_first - 1) + 1, usize::MAX, usize::MAX)?;
    let (start, wall_base) = (
        Instant::now(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    );
    let engine = match state {
        // Nothing saved: a new cluster, or a data directory emptied. It
        // asks the others which before it takes part (it may have voted or
        // acknowledged entries it no longer remembers).
        _ if log.last_op() == 0 && base == 0 && state.is_none() => {
            if cfg.replicas.len() > 1 {
                ui.note(
                    "no saved state here: asking the other replicas whether the cluster is new or this replica lost its data (it takes part once a majority of them answered)",
                );
            }
            Replica::recovering(engine_cfg, seed, wall_base)
        }
        st if known >= stored_first => Replica::restart_committed(
            engine_cfg,
            seed,
            wall_base,
            st.unwrap_or_default(),
            stored_first,
            known + 1,
            entries,
            open_conns_at(&log, &open_at_base, stored_first, known)?,
        ),
        st => Replica::restart(
            engine_cfg,
            seed,
            wall_base,
            st.unwrap_or_default(),
            stored_first,
            entries,
            open_at_base.clone(),
        ),
    };
    ui.note(&format!(
        "replica {} of cluster {:?}: log {} (ops {}..={}), view {}",
        rc.id,
        cfg.cluster,
        rc.data_dir.join("log").display(),
        log.first_op(),
        log.last_op(),
        engine.view()
    ));
    let replay_target = log.last_op().saturating_sub(base);
    crate::app::catch_forwarded_signals().map_err(io_err("installing the signal handlers"))?;
    raise_open_file_limit(ui, cfg.limits.client_connections);
    let mut vm = None;
    let mut vm_socket: Option<PathBuf> = None;
    let app = if let Some(t) = opts.tap.as_ref().filter(|t| t.socket.is_some()) {
        let tap = crate::vm::tap::Tap::open(&t.name, t.create)
            .map_err(|e| NodeError::Setup(e.to_string()))?;
        let path = t
            .socket
            .clone()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| rc.data_dir.join("qemu-net.sock"));
        let capture = open_capture(t)?;
        ui.note(&format!(
            "serving a QEMU started separately: give it\n  -netdev stream,id={NETDEV_ID},server=on,addr.type=unix,addr.path={} -device virtio-net-pci,netdev={NETDEV_ID},mac=<the VM's MAC, the same on every replica>\n(falcon connects when it listens, and again when it restarts)",
            path.display()
        ));
        vm = Some(crate::vm::front::VmFront::new(tap, None, capture));
        vm_socket = Some(path);
        None
    } else if let Some(t) = &opts.tap {
        // tap-attach: falcon opens the TAP device and is QEMU's network
        // backend through one end of a socket pair.
        let tap = crate::vm::tap::Tap::open(&t.name, t.create)
            .map_err(|e| NodeError::Setup(e.to_string()))?;
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()
            .map_err(io_err("making the VM's socket pair"))?;
        ours.set_nonblocking(true)
            .map_err(io_err("making the VM's socket pair"))?;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&theirs);
        let mut argv = opts.program.clone();
        argv.push("-netdev".into());
        argv.push(format!(
            "stream,id={NETDEV_ID},server=off,addr.type=fd,addr.str={fd}"
        ));
        let log_path = rc.data_dir.join("qemu.log");
        let app = App::spawn(&argv, Some(&log_path), Some(fd))?;
        drop(theirs);
        let capture = open_capture(t)?;
        ui.note(&format!(
            "started {} (pid {}; output in {}), its network on TAP device {} through falcon",
            app.program,
            app.pid(),
            log_path.display(),
            t.name
        ));
        vm = Some(crate::vm::front::VmFront::new(
            tap,
            Some(mio::net::UnixStream::from_std(ours)),
            capture,
        ));
        Some(app)
    } else if opts.null_program {
        ui.note("no program (--null-program): the leader answers each committed frame with its op");
        None
    } else {
        let app = App::start(
            &opts.program,
            rc.app,
            opts.app_timeout,
            Some(&rc.data_dir.join("program.log")),
        )?;
        ui.note(&format!(
            "started {} (pid {}), listening on {}",
            app.program,
            app.pid(),
            rc.app
        ));
        Some(app)
    };
    let mux = (cfg.program_protocol == crate::config::ProgramProtocol::Resp
        && app.is_some()
        && vm.is_none())
    .then(|| {
        crate::app::resp::Mux::new(cfg.limits.client_buffer, cfg.limits.program_backlog_bytes)
    });
    let poll = Poll::new().map_err(io_err("creating the event loop"))?;
    // The one waker of the loop (mio allows one per poll): the fsync thread
    // and the shm doorbell thread both use it.
    let waker =
        Arc::new(mio::Waker::new(poll.registry(), SYNCED).map_err(io_err("creating the waker"))?);
    // The admin socket (and the metrics endpoint) pass requests to the loop
    // and wake it.
    let admin_path = crate::admin::socket_path(&rc.data_dir);
    let (admin_server, admin_rx) = {
        let waker = waker.clone();
        crate::admin::AdminServer::start(&admin_path, ui, move || {
            let _ = waker.wake();
        })
        .map_err(io_err("starting the admin socket"))?
    };
    if let Some(addr) = opts.metrics {
        let waker = waker.clone();
        let bound = crate::admin::metrics::serve(addr, admin_server.sender(), move || {
            let _ = waker.wake();
        })
        .map_err(|e| NodeError::Setup(e.to_string()))?;
        ui.note(&format!("metrics on http://{bound}/metrics"));
    }
    // shm and rdma wake a sleeping loop themselves but say nothing to a busy
    // one: the loop looks at them every turn (cheap: memory reads).
    let mut poll_peers_every_turn = cfg.transport == crate::config::TransportKind::Shm;
    let transport: Box<dyn Transport> = match cfg.transport {
        crate::config::TransportKind::Shm => {
            let dir = cfg.shm_dir();
            let t = ShmTransport::bind(ShmOptions::new(
                cfg.cluster_id,
                me,
                cfg.replicas.len() as u32,
                dir.clone(),
            ))
            .map_err(io_err(format!(
                "starting the shm transport in {}",
                dir.display()
            )))?;
            // A thread sleeps on the doorbell and wakes the event loop.
            let waker = waker.clone();
            t.spawn_bell_watcher(move || waker.wake().is_ok())
                .map_err(io_err("starting the shm doorbell thread"))?;
            Box::new(t)
        }
        crate::config::TransportKind::Rdma => match rdma_transport(cfg, me, &opts.key) {
            Ok(t) => {
                ui.note(&format!("peers over rdma (device {})", t.device()));
                poll_peers_every_turn = true;
                for fd in t.fds() {
                    poll.registry()
                        .register(&mut SourceFd(&fd), PEERS, Interest::READABLE)
                        .map_err(io_err("registering"))?;
                }
                t.into()
            }
            Err(why) if cfg.rdma_fallback => {
                ui.warn(&format!(
                    "{why}; using TCP instead (rdma_fallback = \"tcp\" in {})",
                    cfg.path.display()
                ));
                tcp_transport(cfg, me, &opts.key, opts.tls.clone(), &poll)?
            }
            Err(why) => {
                return Err(NodeError::Setup(format!(
                    "{why} (to run over TCP on such hosts instead, set rdma_fallback = \"tcp\" in {})",
                    cfg.path.display()
                )));
            }
        },
        crate::config::TransportKind::Tcp => {
            tcp_transport(cfg, me, &opts.key, opts.tls.clone(), &poll)?
        }
    };
    let mut clients_listener = TcpListener::bind(rc.client)
        .map_err(io_err(format!("listening for clients on {}", rc.client)))?;
    poll.registry()
        .register(&mut clients_listener, CLIENTS, Interest::READABLE)
        .map_err(io_err("registering"))?;
    ui.note(&format!(
        "clients connect to {}; peers on {}",
        rc.client, rc.peer
    ));

    let mut node = Node {
        ui,
        me,
        cluster_id: cfg.cluster_id,
        app_addr: rc.app,
        data_dir: rc.data_dir.clone(),
        engine,
        log,
        transport,
        poll,
        clients: HashMap::new(),
        client_of_conn: HashMap::new(),
        apps: HashMap::new(),
        app_tokens: HashMap::new(),
        app_connecting: HashMap::new(),
        next_token: 0,
        next_conn: 1,
        held: Vec::new(),
        proposals: Proposals::default(),
        unread: Vec::new(),
        app_unread: Vec::new(),
        paused: Vec::new(),
        unwritten: Vec::new(),
        disk_full: None,
        sync_inflight: false,
        read_buf: vec![0u8; READ_CHUNK],
        start,
        wall_base,
        role: Role::ViewChange,
        ids: cfg.replicas.iter().map(|r| r.id).collect(),
        hooks: (opts.on_leader.clone(), opts.on_follower.clone()),
        hook_children: Vec::new(),
        follower_clients: opts.follower_clients,
        client_addrs: cfg.replicas.iter().map(|r| r.client).collect(),
        forwards: Arc::default(),
        applied: 0,
        replay: (replay_target > 0).then(|| {
            (
                replay_target,
                Instant::now(),
                ui.progress(replay_target, 1, "replaying the log"),
            )
        }),
        apply_queue: ApplyQueue::default(),
        log_replay: (known > base).then_some(LogReplay {
            next: base + 1,
            upto: known,
        }),
        commit_saved: (known, Instant::now()),
        commit_save_failed: false,
        last_written: None,
        awaiting_answer: None,
        await_since: None,
        clients_listener,
        app,
        acked_clients: Vec::new(),
        framed: opts.null_program,
        memory_entries: opts.memory_entries.max(1),
        limits: cfg.limits,
        refused_client: OncePerSecond::default(),
        accept_again: None,
        accept_failed: OncePerSecond::default(),
        refused_peer: OncePerSecond::default(),
        too_large_at: None,
        closes_owed: HashSet::new(),
        shm_other: (cfg.transport == crate::config::TransportKind::Shm).then(|| {
            let other = cfg.cluster_id ^ crate::config::RESP_ID_SALT;
            (crate::config::shm_dir_of(other), Instant::now())
        }),
        behind: false,
        program: opts.program.clone(),
        app_timeout: opts.app_timeout,
        hooks_env: hooks,
        snapshot_cmd: opts.snapshot_cmd.clone(),
        restore_cmd: opts.restore_cmd.clone(),
        snapshot_every: opts.snapshot_every.max(1),
        snapshot_timeout: opts.snapshot_timeout,
        applied_op: base,
        open_conns: open_at_base.iter().copied().collect(),
        snapshot_op: snap.as_ref().map_or(0, |m| m.op),
        next_snapshot_at: base + opts.snapshot_every.max(1),
        snapshotting: Snapshotting::Idle,
        packing: None,
        fetch: None,
        fetch_failures: 0,
        sending: HashMap::new(),
        refetch_at: None,
        install: None,
        told_no_restore: false,
        vm,
        tap_more: false,
        tap_paused: false,
        vm_broken: false,
        vm_early: opts
            .tap
            .as_ref()
            .is_some_and(|t| t.deliver == Deliver::Early),
        vm_more: false,
        vm_wait_writable: false,
        vm_given_op: 0,
        vm_early_ops: VecDeque::new(),
        vm_early_view: 0,
        vm_lost: None,
        mux,
        program_lost: None,
        vm_socket,
        admin_rx: Some(admin_rx),
        observed: admin::Observed::new(&cfg.cluster, cfg.replicas.len()),
        digests: divergence::Digests::new(
            if opts.null_program || opts.tap.is_some() {
                0
            } else {
                cfg.divergence_chunk
            },
            cfg.divergence_protocol,
        ),
        diverged: resync::load_mark(&rc.data_dir, ui),
        on_divergence: opts.on_divergence.clone(),
        reset_cmd: opts.reset_cmd.clone(),
        mismatch_said: None,
        resync: None,
        last_resync: None,
        replay_base: base,
        replay_done: None,
        handed_off: None,
        disk_hand_off: None,
        deferred_fetch: None,
    };
    if let Some(d) = &node.diverged {
        ui.warn(&format!(
            "this replica's program diverged from the leader's before it stopped ({}, at op {}); the replay checks it again, and `falcon failover resync --node {}` rebuilds it",
            d.mismatch, d.op, rc.id
        ));
    }
    node.observed.program_starts = u64::from(node.app.is_some());
    node.ui.detail(&format!(
        "admin socket {} (falcon failover status)",
        admin_path.display()
    ));
    if let Some(vm) = &mut node.vm {
        let tfd = vm.tap_fd();
        node.poll
            .registry()
            .register(&mut SourceFd(&tfd), TAP, Interest::READABLE)
            .map_err(io_err("registering the TAP device"))?;
        if let Some(stream) = vm.vm_stream() {
            node.poll
                .registry()
                .register(stream, VM, Interest::READABLE)
                .map_err(io_err("registering the VM's stream"))?;
        }
    }
    // Connections open at the snapshot's op get their own program connection again.
    for &c in &open_at_base {
        node.reopen_app(c);
    }
    if let Some(m) = &restored {
        node.import_resp_state(&m.resp_state, m.resp_state_problem.as_deref());
    }
    // The starting role counts as a change (prints it, runs the hook).
    if node.engine.role() != Role::ViewChange {
        let (role, view, leader) = (node.engine.role(), node.engine.view(), node.engine.leader());
        node.execute(Command::RoleChanged { role, view, leader })?;
    }
    // The fsync thread: fdatasync on a second handle to the active segment,
    // then wake the loop. It keeps that handle while the segment stays the
    // same (no dup and close per fsync); the log sends a new one when the
    // segment changes.
    let (sync_tx, sync_rx) =
        std::sync::mpsc::sync_channel::<crate::log::SyncRequest<crate::log::storage::FsFile>>(1);
    let (synced_tx, synced_rx) = std::sync::mpsc::sync_channel::<Result<(u64, u64), io::Error>>(1);
    let mut sync_held: Option<u64> = None;
    {
        let waker = waker.clone();
        std::thread::Builder::new()
            .name("falcon-fsync".into())
            .spawn(move || {
                use crate::log::StorageFile;
                let mut held = None;
                for req in sync_rx {
                    if req.file.is_some() {
                        held = req.file;
                    }
                    let r = match held.as_mut() {
                        Some(file) => file.sync_data().map(|_| (req.op, req.epoch)),
                        None => Err(io::Error::other("no handle to the log to sync")),
                    };
                    if synced_tx.send(r).is_err() {
                        return;
                    }
                    let _ = waker.wake();
                }
            })
            .map_err(io_err("starting the fsync thread"))?;
    }
    let cfg_sync = cfg.sync;
    let peers_on_tcp = cfg.transport == crate::config::TransportKind::Tcp;
    let our_transport = cfg.transport;
    // Peers already told of for running another transport.
    let mut other_transport_said = vec![false; cfg.replicas.len()];
    let mut last_peer_turn = Instant::now();
    let mut peers_busy = false;
    let mut events = Events::with_capacity(1024);
    // An idle loop sleeps until the engine's next timer, and at most
    // PEER_TIMERS (the transport's own timers, the exit check and the
    // client sweeps are coarser): a few hundred turns a second rather than
    // a thousand. Over shm and rdma, and with a VM, it looks every
    // millisecond as it always did.
    let idle_max = if cfg.transport == crate::config::TransportKind::Tcp && node.vm.is_none() {
        PEER_TIMERS
    } else {
        TICK
    };
    let mut inbox = Vec::new();
    let mut last_exit_check = Instant::now();
    let mut last_client_sweep = Instant::now();
    use crate::transport::shm::PollMode;
    let spin_window = match (cfg.transport, opts.poll) {
        (crate::config::TransportKind::Tcp, _) | (_, PollMode::Sleep) => Duration::ZERO,
        (_, PollMode::Adaptive) => SHM_SPIN,
        (_, PollMode::Spin) => Duration::MAX,
    };
    let mut last_peer_msg = Instant::now() - Duration::from_secs(1);
    loop {
        if stop.load(Ordering::Relaxed) {
            node.sync()?;
            node.seal();
            if let Some(app) = &mut node.app {
                app.stop(Duration::from_secs(5));
            }
            node.vm_report();
            return Ok(NodeExit::Stopped);
        }
        for sig in crate::app::take_signals() {
            if let Some(app) = &node.app {
                ui.note(&format!(
                    "passing {} on to the program (pid {})",
                    sig.as_str(),
                    app.pid()
                ));
                app.signal(sig);
            }
        }
        if last_exit_check.elapsed() >= EXIT_CHECK {
            last_exit_check = Instant::now();
            if last_client_sweep.elapsed() >= CLIENT_SWEEP {
                last_client_sweep = Instant::now();
                node.expire_clients();
                node.look_for_other_mode();
            }
            node.connect_vm();
            if let Some(status) = node.app.as_mut().and_then(App::exited) {
                node.sync()?;
                node.seal();
                node.vm_report();
                return Ok(NodeExit::ProgramExited(status));
            }
            node.hook_children
                .retain_mut(|c| matches!(c.try_wait(), Ok(None)));
            let connecting: Vec<u64> = node.app_connecting.keys().copied().collect();
            for c in connecting {
                node.check_app_connect(c);
            }
            let stale: Vec<u64> = node
                .apps
                .iter()
                .filter(|(_, a)| a.shut.is_some_and(|t| t.elapsed() >= SHUT_WAIT))
                .map(|(&c, _)| c)
                .collect();
            for c in stale {
                node.close_app(c);
            }
        }
        // Over shm, right after peer traffic the loop spins on the rings
        // for a moment instead of sleeping: the next message is likely close.
        let spinning = last_peer_msg.elapsed() < spin_window;
        if let Some(why) = node.program_lost.take() {
            node.sync()?;
            node.seal();
            // The program's exit closes the connection: that is the news, if so.
            let app = node.app.as_mut().expect("a program");
            if let Some(status) = app.wait_exit(Duration::from_millis(500)) {
                return Ok(NodeExit::ProgramExited(status));
            }
            app.stop(Duration::from_secs(5));
            return Err(NodeError::Shared(why));
        }
        if let Some(why) = node.vm_lost.take() {
            node.sync()?;
            node.seal();
            node.vm_report();
            return Err(NodeError::VmDiverged(why));
        }
        let mut wait = if node.unread.is_empty()
            && node.app_unread.is_empty()
            && !spinning
            && !node.tap_more
            && !node.vm_more
        {
            node.idle_wait(idle_max)
        } else {
            Duration::ZERO
        };
        // Over shm and rdma, peers wake a sleeping loop only when told it sleeps.
        let slept = !wait.is_zero();
        let mut peers_ready = false;
        if slept && !node.transport.before_sleep() {
            // A message came in since the last look: no sleep, and look now.
            wait = Duration::ZERO;
            peers_ready = true;
        }
        let polled = node.poll.poll(&mut events, Some(wait));
        if slept {
            node.transport.after_sleep();
        }
        match polled {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(NodeError::Io {
                    context: "waiting for events".into(),
                    source: e,
                });
            }
        }
        for ev in events.iter() {
            let t = ev.token();
            let closed = ev.is_read_closed() || ev.is_error();
            let ready = Ready {
                readable: ev.is_readable() || closed,
                writable: ev.is_writable(),
                closed,
            };
            if t == CLIENTS {
                node.accept_clients()?;
            } else if t == PEERS {
                peers_ready = true;
            } else if t == SYNCED {
                // The fsync thread (handled below) or the shm doorbell: look
                // at the peers too (over TCP the peers' sockets say so
                // themselves, through PEERS).
                peers_ready |= !peers_on_tcp;
            } else if t == TAP {
                node.on_tap()?;
            } else if t == VM {
                node.on_vm(ready)?;
            } else if t.0 >= APP_BASE {
                node.on_app(t, ready);
            } else if t.0 >= CLIENT_BASE {
                node.on_client(t, ready)?;
            }
        }
        if node.tap_more {
            node.on_tap()?;
        }
        if std::mem::take(&mut node.vm_more) {
            node.on_vm(Ready::READ)?;
        }
        for t in std::mem::take(&mut node.unread) {
            node.on_client(t, Ready::READ)?;
        }
        for (t, closed) in std::mem::take(&mut node.app_unread) {
            node.on_app(
                t,
                Ready {
                    readable: true,
                    writable: false,
                    closed,
                },
            );
        }
        if node.role == Role::Leader {
            for conn in std::mem::take(&mut node.closes_owed) {
                node.proposals.push(close_event(conn));
            }
        } else {
            // A new view closes every connection of the old one anyway.
            node.closes_owed.clear();
        }
        node.propose()?;
        node.look_for_answer();
        node.serve_admin()?;
        // The transport works when its sockets are ready, and every few
        // milliseconds for its own timers (reconnects, handshake deadlines).
        // (The readiness of the transport's own epoll descriptor is reported
        // once per change, so a turn that brought messages earns another.)
        if peers_ready
            || peers_busy
            || spinning
            || poll_peers_every_turn
            || last_peer_turn.elapsed() >= PEER_TIMERS
        {
            last_peer_turn = Instant::now();
            inbox.clear();
            node.transport
                .recv(Duration::ZERO, &mut inbox)
                .map_err(io_err("receiving from peers"))?;
            peers_busy = !inbox.is_empty();
            if peers_busy {
                last_peer_msg = Instant::now();
            }
        }
        for env in inbox.drain(..) {
            use crate::consensus::Message;
            if matches!(
                env.msg,
                Message::SnapshotRequest { .. } | Message::SnapshotChunk { .. }
            ) {
                if env.cluster == node.cluster_id && env.to == node.me {
                    node.on_snapshot_message(env.from, env.msg)?;
                }
                continue;
            }
            if matches!(env.msg, Message::LinkSetup { .. }) {
                // A peer that runs another transport (its own transport
                // would have taken it): said once per peer, since its
                // links never come up the way it waits for.
                if let Some(said) = other_transport_said.get_mut(env.from as usize) {
                    if !*said {
                        *said = true;
                        node.ui.warn(&format!(
                            "replica {} runs transport = \"rdma\", this replica transport = {}: every replica of a cluster needs the same transport (the cluster file's `transport`)",
                            node.ids.get(env.from as usize).copied().unwrap_or(0),
                            serde_json::to_string(&our_transport).unwrap_or_default()
                        ));
                    }
                }
                continue;
            }
            if node.role == Role::Follower
                && env.msg.entries().is_some_and(|e| !e.is_empty())
                && (node.program_behind() || node.disk_full.is_some())
            {
                // Its program is behind, or its log cannot grow: take no new
                // entries (they would only pile up in memory). It falls
                // behind; the leader sends them again, from its log if need
                // be. What the message says of the commit point still counts
                // as the leader's word (so it does not look leaderless).
                use crate::consensus::Message;
                if let Message::Prepare { view, commit, .. }
                | Message::CatchUp { view, commit, .. } = env.msg
                {
                    node.step(Input::Receive(Envelope {
                        msg: Message::Commit { view, commit },
                        ..env
                    }))?;
                }
                continue;
            }
            node.step(Input::Receive(env))?;
        }
        if let Some(path) = node
            .install
            .take_if(|_| node.resync.as_ref().is_some_and(|r| r.fetching()))
        {
            node.resync_from(path)?;
        }
        if let Some(path) = node.install.take() {
            node.install_snapshot(path)?;
        }
        if let Some(why) = node.fetch_stalled() {
            node.drop_fetch(&why, false)?;
        }
        if node.accept_again.is_some_and(|t| Instant::now() >= t) {
            node.accept_again = None;
            node.accept_clients()?;
        }
        if node.refetch_at.is_some_and(|t| Instant::now() >= t) {
            // The engine stops waiting and takes the leader's next offer.
            node.refetch_at = None;
            node.step(Input::SnapshotInstalled {
                op: 0,
                open_conns: Vec::new(),
            })?;
        }
        if node
            .fetch
            .as_ref()
            .is_some_and(|f| f.asked.elapsed() >= FETCH_RETRY)
        {
            node.ask_chunk();
        }
        node.look_for_answer();
        node.drive_snapshot()?;
        node.feed_resync()?;
        node.feed_replay()?;
        node.save_commit_point(false);
        for ev in node.transport.events() {
            match ev {
                TransportEvent::Refused { addr, reason } => {
                    // At most a line a second: a peer with the wrong key, or
                    // a flood of strangers, must not flood the log.
                    let Some(more) = node.refused_peer.due() else {
                        continue;
                    };
                    ui.warn(&format!(
                        "refused a peer connection from {addr}: {reason}{}",
                        if more > 0 {
                            format!(" ({more} more refused since the last such line)")
                        } else {
                            String::new()
                        }
                    ))
                }
                TransportEvent::Lost { peer, reason } => {
                    // One line when the last link to a replica goes (not per failed redial).
                    let links = &mut node.observed.peers[peer as usize];
                    let was = *links;
                    *links = was.saturating_sub(1);
                    if was == 1 {
                        node.observed.peer_losses += 1;
                        ui.note(&format!(
                            "lost the link to replica {}: {reason}",
                            node.ids[peer as usize]
                        ));
                    } else {
                        ui.detail(&format!(
                            "replica {} still unreachable: {reason}",
                            node.ids[peer as usize]
                        ));
                    }
                }
                TransportEvent::Connected { peer, incoming } => {
                    node.observed.peers[peer as usize] += 1;
                    ui.detail(&format!(
                        "connected to replica {} ({})",
                        node.ids[peer as usize],
                        if incoming { "in" } else { "out" }
                    ))
                }
            }
        }
        node.look_for_answer();
        node.step(Input::Tick)?;
        node.propose()?;
        node.pump_apply();
        node.release_vm_output();
        // Group commit on the fsync thread: the loop goes on while the disk works.
        while let Ok(result) = synced_rx.try_recv() {
            node.sync_inflight = false;
            if let Some(t) = node.observed.sync_sent.take() {
                node.observed
                    .fsync_latency
                    .observe(t.elapsed().as_nanos() as u64);
            }
            node.log.note_synced(result)?;
            node.tell_durable()?;
        }
        node.look_for_answer();
        // Input held during the fsync that just ended goes now, into the next one.
        node.propose()?;
        // Something appended is not durable yet, or the fsync thread holds
        // a segment no longer written (a new segment, a truncation, a log
        // reset by a snapshot: its space comes back only once the thread
        // lets go), and no fsync is under way.
        let handle_stale = sync_held.is_some_and(|h| h != node.log.handle_id());
        if (node.log.durable_op() < node.log.last_op() || handle_stale) && !node.sync_inflight {
            if cfg_sync == crate::log::SyncPolicy::Never {
                node.sync()?;
                node.tell_durable()?;
            } else {
                let req = node.log.sync_handle(sync_held)?;
                sync_held = Some(req.handle_id);
                node.sync_inflight = true;
                node.observed.sync_sent = Some(Instant::now());
                if sync_tx.send(req).is_err() {
                    return Err(NodeError::Io {
                        context: "the fsync thread stopped".into(),
                        source: io::Error::other("fsync thread gone"),
                    });
                }
            }
        }
        // And what is on disk without the fsync thread: every append under
        // sync = "always", a view change's save on the loop.
        node.tell_durable()?;
        node.hand_off_full_disk()?;
        node.retry_unwritten()?;
        node.vm_interest();
        if !node.paused.is_empty()
            && !node.apply_queue.over(&node.limits, true)
            && !node.input_held()
        {
            let resumed = std::mem::take(&mut node.paused);
            node.unread.extend(resumed);
        }
        if node.tap_paused && !node.input_held() {
            node.tap_paused = false;
            node.tap_more = true;
        }
        // Everything this turn sent to peers goes out in one write per peer,
        // and what it handed the program in one write.
        node.transport.flush();
        node.flush_shared();
    }
}

/// Arguments of `falcon replicate`.
#[derive(Clone, Debug, clap::Args)]
#[command(after_help = REPLICATE_EXAMPLES)]
pub struct ReplicateArgs {
    /// The cluster file (default: ./falcon.toml, then /etc/falcon/falcon.toml).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// This replica's id in the cluster file (default: $FALCON_NODE, else the
    /// replica whose peer address is an address of this host).
    #[arg(long, value_name = "ID")]
    pub node: Option<u32>,

    /// Overrides the cluster file's election timeout.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub election_timeout: Option<Duration>,

    /// How long to wait for the program to accept connections on its app address.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    pub app_timeout: Duration,

    /// What a follower does with a client that connects to it.
    #[arg(long, value_enum, value_name = "WHAT", default_value_t = FollowerClients::Forward)]
    pub follower_clients: FollowerClients,

    /// Run CMD (with sh -c) when this replica becomes the leader, for example
    /// to move a virtual IP. Environment: FALCON_ROLE, FALCON_VIEW, FALCON_NODE, FALCON_LEADER.
    #[arg(long, value_name = "CMD")]
    pub on_leader: Option<String>,

    /// Run CMD (with sh -c) when this replica becomes a follower (same environment).
    #[arg(long, value_name = "CMD")]
    pub on_follower: Option<String>,

    /// Run CMD (with sh -c) before the program starts, to bring it to its
    /// initial state (for example, empty its data directory); the log is then
    /// replayed into it. Also before `falcon failover resync` rebuilds the
    /// program. Environment: FALCON_NODE, FALCON_DATA_DIR.
    #[arg(long, value_name = "CMD")]
    pub reset_cmd: Option<String>,

    /// Run CMD (with sh -c) when this replica finds that its program wrote
    /// other bytes than the leader's (divergence detection; see
    /// divergence_chunk in the cluster file), for example to page someone.
    /// Environment: FALCON_NODE, FALCON_DATA_DIR, FALCON_CONN, FALCON_OFFSET
    /// (the first byte of the first chunk that differs), FALCON_CHUNK,
    /// FALCON_OP, FALCON_DIVERGENCE (the whole message).
    #[arg(long, value_name = "CMD")]
    pub on_divergence: Option<String>,

    /// Run CMD (with sh -c) to write the program's state into the directory
    /// $FALCON_SNAPSHOT_DIR, every --snapshot-every entries. Applying pauses
    /// while it runs; falcon then packs the directory into DATA_DIR/snapshot
    /// and deletes log segments it covers. Environment: FALCON_SNAPSHOT_DIR,
    /// FALCON_OP, FALCON_NODE, FALCON_DATA_DIR, FALCON_APP, FALCON_APP_HOST,
    /// FALCON_APP_PORT. Needs --restore-cmd.
    #[arg(long, value_name = "CMD", requires = "restore_cmd")]
    pub snapshot_cmd: Option<String>,

    /// Run CMD (with sh -c) before the program starts, to put the state in
    /// $FALCON_SNAPSHOT_DIR in place: at a restart with a snapshot in the
    /// data dir, and when a replica too far behind receives the leader's
    /// snapshot. Same environment as --snapshot-cmd.
    #[arg(long, value_name = "CMD")]
    pub restore_cmd: Option<String>,

    /// Entries applied between two snapshots.
    #[arg(long, value_name = "N", default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub snapshot_every: u64,

    /// How long --snapshot-cmd may run (applying is paused meanwhile): past
    /// it, the command and everything it started are killed, this snapshot
    /// is given up (the log keeps every entry) and applying goes on.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = humantime::parse_duration)]
    pub snapshot_timeout: Duration,

    /// Run no program: clients send frames (u32 little-endian length, then
    /// the bytes) and the leader answers each committed frame with its op
    /// and the nanoseconds from proposing it to applying it on the leader
    /// (two u64 little-endian). What `falcon bench --consensus` measures.
    #[arg(long, hide = true, conflicts_with_all = ["snapshot_cmd", "restore_cmd", "reset_cmd"])]
    pub null_program: bool,

    /// Delivered entries each replica keeps in memory for followers that
    /// fall behind a little; older ones are read back from the log.
    #[arg(long, hide = true, value_name = "N", default_value_t = 65_536)]
    pub memory_entries: u64,

    /// With transport shm or rdma: how the replica waits for its peers.
    /// adaptive spins on the rings for 50 µs after each peer message, then
    /// sleeps; spin never sleeps (lowest latency; a core per replica, so
    /// only where each replica has a core of its own); sleep never spins.
    /// TCP always sleeps in epoll.
    #[arg(long, value_enum, value_name = "MODE", default_value = "adaptive")]
    pub poll: crate::transport::shm::PollMode,

    /// Serve Prometheus metrics at http://ADDR/metrics (commit latency,
    /// commits, view and role, follower lag, log size, fsync latency,
    /// connections). Every replica also answers `falcon failover status`
    /// on admin.sock in its data directory.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,

    /// Mutual TLS on the peer links: this replica's certificate (PEM, signed
    /// by --tls-ca, with the IP of its peer address in subjectAltName).
    /// Overrides the cluster file's tls_cert. scripts/tls-certs.sh makes a CA
    /// and one certificate per replica.
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,

    /// Mutual TLS: this replica's private key (PEM). Overrides tls_key.
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_ca"])]
    pub tls_key: Option<PathBuf>,

    /// Mutual TLS: the cluster CA's certificate (PEM); peers must present a
    /// certificate it signed. Overrides tls_ca. Every replica must use TLS.
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,

    /// Write a new random cluster key to FILE (mode 0600) and exit.
    #[arg(long, value_name = "FILE", exclusive = true)]
    pub new_key: Option<PathBuf>,

    /// The program and its arguments, after `--`.
    #[arg(last = true, value_name = "PROGRAM")]
    pub program: Vec<String>,
}

const REPLICATE_EXAMPLES: &str = "\
Examples:
  falcon replicate --new-key cluster.key
  falcon replicate --config cluster.toml --node 1 -- redis-server --port 7001 --save ''
  FALCON_NODE=2 falcon replicate -- redis-server --port 7002 --save ''
  falcon replicate --node 1 --snapshot-every 100000 \\
    --snapshot-cmd 'redis-cli -p $FALCON_APP_PORT SAVE >/dev/null && cp data/1/dump.rdb $FALCON_SNAPSHOT_DIR/' \\
    --restore-cmd 'cp $FALCON_SNAPSHOT_DIR/dump.rdb data/1/dump.rdb' \\
    -- redis-server --port 7001 --save '' --dir data/1

Every replica runs the same command with its own --node. Clients connect to
any replica's client address (a follower forwards them to the leader); the leader
orders their input, every replica feeds it to its own copy of the program
once a majority has it on disk, and the leader sends the answers back.

The cluster file (TOML; relative paths are relative to the file; an error
names the line and the field):

  cluster = \"demo\"            # cluster id; peers of another cluster are refused
  key_file = \"cluster.key\"    # shared secret, at least 32 bytes, read raw
  transport = \"tcp\"           # tcp; shm when every replica is on one host; rdma
                                # (a build with --features rdma, an RDMA device)
  rdma_device = \"rxe0\"        # optional, rdma: the device (default: the first)
  rdma_fallback = \"tcp\"       # optional, rdma: use TCP on a host without a device
  sync = \"batch\"              # always | batch | never
  election_timeout = \"150ms\"
  heartbeat = \"15ms\"          # optional, default election_timeout / 10
  segment_size = \"64MiB\"      # optional; log segment size (snapshots drop whole segments)
  log_preallocate = \"4MiB\"    # optional; space reserved ahead of the log's writes (\"off\")
  tls_ca = \"tls/ca.pem\"       # optional, tcp: mutual TLS on peer links, this CA; then
                                # every replica needs tls_cert and tls_key
                                # (scripts/tls-certs.sh --config FILE makes all three)
  divergence_chunk = \"16KiB\"  # optional; compare the program's output with the
                                # leader's every this many bytes of a connection and
                                # at its close (\"off\": never); the same everywhere
  divergence_protocol = \"bytes\" # optional; bytes | postgres (ignore its pids, keys)
  program_protocol = \"bytes\"  # optional; bytes: one program connection per client;
                                # resp: Redis's protocol, every client's commands down
                                # one pipelined connection (faster; no SELECT n, WATCH,
                                # blocking or subscribe commands)

  [limits]                      # optional; each field optional (defaults shown)
  client_connections = 4096     # more are closed at once (and logged once a second)
  client_buffer = \"16MiB\"     # per client connection, each way; a client that does
                                # not read its answers past it is disconnected
  program_backlog = 65536       # committed entries waiting for the program; past it
                                # clients are not read (TCP pushes back)
  program_backlog_bytes = \"256MiB\" # the same in bytes
  pending_entries = 65536       # proposed, not committed; past half, clients are not
                                # read; past all, proposals are refused
  pending_bytes = \"256MiB\"    # the same in bytes (past half, clients are not read)
  batch_entries = 1024          # entries per Prepare message
  batch_bytes = \"1MiB\"        # payload bytes per Prepare message
  peer_queue = \"64MiB\"        # tcp: bytes queued for one peer that does not read
  memory_window = \"256MiB\"   # committed entries kept in memory for a follower a
                                # little behind; older ones are read from the log

  [[replica]]                   # 1, 3, 5, 7 or 9 of them
  id = 1
  peer = \"127.0.0.1:7101\"     # replica-to-replica address
  client = \"127.0.0.1:7201\"   # where clients connect
  app = \"127.0.0.1:7001\"      # where this replica's copy of the program listens
  data_dir = \"data/1\"         # log, view state, program output
  tls_cert = \"tls/replica-1.pem\"  # with tls_ca: signed by it, naming the peer IP
  tls_key = \"tls/replica-1.key\"   # with tls_ca: its private key (mode 600)

Without --config: ./falcon.toml, then /etc/falcon/falcon.toml. Without
--node: $FALCON_NODE, else the replica whose peer address is on this host.
A commented example is fixtures/cluster.toml.

Signals: Ctrl-C or SIGTERM stops the replica (the log is flushed, then the
program gets SIGTERM); SIGHUP, SIGUSR1 and SIGUSR2 are passed on to the
program. When the program exits, the replica stops and reports its exit
status (falcon exits 1).";

/// Why `falcon replicate` could not start.
#[derive(Debug, thiserror::Error)]
pub enum ReplicateError {
    /// The cluster file or key.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The node.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// A usage problem.
    #[error("{0}")]
    Usage(String),
}

/// Runs `falcon replicate`. `stop` ends it (set it from a Ctrl-C handler).
pub fn replicate(
    args: &ReplicateArgs,
    ui: &Ui,
    stop: Arc<AtomicBool>,
) -> Result<crate::output::Status, ReplicateError> {
    replica(args, None, ui, stop)
}

/// `falcon tap-attach`: a QEMU virtual machine whose inbound frames are
/// ordered through the engine.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = TAP_ATTACH_HELP)]
pub struct TapAttachArgs {
    /// The host's TAP device that carries the VM's traffic (its MAC is the
    /// VM's on every replica).
    #[arg(value_name = "TAP")]
    pub tap: String,

    /// Create the TAP device when it is missing (and bring it up); it goes
    /// away when falcon stops.
    #[arg(long)]
    pub create: bool,

    /// Write the ordered inbound frames (what every VM receives, in order)
    /// to FILE as pcap.
    #[arg(long, value_name = "FILE")]
    pub capture: Option<PathBuf>,

    /// Serve a QEMU started separately with -netdev stream,server=on,
    /// addr.type=unix,addr.path=PATH: falcon connects, and connects again
    /// when QEMU restarts. Without a QEMU command and without this, falcon
    /// uses qemu-net.sock in the replica's data directory and says so.
    #[arg(long, value_name = "PATH")]
    pub qemu_socket: Option<PathBuf>,

    /// When the leader's VM gets an inbound frame: `early`, as the leader
    /// proposes it, while what the VM sends waits until that input is
    /// committed (the VM works while the replicas agree; a leader deposed
    /// before its early input committed, whose input the next view drops,
    /// stops and must be restarted); `committed`, only once a majority has
    /// it, like every backup's VM.
    #[arg(long, value_enum, value_name = "WHEN", default_value_t = Deliver::Early)]
    pub deliver: Deliver,

    /// Everything `falcon replicate` takes: the cluster file, --node, hooks;
    /// after `--`, the QEMU command line.
    #[command(flatten)]
    pub replica: ReplicateArgs,
}

const TAP_ATTACH_HELP: &str = "\
falcon opens the TAP device, starts QEMU with one end of a socket pair as
its network backend (it appends -netdev stream,id=falcon,server=off,
addr.type=fd,addr.str=N to the command), and orders every frame that
arrives on the TAP device through the replicas: each VM receives the same
frames in the same order. A backup's VM receives a frame once a majority
has it; the leader's, as it proposes it (--deliver early, the default),
but nothing the leader's VM sends leaves the host before every frame it
had received is on a majority. The leader's VM's frames go out through
its TAP device; a backup's are dropped.

Examples (give the VM its NIC on that backend, with the same MAC on every
replica):

  falcon tap-attach tap0 --config cluster.toml --node 1 -- \\
      qemu-system-x86_64 -accel tcg -m 128 -nodefaults -nographic \\
      -kernel vmlinux -initrd guest.cpio.gz \\
      -device virtio-net-pci,netdev=falcon,mac=52:54:00:12:34:56,romfile=

QEMU's output goes to qemu.log in the replica's data directory.";

/// Runs `falcon tap-attach`.
pub fn tap_attach(
    args: &TapAttachArgs,
    ui: &Ui,
    stop: Arc<AtomicBool>,
) -> Result<crate::output::Status, ReplicateError> {
    if !args.replica.program.is_empty() && args.qemu_socket.is_some() {
        return Err(ReplicateError::Usage(
            "--qemu-socket serves a QEMU started separately; it does not go with a QEMU command after --".into(),
        ));
    }
    if args.replica.null_program {
        return Err(ReplicateError::Usage(
            "--null-program does not go with tap-attach".into(),
        ));
    }
    let socket = if args.replica.program.is_empty() {
        Some(args.qemu_socket.clone().unwrap_or_default())
    } else {
        None
    };
    let tap = TapOptions {
        name: args.tap.clone(),
        create: args.create,
        capture: args.capture.clone(),
        socket,
        deliver: args.deliver,
    };
    replica(&args.replica, Some(tap), ui, stop)
}

fn replica(
    args: &ReplicateArgs,
    tap: Option<TapOptions>,
    ui: &Ui,
    stop: Arc<AtomicBool>,
) -> Result<crate::output::Status, ReplicateError> {
    use crate::config::{self, ClusterConfig};
    if let Some(path) = &args.new_key {
        config::generate_key(path)?;
        ui.note(&format!(
            "wrote a new 32-byte cluster key to {}; copy it to every replica",
            path.display()
        ));
        return Ok(crate::output::Status::Success);
    }
    if args.program.is_empty() && !args.null_program && tap.is_none() {
        return Err(ReplicateError::Usage("no program to run: give it after --, e.g. falcon replicate -- redis-server --port 7001".into()));
    }
    let path = ClusterConfig::find(args.config.as_deref())?;
    let mut cfg = ClusterConfig::load(&path)?;
    if let Some(t) = args.election_timeout {
        cfg.election_timeout = t;
        cfg.heartbeat = cfg.heartbeat.min(t / 3);
    }
    let index = cfg.choose_node(args.node)?;
    let key_file = cfg.key_file.clone().ok_or_else(|| {
        ReplicateError::Usage(format!(
            "{}: key_file is required (falcon replicate --new-key cluster.key)",
            path.display()
        ))
    })?;
    let key = config::read_key(&key_file)?;
    if let Some(w) = config::key_exposure(&key_file) {
        ui.warn(&w);
    }
    if let (Some(cert), Some(key), Some(ca)) = (&args.tls_cert, &args.tls_key, &args.tls_ca) {
        if cfg.transport != config::TransportKind::Tcp {
            return Err(ReplicateError::Usage(
                "--tls-cert/--tls-key/--tls-ca are for transport = \"tcp\"".into(),
            ));
        }
        cfg.tls_ca = Some(ca.clone());
        cfg.replicas[index].tls_cert = Some(cert.clone());
        cfg.replicas[index].tls_key = Some(key.clone());
    }
    let tls = match cfg.tls_files(index) {
        None => None,
        Some(files) => {
            let ctx =
                crate::transport::tls::TlsContext::load(&files, cfg.replicas[index].peer.ip())
                    .map_err(|e| ReplicateError::Usage(format!("TLS: {e}")))?;
            if config::key_exposure(&files.key).is_some() {
                ui.warn(&format!(
                    "{}: the TLS private key can be read by others; chmod 600 {}",
                    files.key.display(),
                    files.key.display()
                ));
            }
            ui.note(&format!(
                "peer links use mutual TLS (CA {})",
                files.ca.display()
            ));
            Some(Arc::new(ctx))
        }
    };
    let opts = NodeOptions {
        config: cfg,
        index,
        key,
        program: args.program.clone(),
        app_timeout: args.app_timeout,
        follower_clients: args.follower_clients,
        on_leader: args.on_leader.clone(),
        on_follower: args.on_follower.clone(),
        on_divergence: args.on_divergence.clone(),
        reset_cmd: args.reset_cmd.clone(),
        snapshot_cmd: args.snapshot_cmd.clone(),
        restore_cmd: args.restore_cmd.clone(),
        snapshot_every: args.snapshot_every,
        snapshot_timeout: args.snapshot_timeout,
        null_program: args.null_program,
        memory_entries: args.memory_entries,
        poll: args.poll,
        tap,
        metrics: args.metrics,
        tls,
    };
    match run(opts, ui, stop)? {
        NodeExit::Stopped => Ok(crate::output::Status::Success),
        NodeExit::ProgramExited(status) => {
            ui.error(&format!(
                "the program exited ({status}); this replica stopped"
            ));
            Ok(crate::output::Status::Failure)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forward_to_the_leader_notices_a_dead_host_in_seconds() {
        use std::os::fd::AsRawFd;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let s = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        keep_alive(&s, 10_000);
        let get = |level, name| {
            let mut v: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: getsockopt of an int option into an int.
            let r = unsafe {
                libc::getsockopt(
                    s.as_raw_fd(),
                    level,
                    name,
                    (&mut v as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            assert_eq!(r, 0);
            v
        };
        assert_eq!(get(libc::SOL_SOCKET, libc::SO_KEEPALIVE), 1);
        assert_eq!(get(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE), 5);
        assert_eq!(get(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL), 1);
        assert_eq!(get(libc::IPPROTO_TCP, libc::TCP_KEEPCNT), 3);
        assert_eq!(get(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT), 10_000);
    }
}
