//! The shared-memory transport: replicas as processes on one host, one
//! [`Ring`](super::ring::Ring) per direction in a memory-mapped file.
//!
//! In the directory every replica of the cluster is given (on tmpfs, such
//! as `/dev/shm/falcon-<cluster>`):
//!
//! * `ring-<from>-<to>`: written by `from`, created (and owned) by `to`;
//! * `bell-<id>`: replica `id`'s doorbell, a futex word senders bump after
//!   they publish, and a flag saying whether `id` sleeps on it; also the
//!   *owner* word (the view `id` follows and its leader: the one replica
//!   whose log writes `id` accepts) and one *ack slot* per peer, where a
//!   follower writes its acknowledgement straight into the leader's memory
//!   instead of sending a message.
//!
//! Fencing (Mu's permission switch, done with a word): a replica that moved
//! to view `v` publishes `v` in its owner word; a writer checks that word
//! before it puts a log write (Prepare, Commit, CatchUp) of an older view
//! into the ring, and the reader drops any that raced past the check. A
//! deposed leader's writes stop at the first follower that moved on.
//!
//! A receiver spins for a while (`--poll adaptive`, the default), then sleeps
//! on its doorbell; `spin` never sleeps, `sleep` always does. Files are
//! created under a temporary name and renamed into place, so a sender notices
//! a restarted receiver by the file's inode and maps the new ring. Files are
//! mode 0600: only the cluster's user reaches them. A message must decode,
//! carry this cluster's id and name the ring's writer as its sender, or it is
//! refused and reported.

use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};
use std::time::{Duration, Instant};

use super::ring::{HEADER, Ring};
use super::{SendError, Transport, TransportEvent};
use crate::consensus::{Envelope, Message, NodeId, message};

/// How a receiver waits for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PollMode {
    /// Spin on the rings, never sleep (lowest latency, a core per replica).
    Spin,
    /// Spin for a bounded time, then sleep on the doorbell.
    Adaptive,
    /// Sleep on the doorbell at once.
    Sleep,
}

/// Settings of one shm endpoint.
#[derive(Clone, Debug)]
pub struct ShmOptions {
    /// The cluster; messages of another are refused.
    pub cluster_id: u64,
    /// This replica.
    pub id: NodeId,
    /// Replicas in the cluster.
    pub n: u32,
    /// The directory the replicas share.
    pub dir: PathBuf,
    /// Bytes of each ring's data area (a power of two).
    pub ring_bytes: usize,
    /// How to wait.
    pub poll: PollMode,
    /// How long `adaptive` spins before it sleeps.
    pub spin: Duration,
}

impl ShmOptions {
    /// Defaults: 32 MiB rings, adaptive polling with 50 µs of spinning.
    pub fn new(cluster_id: u64, id: NodeId, n: u32, dir: PathBuf) -> ShmOptions {
        ShmOptions {
            cluster_id,
            id,
            n,
            dir,
            ring_bytes: 32 << 20,
            poll: PollMode::Adaptive,
            spin: Duration::from_micros(50),
        }
    }
}

/// A shared mapping of a whole file.
struct Mapping {
    ptr: *mut u8,
    len: usize,
    ino: u64,
}

// SAFETY: the mapping is shared memory reached through atomics and rings.
unsafe impl Send for Mapping {}

impl Mapping {
    fn map(path: &Path) -> std::io::Result<Mapping> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        let meta = f.metadata()?;
        let len = meta.len() as usize;
        if len < 4096 {
            return Err(std::io::Error::other("file too small"));
        }
        // SAFETY: a fresh shared mapping of a file we opened read-write.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&f),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Mapping {
            ptr: ptr as *mut u8,
            len,
            ino: meta.ino(),
        })
    }

    /// Creates `path` with `len` zero bytes under a temporary name, maps it,
    /// lets `init` write into it, then renames it into place.
    fn create(path: &Path, len: usize, init: impl FnOnce(&Mapping)) -> std::io::Result<Mapping> {
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.set_len(len as u64)?;
        // Every page is taken now: a tmpfs that fills up later would kill
        // the process writing into the mapping (SIGBUS), not return ENOSPC.
        if let Err(e) = crate::log::storage::preallocate(&f, len as u64) {
            drop(f);
            let _ = std::fs::remove_file(&tmp);
            return Err(std::io::Error::new(
                e.kind(),
                format!(
                    "reserving {} for {}: {e} (is the file system full? shared memory rings need their whole size)",
                    crate::output::human_bytes(len as u64),
                    path.display()
                ),
            ));
        }
        drop(f);
        let m = Mapping::map(&tmp)?;
        init(&m);
        std::fs::rename(&tmp, path)?;
        Ok(m)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping what map() mapped.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

/// A doorbell: `word` (futex) at offset 0, `sleeping` at 64, the owner word
/// at 128 (`view << 8 | leader + 1`, 0 for no leader), and at `256 + 64 * p`
/// the ack slot peer `p` writes (`seq`, `view`, `op`; `seq` odd while it is
/// being written).
struct Bell(Mapping);

/// Where the ack slots start in a bell.
const ACKS: usize = 256;

impl Bell {
    fn word(&self) -> &AtomicU32 {
        // SAFETY: page-aligned mapping of at least 64 bytes.
        unsafe { &*(self.0.ptr as *const AtomicU32) }
    }
    fn sleeping(&self) -> &AtomicU32 {
        // SAFETY: as above (the file is 4 KiB).
        unsafe { &*(self.0.ptr.add(64) as *const AtomicU32) }
    }
    fn u64_at(&self, off: usize) -> &AtomicU64 {
        debug_assert!(off % 8 == 0 && off + 8 <= self.0.len);
        // SAFETY: 8-aligned offset inside the 4 KiB mapping.
        unsafe { &*(self.0.ptr.add(off) as *const AtomicU64) }
    }
    fn owner(&self) -> u64 {
        self.u64_at(128).load(Ordering::Acquire)
    }
    /// Writer `from`'s side of its ack slot (one writer per slot: a seqlock).
    fn write_ack(&self, from: NodeId, view: u64, op: u64) {
        let base = ACKS + 64 * from as usize;
        let seq = self.u64_at(base).load(Ordering::Relaxed);
        // even → odd (a crashed writer may have left it odd)
        let seq = seq.wrapping_add(1 + (seq & 1));
        self.u64_at(base).store(seq, Ordering::Relaxed);
        fence(Ordering::Release);
        self.u64_at(base + 8).store(view, Ordering::Relaxed);
        self.u64_at(base + 16).store(op, Ordering::Relaxed);
        self.u64_at(base)
            .store(seq.wrapping_add(1), Ordering::Release);
    }
    /// The slot's `seq` (changes with every write).
    fn ack_seq(&self, from: usize) -> u64 {
        self.u64_at(ACKS + 64 * from).load(Ordering::Acquire)
    }
    /// A consistent `(seq, view, op)` of peer `from`'s slot, or None while it is being written.
    fn read_ack(&self, from: usize) -> Option<(u64, u64, u64)> {
        let base = ACKS + 64 * from;
        let s1 = self.u64_at(base).load(Ordering::Acquire);
        if s1 & 1 == 1 {
            return None;
        }
        let view = self.u64_at(base + 8).load(Ordering::Relaxed);
        let op = self.u64_at(base + 16).load(Ordering::Relaxed);
        fence(Ordering::Acquire);
        (self.u64_at(base).load(Ordering::Relaxed) == s1).then_some((s1, view, op))
    }

    /// Sender side (after publishing): if the owner sleeps, bump the word
    /// and wake it. An owner that does not sleep sees the ring itself.
    fn ring(&self) {
        // Pairs with the fence after the owner sets `sleeping`: either the
        // owner sees what we published, or we see that it sleeps.
        fence(Ordering::SeqCst);
        if self.sleeping().load(Ordering::SeqCst) != 0 {
            self.word().fetch_add(1, Ordering::SeqCst);
            // SAFETY: FUTEX_WAKE on a shared-memory word.
            unsafe {
                libc::syscall(
                    libc::SYS_futex,
                    self.word() as *const AtomicU32,
                    libc::FUTEX_WAKE,
                    // Every waiter: the doorbell thread and a recv() may both sleep on it.
                    i32::MAX,
                );
            }
        }
    }
    /// Owner side: sleep while the word still reads `seen`, up to `timeout`.
    fn wait(&self, seen: u32, timeout: Duration) {
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: FUTEX_WAIT on a shared-memory word with a relative timeout.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                self.word() as *const AtomicU32,
                libc::FUTEX_WAIT,
                seen,
                &ts as *const libc::timespec,
            );
        }
    }
}

struct Incoming {
    ring: Ring,
    _map: Mapping,
    path: PathBuf,
    /// The path as text, for notices.
    name: String,
}

struct Outgoing {
    ring: Ring,
    map: Mapping,
    bell: Option<Bell>,
    dirty: bool,
}

/// One replica's shm endpoint.
pub struct ShmTransport {
    opts: ShmOptions,
    incoming: Vec<Option<Incoming>>,
    outgoing: Vec<Option<Outgoing>>,
    bell: Bell,
    bell_path: PathBuf,
    notices: Vec<TransportEvent>,
    buf: Vec<u8>,
    /// Where `send` encodes (kept between calls).
    scratch: Vec<u8>,
    last_check: Instant,
    /// The view this replica follows (its owner word); log writes of older views are refused.
    granted: u64,
    /// Per peer: the ack-slot `seq` last taken.
    acks_seen: Vec<u64>,
    /// Why the ring to each peer could not be used, as last said (said
    /// again only when it changes).
    connect_errors: Vec<Option<String>>,
    /// Per peer: the owner word last reported as fencing us (one notice per change).
    fenced_by: Vec<u64>,
    /// Log writes refused by fencing, as writer and as reader.
    revoked: u64,
}

fn ring_path(dir: &Path, from: NodeId, to: NodeId) -> PathBuf {
    dir.join(format!("ring-{from}-{to}"))
}

fn bell_path(dir: &Path, id: NodeId) -> PathBuf {
    dir.join(format!("bell-{id}"))
}

impl ShmTransport {
    /// Creates this replica's rings (one per peer writing to it) and doorbell.
    pub fn bind(opts: ShmOptions) -> std::io::Result<ShmTransport> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        match std::fs::DirBuilder::new().mode(0o700).create(&opts.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        // Whoever owns the directory could swap the rings: it must be ours, and closed.
        let meta = std::fs::symlink_metadata(&opts.dir)?;
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if !meta.is_dir() || meta.uid() != me || meta.permissions().mode() & 0o077 != 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "{}: must be a directory owned by this user with mode 0700 (it holds the cluster's rings)",
                    opts.dir.display()
                ),
            ));
        }
        // The doorbell first: a sender that finds a ring finds its bell.
        let bell_path = bell_path(&opts.dir, opts.id);
        let bell = Bell(Mapping::create(&bell_path, 4096, |_| {})?);
        let ring_len = HEADER + opts.ring_bytes.next_power_of_two();
        let incarnation = crate::log::now_ns() ^ u64::from(std::process::id());
        let mut incoming = Vec::new();
        for from in 0..opts.n {
            if from == opts.id {
                incoming.push(None);
                continue;
            }
            let path = ring_path(&opts.dir, from, opts.id);
            let mut ring = None;
            let map = Mapping::create(&path, ring_len, |m| {
                // SAFETY: a fresh mapping no other process sees before the rename.
                ring = Some(unsafe { Ring::init(m.ptr, m.len, incarnation) });
            })?;
            let ring = ring.expect("initialised");
            incoming.push(Some(Incoming {
                ring,
                _map: map,
                name: path.display().to_string(),
                path,
            }));
        }
        Ok(ShmTransport {
            outgoing: (0..opts.n).map(|_| None).collect(),
            incoming,
            bell,
            bell_path,
            notices: Vec::new(),
            buf: Vec::new(),
            scratch: Vec::new(),
            last_check: Instant::now(),
            granted: 0,
            acks_seen: vec![0; opts.n as usize],
            connect_errors: vec![None; opts.n as usize],
            fenced_by: vec![0; opts.n as usize],
            revoked: 0,
            opts,
        })
    }

    /// Maps the ring to `to` when it exists (again, if `to` restarted).
    fn connect(&mut self, to: usize) {
        let path = ring_path(&self.opts.dir, self.opts.id, to as NodeId);
        let ino = std::fs::metadata(&path).map(|m| m.ino()).ok();
        if let Some(o) = &mut self.outgoing[to] {
            if Some(o.map.ino) == ino {
                // The same ring; its bell may have been missing or replaced.
                let bell_path = bell_path(&self.opts.dir, to as NodeId);
                let bell_ino = std::fs::metadata(&bell_path).map(|m| m.ino()).ok();
                if o.bell.as_ref().map(|b| b.0.ino) != bell_ino {
                    o.bell = Mapping::map(&bell_path).ok().map(Bell);
                }
                return;
            }
            self.outgoing[to] = None;
            self.notices.push(TransportEvent::Lost {
                peer: to as NodeId,
                reason: "it restarted (new ring)".into(),
            });
        }
        let Some(_) = ino else {
            return;
        };
        let map = match Mapping::map(&path) {
            Ok(map) => map,
            Err(e) => return self.connect_failed(to, &path, format!("cannot map it: {e}")),
        };
        // SAFETY: the file is a ring its owner initialised before renaming it into place.
        let ring = match unsafe { Ring::open(map.ptr, map.len) } {
            Ok(ring) => ring,
            Err(e) => return self.connect_failed(to, &path, e.to_string()),
        };
        self.connect_errors[to] = None;
        let bell = Mapping::map(&bell_path(&self.opts.dir, to as NodeId))
            .ok()
            .map(Bell);
        self.outgoing[to] = Some(Outgoing {
            ring,
            map,
            bell,
            dirty: false,
        });
        self.notices.push(TransportEvent::Connected {
            peer: to as NodeId,
            incoming: false,
        });
    }

    /// The ring to peer `to` at `path` cannot be used (tried again every
    /// 100 ms): said once, and again when the reason changes.
    fn connect_failed(&mut self, to: usize, path: &Path, why: String) {
        if self.connect_errors[to].as_deref() != Some(why.as_str()) {
            self.notices.push(TransportEvent::Refused {
                addr: path.display().to_string(),
                reason: format!("the ring to replica index {to}: {why}"),
            });
            self.connect_errors[to] = Some(why);
        }
    }

    fn check_peers(&mut self) {
        if self.last_check.elapsed() < Duration::from_millis(100)
            && self
                .outgoing
                .iter()
                .enumerate()
                .all(|(i, o)| o.is_some() || i == self.opts.id as usize)
        {
            return;
        }
        self.last_check = Instant::now();
        for to in 0..self.opts.n as usize {
            if to != self.opts.id as usize {
                self.connect(to);
            }
        }
    }

    /// Takes every published message; true if any arrived.
    fn drain(&mut self, out: &mut Vec<Envelope>) -> bool {
        let mut any = false;
        for from in 0..self.incoming.len() {
            let Some(inc) = self.incoming[from].as_mut() else {
                continue;
            };
            let check = super::RingCheck {
                cluster: self.opts.cluster_id,
                from: from as NodeId,
                me: self.opts.id,
                granted: self.granted,
                addr: &inc.name,
            };
            any |= super::drain_ring(
                &mut inc.ring,
                &mut self.buf,
                &check,
                out,
                &mut self.notices,
                &mut self.revoked,
            );
        }
        any
    }

    /// Takes the acknowledgements followers wrote into our ack slots.
    fn take_acks(&mut self, out: &mut Vec<Envelope>) -> bool {
        let mut any = false;
        for from in 0..self.opts.n as usize {
            if from == self.opts.id as usize || self.bell.ack_seq(from) == self.acks_seen[from] {
                continue;
            }
            // A slot caught mid-write is read on the next turn (its bell rings again).
            if let Some((seq, view, op)) = self.bell.read_ack(from) {
                self.acks_seen[from] = seq;
                out.push(Envelope {
                    cluster: self.opts.cluster_id,
                    from: from as NodeId,
                    to: self.opts.id,
                    msg: Message::PrepareOk { view, op },
                });
                any = true;
            }
        }
        any
    }

    fn any_ready(&self) -> bool {
        // An ack slot counts once its write is whole (an even seq): one a
        // follower left odd when it died mid-write is nothing to read, and
        // must not keep this loop from sleeping until it comes back.
        self.incoming.iter().flatten().any(|i| i.ring.ready())
            || (0..self.opts.n as usize).any(|p| {
                let seq = self.bell.ack_seq(p);
                p != self.opts.id as usize && seq & 1 == 0 && seq != self.acks_seen[p]
            })
    }

    /// Log writes refused so far because their view was fenced off (by this
    /// replica as a reader, or by a follower's owner word as a writer).
    pub fn revoked(&self) -> u64 {
        self.revoked
    }

    /// Blocks until a message may be there (or `timeout`), as `poll` says.
    pub fn wait(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        if super::spin(self.opts.poll, self.opts.spin, timeout, || self.any_ready()).is_some() {
            return;
        }
        let seen = self.bell.word().load(Ordering::Acquire);
        self.bell.sleeping().store(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if !self.any_ready() {
            let left = deadline.saturating_duration_since(Instant::now());
            if !left.is_zero() {
                self.bell.wait(seen, left);
            }
        }
        self.bell.sleeping().store(0, Ordering::SeqCst);
    }

    /// Starts a thread that sleeps on this replica's doorbell and calls
    /// `wake` whenever a sender rang it, so an event loop that waits on
    /// something else (epoll) learns of messages: the loop calls
    /// [`Transport::before_sleep`] before it sleeps, which makes senders ring.
    /// It ends when `wake` returns false.
    pub fn spawn_bell_watcher(
        &self,
        wake: impl Fn() -> bool + Send + 'static,
    ) -> std::io::Result<()> {
        let bell = Bell(Mapping::map(&self.bell_path)?);
        std::thread::Builder::new()
            .name("falcon-shm-bell".into())
            .spawn(move || {
                // `last` survives the loop: a ring that comes while `wake`
                // runs changes the word from it and is reported next round.
                let mut last = bell.word().load(Ordering::Acquire);
                loop {
                    // The event loop sets `sleeping` before it sleeps
                    // (before_sleep): only then do senders bump the word.
                    bell.wait(last, Duration::from_millis(50));
                    let now = bell.word().load(Ordering::Acquire);
                    if now != last {
                        last = now;
                        if !wake() {
                            return;
                        }
                    }
                }
            })?;
        Ok(())
    }
}

impl Drop for ShmTransport {
    fn drop(&mut self) {
        for inc in self.incoming.iter().flatten() {
            let _ = std::fs::remove_file(&inc.path);
        }
        let _ = std::fs::remove_file(&self.bell_path);
        // The last replica out removes the directory (it fails while others use it).
        let _ = std::fs::remove_dir(&self.opts.dir);
    }
}

impl Transport for ShmTransport {
    fn send(&mut self, env: &Envelope) -> Result<(), SendError> {
        let to = env.to as usize;
        if to >= self.opts.n as usize || to == self.opts.id as usize {
            return Err(SendError::UnknownPeer(env.to));
        }
        if self.outgoing[to].is_none() {
            self.connect(to);
        }
        let Some(o) = self.outgoing[to].as_mut() else {
            return Err(SendError::Down(env.to));
        };
        if let Some(bell) = &o.bell {
            if super::is_log_write(&env.msg) {
                let owner = bell.owner();
                if !super::owner_admits(owner, env.msg.view(), self.opts.id) {
                    self.revoked += 1;
                    if self.fenced_by[to] != owner {
                        self.fenced_by[to] = owner;
                        self.notices.push(TransportEvent::Lost {
                            peer: env.to,
                            reason: format!(
                                "it follows view {} now: log writes of view {} are refused",
                                owner >> 8,
                                env.msg.view()
                            ),
                        });
                    }
                    return Err(SendError::Revoked(env.to));
                }
            }
            if let Message::PrepareOk { view, op } = env.msg {
                // One-sided: straight into the leader's ack slot.
                bell.write_ack(self.opts.id, view, op);
                o.dirty = true;
                return Ok(());
            }
        }
        let mut bytes = std::mem::take(&mut self.scratch);
        bytes.clear();
        message::encode(env, &mut bytes);
        let sent = o.ring.send(env.to, &bytes);
        if bytes.capacity() <= 1 << 20 {
            self.scratch = bytes; // reused: no allocation per message
        }
        sent?;
        o.dirty = true;
        Ok(())
    }

    fn flush(&mut self) {
        for o in self.outgoing.iter_mut().flatten() {
            if o.dirty {
                o.dirty = false;
                o.ring.publish();
                if let Some(b) = &o.bell {
                    b.ring();
                }
            }
        }
    }

    fn recv(&mut self, timeout: Duration, out: &mut Vec<Envelope>) -> std::io::Result<()> {
        self.flush();
        self.check_peers();
        let acks = self.take_acks(out);
        if !self.drain(out) && !acks && !timeout.is_zero() {
            self.wait(timeout);
            self.take_acks(out);
            self.drain(out);
        }
        Ok(())
    }

    fn grant(&mut self, view: u64, leader: Option<NodeId>) {
        self.granted = self.granted.max(view);
        let word = view << 8 | leader.map_or(0, |l| u64::from(l) + 1);
        self.bell.u64_at(128).store(word, Ordering::Release);
    }

    fn before_sleep(&mut self) -> bool {
        self.bell.sleeping().store(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if self.any_ready() {
            self.bell.sleeping().store(0, Ordering::SeqCst);
            return false;
        }
        true
    }

    fn after_sleep(&mut self) {
        self.bell.sleeping().store(0, Ordering::SeqCst);
    }

    fn events(&mut self) -> Vec<TransportEvent> {
        std::mem::take(&mut self.notices)
    }

    fn id(&self) -> NodeId {
        self.opts.id
    }
}
