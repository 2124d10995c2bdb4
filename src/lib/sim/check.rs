//! Invariants as code: each a named checker the simulator runs as it goes.

use std::collections::{BTreeSet, HashMap};

use super::kv::{Kv, Request};
use crate::log::{Entry, Kind};

/// A broken invariant, with enough context to debug it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Which checker.
    pub checker: &'static str,
    /// What it saw.
    pub detail: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.checker, self.detail)
    }
}

fn v(checker: &'static str, detail: String) -> Violation {
    Violation { checker, detail }
}

/// A fingerprint of an entry (view, kind, conn, payload).
pub fn fingerprint(e: &Entry) -> u64 {
    let mut h = crc32c::crc32c(&e.payload) as u64;
    h = h.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ e.view;
    h = h.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(e.kind.to_byte());
    h.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ e.conn
}

/// Agreement and durability of committed entries, delivery order, the
/// close-on-view-change rule, and monotonic views and commit points.
#[derive(Default)]
pub struct Checkers {
    /// The committed order: fingerprint per op (index op - 1), as first delivered anywhere.
    pub committed: Vec<u64>,
    /// The committed entries themselves.
    pub entries: Vec<Entry>,
    delivered: HashMap<(u32, u64), u64>,
    views: HashMap<u32, u64>,
    commits: HashMap<(u32, u64), u64>,
    open: BTreeSet<u64>,
    expect_closed: Option<(u64, BTreeSet<u64>)>,
}

impl Checkers {
    /// Agreement: an op commits to one entry everywhere. Delivery: each
    /// replica incarnation delivers ops consecutively, each once.
    pub fn on_deliver(
        &mut self,
        node: u32,
        incarnation: u64,
        entries: &[Entry],
    ) -> Result<(), Violation> {
        for e in entries {
            let last = self.delivered.entry((node, incarnation)).or_insert(0);
            if *last != 0 && e.op != *last + 1 {
                return Err(v(
                    "delivery",
                    format!("node {node} delivered op {} after op {last}", e.op),
                ));
            }
            *last = e.op;
            let fp = fingerprint(e);
            let i = (e.op - 1) as usize;
            if i < self.committed.len() {
                if self.committed[i] != fp {
                    return Err(v(
                        "agreement",
                        format!(
                            "node {node} committed op {} as view {} {} conn {} {:?}, but it was committed before as view {} {} conn {} {:?}",
                            e.op,
                            e.view,
                            e.kind,
                            e.conn,
                            String::from_utf8_lossy(&e.payload),
                            self.entries[i].view,
                            self.entries[i].kind,
                            self.entries[i].conn,
                            String::from_utf8_lossy(&self.entries[i].payload)
                        ),
                    ));
                }
            } else if i == self.committed.len() {
                self.committed.push(fp);
                self.entries.push(e.clone());
                self.check_close_rule(e)?;
            } else {
                return Err(v(
                    "agreement",
                    format!(
                        "node {node} committed op {} past the known order ({})",
                        e.op,
                        self.committed.len()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// A new view starts with a Noop followed by a Close for every connection still open.
    fn check_close_rule(&mut self, e: &Entry) -> Result<(), Violation> {
        if let Some((noop_op, pending)) = &mut self.expect_closed {
            if e.kind == Kind::Close && pending.remove(&e.conn) {
                self.open.remove(&e.conn);
                if pending.is_empty() {
                    self.expect_closed = None;
                }
                return Ok(());
            }
            if e.kind != Kind::Noop {
                return Err(v(
                    "close-on-view-change",
                    format!(
                        "the view started at op {noop_op} left connections {pending:?} open (op {} is {})",
                        e.op, e.kind
                    ),
                ));
            }
            self.expect_closed = None;
        }
        match e.kind {
            Kind::Open => {
                self.open.insert(e.conn);
            }
            Kind::Close => {
                self.open.remove(&e.conn);
            }
            Kind::Noop if !self.open.is_empty() => {
                self.expect_closed = Some((e.op, self.open.clone()));
            }
            _ => {}
        }
        Ok(())
    }

    /// Views never go back on a replica, across restarts too.
    pub fn on_view(&mut self, node: u32, view: u64) -> Result<(), Violation> {
        let prev = self.views.entry(node).or_insert(0);
        if view < *prev {
            return Err(v(
                "monotonic-view",
                format!("node {node} went from view {prev} back to view {view}"),
            ));
        }
        *prev = view;
        Ok(())
    }

    /// A replica lost its disk: it starts again from view 0.
    pub fn on_wiped(&mut self, node: u32) {
        self.views.remove(&node);
    }

    /// Commit points never go back within one incarnation.
    pub fn on_commit(&mut self, node: u32, incarnation: u64, commit: u64) -> Result<(), Violation> {
        let prev = self.commits.entry((node, incarnation)).or_insert(0);
        if commit < *prev {
            return Err(v(
                "monotonic-commit",
                format!("node {node} commit went from {prev} back to {commit}"),
            ));
        }
        *prev = commit;
        Ok(())
    }

    /// A recovered log agrees with the committed order wherever it holds an
    /// entry of the same view (an entry of an older view is a stale,
    /// uncommitted one; of a newer view, one proposed before the commit was
    /// known, by a leader whose view never got going).
    pub fn on_recovered_log(&self, node: u32, entries: &[Entry]) -> Result<(), Violation> {
        for e in entries {
            let i = (e.op - 1) as usize;
            if i < self.committed.len()
                && e.view == self.entries[i].view
                && self.committed[i] != fingerprint(e)
            {
                return Err(v(
                    "log-matching",
                    format!(
                        "node {node} recovered op {} of view {} differing from the committed entry of that view",
                        e.op, e.view
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Durability: every committed entry is on the durable logs of a majority
    /// (crashes and truncations included). `durable[node]` are the fingerprints
    /// of each replica's durable log from op 1.
    pub fn majority_durable(&self, durable: &[&[u64]], quorum: usize) -> Result<(), Violation> {
        for (i, fp) in self.committed.iter().enumerate() {
            let holders = durable.iter().filter(|d| d.get(i) == Some(fp)).count();
            if holders < quorum {
                return Err(v(
                    "durability",
                    format!(
                        "committed op {} is durable on {holders} replicas, fewer than a majority ({quorum})",
                        i + 1
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Log matching: if two logs hold an entry of the same view at the same op,
/// they are identical up to it. `logs` are (node, entries from op 1).
pub fn log_matching(logs: &[(u32, Vec<&Entry>)]) -> Result<(), Violation> {
    let chains: Vec<Vec<u64>> = logs
        .iter()
        .map(|(_, es)| {
            let mut h = 0u64;
            es.iter()
                .map(|e| {
                    h = h.rotate_left(7) ^ fingerprint(e).wrapping_add(e.op);
                    h
                })
                .collect()
        })
        .collect();
    for a in 0..logs.len() {
        for b in a + 1..logs.len() {
            let (la, lb) = (&logs[a].1, &logs[b].1);
            // The highest op where both hold an entry of the same view.
            let common = la.len().min(lb.len());
            for i in (0..common).rev() {
                if la[i].view == lb[i].view {
                    if chains[a][i] != chains[b][i] {
                        return Err(v(
                            "log-matching",
                            format!(
                                "nodes {} and {} both hold op {} of view {} but their logs differ at or before it",
                                logs[a].0,
                                logs[b].0,
                                i + 1,
                                la[i].view
                            ),
                        ));
                    }
                    break;
                }
            }
        }
    }
    Ok(())
}

/// One client operation as the client saw it.
#[derive(Clone, Debug)]
pub struct Completed {
    /// The request.
    pub request: Request,
    /// When it was first sent.
    pub invoked: u64,
    /// When the answer arrived.
    pub completed: u64,
    /// The answer.
    pub result: String,
}

/// Linearizability of the client history against the committed order:
/// every acknowledged operation is in the order exactly where its answer
/// says, and the order respects real time.
pub fn linearizable(order: &[Entry], history: &[Completed]) -> Result<(), Violation> {
    let mut kv = Kv::default();
    let mut position: HashMap<(u32, u64), (usize, String)> = HashMap::new();
    for (i, e) in order.iter().enumerate() {
        if e.kind != Kind::Data {
            continue;
        }
        let Some(r) = Request::decode(&e.payload) else {
            continue;
        };
        let (result, executed) = kv.apply(&r);
        if executed {
            if position.contains_key(&(r.client, r.seq)) {
                return Err(v(
                    "linearizability",
                    format!("client {} request {} executed twice", r.client, r.seq),
                ));
            }
            position.insert((r.client, r.seq), (i, result));
        }
    }
    let mut placed: Vec<(u64, u64, usize)> = Vec::new();
    for c in history {
        let key = (c.request.client, c.request.seq);
        let Some((pos, result)) = position.get(&key) else {
            return Err(v(
                "linearizability",
                format!(
                    "client {} request {} ({:?}) was acknowledged but is not in the committed order",
                    key.0, key.1, c.request.op
                ),
            ));
        };
        if *result != c.result {
            return Err(v(
                "linearizability",
                format!(
                    "client {} request {} answered {:?}, but the committed order gives {:?}",
                    key.0, key.1, c.result, result
                ),
            ));
        }
        placed.push((c.invoked, c.completed, *pos));
    }
    // Real time: an operation that completed before another was invoked comes first.
    let mut by_completion: Vec<(u64, usize)> = placed.iter().map(|p| (p.1, p.2)).collect();
    by_completion.sort_unstable();
    let mut by_invocation: Vec<(u64, usize)> = placed.iter().map(|p| (p.0, p.2)).collect();
    by_invocation.sort_unstable();
    let mut j = 0;
    let mut max_pos: Option<usize> = None;
    for (invoked, pos) in by_invocation {
        while j < by_completion.len() && by_completion[j].0 < invoked {
            max_pos = max_pos.max(Some(by_completion[j].1));
            j += 1;
        }
        if let Some(m) = max_pos {
            if m >= pos {
                return Err(v(
                    "linearizability",
                    format!(
                        "an operation invoked at {invoked} ns is ordered at {pos}, before one that had completed earlier (ordered at {m})"
                    ),
                ));
            }
        }
    }
    Ok(())
}
