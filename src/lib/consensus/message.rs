//! Engine messages and their versioned binary encoding.
//!
//! Every frame starts with a fixed header: magic `0xFA1C`, format version,
//! message type, cluster id, sender and receiver. All integers are
//! little-endian and fixed-width. The decoder checks every length against
//! the bytes it has and against [`MESSAGE_BYTES_MAX`], and returns a
//! [`DecodeError`] for anything malformed — it never panics.

use bytes::Bytes;

use crate::log::{Entry, Kind};

/// Identifies a replica: 0 .. n-1.
pub type NodeId = u32;

/// Frame magic.
pub const MAGIC: u16 = 0xFA1C;
/// Encoding version written and accepted.
pub const WIRE_VERSION: u8 = 3;
/// The largest encoded message accepted (64 MiB).
pub const MESSAGE_BYTES_MAX: usize = 64 << 20;
/// The most entries one message may carry.
pub const MESSAGE_ENTRIES_MAX: usize = 1 << 16;
/// Bytes of the fixed frame header.
pub const HEADER_LEN: usize = 2 + 1 + 1 + 8 + 4 + 4;

/// An engine message with its routing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// The cluster; a message of another cluster is refused.
    pub cluster: u64,
    /// Sender.
    pub from: NodeId,
    /// Receiver.
    pub to: NodeId,
    /// The message.
    pub msg: Message,
}

/// The protocol (Viewstamped Replication form of Multi-Paxos).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Leader → follower: entries `op_start ..` and the commit point, for a
    /// follower already in step with this view.
    Prepare {
        /// The leader's view.
        view: u64,
        /// Op of the first entry (entries are consecutive).
        op_start: u64,
        /// The entries (may be empty: then it is a probe).
        entries: Vec<Entry>,
        /// The leader's commit point.
        commit: u64,
    },
    /// Leader → follower: the leader's whole log from `op_start` to its last
    /// op. Starts the view at a follower (VR's StartView), and answers
    /// `Missing`. A follower installs it only whole, so a replica's log view
    /// never claims a log it holds only in part. A log too large for one
    /// message comes in parts (entries end before `last_op`): the follower
    /// asks for each next one with `Missing` and installs them together.
    StartView {
        /// The leader's view.
        view: u64,
        /// Op of the first entry.
        op_start: u64,
        /// Entries `op_start ..=` the leader's last op, or a part of them.
        entries: Vec<Entry>,
        /// The leader's commit point.
        commit: u64,
        /// The leader's last op.
        last_op: u64,
    },
    /// Leader → a follower far behind: committed entries `op_start ..`, in
    /// chunks, before the (then small) StartView. Committed entries may be
    /// taken in any view state: every later log holds them.
    CatchUp {
        /// The leader's view.
        view: u64,
        /// Op of the first entry.
        op_start: u64,
        /// Committed entries.
        entries: Vec<Entry>,
        /// The leader's commit point (every entry is at or below it).
        commit: u64,
    },
    /// Follower → leader: every entry up to `op` is durable here, in `view`.
    PrepareOk {
        /// View.
        view: u64,
        /// Highest op held, durably, consistent with the leader's log.
        op: u64,
    },
    /// Leader → follower: the commit point, on idle heartbeats.
    Commit {
        /// View.
        view: u64,
        /// Commit point.
        commit: u64,
    },
    /// Follower → leader: my log ends before your entries start; send from `from`.
    Missing {
        /// The view the follower is (or wants to be) in.
        view: u64,
        /// First op needed.
        from: u64,
    },
    /// A replica asks everyone to move to `view`.
    StartViewChange {
        /// The new view.
        view: u64,
    },
    /// A replica → the new leader: its log, for the merge.
    DoViewChange {
        /// The new view.
        view: u64,
        /// The last view in which the sender's log was in step with a leader.
        log_view: u64,
        /// Last op of the sender's log.
        last_op: u64,
        /// The sender's commit point.
        commit: u64,
        /// Op of the first entry sent.
        op_start: u64,
        /// Entries `op_start ..= last_op`.
        entries: Vec<Entry>,
    },
    /// The new leader → a replica: resend your DoViewChange with entries from `from`.
    RequestDoViewChange {
        /// The new view.
        view: u64,
        /// First op wanted.
        from: u64,
    },
    /// Reply to a message of an older view: the sender is behind.
    NewerView {
        /// The replier's view.
        view: u64,
    },
    /// Before it starts a view change on its own, a replica asks whether the
    /// others would join one (a pre-vote): a replica that hears from a live
    /// leader says no, so one that was cut off or just restarted cannot
    /// disturb a working cluster.
    ViewProbe {
        /// The view the sender would start.
        view: u64,
    },
    /// Yes to a [`Message::ViewProbe`]: the replier hears from no leader either.
    ViewProbeOk {
        /// The view probed.
        view: u64,
    },
    /// A replica that started without any state (a new cluster, or a data
    /// directory emptied) asks where the cluster is before it takes part:
    /// it may have voted or acknowledged entries it no longer remembers.
    Recover {
        /// The sender's view (0: it has none).
        view: u64,
        /// Ties answers to this round of asking.
        nonce: u64,
    },
    /// The answer to [`Message::Recover`].
    RecoverOk {
        /// The replier's view.
        view: u64,
        /// The round answered.
        nonce: u64,
        /// The replier's last op.
        last_op: u64,
        /// [`RECOVER_FRESH`]: the replier has no state either;
        /// [`RECOVER_LEADING`]: it leads `view` now.
        flags: u64,
    },
    /// Leader → follower: the entries you need are compacted away here; fetch a
    /// snapshot covering everything up to `op`.
    NeedSnapshot {
        /// View.
        view: u64,
        /// The snapshot must cover at least up to this op.
        op: u64,
    },
    /// A replica that needs a snapshot → the replica that has one: send the
    /// bytes of your snapshot from `offset` on. Handled by the node, not the
    /// engine.
    SnapshotRequest {
        /// The requester's view.
        view: u64,
        /// The op the snapshot must cover at least.
        op: u64,
        /// First byte wanted.
        offset: u64,
    },
    /// The answer: bytes `offset ..` of the snapshot covering up to `op`,
    /// whose file is `total` bytes long. Handled by the node.
    SnapshotChunk {
        /// The sender's view.
        view: u64,
        /// The last op the snapshot covers (0: the sender has none that covers the request).
        op: u64,
        /// Where `data` starts in the file.
        offset: u64,
        /// The file's length.
        total: u64,
        /// At most [`SNAPSHOT_CHUNK_MAX`] bytes.
        data: Bytes,
    },
    /// Between two transports, never seen by the engine or the node: how to
    /// reach the sender's memory (the rdma transport's queue pair and rings),
    /// sent over the authenticated TCP link.
    LinkSetup {
        /// The sender's view (informational).
        view: u64,
        /// At most [`LINK_SETUP_MAX`] bytes, the transport's own format.
        data: Bytes,
    },
}

/// [`Message::RecoverOk`]: the replier is itself without state, recovering.
pub const RECOVER_FRESH: u64 = 1;
/// [`Message::RecoverOk`]: the replier leads its view (status normal).
pub const RECOVER_LEADING: u64 = 2;

/// The most bytes one [`Message::LinkSetup`] carries.
pub const LINK_SETUP_MAX: usize = 4096;

/// The most bytes one [`Message::SnapshotChunk`] carries.
pub const SNAPSHOT_CHUNK_MAX: usize = 1 << 20;

impl Message {
    /// The view the message belongs to.
    pub fn view(&self) -> u64 {
        self.numbers().0[0]
    }

    /// The fixed-width numbers of the message, in wire order (the view is
    /// always first), and how many there are.
    pub fn numbers(&self) -> ([u64; 5], usize) {
        let pad = |xs: &[u64]| {
            let mut a = [0u64; 5];
            a[..xs.len()].copy_from_slice(xs);
            (a, xs.len())
        };
        match self {
            Message::Prepare {
                view,
                op_start,
                commit,
                ..
            }
            | Message::CatchUp {
                view,
                op_start,
                commit,
                ..
            } => pad(&[*view, *op_start, *commit]),
            Message::StartView {
                view,
                op_start,
                commit,
                last_op,
                ..
            } => pad(&[*view, *op_start, *commit, *last_op]),
            Message::PrepareOk { view, op } | Message::NeedSnapshot { view, op } => {
                pad(&[*view, *op])
            }
            Message::Commit { view, commit } => pad(&[*view, *commit]),
            Message::Missing { view, from } | Message::RequestDoViewChange { view, from } => {
                pad(&[*view, *from])
            }
            Message::StartViewChange { view }
            | Message::NewerView { view }
            | Message::ViewProbe { view }
            | Message::ViewProbeOk { view } => pad(&[*view]),
            Message::SnapshotRequest { view, op, offset } => pad(&[*view, *op, *offset]),
            Message::Recover { view, nonce } => pad(&[*view, *nonce]),
            Message::RecoverOk {
                view,
                nonce,
                last_op,
                flags,
            } => pad(&[*view, *nonce, *last_op, *flags]),
            Message::LinkSetup { view, .. } => pad(&[*view]),
            Message::SnapshotChunk {
                view,
                op,
                offset,
                total,
                ..
            } => pad(&[*view, *op, *offset, *total]),
            Message::DoViewChange {
                view,
                log_view,
                last_op,
                commit,
                op_start,
                ..
            } => pad(&[*view, *log_view, *last_op, *commit, *op_start]),
        }
    }

    /// The entries the message carries, if it is of a kind that carries them.
    pub fn entries(&self) -> Option<&[Entry]> {
        match self {
            Message::Prepare { entries, .. }
            | Message::StartView { entries, .. }
            | Message::CatchUp { entries, .. }
            | Message::DoViewChange { entries, .. } => Some(entries),
            _ => None,
        }
    }

    /// The same, to fill in or replace.
    pub fn entries_mut(&mut self) -> Option<&mut Vec<Entry>> {
        match self {
            Message::Prepare { entries, .. }
            | Message::StartView { entries, .. }
            | Message::CatchUp { entries, .. }
            | Message::DoViewChange { entries, .. } => Some(entries),
            _ => None,
        }
    }

    /// A short name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Prepare { .. } => "prepare",
            Message::StartView { .. } => "start_view",
            Message::CatchUp { .. } => "catch_up",
            Message::PrepareOk { .. } => "prepare_ok",
            Message::Commit { .. } => "commit",
            Message::Missing { .. } => "missing",
            Message::StartViewChange { .. } => "start_view_change",
            Message::DoViewChange { .. } => "do_view_change",
            Message::RequestDoViewChange { .. } => "request_do_view_change",
            Message::NewerView { .. } => "newer_view",
            Message::ViewProbe { .. } => "view_probe",
            Message::ViewProbeOk { .. } => "view_probe_ok",
            Message::NeedSnapshot { .. } => "need_snapshot",
            Message::SnapshotRequest { .. } => "snapshot_request",
            Message::SnapshotChunk { .. } => "snapshot_chunk",
            Message::LinkSetup { .. } => "link_setup",
            Message::Recover { .. } => "recover",
            Message::RecoverOk { .. } => "recover_ok",
        }
    }
}

/// Why bytes are not a valid message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer bytes than the message needs.
    #[error("truncated message: {0} more bytes needed")]
    Truncated(usize),
    /// Bad magic.
    #[error("not a falcon engine message (magic {0:#06x})")]
    BadMagic(u16),
    /// Another encoding version.
    #[error("message encoding version {0} not supported (this falcon speaks {WIRE_VERSION})")]
    Version(u8),
    /// Unknown message type.
    #[error("unknown message type {0}")]
    UnknownType(u8),
    /// Over a size limit.
    #[error("{what} of {size} exceeds the limit of {max}")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// An entry kind byte that is not a kind.
    #[error("unknown entry kind {0}")]
    BadKind(u8),
    /// Entries whose ops do not count up from the start op.
    #[error("entry ops are not consecutive from {0}")]
    NotConsecutive(u64),
    /// Bytes after the end of the message.
    #[error("{0} bytes after the end of the message")]
    Trailing(usize),
}

const T_PREPARE: u8 = 1;
const T_PREPARE_OK: u8 = 2;
const T_COMMIT: u8 = 3;
const T_MISSING: u8 = 4;
const T_SVC: u8 = 5;
const T_DVC: u8 = 6;
const T_RDVC: u8 = 7;
const T_NEWER: u8 = 8;
const T_SNAP: u8 = 9;
const T_START_VIEW: u8 = 10;
const T_CATCH_UP: u8 = 11;
const T_SNAP_REQUEST: u8 = 12;
const T_SNAP_CHUNK: u8 = 13;
const T_LINK_SETUP: u8 = 14;
const T_PROBE: u8 = 15;
const T_PROBE_OK: u8 = 16;
const T_RECOVER: u8 = 17;
const T_RECOVER_OK: u8 = 18;

fn put_entries(out: &mut Vec<u8>, entries: &[Entry]) {
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        out.extend_from_slice(&e.view.to_le_bytes());
        out.extend_from_slice(&e.op.to_le_bytes());
        out.push(e.kind.to_byte());
        out.extend_from_slice(&e.conn.to_le_bytes());
        out.extend_from_slice(&e.time_ns.to_le_bytes());
        out.extend_from_slice(&(e.payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&e.payload);
    }
}

/// Appends the encoding of `env` to `out`.
pub fn encode(env: &Envelope, out: &mut Vec<u8>) {
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.push(WIRE_VERSION);
    let t = match &env.msg {
        Message::Prepare { .. } => T_PREPARE,
        Message::StartView { .. } => T_START_VIEW,
        Message::CatchUp { .. } => T_CATCH_UP,
        Message::PrepareOk { .. } => T_PREPARE_OK,
        Message::Commit { .. } => T_COMMIT,
        Message::Missing { .. } => T_MISSING,
        Message::StartViewChange { .. } => T_SVC,
        Message::DoViewChange { .. } => T_DVC,
        Message::RequestDoViewChange { .. } => T_RDVC,
        Message::NewerView { .. } => T_NEWER,
        Message::NeedSnapshot { .. } => T_SNAP,
        Message::SnapshotRequest { .. } => T_SNAP_REQUEST,
        Message::SnapshotChunk { .. } => T_SNAP_CHUNK,
        Message::LinkSetup { .. } => T_LINK_SETUP,
        Message::ViewProbe { .. } => T_PROBE,
        Message::ViewProbeOk { .. } => T_PROBE_OK,
        Message::Recover { .. } => T_RECOVER,
        Message::RecoverOk { .. } => T_RECOVER_OK,
    };
    out.push(t);
    out.extend_from_slice(&env.cluster.to_le_bytes());
    out.extend_from_slice(&env.from.to_le_bytes());
    out.extend_from_slice(&env.to.to_le_bytes());
    let (numbers, n) = env.msg.numbers();
    for x in &numbers[..n] {
        out.extend_from_slice(&x.to_le_bytes());
    }
    if let Some(entries) = env.msg.entries() {
        put_entries(out, entries);
    }
    if let Message::SnapshotChunk { data, .. } | Message::LinkSetup { data, .. } = &env.msg {
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(data);
    }
}

/// Encodes into a new buffer.
pub fn to_bytes(env: &Envelope) -> Vec<u8> {
    let mut v = Vec::new();
    encode(env, &mut v);
    v
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.b.len() - self.at < n {
            return Err(DecodeError::Truncated(n - (self.b.len() - self.at)));
        }
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let s = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
    fn entries(&mut self, op_start: u64) -> Result<Vec<Entry>, DecodeError> {
        let n = self.u32()? as usize;
        if n > MESSAGE_ENTRIES_MAX {
            return Err(DecodeError::TooLarge {
                what: "entry count",
                size: n,
                max: MESSAGE_ENTRIES_MAX,
            });
        }
        // Each entry takes at least 37 bytes: refuse counts the bytes cannot hold
        // before allocating for them.
        let left = self.b.len() - self.at;
        if n * 37 > left {
            return Err(DecodeError::Truncated(n * 37 - left));
        }
        let mut v = Vec::with_capacity(n);
        for i in 0..n {
            let view = self.u64()?;
            let op = self.u64()?;
            let kb = self.u8()?;
            let kind = Kind::from_byte(kb).ok_or(DecodeError::BadKind(kb))?;
            let conn = self.u64()?;
            let time_ns = self.u64()?;
            let len = self.u32()? as usize;
            if len > crate::log::format::PAYLOAD_MAX {
                return Err(DecodeError::TooLarge {
                    what: "payload",
                    size: len,
                    max: crate::log::format::PAYLOAD_MAX,
                });
            }
            if op_start.checked_add(i as u64) != Some(op) {
                return Err(DecodeError::NotConsecutive(op_start));
            }
            let payload = Bytes::copy_from_slice(self.take(len)?);
            v.push(Entry {
                view,
                op,
                kind,
                conn,
                time_ns,
                payload,
            });
        }
        Ok(v)
    }
}

/// Decodes one whole message; `b` must hold exactly one.
pub fn decode(b: &[u8]) -> Result<Envelope, DecodeError> {
    if b.len() > MESSAGE_BYTES_MAX {
        return Err(DecodeError::TooLarge {
            what: "message",
            size: b.len(),
            max: MESSAGE_BYTES_MAX,
        });
    }
    let mut r = Reader { b, at: 0 };
    let magic = r.u16()?;
    if magic != MAGIC {
        return Err(DecodeError::BadMagic(magic));
    }
    let version = r.u8()?;
    if version != WIRE_VERSION {
        return Err(DecodeError::Version(version));
    }
    let t = r.u8()?;
    let cluster = r.u64()?;
    let from = r.u32()?;
    let to = r.u32()?;
    let msg = match t {
        T_PREPARE | T_START_VIEW | T_CATCH_UP => {
            let (view, op_start, commit) = (r.u64()?, r.u64()?, r.u64()?);
            let last_op = if t == T_START_VIEW { r.u64()? } else { 0 };
            let entries = r.entries(op_start)?;
            if t == T_CATCH_UP {
                Message::CatchUp {
                    view,
                    op_start,
                    entries,
                    commit,
                }
            } else if t == T_PREPARE {
                Message::Prepare {
                    view,
                    op_start,
                    entries,
                    commit,
                }
            } else {
                Message::StartView {
                    view,
                    op_start,
                    entries,
                    commit,
                    last_op,
                }
            }
        }
        T_PREPARE_OK => Message::PrepareOk {
            view: r.u64()?,
            op: r.u64()?,
        },
        T_COMMIT => Message::Commit {
            view: r.u64()?,
            commit: r.u64()?,
        },
        T_MISSING => Message::Missing {
            view: r.u64()?,
            from: r.u64()?,
        },
        T_SVC => Message::StartViewChange { view: r.u64()? },
        T_DVC => {
            let (view, log_view, last_op, commit, op_start) =
                (r.u64()?, r.u64()?, r.u64()?, r.u64()?, r.u64()?);
            let entries = r.entries(op_start)?;
            Message::DoViewChange {
                view,
                log_view,
                last_op,
                commit,
                op_start,
                entries,
            }
        }
        T_RDVC => Message::RequestDoViewChange {
            view: r.u64()?,
            from: r.u64()?,
        },
        T_NEWER => Message::NewerView { view: r.u64()? },
        T_PROBE => Message::ViewProbe { view: r.u64()? },
        T_PROBE_OK => Message::ViewProbeOk { view: r.u64()? },
        T_RECOVER => Message::Recover {
            view: r.u64()?,
            nonce: r.u64()?,
        },
        T_RECOVER_OK => Message::RecoverOk {
            view: r.u64()?,
            nonce: r.u64()?,
            last_op: r.u64()?,
            flags: r.u64()?,
        },
        T_SNAP => Message::NeedSnapshot {
            view: r.u64()?,
            op: r.u64()?,
        },
        T_SNAP_REQUEST => Message::SnapshotRequest {
            view: r.u64()?,
            op: r.u64()?,
            offset: r.u64()?,
        },
        T_SNAP_CHUNK => {
            let (view, op, offset, total) = (r.u64()?, r.u64()?, r.u64()?, r.u64()?);
            let len = r.u32()? as usize;
            if len > SNAPSHOT_CHUNK_MAX {
                return Err(DecodeError::TooLarge {
                    what: "snapshot chunk",
                    size: len,
                    max: SNAPSHOT_CHUNK_MAX,
                });
            }
            let data = Bytes::copy_from_slice(r.take(len)?);
            Message::SnapshotChunk {
                view,
                op,
                offset,
                total,
                data,
            }
        }
        T_LINK_SETUP => {
            let view = r.u64()?;
            let len = r.u32()? as usize;
            if len > LINK_SETUP_MAX {
                return Err(DecodeError::TooLarge {
                    what: "link setup",
                    size: len,
                    max: LINK_SETUP_MAX,
                });
            }
            let data = Bytes::copy_from_slice(r.take(len)?);
            Message::LinkSetup { view, data }
        }
        other => return Err(DecodeError::UnknownType(other)),
    };
    if r.at != b.len() {
        return Err(DecodeError::Trailing(b.len() - r.at));
    }
    Ok(Envelope {
        cluster,
        from,
        to,
        msg,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(n: u64) -> Vec<Entry> {
        (5..5 + n)
            .map(|op| Entry {
                view: 2,
                op,
                kind: Kind::Data,
                conn: 9,
                time_ns: 77,
                payload: Bytes::from(vec![op as u8; op as usize]),
            })
            .collect()
    }

    pub(crate) fn samples() -> Vec<Message> {
        vec![
            Message::Prepare {
                view: 3,
                op_start: 5,
                entries: entries(3),
                commit: 4,
            },
            Message::Prepare {
                view: 3,
                op_start: 9,
                entries: vec![],
                commit: 8,
            },
            Message::PrepareOk { view: 3, op: 7 },
            Message::Commit { view: 3, commit: 7 },
            Message::Missing { view: 3, from: 2 },
            Message::StartView {
                view: 3,
                op_start: 5,
                entries: entries(2),
                commit: 5,
                last_op: 6,
            },
            Message::StartView {
                view: 3,
                op_start: 5,
                entries: entries(2),
                commit: 5,
                last_op: 900,
            },
            Message::CatchUp {
                view: 3,
                op_start: 5,
                entries: entries(2),
                commit: 7,
            },
            Message::StartViewChange { view: 4 },
            Message::DoViewChange {
                view: 4,
                log_view: 3,
                last_op: 7,
                commit: 4,
                op_start: 5,
                entries: entries(3),
            },
            Message::RequestDoViewChange { view: 4, from: 1 },
            Message::NewerView { view: 9 },
            Message::ViewProbe { view: 5 },
            Message::ViewProbeOk { view: 5 },
            Message::Recover { view: 0, nonce: 77 },
            Message::RecoverOk {
                view: 4,
                nonce: 77,
                last_op: 90,
                flags: RECOVER_LEADING,
            },
            Message::NeedSnapshot { view: 4, op: 100 },
            Message::SnapshotRequest {
                view: 4,
                op: 100,
                offset: 4096,
            },
            Message::SnapshotChunk {
                view: 4,
                op: 120,
                offset: 4096,
                total: 10_000,
                data: Bytes::from_static(b"snapshot bytes"),
            },
            Message::LinkSetup {
                view: 4,
                data: Bytes::from_static(b"qp 17"),
            },
        ]
    }

    #[test]
    fn every_message_roundtrips() {
        for msg in samples() {
            let env = Envelope {
                cluster: 0xfa1c,
                from: 1,
                to: 2,
                msg,
            };
            let b = to_bytes(&env);
            assert_eq!(decode(&b), Ok(env));
        }
    }

    #[test]
    fn every_truncation_and_trailing_byte_is_an_error() {
        for msg in samples() {
            let b = to_bytes(&Envelope {
                cluster: 1,
                from: 0,
                to: 1,
                msg,
            });
            for cut in 0..b.len() {
                assert!(decode(&b[..cut]).is_err(), "cut at {cut}");
            }
            let mut long = b.clone();
            long.push(0);
            assert_eq!(decode(&long), Err(DecodeError::Trailing(1)));
        }
    }

    #[test]
    fn impossible_fields_are_refused() {
        let mut b = to_bytes(&Envelope {
            cluster: 1,
            from: 0,
            to: 1,
            msg: Message::Prepare {
                view: 1,
                op_start: 5,
                entries: entries(2),
                commit: 0,
            },
        });
        // Entry count far beyond the bytes.
        let count_at = HEADER_LEN + 24;
        let mut huge = b.clone();
        huge[count_at..count_at + 4].copy_from_slice(&60_000u32.to_le_bytes());
        assert!(matches!(decode(&huge), Err(DecodeError::Truncated(_))));
        huge[count_at..count_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode(&huge), Err(DecodeError::TooLarge { .. })));
        // Ops out of order.
        let op_at = count_at + 4 + 8;
        b[op_at..op_at + 8].copy_from_slice(&6u64.to_le_bytes());
        assert_eq!(decode(&b), Err(DecodeError::NotConsecutive(5)));
        assert_eq!(
            decode(&[0xff, 0xff, 1, 1]),
            Err(DecodeError::BadMagic(0xffff))
        );
    }
}
