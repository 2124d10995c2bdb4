//! One replica's state machine.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;

use super::message::{Envelope, Message, NodeId, RECOVER_FRESH, RECOVER_LEADING};
use crate::log::storage::SplitMix;
use crate::log::{Entry, Kind};

/// Switches that break the protocol on purpose, so tests can show that the
/// simulator's checkers catch real bugs. Never set in production.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bugs {
    /// The leader commits with one acknowledgement fewer than a majority.
    pub commit_at_minority: bool,
    /// The new leader keeps its own log instead of the best of the majority's.
    pub skip_log_merge: bool,
    /// A replica that lost its state starts as in a new cluster instead of
    /// recovering ([`Replica::recovering`]); read by the simulator, which
    /// starts the replicas.
    pub amnesiac_restart: bool,
}

/// Static configuration of one replica.
#[derive(Clone, Debug)]
pub struct Config {
    /// The cluster; messages of other clusters are refused.
    pub cluster_id: u64,
    /// This replica.
    pub id: NodeId,
    /// Number of replicas: 1, 3, 5, 7 or 9.
    pub n: u32,
    /// The leader sends a heartbeat (or retransmits) after this much silence to a follower.
    pub heartbeat_ns: u64,
    /// A follower starts a view change after hearing nothing from the leader
    /// for a random time in `[election_timeout_ns, 2 * election_timeout_ns)`.
    pub election_timeout_ns: u64,
    /// Entries per Prepare at most.
    pub batch_entries_max: usize,
    /// Payload bytes per Prepare at most (at least one entry is always sent).
    pub batch_bytes_max: usize,
    /// Ops sent to a follower and not yet acknowledged, at most.
    pub pipeline_ops_max: u64,
    /// Ops appended by the leader and not yet committed, at most; proposals
    /// beyond are refused with [`Reject::Busy`].
    pub uncommitted_max: u64,
    /// A leadership transfer gives up after this long.
    pub transfer_timeout_ns: u64,
    /// A follower that has every entry learns a new commit point with the
    /// next Prepare, or after this long in a Commit of its own (0: a Commit
    /// at once). Under load the Prepares carry it; one request at a time,
    /// every follower would otherwise wake twice per entry.
    pub commit_notify_ns: u64,
    /// A follower more entries behind than this gets committed entries in
    /// chunks of this size (CatchUp) before the StartView with the rest.
    pub catch_up_entries: u64,
    /// Bytes of entries (payload and record header) in one DoViewChange,
    /// StartView or CatchUp at most; at least one entry is always sent.
    /// A log suffix larger than this moves in chunks: the new leader asks a
    /// DoViewChange's sender for the rest, and a follower asks for each part
    /// of a StartView and installs them together. (A whole cluster restarted forgets its commit point, so
    /// every replica's suffix is its whole log: in one message it could
    /// exceed what a peer accepts, and no view would ever start.)
    pub chunk_bytes_max: usize,
    /// Protocol-breaking switches for tests.
    pub bugs: Bugs,
}

impl Config {
    /// Defaults for replica `id` of `n` (10 ms heartbeats, 150 ms election timeout).
    pub fn new(cluster_id: u64, id: NodeId, n: u32) -> Config {
        Config {
            cluster_id,
            id,
            n,
            heartbeat_ns: 10_000_000,
            election_timeout_ns: 150_000_000,
            batch_entries_max: 1024,
            batch_bytes_max: 1 << 20,
            pipeline_ops_max: 16_384,
            uncommitted_max: 65_536,
            transfer_timeout_ns: 2_000_000_000,
            commit_notify_ns: 1_000_000,
            catch_up_entries: 8192,
            chunk_bytes_max: 8 << 20,
            bugs: Bugs::default(),
        }
    }

    fn quorum(&self) -> usize {
        (self.n as usize) / 2 + 1
    }

    /// The leader of `view`.
    pub fn leader_of(&self, view: u64) -> NodeId {
        (view % u64::from(self.n)) as NodeId
    }
}

/// One input from outside, before it has an op.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// What it is.
    pub kind: Kind,
    /// Its connection (0 for none).
    pub conn: u64,
    /// Its bytes.
    pub payload: Bytes,
}

/// What a replica must have on disk besides its log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PersistentState {
    /// The highest view this replica has taken part in: it never acts in a lower one.
    pub view: u64,
    /// The last view in which its log was in step with that view's leader.
    pub log_view: u64,
    /// Rejoined after it lost its state ([`Replica::recovering`]): the view
    /// it joined and the op its leader's log reached then (0: not
    /// rejoining). It votes in no view change until its log is there, across
    /// restarts too.
    #[serde(default)]
    pub rejoin_view: u64,
    /// See `rejoin_view`.
    #[serde(default)]
    pub rejoin_upto: u64,
}

/// Inputs.
#[derive(Clone, Debug)]
pub enum Input {
    /// Time passed (the time is given to `step`).
    Tick,
    /// A message from a peer.
    Receive(Envelope),
    /// Client events to order (only the leader accepts them).
    Propose(Vec<Event>),
    /// The log is durable up to `op`.
    Durable {
        /// Last durable op.
        op: u64,
    },
    /// The node was busy for a while (restarting its program): silence from
    /// the leader meanwhile is not a sign that it died.
    Stalled,
    /// Hand leadership to replica `to` (planned failover).
    TransferLeadership {
        /// The replica to lead next.
        to: NodeId,
    },
    /// The node installed a snapshot covering every op up to `op`; the log
    /// now starts at `op + 1`. Op 0 says the fetch failed (the engine may ask again).
    SnapshotInstalled {
        /// Last op the snapshot covers.
        op: u64,
        /// Connections open at `op`.
        open_conns: Vec<u64>,
    },
    /// Entries below `below` are covered by a snapshot and may leave memory (and the log).
    Compacted {
        /// First op still needed.
        below: u64,
    },
    /// Entries below `below` may leave memory; they stay in the node's log,
    /// and a follower that needs them gets [`Command::CatchUpFromLog`].
    Forget {
        /// First op to keep in memory (at most the first undelivered op).
        below: u64,
    },
}

/// Why a proposal was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reject {
    /// This replica does not lead (a hint where the leader is, if known).
    NotLeader(Option<NodeId>),
    /// Too many uncommitted entries: back off and retry.
    Busy,
}

/// The role of a replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Leads the current view.
    Leader,
    /// Follows the current view's leader.
    Follower,
    /// Taking part in a view change.
    ViewChange,
}

/// Whether the view is running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Normal operation in the current view.
    Normal,
    /// Changing views: not accepting entries until the new view starts.
    ViewChange,
}

/// Outputs, to be executed in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Append these entries (consecutive ops after the current last op).
    Append(Vec<Entry>),
    /// Remove every entry after `after`; durable before the next command.
    /// Cancels every held `Send` whose barrier is above `after`.
    Truncate {
        /// Last op kept.
        after: u64,
    },
    /// Make the log durable, then write this state durably, before the next command.
    SaveState(PersistentState),
    /// Send a message, once the log is durable up to `after_durable` (0: at once).
    Send {
        /// Receiver.
        to: NodeId,
        /// The message.
        msg: Message,
        /// Barrier: the log must be durable up to this op first.
        after_durable: u64,
    },
    /// Committed entries, in op order, exactly once each.
    Deliver(Vec<Entry>),
    /// The role or view changed.
    RoleChanged {
        /// New role.
        role: Role,
        /// View.
        view: u64,
        /// The view's leader.
        leader: NodeId,
    },
    /// Proposals that were not accepted.
    Rejected {
        /// The events, given back.
        events: Vec<Event>,
        /// Why.
        reason: Reject,
    },
    /// Send `msg` (a [`Message::CatchUp`] or [`Message::DoViewChange`] with
    /// no entries) to `to` once its entries are filled with ops `from ..=
    /// upto` read from the log: some of them left memory with [`Input::Forget`].
    SendFromLog {
        /// The receiver.
        to: NodeId,
        /// The message, entries empty.
        msg: Message,
        /// First op.
        from: u64,
        /// Last op.
        upto: u64,
    },
    /// Fetch a snapshot covering every op up to `op` from `from`, install it,
    /// then give [`Input::SnapshotInstalled`].
    FetchSnapshot {
        /// Who has it.
        from: NodeId,
        /// It must cover at least up to this op.
        op: u64,
    },
}

/// A DoViewChange as the new leader holds it: its sender's log view, last
/// op and commit point, and the entries received so far, consecutive from
/// `op_start` (the whole suffix, or chunks of it merged as they came).
#[derive(Clone, Debug)]
struct Dvc {
    log_view: u64,
    last_op: u64,
    commit: u64,
    op_start: u64,
    entries: Vec<Entry>,
}

impl Dvc {
    /// The first op after the entries held.
    fn end(&self) -> u64 {
        self.op_start + self.entries.len() as u64
    }

    /// `old` and a later DoViewChange `new` of the same sender in the same
    /// view as one, and whether it covers more than `old` did. In a view
    /// change the sender's log does not change, so overlapping entries are
    /// the same; with a gap between the two, the lower range is kept (the
    /// new leader asks for what follows it).
    fn merged(old: Dvc, new: Dvc) -> (Dvc, bool) {
        if (new.log_view, new.last_op) != (old.log_view, old.last_op) {
            return (new, true);
        }
        let before = (old.op_start, old.end());
        let commit = old.commit.max(new.commit);
        let (mut lo, hi) = if new.op_start < old.op_start {
            (new, old)
        } else {
            (old, new)
        };
        let end = lo.end();
        if hi.op_start <= end {
            lo.entries
                .extend(hi.entries.into_iter().filter(|e| e.op >= end));
        }
        lo.commit = commit;
        let grew = lo.end() > before.1 || lo.op_start < before.0;
        (lo, grew)
    }
}

/// Views and ops this large cannot come from a correct replica (they would
/// take centuries to reach); refusing them keeps every `+ 1` in range.
const IMPOSSIBLE: u64 = u64::MAX / 4;

fn plausible(msg: &Message) -> bool {
    let (numbers, n) = msg.numbers();
    // Ops start at 1: an entry at op 0 comes from no correct replica.
    numbers[..n].iter().all(|&x| x < IMPOSSIBLE)
        && msg
            .entries()
            .is_none_or(|es| es.first().is_none_or(|e| e.op > 0))
}

/// What an entry weighs in memory and in a message: its payload and about
/// a record header's worth of fields.
pub fn entry_bytes(e: &Entry) -> usize {
    e.payload.len() + 48
}

/// One replica of the state machine.
pub struct Replica {
    cfg: Config,
    rng: SplitMix,
    now: u64,
    view: u64,
    log_view: u64,
    status: Status,
    /// Entries `first_op ..= last_op`.
    log: VecDeque<Entry>,
    first_op: u64,
    /// The first op in the node's log; ops below it only a snapshot has.
    stored_first: u64,
    /// Per follower: the op a catch-up was last sent from, and when (no
    /// second copy of the same chunk within a heartbeat).
    catch_up_sent: Vec<(u64, u64)>,
    /// Per follower gathering the parts of a StartView (it asks for each;
    /// Prepares would be of no use to it until it installs the whole): when
    /// it last asked for a part, or one was sent.
    in_parts: Vec<Option<u64>>,
    /// The op this replica last asked its leader for its log from, and when
    /// (one request per half election timeout, not one per message heard).
    asked_log: (u64, u64),
    /// New leader in a view change: the DoViewChange chunk last asked for
    /// (sender, first op, when), so a chunk on its way is not asked twice.
    asked_dvc: (NodeId, u64, u64),
    /// Follower in a view change: the parts of a StartView received so
    /// far (first op, entries), installed together once the last is here.
    start_parts: Option<(u64, Vec<Entry>)>,
    /// Follower in a view change: our log is the view's leader's up to
    /// this op (StartView parts matched it entry by entry).
    verified: u64,
    commit: u64,
    delivered: u64,
    /// Bytes ([`entry_bytes`]) of the delivered entries still in memory.
    delivered_bytes: usize,
    /// Bytes of all the entries in memory.
    log_bytes: usize,
    durable: u64,
    open_conns: BTreeSet<u64>,
    election_deadline: u64,
    /// When this replica last heard from its view's leader (or started).
    last_leader_contact: u64,
    /// A pre-vote under way: the view it would start, and who said yes.
    probe: Option<(u64, BTreeSet<NodeId>)>,
    last_resend: u64,
    // Leader state.
    acked: Vec<u64>,
    next: Vec<u64>,
    last_sent: Vec<u64>,
    /// The commit point each follower was last sent.
    told: Vec<u64>,
    /// Since when a commit point is not told to every follower.
    untold_since: Option<u64>,
    transfer: Option<(NodeId, u64)>,
    // View change state (at the new leader).
    dvcs: BTreeMap<NodeId, Dvc>,
    snapshot_wait: Option<u64>,
    /// Restarted as the leader of its view: it must not start that view a
    /// second time (it could order other entries at the same ops), so it
    /// moves to the next view at its first step.
    leave_view: bool,
    /// New leader of view 0: save the state before the first command.
    save_first: bool,
    /// Started without any state: asking where the cluster is before it
    /// takes part ([`Replica::recovering`]).
    recovering: Option<Recovering>,
    /// Recovered into this view, whose leader's log then ended at this op:
    /// it votes in no view change and says yes to no probe until its own
    /// log, in step with a leader, reaches that op or comes from a later
    /// view (what it acknowledged before it lost its state is in that log,
    /// and a majority's copy of it may need this replica's).
    rejoin_upto: Option<(u64, u64)>,
}

/// A replica without state asking where the cluster is.
struct Recovering {
    nonce: u64,
    /// When this round of asking began (None: not yet asked).
    asked_at: Option<u64>,
    /// This round's answers: view, last op, flags.
    answers: BTreeMap<NodeId, (u64, u64, u64)>,
}

impl Replica {
    /// A replica of a new cluster: empty log, view 0 (led by replica 0).
    ///
    /// Replica 0 leads at once; its first step saves its state before
    /// anything else, so that after a crash it restarts with
    /// [`Replica::restart`] and never leads view 0 a second time. A node
    /// must call `new` only when it has no saved state at all.
    pub fn new(cfg: Config, seed: u64, now: u64) -> Replica {
        let mut r = Replica::empty(cfg, seed, now);
        if r.is_leader() && r.cfg.n > 1 {
            r.leave_view = false;
            r.become_leader_state();
            r.save_first = true;
        }
        r
    }

    /// A replica that starts without any state — no saved view, no log, no
    /// snapshot — in a cluster of several: a new cluster, or a replica
    /// whose data directory was emptied. Since it cannot tell which, and in
    /// the second case it may have voted or acknowledged entries it no
    /// longer remembers, it takes no part at first: it asks the others.
    /// If every other replica answered that it holds no entry either, the
    /// cluster is new: it starts a view change past every view it heard
    /// of. Otherwise, once a majority of the others answered and the
    /// leader of the newest view among them says it leads, it joins that
    /// view as a follower and takes the leader's log, voting in no view
    /// change until it has it (docs/consensus.md).
    pub fn recovering(cfg: Config, seed: u64, now: u64) -> Replica {
        if cfg.n == 1 {
            return Replica::new(cfg, seed, now);
        }
        let mut r = Replica::empty(cfg, seed, now);
        r.status = Status::ViewChange;
        r.leave_view = false;
        r.recovering = Some(Recovering {
            nonce: 0,
            asked_at: None,
            answers: BTreeMap::new(),
        });
        r
    }

    /// Still asking where the cluster is ([`Replica::recovering`]), or
    /// rejoined and still taking the leader's log.
    pub fn rejoining(&self) -> bool {
        self.recovering.is_some() || self.rejoin_upto.is_some()
    }

    /// No saved state, no entries.
    fn empty(cfg: Config, seed: u64, now: u64) -> Replica {
        Replica::restart(
            cfg,
            seed,
            now,
            PersistentState::default(),
            1,
            Vec::new(),
            Vec::new(),
        )
    }

    /// A replica restarted with ops up to `first_op - 1` known committed
    /// (the node saved its commit point), though only those from
    /// `first_op` are given: the node's log holds ops from `stored_first`,
    /// and a follower or a view change that needs older ones gets them read
    /// from it ([`Command::SendFromLog`]). `open_conns` are the connections
    /// open at `first_op - 1`.
    #[allow(clippy::too_many_arguments)]
    pub fn restart_committed(
        cfg: Config,
        seed: u64,
        now: u64,
        state: PersistentState,
        stored_first: u64,
        first_op: u64,
        entries: Vec<Entry>,
        open_conns: Vec<u64>,
    ) -> Replica {
        assert!(
            (1..=first_op).contains(&stored_first),
            "the log starts at op {stored_first}, after the first op given {first_op}"
        );
        let mut r = Replica::restart(cfg, seed, now, state, first_op, entries, open_conns);
        r.stored_first = stored_first;
        r
    }

    /// A replica restarted from its durable state: the view state, and the
    /// log's entries from `first_op` on (ops before it are covered by a
    /// snapshot whose open connections are `open_conns`).
    pub fn restart(
        cfg: Config,
        seed: u64,
        now: u64,
        state: PersistentState,
        first_op: u64,
        entries: Vec<Entry>,
        open_conns: Vec<u64>,
    ) -> Replica {
        assert!(
            matches!(cfg.n, 1 | 3 | 5 | 7 | 9),
            "cluster size {} is not 1, 3, 5, 7 or 9",
            cfg.n
        );
        assert!(
            cfg.id < cfg.n,
            "replica id {} out of range for {} replicas",
            cfg.id,
            cfg.n
        );
        assert!(first_op >= 1);
        for (i, e) in entries.iter().enumerate() {
            assert_eq!(
                e.op,
                first_op + i as u64,
                "restart entries must be consecutive"
            );
        }
        let n = cfg.n as usize;
        let log_bytes = entries.iter().map(entry_bytes).sum();
        let mut r = Replica {
            rng: SplitMix(seed ^ (u64::from(cfg.id) << 32)),
            now,
            view: state.view,
            log_view: state.log_view,
            status: Status::Normal,
            log: entries.into(),
            first_op,
            stored_first: first_op,
            catch_up_sent: vec![(0, 0); n],
            in_parts: vec![None; n],
            asked_log: (0, 0),
            asked_dvc: (0, 0, 0),
            start_parts: None,
            verified: 0,
            commit: first_op - 1,
            delivered: first_op - 1,
            delivered_bytes: 0,
            log_bytes,
            durable: 0,
            open_conns: open_conns.into_iter().collect(),
            election_deadline: 0,
            last_leader_contact: now,
            probe: None,
            last_resend: now,
            acked: vec![0; n],
            next: vec![1; n],
            last_sent: vec![now; n],
            told: vec![0; n],
            untold_since: None,
            transfer: None,
            dvcs: BTreeMap::new(),
            snapshot_wait: None,
            leave_view: false,
            save_first: false,
            recovering: None,
            rejoin_upto: (state.rejoin_upto > 0).then_some((state.rejoin_view, state.rejoin_upto)),
            cfg,
        };
        r.durable = r.last_op();
        let leads = r.cfg.leader_of(r.view) == r.cfg.id;
        if r.cfg.n == 1 {
            r.status = Status::Normal;
        } else if leads {
            r.status = Status::ViewChange;
            r.leave_view = true;
        } else if r.log_view != r.view || r.rejoin_upto.is_some() {
            // Crashed during a view change, or while taking the leader's
            // log after a lost disk: wait for the view's leader (and ask it
            // for its log).
            r.status = Status::ViewChange;
        }
        r.reset_election_deadline();
        r
    }

    /// The current view.
    pub fn view(&self) -> u64 {
        self.view
    }
    /// Normal or changing views.
    pub fn status(&self) -> Status {
        self.status
    }
    /// The role now.
    pub fn role(&self) -> Role {
        match self.status {
            Status::ViewChange => Role::ViewChange,
            Status::Normal if self.is_leader() => Role::Leader,
            Status::Normal => Role::Follower,
        }
    }
    /// The leader of the current view.
    pub fn leader(&self) -> NodeId {
        self.cfg.leader_of(self.view)
    }
    /// Highest committed op known here.
    pub fn commit(&self) -> u64 {
        self.commit
    }
    /// Highest op this replica was told is on its own disk (`Input::Durable`).
    pub fn durable(&self) -> u64 {
        self.durable
    }
    /// Last op in the log.
    pub fn last_op(&self) -> u64 {
        self.first_op + self.log.len() as u64 - 1
    }
    /// First op in memory.
    pub fn first_op(&self) -> u64 {
        self.first_op
    }
    /// The entry at `op`, if in memory.
    pub fn entry(&self, op: u64) -> Option<&Entry> {
        if op < self.first_op {
            return None;
        }
        self.log.get((op - self.first_op) as usize)
    }

    /// Entries `from..=upto` held in memory, up to
    /// [`Config::chunk_bytes_max`] bytes (at least one entry) and
    /// [`Config::catch_up_entries`] entries.
    fn chunk(&self, from: u64, upto: u64) -> Vec<Entry> {
        let mut entries = Vec::new();
        let mut bytes = 0usize;
        for op in from..=self.chunk_upto(from, upto) {
            let Some(e) = self.entry(op) else {
                break;
            };
            let size = entry_bytes(e);
            if !entries.is_empty() && bytes + size > self.cfg.chunk_bytes_max {
                break;
            }
            bytes += size;
            entries.push(e.clone());
        }
        entries
    }

    /// The last op of a chunk from `from` (at most `upto`) by entry count.
    fn chunk_upto(&self, from: u64, upto: u64) -> u64 {
        upto.min(from.saturating_add(self.cfg.catch_up_entries.max(1) - 1))
    }

    /// Follower gathering StartView parts: the first op after them.
    fn parts_end(&self) -> Option<u64> {
        self.start_parts
            .as_ref()
            .map(|(start, parts)| start + parts.len() as u64)
    }

    /// On the leader: the last op replica `f` acknowledged (0 when unknown).
    pub fn acked(&self, f: NodeId) -> u64 {
        self.acked.get(f as usize).copied().unwrap_or(0)
    }

    /// A planned leadership transfer is under way (to this replica).
    pub fn transferring_to(&self) -> Option<NodeId> {
        self.transfer.map(|t| t.0)
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }
    /// Persistent state as it should be on disk now.
    pub fn persistent_state(&self) -> PersistentState {
        let (rejoin_view, rejoin_upto) = self.rejoin_upto.unwrap_or((0, 0));
        PersistentState {
            view: self.view,
            log_view: self.log_view,
            rejoin_view,
            rejoin_upto,
        }
    }

    fn is_leader(&self) -> bool {
        self.cfg.leader_of(self.view) == self.cfg.id
    }

    /// The view's leader spoke: no view change for another election timeout,
    /// and no yes to anyone else's probe for one either.
    fn heard_from_leader(&mut self) {
        self.last_leader_contact = self.now;
        // A yes to an earlier probe arriving now must not unseat the leader.
        self.probe = None;
        self.reset_election_deadline();
    }

    fn reset_election_deadline(&mut self) {
        let t = self.cfg.election_timeout_ns.max(1);
        self.election_deadline = self.now + t + self.rng.next_u64() % t;
    }

    fn send(&self, out: &mut Vec<Command>, to: NodeId, msg: Message) {
        out.push(Command::Send {
            to,
            msg,
            after_durable: 0,
        });
    }

    fn others(&self) -> impl Iterator<Item = NodeId> + use<> {
        let me = self.cfg.id;
        (0..self.cfg.n).filter(move |&i| i != me)
    }

    /// Feeds one input at time `now` (ns, monotonic) and appends the commands to `out`.
    pub fn step(&mut self, now: u64, input: Input, out: &mut Vec<Command>) {
        self.now = self.now.max(now);
        if self.recovering.is_some() {
            match input {
                Input::Tick => self.ask_where(out),
                Input::Receive(env) => self.on_receive(env, out),
                // Nothing to propose, install or hand over yet.
                _ => {}
            }
            return;
        }
        if let Some((view, upto)) = self.rejoin_upto.filter(|_| !matches!(input, Input::Tick)) {
            // (On disk: the log, in step with this view's leader, reaches
            // the op or comes from a later view. What makes it so is an
            // input, never a tick: ticks before the next timer stay silent.)
            if self.status == Status::Normal
                && self.log_view == self.view
                && self.durable >= self.last_op()
                && (self.last_op() >= upto || self.view > view)
            {
                self.rejoin_upto = None;
                out.push(Command::SaveState(self.persistent_state()));
            }
        }
        if self.save_first {
            self.save_first = false;
            out.push(Command::SaveState(self.persistent_state()));
        }
        if self.leave_view {
            self.leave_view = false;
            self.start_view_change(self.view + 1, out);
        }
        match input {
            Input::Tick => self.on_tick(out),
            Input::Receive(env) => self.on_receive(env, out),
            Input::Propose(events) => self.on_propose(events, out),
            Input::Durable { op } => {
                self.durable = self.durable.max(op.min(self.last_op()));
                if self.is_leader() && self.status == Status::Normal {
                    self.try_commit(out);
                }
            }
            Input::TransferLeadership { to } => {
                if self.is_leader()
                    && self.status == Status::Normal
                    && to != self.cfg.id
                    && to < self.cfg.n
                {
                    self.transfer = Some((to, self.now + self.cfg.transfer_timeout_ns));
                    self.check_transfer(out);
                }
            }
            Input::SnapshotInstalled { op, open_conns } => {
                self.on_snapshot_installed(op, open_conns, out)
            }
            Input::Stalled => {
                if !self.is_leader() {
                    self.reset_election_deadline();
                }
            }
            Input::Compacted { below } => {
                self.forget(below);
                // The log keeps `below` on, whatever memory holds.
                self.stored_first = self.stored_first.max(below);
            }
            Input::Forget { below } => self.forget(below),
        }
    }

    /// Drops entries below `below` (and below every undelivered one) from memory.
    fn forget(&mut self, below: u64) {
        let below = below.min(self.delivered + 1);
        while self.first_op < below {
            let Some(e) = self.log.pop_front() else {
                break;
            };
            self.delivered_bytes -= entry_bytes(&e);
            self.log_bytes -= entry_bytes(&e);
            self.first_op += 1;
        }
    }

    /// Entries in memory: how many, and their bytes.
    pub fn memory(&self) -> (u64, usize) {
        (self.log.len() as u64, self.log_bytes)
    }

    /// What [`Replica::memory`] and [`Replica::window`] report, counted
    /// again entry by entry: an error names the first that differs (for
    /// the simulator).
    #[doc(hidden)]
    pub fn check_memory_counts(&self) -> Result<(), String> {
        let all: usize = self.log.iter().map(entry_bytes).sum();
        let delivered: usize = self
            .log
            .iter()
            .take_while(|e| e.op <= self.delivered)
            .map(entry_bytes)
            .sum();
        if all != self.log_bytes || delivered != self.delivered_bytes {
            return Err(format!(
                "memory counts: {} bytes held, counted {all}; {} delivered, counted {delivered}",
                self.log_bytes, self.delivered_bytes
            ));
        }
        Ok(())
    }

    /// Delivered entries in memory: how many, and their bytes.
    pub fn window(&self) -> (u64, usize) {
        (
            (self.delivered + 1).saturating_sub(self.first_op),
            self.delivered_bytes,
        )
    }

    /// The first op to keep so that memory holds at most `entries`
    /// delivered entries of at most `bytes` in all (at least the last
    /// delivered one): what to give [`Input::Forget`].
    pub fn window_start(&self, entries: u64, bytes: usize) -> u64 {
        let mut op = self.delivered + 1;
        let mut held = 0usize;
        while op > self.first_op && self.delivered + 1 - op < entries {
            let Some(e) = self.entry(op - 1) else {
                break;
            };
            held += entry_bytes(e);
            if held > bytes && op <= self.delivered {
                break;
            }
            op -= 1;
        }
        op
    }

    /// Follower `f` needs ops from `from`, below what memory holds: from the
    /// log when it still has them, else a snapshot. True when handled.
    fn catch_up_from_below(&mut self, f: NodeId, from: u64, out: &mut Vec<Command>) -> bool {
        if from >= self.first_op {
            return false;
        }
        let fi = f as usize;
        if from >= self.stored_first && from <= self.commit {
            let upto = self.commit.min(from + self.cfg.catch_up_entries - 1);
            let (last_from, at) = self.catch_up_sent[fi];
            if last_from == from && self.now.saturating_sub(at) < self.cfg.heartbeat_ns {
                return true;
            }
            self.catch_up_sent[fi] = (from, self.now);
            out.push(Command::SendFromLog {
                to: f,
                msg: Message::CatchUp {
                    view: self.view,
                    op_start: from,
                    entries: Vec::new(),
                    commit: self.commit,
                },
                from,
                upto,
            });
            self.last_sent[fi] = self.now;
            if self.acked[fi] >= from {
                self.acked[fi] = from - 1;
            }
        } else {
            self.send_need_snapshot(f, out);
        }
        true
    }

    // ---- proposals and the normal case (leader) ----

    fn on_propose(&mut self, events: Vec<Event>, out: &mut Vec<Command>) {
        if self.status != Status::Normal || !self.is_leader() || self.transfer.is_some() {
            let hint = match (self.status, self.transfer) {
                (_, Some((to, _))) => Some(to),
                (Status::Normal, None) => Some(self.leader()),
                _ => None,
            };
            out.push(Command::Rejected {
                events,
                reason: Reject::NotLeader(hint),
            });
            return;
        }
        if events.is_empty() {
            return;
        }
        let uncommitted = self.last_op() - self.commit;
        if uncommitted + events.len() as u64 > self.cfg.uncommitted_max {
            out.push(Command::Rejected {
                events,
                reason: Reject::Busy,
            });
            return;
        }
        let mut batch = Vec::with_capacity(events.len());
        for (op, ev) in (self.last_op() + 1..).zip(events) {
            batch.push(Entry {
                view: self.view,
                op,
                kind: ev.kind,
                conn: ev.conn,
                time_ns: self.now,
                payload: ev.payload,
            });
        }
        self.append_local(batch, out);
        for f in self.others() {
            self.pump(f, out);
        }
        if self.cfg.n == 1 {
            self.try_commit(out);
        }
    }

    fn append_local(&mut self, batch: Vec<Entry>, out: &mut Vec<Command>) {
        if batch.is_empty() {
            return;
        }
        debug_assert_eq!(batch[0].op, self.last_op() + 1);
        self.log_bytes += batch.iter().map(entry_bytes).sum::<usize>();
        self.log.extend(batch.iter().cloned());
        out.push(Command::Append(batch));
    }

    /// Sends follower `f` what it lacks, within its window.
    fn pump(&mut self, f: NodeId, out: &mut Vec<Command>) {
        self.pump_upto(f, usize::MAX, out);
    }

    /// [`Replica::pump`], at most `batches` Prepares.
    fn pump_upto(&mut self, f: NodeId, batches: usize, out: &mut Vec<Command>) {
        let fi = f as usize;
        if self.in_parts[fi].is_some() {
            // It asks for each part; the rest follows its install.
            return;
        }
        let last = self.last_op();
        if self.next[fi] <= last && self.catch_up_from_below(f, self.next[fi], out) {
            // What it needs left memory: from the log, or a snapshot.
            return;
        }
        let mut sent = 0;
        while self.next[fi] <= last
            && self.next[fi] <= self.acked[fi] + self.cfg.pipeline_ops_max
            && sent < batches
        {
            sent += 1;
            let start = self.next[fi];
            let mut entries = Vec::new();
            let mut bytes = 0usize;
            let mut op = start;
            while op <= last && entries.len() < self.cfg.batch_entries_max {
                let e = self.entry(op).expect("op within the log");
                if !entries.is_empty() && bytes + e.payload.len() > self.cfg.batch_bytes_max {
                    break;
                }
                bytes += e.payload.len();
                entries.push(e.clone());
                op += 1;
            }
            self.next[fi] = op;
            self.send(
                out,
                f,
                Message::Prepare {
                    view: self.view,
                    op_start: start,
                    entries,
                    commit: self.commit,
                },
            );
            self.told[fi] = self.commit;
            self.last_sent[fi] = self.now;
        }
    }

    fn try_commit(&mut self, out: &mut Vec<Command>) {
        // Runs on every acknowledgement: no allocation (at most 9 replicas).
        let n = self.acked.len();
        let mut buf = [0u64; 9];
        let acks = &mut buf[..n];
        acks.copy_from_slice(&self.acked);
        acks[self.cfg.id as usize] = self.durable.min(self.last_op());
        acks.sort_unstable_by(|a, b| b.cmp(a));
        let mut q = self.cfg.quorum();
        if self.cfg.bugs.commit_at_minority && q > 1 {
            q -= 1;
        }
        let candidate = acks[q - 1];
        if candidate > self.commit {
            self.commit = candidate;
            self.deliver(out);
            // Followers that have everything learn the new commit point with
            // the next Prepare, or in a Commit after commit_notify_ns.
            self.untold_since.get_or_insert(self.now);
            if self.cfg.commit_notify_ns == 0 {
                self.tell_commit(out);
            }
            self.check_transfer(out);
        }
    }

    /// Sends the commit point to every follower that has every entry and
    /// was not told it yet.
    fn tell_commit(&mut self, out: &mut Vec<Command>) {
        self.untold_since = None;
        for f in self.others() {
            let fi = f as usize;
            if self.next[fi] > self.last_op() && self.told[fi] < self.commit {
                self.send_commit(f, out);
            }
        }
    }

    /// A Commit (the commit point, or a heartbeat) to follower `f`.
    fn send_commit(&mut self, f: NodeId, out: &mut Vec<Command>) {
        self.send(
            out,
            f,
            Message::Commit {
                view: self.view,
                commit: self.commit,
            },
        );
        self.told[f as usize] = self.commit;
        self.last_sent[f as usize] = self.now;
    }

    fn deliver(&mut self, out: &mut Vec<Command>) {
        let upto = self.commit.min(self.last_op());
        if upto <= self.delivered {
            return;
        }
        let mut batch = Vec::with_capacity((upto - self.delivered) as usize);
        for op in self.delivered + 1..=upto {
            let e = self
                .entry(op)
                .expect("committed entries are in memory")
                .clone();
            e.track_open(&mut self.open_conns);
            self.delivered_bytes += entry_bytes(&e);
            batch.push(e);
        }
        self.delivered = upto;
        out.push(Command::Deliver(batch));
    }

    fn check_transfer(&mut self, out: &mut Vec<Command>) {
        let Some((to, deadline)) = self.transfer else {
            return;
        };
        if self.now > deadline || !self.is_leader() || self.status != Status::Normal {
            self.transfer = None;
            return;
        }
        if self.acked[to as usize] >= self.last_op() {
            self.transfer = None;
            let n = u64::from(self.cfg.n);
            let mut v = self.view + 1;
            while v % n != u64::from(to) {
                v += 1;
            }
            self.start_view_change(v, out);
        }
    }

    // ---- time ----

    /// When the next [`Input::Tick`] has work to do (ns, the clock of
    /// [`Replica::step`]): a heartbeat or retransmission due, a commit point
    /// to tell, an election or a view change message to repeat. `None`: no
    /// timer runs (a cluster of one, between commits). A tick before it
    /// changes nothing (but a replica's very first step, whatever it is,
    /// saves its state), so a node may sleep until then; one later is late
    /// by the difference.
    pub fn next_timer(&self) -> Option<u64> {
        let hb = self.cfg.heartbeat_ns;
        if let Some(r) = &self.recovering {
            let round = self.recover_round();
            return Some(r.asked_at.map_or(self.now, |t| t.saturating_add(round)));
        }
        match self.status {
            Status::Normal if self.is_leader() => {
                let notify = self
                    .untold_since
                    .map(|t| t.saturating_add(self.cfg.commit_notify_ns));
                let beat = self
                    .others()
                    .map(|f| self.last_sent[f as usize].saturating_add(hb))
                    .min();
                let transfer = self
                    .transfer
                    .map(|(_, deadline)| deadline.saturating_add(1));
                [notify, beat, transfer].into_iter().flatten().min()
            }
            Status::Normal => (self.cfg.n > 1).then_some(self.election_deadline),
            Status::ViewChange => Some(
                self.election_deadline
                    .min(self.last_resend.saturating_add(hb)),
            ),
        }
    }

    fn on_tick(&mut self, out: &mut Vec<Command>) {
        let hb = self.cfg.heartbeat_ns;
        match self.status {
            Status::Normal if self.is_leader() => {
                if self
                    .untold_since
                    .is_some_and(|t| self.now.saturating_sub(t) >= self.cfg.commit_notify_ns)
                {
                    self.tell_commit(out);
                }
                for f in self.others() {
                    let fi = f as usize;
                    if self.now.saturating_sub(self.last_sent[fi]) < hb {
                        continue;
                    }
                    if self.in_parts[fi].is_some_and(|t| {
                        self.now.saturating_sub(t) >= self.cfg.election_timeout_ns / 2
                    }) {
                        // It asked for no part for a while: a part or its
                        // acknowledgement was lost. Back to Prepares (one
                        // in step takes them; one gathering asks again).
                        self.in_parts[fi] = None;
                    }
                    if self.in_parts[fi].is_some() {
                        // Gathering a StartView's parts: a Commit makes it
                        // ask again for the next if one was lost.
                        self.send_commit(f, out);
                    } else if self.acked[fi] < self.last_op() {
                        // Retransmit from what it acknowledged: one batch,
                        // the rest once it answers. (A stopped follower
                        // would otherwise get the whole window again every
                        // heartbeat, until its queue is full of copies.)
                        self.next[fi] = self.acked[fi] + 1;
                        self.pump_upto(f, 1, out);
                    } else {
                        self.send_commit(f, out);
                    }
                }
                self.check_transfer(out);
            }
            Status::Normal => {
                if self.now >= self.election_deadline && self.cfg.n > 1 {
                    self.probe_view(self.view + 1, out);
                }
            }
            Status::ViewChange => {
                if self.now >= self.election_deadline {
                    self.probe_view(self.view + 1, out);
                } else if self.now.saturating_sub(self.last_resend) >= hb {
                    // Messages may be lost: say it again.
                    self.last_resend = self.now;
                    let v = self.view;
                    for f in self.others() {
                        self.send(out, f, Message::StartViewChange { view: v });
                    }
                    if self.is_leader() {
                        self.try_start_view(out);
                    } else if self.start_parts.is_none() {
                        // (Gathering a StartView's parts, the leader has
                        // started the view: it needs no log of ours.)
                        self.send_dvc(self.commit + 1, true, out);
                    }
                }
            }
        }
    }

    // ---- recovery of a replica without state ----

    /// How long one round of asking lasts: answers of one round only are
    /// weighed together, and a round must outlast a round trip.
    fn recover_round(&self) -> u64 {
        (self.cfg.election_timeout_ns / 2).max(self.cfg.heartbeat_ns)
    }

    /// Asks every other replica where the cluster is, a new round every
    /// [`Self::recover_round`].
    fn ask_where(&mut self, out: &mut Vec<Command>) {
        let hb = self.recover_round();
        let now = self.now;
        let nonce = self.rng.next_u64() % IMPOSSIBLE;
        let Some(r) = &mut self.recovering else {
            return;
        };
        if r.asked_at.is_some_and(|t| now.saturating_sub(t) < hb) {
            return;
        }
        r.nonce = nonce;
        r.asked_at = Some(now);
        r.answers.clear();
        let view = self.view;
        for f in self.others() {
            self.send(out, f, Message::Recover { view, nonce });
        }
    }

    /// Where this replica is, for one that recovers.
    fn answer_recover(&mut self, to: NodeId, nonce: u64, out: &mut Vec<Command>) {
        // A DoViewChange it sent before it lost its state speaks for a log
        // it no longer has.
        self.dvcs.remove(&to);
        let mut flags = 0;
        if self.recovering.is_some() {
            flags |= RECOVER_FRESH;
        } else if self.status == Status::Normal && self.is_leader() {
            flags |= RECOVER_LEADING;
        }
        let msg = Message::RecoverOk {
            view: self.view,
            nonce,
            last_op: self.last_op(),
            flags,
        };
        self.send(out, to, msg);
    }

    /// A message while asking where the cluster is (checked by
    /// [`Self::on_receive`] like any other).
    fn on_receive_recovering(&mut self, env: Envelope, out: &mut Vec<Command>) {
        match env.msg {
            Message::Recover { nonce, .. } => self.answer_recover(env.from, nonce, out),
            // A pre-vote to leave a view this replica led before it lost
            // its state: that view has no working leader, since this
            // replica leads nothing now (and a yes promises nothing). The
            // others may need it to move on, and it needs them to.
            Message::ViewProbe { view }
                if view >= 1 && self.cfg.leader_of(view - 1) == self.cfg.id =>
            {
                self.send(out, env.from, Message::ViewProbeOk { view });
            }
            Message::RecoverOk {
                view,
                nonce,
                last_op,
                flags,
            } => {
                let Some(r) = &mut self.recovering else {
                    return;
                };
                if nonce != r.nonce || r.asked_at.is_none() {
                    return;
                }
                r.answers.insert(env.from, (view, last_op, flags));
                self.decide_recovery(out);
            }
            // It takes no part in anything else yet.
            _ => {}
        }
    }

    fn decide_recovery(&mut self, out: &mut Vec<Command>) {
        let quorum = self.cfg.quorum();
        let Some(r) = &self.recovering else {
            return;
        };
        // Without state, or with no entry: a replica of a new cluster that
        // has started (every view that really started holds its leader's
        // first entry).
        let blank = |a: &(u64, u64, u64)| a.2 & RECOVER_FRESH != 0 || a.1 == 0;
        let fresh = r.answers.values().filter(|a| blank(a)).count();
        if fresh == r.answers.len() && fresh + 1 == self.cfg.n as usize {
            // Every other replica answered, and none holds an entry: a new
            // cluster. Fewer would not do: with three replicas, one that
            // never had state and one that lost it would make a majority
            // without the one that holds the committed entries; with five,
            // one still behind could take entries this replica acknowledged
            // before it lost them from a leader that did not answer.
            {
                // No entry can be committed anywhere (that takes a majority
                // holding it). A view change past every view named starts
                // the cluster: this replica may have led a view before it
                // lost its state, and must not lead it a second time.
                let newest = r.answers.values().map(|a| a.0).max().unwrap_or(0);
                self.recovering = None;
                self.view = newest;
                self.last_leader_contact = self.now;
                self.start_view_change(newest + 1, out);
            }
            return;
        }
        // Some replica has state: the newest view among a majority of the
        // others is at least every view this replica may have voted in (any
        // two majorities share a replica), and that view's leader, leading,
        // has every entry this replica may have acknowledged.
        if r.answers.len() < quorum {
            return;
        }
        let newest = r.answers.values().map(|a| a.0).max().unwrap_or(0);
        let leader = self.cfg.leader_of(newest);
        let Some(&(view, last_op, flags)) = r.answers.get(&leader) else {
            return;
        };
        if view != newest || flags & RECOVER_LEADING == 0 {
            return;
        }
        self.recovering = None;
        self.rejoin_upto = Some((newest, last_op));
        self.adopt_view(newest, out);
        self.ask_leader_for_log(out);
    }

    // ---- view change ----

    /// A pre-vote: asks the others whether they would join a view change to
    /// `view`, and starts it once a majority (this replica included) said
    /// yes. Nothing is promised or saved yet, so a replica that was cut off
    /// or just restarted, and hears from no leader, cannot push a working
    /// cluster into a view change: its probes are refused until it hears
    /// from the leader itself.
    fn probe_view(&mut self, view: u64, out: &mut Vec<Command>) {
        self.reset_election_deadline();
        if self.rejoin_upto.is_some() {
            // No vote before the leader's log is here: ask for it again.
            if self.status == Status::ViewChange {
                self.ask_leader_for_log(out);
            }
            return;
        }
        self.probe = Some((view, BTreeSet::new()));
        for f in self.others() {
            self.send(out, f, Message::ViewProbe { view });
        }
        if self.cfg.quorum() <= 1 {
            self.probe = None;
            self.start_view_change(view, out);
        }
    }

    /// Whether this replica would join a view change now: it leads no
    /// working view and has heard from no leader for an election timeout.
    fn leaderless(&self) -> bool {
        match self.status {
            Status::ViewChange => true,
            Status::Normal => {
                !self.is_leader()
                    && self.now
                        >= self
                            .last_leader_contact
                            .saturating_add(self.cfg.election_timeout_ns)
            }
        }
    }

    fn start_view_change(&mut self, view: u64, out: &mut Vec<Command>) {
        debug_assert!(view > self.view);
        self.probe = None;
        self.asked_log = (0, 0);
        self.asked_dvc = (0, 0, 0);
        self.start_parts = None;
        self.verified = 0;
        self.view = view;
        self.status = Status::ViewChange;
        self.dvcs.clear();
        self.transfer = None;
        self.last_resend = self.now;
        self.reset_election_deadline();
        out.push(Command::SaveState(self.persistent_state()));
        out.push(Command::RoleChanged {
            role: Role::ViewChange,
            view,
            leader: self.leader(),
        });
        for f in self.others() {
            self.send(out, f, Message::StartViewChange { view });
        }
        if self.is_leader() {
            self.try_start_view(out);
        } else {
            self.send_dvc(self.commit + 1, false, out);
        }
    }

    /// Sends the view's leader our log state and entries from `from` on,
    /// as many as fit in a chunk (it asks for the rest if it needs them).
    /// `summary`: a resend; if the entries do not all fit, none go (the
    /// leader asks for the chunk it lacks rather than get the first again
    /// every heartbeat).
    fn send_dvc(&self, from: u64, summary: bool, out: &mut Vec<Command>) {
        if self.rejoin_upto.is_some() {
            // Its log is not yet the leader's: no vote ([`Replica::recovering`]).
            return;
        }
        let last = self.last_op();
        let from = from.max(self.stored_first).min(last + 1);
        let dvc = |op_start, entries| Message::DoViewChange {
            view: self.view,
            log_view: self.log_view,
            last_op: last,
            commit: self.commit,
            op_start,
            entries,
        };
        if from < self.first_op && !summary {
            // Part of it left memory: the node reads it back from the log
            // (a chunk's worth).
            out.push(Command::SendFromLog {
                to: self.leader(),
                msg: dvc(from, Vec::new()),
                from,
                upto: self.chunk_upto(from, last),
            });
            return;
        }
        // (Empty when `from` left memory: then only the summary goes.)
        let entries = self.chunk(from, last);
        let whole = from + entries.len() as u64 == last + 1;
        if summary && !whole {
            self.send(out, self.leader(), dvc(last + 1, Vec::new()));
        } else {
            self.send(out, self.leader(), dvc(from, entries));
        }
    }

    /// New leader: asks `b` for its DoViewChange's entries from `from` on,
    /// unless that chunk was asked for lately and may be on its way.
    fn ask_dvc(&mut self, b: NodeId, from: u64, out: &mut Vec<Command>) {
        let again_after = self.cfg.heartbeat_ns.max(self.cfg.election_timeout_ns / 4);
        let (to, asked, at) = self.asked_dvc;
        if (to, asked) == (b, from) && self.now.saturating_sub(at) < again_after {
            return;
        }
        self.asked_dvc = (b, from, self.now);
        self.send(
            out,
            b,
            Message::RequestDoViewChange {
                view: self.view,
                from,
            },
        );
    }

    /// New leader: a large log is arriving in chunks from `from`. The view
    /// change is making progress, so this replica and the others wait for
    /// it rather than time out and move to another view: the others hear a
    /// request for nothing more than their log's state. (It goes out only
    /// as chunks arrive: a leader that stops getting them lets the timers
    /// run out.)
    fn log_arriving(&mut self, from: NodeId, out: &mut Vec<Command>) {
        self.reset_election_deadline();
        for f in self.others() {
            if f == from {
                continue;
            }
            let past = self
                .dvcs
                .get(&f)
                .map_or(self.last_op(), |d| d.last_op)
                .max(self.last_op())
                + 1;
            self.send(
                out,
                f,
                Message::RequestDoViewChange {
                    view: self.view,
                    from: past,
                },
            );
        }
    }

    /// At the new leader: with a majority of DoViewChanges, merge the logs and start the view.
    fn try_start_view(&mut self, out: &mut Vec<Command>) {
        // Leading a view counts this replica's log as one of the majority's:
        // not before it has the log it rejoined for.
        if self.status != Status::ViewChange || !self.is_leader() || self.rejoin_upto.is_some() {
            return;
        }
        if self.dvcs.len() + 1 < self.cfg.quorum() {
            return;
        }
        // The best log: highest log view, then longest. Ties prefer our own.
        let mut best: Option<NodeId> = None;
        let mut best_key = (self.log_view, self.last_op());
        if !self.cfg.bugs.skip_log_merge {
            for (&from, d) in &self.dvcs {
                if (d.log_view, d.last_op) > best_key {
                    best_key = (d.log_view, d.last_op);
                    best = Some(from);
                }
            }
        }
        let new_commit = self
            .dvcs
            .values()
            .map(|d| d.commit)
            .fold(self.commit, u64::max);
        if let Some(b) = best {
            let d = &self.dvcs[&b];
            // We lack entries between our commit point and what it sent, or
            // the rest of a log too large for one message.
            let lacking = if d.op_start > self.commit + 1 {
                Some(self.commit + 1)
            } else if d.end() <= d.last_op {
                Some(d.end())
            } else {
                None
            };
            if let Some(from) = lacking {
                self.ask_dvc(b, from, out);
                return;
            }
            let d = self.dvcs.remove(&b).expect("present");
            // Keep our entries up to the first one that differs from the best log.
            let mut keep = d.op_start - 1;
            for e in &d.entries {
                if e.op < self.first_op {
                    // Delivered here, so committed: the same entry in every log.
                    keep = e.op;
                    continue;
                }
                match self.entry(e.op) {
                    Some(mine) if mine.view == e.view => keep = e.op,
                    _ => break,
                }
            }
            if keep < self.last_op() {
                self.truncate_local(keep, out);
            }
            let rest: Vec<Entry> = d.entries.into_iter().filter(|e| e.op > keep).collect();
            self.append_local(rest, out);
            if self.last_op() > d.last_op {
                let cut = d.last_op;
                self.truncate_local(cut, out);
            }
        }
        self.commit = self.commit.max(new_commit.min(self.last_op()));
        self.log_view = self.view;
        let dvc_commits: BTreeMap<NodeId, u64> =
            self.dvcs.iter().map(|(&k, d)| (k, d.commit)).collect();
        self.dvcs.clear();
        self.become_leader_state();
        for f in self.others() {
            let fi = f as usize;
            self.next[fi] = dvc_commits
                .get(&f)
                .map(|c| c + 1)
                .unwrap_or(self.commit + 1)
                .max(1);
        }
        out.push(Command::SaveState(self.persistent_state()));
        out.push(Command::RoleChanged {
            role: Role::Leader,
            view: self.view,
            leader: self.cfg.id,
        });
        self.deliver(out);
        // The view starts with a Noop, then closes every connection still open,
        // so every replica closes them alike.
        let mut open = self.open_conns.clone();
        for op in self.commit + 1..=self.last_op() {
            let e = self.entry(op).expect("in memory");
            e.track_open(&mut open);
        }
        let mut batch = Vec::new();
        let mut op = self.last_op();
        let mut push = |kind, conn| {
            op += 1;
            batch.push(Entry {
                view: self.view,
                op,
                kind,
                conn,
                time_ns: self.now,
                payload: Bytes::new(),
            });
        };
        push(Kind::Noop, 0);
        for conn in open {
            push(Kind::Close, conn);
        }
        self.append_local(batch, out);
        for f in self.others() {
            let from = self.next[f as usize];
            self.send_start_view(f, from, out);
        }
        self.try_commit(out);
    }

    /// Tells follower `f` that what it needs is compacted away here.
    fn send_need_snapshot(&mut self, f: NodeId, out: &mut Vec<Command>) {
        // What our snapshot covers: the ops before our log (not before
        // what memory holds, which may be far past the snapshot).
        let msg = Message::NeedSnapshot {
            view: self.view,
            op: self.stored_first - 1,
        };
        self.send(out, f, msg);
        self.last_sent[f as usize] = self.now;
    }

    /// Sends follower `f` our whole log from `from` (VR's StartView).
    fn send_start_view(&mut self, f: NodeId, from: u64, out: &mut Vec<Command>) {
        let fi = f as usize;
        let from = from.clamp(1, self.last_op() + 1);
        if self.catch_up_from_below(f, from, out) {
            return;
        }
        // The same log (or chunk) went to it within a heartbeat: a follower
        // asks again at every message it hears, and a copy per request could
        // be megabytes each.
        let (last_from, at) = self.catch_up_sent[fi];
        if last_from == from && self.now.saturating_sub(at) < self.cfg.heartbeat_ns {
            return;
        }
        self.catch_up_sent[fi] = (from, self.now);
        let whole = self.chunk(from, self.last_op());
        let fits = from + whole.len() as u64 > self.last_op();
        if !fits && from <= self.commit {
            // Far behind, or a log too large for one message: committed
            // entries first, in chunks it asks for one by one.
            let end = self.commit.min(from + self.cfg.catch_up_entries - 1);
            let mut entries = whole;
            entries.truncate((end + 1 - from) as usize);
            let msg = Message::CatchUp {
                view: self.view,
                op_start: from,
                entries,
                commit: self.commit,
            };
            self.send(out, f, msg);
            self.last_sent[fi] = self.now;
            if self.acked[fi] >= from {
                self.acked[fi] = from - 1;
            }
            return;
        }
        // Uncommitted entries too many for one message go in parts: the
        // follower asks for each next one and installs them together.
        let entries = whole;
        self.next[fi] = from + entries.len() as u64;
        self.in_parts[fi] = (!fits).then_some(self.now);
        if self.acked[fi] >= from {
            // It lost what it acknowledged (it moved views or restarted): count again.
            self.acked[fi] = from - 1;
        }
        self.send(
            out,
            f,
            Message::StartView {
                view: self.view,
                op_start: from,
                entries,
                commit: self.commit,
                last_op: self.last_op(),
            },
        );
        self.last_sent[fi] = self.now;
    }

    fn become_leader_state(&mut self) {
        self.status = Status::Normal;
        let n = self.cfg.n as usize;
        self.acked = vec![0; n];
        self.next = vec![self.commit + 1; n];
        self.last_sent = vec![0; n];
        self.told = vec![0; n];
        self.untold_since = None;
        self.catch_up_sent = vec![(0, 0); n];
        self.in_parts = vec![None; n];
        self.transfer = None;
    }

    fn truncate_local(&mut self, after: u64, out: &mut Vec<Command>) {
        assert!(
            after + 1 >= self.first_op,
            "truncation below the first op in memory"
        );
        assert!(
            after >= self.delivered,
            "truncating delivered entries (op {after} < delivered {})",
            self.delivered
        );
        while self.last_op() > after {
            if let Some(e) = self.log.pop_back() {
                self.log_bytes -= entry_bytes(&e);
            }
        }
        self.verified = self.verified.min(after);
        self.durable = self.durable.min(after);
        out.push(Command::Truncate { after });
    }

    /// Moves to a higher view we learnt of from a message of its normal
    /// operation: we missed its start, so we wait for the leader's log.
    fn adopt_view(&mut self, view: u64, out: &mut Vec<Command>) {
        self.probe = None;
        self.asked_log = (0, 0);
        self.asked_dvc = (0, 0, 0);
        self.start_parts = None;
        self.verified = 0;
        self.view = view;
        self.status = Status::ViewChange;
        self.dvcs.clear();
        self.transfer = None;
        self.reset_election_deadline();
        out.push(Command::SaveState(self.persistent_state()));
        out.push(Command::RoleChanged {
            role: Role::ViewChange,
            view,
            leader: self.leader(),
        });
    }

    /// Installs a leader's log that starts at `op_start` (StartView / catch-up
    /// across views): everything above `op_start - 1` is replaced.
    fn install(
        &mut self,
        from: NodeId,
        op_start: u64,
        entries: Vec<Entry>,
        commit: u64,
        out: &mut Vec<Command>,
    ) {
        let trusted = self.trusted_last();
        if op_start > trusted + 1 || op_start > self.last_op() + 1 || op_start < self.first_op {
            // Our entries between the commit point and op_start may be stale.
            self.ask_leader_for_log(out);
            return;
        }
        // Entries of the same view at the same op are the same entry; the
        // first one that differs starts our stale suffix.
        let diverges = entries
            .iter()
            .find(|e| self.entry(e.op).is_some_and(|mine| mine.view != e.view))
            .map(|e| e.op);
        if let Some(op) = diverges {
            self.truncate_local((op - 1).max(self.delivered), out);
        }
        let end = op_start + entries.len() as u64 - 1;
        let rest: Vec<Entry> = entries
            .into_iter()
            .filter(|e| e.op > self.last_op())
            .collect();
        self.append_local(rest, out);
        if self.last_op() > end && self.status == Status::ViewChange {
            // Beyond the new leader's log: stale. (In step with the view
            // already, entries beyond are the leader's and may be acknowledged:
            // a late StartView must not cut them.)
            self.truncate_local(end.max(self.delivered), out);
        }
        let was = (self.status, self.log_view);
        self.status = Status::Normal;
        self.log_view = self.view;
        if was != (Status::Normal, self.view) {
            out.push(Command::SaveState(self.persistent_state()));
            out.push(Command::RoleChanged {
                role: Role::Follower,
                view: self.view,
                leader: self.leader(),
            });
        }
        self.probe = None;
        self.heard_from_leader();
        self.learn_commit(commit, out);
        out.push(Command::Send {
            to: from,
            msg: Message::PrepareOk {
                view: self.view,
                op: self.last_op(),
            },
            after_durable: self.last_op(),
        });
    }

    /// A StartView, whole or a part of one (its entries end before the
    /// leader's last op). In step with the view already, every entry is the
    /// leader's and goes in at once; otherwise parts are kept aside, the
    /// next one asked for, and the log installed once it is whole: a log
    /// view never stands for a log held in part, and nothing of this log
    /// is cut for a log not yet here.
    fn start_view_part(
        &mut self,
        from: NodeId,
        op_start: u64,
        entries: Vec<Entry>,
        commit: u64,
        last_op: u64,
        out: &mut Vec<Command>,
    ) {
        if op_start == 0 {
            // Ops start at 1: from no correct leader.
            return;
        }
        let end = op_start + entries.len() as u64;
        let whole = end > last_op;
        if self.status == Status::Normal || (whole && self.start_parts.is_none()) {
            self.start_parts = None;
            self.install(from, op_start, entries, commit, out);
            return;
        }
        // Parts may come twice or out of order: overlapping ones are the
        // same log (one leader, one view) and are merged.
        let trusted = self.trusted_last();
        if self.parts_end().is_some_and(|end| end <= trusted + 1) {
            // Committed entries (CatchUp) took us past what was held.
            self.start_parts = None;
        }
        let (start, mut parts) = match self.start_parts.take() {
            // What is held (or matched ours) runs up to `held`: a part that
            // starts there or before adds what comes after it.
            Some((s, mut p)) if op_start <= s + p.len() as u64 => {
                let held = s + p.len() as u64;
                p.extend(entries.into_iter().filter(|e| e.op >= held));
                (s, p)
            }
            // A gap: keep what is held (the next part is asked for below).
            Some((s, p)) => (s, p),
            None if op_start <= trusted + 1 => (op_start, entries),
            None => {
                self.ask_leader_for_log(out);
                return;
            }
        };
        self.heard_from_leader();
        // Entries the same as ours (same op, same view: the same entry) are
        // not kept: after a whole cluster restarts, every part is most often
        // the log each follower has already.
        let same = parts
            .iter()
            .take_while(|e| self.entry(e.op).is_some_and(|mine| mine.view == e.view))
            .count();
        parts.drain(..same);
        let start = start + same as u64;
        self.verified = self.verified.max(start.saturating_sub(1));
        let held = start + parts.len() as u64;
        if held > last_op {
            parts.truncate((last_op + 1).saturating_sub(start) as usize);
            self.install(from, start, parts, commit, out);
        } else {
            self.start_parts = Some((start, parts));
            self.send(
                out,
                from,
                Message::Missing {
                    view: self.view,
                    from: held,
                },
            );
        }
    }

    /// Takes committed entries from the leader (any view state: every later
    /// log holds them), then asks for what follows.
    fn catch_up(
        &mut self,
        from: NodeId,
        op_start: u64,
        entries: Vec<Entry>,
        commit: u64,
        out: &mut Vec<Command>,
    ) {
        let end = op_start + entries.len() as u64;
        if op_start > self.last_op() + 1 && self.start_parts.take().is_some() {
            // Committed past the StartView parts held, but not contiguous
            // with our log: drop them and ask from what we can trust.
            self.ask_leader_for_log(out);
            return;
        }
        if entries.is_empty() || end - 1 > commit || op_start > self.last_op() + 1 {
            return;
        }
        // The leader spoke (a big catch-up must not look like silence).
        self.heard_from_leader();
        // Entries below first_op were delivered here, so committed: the
        // same in every log. (A leader that missed our acknowledgements
        // sends from further back than we need.)
        let (op_start, entries) = if op_start < self.first_op {
            let skip = ((self.first_op - op_start) as usize).min(entries.len());
            (
                op_start + skip as u64,
                entries.into_iter().skip(skip).collect(),
            )
        } else {
            (op_start, entries)
        };
        // Committing through `end - 1` commits our entries before op_start
        // too: only safe up to where they are known to be the leader's.
        let trusted = self.trusted_last();
        if op_start > trusted + 1 {
            self.send(
                out,
                from,
                Message::Missing {
                    view: self.view,
                    from: trusted + 1,
                },
            );
            return;
        }
        let diverges = entries
            .iter()
            .find(|e| self.entry(e.op).is_some_and(|mine| mine.view != e.view))
            .map(|e| e.op);
        if let Some(op) = diverges {
            self.truncate_local((op - 1).max(self.delivered), out);
        }
        let rest: Vec<Entry> = entries
            .into_iter()
            .filter(|e| e.op > self.last_op())
            .collect();
        if !rest.is_empty() {
            self.append_local(rest, out);
        }
        self.learn_commit(end - 1, out);
        // (Past what it delivered: a chunk it already had asks for new entries.)
        self.send(
            out,
            from,
            Message::Missing {
                view: self.view,
                from: end.max(self.commit + 1),
            },
        );
    }

    /// Asks the leader for its log from what we trust: our commit point
    /// (only committed entries are known to match the leader's), or past
    /// what StartView parts matched or brought.
    fn ask_leader_for_log(&mut self, out: &mut Vec<Command>) {
        // Past the parts of a StartView held already.
        let from = self
            .parts_end()
            .unwrap_or(0)
            .max((self.trusted_last() + 1).max(self.first_op));
        let (last, at) = self.asked_log;
        if last == from
            && self.now.saturating_sub(at)
                < (self.cfg.election_timeout_ns / 2).max(self.cfg.heartbeat_ns)
        {
            // Asked already; the answer (a whole log, perhaps) may be on its way.
            return;
        }
        self.asked_log = (from, self.now);
        self.send(
            out,
            self.leader(),
            Message::Missing {
                view: self.view,
                from,
            },
        );
    }

    fn learn_commit(&mut self, commit: u64, out: &mut Vec<Command>) {
        let c = commit.min(self.last_op());
        if c > self.commit {
            self.commit = c;
            self.deliver(out);
        }
    }

    // ---- messages ----

    fn on_receive(&mut self, env: Envelope, out: &mut Vec<Command>) {
        if env.cluster != self.cfg.cluster_id
            || env.from >= self.cfg.n
            || env.from == self.cfg.id
            || env.to != self.cfg.id
        {
            return;
        }
        if !plausible(&env.msg) {
            return;
        }
        if self.recovering.is_some() {
            return self.on_receive_recovering(env, out);
        }
        if matches!(
            env.msg,
            Message::SnapshotRequest { .. }
                | Message::SnapshotChunk { .. }
                | Message::LinkSetup { .. }
        ) {
            // The node moves snapshots and transports set up links; they say nothing about views.
            return;
        }
        let from = env.from;
        let v = env.msg.view();
        match env.msg {
            Message::Recover { nonce, .. } => {
                self.answer_recover(from, nonce, out);
                return;
            }
            Message::RecoverOk { .. } => return,
            // Pre-votes promise nothing and move no view.
            Message::ViewProbe { view } => {
                if view > self.view && self.leaderless() && self.rejoin_upto.is_none() {
                    self.send(out, from, Message::ViewProbeOk { view });
                } else if view <= self.view {
                    // The prober is behind: it learns of this view.
                    self.send(out, from, Message::NewerView { view: self.view });
                }
                return;
            }
            Message::ViewProbeOk { view } => {
                let quorum = self.cfg.quorum();
                if let Some((pv, yes)) = &mut self.probe {
                    if *pv == view && view == self.view + 1 {
                        yes.insert(from);
                        if yes.len() + 1 >= quorum {
                            self.probe = None;
                            self.start_view_change(view, out);
                        }
                    }
                }
                return;
            }
            _ => {}
        }
        if v < self.view {
            if !matches!(env.msg, Message::NewerView { .. }) {
                self.send(out, from, Message::NewerView { view: self.view });
            }
            return;
        }
        if v > self.view {
            match &env.msg {
                Message::StartViewChange { .. }
                | Message::DoViewChange { .. }
                | Message::RequestDoViewChange { .. } => {
                    // A follower that hears from a working leader joins no
                    // view change but the leader's own (a transfer): one
                    // replica — restarted, cut off, or hostile with the key —
                    // cannot move a working cluster to another view.
                    if self.status == Status::Normal
                        && !self.is_leader()
                        && !self.leaderless()
                        && from != self.leader()
                    {
                        return;
                    }
                    self.start_view_change(v, out)
                }
                _ if from != self.cfg.leader_of(v) => {
                    // Only a view's leader speaks for it outside a view
                    // change (it reaches every replica with its heartbeats);
                    // a newer view claimed by anyone else moves nothing.
                    return;
                }
                _ => self.adopt_view(v, out),
            }
        }
        match env.msg {
            Message::Prepare {
                op_start,
                entries,
                commit,
                ..
            } => self.on_prepare(from, op_start, entries, commit, out),
            Message::CatchUp {
                op_start,
                entries,
                commit,
                ..
            } if self.accepts_log(from, op_start, &entries) => {
                self.catch_up(from, op_start, entries, commit, out)
            }
            Message::StartView {
                op_start,
                entries,
                commit,
                last_op,
                ..
            } if self.accepts_log(from, op_start, &entries) => {
                self.start_view_part(from, op_start, entries, commit, last_op, out)
            }
            Message::CatchUp { .. } | Message::StartView { .. } => {}
            Message::PrepareOk { op, .. } => {
                if self.status == Status::Normal && self.is_leader() {
                    let fi = from as usize;
                    // In step with this view: it installed the whole log.
                    self.in_parts[fi] = None;
                    if op > self.acked[fi] {
                        self.acked[fi] = op.min(self.last_op());
                        self.next[fi] = self.next[fi].max(self.acked[fi] + 1);
                        self.try_commit(out);
                    }
                    self.pump(from, out);
                    self.check_transfer(out);
                }
            }
            Message::Commit { commit, .. } => {
                if from != self.leader() {
                    return;
                }
                match self.status {
                    Status::Normal => {
                        self.heard_from_leader();
                        self.learn_commit(commit, out);
                        if commit > self.last_op() {
                            // The leader committed past our log and sends
                            // no Prepares: what it sent us went missing.
                            self.ask_leader_for_log(out);
                        }
                    }
                    Status::ViewChange => {
                        self.ask_leader_for_log(out);
                    }
                }
            }
            Message::Missing { from: from_op, .. } => {
                if self.status == Status::Normal && self.is_leader() {
                    if let Some(t) = &mut self.in_parts[from as usize] {
                        *t = self.now;
                    }
                    self.send_start_view(from, from_op, out);
                }
            }
            Message::StartViewChange { .. } => {}
            Message::DoViewChange {
                log_view,
                last_op,
                commit,
                op_start,
                entries,
                ..
            } => {
                if !self.is_leader() {
                    return;
                }
                match self.status {
                    Status::ViewChange => {
                        // The whole suffix from op_start, or a chunk of it.
                        let consistent = entries.len() as u64
                            <= (last_op + 1).saturating_sub(op_start)
                            && Self::consecutive(op_start, &entries, self.view);
                        if !consistent {
                            return;
                        }
                        let new = Dvc {
                            log_view,
                            last_op,
                            commit,
                            op_start,
                            entries,
                        };
                        // Progress: a chunk of a log too large for one
                        // message that brings entries not held yet (the
                        // same chunk again keeps no timer from running out).
                        let chunked = !new.entries.is_empty() && new.end() <= new.last_op;
                        let grew = match self.dvcs.remove(&from) {
                            Some(old) => {
                                let (d, grew) = Dvc::merged(old, new);
                                self.dvcs.insert(from, d);
                                grew
                            }
                            None => {
                                self.dvcs.insert(from, new);
                                true
                            }
                        };
                        if grew && chunked {
                            self.log_arriving(from, out);
                        }
                        self.try_start_view(out);
                    }
                    Status::Normal => {
                        // It missed our start: send it the log from its commit point.
                        self.send_start_view(from, commit + 1, out);
                    }
                }
            }
            Message::RequestDoViewChange { from: from_op, .. } => {
                if self.status == Status::ViewChange && from == self.leader() {
                    // The view's leader is gathering the logs (in chunks,
                    // if they are large): wait for it.
                    self.reset_election_deadline();
                    self.send_dvc(from_op, false, out);
                }
            }
            Message::NewerView { .. } => {
                if self.status == Status::ViewChange && !self.is_leader() {
                    self.ask_leader_for_log(out);
                }
            }
            Message::SnapshotRequest { .. }
            | Message::SnapshotChunk { .. }
            | Message::LinkSetup { .. }
            | Message::ViewProbe { .. }
            | Message::ViewProbeOk { .. }
            | Message::Recover { .. }
            | Message::RecoverOk { .. } => {}
            Message::NeedSnapshot { op, .. } => {
                if from == self.leader() && op > self.commit && self.snapshot_wait.is_none() {
                    self.snapshot_wait = Some(op);
                    out.push(Command::FetchSnapshot { from, op });
                }
            }
        }
    }

    fn on_prepare(
        &mut self,
        from: NodeId,
        op_start: u64,
        entries: Vec<Entry>,
        commit: u64,
        out: &mut Vec<Command>,
    ) {
        if from != self.leader() || self.is_leader() {
            return;
        }
        if !Self::consecutive(op_start, &entries, self.view) {
            return;
        }
        if self.status == Status::ViewChange {
            // We have not installed this view's log yet: ask for all of it.
            self.ask_leader_for_log(out);
            return;
        }
        self.heard_from_leader();
        let last = self.last_op();
        if op_start > last + 1 {
            self.send(
                out,
                from,
                Message::Missing {
                    view: self.view,
                    from: last + 1,
                },
            );
            self.learn_commit(commit, out);
            return;
        }
        let new: Vec<Entry> = entries.into_iter().filter(|e| e.op > last).collect();
        self.append_local(new, out);
        self.learn_commit(commit, out);
        out.push(Command::Send {
            to: from,
            msg: Message::PrepareOk {
                view: self.view,
                op: self.last_op(),
            },
            after_durable: self.last_op(),
        });
    }

    /// A log transfer (StartView, CatchUp) comes from this view's leader,
    /// to a replica that does not lead, with entries in order.
    fn accepts_log(&self, from: NodeId, op_start: u64, entries: &[Entry]) -> bool {
        from == self.leader()
            && !self.is_leader()
            && Self::consecutive(op_start, entries, self.view)
    }

    /// The last op of ours known to be in the leader's log: in step with this
    /// view already, our whole log is a prefix of the leader's; otherwise only
    /// our committed entries are known to be.
    fn trusted_last(&self) -> u64 {
        if self.status == Status::Normal {
            self.last_op()
        } else {
            self.commit.max(self.verified)
        }
    }

    fn consecutive(op_start: u64, entries: &[Entry], view: u64) -> bool {
        entries
            .iter()
            .enumerate()
            .all(|(i, e)| e.op == op_start + i as u64 && e.view <= view)
    }

    fn on_snapshot_installed(&mut self, op: u64, open_conns: Vec<u64>, out: &mut Vec<Command>) {
        self.snapshot_wait = None;
        if op <= self.commit {
            return;
        }
        self.open_conns = open_conns.into_iter().collect();
        self.start_parts = None;
        self.verified = 0;
        // Installing took time the leader did not go silent in.
        self.reset_election_deadline();
        self.log.clear();
        self.delivered_bytes = 0;
        self.log_bytes = 0;
        self.first_op = op + 1;
        self.stored_first = op + 1;
        self.commit = op;
        self.delivered = op;
        self.durable = op;
        if self.status == Status::Normal && !self.is_leader() {
            let leader = self.leader();
            self.send(
                out,
                leader,
                Message::Missing {
                    view: self.view,
                    from: op + 1,
                },
            );
        }
    }
}
