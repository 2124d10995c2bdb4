//! The cluster file: one TOML file every replica reads, plus the replica's id.
//!
//! ```toml
//! cluster = "demo"                 # cluster id; peers of another cluster are refused
//! key_file = "cluster.key"         # shared secret: at least 32 bytes, read raw
//! transport = "tcp"                # tcp | shm | rdma
//! # rdma_device = "mlx5_0"         # rdma: the device (default: the first)
//! # rdma_fallback = "tcp"          # rdma: use TCP when the host has no usable device
//! sync = "batch"                   # always | batch | never
//! election_timeout = "150ms"
//! # tls_ca = "tls/ca.pem"          # mutual TLS on peer links: the cluster CA (then every
//! #                                # replica needs tls_cert and tls_key)
//! # divergence_chunk = "16KiB"     # compare the programs' output every this many bytes
//! #                                # of a connection (and at its close); "off": never
//! # divergence_protocol = "bytes"  # bytes | postgres (ignore pids and cancel keys)
//! # program_protocol = "bytes"     # bytes: one program connection per client; resp: Redis's
//! #                                # protocol, every client down one pipelined connection
//!
//! [[replica]]
//! id = 1
//! peer = "127.0.0.1:7101"          # replica-to-replica address
//! client = "127.0.0.1:7201"        # where clients connect
//! app = "127.0.0.1:7001"           # where this replica's copy of the program listens
//! data_dir = "data/1"              # log, admin socket, program output
//! # tls_cert = "tls/replica-1.pem" # its certificate, signed by tls_ca, naming the peer IP
//! # tls_key = "tls/replica-1.key"
//! ```
//!
//! Relative paths are relative to the file. Every error names the file, the
//! line and the field.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::log::SyncPolicy;

/// How client input reaches the program (`program_protocol`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProgramProtocol {
    /// One connection to the program per client; a replica hands the
    /// program one client's input at a time, after the last one's answer.
    #[default]
    Bytes,
    /// Redis's protocol (RESP): every client's commands down one pipelined
    /// connection, in log order (see [`crate::app::resp`]).
    Resp,
}

impl ProgramProtocol {
    /// What the mode adds to the cluster id (nothing for the default, so
    /// existing clusters keep theirs).
    pub fn id_salt(self) -> u64 {
        match self {
            ProgramProtocol::Bytes => 0,
            ProgramProtocol::Resp => RESP_ID_SALT,
        }
    }
}

/// `program_protocol = "resp"`'s part of the cluster id.
pub const RESP_ID_SALT: u64 = 0x7265_7370_2d6d_6f64;

/// Why two cluster ids differ, when it is only `program_protocol`.
pub fn other_mode(ours: u64, theirs: u64) -> Option<&'static str> {
    (ours ^ theirs == RESP_ID_SALT).then_some(
        "the same cluster with the other program_protocol: every replica's file must set the same one, and a log written under one is not replayed under the other",
    )
}

/// [`ClusterConfig::shm_dir`] of the cluster with id `cluster_id`.
pub fn shm_dir_of(cluster_id: u64) -> PathBuf {
    PathBuf::from("/dev/shm").join(format!("falcon-{cluster_id:016x}"))
}

/// Where falcon looks for the cluster file when `--config` is not given.
pub const SEARCH_PATH: [&str; 2] = ["falcon.toml", "/etc/falcon/falcon.toml"];
/// The environment variable that names this replica when `--node` is not given.
pub const NODE_ENV: &str = "FALCON_NODE";
/// The shortest cluster key accepted.
pub const KEY_BYTES_MIN: usize = 32;

/// A problem with the cluster file, or with choosing this replica.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A field is wrong.
    #[error("{path}:{line}: {field}: {message}")]
    Field {
        /// The file.
        path: String,
        /// 1-based line.
        line: usize,
        /// The field (`replica[2].peer`, …).
        field: String,
        /// What is wrong.
        message: String,
    },
    /// Something about the file as a whole, or about finding this replica.
    #[error("{0}")]
    Other(String),
}

/// How replicas talk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// TCP (the default).
    Tcp,
    /// Shared memory between processes on one host.
    Shm,
    /// RDMA (ibverbs).
    Rdma,
}

/// One replica of the cluster file.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ReplicaConfig {
    /// The operator's id for it (any distinct numbers).
    pub id: u32,
    /// Replica-to-replica address.
    pub peer: SocketAddr,
    /// Where clients connect.
    pub client: SocketAddr,
    /// Where this replica's copy of the program listens.
    pub app: SocketAddr,
    /// Log, admin socket, program output (absolute).
    pub data_dir: PathBuf,
    /// Its TLS certificate (PEM), when the cluster uses TLS.
    pub tls_cert: Option<PathBuf>,
    /// Its TLS private key (PEM), when the cluster uses TLS.
    pub tls_key: Option<PathBuf>,
}

/// The whole cluster file, checked.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ClusterConfig {
    /// The file it came from.
    pub path: PathBuf,
    /// The cluster's name.
    pub cluster: String,
    /// The numeric cluster id carried by every message and log segment (from the name).
    pub cluster_id: u64,
    /// The shared key's file (absolute), if any.
    pub key_file: Option<PathBuf>,
    /// How replicas talk.
    pub transport: TransportKind,
    /// `transport = "rdma"`: the device (None: the first one).
    pub rdma_device: Option<String>,
    /// `transport = "rdma"`: fall back to TCP when this host has no usable
    /// RDMA device (off unless the file says `rdma_fallback = "tcp"`).
    pub rdma_fallback: bool,
    /// When the log syncs.
    pub sync: SyncPolicy,
    /// Election timeout.
    #[serde(with = "duration_ms")]
    pub election_timeout: Duration,
    /// Heartbeat interval.
    #[serde(with = "duration_ms")]
    pub heartbeat: Duration,
    /// A log segment is closed at this size (snapshots drop whole segments).
    pub segment_bytes: u64,
    /// Space preallocated ahead of the log's writes, this many bytes at a
    /// time (0: off).
    pub log_preallocate: u64,
    /// Resource limits.
    pub limits: Limits,
    /// The CA of mutual TLS on peer links (None: plain TCP).
    pub tls_ca: Option<PathBuf>,
    /// Divergence detection: bytes of a connection's output per compared
    /// chunk (0: off).
    pub divergence_chunk: u64,
    /// What divergence detection compares: the bytes, or a protocol's canonical form.
    pub divergence_protocol: crate::node::normalize::Protocol,
    /// How client input reaches the program.
    pub program_protocol: ProgramProtocol,
    /// Replicas, in file order; the engine's replica number is the index.
    pub replicas: Vec<ReplicaConfig>,
}

mod duration_ms {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    cluster: Spanned<String>,
    key_file: Option<Spanned<String>>,
    transport: Option<Spanned<String>>,
    rdma_device: Option<Spanned<String>>,
    rdma_fallback: Option<Spanned<String>>,
    sync: Option<Spanned<String>>,
    election_timeout: Option<Spanned<String>>,
    heartbeat: Option<Spanned<String>>,
    segment_size: Option<Spanned<String>>,
    log_preallocate: Option<Spanned<String>>,
    limits: Option<RawLimits>,
    tls_ca: Option<Spanned<String>>,
    divergence_chunk: Option<Spanned<String>>,
    divergence_protocol: Option<Spanned<String>>,
    program_protocol: Option<Spanned<String>>,
    #[serde(default)]
    replica: Vec<RawReplica>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    client_connections: Option<Spanned<u64>>,
    client_buffer: Option<Spanned<String>>,
    program_backlog: Option<Spanned<u64>>,
    pending_entries: Option<Spanned<u64>>,
    batch_entries: Option<Spanned<u64>>,
    batch_bytes: Option<Spanned<String>>,
    peer_queue: Option<Spanned<String>>,
    memory_window: Option<Spanned<String>>,
    program_backlog_bytes: Option<Spanned<String>>,
    pending_bytes: Option<Spanned<String>>,
}

/// What one replica holds at most (`[limits]` in the cluster file). Past a
/// limit a replica pushes back (stops reading a client, so TCP slows it) or
/// refuses (a connection over the limit, a client that never reads its
/// answers); memory stays bounded either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Limits {
    /// Client connections at once; more are closed at once (and logged).
    pub client_connections: usize,
    /// Bytes buffered per client connection each way: input for the program
    /// that it does not read, answers that the client does not read (such a
    /// client is disconnected; the program's output must be drained).
    pub client_buffer: usize,
    /// Committed entries waiting for the program; past it, clients are not
    /// read (and a follower takes no new entries).
    pub program_backlog: usize,
    /// The same in bytes.
    pub program_backlog_bytes: usize,
    /// Entries proposed but not committed; past half of it clients are not
    /// read, past it proposals are refused.
    pub pending_entries: u64,
    /// Bytes of entries proposed but not committed; past half of it
    /// clients are not read.
    pub pending_bytes: usize,
    /// Entries per Prepare message.
    pub batch_entries: usize,
    /// Payload bytes per Prepare message.
    pub batch_bytes: usize,
    /// TCP: bytes queued for one peer that does not read (a stopped or slow
    /// replica); past it, messages for it are dropped and the engine sends
    /// them again. A catch-up message carries at most half of it.
    pub peer_queue: usize,
    /// Bytes of committed entries kept in memory for a follower that falls
    /// a little behind; older ones are read back from the log.
    pub memory_window: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            client_connections: 4096,
            client_buffer: 16 << 20,
            program_backlog: 65_536,
            pending_entries: 65_536,
            program_backlog_bytes: 256 << 20,
            pending_bytes: 256 << 20,
            batch_entries: 1024,
            batch_bytes: 1 << 20,
            peer_queue: 64 << 20,
            memory_window: 256 << 20,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReplica {
    id: Spanned<u32>,
    peer: Spanned<String>,
    client: Spanned<String>,
    app: Spanned<String>,
    data_dir: Spanned<String>,
    tls_cert: Option<Spanned<String>>,
    tls_key: Option<Spanned<String>>,
}

/// Log segment size when the file gives none.
pub const SEGMENT_BYTES_DEFAULT: u64 = 64 << 20;
const SEGMENT_BYTES_MIN: u64 = 64 << 10;
/// The range of `divergence_chunk`.
const DIVERGENCE_CHUNK_MIN: u64 = 1 << 10;
const DIVERGENCE_CHUNK_MAX: u64 = 16 << 20;

/// "64MiB", "512KiB", "1GiB", "65536" (bytes) → bytes.
fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// The `[limits]` table: each field within its range, or an error naming it.
fn parse_limits(
    l: &RawLimits,
    field_err: &dyn Fn(std::ops::Range<usize>, &str, String) -> ConfigError,
) -> Result<Limits, ConfigError> {
    let d = Limits::default();
    let count = |v: &Option<Spanned<u64>>, name: &str, default: u64, min: u64, max: u64| match v {
        None => Ok(default),
        Some(s) if (min..=max).contains(s.get_ref()) => Ok(*s.get_ref()),
        Some(s) => Err(field_err(
            s.span(),
            &format!("limits.{name}"),
            format!("{} is outside {min}..={max}", s.get_ref()),
        )),
    };
    let size = |v: &Option<Spanned<String>>, name: &str, default: u64, min: u64, max: u64| match v {
        None => Ok(default),
        Some(s) => parse_size(s.get_ref())
            .filter(|b| (min..=max).contains(b))
            .ok_or_else(|| {
                field_err(
                    s.span(),
                    &format!("limits.{name}"),
                    format!(
                        "{:?} is not a size from {} to {} bytes (examples: 64KiB, 16MiB)",
                        s.get_ref(),
                        min,
                        max
                    ),
                )
            }),
    };
    let batch_entries = count(
        &l.batch_entries,
        "batch_entries",
        d.batch_entries as u64,
        1,
        crate::consensus::message::MESSAGE_ENTRIES_MAX as u64,
    )?;
    let pending_entries = count(
        &l.pending_entries,
        "pending_entries",
        d.pending_entries,
        batch_entries.max(2),
        1 << 32,
    )?;
    let peer_queue = size(
        &l.peer_queue,
        "peer_queue",
        d.peer_queue as u64,
        8 << 20,
        1 << 32,
    )?;
    // A Prepare must fit in a peer's queue twice over.
    let batch_bytes = size(
        &l.batch_bytes,
        "batch_bytes",
        d.batch_bytes as u64,
        4 << 10,
        (16 << 20).min(peer_queue / 2),
    )?;
    Ok(Limits {
        client_connections: count(
            &l.client_connections,
            "client_connections",
            d.client_connections as u64,
            1,
            1 << 20,
        )? as usize,
        client_buffer: size(
            &l.client_buffer,
            "client_buffer",
            d.client_buffer as u64,
            64 << 10,
            1 << 30,
        )? as usize,
        program_backlog: count(
            &l.program_backlog,
            "program_backlog",
            d.program_backlog as u64,
            2,
            1 << 24,
        )? as usize,
        pending_entries,
        program_backlog_bytes: size(
            &l.program_backlog_bytes,
            "program_backlog_bytes",
            d.program_backlog_bytes as u64,
            1 << 20,
            1 << 40,
        )? as usize,
        pending_bytes: size(
            &l.pending_bytes,
            "pending_bytes",
            d.pending_bytes as u64,
            1 << 20,
            1 << 40,
        )? as usize,
        batch_entries: batch_entries as usize,
        batch_bytes: batch_bytes as usize,
        peer_queue: peer_queue as usize,
        memory_window: size(
            &l.memory_window,
            "memory_window",
            d.memory_window as u64,
            1 << 20,
            1 << 40,
        )? as usize,
    })
}

/// A stable 64-bit id for a cluster name (FNV-1a).
pub fn cluster_id(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

impl ClusterConfig {
    /// Reads and checks the cluster file at `path`.
    pub fn load(path: &Path) -> Result<ClusterConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        ClusterConfig::parse(path, &text)
    }

    /// Checks the text of a cluster file; `path` is used for messages and relative paths.
    pub fn parse(path: &Path, text: &str) -> Result<ClusterConfig, ConfigError> {
        let shown = path.display().to_string();
        let field_err =
            |span: std::ops::Range<usize>, field: &str, message: String| ConfigError::Field {
                path: shown.clone(),
                line: line_of(text, span.start),
                field: field.to_string(),
                message,
            };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start)).unwrap_or(1);
            let message = e.message().to_string();
            let field = message
                .split('`')
                .nth(1)
                .filter(|_| message.contains("field"))
                .unwrap_or("(syntax)")
                .to_string();
            ConfigError::Field {
                path: shown.clone(),
                line,
                field,
                message,
            }
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let resolve = |p: &str| {
            let p = PathBuf::from(p);
            if p.is_absolute() { p } else { base.join(p) }
        };
        let cluster = raw.cluster.get_ref().trim().to_string();
        if cluster.is_empty() {
            return Err(field_err(
                raw.cluster.span(),
                "cluster",
                "must not be empty".into(),
            ));
        }
        let transport = match &raw.transport {
            None => TransportKind::Tcp,
            Some(t) => match t.get_ref().as_str() {
                "tcp" => TransportKind::Tcp,
                "shm" => TransportKind::Shm,
                "rdma" => TransportKind::Rdma,
                other => {
                    return Err(field_err(
                        t.span(),
                        "transport",
                        format!("{other:?} is not tcp, shm or rdma"),
                    ));
                }
            },
        };
        let rdma_fallback = match &raw.rdma_fallback {
            None => false,
            Some(f) => match f.get_ref().as_str() {
                "tcp" => true,
                "none" => false,
                other => {
                    return Err(field_err(
                        f.span(),
                        "rdma_fallback",
                        format!("{other:?} is not \"tcp\" or \"none\""),
                    ));
                }
            },
        };
        let sync = match &raw.sync {
            None => SyncPolicy::Batch,
            Some(s) => s
                .get_ref()
                .parse()
                .map_err(|m| field_err(s.span(), "sync", m))?,
        };
        let duration = |v: &Option<Spanned<String>>,
                        name: &str,
                        default: Duration|
         -> Result<Duration, ConfigError> {
            match v {
                None => Ok(default),
                Some(s) => {
                    let d = humantime::parse_duration(s.get_ref()).map_err(|e| {
                        field_err(
                            s.span(),
                            name,
                            format!("{:?}: {e} (examples: 150ms, 2s)", s.get_ref()),
                        )
                    })?;
                    if d.is_zero() {
                        return Err(field_err(s.span(), name, "must be more than zero".into()));
                    }
                    Ok(d)
                }
            }
        };
        let election_timeout = duration(
            &raw.election_timeout,
            "election_timeout",
            Duration::from_millis(150),
        )?;
        let heartbeat = duration(&raw.heartbeat, "heartbeat", election_timeout / 10)?;
        if heartbeat >= election_timeout {
            let span = raw.heartbeat.as_ref().map(|h| h.span()).unwrap_or(0..0);
            return Err(field_err(
                span,
                "heartbeat",
                "must be shorter than election_timeout".into(),
            ));
        }
        let segment_bytes = match &raw.segment_size {
            None => SEGMENT_BYTES_DEFAULT,
            Some(s) => parse_size(s.get_ref())
                .filter(|&b| b >= SEGMENT_BYTES_MIN)
                .ok_or_else(|| {
                    field_err(
                        s.span(),
                        "segment_size",
                        format!(
                            "{:?} is not a size of at least 64KiB (examples: 64MiB, 1GiB)",
                            s.get_ref()
                        ),
                    )
                })?,
        };
        let log_preallocate = match &raw.log_preallocate {
            None => crate::log::PREALLOCATE_BYTES,
            Some(s) if matches!(s.get_ref().trim(), "off" | "0") => 0,
            Some(s) => parse_size(s.get_ref())
                .filter(|&b| b >= 64 << 10)
                .ok_or_else(|| {
                    field_err(
                        s.span(),
                        "log_preallocate",
                        format!(
                            "{:?} is not a size of at least 64KiB, or \"off\" (examples: 4MiB, 64MiB)",
                            s.get_ref()
                        ),
                    )
                })?,
        };
        let divergence_chunk = match &raw.divergence_chunk {
            None => crate::node::divergence::CHUNK_DEFAULT,
            Some(s) if s.get_ref().trim() == "off" => 0,
            Some(s) => parse_size(s.get_ref())
                .filter(|b| (DIVERGENCE_CHUNK_MIN..=DIVERGENCE_CHUNK_MAX).contains(b))
                .ok_or_else(|| {
                    field_err(
                        s.span(),
                        "divergence_chunk",
                        format!(
                            "{:?} is not \"off\" or a size from 1KiB to 16MiB (examples: 16KiB, 1MiB)",
                            s.get_ref()
                        ),
                    )
                })?,
        };
        let divergence_protocol = match &raw.divergence_protocol {
            None => crate::node::normalize::Protocol::Bytes,
            Some(p) => crate::node::normalize::Protocol::from_name(p.get_ref().trim()).ok_or_else(
                || {
                    field_err(
                        p.span(),
                        "divergence_protocol",
                        format!("{:?} is not bytes or postgres", p.get_ref()),
                    )
                },
            )?,
        };
        let program_protocol = match raw
            .program_protocol
            .as_ref()
            .map(|p| (p, p.get_ref().trim()))
        {
            None | Some((_, "bytes")) => ProgramProtocol::Bytes,
            Some((_, "resp")) => ProgramProtocol::Resp,
            Some((p, _)) => {
                return Err(field_err(
                    p.span(),
                    "program_protocol",
                    format!(
                        "{:?} is not bytes (one connection to the program per client) or resp (Redis's protocol: every client down one pipelined connection)",
                        p.get_ref()
                    ),
                ));
            }
        };
        let limits = match &raw.limits {
            None => Limits::default(),
            Some(l) => parse_limits(l, &field_err)?,
        };
        if !matches!(raw.replica.len(), 1 | 3 | 5 | 7 | 9) {
            return Err(ConfigError::Other(format!(
                "{shown}: {} [[replica]] tables; a cluster has 1, 3, 5, 7 or 9 replicas",
                raw.replica.len()
            )));
        }
        let mut replicas: Vec<ReplicaConfig> = Vec::new();
        // (host, address): replicas on different hosts may reuse an address
        // such as 127.0.0.1:7001 for their program; on one host they may not.
        let mut seen: Vec<(std::net::IpAddr, SocketAddr)> = Vec::new();
        for (i, r) in raw.replica.iter().enumerate() {
            let name = |f: &str| format!("replica[{}].{f}", i + 1);
            let addr = |s: &Spanned<String>, f: &str| -> Result<SocketAddr, ConfigError> {
                s.get_ref().parse().map_err(|_| {
                    field_err(
                        s.span(),
                        &name(f),
                        format!("{:?} is not an address like 127.0.0.1:7101", s.get_ref()),
                    )
                })
            };
            let rc = ReplicaConfig {
                id: *r.id.get_ref(),
                peer: addr(&r.peer, "peer")?,
                client: addr(&r.client, "client")?,
                app: addr(&r.app, "app")?,
                data_dir: resolve(r.data_dir.get_ref()),
                tls_cert: r.tls_cert.as_ref().map(|p| resolve(p.get_ref())),
                tls_key: r.tls_key.as_ref().map(|p| resolve(p.get_ref())),
            };
            match (&raw.tls_ca, &r.tls_cert, &r.tls_key) {
                (Some(_), Some(_), Some(_)) | (None, None, None) => {}
                (Some(_), c, _) => {
                    let (f, span) = if c.is_none() {
                        ("tls_cert", r.id.span())
                    } else {
                        ("tls_key", r.id.span())
                    };
                    return Err(field_err(
                        span,
                        &name(f),
                        "missing: with tls_ca set, every replica needs tls_cert and tls_key".into(),
                    ));
                }
                (None, c, k) => {
                    let (f, span) = match (c, k) {
                        (Some(c), _) => ("tls_cert", c.span()),
                        (_, Some(k)) => ("tls_key", k.span()),
                        _ => unreachable!("one is set"),
                    };
                    return Err(field_err(
                        span,
                        &name(f),
                        "needs tls_ca (the cluster CA) at the top of the file".into(),
                    ));
                }
            }
            if replicas.iter().any(|o| o.id == rc.id) {
                return Err(field_err(
                    r.id.span(),
                    &name("id"),
                    format!("id {} is used twice", rc.id),
                ));
            }
            for (a, f, span) in [
                (rc.peer, "peer", r.peer.span()),
                (rc.client, "client", r.client.span()),
                (rc.app, "app", r.app.span()),
            ] {
                let host = host_of(rc.peer);
                if seen.iter().any(|&(h, x)| h == host && x == a) {
                    return Err(field_err(
                        span,
                        &name(f),
                        format!("{a} is used twice on one host"),
                    ));
                }
                seen.push((host, a));
            }
            if replicas.iter().any(|o| o.data_dir == rc.data_dir) {
                return Err(field_err(
                    r.data_dir.span(),
                    &name("data_dir"),
                    "two replicas share a data directory".into(),
                ));
            }
            replicas.push(rc);
        }
        if let Some(ca) = &raw.tls_ca {
            if transport != TransportKind::Tcp {
                return Err(field_err(
                    ca.span(),
                    "tls_ca",
                    "TLS is for transport = \"tcp\" (shm stays on one host; rdma links are not TLS)"
                        .into(),
                ));
            }
        }
        Ok(ClusterConfig {
            path: path.to_path_buf(),
            // The mode is part of the cluster's identity: replicas that
            // differ refuse each other, and a log written under one is
            // not replayed under the other.
            cluster_id: cluster_id(&cluster) ^ program_protocol.id_salt(),
            cluster,
            key_file: raw.key_file.as_ref().map(|k| resolve(k.get_ref())),
            transport,
            rdma_device: raw.rdma_device.as_ref().map(|d| d.get_ref().clone()),
            rdma_fallback,
            sync,
            election_timeout,
            heartbeat,
            segment_bytes,
            log_preallocate,
            limits,
            tls_ca: raw.tls_ca.as_ref().map(|p| resolve(p.get_ref())),
            divergence_chunk,
            divergence_protocol,
            program_protocol,
            replicas,
        })
    }

    /// Replica `index`'s TLS files, when the cluster uses TLS.
    pub fn tls_files(&self, index: usize) -> Option<crate::transport::tls::TlsFiles> {
        let r = self.replicas.get(index)?;
        Some(crate::transport::tls::TlsFiles {
            cert: r.tls_cert.clone()?,
            key: r.tls_key.clone()?,
            ca: self.tls_ca.clone()?,
        })
    }

    /// Where `transport = "shm"` keeps its rings: a directory per cluster
    /// on tmpfs (`/dev/shm/falcon-<cluster id>`).
    pub fn shm_dir(&self) -> PathBuf {
        shm_dir_of(self.cluster_id)
    }

    /// Finds the cluster file: `explicit`, else `falcon.toml` here, else `/etc/falcon/falcon.toml`.
    pub fn find(explicit: Option<&Path>) -> Result<PathBuf, ConfigError> {
        if let Some(p) = explicit {
            return Ok(p.to_path_buf());
        }
        SEARCH_PATH
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .ok_or_else(|| ConfigError::Other("no cluster file: give --config FILE, or put falcon.toml here or in /etc/falcon/".into()))
    }

    /// The engine's number for the replica with operator id `id`.
    pub fn index_of(&self, id: u32) -> Option<usize> {
        self.replicas.iter().position(|r| r.id == id)
    }

    /// Chooses this replica: `explicit`, else `FALCON_NODE`, else the one
    /// replica whose peer address is an address of this host. Returns its index.
    pub fn choose_node(&self, explicit: Option<u32>) -> Result<usize, ConfigError> {
        let ids = || {
            self.replicas
                .iter()
                .map(|r| r.id.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let wanted = match explicit {
            Some(id) => Some((id, "--node")),
            None => match std::env::var(NODE_ENV) {
                Ok(v) => Some((
                    v.trim().parse().map_err(|_| {
                        ConfigError::Other(format!("{NODE_ENV}={v:?} is not a replica id"))
                    })?,
                    NODE_ENV,
                )),
                Err(_) => None,
            },
        };
        if let Some((id, from)) = wanted {
            return self.index_of(id).ok_or_else(|| {
                ConfigError::Other(format!(
                    "{from} {id}: no such replica in {} (ids: {})",
                    self.path.display(),
                    ids()
                ))
            });
        }
        let local: Vec<usize> = (0..self.replicas.len())
            .filter(|&i| is_local(self.replicas[i].peer))
            .collect();
        match local.as_slice() {
            [one] => Ok(*one),
            [] => Err(ConfigError::Other(format!(
                "none of the replicas' peer addresses is an address of this host: give --node ID (ids: {})",
                ids()
            ))),
            _ => Err(ConfigError::Other(format!(
                "several replicas' peer addresses are addresses of this host: give --node ID (ids: {})",
                ids()
            ))),
        }
    }
}

/// The host a replica runs on, as far as the file tells: its peer IP, with
/// every loopback address counted as one host.
fn host_of(peer: SocketAddr) -> std::net::IpAddr {
    if peer.ip().is_loopback() {
        std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
    } else {
        peer.ip()
    }
}

/// Whether `addr`'s IP belongs to this host (binding to it succeeds).
fn is_local(addr: SocketAddr) -> bool {
    std::net::UdpSocket::bind(SocketAddr::new(addr.ip(), 0)).is_ok()
}

/// A cluster file for replicas on 127.0.0.1 (benchmarks, drills, tests):
/// `header` (TOML lines ending in a newline), then one `[[replica]]` per three
/// ports — peer, client, app — with ids from 1 and data in `data/ID`.
pub fn loopback_cluster(header: &str, ports: &[u16]) -> String {
    let mut toml = header.to_string();
    for (i, p) in ports.chunks_exact(3).enumerate() {
        toml.push_str(&format!(
            "\n[[replica]]\nid = {id}\npeer = \"127.0.0.1:{}\"\nclient = \"127.0.0.1:{}\"\napp = \"127.0.0.1:{}\"\ndata_dir = \"data/{id}\"\n",
            p[0],
            p[1],
            p[2],
            id = i + 1
        ));
    }
    toml
}

/// Reads a cluster key file: at least [`KEY_BYTES_MIN`] bytes, used raw.
pub fn read_key(path: &Path) -> Result<Vec<u8>, ConfigError> {
    let key = std::fs::read(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    if key.len() < KEY_BYTES_MIN {
        return Err(ConfigError::Other(format!(
            "{}: the cluster key has {} bytes; it needs at least {KEY_BYTES_MIN} (head -c 32 /dev/urandom > {})",
            path.display(),
            key.len(),
            path.display()
        )));
    }
    Ok(key)
}

/// A warning when the key file can be read by others than its owner (the
/// key is the cluster's one secret: `chmod 600` it).
pub fn key_exposure(path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then(|| {
        format!(
            "{}: the cluster key can be read by others (mode {mode:o}); anyone who reads it can join the cluster: chmod 600 {}",
            path.display(),
            path.display()
        )
    })
}

/// Writes a new random key of 32 bytes to `path` (mode 0600); refuses to overwrite.
pub fn generate_key(path: &Path) -> Result<(), ConfigError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut key = [0u8; 32];
    let mut rnd = std::fs::File::open("/dev/urandom").map_err(|source| ConfigError::Read {
        path: "/dev/urandom".into(),
        source,
    })?;
    std::io::Read::read_exact(&mut rnd, &mut key).map_err(|source| ConfigError::Read {
        path: "/dev/urandom".into(),
        source,
    })?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
    f.write_all(&key).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })
}
