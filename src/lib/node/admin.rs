//! What a replica tells its admin socket and its metrics endpoint, and what
//! it keeps count of for them.

use std::time::Instant;

use crate::admin::metrics::{Histogram, metric};
use crate::admin::{Call, NodeStatus, ProgramStatus, Request, refusal};
use crate::consensus::{Input, NodeId, Role};
use crate::log::Entry;
use crate::log::now_ns;

use super::{Node, NodeError};

/// What the loop counts and remembers for the admin socket and metrics.
pub(super) struct Observed {
    pub cluster: String,
    pub argv: Vec<String>,
    pub cwd: std::path::PathBuf,
    pub commits: u64,
    pub commit_bytes: u64,
    /// Leader: from proposing an entry to its commit.
    pub commit_latency: Histogram,
    /// From handing the log to the fsync thread to its answer.
    pub fsync_latency: Histogram,
    pub sync_sent: Option<Instant>,
    pub role_since_ns: u64,
    pub view_change_at_ns: Option<u64>,
    pub leader_first_commit_ns: Option<u64>,
    pub leader_last_commit_ns: Option<u64>,
    pub transfer_started_ns: Option<u64>,
    /// The view this replica leads (or last led).
    pub leader_view: u64,
    /// Live links to each replica (by index), from the transport's events
    /// (TCP has one each way).
    pub peers: Vec<u32>,
    pub peer_losses: u64,
    pub program_starts: u64,
    pub view_changes: u64,
    pub clients_accepted: u64,
    /// Client connections closed at once: over `limits.client_connections`.
    pub clients_refused: u64,
}

impl Observed {
    pub fn new(cluster: &str, n: usize) -> Observed {
        Observed {
            cluster: cluster.to_string(),
            argv: std::env::args().collect(),
            cwd: std::env::current_dir().unwrap_or_default(),
            commits: 0,
            commit_bytes: 0,
            commit_latency: Histogram::default(),
            fsync_latency: Histogram::default(),
            sync_sent: None,
            role_since_ns: now_ns(),
            view_change_at_ns: None,
            leader_first_commit_ns: None,
            leader_last_commit_ns: None,
            transfer_started_ns: None,
            leader_view: 0,
            peers: vec![0; n],
            peer_losses: 0,
            program_starts: 0,
            view_changes: 0,
            clients_accepted: 0,
            clients_refused: 0,
        }
    }

    /// The role changed (to `role` from `was`, in `view`).
    pub fn role_changed(&mut self, was: Role, role: Role, view: u64) {
        let now = now_ns();
        if was != role {
            self.role_since_ns = now;
        }
        match role {
            Role::ViewChange if was != Role::ViewChange => {
                self.view_change_at_ns = Some(now);
                self.view_changes += 1;
            }
            Role::Leader if was != Role::Leader => {
                self.leader_view = view;
                self.leader_first_commit_ns = None;
                self.leader_last_commit_ns = None;
                self.transfer_started_ns = None;
            }
            _ => {}
        }
    }

    /// Entries were committed; `leading` says whether this replica leads
    /// (the commits are its own), `clock_ns` is the engine's clock, which
    /// stamped the entries this replica proposed.
    pub fn committed(&mut self, entries: &[Entry], leading: bool, clock_ns: u64) {
        let now = now_ns();
        self.commits += entries.len() as u64;
        for e in entries {
            self.commit_bytes += e.payload.len() as u64;
        }
        if !leading || entries.is_empty() {
            return;
        }
        self.leader_first_commit_ns.get_or_insert(now);
        self.leader_last_commit_ns = Some(now);
        for e in entries {
            // Entries of its own view carry its own clock (the view's first,
            // the no-op, none); older views' entries another replica's.
            if e.view == self.leader_view && e.time_ns > 0 && e.time_ns <= clock_ns {
                self.commit_latency.observe(clock_ns - e.time_ns);
            }
        }
    }
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::Leader => "leader",
        Role::Follower => "follower",
        Role::ViewChange => "view-change",
    }
}

impl Node<'_> {
    /// Answers the requests waiting from the admin socket and the metrics endpoint.
    pub(super) fn serve_admin(&mut self) -> Result<(), NodeError> {
        let Some(rx) = &self.admin_rx else {
            return Ok(());
        };
        let calls: Vec<Call> = rx.try_iter().collect();
        for call in calls {
            if call.expired() {
                // Its asker has been told (or is about to be) that the
                // replica did not answer: carrying it out now would do
                // what the operator was told did not happen.
                self.ui.warn(&format!(
                    "an admin request waited {:.1} s for this replica's loop and is not carried out: {:?}",
                    call.asked.elapsed().as_secs_f64(),
                    call.request
                ));
                let _ = call.reply.send(crate::admin::refusal(
                    "the request waited too long for the replica; it was not carried out: ask again",
                ));
                continue;
            }
            let answer = match call.request {
                Request::Status => serde_json::json!({"ok": true, "status": self.status()}),
                Request::Metrics => serde_json::json!({"ok": true, "text": self.metrics_text()}),
                Request::Transfer { to } => self.transfer(to)?,
                Request::Resync { leader_snapshot } => self.start_resync(leader_snapshot)?,
                Request::Snapshot => self.snapshot_now(),
            };
            let _ = call.reply.send(answer);
        }
        Ok(())
    }

    fn transfer(&mut self, to: u32) -> Result<serde_json::Value, NodeError> {
        let me = self.ids[self.me as usize];
        let Some(target) = self.ids.iter().position(|&i| i == to) else {
            return Ok(refusal(format!(
                "there is no replica {to} in the cluster (ids: {})",
                self.ids
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        };
        if self.role != Role::Leader {
            return Ok(refusal(format!(
                "replica {me} is not the leader (leader: replica {}); send the transfer to the leader",
                self.ids[self.engine.leader() as usize]
            )));
        }
        if to == me {
            return Ok(refusal(format!("replica {me} already leads")));
        }
        if self.engine.transferring_to().is_some() {
            return Ok(refusal("a transfer is already under way"));
        }
        self.ui.note(&format!(
            "replica {me}: handing leadership to replica {to} (new input waits until it leads)"
        ));
        self.observed.transfer_started_ns = Some(now_ns());
        self.step(Input::TransferLeadership {
            to: target as NodeId,
        })?;
        Ok(serde_json::json!({"ok": true, "view": self.engine.view()}))
    }

    /// Bytes of log segments, from the log's own table of segments.
    fn log_bytes(&self) -> u64 {
        self.log.segments().iter().map(|s| s.bytes).sum()
    }

    pub(super) fn status(&self) -> NodeStatus {
        let o = &self.observed;
        let leading = self.role == Role::Leader;
        NodeStatus {
            id: self.ids[self.me as usize],
            cluster: o.cluster.clone(),
            role: role_name(self.role).into(),
            view: self.engine.view(),
            leader: self.ids[self.engine.leader() as usize],
            last_op: self.engine.last_op(),
            commit: self.engine.commit(),
            applied: self.applied_op,
            apply_queue: self.apply_queue.len(),
            apply_queue_bytes: self.apply_queue.bytes() as u64,
            memory_entries: self.engine.memory().0,
            memory_bytes: self.engine.memory().1 as u64,
            awaiting_answer: self
                .last_written
                .zip(self.awaiting_answer)
                .map(|(c, t)| (c, t.elapsed().as_secs_f64() * 1e3)),
            peers_connected: o
                .peers
                .iter()
                .enumerate()
                .filter(|&(i, &links)| links > 0 && i != self.me as usize)
                .map(|(i, _)| self.ids[i])
                .collect(),
            followers_acked: if leading {
                (0..self.ids.len())
                    .filter(|&i| i != self.me as usize)
                    .map(|i| (self.ids[i], self.engine.acked(i as NodeId)))
                    .collect()
            } else {
                Vec::new()
            },
            pid: std::process::id(),
            program: self.app.as_ref().map(|a| ProgramStatus {
                name: a.program.clone(),
                pid: a.pid(),
                state: "running".into(),
            }),
            log_bytes: self.log_bytes(),
            uptime_s: self.start.elapsed().as_secs_f64(),
            clients: self.clients.len(),
            forwarded: self
                .forwards
                .threads
                .load(std::sync::atomic::Ordering::Relaxed),
            data_dir: self.data_dir.clone(),
            argv: o.argv.clone(),
            cwd: o.cwd.clone(),
            role_since_ns: o.role_since_ns,
            view_change_at_ns: o.view_change_at_ns,
            leader_first_commit_ns: o.leader_first_commit_ns,
            leader_last_commit_ns: o.leader_last_commit_ns,
            transfer_started_ns: o.transfer_started_ns,
            disk_full_s: self
                .disk_full
                .map(|(since, _)| since.elapsed().as_secs_f64()),
            divergence_chunk: self.digests.chunk(),
            output_chunks: self.digests.counts,
            diverged: self.diverged.clone(),
            resync: self.resync.as_ref().map(|r| r.progress(self.applied_op)),
            last_resync: self.last_resync.clone(),
            snapshot_op: self.snapshot_op,
            snapshots: self.snapshot_cmd.is_some(),
            restores: self.restore_cmd.is_some(),
        }
    }

    pub(super) fn metrics_text(&self) -> String {
        let o = &self.observed;
        let me = self.ids[self.me as usize];
        let mut s = String::new();
        let one = |v: f64| vec![(String::new(), v)];
        o.commit_latency.render(
            &mut s,
            "falcon_commit_latency_seconds",
            "On the leader: from proposing an entry to its commit (a majority has it on disk).",
            "",
        );
        metric(
            &mut s,
            "falcon_commits_total",
            "counter",
            "Entries committed (applied in order) on this replica.",
            &one(o.commits as f64),
        );
        metric(
            &mut s,
            "falcon_committed_bytes_total",
            "counter",
            "Payload bytes of the entries committed on this replica.",
            &one(o.commit_bytes as f64),
        );
        metric(
            &mut s,
            "falcon_view",
            "gauge",
            "The current view.",
            &one(self.engine.view() as f64),
        );
        metric(
            &mut s,
            "falcon_role",
            "gauge",
            "1 for this replica's current role.",
            &[Role::Leader, Role::Follower, Role::ViewChange]
                .iter()
                .map(|&r| {
                    (
                        format!("role=\"{}\"", role_name(r)),
                        f64::from(u8::from(r == self.role)),
                    )
                })
                .collect::<Vec<_>>(),
        );
        metric(
            &mut s,
            "falcon_view_changes_total",
            "counter",
            "Times this replica left normal operation for a view change.",
            &one(o.view_changes as f64),
        );
        metric(
            &mut s,
            "falcon_last_op",
            "gauge",
            "The last op in this replica's log.",
            &one(self.engine.last_op() as f64),
        );
        metric(
            &mut s,
            "falcon_commit_op",
            "gauge",
            "The last op known committed.",
            &one(self.engine.commit() as f64),
        );
        if self.role == Role::Leader {
            let last = self.engine.last_op();
            metric(
                &mut s,
                "falcon_follower_lag_ops",
                "gauge",
                "On the leader: ops each follower has not acknowledged yet.",
                &(0..self.ids.len())
                    .filter(|&i| i != self.me as usize)
                    .map(|i| {
                        (
                            format!("follower=\"{}\"", self.ids[i]),
                            last.saturating_sub(self.engine.acked(i as NodeId)) as f64,
                        )
                    })
                    .collect::<Vec<_>>(),
            );
        }
        metric(
            &mut s,
            "falcon_log_bytes",
            "gauge",
            "Bytes of log segments on disk.",
            &one(self.log_bytes() as f64),
        );
        metric(
            &mut s,
            "falcon_memory_entries",
            "gauge",
            "Log entries held in memory (uncommitted, and the window of committed ones kept for followers; limits.memory_window).",
            &one(self.engine.memory().0 as f64),
        );
        metric(
            &mut s,
            "falcon_memory_bytes",
            "gauge",
            "Bytes of the log entries held in memory (payload and 48 bytes each).",
            &one(self.engine.memory().1 as f64),
        );
        metric(
            &mut s,
            "falcon_apply_queue_bytes",
            "gauge",
            "Bytes of committed entries waiting for the program (limits.program_backlog_bytes).",
            &one(self.apply_queue.bytes() as f64),
        );
        o.fsync_latency.render(
            &mut s,
            "falcon_fsync_latency_seconds",
            "From handing the log to the fsync thread to its answer.",
            "",
        );
        metric(
            &mut s,
            "falcon_peers_connected",
            "gauge",
            "Replicas this one has a live link to.",
            &one(o
                .peers
                .iter()
                .enumerate()
                .filter(|&(i, &links)| links > 0 && i != self.me as usize)
                .count() as f64),
        );
        metric(
            &mut s,
            "falcon_peer_losses_total",
            "counter",
            "Links to other replicas that broke.",
            &one(o.peer_losses as f64),
        );
        metric(
            &mut s,
            "falcon_client_connections",
            "gauge",
            "Client connections open on this replica.",
            &one(self.clients.len() as f64),
        );
        metric(
            &mut s,
            "falcon_client_connections_total",
            "counter",
            "Client connections accepted.",
            &one(o.clients_accepted as f64),
        );
        metric(
            &mut s,
            "falcon_client_connections_refused_total",
            "counter",
            "Client connections closed at once: over limits.client_connections.",
            &one(o.clients_refused as f64),
        );
        metric(
            &mut s,
            "falcon_program_starts_total",
            "counter",
            "Times the program (or, with --qemu-socket, QEMU's socket) was started or connected.",
            &one(o.program_starts as f64),
        );
        if self.digests.on() {
            let c = self.digests.counts;
            metric(
                &mut s,
                "falcon_output_chunks_compared_total",
                "counter",
                "Divergence detection: chunks of the leader's program output compared with this replica's.",
                &one(c.compared as f64),
            );
            metric(
                &mut s,
                "falcon_output_chunks_unchecked_total",
                "counter",
                "Divergence detection: chunks of the leader's output that could not be compared (connection reset or reopened after a snapshot, hash forgotten).",
                &one(c.unchecked as f64),
            );
            metric(
                &mut s,
                "falcon_divergences_total",
                "counter",
                "Divergence detection: chunks of this replica's program output that differed from the leader's.",
                &one(c.mismatches as f64),
            );
        }
        metric(
            &mut s,
            "falcon_diverged",
            "gauge",
            "1 while this replica's program is known to differ from the leader's (until a resync matches).",
            &one(f64::from(u8::from(self.diverged.is_some()))),
        );
        metric(
            &mut s,
            "falcon_uptime_seconds",
            "gauge",
            "Seconds since this replica started.",
            &one(self.start.elapsed().as_secs_f64()),
        );
        // Every sample names the replica, for dashboards that scrape all of them.
        let label = format!("node=\"{me}\"");
        s.lines()
            .map(|l| {
                if l.starts_with('#') {
                    l.to_string()
                } else if let Some((name, rest)) = l.split_once('{') {
                    format!("{name}{{{label},{rest}")
                } else if let Some((name, rest)) = l.split_once(' ') {
                    format!("{name}{{{label}}} {rest}")
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
            + "\n"
    }
}
