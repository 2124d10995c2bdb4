//! The in-memory transport: endpoints in one process joined by bounded channels.

use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::time::Duration;

use super::{SendError, Transport, TransportEvent};
use crate::consensus::{Envelope, NodeId};

/// One replica's end of an in-memory network.
pub struct MemTransport {
    id: NodeId,
    peers: Vec<SyncSender<Envelope>>,
    inbox: Receiver<Envelope>,
}

/// Makes `n` joined endpoints, each inbox holding at most `queue` messages.
pub fn network(n: u32, queue: usize) -> Vec<MemTransport> {
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..n).map(|_| sync_channel(queue)).unzip();
    receivers
        .into_iter()
        .enumerate()
        .map(|(i, inbox)| MemTransport {
            id: i as NodeId,
            peers: senders.clone(),
            inbox,
        })
        .collect()
}

impl Transport for MemTransport {
    fn send(&mut self, env: &Envelope) -> Result<(), SendError> {
        let tx = self
            .peers
            .get(env.to as usize)
            .ok_or(SendError::UnknownPeer(env.to))?;
        match tx.try_send(env.clone()) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(SendError::Full(env.to)),
            // A dropped endpoint is a dead replica: the message is lost.
            Err(TrySendError::Disconnected(_)) => Ok(()),
        }
    }

    fn recv(&mut self, timeout: Duration, out: &mut Vec<Envelope>) -> std::io::Result<()> {
        match self.inbox.recv_timeout(timeout) {
            Ok(env) => out.push(env),
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return Ok(()),
        }
        out.extend(self.inbox.try_iter());
        Ok(())
    }

    fn events(&mut self) -> Vec<TransportEvent> {
        Vec::new()
    }

    fn id(&self) -> NodeId {
        self.id
    }
}
