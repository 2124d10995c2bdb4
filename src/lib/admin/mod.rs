//! The admin socket: every replica listens on `admin.sock` in its data
//! directory (mode 0600; a connecting process must run as the same user or
//! as root, checked with SO_PEERCRED) and answers JSON lines. One request per
//! line, one answer per line:
//!
//! ```text
//! {"cmd":"status"}            -> {"ok":true,"status":{…NodeStatus…}}
//! {"cmd":"transfer","to":2}   -> {"ok":true} once the transfer has begun
//! {"cmd":"metrics"}           -> {"ok":true,"text":"…Prometheus text…"}
//! {"cmd":"resync"}            -> {"ok":true,…} once the rebuild has begun (from the log)
//! {"cmd":"resync","leader_snapshot":OP} -> … (from the leader's snapshot covering OP)
//! {"cmd":"snapshot"}          -> {"ok":true,"op":OP}: a snapshot covering OP is on its way
//! anything else               -> {"ok":false,"error":"…"}
//! ```
//!
//! A thread accepts and reads; the request goes to the replica's event loop
//! over a channel (the loop is woken), which answers with what it knows.
//! `--metrics ADDR` serves the same metrics over HTTP for Prometheus.

pub mod metrics;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::output::Ui;

/// The socket's file name in the data directory.
pub const SOCKET_NAME: &str = "admin.sock";
/// The longest request line accepted.
const LINE_MAX: usize = 64 << 10;
/// Connections served at once, at most; more are told to retry.
const CONNECTIONS_MAX: usize = 32;
/// How long a connection may stay silent before it is closed.
const IDLE: Duration = Duration::from_secs(30);
/// How long the thread waits for the event loop to answer.
const LOOP_WAIT: Duration = Duration::from_secs(5);
/// A request that changes something (a transfer, a resync, a snapshot) and
/// waited this long for the event loop is not carried out: its asker gives
/// up at [`LOOP_WAIT`] and would not hear that it was.
pub const ACT_WITHIN: Duration = Duration::from_secs(4);
/// How long a client should wait for the answer to a request that changes
/// something: past the socket's own wait for the loop.
pub const ANSWER_WAIT: Duration = Duration::from_secs(6);

/// What a client may ask (fields a request does not use are ignored).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// The replica's state.
    Status,
    /// Hand leadership to replica `to` (operator id); only the leader accepts.
    Transfer {
        /// The replica to lead next.
        to: u32,
    },
    /// The metrics in Prometheus text format.
    Metrics,
    /// Rebuild this replica's copy of the program; only a follower accepts.
    Resync {
        /// From the leader's snapshot covering this op (fetched), then the
        /// log; None: from the initial state and the whole log.
        #[serde(default)]
        leader_snapshot: Option<u64>,
    },
    /// Take a snapshot of the program now (needs --snapshot-cmd).
    Snapshot,
}

/// A replica's program wrote other bytes than the leader's.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Diverged {
    /// Where, first.
    pub mismatch: crate::node::divergence::Mismatch,
    /// The op this replica had applied when it found out.
    pub op: u64,
    /// The leader then (operator id).
    pub leader: u32,
    /// When (ns since the Unix epoch).
    pub at_ns: u64,
}

/// A resync under way.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ResyncProgress {
    /// Entries replayed into the program so far.
    pub done: u64,
    /// Entries to replay (it grows while the cluster commits).
    pub total: u64,
    /// When it began (ns since the Unix epoch).
    pub started_ns: u64,
}

/// How a resync ended.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ResyncReport {
    /// When it began (ns since the Unix epoch): tells one resync from another.
    pub started_ns: u64,
    /// What the program was rebuilt from: "initial state" or "leader's
    /// snapshot" (or "failed: …").
    pub source: String,
    /// The op the program was rebuilt from (0: its initial state).
    pub from_op: u64,
    /// The last op replayed.
    pub to_op: u64,
    /// Seconds it took.
    pub seconds: f64,
    /// The leader's output chunks compared with the rebuilt copy's on the way.
    pub compared: u64,
    /// Of them, how many differed.
    pub mismatches: u64,
    /// The first that differed.
    pub first_mismatch: Option<crate::node::divergence::Mismatch>,
}

/// The program a replica supervises.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProgramStatus {
    /// Its name (argv\[0\]).
    pub name: String,
    /// Its pid.
    pub pid: u32,
    /// "running", or how it ended.
    pub state: String,
}

/// Where a replica stands, as its admin socket reports it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The replica's id (as in the cluster file).
    pub id: u32,
    /// The cluster's name.
    pub cluster: String,
    /// leader, follower or view-change.
    pub role: String,
    /// The current view.
    pub view: u64,
    /// The id of this view's leader.
    pub leader: u32,
    /// The last op in this replica's log.
    pub last_op: u64,
    /// The last op known committed.
    pub commit: u64,
    /// The last op applied to the program.
    pub applied: u64,
    /// Committed entries waiting for the program.
    #[serde(default)]
    pub apply_queue: usize,
    /// Their bytes (payload and 48 bytes each).
    #[serde(default)]
    pub apply_queue_bytes: u64,
    /// Log entries held in memory: uncommitted ones, and the window of
    /// committed ones kept for followers (`limits.memory_window`).
    #[serde(default)]
    pub memory_entries: u64,
    /// Their bytes (payload and 48 bytes each).
    #[serde(default)]
    pub memory_bytes: u64,
    /// The connection whose answer the applier waits for, and since when (ms).
    #[serde(default)]
    pub awaiting_answer: Option<(u64, f64)>,
    /// Ids of the replicas this one has a live link to.
    pub peers_connected: Vec<u32>,
    /// On the leader: for each follower, the last op it acknowledged.
    pub followers_acked: Vec<(u32, u64)>,
    /// falcon's own pid.
    pub pid: u32,
    /// The program (none with --qemu-socket or --null-program).
    pub program: Option<ProgramStatus>,
    /// Bytes of log segments on disk.
    pub log_bytes: u64,
    /// Seconds since the replica started.
    pub uptime_s: f64,
    /// Client connections open on this replica.
    pub clients: usize,
    /// Client connections this follower passes on to the leader.
    #[serde(default)]
    pub forwarded: usize,
    /// The data directory.
    pub data_dir: PathBuf,
    /// How this replica was started (argv and working directory), so that a
    /// drill can start it again.
    pub argv: Vec<String>,
    /// The working directory it was started in.
    pub cwd: PathBuf,
    /// When the current role began (ns since the Unix epoch).
    pub role_since_ns: u64,
    /// When this replica last left normal operation for a view change.
    pub view_change_at_ns: Option<u64>,
    /// While or since leading the current view: when its first entry was
    /// committed, and when its latest was.
    pub leader_first_commit_ns: Option<u64>,
    /// See `leader_first_commit_ns`; kept after leadership ends.
    pub leader_last_commit_ns: Option<u64>,
    /// When a planned transfer away from this replica began.
    pub transfer_started_ns: Option<u64>,
    /// Seconds since its log stopped growing for want of disk space (it
    /// takes no client input and acknowledges nothing new meanwhile).
    #[serde(default)]
    pub disk_full_s: Option<f64>,
    /// Divergence detection: chunk size (0: off) and what was compared.
    #[serde(default)]
    pub divergence_chunk: u64,
    /// See `divergence_chunk`.
    #[serde(default)]
    pub output_chunks: crate::node::divergence::Counts,
    /// This replica's program diverged from the leader's (until a resync matches).
    #[serde(default)]
    pub diverged: Option<Diverged>,
    /// A resync under way.
    #[serde(default)]
    pub resync: Option<ResyncProgress>,
    /// How the last resync ended.
    #[serde(default)]
    pub last_resync: Option<ResyncReport>,
    /// The op its latest snapshot covers (0: none).
    #[serde(default)]
    pub snapshot_op: u64,
    /// It takes snapshots (--snapshot-cmd) and can install one (--restore-cmd).
    #[serde(default)]
    pub snapshots: bool,
    /// See `snapshots`.
    #[serde(default)]
    pub restores: bool,
}

/// A request on its way to the event loop, with where the answer goes.
pub struct Call {
    /// The request.
    pub request: Request,
    /// The answer (a JSON object with "ok").
    pub reply: SyncSender<serde_json::Value>,
    /// When it was asked.
    pub asked: std::time::Instant,
}

impl Call {
    /// A request that changes something and waited [`ACT_WITHIN`] or more:
    /// not to be carried out (its asker is told the replica did not answer).
    pub fn expired(&self) -> bool {
        !matches!(self.request, Request::Status | Request::Metrics)
            && self.asked.elapsed() >= ACT_WITHIN
    }
}

/// Why a request to a replica got no answer.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Nobody listens (the replica is down), or the socket is not there.
    #[error("{path}: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// No answer in time.
    #[error("{path}: no answer within {secs} s (the replica may be busy: restarting its program, installing a snapshot)", secs = .waited.as_secs_f64())]
    Timeout {
        /// The socket.
        path: PathBuf,
        /// How long the client waited.
        waited: Duration,
    },
    /// The connection broke.
    #[error("{path}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The replica answered with an error.
    #[error("{0}")]
    Refused(String),
    /// The answer was not what a falcon replica says.
    #[error("{path}: not a falcon answer: {why}")]
    Garbled {
        /// The socket.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
}

/// The admin socket of the replica whose data directory is `data_dir`.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET_NAME)
}

/// Sends one request and reads its answer (an error unless "ok" is true).
pub fn call(
    path: &Path,
    request: &Request,
    timeout: Duration,
) -> Result<serde_json::Value, AdminError> {
    let stream = UnixStream::connect(path).map_err(|source| AdminError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    let io = |source: std::io::Error| {
        if matches!(
            source.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) {
            AdminError::Timeout {
                path: path.to_path_buf(),
                waited: timeout,
            }
        } else {
            AdminError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    };
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_vec(request).expect("a request serializes");
    line.push(b'\n');
    (&stream).write_all(&line).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .take(LINE_MAX as u64 * 64)
        .read_line(&mut answer)
        .map_err(io)?;
    let v: serde_json::Value =
        serde_json::from_str(answer.trim_end()).map_err(|e| AdminError::Garbled {
            path: path.to_path_buf(),
            why: if answer.is_empty() {
                "it closed the connection".into()
            } else {
                e.to_string()
            },
        })?;
    match v.get("ok").and_then(|o| o.as_bool()) {
        Some(true) => Ok(v),
        Some(false) => Err(AdminError::Refused(
            v.get("error")
                .and_then(|e| e.as_str())
                .unwrap_or("refused")
                .to_string(),
        )),
        None => Err(AdminError::Garbled {
            path: path.to_path_buf(),
            why: "no \"ok\" field".into(),
        }),
    }
}

/// Asks the replica at `data_dir` for its status.
pub fn status(data_dir: &Path, timeout: Duration) -> Result<NodeStatus, AdminError> {
    let path = socket_path(data_dir);
    let v = call(&path, &Request::Status, timeout)?;
    serde_json::from_value(v.get("status").cloned().unwrap_or_default()).map_err(|e| {
        AdminError::Garbled {
            path,
            why: e.to_string(),
        }
    })
}

/// An error answer.
pub fn refusal(why: impl std::fmt::Display) -> serde_json::Value {
    serde_json::json!({"ok": false, "error": why.to_string()})
}

/// The admin socket of one replica: a thread that accepts connections and
/// passes their requests to the event loop.
pub struct AdminServer {
    path: PathBuf,
    calls: SyncSender<Call>,
}

impl AdminServer {
    /// Listens on `path` (mode 0600) and starts the accepting thread.
    /// Requests arrive on the returned channel; `wake` wakes the event loop
    /// after each one. A socket file left by a replica that died is
    /// replaced; one that a live process answers on is an error.
    pub fn start(
        path: &Path,
        ui: &Ui,
        wake: impl Fn() + Send + Sync + 'static,
    ) -> std::io::Result<(AdminServer, Receiver<Call>)> {
        use std::os::unix::fs::PermissionsExt;
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!(
                        "{} answers: another falcon replica runs on this data directory",
                        path.display()
                    ),
                ));
            }
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path).map_err(|e| {
            std::io::Error::new(e.kind(), format!("listening on {}: {e}", path.display()))
        })?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let (tx, rx) = sync_channel::<Call>(64);
        let calls = tx.clone();
        let wake: Arc<dyn Fn() + Send + Sync> = Arc::new(wake);
        let live = Arc::new(AtomicUsize::new(0));
        let ui = ui.clone();
        std::thread::Builder::new()
            .name("falcon-admin".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else {
                        // Out of descriptors, say: do not spin on it.
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    };
                    if live.load(Ordering::Relaxed) >= CONNECTIONS_MAX {
                        let _ = (&stream).write_all(
                            format!("{}\n", refusal("too many admin connections; retry"))
                                .as_bytes(),
                        );
                        continue;
                    }
                    live.fetch_add(1, Ordering::Relaxed);
                    let (tx, wake, ui) = (tx.clone(), wake.clone(), ui.clone());
                    let conn_live = live.clone();
                    let spawned = std::thread::Builder::new()
                        .name("falcon-admin-conn".into())
                        .spawn(move || {
                            if peer_allowed(&stream, &ui) {
                                serve(stream, &tx, &*wake);
                            }
                            conn_live.fetch_sub(1, Ordering::Relaxed);
                        });
                    if spawned.is_err() {
                        // The closure (and its counter decrement) never ran.
                        live.fetch_sub(1, Ordering::Relaxed);
                    }
                }
            })?;
        Ok((
            AdminServer {
                path: path.to_path_buf(),
                calls,
            },
            rx,
        ))
    }

    /// Where other front doors (the metrics endpoint) send their requests.
    pub fn sender(&self) -> SyncSender<Call> {
        self.calls.clone()
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Only the user falcon runs as, or root, may use the socket.
fn peer_allowed(stream: &UnixStream, ui: &Ui) -> bool {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    match getsockopt(stream, PeerCredentials) {
        Ok(c) if c.uid() == me || c.uid() == 0 => true,
        Ok(c) => {
            ui.warn(&format!(
                "refused an admin connection from uid {} (pid {}): only falcon's user (uid {me}) or root may use the admin socket",
                c.uid(),
                c.pid()
            ));
            let _ = (&*stream).write_all(
                format!("{}\n", refusal("permission denied: not the replica's user")).as_bytes(),
            );
            // Closing with the request unread would reset the connection
            // and lose the answer: read to the client's end (briefly) first.
            let _ = stream.shutdown(std::net::Shutdown::Write);
            let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
            let _ = std::io::copy(&mut stream.take(LINE_MAX as u64), &mut std::io::sink());
            false
        }
        Err(e) => {
            ui.warn(&format!("an admin connection without credentials: {e}"));
            false
        }
    }
}

/// Answers the requests of one connection until it closes.
fn serve(stream: UnixStream, tx: &SyncSender<Call>, wake: &(dyn Fn() + Send + Sync)) {
    let _ = stream.set_read_timeout(Some(IDLE));
    let _ = stream.set_write_timeout(Some(IDLE));
    let mut reader = BufReader::new(&stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut reader)
            .take(LINE_MAX as u64 + 1)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let answer = if line.len() > LINE_MAX {
            // The rest of an over-long line is not a request either.
            let a = refusal(format!("request longer than {LINE_MAX} bytes"));
            let _ = (&stream).write_all(format!("{a}\n").as_bytes());
            return;
        } else {
            match serde_json::from_slice::<Request>(&line) {
                Err(e) => refusal(format!(
                    "not a request ({e}); send one JSON object per line, e.g. {{\"cmd\":\"status\"}}"
                )),
                Ok(request) => {
                    let (reply, answer) = sync_channel(1);
                    let asked = std::time::Instant::now();
                    if tx
                        .send(Call {
                            request,
                            reply,
                            asked,
                        })
                        .is_err()
                    {
                        return;
                    }
                    wake();
                    answer
                        .recv_timeout(LOOP_WAIT)
                        .unwrap_or_else(|_| refusal("the replica did not answer in time"))
                }
            }
        };
        if (&stream)
            .write_all(format!("{answer}\n").as_bytes())
            .is_err()
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_unknown_ones_do_not() {
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"status"}"#).unwrap(),
            Request::Status
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"transfer","to":3}"#).unwrap(),
            Request::Transfer { to: 3 }
        );
        for bad in [
            r#"{"cmd":"reboot"}"#,
            r#"{"cmd":"transfer"}"#,
            "garbage",
            "",
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_socket_answers_its_owner_and_refuses_garbage_without_dying() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(dir.path());
        let (server, rx) = AdminServer::start(&path, &Ui::plain(), || {}).unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        // A stand-in for the event loop: answers status with a marker.
        std::thread::spawn(move || {
            for c in rx {
                let _ = c
                    .reply
                    .send(serde_json::json!({"ok": true, "seen": format!("{:?}", c.request)}));
            }
        });
        let v = call(&path, &Request::Status, Duration::from_secs(5)).unwrap();
        assert_eq!(v["seen"], "Status");
        // Garbage and an over-long line get an error answer, and the socket
        // keeps serving.
        let s = UnixStream::connect(&path).unwrap();
        (&s).write_all(b"not json\n").unwrap();
        let mut l = String::new();
        BufReader::new(&s).read_line(&mut l).unwrap();
        assert!(
            l.contains("\"ok\":false") && l.contains("not a request"),
            "{l}"
        );
        let s = UnixStream::connect(&path).unwrap();
        (&s).write_all(&vec![b'x'; LINE_MAX + 10]).unwrap();
        let mut l = String::new();
        BufReader::new(&s).read_line(&mut l).unwrap();
        assert!(l.contains("longer than"), "{l}");
        let v = call(&path, &Request::Transfer { to: 2 }, Duration::from_secs(5)).unwrap();
        assert_eq!(v["seen"], "Transfer { to: 2 }");
        // A second server on the same path is refused while the first lives.
        let e = AdminServer::start(&path, &Ui::plain(), || {})
            .err()
            .expect("a second server on a live socket");
        assert!(e.to_string().contains("another falcon replica"), "{e}");
        drop(server);
        assert!(!path.exists());
    }

    #[test]
    fn a_loop_that_does_not_answer_is_a_timeout_and_a_late_change_is_not_carried_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(dir.path());
        let (_server, rx) = AdminServer::start(&path, &Ui::plain(), || {}).unwrap();
        let e = call(&path, &Request::Status, Duration::from_millis(300)).unwrap_err();
        assert!(matches!(e, AdminError::Timeout { .. }), "{e:?}");
        assert!(e.to_string().contains("no answer within 0.3 s"), "{e}");
        let waiting = rx.recv().unwrap();
        assert!(!waiting.expired());
        let (reply, _answer) = std::sync::mpsc::sync_channel(1);
        let past = |request| Call {
            request,
            reply: reply.clone(),
            asked: std::time::Instant::now() - ACT_WITHIN,
        };
        assert!(past(Request::Transfer { to: 2 }).expired());
        assert!(past(Request::Snapshot).expired());
        assert!(!past(Request::Status).expired());
        assert!(!past(Request::Metrics).expired());
    }
}
