//! Moving engine messages between replicas: one trait, several transports.
//!
//! To be correct, a transport must: deliver only messages whose sender has
//! proven it holds the cluster key and belongs to this cluster (never pass an
//! unauthenticated byte to the engine); keep every queue bounded and refuse
//! with [`SendError::Full`] instead of growing; reconnect by itself after a
//! peer restarts. It may lose, but not corrupt, reorder within one
//! connection, or duplicate messages — the engine tolerates loss. One
//! exception: acknowledgements (`PrepareOk`) are cumulative, and a transport
//! may deliver only the latest of several from one peer (shm writes them
//! into one slot of the leader's memory), out of order with that peer's
//! other messages.
//!
//! `send` only queues (a transport may write early when a queue grows);
//! queued messages go out at the latest on the next `flush` or `recv`, so a
//! caller that sends several messages in one turn of its loop pays for one
//! write per peer.

pub mod conformance;
pub mod mem;
#[cfg(feature = "rdma")]
pub mod rdma;
pub mod ring;
pub mod shm;
pub mod tcp;
pub mod tls;

use std::io;
use std::time::Duration;

use crate::consensus::{Envelope, Message, NodeId, message};
use shm::PollMode;

/// Why a message could not be queued.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The queue for this peer is full: slow down.
    #[error("send queue to replica {0} is full")]
    Full(NodeId),
    /// The connection to this peer broke and is not back yet: the message is dropped.
    #[error("replica {0} is unreachable; message dropped")]
    Down(NodeId),
    /// No such peer.
    #[error("no replica {0}")]
    UnknownPeer(NodeId),
    /// The message can never fit the queue or ring to this peer, however
    /// empty: it is dropped. (The engine splits logs into chunks that fit,
    /// so this points at a limit set too small.)
    #[error("a {bytes}-byte message to replica {to} can never fit its {max}-byte queue; dropped")]
    TooLarge {
        /// The peer.
        to: NodeId,
        /// The encoded message.
        bytes: usize,
        /// What the queue or ring holds at most.
        max: usize,
    },
    /// The peer follows a newer view and refuses this view's log writes (we
    /// are a deposed leader): the message is dropped.
    #[error("replica {0} revoked this view's log writes")]
    Revoked(NodeId),
}

/// Things an operator wants to see in the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TransportEvent {
    /// An authenticated connection to or from a peer is up.
    Connected {
        /// The peer.
        peer: NodeId,
        /// Incoming (it dialled us) or outgoing.
        incoming: bool,
    },
    /// A connection to or from a peer closed.
    Lost {
        /// The peer.
        peer: NodeId,
        /// Why.
        reason: String,
    },
    /// A connection was refused: wrong key, other cluster, garbage, too large…
    Refused {
        /// Who connected.
        addr: String,
        /// Why.
        reason: String,
    },
}

/// A transport endpoint of one replica.
pub trait Transport {
    /// Queues `env` for `env.to`; it is written by the next `flush` or `recv` at the latest.
    fn send(&mut self, env: &Envelope) -> Result<(), SendError>;
    /// Writes what is queued for every peer, as far as the sockets take it now.
    fn flush(&mut self) {}
    /// Appends what has arrived to `out`, waiting up to `timeout` when nothing is ready.
    fn recv(&mut self, timeout: Duration, out: &mut Vec<Envelope>) -> io::Result<()>;
    /// Takes the events since the last call.
    fn events(&mut self) -> Vec<TransportEvent>;
    /// This replica.
    fn id(&self) -> NodeId;
    /// The engine follows `view`, led by `leader` (None while it changes
    /// views). Transports with one-sided writes revoke every other writer's
    /// log writes (Prepare, Commit, CatchUp) of older views, on the writer's
    /// side before they touch this replica's memory where they can; the
    /// others need not do anything, since the engine refuses them too.
    fn grant(&mut self, _view: u64, _leader: Option<NodeId>) {}
    /// The caller is about to sleep in its own poll (on the descriptors or
    /// wake-up this transport gave it): arrange to be woken by the next
    /// message. False when one is already there: do not sleep.
    fn before_sleep(&mut self) -> bool {
        true
    }
    /// The caller's poll returned (after [`Transport::before_sleep`]).
    fn after_sleep(&mut self) {}
}

/// The log writes a follower fences by view (shm and rdma).
pub(crate) fn is_log_write(m: &Message) -> bool {
    matches!(
        m,
        Message::Prepare { .. } | Message::Commit { .. } | Message::CatchUp { .. }
    )
}

/// Whether a follower whose owner word is `owner` (`view << 8 | leader + 1`,
/// 0 for no leader) accepts a log write of `view` from `from`.
pub(crate) fn owner_admits(owner: u64, view: u64, from: NodeId) -> bool {
    let (owner_view, leader) = (owner >> 8, owner & 0xff);
    view > owner_view || (view == owner_view && (leader == 0 || leader == u64::from(from) + 1))
}

/// A record read from the ring `from` writes, checked: `Ok(Some)` to
/// deliver, `Ok(None)` for a log write of a view this replica left
/// (`granted`: fenced off), `Err` with the reason to refuse it.
pub(crate) fn check_record(
    record: &[u8],
    cluster: u64,
    from: NodeId,
    me: NodeId,
    granted: u64,
) -> Result<Option<Envelope>, String> {
    match message::decode(record) {
        Ok(env) if env.cluster == cluster && env.from == from && env.to == me => {
            if is_log_write(&env.msg) && env.msg.view() < granted {
                Ok(None)
            } else {
                Ok(Some(env))
            }
        }
        Ok(env) => Err(format!(
            "message of cluster {:#x} addressed as {} → {} on the ring from {from}",
            env.cluster, env.from, env.to
        )),
        Err(e) => Err(format!("malformed message: {e}")),
    }
}

/// Spins until `ready()` or the end of the spin `poll` allows within
/// `timeout`: `Some(true)` when ready, `Some(false)` when `spin` ran out the
/// whole timeout, `None` when the caller should now sleep.
pub(crate) fn spin(
    poll: PollMode,
    spin: Duration,
    timeout: Duration,
    ready: impl Fn() -> bool,
) -> Option<bool> {
    if poll == PollMode::Sleep {
        return None;
    }
    let until = std::time::Instant::now()
        + if poll == PollMode::Spin {
            timeout
        } else {
            spin.min(timeout)
        };
    // The clock is read every 64 checks: reading it costs more than a check.
    let mut n = 0u32;
    loop {
        if ready() {
            return Some(true);
        }
        n = n.wrapping_add(1);
        if n % 64 == 0 && std::time::Instant::now() >= until {
            return if poll == PollMode::Spin {
                Some(false)
            } else {
                None
            };
        }
        std::hint::spin_loop();
    }
}

/// Who a ring's records must come from, and what this replica accepts.
pub(crate) struct RingCheck<'a> {
    pub cluster: u64,
    pub from: NodeId,
    pub me: NodeId,
    pub granted: u64,
    /// Names the ring in notices.
    pub addr: &'a str,
}

/// Takes every published record of `ring`: delivered to `out`, fenced ones
/// counted in `revoked`, bad ones (and a damaged ring, skipped to its end)
/// reported. True if there was any record.
pub(crate) fn drain_ring(
    ring: &mut ring::Ring,
    buf: &mut Vec<u8>,
    check: &RingCheck<'_>,
    out: &mut Vec<Envelope>,
    notices: &mut Vec<TransportEvent>,
    revoked: &mut u64,
) -> bool {
    let mut any = false;
    // At most this many records a call: a writer that refills the ring as
    // fast as it is read cannot hold the loop (the ring stays ready, so the
    // loop comes back without sleeping).
    for _ in 0..DRAIN_MAX {
        match ring.pop(buf) {
            Ok(false) => return any,
            Ok(true) => {
                any = true;
                match check_record(buf, check.cluster, check.from, check.me, check.granted) {
                    Ok(Some(env)) => out.push(env),
                    // Written before the writer saw this replica's fence.
                    Ok(None) => *revoked += 1,
                    Err(reason) => notices.push(TransportEvent::Refused {
                        addr: check.addr.to_string(),
                        reason,
                    }),
                }
            }
            Err(e) => {
                notices.push(TransportEvent::Refused {
                    addr: check.addr.to_string(),
                    reason: format!("ring damaged: {e}; skipped what was in it"),
                });
                ring.reset_reader();
                return true;
            }
        }
    }
    any
}

/// Records [`drain_ring`] takes from one ring in one call.
const DRAIN_MAX: usize = 4096;
