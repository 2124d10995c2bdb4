//! What a replica does with divergence detection (see [`super::divergence`]):
//! hashes its program's output, proposes the hashes when it leads, compares
//! the leader's when it follows, marks itself diverged — and rebuilds its
//! program from the log on `falcon failover resync`.

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::divergence::{Chunk, Counts, Mismatch};
use super::{ANSWER_WAIT, Node, NodeError, Snapshotting};
use crate::admin::{Diverged, ResyncProgress, ResyncReport, refusal};
use crate::consensus::{Event, Role};
use crate::log::{Entry, Kind, now_ns};
use crate::output::Ui;
use crate::snapshot;

/// The mark's file in the data dir.
const MARK_FILE: &str = "diverged.json";
/// Entries read from the log at a time while rebuilding.
pub(super) const RESYNC_BATCH: usize = 1024;
/// Bytes of entries read at a time while rebuilding.
pub(super) const RESYNC_BATCH_BYTES: usize = 4 << 20;
/// How long a rebuild waits, at its end, for the program to close
/// connections it was told to close (their last chunks are compared then).
const RESYNC_SETTLE: Duration = Duration::from_secs(2);
/// How long a resync waits for the leader's snapshot.
const RESYNC_FETCH_MAX: Duration = Duration::from_secs(300);
/// A replica hands the leadership on (diverged, or rebuilding) at most this often.
pub(super) const HAND_OFF_EVERY: Duration = Duration::from_secs(30);
/// Mismatches after the first are logged at most this often.
const MISMATCH_LOG_EVERY: Duration = Duration::from_secs(10);

/// A rebuild of the program from the log, under way.
pub(super) struct Resync {
    /// The leader's snapshot is on its way: the program runs on meanwhile.
    fetching: bool,
    /// The rebuild is to begin on the loop's next turn (from this snapshot
    /// file, or None: from the initial state), not while the admin socket
    /// waits for an answer.
    pending: Option<Option<std::path::PathBuf>>,
    /// What the program is rebuilt from (for the report).
    source: &'static str,
    /// The next op to read from the log.
    next: u64,
    /// The last op delivered (committed) so far: the rebuild ends there.
    upto: u64,
    /// The op the program was rebuilt from.
    base: u64,
    started: Instant,
    started_ns: u64,
    /// The counts when the program was rebuilt (when it began, until then).
    counts: Counts,
    first: Option<Mismatch>,
    /// When everything was handed to the program.
    drained: Option<Instant>,
    pb: indicatif::ProgressBar,
}

impl Resync {
    /// A resync from `source` at op `base`; `pending`: the rebuild to run
    /// on the next turn (None: the leader's snapshot is fetched first).
    fn new(
        source: &'static str,
        base: u64,
        pending: Option<Option<std::path::PathBuf>>,
        started_ns: u64,
        counts: Counts,
    ) -> Resync {
        Resync {
            fetching: pending.is_none(),
            pending,
            source,
            next: 0,
            upto: 0,
            base,
            started: Instant::now(),
            started_ns,
            counts,
            first: None,
            drained: None,
            pb: indicatif::ProgressBar::hidden(),
        }
    }

    /// Ends it: the report, with what was compared since it began.
    fn finish(
        self,
        source: String,
        ops: (u64, u64),
        now: Counts,
        first_mismatch: Option<Mismatch>,
    ) -> ResyncReport {
        self.pb.finish_and_clear();
        ResyncReport {
            started_ns: self.started_ns,
            source,
            from_op: ops.0,
            to_op: ops.1,
            seconds: self.started.elapsed().as_secs_f64(),
            compared: now.compared - self.counts.compared,
            mismatches: now.mismatches - self.counts.mismatches,
            first_mismatch,
        }
    }

    pub(super) fn fetching(&self) -> bool {
        self.fetching
    }

    /// Committed entries arrived: they are in the log, read in their turn.
    pub(super) fn delivered(&mut self, entries: &[Entry]) {
        if let Some(e) = entries.last() {
            self.upto = self.upto.max(e.op);
        }
    }

    pub(super) fn progress(&self, applied: u64) -> ResyncProgress {
        ResyncProgress {
            done: applied.saturating_sub(self.base),
            total: self.upto.saturating_sub(self.base),
            started_ns: self.started_ns,
        }
    }
}

/// Reads the divergence mark of an earlier run, if any.
pub(super) fn load_mark(data_dir: &Path, ui: &Ui) -> Option<Diverged> {
    let path = data_dir.join(MARK_FILE);
    // Only a mark that is not there means none: one that cannot be read
    // may well be there.
    let why = match std::fs::read_to_string(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => format!("cannot be read: {e}"),
        Ok(text) => match serde_json::from_str(&text) {
            Ok(d) => return Some(d),
            Err(e) => format!("is not a divergence mark: {e}"),
        },
    };
    ui.warn(&format!(
        "{} {why}; taken as a mark anyway: resync the replica to clear it",
        path.display()
    ));
    Some(Diverged {
        mismatch: Mismatch {
            conn: 0,
            offset: 0,
            end: 0,
            chunk: 0,
            what: format!("unreadable mark in {}", path.display()),
        },
        op: u64::MAX,
        leader: 0,
        at_ns: 0,
    })
}

impl Node<'_> {
    /// The program wrote `bytes` on `conn`, and then (`end`) closed it —
    /// cleanly (`Some(true)`) or not. Hashes it; the leader proposes the
    /// completed chunks, a follower compares them.
    pub(super) fn program_output(&mut self, conn: u64, bytes: &[u8], end: Option<bool>) {
        if !self.digests.on() {
            return;
        }
        let leading = self.role == Role::Leader;
        let (mut chunks, mut mismatches) = (Vec::new(), Vec::new());
        if !bytes.is_empty() {
            self.digests
                .output(conn, bytes, !leading, &mut chunks, &mut mismatches);
        }
        if let Some(clean) = end {
            self.digests
                .end(conn, clean, !leading, &mut chunks, &mut mismatches);
        }
        // While the program is rebuilt, its output is history; a diverged
        // copy's output is not the truth: nothing to propose either way.
        if leading && self.resync.is_none() && self.diverged.is_none() {
            for c in chunks {
                self.proposals.push(Event {
                    kind: Kind::Digest,
                    conn: c.conn,
                    payload: Bytes::from(c.encode()),
                });
            }
        }
        self.mismatched(mismatches);
    }

    /// A committed `Digest` entry: the leader's hash of its program's output.
    pub(super) fn leader_digest(&mut self, e: &Entry) {
        if self.role == Role::Leader && e.view == self.engine.view() {
            // Our own, proposed in this view.
            return;
        }
        let Some(theirs) = Chunk::decode(e.conn, &e.payload) else {
            self.ui.warn(&format!(
                "op {}: a digest entry of {} bytes that cannot be read; not compared",
                e.op,
                e.payload.len()
            ));
            return;
        };
        let told = self.digests.other_chunk_size.is_some();
        let mut mismatches = Vec::new();
        self.digests.leader(theirs, &mut mismatches);
        if let (false, Some(size)) = (told, self.digests.other_chunk_size) {
            self.ui.warn(&format!(
                "the leader hashes its program's output in chunks of {size} bytes, this replica in chunks of {}: nothing can be compared (divergence_chunk must be the same in every replica's cluster file)",
                self.digests.chunk()
            ));
        }
        self.mismatched(mismatches);
    }

    /// This replica's output differs from the leader's: say so (once in
    /// full, then counted), mark the replica, run the hook.
    fn mismatched(&mut self, mismatches: Vec<Mismatch>) {
        let Some(first) = mismatches.first().cloned() else {
            return;
        };
        if let Some(r) = &mut self.resync {
            r.first.get_or_insert_with(|| first.clone());
        }
        let me = self.ids[self.me as usize];
        if self.diverged.is_some() {
            let (said, unsaid) = self.mismatch_said.get_or_insert((Instant::now(), 0));
            *unsaid += mismatches.len() as u64;
            if said.elapsed() >= MISMATCH_LOG_EVERY {
                self.ui.warn(&format!(
                    "divergence: {} more chunks of replica {me}'s program output differed from the leader's (latest: {first})",
                    *unsaid
                ));
                self.mismatch_said = Some((Instant::now(), 0));
            }
            return;
        }
        let leader = self.ids[self.engine.leader() as usize];
        let mark = Diverged {
            mismatch: first.clone(),
            op: self.applied_op,
            leader,
            at_ns: now_ns(),
        };
        let text = format!(
            "divergence: replica {me}'s copy of the program wrote other bytes than the leader's (replica {leader}) on {first}; found at op {}. The leader's copy is the truth: this replica keeps following, `falcon failover transfer` will not make it leader without --force, and `falcon failover resync --node {me}` rebuilds it",
            self.applied_op
        );
        self.ui.error(&text);
        let path = self.data_dir.join(MARK_FILE);
        // Durable: a mark lost in a power cut would let this copy lead.
        let bytes = serde_json::to_vec_pretty(&mark).expect("serializes");
        if let Err(e) = super::write_durably(&self.data_dir, MARK_FILE, &bytes) {
            self.ui.warn(&format!(
                "could not write the divergence mark {} ({e}): a restart forgets it",
                path.display()
            ));
        }
        self.diverged = Some(mark);
        self.mismatch_said = Some((Instant::now(), mismatches.len() as u64 - 1));
        if let Some(cmd) = self.on_divergence.clone() {
            let (conn, offset, chunk, op) = (
                first.conn.to_string(),
                first.offset.to_string(),
                first.chunk.to_string(),
                self.applied_op.to_string(),
            );
            let spawned = self
                .hooks_env
                .command(
                    &cmd,
                    &[
                        ("FALCON_CONN", conn.as_ref()),
                        ("FALCON_OFFSET", offset.as_ref()),
                        ("FALCON_CHUNK", chunk.as_ref()),
                        ("FALCON_OP", op.as_ref()),
                        ("FALCON_DIVERGENCE", text.as_ref()),
                    ],
                )
                .spawn();
            match spawned {
                Ok(child) => self.hook_children.push(child),
                Err(e) => self
                    .ui
                    .error(&format!("running the --on-divergence hook {cmd:?}: {e}")),
            }
        }
    }

    /// This replica was elected leader although its program diverged: it
    /// hands the leadership to the next replica it has a link to (its copy
    /// must not become the one the others are compared with).
    pub(super) fn hand_off_diverged(&mut self, view: u64) -> Result<(), NodeError> {
        let me = self.ids[self.me as usize];
        let why = if self.diverged.is_some() {
            "its program diverged from the cluster's"
        } else {
            "it is rebuilding its program"
        };
        if self
            .handed_off
            .is_some_and(|t| t.elapsed() < HAND_OFF_EVERY)
        {
            // Two replicas that both refuse would pass it back and forth.
            self.ui.error(&format!(
                "replica {me} leads view {view} although {why}; it handed the leadership on less than {} s ago and keeps it now",
                HAND_OFF_EVERY.as_secs()
            ));
            return Ok(());
        }
        if self.hand_off(view, why)? {
            self.handed_off = Some(Instant::now());
        }
        Ok(())
    }

    /// This replica leads view `view` but should not (`why`): it hands the
    /// leadership to the replica it has a link to that holds the most of
    /// the log (the nearest after it among equals). False, said as an
    /// error, when it has a link to none.
    pub(super) fn hand_off(&mut self, view: u64, why: &str) -> Result<bool, NodeError> {
        let me = self.ids[self.me as usize];
        let n = self.ids.len();
        let target = (1..n)
            .map(|k| (self.me as usize + k) % n)
            .filter(|&i| self.observed.peers[i] > 0)
            .rev()
            .max_by_key(|&i| self.engine.acked(i as crate::consensus::NodeId));
        match target {
            Some(i) => {
                self.ui.warn(&format!(
                    "replica {me} leads view {view}, but {why}: handing the leadership to replica {} (clients wait meanwhile)",
                    self.ids[i]
                ));
                self.observed.transfer_started_ns = Some(now_ns());
                self.step(crate::consensus::Input::TransferLeadership {
                    to: i as crate::consensus::NodeId,
                })?;
                Ok(true)
            }
            None => {
                self.ui.error(&format!(
                    "replica {me} leads view {view} although {why}, and no other replica is reachable to take over: it keeps the leadership"
                ));
                Ok(false)
            }
        }
    }

    /// Clears the mark: the program's copy is rebuilt and matched.
    fn clear_mark(&mut self) {
        self.diverged = None;
        self.mismatch_said = None;
        let _ = std::fs::remove_file(self.data_dir.join(MARK_FILE));
    }

    /// Everything handed to the program was answered (or closed), or
    /// `since` is long enough ago: its output has been compared.
    fn settled(&self, since: Instant) -> bool {
        let drained = self.apply_queue.is_empty()
            && self
                .awaiting_answer
                .is_none_or(|t| t.elapsed() >= ANSWER_WAIT)
            && self.apps.values().all(|a| a.out.is_empty())
            && self.mux.as_ref().is_none_or(|m| m.owed() == 0);
        drained
            && (self.apps.values().all(|a| a.shut.is_none()) || since.elapsed() >= RESYNC_SETTLE)
    }

    /// The replay at start handed the program its last entry: once the
    /// program's output is in, if this replica was marked diverged and the
    /// replay rebuilt its program from the initial state without a
    /// difference, the mark goes. (Not from a snapshot: one taken while the
    /// divergence was not visible yet may hold it.)
    fn check_replayed(&mut self) {
        let Some(since) = self.replay_done else {
            return;
        };
        if !self.settled(since) {
            return;
        }
        self.replay_done = None;
        if self.diverged.is_some()
            && self.digests.on()
            && self.digests.counts.mismatches == 0
            && self.replay_base == 0
        {
            self.ui.note(&format!(
                "the replay rebuilt the program from its initial state and its output matched the leader's at {} chunks: the divergence mark is cleared",
                self.digests.counts.compared
            ));
            self.clear_mark();
        }
    }

    /// The engine installed the leader's snapshot (this replica was too far
    /// behind): the program's state is the leader's now. A resync under way
    /// is done by that, and the divergence mark goes.
    pub(super) fn superseded_by_snapshot(&mut self, op: u64) {
        if let Some(r) = self.resync.take() {
            self.last_resync = Some(r.finish(
                "leader's snapshot (installed to catch up)".into(),
                (op, op),
                self.digests.counts,
                None,
            ));
        }
        if self.diverged.is_some() {
            self.ui.note(&format!(
                "the program was restored from the leader's snapshot at op {op}: the divergence mark is cleared"
            ));
            self.clear_mark();
        }
    }

    /// Ends the resync under way as failed, saying why; an engine fetch
    /// held back for it goes now.
    pub(super) fn fail_resync(&mut self, why: &str) -> Result<(), NodeError> {
        self.ui.error(&format!("resync: {why}"));
        if let Some(r) = self.resync.take() {
            self.last_resync =
                Some(r.finish(format!("failed: {why}"), (0, 0), self.digests.counts, None));
        }
        self.after_resync_fetch()
    }

    /// The resync's own fetch is over: the engine's, if it asked meanwhile.
    fn after_resync_fetch(&mut self) -> Result<(), NodeError> {
        if let Some((from, op)) = self.deferred_fetch.take() {
            self.start_fetch(from, op)?;
        }
        Ok(())
    }

    /// `falcon failover resync`: starts rebuilding the program — from the
    /// leader's snapshot covering `leader_snapshot` (fetched first), or from
    /// the initial state — then replays the log after it.
    pub(super) fn start_resync(
        &mut self,
        leader_snapshot: Option<u64>,
    ) -> Result<serde_json::Value, NodeError> {
        let me = self.ids[self.me as usize];
        if self.app.is_none() || self.framed || self.vm.is_some() {
            return Ok(refusal(format!(
                "replica {me} has no program of its own to rebuild (tap-attach or --null-program)"
            )));
        }
        if self.role != Role::Follower {
            return Ok(refusal(if self.role == Role::Leader {
                format!(
                    "replica {me} leads: its program's copy is the one the others are compared with; hand the leadership to another replica first (falcon failover transfer)"
                )
            } else {
                format!("replica {me} is changing views; try again in a moment")
            }));
        }
        if self.resync.is_some() {
            return Ok(refusal(format!(
                "replica {me} is already rebuilding its program"
            )));
        }
        if !matches!(self.snapshotting, Snapshotting::Idle)
            || self.packing.is_some()
            || self.fetch.is_some()
            || self.install.is_some()
        {
            return Ok(refusal(format!(
                "replica {me} is taking or installing a snapshot; try again when it is done"
            )));
        }
        let started_ns = now_ns();
        if let Some(need) = leader_snapshot {
            if self.restore_cmd.is_none() {
                return Ok(refusal(format!(
                    "replica {me} has no --restore-cmd: it cannot install the leader's snapshot (resync from the log instead)"
                )));
            }
            let leader = self.engine.leader();
            // No room for the snapshot here (or another disk error): the
            // operator hears why; the replica goes on as it was.
            if let Err(e) = self.start_fetch(leader, need) {
                return Ok(refusal(format!(
                    "replica {me} cannot fetch the leader's snapshot: {e}"
                )));
            }
            self.resync = Some(Resync::new(
                "leader's snapshot",
                0,
                None,
                started_ns,
                self.digests.counts,
            ));
            return Ok(serde_json::json!({"ok": true, "fetching": need, "started_ns": started_ns}));
        }
        // From the log: only the whole of it. This replica's own snapshot
        // may have been taken while the divergence was not visible yet.
        let first = self.log.first_op();
        if first > 1 {
            return Ok(refusal(format!(
                "replica {me}'s log starts at op {first} (the ops before are only in its own snapshot, which may hold the divergence): rebuild it from the leader's snapshot (falcon failover resync --from leader: --snapshot-cmd on the leader, --restore-cmd here)"
            )));
        }
        self.resync = Some(Resync::new(
            "initial state",
            0,
            Some(None),
            started_ns,
            self.digests.counts,
        ));
        Ok(serde_json::json!({"ok": true, "from": 0, "started_ns": started_ns}))
    }

    /// The leader's snapshot arrived for a resync: rebuild from it.
    pub(super) fn resync_from(&mut self, path: std::path::PathBuf) -> Result<(), NodeError> {
        let result = snapshot::read_meta(&path)
            .map_err(|e| NodeError::Snapshot(e.to_string()))
            .and_then(|meta| {
                if self.log.first_op() > meta.op + 1 {
                    return Err(NodeError::Snapshot(format!(
                        "the leader's snapshot covers ops up to {}, but this replica's log starts at op {}: the ops between are nowhere here",
                        meta.op,
                        self.log.first_op()
                    )));
                }
                if let Some(r) = &mut self.resync {
                    r.fetching = false;
                    r.base = meta.op;
                }
                self.rebuild(Some(&path))
            });
        let _ = std::fs::remove_file(&path);
        match result {
            // The replica goes on as it was (or, if its program is down now,
            // the loop sees it exit); the operator sees why.
            Err(e) => self.fail_resync(&e.to_string()),
            Ok(()) => self.after_resync_fetch(),
        }
    }

    /// Stops the program, brings it to the resync's base (the reset hook,
    /// or the restore hook on `snapshot`), starts it again and sets the
    /// replay of the log after the base going.
    fn rebuild(&mut self, snapshot_file: Option<&Path>) -> Result<(), NodeError> {
        let me = self.ids[self.me as usize];
        let base = self.resync.as_ref().map_or(0, |r| r.base);
        // The replay at start, if still going, becomes part of this one.
        let replaying = self.log_replay.take().map_or(0, |r| r.upto);
        let upto = self
            .apply_queue
            .back()
            .map_or(self.applied_op, |e| e.op)
            .max(self.applied_op)
            .max(replaying);
        let source = self.resync.as_ref().map_or("", |r| r.source);
        self.ui.note(&format!(
            "resync: replica {me} rebuilds its program from {} and replays ops {}..={upto} of its log",
            if base == 0 {
                "its initial state".to_string()
            } else {
                format!("the {source} at op {base}")
            },
            base + 1
        ));
        self.stop_program();
        // The report covers the rebuilt copy only: what the old one wrote
        // while the leader's snapshot was on its way is not its doing.
        let counts = self.digests.counts;
        if let Some(r) = &mut self.resync {
            let during = counts.mismatches - r.counts.mismatches;
            if during > 0 {
                self.ui.note(&format!(
                    "resync: {during} chunks of the old copy's output differed from the leader's while the snapshot travelled; they are not counted as the rebuilt copy's"
                ));
            }
            r.counts = counts;
            r.first = None;
        }
        let mut open_at_base = Vec::new();
        let mut resp_state = Vec::new();
        let mut problem = None;
        match snapshot_file {
            None => {
                if let Some(cmd) = self.reset_cmd.clone() {
                    self.hooks_env.run("--reset-cmd", &cmd, &[])?;
                }
            }
            Some(file) => {
                let cmd = self.restore_cmd.clone().expect("checked");
                let meta = self.hooks_env.restore(&cmd, file)?;
                open_at_base = meta.open_conns;
                resp_state = meta.resp_state;
                problem = meta.resp_state_problem;
            }
        }
        let pid = self.start_program_at(base, &open_at_base)?;
        self.import_resp_state(&resp_state, problem.as_deref());
        self.own_base(snapshot_file, base)?;
        self.ui
            .detail(&format!("started the program again (pid {pid})"));
        // The program's restart kept the loop from the leader's heartbeats.
        self.step(crate::consensus::Input::Stalled)?;
        let pb = self.ui.progress_with(
            upto.saturating_sub(base),
            "{msg} [{bar:40}] {pos}/{len} entries eta {eta}",
            "resync: replaying the log",
        );
        if let Some(r) = &mut self.resync {
            r.next = base + 1;
            // Deliveries since the resync began raised it already.
            r.upto = r.upto.max(upto);
            r.pb = pb;
        }
        Ok(())
    }

    /// The rebuilt program's base becomes this replica's own: the leader's
    /// snapshot replaces this replica's (which may hold the divergence),
    /// or, rebuilt from the initial state, this replica keeps none, so that
    /// a restart does not bring the diverged copy back.
    fn own_base(&mut self, snapshot_file: Option<&Path>, base: u64) -> Result<(), NodeError> {
        let own = self.snapshot_path();
        let done = match snapshot_file {
            Some(file) => std::fs::rename(file, &own),
            None => std::fs::remove_file(&own).or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            }),
        };
        done.and_then(|()| std::fs::File::open(&self.data_dir)?.sync_all())
            .map_err(|e| NodeError::Io {
                context: format!("putting the resync's base in place as {}", own.display()),
                source: e,
            })?;
        self.snapshot_op = if snapshot_file.is_some() { base } else { 0 };
        self.next_snapshot_at = base + self.snapshot_every;
        Ok(())
    }

    /// `falcon failover resync --from leader` asks the leader for a fresh snapshot.
    pub(super) fn snapshot_now(&mut self) -> serde_json::Value {
        let me = self.ids[self.me as usize];
        if self.snapshot_cmd.is_none() {
            return refusal(format!("replica {me} has no --snapshot-cmd"));
        }
        if self.diverged.is_some() {
            return refusal(format!(
                "replica {me}'s program diverged from the leader's: no snapshot of it"
            ));
        }
        if matches!(self.snapshotting, Snapshotting::Idle) {
            self.next_snapshot_at = self.applied_op;
        }
        serde_json::json!({"ok": true, "op": self.applied_op})
    }

    /// Hands the program the next entries of the log while a resync runs,
    /// and ends it when the program has had them all.
    pub(super) fn feed_resync(&mut self) -> Result<(), NodeError> {
        self.check_replayed();
        if let Some(snap) = self.resync.as_mut().and_then(|r| r.pending.take()) {
            if let Err(e) = self.rebuild(snap.as_deref()) {
                return self.fail_resync(&e.to_string());
            }
        }
        // (A source that went silent or stopped leading gives the download
        // up in the loop, as every download: `drop_fetch` fails the resync.)
        if let Some(r) = self.resync.as_ref().filter(|r| r.fetching) {
            if r.started.elapsed() >= RESYNC_FETCH_MAX {
                let why = format!(
                    "the leader's snapshot did not arrive within {} s",
                    RESYNC_FETCH_MAX.as_secs()
                );
                return if self.fetch.is_some() {
                    self.drop_fetch(&why, false)
                } else {
                    self.fail_resync(&why)
                };
            }
            if self.fetch.is_none() && self.install.is_none() {
                return self.fail_resync("the snapshot received from the leader was not usable");
            }
        }
        let Some(r) = self.resync.as_mut().filter(|r| !r.fetching) else {
            return Ok(());
        };
        let last = r.upto.min(self.log.last_op());
        self.apply_queue
            .fill_from_log(&self.log, &self.limits, &mut r.next, last)?;
        r.pb.set_length(r.upto.saturating_sub(r.base));
        r.pb.set_position(self.applied_op.saturating_sub(r.base));
        let all_read = r.next > r.upto;
        self.pump_apply();
        let Some(r) = &mut self.resync else {
            return Ok(());
        };
        if !all_read {
            r.drained = None;
            return Ok(());
        }
        let since = *r.drained.get_or_insert_with(Instant::now);
        // Connections told to close: their last chunks come when the program closes them.
        if !self.settled(since) {
            return Ok(());
        }
        let r = self.resync.take().expect("checked");
        let (source, ops, first) = (r.source.into(), (r.base, self.applied_op), r.first.clone());
        let report = r.finish(source, ops, self.digests.counts, first);
        let me = self.ids[self.me as usize];
        if report.mismatches == 0 {
            self.ui.note(&format!(
                "resync: replica {me} rebuilt its program from the {} and replayed ops {}..={} in {:.1} s; {} chunks of its output compared with the leader's, all equal{}",
                report.source,
                report.from_op + 1,
                report.to_op,
                report.seconds,
                report.compared,
                if self.diverged.is_some() {
                    ": the divergence mark is cleared"
                } else {
                    ""
                }
            ));
            self.clear_mark();
        } else {
            self.ui.error(&format!(
                "resync: replica {me}'s rebuilt program still writes other bytes than the leader's ({} of {} chunks; first: {}): the program is not deterministic for this input (see the README on divergence)",
                report.mismatches,
                report.compared,
                report
                    .first_mismatch
                    .as_ref()
                    .map_or_else(String::new, ToString::to_string)
            ));
        }
        self.last_resync = Some(report);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_mark_that_is_not_there_means_none() {
        let d = tempfile::tempdir().unwrap();
        let ui = Ui::plain();
        assert!(load_mark(d.path(), &ui).is_none());
        // Garbage, or a mark that cannot be read: taken as a mark.
        std::fs::write(d.path().join(MARK_FILE), b"{not json").unwrap();
        assert!(load_mark(d.path(), &ui).is_some());
        std::fs::remove_file(d.path().join(MARK_FILE)).unwrap();
        std::fs::create_dir(d.path().join(MARK_FILE)).unwrap();
        let mark = load_mark(d.path(), &ui).expect("an unreadable mark is a mark");
        assert!(mark.mismatch.what.contains("unreadable mark"), "{mark:?}");
    }
}
