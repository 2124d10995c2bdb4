//! The deterministic simulator: a cluster of real engines over a simulated
//! network, disk and clock, driven by one seed.
//!
//! One seed chooses every knob: cluster size, message loss, duplication,
//! delay (and so reordering), symmetric and asymmetric partitions, crash and
//! restart of any replica (the leader included) with the real log format on a
//! simulated disk that loses unsynced writes and tears the last one, slow
//! fsyncs, and the clients' workload. A run has two phases: **safety** under
//! faults, then **liveness** after healing, where every client request must
//! complete within a bounded simulated time. The checkers in [`check`] run as
//! the simulation goes; a failure names the seed and the command that
//! replays it.

pub mod check;
pub mod kv;

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};

use bytes::Bytes;

use crate::consensus::{
    Bugs, Command, Config, Envelope, Event, Input, Message, NodeId, PersistentState, Reject,
    Replica, Role,
};
use crate::log::storage::SplitMix;
use crate::log::{Entry, Kind, LogOptions, MemStorage, SegmentLog};
use check::{Checkers, Completed, Violation};
use kv::{Kv, Op, Request};

const MS: u64 = 1_000_000;
const CLUSTER: u64 = 0x51a1;

/// Options that are not chosen by the seed.
#[derive(Clone, Debug, Default)]
pub struct SimOptions {
    /// Protocol-breaking switches (to show the checkers catch bugs).
    pub bugs: Bugs,
    /// Print a line per fault and view change.
    pub verbose: bool,
}

/// The knobs one seed chose.
#[derive(Clone, Debug)]
pub struct Knobs {
    /// Replicas.
    pub n: u32,
    /// Clients.
    pub clients: u32,
    /// Requests per client in the safety phase.
    pub requests: u32,
    /// Probability a message is lost (safety phase).
    pub loss: f64,
    /// Probability a message is delivered twice.
    pub duplicate: f64,
    /// Message delay range, ns.
    pub delay_ns: (u64, u64),
    /// fsync latency range, ns.
    pub fsync_ns: (u64, u64),
    /// Mean time between crashes of some replica (0: none), ns.
    pub crash_every_ns: u64,
    /// Mean time between partition changes (0: none), ns.
    pub partition_every_ns: u64,
    /// Length of the safety phase, ns.
    pub safety_ns: u64,
    /// Entries an engine keeps in memory below its commit point (None: all);
    /// older ones are read back from the log for a follower that needs them.
    pub forget_keep: Option<u64>,
    /// Bytes of entries in a DoViewChange, StartView or CatchUp at most
    /// (the engine's `chunk_bytes_max`); small, logs move in chunks.
    pub chunk_bytes: usize,
    /// How often a replica saves its commit point beside its log (None:
    /// never); a restarted replica takes the ops up to it as committed,
    /// replays them from its log, and holds only the rest in memory.
    pub commit_save_ns: Option<u64>,
    /// Some crashes also lose the replica's whole disk (its data directory
    /// emptied): it restarts without any state and must recover from the
    /// others. One at a time: a second replica loses its disk only once
    /// the first has the leader's log again.
    pub wipe: bool,
    /// The replicas start as replicas without state that find out the
    /// cluster is new ([`Replica::recovering`]), not as [`Replica::new`].
    pub start_recovering: bool,
}

impl Knobs {
    fn choose(rng: &mut SplitMix) -> Knobs {
        let pick = |rng: &mut SplitMix, lo: u64, hi: u64| lo + rng.next_u64() % (hi - lo + 1);
        let n = [1, 3, 3, 3, 3, 3, 5, 5, 7, 9][(rng.next_u64() % 10) as usize];
        let max_delay = pick(rng, MS / 5, 8 * MS);
        Knobs {
            n,
            clients: pick(rng, 1, 6) as u32,
            requests: pick(rng, 10, 80) as u32,
            loss: (rng.next_u64() % 11) as f64 / 100.0,
            duplicate: (rng.next_u64() % 6) as f64 / 100.0,
            delay_ns: (50_000, max_delay),
            fsync_ns: (pick(rng, 20_000, 200_000), pick(rng, 300_000, 6 * MS)),
            crash_every_ns: if rng.next_u64() % 4 == 0 {
                0
            } else {
                pick(rng, 80 * MS, 600 * MS)
            },
            partition_every_ns: if rng.next_u64() % 3 == 0 {
                0
            } else {
                pick(rng, 100 * MS, 800 * MS)
            },
            safety_ns: pick(rng, 800 * MS, 3000 * MS),
            forget_keep: (rng.next_u64() % 2 == 0).then(|| rng.next_u64() % 8),
            // Drawn from a copy of the generator: the other knobs and the
            // run of every seed stay what they were before this knob.
            chunk_bytes: {
                let mut r = rng.clone();
                r.next_u64();
                // 10 to 25 entries per message (each is about 60 bytes), or
                // no limit that a seed's log could reach.
                if r.next_u64() % 2 == 0 {
                    600 + (r.next_u64() % 1000) as usize
                } else {
                    8 << 20
                }
            },
            // Likewise (further along a copy).
            commit_save_ns: {
                let mut r = rng.clone();
                for _ in 0..5 {
                    r.next_u64();
                }
                (r.next_u64() % 3 != 0).then(|| pick(&mut r, MS, 100 * MS))
            },
            // Likewise (further along a copy still).
            wipe: {
                let mut r = rng.clone();
                for _ in 0..9 {
                    r.next_u64();
                }
                r.next_u64() % 3 == 0
            },
            start_recovering: {
                let mut r = rng.clone();
                for _ in 0..11 {
                    r.next_u64();
                }
                r.next_u64() % 2 == 0
            },
        }
    }
}

/// What a clean run did.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Entries committed.
    pub committed: u64,
    /// Client operations completed.
    pub completed: u64,
    /// Crashes injected.
    pub crashes: u64,
    /// Of them, crashes that lost the replica's disk.
    pub wipes: u64,
    /// Partition changes injected.
    pub partitions: u64,
    /// Highest view reached.
    pub max_view: u64,
    /// Simulated time, ns.
    pub sim_ns: u64,
    /// Events processed.
    pub events: u64,
    /// Restarts that took ops as committed from a saved commit point.
    pub restarts_from_commit_point: u64,
}

/// A failed run.
#[derive(Clone, Debug)]
pub struct Failure {
    /// The seed.
    pub seed: u64,
    /// The broken invariant.
    pub violation: Violation,
    /// Simulated time of the failure, ns.
    pub at_ns: u64,
    /// The knobs.
    pub knobs: Knobs,
}

impl Failure {
    /// The one command that replays this failure.
    pub fn replay_command(&self) -> String {
        format!(
            "FALCON_SIM_SEED={} cargo test --release --test sim replay -- --ignored --nocapture",
            self.seed
        )
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "seed {} failed at {:.3} s: {}\n  knobs: {:?}\n  replay: {}",
            self.seed,
            self.at_ns as f64 / 1e9,
            self.violation,
            self.knobs,
            self.replay_command()
        )
    }
}

#[derive(Debug)]
enum Ev {
    Tick(u32),
    Net {
        to: u32,
        env: Envelope,
    },
    Sync {
        node: u32,
        epoch: u64,
    },
    Crash,
    Restart(u32),
    Partition,
    Heal,
    ToNode {
        node: u32,
        req: Request,
    },
    ToClient {
        client: u32,
        seq: u64,
        reply: Reply,
    },
    ClientRetry {
        client: u32,
        seq: u64,
        attempt: u32,
        advance: bool,
    },
    ClientNext(u32),
    End,
}

#[derive(Clone, Debug)]
enum Reply {
    Done(String),
    Redirect(Option<NodeId>),
}

struct Node {
    engine: Option<Replica>,
    storage: MemStorage,
    log: Option<SegmentLog<MemStorage>>,
    held: Vec<(u64, NodeId, Message)>,
    /// Fingerprints of the durable log from op 1 (for the durability checker).
    durable_fp: Vec<u64>,
    sync_pending: bool,
    epoch: u64,
    kv: Kv,
    /// When the commit point was last saved.
    commit_saved_at: u64,
    /// Not stepped since it (re)started: its first step, a tick perhaps,
    /// saves its state whatever the time.
    fresh: bool,
    /// Commands its engine gave out so far.
    commands: u64,
    /// When its next tick is due: the one live [`Ev::Tick`] (others are
    /// stale, left by a re-plan, and skipped).
    tick_at: u64,
}

impl Node {
    /// The last op on disk (0 while the node is down).
    fn durable_op(&self) -> u64 {
        self.log.as_ref().map_or(0, |l| l.durable_op())
    }
}

struct Client {
    seq: u64,
    op: Option<Op>,
    invoked: u64,
    target: u32,
    done: u32,
    budget: u32,
    attempt: u32,
}

struct Sim {
    rng: SplitMix,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64, usize)>>,
    events: Vec<Option<Ev>>,
    free: Vec<usize>,
    knobs: Knobs,
    opts: SimOptions,
    seed: u64,
    nodes: Vec<Node>,
    clients: Vec<Client>,
    /// Links cut: (from, to).
    cut: BTreeSet<(u32, u32)>,
    healed: bool,
    /// The replica that last lost its disk.
    wiped: Option<u32>,
    check: Checkers,
    history: Vec<Completed>,
    report: Report,
    steps_since_matching: u32,
}

fn log_opts(node: u32) -> LogOptions {
    LogOptions {
        segment_bytes_max: 16 << 10,
        ..LogOptions::new(CLUSTER, node)
    }
}

impl Sim {
    fn at(&mut self, t: u64, ev: Ev) {
        let i = match self.free.pop() {
            Some(i) => {
                self.events[i] = Some(ev);
                i
            }
            None => {
                self.events.push(Some(ev));
                self.events.len() - 1
            }
        };
        self.seq += 1;
        self.queue.push(Reverse((t, self.seq, i)));
    }

    fn chance(&mut self, p: f64) -> bool {
        (self.rng.next_u64() % 1_000_000) as f64 / 1e6 < p
    }

    fn range(&mut self, (lo, hi): (u64, u64)) -> u64 {
        lo + self.rng.next_u64() % (hi.saturating_sub(lo) + 1)
    }

    fn config(&self, id: u32) -> Config {
        Config {
            heartbeat_ns: 5 * MS,
            election_timeout_ns: 40 * MS,
            batch_entries_max: 64,
            pipeline_ops_max: 256,
            uncommitted_max: 4096,
            transfer_timeout_ns: 500 * MS,
            catch_up_entries: 24,
            chunk_bytes_max: self.knobs.chunk_bytes,
            bugs: self.opts.bugs,
            ..Config::new(CLUSTER, id, self.knobs.n)
        }
    }

    fn fail(&self, violation: Violation) -> Failure {
        Failure {
            seed: self.seed,
            violation,
            at_ns: self.now,
            knobs: self.knobs.clone(),
        }
    }

    fn note(&self, msg: impl FnOnce() -> String) {
        if self.opts.verbose {
            eprintln!("{:>9.3} ms  {}", self.now as f64 / 1e6, msg());
        }
    }

    fn send_net(&mut self, from: u32, to: u32, msg: Message) {
        let loss = if self.healed { 0.0 } else { self.knobs.loss };
        if self.cut.contains(&(from, to)) || self.chance(loss) {
            return;
        }
        let copies = if self.chance(self.knobs.duplicate) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let d = self.range(self.knobs.delay_ns);
            let env = Envelope {
                cluster: CLUSTER,
                from,
                to,
                msg: msg.clone(),
            };
            self.at(self.now + d, Ev::Net { to, env });
        }
    }

    /// Makes `at` the time of `node`'s next tick (an earlier one planned
    /// before goes stale).
    fn plan_tick(&mut self, node: u32, at: u64) {
        self.nodes[node as usize].tick_at = at;
        self.at(at, Ev::Tick(node));
    }

    /// Feeds an input to a node's engine and executes the commands.
    fn step(&mut self, node: u32, input: Input) -> Result<(), Violation> {
        let mut inputs = vec![input];
        while let Some(input) = inputs.pop() {
            let Some(engine) = self.nodes[node as usize].engine.as_mut() else {
                return Ok(());
            };
            let mut out = Vec::new();
            let now = self.now;
            let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                engine.step(now, input, &mut out)
            }));
            if let Err(p) = stepped {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                return Err(Violation {
                    checker: "engine-assertion",
                    detail: format!("node {node}: {msg}"),
                });
            }
            let (view, commit) = (engine.view(), engine.commit());
            let n = &mut self.nodes[node as usize];
            n.fresh = false;
            n.commands += out.len() as u64;
            for cmd in out {
                self.execute(node, cmd, &mut inputs)?;
            }
            self.check.on_view(node, view)?;
            let epoch = self.nodes[node as usize].epoch;
            self.check.on_commit(node, epoch, commit)?;
        }
        // As the node's loop does after every event: sleep only until the
        // engine's next timer, which this step may have brought closer.
        if let Some(due) = self.nodes[node as usize]
            .engine
            .as_ref()
            .and_then(Replica::next_timer)
        {
            if due < self.nodes[node as usize].tick_at {
                self.plan_tick(node, due.max(self.now));
            }
        }
        self.steps_since_matching += 1;
        if self.steps_since_matching >= 200 {
            self.steps_since_matching = 0;
            self.check_log_matching()?;
        }
        Ok(())
    }

    fn check_log_matching(&self) -> Result<(), Violation> {
        let logs: Vec<(u32, Vec<&Entry>)> = self
            .nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| {
                let e = n.engine.as_ref()?;
                if e.first_op() != 1 {
                    return None;
                }
                Some((
                    i as u32,
                    (1..=e.last_op()).filter_map(|op| e.entry(op)).collect(),
                ))
            })
            .collect();
        check::log_matching(&logs)
    }

    fn execute(
        &mut self,
        node: u32,
        cmd: Command,
        inputs: &mut Vec<Input>,
    ) -> Result<(), Violation> {
        let io = |e: crate::log::LogError| Violation {
            checker: "storage",
            detail: format!("node {node}: {e}"),
        };
        match cmd {
            Command::Append(entries) => {
                let n = &mut self.nodes[node as usize];
                n.log.as_mut().expect("up").append(&entries).map_err(io)?;
                if !n.sync_pending {
                    n.sync_pending = true;
                    let epoch = n.epoch;
                    let d = self.range(self.knobs.fsync_ns);
                    self.at(self.now + d, Ev::Sync { node, epoch });
                }
            }
            Command::Truncate { after } => {
                let n = &mut self.nodes[node as usize];
                n.log
                    .as_mut()
                    .expect("up")
                    .truncate_after(after)
                    .map_err(io)?;
                n.durable_fp.truncate(after as usize);
                n.held.retain(|h| h.0 <= after);
                self.check_durability()?;
            }
            Command::SaveState(state) => {
                let d = self.sync_node(node)?;
                let n = &mut self.nodes[node as usize];
                n.storage.write_file(
                    "STATE",
                    format!(
                        "{} {} {} {}",
                        state.view, state.log_view, state.rejoin_view, state.rejoin_upto
                    )
                    .as_bytes(),
                );
                inputs.push(Input::Durable { op: d });
            }
            Command::SendFromLog {
                to,
                mut msg,
                from,
                upto,
            } => {
                let n = &self.nodes[node as usize];
                let Some(log) = n.log.as_ref() else {
                    return Ok(());
                };
                // A chunk, as the node reads it: the receiver asks for the rest.
                let count = (upto + 1).saturating_sub(from) as usize;
                let read = log.read(from, count, self.knobs.chunk_bytes).map_err(io)?;
                if read.is_empty() || read.first().map(|e| e.op) != Some(from) {
                    return Err(Violation {
                        checker: "storage",
                        detail: format!(
                            "node {node}: the engine asked for ops {from}..={upto} from the log, which has {}..={}",
                            log.first_op(),
                            log.last_op()
                        ),
                    });
                }
                if let Some(entries) = msg.entries_mut() {
                    *entries = read;
                }
                self.send_net(node, to, msg);
            }
            Command::Send {
                to,
                msg,
                after_durable,
            } => {
                if after_durable <= self.nodes[node as usize].durable_op() {
                    self.send_net(node, to, msg);
                } else {
                    self.nodes[node as usize]
                        .held
                        .push((after_durable, to, msg));
                }
            }
            Command::Deliver(entries) => {
                let epoch = self.nodes[node as usize].epoch;
                self.check.on_deliver(node, epoch, &entries)?;
                let leader = self.nodes[node as usize]
                    .engine
                    .as_ref()
                    .is_some_and(|e| e.role() == Role::Leader);
                for e in &entries {
                    if e.kind != Kind::Data {
                        continue;
                    }
                    let Some(r) = Request::decode(&e.payload) else {
                        continue;
                    };
                    let (result, _) = self.nodes[node as usize].kv.apply(&r);
                    if leader {
                        self.reply(&r, Reply::Done(result));
                    }
                }
            }
            Command::RoleChanged { role, view, leader } => {
                self.report.max_view = self.report.max_view.max(view);
                self.note(|| format!("node {node} is {role:?} in view {view} (leader {leader})"));
            }
            Command::Rejected { events, reason } => {
                let hint = match reason {
                    Reject::NotLeader(h) => h,
                    Reject::Busy => Some(node),
                };
                for ev in events {
                    if let Some(r) = Request::decode(&ev.payload) {
                        self.reply(&r, Reply::Redirect(hint));
                    }
                }
            }
            Command::FetchSnapshot { .. } => {
                return Err(Violation {
                    checker: "snapshot",
                    detail: "the simulator never compacts, yet a snapshot was asked for".into(),
                });
            }
        }
        Ok(())
    }

    /// fsync: the log is durable up to its last op; release held messages.
    fn sync_node(&mut self, node: u32) -> Result<u64, Violation> {
        let n = &mut self.nodes[node as usize];
        let d = n.log.as_mut().expect("up").sync().map_err(|e| Violation {
            checker: "storage",
            detail: e.to_string(),
        })?;
        n.durable_fp.truncate(d as usize);
        let from = n.durable_fp.len() as u64 + 1;
        let log = n.log.as_ref().expect("up");
        if from <= d && from >= log.first_op() {
            let fresh = log
                .read(from, usize::MAX, usize::MAX)
                .map_err(|e| Violation {
                    checker: "storage",
                    detail: format!("node {node}: {e}"),
                })?;
            n.durable_fp.extend(
                fresh
                    .iter()
                    .take((d + 1 - from) as usize)
                    .map(check::fingerprint),
            );
        }
        self.release(node);
        Ok(d)
    }

    fn check_durability(&self) -> Result<(), Violation> {
        let durable: Vec<&[u64]> = self.nodes.iter().map(|n| n.durable_fp.as_slice()).collect();
        // A replica that lost its disk lost its copies with it, until it
        // has the leader's log again.
        let lost = usize::from(self.wiped_lagging());
        self.check
            .majority_durable(&durable, (self.knobs.n / 2 + 1) as usize - lost)
    }

    /// The replica that last lost its disk has not the leader's log again yet.
    fn wiped_lagging(&self) -> bool {
        self.wiped.is_some_and(|w| {
            let nd = &self.nodes[w as usize];
            nd.engine.as_ref().is_none_or(Replica::rejoining)
                || nd.durable_fp.len() < self.check.committed.len()
        })
    }

    /// A reply to a client, over the simulated network.
    fn reply(&mut self, r: &Request, reply: Reply) {
        let d = self.range(self.knobs.delay_ns);
        self.at(
            self.now + d,
            Ev::ToClient {
                client: r.client,
                seq: r.seq,
                reply,
            },
        );
    }

    fn release(&mut self, node: u32) {
        let n = &mut self.nodes[node as usize];
        let durable = n.durable_op();
        let (ready, held): (Vec<_>, Vec<_>) = std::mem::take(&mut n.held)
            .into_iter()
            .partition(|h| h.0 <= durable);
        n.held = held;
        for (_, to, msg) in ready {
            self.send_net(node, to, msg);
        }
    }

    fn crash(&mut self, node: u32) {
        let seed = self.rng.next_u64();
        let n = &mut self.nodes[node as usize];
        if n.engine.is_none() {
            return;
        }
        n.engine = None;
        n.log = None;
        n.held.clear();
        n.sync_pending = false;
        n.epoch += 1;
        n.storage.crash(seed);
        self.report.crashes += 1;
        self.note(|| format!("node {node} crashed"));
    }

    /// Saves the node's commit point (as far as its log is durable) beside
    /// its log, as the node does, every `commit_save_ns`.
    fn save_commit_point(&mut self, node: u32) {
        let Some(every) = self.knobs.commit_save_ns else {
            return;
        };
        let now = self.now;
        let n = &mut self.nodes[node as usize];
        let Some(engine) = &n.engine else {
            return;
        };
        if now < n.commit_saved_at + every {
            return;
        }
        let op = engine.commit().min(n.durable_op());
        let view = match engine.entry(op) {
            Some(e) => Some(e.view),
            None => n
                .log
                .as_ref()
                .and_then(|l| l.entry(op).ok().map(|e| e.view)),
        };
        let Some(view) = view.filter(|_| op > 0) else {
            return;
        };
        n.commit_saved_at = now;
        let cp = crate::log::commit_point::CommitPoint {
            cluster_id: CLUSTER,
            node_id: node,
            op,
            view,
        };
        n.storage
            .write_file("COMMIT", crate::log::commit_point::render(&cp).as_bytes());
    }

    fn restart(&mut self, node: u32) -> Result<(), Violation> {
        if self.nodes[node as usize].engine.is_some() {
            return Ok(());
        }
        let cfg = self.config(node);
        let storage = self.nodes[node as usize].storage.clone();
        let (log, _) =
            SegmentLog::open(storage.clone(), log_opts(node)).map_err(|e| Violation {
                checker: "recovery",
                detail: format!("node {node}: {e}"),
            })?;
        let entries = log
            .read(log.first_op(), usize::MAX, usize::MAX)
            .map_err(|e| Violation {
                checker: "recovery",
                detail: format!("node {node}: {e}"),
            })?;
        self.check.on_recovered_log(node, &entries)?;
        let state = storage
            .read_file("STATE")
            .and_then(|b| {
                let s = String::from_utf8(b).ok()?;
                let mut it = s.split(' ');
                Some(PersistentState {
                    view: it.next()?.parse().ok()?,
                    log_view: it.next()?.parse().ok()?,
                    rejoin_view: it.next().and_then(|x| x.parse().ok()).unwrap_or(0),
                    rejoin_upto: it.next().and_then(|x| x.parse().ok()).unwrap_or(0),
                })
            })
            .unwrap_or_default();
        let first = log.first_op();
        let seed = self.rng.next_u64();
        let fps: Vec<u64> = entries.iter().map(check::fingerprint).collect();
        // The saved commit point, as the node checks it: the ops up to it
        // are replayed from the log (and checked as deliveries: one it
        // named wrongly would disagree with what was committed), and only
        // the rest is given to the engine.
        let known = storage
            .read_file("COMMIT")
            .and_then(|b| crate::log::commit_point::parse(&String::from_utf8_lossy(&b)))
            .and_then(|cp| {
                crate::log::commit_point::check(&cp, (CLUSTER, node), first, log.last_op(), |op| {
                    entries.get((op - first) as usize).map(|e| e.view)
                })
                .ok()
            });
        let epoch = self.nodes[node as usize].epoch;
        let mut kv = Kv::default();
        let engine = match known {
            Some(c) => {
                let mut entries = entries;
                let rest = entries.split_off((c + 1 - first) as usize);
                self.check.on_deliver(node, epoch, &entries)?;
                for e in &entries {
                    if let Some(r) = (e.kind == Kind::Data)
                        .then(|| Request::decode(&e.payload))
                        .flatten()
                    {
                        kv.apply(&r);
                    }
                }
                self.report.restarts_from_commit_point += 1;
                Replica::restart_committed(
                    cfg,
                    seed,
                    self.now,
                    state,
                    first,
                    c + 1,
                    rest,
                    Vec::new(),
                )
            }
            // Nothing saved at all: a replica that never had state, or lost it.
            None if entries.is_empty() && storage.read_file("STATE").is_none() => {
                if self.opts.bugs.amnesiac_restart {
                    Replica::new(cfg, seed, self.now)
                } else {
                    Replica::recovering(cfg, seed, self.now)
                }
            }
            None => Replica::restart(cfg, seed, self.now, state, first, entries, Vec::new()),
        };
        let n = &mut self.nodes[node as usize];
        if first == 1 {
            n.durable_fp = fps;
        }
        n.log = Some(log);
        n.engine = Some(engine);
        n.fresh = true;
        n.kv = kv;
        self.note(|| format!("node {node} restarted in view {}", state.view));
        self.check.on_view(node, state.view)?;
        Ok(())
    }

    fn client_send(&mut self, client: u32) {
        let c = &self.clients[client as usize];
        let Some(op) = c.op.clone() else { return };
        let req = Request {
            client,
            seq: c.seq,
            op,
        };
        let (target, attempt, seq) = (c.target, c.attempt, c.seq);
        let loss = if self.healed { 0.0 } else { self.knobs.loss };
        if !self.chance(loss) {
            let d = self.range(self.knobs.delay_ns);
            self.at(self.now + d, Ev::ToNode { node: target, req });
        }
        self.at(
            self.now + 60 * MS,
            Ev::ClientRetry {
                client,
                seq,
                attempt,
                advance: true,
            },
        );
    }

    fn client_next(&mut self, client: u32) {
        let key = ["a", "b", "c"][(self.rng.next_u64() % 3) as usize].to_string();
        let put = self.rng.next_u64() % 2 == 0;
        let c = &mut self.clients[client as usize];
        if c.done >= c.budget {
            c.op = None;
            return;
        }
        c.seq += 1;
        c.attempt = 0;
        c.op = Some(if put {
            Op::Put(key, format!("c{client}-{}", c.seq))
        } else {
            Op::Get(key)
        });
        c.invoked = self.now;
        self.client_send(client);
    }

    fn run(&mut self) -> Result<(), Violation> {
        let n = self.knobs.n;
        for i in 0..n {
            let seed = self.rng.next_u64();
            let engine = if self.knobs.start_recovering {
                Replica::recovering(self.config(i), seed, 0)
            } else {
                Replica::new(self.config(i), seed, 0)
            };
            let storage = MemStorage::new();
            let (log, _) =
                SegmentLog::open(storage.clone(), log_opts(i)).map_err(|e| Violation {
                    checker: "storage",
                    detail: e.to_string(),
                })?;
            self.nodes.push(Node {
                engine: Some(engine),
                storage,
                log: Some(log),
                held: Vec::new(),
                durable_fp: Vec::new(),
                sync_pending: false,
                epoch: 0,
                kv: Kv::default(),
                commit_saved_at: 0,
                fresh: true,
                commands: 0,
                tick_at: 0,
            });
            let t = self.rng.next_u64() % MS;
            self.plan_tick(i, t);
        }
        for c in 0..self.knobs.clients {
            self.clients.push(Client {
                seq: 0,
                op: None,
                invoked: 0,
                target: self.rng.next_u64() as u32 % n,
                done: 0,
                budget: self.knobs.requests,
                attempt: 0,
            });
            let t = self.rng.next_u64() % (20 * MS);
            self.at(t, Ev::ClientNext(c));
        }
        if self.knobs.crash_every_ns > 0 && n > 1 {
            let t = self.range((1, 2 * self.knobs.crash_every_ns));
            self.at(t, Ev::Crash);
        }
        if self.knobs.partition_every_ns > 0 && n > 1 {
            let t = self.range((1, 2 * self.knobs.partition_every_ns));
            self.at(t, Ev::Partition);
        }
        let heal_at = self.knobs.safety_ns;
        self.at(heal_at, Ev::Heal);
        // Liveness bound: after healing, everything must finish within this.
        let deadline = heal_at + 8_000 * MS;
        self.at(deadline, Ev::End);

        let mut settle_until: Option<u64> = None;
        while let Some(Reverse((t, _, i))) = self.queue.pop() {
            let ev = self.events[i].take().expect("scheduled");
            self.free.push(i);
            self.now = t;
            self.report.events += 1;
            match ev {
                Ev::Tick(node) => {
                    if self.now != self.nodes[node as usize].tick_at {
                        // Re-planned earlier: this one is stale.
                        continue;
                    }
                    let mut next_tick = self.now + MS;
                    if let Some(engine) = &self.nodes[node as usize].engine {
                        let commit = engine.commit();
                        // A tick before the engine's next timer does nothing
                        // (a node sleeps until then).
                        let due = engine.next_timer();
                        let early =
                            due.is_some_and(|d| self.now < d) && !self.nodes[node as usize].fresh;
                        let before = self.nodes[node as usize].commands;
                        self.step(node, Input::Tick)?;
                        let done = self.nodes[node as usize].commands - before;
                        if early && done > 0 {
                            return Err(Violation {
                                checker: "engine-timer",
                                detail: format!(
                                    "node {node}: a tick at {} ns, before its next timer at {} ns, gave {done} commands",
                                    self.now,
                                    due.unwrap_or_default()
                                ),
                            });
                        }
                        if let Some(keep) = self.knobs.forget_keep {
                            let below = commit.saturating_sub(keep) + 1;
                            self.step(node, Input::Forget { below })?;
                        }
                        if let Some(engine) = &self.nodes[node as usize].engine {
                            engine.check_memory_counts().map_err(|detail| Violation {
                                checker: "engine-memory-counts",
                                detail: format!("node {node}: {detail}"),
                            })?;
                        }
                        self.save_commit_point(node);
                        // The next tick when the node's loop would tick:
                        // at the next timer, at most PEER_TIMERS (5 ms) away,
                        // 1 ms on once it is past (and after every step that
                        // brings the timer closer, in `step`). One time in
                        // four, a probe at a random moment before it: a tick
                        // there must do nothing, so a timer that says later
                        // than it should fails the check above.
                        if let Some(engine) = &self.nodes[node as usize].engine {
                            next_tick = match engine.next_timer() {
                                Some(d) if d > self.now => d.min(self.now + 5 * MS),
                                Some(_) => self.now + MS,
                                None => self.now + 5 * MS,
                            };
                            if self.rng.next_u64() % 4 == 0 && next_tick > self.now + 1 {
                                next_tick =
                                    self.now + 1 + self.rng.next_u64() % (next_tick - self.now - 1);
                            }
                        }
                    }
                    self.plan_tick(node, next_tick);
                }
                Ev::Net { to, env } => {
                    if self.opts.verbose && std::env::var_os("FALCON_SIM_TRACE").is_some() {
                        self.note(|| format!("{} -> {}: {:?}", env.from, to, trace(&env.msg)));
                    }
                    if self.nodes[to as usize].engine.is_some()
                        && !self.cut.contains(&(env.from, to))
                    {
                        self.step(to, Input::Receive(env))?;
                    }
                }
                Ev::Sync { node, epoch } => {
                    let nd = &mut self.nodes[node as usize];
                    if nd.epoch != epoch || nd.log.is_none() {
                        continue;
                    }
                    nd.sync_pending = false;
                    let d = self.sync_node(node)?;
                    self.step(node, Input::Durable { op: d })?;
                }
                Ev::Crash => {
                    if self.healed {
                        continue;
                    }
                    let victim = self.rng.next_u64() as u32 % n;
                    // One replica without state at a time (the fault model:
                    // a second, while the first has not the leader's log
                    // again, may hold the only other copy of an entry).
                    let others_whole = (0..n).filter(|&i| i != victim).all(|i| {
                        self.nodes[i as usize]
                            .engine
                            .as_ref()
                            .is_some_and(|e| !e.rejoining())
                    });
                    let wipe = self.knobs.wipe
                        && others_whole
                        && !self.wiped_lagging()
                        && self.chance(0.5);
                    self.crash(victim);
                    if wipe && self.nodes[victim as usize].engine.is_none() {
                        let nd = &mut self.nodes[victim as usize];
                        nd.storage = MemStorage::new();
                        nd.durable_fp.clear();
                        self.wiped = Some(victim);
                        self.report.wipes += 1;
                        self.check.on_wiped(victim);
                        self.note(|| format!("node {victim} lost its disk"));
                    }
                    self.check_durability()?;
                    let down = self.range((5 * MS, 300 * MS));
                    self.at(self.now + down, Ev::Restart(victim));
                    let next = self.range((1, 2 * self.knobs.crash_every_ns));
                    self.at(self.now + next, Ev::Crash);
                }
                Ev::Restart(node) => self.restart(node)?,
                Ev::Partition => {
                    if self.healed {
                        continue;
                    }
                    self.cut.clear();
                    match self.rng.next_u64() % 3 {
                        0 => {}
                        1 => {
                            // Symmetric: split into two groups.
                            let group: Vec<bool> =
                                (0..n).map(|_| self.rng.next_u64() % 2 == 0).collect();
                            for a in 0..n {
                                for b in 0..n {
                                    if group[a as usize] != group[b as usize] {
                                        self.cut.insert((a, b));
                                    }
                                }
                            }
                        }
                        _ => {
                            // Asymmetric: some links drop one direction.
                            for a in 0..n {
                                for b in 0..n {
                                    if a != b && self.rng.next_u64() % 4 == 0 {
                                        self.cut.insert((a, b));
                                    }
                                }
                            }
                        }
                    }
                    self.report.partitions += 1;
                    let cut = self.cut.clone();
                    self.note(|| format!("partition: cut {cut:?}"));
                    let next = self.range((1, 2 * self.knobs.partition_every_ns));
                    self.at(self.now + next, Ev::Partition);
                }
                Ev::Heal => {
                    self.healed = true;
                    self.cut.clear();
                    self.note(|| "healed: every replica up, no partitions, no loss".to_string());
                    for i in 0..n {
                        self.restart(i)?;
                    }
                    // Liveness: every client gets more requests to do.
                    for c in 0..self.knobs.clients {
                        let cl = &mut self.clients[c as usize];
                        cl.budget += 5;
                        if cl.op.is_none() {
                            self.at(self.now + MS, Ev::ClientNext(c));
                        }
                    }
                }
                Ev::ToNode { node, req } => {
                    if self.nodes[node as usize].engine.is_some() {
                        let ev = Event {
                            kind: Kind::Data,
                            conn: u64::from(req.client) + 1,
                            payload: Bytes::from(req.encode()),
                        };
                        self.step(node, Input::Propose(vec![ev]))?;
                    }
                }
                Ev::ToClient { client, seq, reply } => {
                    let c = &mut self.clients[client as usize];
                    if c.seq != seq || c.op.is_none() {
                        continue;
                    }
                    match reply {
                        Reply::Done(result) => {
                            let op = c.op.take().expect("checked");
                            c.done += 1;
                            self.history.push(Completed {
                                request: Request { client, seq, op },
                                invoked: c.invoked,
                                completed: self.now,
                                result,
                            });
                            self.report.completed += 1;
                            let think = self.range((0, 3 * MS));
                            self.at(self.now + think, Ev::ClientNext(client));
                        }
                        Reply::Redirect(hint) => {
                            c.target = hint.unwrap_or((c.target + 1) % n);
                            c.attempt += 1;
                            let attempt = c.attempt;
                            let back = self.range((MS, 10 * MS));
                            self.at(
                                self.now + back,
                                Ev::ClientRetry {
                                    client,
                                    seq,
                                    attempt,
                                    advance: false,
                                },
                            );
                        }
                    }
                }
                Ev::ClientRetry {
                    client,
                    seq,
                    attempt,
                    advance,
                } => {
                    let c = &mut self.clients[client as usize];
                    if c.seq != seq || c.op.is_none() || c.attempt != attempt {
                        continue;
                    }
                    if advance {
                        c.target = (c.target + 1) % n;
                    }
                    c.attempt += 1;
                    self.client_send(client);
                }
                Ev::ClientNext(c) => self.client_next(c),
                Ev::End => break,
            }
            if self.healed
                && self
                    .clients
                    .iter()
                    .all(|c| c.op.is_none() && c.done >= c.budget)
            {
                // Every request answered: let followers learn the last
                // commit point for 300 ms, then check they did.
                match settle_until {
                    None => settle_until = Some(self.now + 300 * MS),
                    Some(until) if self.now >= until => {
                        self.check_converged()?;
                        break;
                    }
                    Some(_) => {}
                }
            }
        }
        self.report.sim_ns = self.now;
        let unfinished: Vec<u32> = (0..self.knobs.clients)
            .filter(|&c| self.clients[c as usize].done < self.clients[c as usize].budget)
            .collect();
        if !unfinished.is_empty() {
            return Err(Violation {
                checker: "liveness",
                detail: format!(
                    "clients {unfinished:?} still waiting {:.1} s after the network healed",
                    (self.now - heal_at) as f64 / 1e9
                ),
            });
        }
        self.check_log_matching()?;
        self.check_durability()?;
        check::linearizable(&self.check.entries, &self.history)?;
        self.report.committed = self.check.committed.len() as u64;
        Ok(())
    }

    /// Every replica learnt the final commit point.
    fn check_converged(&self) -> Result<(), Violation> {
        let max_commit = self
            .nodes
            .iter()
            .filter_map(|n| n.engine.as_ref().map(|e| e.commit()))
            .max()
            .unwrap_or(0);
        for (i, n) in self.nodes.iter().enumerate() {
            let e = n.engine.as_ref().expect("all up after healing");
            if e.commit() < max_commit {
                return Err(Violation {
                    checker: "liveness",
                    detail: format!(
                        "node {i} knows commit {} 300 ms after the last request, others {max_commit} ({})",
                        e.commit(),
                        self.nodes
                            .iter()
                            .enumerate()
                            .filter_map(|(j, n)| n.engine.as_ref().map(|e| format!(
                                "node {j}: {:?} view {} last op {} commit {}",
                                e.role(),
                                e.view(),
                                e.last_op(),
                                e.commit()
                            )))
                            .collect::<Vec<_>>()
                            .join("; ")
                    ),
                });
            }
        }
        Ok(())
    }
}

fn trace(m: &Message) -> String {
    match m {
        Message::Prepare {
            view,
            op_start,
            entries,
            commit,
        } => format!(
            "prepare v{view} ops {op_start}+{} commit {commit}",
            entries.len()
        ),
        Message::StartView {
            view,
            op_start,
            entries,
            commit,
            last_op,
        } => format!(
            "start_view v{view} ops {op_start}+{} commit {commit} last {last_op}",
            entries.len()
        ),
        Message::DoViewChange {
            view,
            log_view,
            last_op,
            commit,
            op_start,
            entries,
        } => {
            format!(
                "dvc v{view} log_view {log_view} last {last_op} commit {commit} ops {op_start}+{}",
                entries.len()
            )
        }
        other => format!("{other:?}"),
    }
}

/// Runs one seed.
pub fn run_seed(seed: u64, opts: &SimOptions) -> Result<Report, Box<Failure>> {
    let mut rng = SplitMix(seed);
    let knobs = Knobs::choose(&mut rng);
    let mut sim = Sim {
        rng,
        now: 0,
        seq: 0,
        queue: BinaryHeap::new(),
        events: Vec::new(),
        free: Vec::new(),
        knobs,
        opts: opts.clone(),
        seed,
        nodes: Vec::new(),
        clients: Vec::new(),
        cut: BTreeSet::new(),
        healed: false,
        wiped: None,
        check: Checkers::default(),
        history: Vec::new(),
        report: Report::default(),
        steps_since_matching: 0,
    };
    match sim.run() {
        Ok(()) => Ok(sim.report),
        Err(v) => Err(Box::new(sim.fail(v))),
    }
}
