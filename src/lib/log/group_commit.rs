//! Group commit for many writers: a thread owns the log, takes every entry
//! queued since its last round, appends them with one write and makes them
//! durable with one `fdatasync`, then wakes every writer whose entry is now on
//! disk. The more writers wait, the more entries share each `fdatasync`.

use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use super::LogError;
use super::format::{Entry, Kind, PAYLOAD_MAX};
use super::segment_log::SegmentLog;
use super::storage::Storage;

/// Limits of the queue in front of the log thread.
#[derive(Clone, Debug)]
pub struct GroupCommitOptions {
    /// Writers block once this many entries wait for the log thread.
    pub queue_entries_max: usize,
    /// Writers block once this many payload bytes wait for the log thread.
    pub queue_bytes_max: usize,
}

impl Default for GroupCommitOptions {
    fn default() -> Self {
        GroupCommitOptions {
            queue_entries_max: 1 << 16,
            queue_bytes_max: 64 << 20,
        }
    }
}

struct State {
    queue: Vec<Entry>,
    queue_bytes: usize,
    next_op: u64,
    durable_op: u64,
    failed: Option<(io::ErrorKind, String)>,
    closing: bool,
    rounds: u64,
}

struct Shared {
    state: Mutex<State>,
    work: Condvar,
    space: Condvar,
    durable: Condvar,
    opts: GroupCommitOptions,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A log shared by many writer threads. Ops are assigned in submission order.
pub struct GroupCommit {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl GroupCommit {
    /// Moves `log` onto its own thread.
    pub fn start<S: Storage>(mut log: SegmentLog<S>, opts: GroupCommitOptions) -> GroupCommit {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queue: Vec::new(),
                queue_bytes: 0,
                next_op: log.next_op(),
                durable_op: log.durable_op(),
                failed: None,
                closing: false,
                rounds: 0,
            }),
            work: Condvar::new(),
            space: Condvar::new(),
            durable: Condvar::new(),
            opts,
        });
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("falcon-log".into())
            .spawn(move || {
                let mut batch = Vec::new();
                loop {
                    {
                        let mut st = lock(&sh.state);
                        while st.queue.is_empty() && !st.closing {
                            st = sh.work.wait(st).unwrap_or_else(|p| p.into_inner());
                        }
                        if st.queue.is_empty() {
                            return;
                        }
                        std::mem::swap(&mut batch, &mut st.queue);
                        st.queue_bytes = 0;
                        sh.space.notify_all();
                    }
                    let result = log.append(&batch).and_then(|_| log.sync());
                    batch.clear();
                    let mut st = lock(&sh.state);
                    match result {
                        Ok(durable) => {
                            st.durable_op = durable;
                            st.rounds += 1;
                        }
                        Err(e) => {
                            let kind = match &e {
                                LogError::Io { source, .. } => source.kind(),
                                _ => io::ErrorKind::Other,
                            };
                            st.failed = Some((kind, e.to_string()));
                            sh.durable.notify_all();
                            sh.space.notify_all();
                            return;
                        }
                    }
                    sh.durable.notify_all();
                }
            })
            .expect("spawning the log thread");
        GroupCommit {
            shared,
            thread: Some(thread),
        }
    }

    fn failure(st: &State) -> Option<LogError> {
        st.failed.as_ref().map(|(kind, msg)| LogError::Io {
            context: "group commit".into(),
            source: io::Error::new(*kind, msg.clone()),
        })
    }

    /// Queues one entry and returns its op; blocks while the queue is full.
    /// The entry is durable once [`durable_op`](Self::durable_op) reaches the op.
    pub fn submit(
        &self,
        view: u64,
        kind: Kind,
        conn: u64,
        time_ns: u64,
        payload: Vec<u8>,
    ) -> Result<u64, LogError> {
        if payload.len() > PAYLOAD_MAX {
            return Err(LogError::TooLarge(payload.len()));
        }
        let sh = &self.shared;
        let mut st = lock(&sh.state);
        loop {
            if let Some(e) = Self::failure(&st) {
                return Err(e);
            }
            if st.queue.len() < sh.opts.queue_entries_max
                && (st.queue_bytes + payload.len() <= sh.opts.queue_bytes_max
                    || st.queue.is_empty())
            {
                break;
            }
            st = sh.space.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        let op = st.next_op;
        st.next_op += 1;
        st.queue_bytes += payload.len();
        st.queue.push(Entry {
            view,
            op,
            kind,
            conn,
            time_ns,
            payload: payload.into(),
        });
        if st.queue.len() == 1 {
            sh.work.notify_one();
        }
        Ok(op)
    }

    /// Blocks until `op` is durable.
    pub fn wait_durable(&self, op: u64) -> Result<(), LogError> {
        let sh = &self.shared;
        let mut st = lock(&sh.state);
        while st.durable_op < op {
            if let Some(e) = Self::failure(&st) {
                return Err(e);
            }
            st = sh.durable.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        Ok(())
    }

    /// Queues one entry and waits until it is durable; returns its op.
    pub fn append(
        &self,
        view: u64,
        kind: Kind,
        conn: u64,
        time_ns: u64,
        payload: Vec<u8>,
    ) -> Result<u64, LogError> {
        let op = self.submit(view, kind, conn, time_ns, payload)?;
        self.wait_durable(op)?;
        Ok(op)
    }

    /// How many append+fdatasync rounds the log thread has completed.
    pub fn rounds(&self) -> u64 {
        lock(&self.shared.state).rounds
    }

    /// The last durable op.
    pub fn durable_op(&self) -> u64 {
        lock(&self.shared.state).durable_op
    }

    /// Makes everything queued durable, stops the log thread and reports
    /// whether the log failed.
    pub fn close(mut self) -> Result<(), LogError> {
        self.stop();
        let st = lock(&self.shared.state);
        match Self::failure(&st) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn stop(&mut self) {
        {
            let mut st = lock(&self.shared.state);
            st.closing = true;
            self.shared.work.notify_all();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        self.stop();
    }
}
