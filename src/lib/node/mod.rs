//! One replica's event loop: the engine, the log, the transport, the proxy
//! front end and the program, driven by one thread (mio).
//!
//! Data flow: a client connection on the leader becomes Open/Data/Close
//! events; the engine orders them; every replica applies committed events to
//! its own copy of the program over its own local connections; the leader
//! sends the program's answers back to the client; followers read and
//! discard theirs so the program never blocks.

use std::collections::HashMap;
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

use crate::app::{App, AppError};
use crate::config::ClusterConfig;
use crate::consensus::{
    Command, Config, Envelope, Event, Input, NodeId, PersistentState, Reject, Replica, Role,
};
use crate::log::{Entry, FsStorage, Kind, LogError, LogOptions, SegmentLog};
use crate::output::Ui;
use crate::transport::tcp::{TcpOptions, TcpTransport};
use crate::transport::{Transport, TransportEvent};

const CLIENTS: Token = Token(1);
const PEERS: Token = Token(2);
const SYNCED: Token = Token(3);
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
/// Bytes buffered towards one client or one program connection, at most.
const BUFFER_MAX: usize = 16 << 20;
/// How often the loop asks whether the program (or a hook) exited.
const EXIT_CHECK: Duration = Duration::from_millis(20);

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
}

/// What a follower does with a client that connects to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum FollowerClients {
    /// Pass the connection on to the leader's client address (both ways, until either side closes).
    #[default]
    Forward,
    /// Close it: the client tries another replica.
    Refuse,
}

/// Forwarded connections at most, per replica.
const FORWARDS_MAX: usize = 1024;

/// Passes a client connection on to the leader, on two threads (one per direction).
fn forward(
    client: std::net::TcpStream,
    leader: SocketAddr,
    active: Arc<std::sync::atomic::AtomicUsize>,
) {
    let counted = active.clone();
    let spawned = std::thread::Builder::new()
        .name("falcon-forward".into())
        .spawn(move || {
            let done =
                |active: &std::sync::atomic::AtomicUsize| active.fetch_sub(1, Ordering::Relaxed);
            let Ok(upstream) =
                std::net::TcpStream::connect_timeout(&leader, Duration::from_secs(1))
            else {
                done(&active);
                return;
            };
            let _ = upstream.set_nodelay(true);
            let _ = client.set_nodelay(true);
            let (Ok(mut c2), Ok(mut u2)) = (client.try_clone(), upstream.try_clone()) else {
                done(&active);
                return;
            };
            let back = std::thread::spawn(move || {
                let _ = io::copy(&mut u2, &mut c2);
                let _ = c2.shutdown(std::net::Shutdown::Both);
            });
            let (mut c, mut u) = (client, upstream);
            let _ = io::copy(&mut c, &mut u);
            let _ = u.shutdown(std::net::Shutdown::Both);
            let _ = back.join();
            done(&active);
        });
    if spawned.is_err() {
        // Could not start a thread: the connection is dropped, and counted back.
        counted.fetch_sub(1, Ordering::Relaxed);
    }
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
    out: Vec<u8>,
}

struct AppConn {
    stream: TcpStream,
    token: Token,
    out: Vec<u8>,
    /// Closed in the log: close once everything written so far reached the program.
    closing: bool,
}

/// The state file next to the log: `view log_view`, written atomically.
fn save_state(dir: &Path, st: PersistentState) -> io::Result<()> {
    let tmp = dir.join("state.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    writeln!(f, "{} {}", st.view, st.log_view)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join("state"))?;
    std::fs::File::open(dir)?.sync_all()
}

fn load_state(dir: &Path) -> io::Result<Option<PersistentState>> {
    match std::fs::read_to_string(dir.join("state")) {
        Ok(s) => {
            let mut it = s.split_whitespace().map(str::parse::<u64>);
            match (it.next(), it.next()) {
                (Some(Ok(view)), Some(Ok(log_view))) => {
                    Ok(Some(PersistentState { view, log_view }))
                }
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

struct Node<'a> {
    ui: &'a Ui,
    me: NodeId,
    cluster_id: u64,
    app_addr: SocketAddr,
    data_dir: PathBuf,
    engine: Replica,
    log: SegmentLog<FsStorage>,
    transport: TcpTransport,
    poll: Poll,
    clients: HashMap<Token, ClientConn>,
    client_of_conn: HashMap<u64, Token>,
    apps: HashMap<u64, AppConn>,
    app_tokens: HashMap<Token, u64>,
    next_token: usize,
    next_conn: u64,
    held: Vec<(u64, NodeId, crate::consensus::Message)>,
    /// Client input read in this turn of the loop, proposed as one batch at its end.
    proposals: Vec<Event>,
    /// Clients that had more to read when their turn ended.
    unread: Vec<Token>,
    /// Reused for every socket read (no allocation per event).
    read_buf: Vec<u8>,
    start: Instant,
    role: Role,
    /// Operator ids of the replicas, by index (for messages and hooks).
    ids: Vec<u32>,
    hooks: (Option<String>, Option<String>),
    hook_children: Vec<std::process::Child>,
    follower_clients: FollowerClients,
    client_addrs: Vec<SocketAddr>,
    forwards: Arc<std::sync::atomic::AtomicUsize>,
    /// Entries applied to the program since start, and the log's end at start
    /// (reported once the replay reaches it).
    applied: u64,
    replay: Option<(u64, Instant, indicatif::ProgressBar)>,
    /// Committed entries not yet handed to the program.
    apply_queue: std::collections::VecDeque<Entry>,
    /// The connection written to last, and whether its answer is still due.
    last_written: Option<u64>,
    awaiting_answer: Option<Instant>,
    clients_listener: TcpListener,
}

impl Node<'_> {
    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
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
                self.log.append(&entries)?;
            }
            Command::Truncate { after } => {
                self.log.truncate_after(after)?;

                self.held.retain(|h| h.0 <= after);
            }
            Command::SaveState(st) => {
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
                self.apply_queue.extend(entries);
                self.pump_apply();
            }
            Command::RoleChanged { role, view, leader } => {
                let was = self.role;
                self.role = role;
                let (me, lead) = (self.ids[self.me as usize], self.ids[leader as usize]);
                let name = match role {
                    Role::Leader => "leader",
                    Role::Follower => "follower",
                    Role::ViewChange => "changing views",
                };
                self.ui.note(&format!(
                    "replica {me}: {name} in view {view} (leader: replica {lead})"
                ));
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
                if was == Role::Leader && role != Role::Leader {
                    // Clients of the old leader reconnect; the new view closes their connections everywhere.
                    let tokens: Vec<Token> = self.clients.keys().copied().collect();
                    for t in tokens {
                        self.drop_client(t, false);
                    }
                }
            }
            Command::Rejected { events, reason } => {
                // Input that cannot be ordered must not vanish silently: close its connection.
                for ev in events {
                    if let Some(&t) = self.client_of_conn.get(&ev.conn) {
                        let propose_close =
                            matches!(reason, Reject::Busy) && ev.kind != Kind::Close;
                        self.drop_client(t, propose_close);
                    }
                }
            }
            Command::FetchSnapshot { from, op } => {
                self.ui.error(&format!(
                    "replica {} needs a snapshot up to op {op} from replica {}; snapshots are not supported yet: restart this replica with an empty data directory",
                    self.ids[self.me as usize],
                    self.ids[from as usize]
                ));
            }
        }
        Ok(())
    }

    /// Proposes the client input of this turn as one batch: one Prepare per
    /// follower and one log write for all of it.
    fn propose(&mut self) -> Result<(), NodeError> {
        while !self.proposals.is_empty() {
            let events = std::mem::take(&mut self.proposals);
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
        let _ = self.transport.send(&env);
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

    /// Hands committed entries to the program, one connection at a time:
    /// before bytes go to another connection, the program answers the last
    /// one (or 200 ms pass), so the program sees requests of different
    /// connections in log order on every replica — also when a replica
    /// replays thousands of entries at once.
    fn pump_apply(&mut self) {
        while let Some(e) = self.apply_queue.front() {
            // Wait for the last connection's answer before bytes go to another
            // connection, and before that connection closes (a multi-threaded
            // program such as memcached would otherwise run the next
            // connection's request first).
            let must_wait = match e.kind {
                Kind::Data => self
                    .last_written
                    .is_some_and(|c| c != e.conn && self.apps.contains_key(&c)),
                Kind::Close => self.last_written == Some(e.conn) && self.apps.contains_key(&e.conn),
                _ => false,
            };
            if must_wait
                && self
                    .awaiting_answer
                    .is_some_and(|t| t.elapsed() < ANSWER_WAIT)
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

    /// Applies one committed entry to this replica's copy of the program.
    fn apply(&mut self, e: Entry) {
        self.applied += 1;
        if let Some((target, started, pb)) = &self.replay {
            pb.set_position(self.applied.min(*target));
            if self.applied >= *target {
                pb.finish_and_clear();
                self.ui.note(&format!(
                    "replayed {target} entries of the log into the program in {:.1} s",
                    started.elapsed().as_secs_f64()
                ));
                self.replay = None;
            }
        }
        match e.kind {
            Kind::Open => {
                if let Ok(std) = std::net::TcpStream::connect(self.app_addr) {
                    let _ = std.set_nodelay(true);
                    let _ = std.set_nonblocking(true);
                    let mut stream = TcpStream::from_std(std);
                    let token = Token(APP_BASE + self.next_token);
                    self.next_token += 1;
                    if self
                        .poll
                        .registry()
                        .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
                        .is_ok()
                    {
                        self.app_tokens.insert(token, e.conn);
                        self.apps.insert(
                            e.conn,
                            AppConn {
                                stream,
                                token,
                                out: Vec::new(),
                                closing: false,
                            },
                        );
                    }
                } else {
                    self.ui.error(&format!(
                        "cannot connect to the program at {}",
                        self.app_addr
                    ));
                }
            }
            Kind::Data => {
                if let Some(a) = self.apps.get_mut(&e.conn) {
                    if a.out.len() + e.payload.len() > BUFFER_MAX {
                        self.ui.warn(&format!(
                            "connection {} to the program is not draining; closing it",
                            e.conn
                        ));
                        self.close_app(e.conn);
                        return;
                    }
                    a.out.extend_from_slice(&e.payload);
                    flush(&mut a.stream, &mut a.out);
                }
            }
            Kind::Close => {
                // Bytes still on their way to the program go first: a replica
                // replaying its log writes faster than the program reads.
                match self.apps.get_mut(&e.conn) {
                    Some(a) if !a.out.is_empty() => a.closing = true,
                    _ => self.close_app(e.conn),
                }
                if let Some(&t) = self.client_of_conn.get(&e.conn) {
                    self.drop_client(t, false);
                }
            }
            Kind::Frame | Kind::Noop => {}
        }
    }

    fn close_app(&mut self, conn: u64) {
        if let Some(mut a) = self.apps.remove(&conn) {
            let _ = self.poll.registry().deregister(&mut a.stream);
            self.app_tokens.remove(&a.token);
        }
    }

    fn drop_client(&mut self, t: Token, propose_close: bool) {
        if let Some(mut c) = self.clients.remove(&t) {
            let _ = self.poll.registry().deregister(&mut c.stream);
            self.client_of_conn.remove(&c.conn);
            if propose_close && self.role == Role::Leader {
                self.proposals.push(Event {
                    kind: Kind::Close,
                    conn: c.conn,
                    payload: Bytes::new(),
                });
            }
        }
    }

    fn accept_clients(&mut self) -> Result<(), NodeError> {
        loop {
            match self.clients_listener.accept() {
                Ok((mut stream, _)) => {
                    if self.role != Role::Leader {
                        self.follower_client(stream);
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    let token = Token(CLIENT_BASE + self.next_token);
                    self.next_token += 1;
                    let conn = (self.engine.view() << 32) | (self.next_conn & 0xffff_ffff);
                    self.next_conn += 1;
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
                            out: Vec::new(),
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
                Err(e) => {
                    return Err(NodeError::Io {
                        context: "accepting clients".into(),
                        source: e,
                    });
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
        if self.forwards.load(Ordering::Relaxed) >= FORWARDS_MAX {
            self.ui
                .warn("too many forwarded client connections; refusing one");
            return;
        }
        let leader = self.client_addrs[self.engine.leader() as usize];
        // SAFETY: the descriptor comes from a stream we own and give up here.
        let std = unsafe { std::net::TcpStream::from_raw_fd(stream.into_raw_fd()) };
        if std.set_nonblocking(false).is_err() {
            return;
        }
        self.forwards.fetch_add(1, Ordering::Relaxed);
        forward(std, leader, self.forwards.clone());
    }

    fn on_client(&mut self, t: Token, ready: Ready) -> Result<(), NodeError> {
        let Some(c) = self.clients.get_mut(&t) else {
            return Ok(());
        };
        if ready.writable {
            flush(&mut c.stream, &mut c.out);
        }
        if !ready.readable {
            return Ok(());
        }
        let conn = c.conn;
        let events = &mut self.proposals;
        let mut chunks = 0;
        let closed = read_available(&mut c.stream, &mut self.read_buf, ready.closed, |bytes| {
            events.push(Event {
                kind: Kind::Data,
                conn,
                payload: Bytes::copy_from_slice(bytes),
            });
            chunks += 1;
            chunks < 16
        });
        if chunks >= 16 && !closed {
            // Its turn is over; the rest is read next turn (no new event will say so).
            self.unread.push(t);
        }
        if closed {
            events.push(Event {
                kind: Kind::Close,
                conn,
                payload: Bytes::new(),
            });
        }
        if closed {
            if let Some(mut c) = self.clients.remove(&t) {
                let _ = self.poll.registry().deregister(&mut c.stream);
                self.client_of_conn.remove(&c.conn);
            }
        }
        Ok(())
    }

    fn on_app(&mut self, t: Token, ready: Ready) {
        let Some(&conn) = self.app_tokens.get(&t) else {
            return;
        };
        let Some(a) = self.apps.get_mut(&conn) else {
            return;
        };
        if ready.writable {
            flush(&mut a.stream, &mut a.out);
            if a.closing && a.out.is_empty() {
                self.close_app(conn);
                return;
            }
        }
        if !ready.readable {
            return;
        }
        let mut answer = Vec::new();
        let eof = read_available(&mut a.stream, &mut self.read_buf, ready.closed, |bytes| {
            answer.extend_from_slice(bytes);
            true
        });
        // Only the leader's client gets the answer; followers drain and drop theirs.
        let answered = !answer.is_empty() && self.last_written == Some(conn);
        if !answer.is_empty() {
            if let Some(&ct) = self.client_of_conn.get(&conn) {
                if let Some(c) = self.clients.get_mut(&ct) {
                    if c.out.len() + answer.len() > BUFFER_MAX {
                        self.drop_client(ct, true);
                    } else {
                        c.out.extend_from_slice(&answer);
                        flush(&mut c.stream, &mut c.out);
                    }
                }
            }
        }
        if eof {
            self.close_app(conn);
        }
        if answered {
            self.awaiting_answer = None;
            self.pump_apply();
        }
    }
}

/// What the event loop learned about one socket.
#[derive(Clone, Copy)]
struct Ready {
    readable: bool,
    writable: bool,
    /// The other side closed or failed: read to the end.
    closed: bool,
}

/// Reads what the socket has, chunk by chunk, into `take` until it would
/// block or `take` returns false. True at end of stream (or on an error).
///
/// A read shorter than the buffer emptied the socket: the next byte raises
/// a new (edge-triggered) event, so there is no need for a read that only
/// says it would block — unless the other side closed, whose end of stream
/// raises no further event.
fn read_available(
    stream: &mut TcpStream,
    buf: &mut [u8],
    closed: bool,
    mut take: impl FnMut(&[u8]) -> bool,
) -> bool {
    loop {
        match stream.read(buf) {
            Ok(0) => return true,
            Ok(n) => {
                if !take(&buf[..n]) || (n < buf.len() && !closed) {
                    return false;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return true,
        }
    }
}

/// Writes as much of `out` as the socket takes now.
fn flush(stream: &mut TcpStream, out: &mut Vec<u8>) {
    let mut done = 0;
    while done < out.len() {
        match stream.write(&out[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    out.drain(..done);
}

/// Runs one replica until `stop` is set or the program exits.
pub fn run(opts: NodeOptions, ui: &Ui, stop: Arc<AtomicBool>) -> Result<NodeExit, NodeError> {
    let cfg = &opts.config;
    let me = opts.index as NodeId;
    let rc = &cfg.replicas[opts.index];
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
            ..LogOptions::new(cfg.cluster_id, me)
        },
    )?;
    if let Some(t) = &recovery.torn {
        ui.warn(&format!(
            "cut a torn tail from the log: {} at byte offset {} ({} bytes)",
            t.file, t.offset, t.bytes
        ));
    }
    let engine_cfg = Config {
        election_timeout_ns: cfg.election_timeout.as_nanos() as u64,
        heartbeat_ns: cfg.heartbeat.as_nanos() as u64,
        ..Config::new(cfg.cluster_id, me, cfg.replicas.len() as u32)
    };
    let seed = crate::log::now_ns() ^ u64::from(std::process::id());
    let state = load_state(&rc.data_dir).map_err(io_err("reading the view state"))?;
    let entries = log.read(log.first_op(), usize::MAX, usize::MAX)?;
    let engine = match state {
        Some(st) => Replica::restart(engine_cfg, seed, 0, st, log.first_op(), entries, Vec::new()),
        None if log.last_op() == 0 => Replica::new(engine_cfg, seed, 0),
        None => Replica::restart(
            engine_cfg,
            seed,
            0,
            PersistentState::default(),
            log.first_op(),
            entries,
            Vec::new(),
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
    if let Some(cmd) = &opts.reset_cmd {
        // The program starts from its initial state and the log is replayed into it.
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .env("FALCON_NODE", rc.id.to_string())
            .env("FALCON_DATA_DIR", &rc.data_dir)
            .status()
            .map_err(io_err(format!("running --reset-cmd {cmd:?}")))?;
        if !status.success() {
            return Err(NodeError::Io {
                context: format!("--reset-cmd {cmd:?}"),
                source: io::Error::other(format!("it exited with {status}")),
            });
        }
    }
    let replay_target = log.last_op();
    crate::app::catch_forwarded_signals().map_err(io_err("installing the signal handlers"))?;
    let mut app = App::start(
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
    let peers = cfg.replicas.iter().map(|r| r.peer).collect();
    let transport =
        TcpTransport::bind(TcpOptions::new(cfg.cluster_id, me, peers, opts.key.clone()))
            .map_err(io_err("starting the peer transport"))?;
    let poll = Poll::new().map_err(io_err("creating the event loop"))?;
    let mut clients_listener = TcpListener::bind(rc.client)
        .map_err(io_err(format!("listening for clients on {}", rc.client)))?;
    poll.registry()
        .register(&mut clients_listener, CLIENTS, Interest::READABLE)
        .map_err(io_err("registering"))?;
    let tfd = transport.as_raw_fd();
    poll.registry()
        .register(&mut SourceFd(&tfd), PEERS, Interest::READABLE)
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
        next_token: 0,
        next_conn: 1,
        held: Vec::new(),
        proposals: Vec::new(),
        unread: Vec::new(),
        read_buf: vec![0u8; READ_CHUNK],
        start: Instant::now(),
        role: Role::ViewChange,
        ids: cfg.replicas.iter().map(|r| r.id).collect(),
        hooks: (opts.on_leader.clone(), opts.on_follower.clone()),
        hook_children: Vec::new(),
        follower_clients: opts.follower_clients,
        client_addrs: cfg.replicas.iter().map(|r| r.client).collect(),
        forwards: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        applied: 0,
        replay: (replay_target > 0).then(|| {
            (
                replay_target,
                Instant::now(),
                ui.progress(replay_target, 1, "replaying the log"),
            )
        }),
        apply_queue: std::collections::VecDeque::new(),
        last_written: None,
        awaiting_answer: None,
        clients_listener,
    };
    // The starting role counts as a change (prints it, runs the hook).
    if node.engine.role() != Role::ViewChange {
        let (role, view, leader) = (node.engine.role(), node.engine.view(), node.engine.leader());
        node.execute(Command::RoleChanged { role, view, leader })?;
    }
    // The fsync thread: fdatasync on a second handle to the active segment,
    // then wake the loop.
    let waker = Arc::new(
        mio::Waker::new(node.poll.registry(), SYNCED)
            .map_err(io_err("creating the fsync waker"))?,
    );
    let (sync_tx, sync_rx) =
        std::sync::mpsc::sync_channel::<(crate::log::storage::FsFile, u64, u64)>(1);
    let (synced_tx, synced_rx) = std::sync::mpsc::sync_channel::<Result<(u64, u64), io::Error>>(1);
    {
        let waker = waker.clone();
        std::thread::Builder::new()
            .name("falcon-fsync".into())
            .spawn(move || {
                use crate::log::StorageFile;
                for (mut file, op, epoch) in sync_rx {
                    let r = file.sync_data().map(|_| (op, epoch));
                    if synced_tx.send(r).is_err() {
                        return;
                    }
                    let _ = waker.wake();
                }
            })
            .map_err(io_err("starting the fsync thread"))?;
    }
    let cfg_sync = cfg.sync;
    let mut sync_inflight = false;
    let mut last_peer_turn = Instant::now();
    let mut peers_busy = false;
    let mut events = Events::with_capacity(1024);
    let tick = Duration::from_millis(1);
    let mut inbox = Vec::new();
    let mut last_exit_check = Instant::now();
    loop {
        if stop.load(Ordering::Relaxed) {
            node.sync()?;
            app.stop(Duration::from_secs(5));
            return Ok(NodeExit::Stopped);
        }
        for sig in crate::app::take_signals() {
            ui.note(&format!(
                "passing {} on to the program (pid {})",
                sig.as_str(),
                app.pid()
            ));
            app.signal(sig);
        }
        if last_exit_check.elapsed() >= EXIT_CHECK {
            last_exit_check = Instant::now();
            if let Some(status) = app.exited() {
                node.sync()?;
                return Ok(NodeExit::ProgramExited(status));
            }
            node.hook_children
                .retain_mut(|c| matches!(c.try_wait(), Ok(None)));
        }
        let wait = if node.unread.is_empty() {
            tick
        } else {
            Duration::ZERO
        };
        match node.poll.poll(&mut events, Some(wait)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(NodeError::Io {
                    context: "waiting for events".into(),
                    source: e,
                });
            }
        }
        let mut peers_ready = false;
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
                // Handled below.
            } else if t.0 >= APP_BASE {
                node.on_app(t, ready);
            } else if t.0 >= CLIENT_BASE {
                node.on_client(t, ready)?;
            }
        }
        for t in std::mem::take(&mut node.unread) {
            let more = Ready {
                readable: true,
                writable: false,
                closed: false,
            };
            node.on_client(t, more)?;
        }
        node.propose()?;
        // The transport works when its sockets are ready, and every few
        // milliseconds for its own timers (reconnects, handshake deadlines).
        // (The readiness of the transport's own epoll descriptor is reported
        // once per change, so a turn that brought messages earns another.)
        if peers_ready || peers_busy || last_peer_turn.elapsed() >= PEER_TIMERS {
            last_peer_turn = Instant::now();
            inbox.clear();
            node.transport
                .recv(Duration::ZERO, &mut inbox)
                .map_err(io_err("receiving from peers"))?;
            peers_busy = !inbox.is_empty();
        }
        for env in inbox.drain(..) {
            node.step(Input::Receive(env))?;
        }
        for ev in node.transport.events() {
            match ev {
                TransportEvent::Refused { addr, reason } => {
                    ui.warn(&format!("refused a peer connection from {addr}: {reason}"))
                }
                TransportEvent::Lost { peer, reason } => ui.detail(&format!(
                    "lost replica {}: {reason}",
                    node.ids[peer as usize]
                )),
                TransportEvent::Connected { peer, incoming } => ui.detail(&format!(
                    "connected to replica {} ({})",
                    node.ids[peer as usize],
                    if incoming { "in" } else { "out" }
                )),
            }
        }
        node.step(Input::Tick)?;
        node.propose()?;
        node.pump_apply();
        // Group commit on the fsync thread: the loop goes on while the disk works.
        while let Ok(result) = synced_rx.try_recv() {
            sync_inflight = false;
            let before = node.log.durable_op();
            let d = node.log.note_synced(result)?;
            if d > before {
                node.release();
                node.step(Input::Durable { op: d })?;
            }
        }
        // Something appended is not durable yet, and no fsync is under way.
        if node.log.durable_op() < node.log.last_op() && !sync_inflight {
            if cfg_sync == crate::log::SyncPolicy::Never {
                node.sync()?;
                let d = node.log.durable_op();
                node.step(Input::Durable { op: d })?;
            } else {
                let (file, op, epoch) = node.log.sync_handle()?;
                sync_inflight = true;
                if sync_tx.send((file, op, epoch)).is_err() {
                    return Err(NodeError::Io {
                        context: "the fsync thread stopped".into(),
                        source: io::Error::other("fsync thread gone"),
                    });
                }
            }
        }
        // Everything this turn sent to peers goes out in one write per peer.
        node.transport.flush();
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
    /// replayed into it. Environment: FALCON_NODE, FALCON_DATA_DIR.
    #[arg(long, value_name = "CMD")]
    pub reset_cmd: Option<String>,

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

Every replica runs the same command with its own --node. Clients connect to
any replica's client address (a follower forwards them to the leader); the leader
orders their input, every replica feeds it to its own copy of the program
once a majority has it on disk, and the leader sends the answers back.

The cluster file (TOML; relative paths are relative to the file; an error
names the line and the field):

  cluster = \"demo\"            # cluster id; peers of another cluster are refused
  key_file = \"cluster.key\"    # shared secret, at least 32 bytes, read raw
  transport = \"tcp\"           # tcp (shm and rdma: later releases)
  sync = \"batch\"              # always | batch | never
  election_timeout = \"150ms\"
  heartbeat = \"15ms\"          # optional, default election_timeout / 10

  [[replica]]                   # 1, 3, 5, 7 or 9 of them
  id = 1
  peer = \"127.0.0.1:7101\"     # replica-to-replica address
  client = \"127.0.0.1:7201\"   # where clients connect
  app = \"127.0.0.1:7001\"      # where this replica's copy of the program listens
  data_dir = \"data/1\"         # log, view state, program output

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
    use crate::config::{self, ClusterConfig, TransportKind};
    if let Some(path) = &args.new_key {
        config::generate_key(path)?;
        ui.note(&format!(
            "wrote a new 32-byte cluster key to {}; copy it to every replica",
            path.display()
        ));
        return Ok(crate::output::Status::Success);
    }
    if args.program.is_empty() {
        return Err(ReplicateError::Usage("no program to run: give it after --, e.g. falcon replicate -- redis-server --port 7001".into()));
    }
    let path = ClusterConfig::find(args.config.as_deref())?;
    let mut cfg = ClusterConfig::load(&path)?;
    if let Some(t) = args.election_timeout {
        cfg.election_timeout = t;
        cfg.heartbeat = cfg.heartbeat.min(t / 3);
    }
    if cfg.transport != TransportKind::Tcp {
        return Err(ReplicateError::Usage(format!(
            "{}: transport {:?} is not built yet; use transport = \"tcp\"",
            path.display(),
            cfg.transport
        )));
    }
    let index = cfg.choose_node(args.node)?;
    let key_file = cfg.key_file.clone().ok_or_else(|| {
        ReplicateError::Usage(format!(
            "{}: key_file is required (falcon replicate --new-key cluster.key)",
            path.display()
        ))
    })?;
    let key = config::read_key(&key_file)?;
    let opts = NodeOptions {
        config: cfg,
        index,
        key,
        program: args.program.clone(),
        app_timeout: args.app_timeout,
        follower_clients: args.follower_clients,
        on_leader: args.on_leader.clone(),
        on_follower: args.on_follower.clone(),
        reset_cmd: args.reset_cmd.clone(),
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
