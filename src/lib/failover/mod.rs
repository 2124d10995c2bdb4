//! `falcon failover`: what an operator needs after the first day. `status`
//! shows every replica (through its admin socket), `transfer` moves the
//! leadership on purpose, `resync` rebuilds a replica whose program diverged,
//! `drill` rehearses failures under load and measures them.

pub mod drill;

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::admin::{self, AdminError, NodeStatus, Request};
use crate::config::ClusterConfig;
use crate::output::{self, Status, Ui};

/// `falcon failover …`.
#[derive(Debug, clap::Args)]
pub struct FailoverArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: FailoverCommand,
}

/// The failover subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum FailoverCommand {
    /// A table of the replicas: role, view, ops, lag, links, program, log size, uptime
    #[command(after_help = STATUS_HELP)]
    Status(StatusArgs),
    /// Hand the leadership to another replica (planned failover)
    #[command(after_help = TRANSFER_HELP)]
    Transfer(TransferArgs),
    /// Rebuild a replica's program from its initial state and the log, and check it against the leader's
    #[command(after_help = RESYNC_HELP)]
    Resync(ResyncArgs),
    /// Kill replicas under load, round after round, and measure the failovers
    #[command(after_help = drill::DRILL_HELP)]
    Drill(drill::DrillArgs),
}

/// `falcon failover status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The cluster file (default: ./falcon.toml, then /etc/falcon/falcon.toml).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Refresh in place until Ctrl-C (with --json: one JSON line per refresh).
    #[arg(long)]
    pub watch: bool,

    /// Time between two refreshes with --watch.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
}

const STATUS_HELP: &str = "\
Each replica answers on admin.sock in its data directory (only its own user
or root may connect); a replica that does not answer is shown as down.
lag is how many ops a replica's log is behind the leader's.

Exit status: 0 when a leader answers, 1 when none does (the cluster cannot
take writes), 2 for a usage error.

Examples:
  falcon failover status --config cluster.toml
  falcon failover status --watch
  falcon failover status --json | jq '.replicas[] | select(.up == false) | .id'";

/// `falcon failover transfer`.
#[derive(Debug, clap::Args)]
pub struct TransferArgs {
    /// The cluster file (default: ./falcon.toml, then /etc/falcon/falcon.toml).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// The replica (id) to lead next.
    #[arg(long, value_name = "ID")]
    pub to: u32,

    /// Give up after this long.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,

    /// Transfer even to a replica whose program diverged from the leader's.
    #[arg(long)]
    pub force: bool,
}

const TRANSFER_HELP: &str = "\
The leader stops taking new input, waits until the target has every entry,
and starts a view that the target leads; the target's --on-leader hook runs.
falcon prints how long the service could not commit: from the last commit
under the old leader (or the moment it stopped taking input, if later) to
the first commit under the new one.

A replica whose program diverged from the leader's (falcon failover status
says so) is refused unless --force: its copy of the program is not the
cluster's. Rebuild it first with falcon failover resync.

Examples:
  falcon failover transfer --to 2 --config cluster.toml
  falcon failover transfer --to 3 --json";

/// `falcon failover resync`.
#[derive(Debug, clap::Args)]
pub struct ResyncArgs {
    /// The cluster file (default: ./falcon.toml, then /etc/falcon/falcon.toml).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// The replica (id) to rebuild: a follower.
    #[arg(long, value_name = "ID")]
    pub node: u32,

    /// What to rebuild from: leader takes a fresh snapshot on the leader
    /// (--snapshot-cmd there, --restore-cmd on the replica) and installs it;
    /// log restarts the program from its initial state (--reset-cmd) and
    /// replays the whole log; auto is leader when both hooks are there.
    #[arg(long, value_enum, value_name = "SOURCE", default_value = "auto")]
    pub from: ResyncFrom,

    /// Give up waiting after this long (the rebuild goes on).
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// Where `falcon failover resync` rebuilds a program from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ResyncFrom {
    /// The leader's snapshot when the hooks allow it, else the log.
    Auto,
    /// A fresh snapshot of the leader's program, then the log after it.
    Leader,
    /// The initial state, then the whole log (the log must still start at op 1).
    Log,
}

const RESYNC_HELP: &str = "\
With snapshot hooks (--snapshot-cmd on the leader, --restore-cmd on the
replica), the leader takes a fresh snapshot of its program, the replica
fetches it, restores its program from it and replays the few ops after it:
the rebuilt copy is the leader's, whatever the program does.

Without them (or with --from log), the replica stops its copy of the
program, brings it back to its initial state (--reset-cmd), starts it
again and replays the whole log into it (refused once snapshots compacted
the log: the replica's own snapshot may hold the divergence). A program
that is not deterministic for this input (timers, clocks, random numbers,
threads racing) may diverge again.

Either way the cluster goes on committing, and the leader's hashes of its
program's output are in the log: the rebuilt copy is compared with them on
the way, and the report says whether it now matches.

The leader cannot be resynced (its copy is the one the others are compared
with): transfer the leadership first.

Exit status: 0 when the rebuilt copy matches the leader's, 1 when it still
differs or the replica refused, 2 for a usage error.

Examples:
  falcon failover resync --node 3 --config cluster.toml
  falcon failover resync --node 2 --json";

/// How long one admin request may take.
const ASK: Duration = Duration::from_secs(2);
/// How long a replica rebuilding its program may leave status requests
/// unanswered (stopping and starting the program holds its loop).
const SILENT_MAX: Duration = Duration::from_secs(60);

/// One replica as the tools see it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Seen {
    /// Its id.
    pub id: u32,
    /// It answered.
    pub up: bool,
    /// It runs but did not answer in time (busy), as far as can be told.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub busy: bool,
    /// Why not, when it did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What it said.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<NodeStatus>,
    /// Ops behind the leader's log.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lag: Option<u64>,
}

/// Asks every replica of the cluster for its status, at once.
pub fn survey(cfg: &ClusterConfig) -> Vec<Seen> {
    let answers: Vec<(u32, Result<NodeStatus, AdminError>)> = std::thread::scope(|s| {
        let hs: Vec<_> = cfg
            .replicas
            .iter()
            .map(|r| s.spawn(move || (r.id, admin::status(&r.data_dir, ASK))))
            .collect();
        hs.into_iter()
            .zip(&cfg.replicas)
            .map(|(h, r)| {
                h.join().unwrap_or_else(|_| {
                    (
                        r.id,
                        Err(AdminError::Refused("the status thread panicked".into())),
                    )
                })
            })
            .collect()
    });
    let leader_last = leader_of(
        &answers
            .iter()
            .filter_map(|(_, a)| a.as_ref().ok())
            .collect::<Vec<_>>(),
    )
    .map(|l| l.last_op);
    answers
        .into_iter()
        .map(|(id, a)| match a {
            Ok(st) => Seen {
                id,
                up: true,
                busy: false,
                error: None,
                lag: leader_last.map(|l| l.saturating_sub(st.last_op)),
                status: Some(st),
            },
            Err(e) => Seen {
                id,
                up: false,
                busy: matches!(e, AdminError::Timeout { .. }),
                error: Some(match e {
                    AdminError::Connect { source, .. }
                        if matches!(
                            source.kind(),
                            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                        ) =>
                    {
                        "not running (nothing answers on its admin socket)".into()
                    }
                    e => e.to_string(),
                }),
                status: None,
                lag: None,
            },
        })
        .collect()
}

/// The leader among `statuses`: the replica leading the highest view.
pub fn leader_of<'a>(statuses: &[&'a NodeStatus]) -> Option<&'a NodeStatus> {
    statuses
        .iter()
        .filter(|s| s.role == "leader")
        .max_by_key(|s| s.view)
        .copied()
}

fn load(config: Option<&std::path::Path>) -> Result<ClusterConfig, crate::config::ConfigError> {
    ClusterConfig::load(&ClusterConfig::find(config)?)
}

/// Why a failover command could not do its work.
#[derive(Debug, thiserror::Error)]
pub enum FailoverError {
    /// The cluster file.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Writing the output.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A usage problem (exit 2).
    #[error("{0}")]
    Usage(String),
    /// The command ran and failed.
    #[error("{0}")]
    Failed(String),
}

/// Runs `falcon failover …`.
pub fn run(
    args: &FailoverArgs,
    ui: &Ui,
    out: &mut dyn Write,
    stop: &Arc<AtomicBool>,
) -> Result<Status, FailoverError> {
    match &args.command {
        FailoverCommand::Status(a) => status(a, ui, out, stop),
        FailoverCommand::Transfer(a) => transfer(a, ui, out),
        FailoverCommand::Resync(a) => resync(a, ui, out, stop),
        FailoverCommand::Drill(a) => drill::run(a, ui, out, stop),
    }
}

fn status(
    args: &StatusArgs,
    ui: &Ui,
    out: &mut dyn Write,
    stop: &Arc<AtomicBool>,
) -> Result<Status, FailoverError> {
    let cfg = load(args.config.as_deref())?;
    loop {
        let seen = survey(&cfg);
        let has_leader = seen
            .iter()
            .any(|s| s.status.as_ref().is_some_and(|st| st.role == "leader"));
        if ui.json {
            output::json_line(
                out,
                &serde_json::json!({
                    "cluster": cfg.cluster,
                    "config": cfg.path,
                    "leader": leader_of(&seen.iter().filter_map(|s| s.status.as_ref()).collect::<Vec<_>>()).map(|l| l.id),
                    "replicas": seen,
                }),
            )?;
        } else {
            let text = status_table(&cfg, &seen, ui);
            if args.watch {
                // Redraw in place: home, clear, table.
                write!(out, "\x1b[H\x1b[2J")?;
                writeln!(
                    out,
                    "falcon failover status — every {} (Ctrl-C to stop)\n",
                    humantime::format_duration(args.interval)
                )?;
            }
            write!(out, "{text}")?;
        }
        out.flush()?;
        if !args.watch {
            return Ok(if has_leader {
                Status::Success
            } else {
                Status::Failure
            });
        }
        let until = Instant::now() + args.interval;
        while Instant::now() < until {
            if stop.load(Ordering::Relaxed) {
                return Ok(Status::Success);
            }
            std::thread::sleep(Duration::from_millis(50).min(args.interval));
        }
    }
}

/// The replica `id` of the cluster file, or a usage error naming `flag`.
fn replica_named<'a>(
    cfg: &'a ClusterConfig,
    flag: &str,
    id: u32,
) -> Result<&'a crate::config::ReplicaConfig, FailoverError> {
    cfg.replicas.iter().find(|r| r.id == id).ok_or_else(|| {
        FailoverError::Usage(format!(
            "{flag} {id}: no such replica in {} (ids: {})",
            cfg.path.display(),
            cfg.replicas
                .iter()
                .map(|r| r.id.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })
}

fn ms(d_ns: u64) -> String {
    format!("{:.1}", d_ns as f64 / 1e6)
}

fn uptime(s: f64) -> String {
    humantime::format_duration(Duration::from_secs(s as u64)).to_string()
}

fn status_table(cfg: &ClusterConfig, seen: &[Seen], ui: &Ui) -> String {
    let mut t = ui.table();
    t.set_header([
        "id", "role", "view", "last op", "commit", "lag", "peers", "program", "log", "memory",
        "uptime",
    ]);
    let mut notes = Vec::new();
    for s in seen {
        match &s.status {
            Some(st) => {
                let role = match st.role.as_str() {
                    "leader" => ui.good("leader"),
                    r => r.to_string(),
                };
                let peers = format!(
                    "{}/{}",
                    st.peers_connected.len(),
                    cfg.replicas.len().saturating_sub(1)
                );
                let mut program = st
                    .program
                    .as_ref()
                    .map_or_else(|| "-".to_string(), |p| format!("{} pid {}", p.name, p.pid));
                if st.diverged.is_some() {
                    program = format!("{program} {}", ui.bad("diverged"));
                } else if st.resync.is_some() {
                    program = format!("{program} (resync)");
                }
                if let Some(d) = &st.diverged {
                    notes.push(format!(
                        "replica {}: its program diverged from the leader's at op {} ({}); rebuild it with `falcon failover resync --node {}`",
                        st.id, d.op, d.mismatch, st.id
                    ));
                }
                if let Some(r) = &st.resync {
                    notes.push(format!(
                        "replica {}: rebuilding its program from the log: {}/{} entries",
                        st.id, r.done, r.total
                    ));
                }
                if let Some(secs) = st.disk_full_s {
                    notes.push(format!(
                        "replica {}: disk full for {secs:.0} s: its log cannot grow; it takes no input and acknowledges nothing new (free space in {})",
                        st.id,
                        st.data_dir.display()
                    ));
                }
                t.add_row([
                    st.id.to_string(),
                    role,
                    st.view.to_string(),
                    st.last_op.to_string(),
                    st.commit.to_string(),
                    s.lag.map_or_else(|| "?".into(), |l| l.to_string()),
                    peers,
                    program,
                    output::human_bytes(st.log_bytes),
                    output::human_bytes(st.memory_bytes + st.apply_queue_bytes),
                    uptime(st.uptime_s),
                ]);
            }
            None => {
                t.add_row([
                    s.id.to_string(),
                    ui.bad(if s.busy { "no answer" } else { "down" }),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                ]);
                notes.push(format!(
                    "replica {}: {}",
                    s.id,
                    s.error.as_deref().unwrap_or("no answer")
                ));
            }
        }
    }
    let mut text = format!(
        "cluster {:?} ({}, {} replicas)\n{t}\n",
        cfg.cluster,
        cfg.path.display(),
        cfg.replicas.len()
    );
    if !seen
        .iter()
        .any(|s| s.status.as_ref().is_some_and(|st| st.role == "leader"))
    {
        let busy: Vec<String> = seen
            .iter()
            .filter(|s| s.busy)
            .map(|s| s.id.to_string())
            .collect();
        notes.push(if busy.is_empty() {
            "no replica leads: the cluster takes no writes now".into()
        } else {
            format!(
                "no replica that answered leads; replica {} did not answer in time (busy? it may be the leader)",
                busy.join(", ")
            )
        });
    }
    for n in notes {
        text.push_str(&n);
        text.push('\n');
    }
    text
}

/// What a transfer did.
#[derive(Debug, serde::Serialize)]
pub struct Transferred {
    /// The old leader.
    pub from: u32,
    /// The new leader.
    pub to: u32,
    /// The view before and after.
    pub old_view: u64,
    /// The new leader's view.
    pub new_view: u64,
    /// From the request to the new leader's first commit, ms.
    pub took_ms: f64,
    /// From the last commit under the old leader (or the moment it stopped
    /// taking input, if later) to the first under the new one, ms.
    pub unavailable_ms: f64,
}

fn transfer(args: &TransferArgs, ui: &Ui, out: &mut dyn Write) -> Result<Status, FailoverError> {
    let cfg = load(args.config.as_deref())?;
    let target = replica_named(&cfg, "--to", args.to)?;
    let seen = survey(&cfg);
    let statuses: Vec<&NodeStatus> = seen.iter().filter_map(|s| s.status.as_ref()).collect();
    let Some(old) = leader_of(&statuses).cloned() else {
        return Err(FailoverError::Failed(
            "no replica leads now (see falcon failover status); nothing to transfer".into(),
        ));
    };
    if old.id == args.to {
        ui.note(&format!(
            "replica {} already leads (view {}); nothing to do",
            old.id, old.view
        ));
        if ui.json {
            output::json_line(
                out,
                &serde_json::json!({"from": old.id, "to": old.id, "old_view": old.view, "new_view": old.view, "took_ms": 0.0, "unavailable_ms": 0.0}),
            )?;
        }
        return Ok(Status::Success);
    }
    match seen.iter().find(|s| s.id == args.to) {
        Some(s) if !s.up => {
            return Err(FailoverError::Failed(format!(
                "replica {} does not answer ({}): it cannot take over",
                args.to,
                s.error.as_deref().unwrap_or("down")
            )));
        }
        Some(Seen {
            status: Some(st), ..
        }) if !args.force => {
            if let Some(d) = &st.diverged {
                return Err(FailoverError::Failed(format!(
                    "replica {}'s program diverged from the leader's at op {} ({}): as leader its copy would become the truth. Rebuild it first (falcon failover resync --node {}), or give --force",
                    args.to, d.op, d.mismatch, args.to
                )));
            }
            if st.resync.is_some() {
                return Err(FailoverError::Failed(format!(
                    "replica {} is rebuilding its program (falcon failover status shows how far); wait for it, or give --force",
                    args.to
                )));
            }
        }
        _ => {}
    }
    let started = Instant::now();
    let Some(old_dir) = cfg
        .replicas
        .iter()
        .find(|r| r.id == old.id)
        .map(|r| r.data_dir.clone())
    else {
        return Err(FailoverError::Failed(format!(
            "the leader calls itself replica {}, which {} does not have: is a data directory shared between replicas?",
            old.id,
            cfg.path.display()
        )));
    };
    admin::call(
        &admin::socket_path(&old_dir),
        &Request::Transfer { to: args.to },
        admin::ANSWER_WAIT,
    )
    .map_err(|e| FailoverError::Failed(format!("replica {}: {e}", old.id)))?;
    ui.detail(&format!(
        "replica {} (view {}) is handing over to replica {}",
        old.id, old.view, args.to
    ));
    // The target leads a newer view and has committed its first entry.
    let new = loop {
        if let Ok(st) = admin::status(&target.data_dir, ASK) {
            if st.role == "leader" && st.view > old.view && st.leader_first_commit_ns.is_some() {
                break st;
            }
        }
        if started.elapsed() > args.timeout {
            let now = survey(&cfg);
            let roles: Vec<String> = now
                .iter()
                .map(|s| match &s.status {
                    Some(st) => format!("{} {} in view {}", s.id, st.role, st.view),
                    None if s.busy => format!("{} not answering", s.id),
                    None => format!("{} down", s.id),
                })
                .collect();
            return Err(FailoverError::Failed(format!(
                "replica {} did not take over within {} (now: {}); the old leader gives up after 2 s if the target does not catch up",
                args.to,
                humantime::format_duration(args.timeout),
                roles.join(", ")
            )));
        }
        // (Each look is a status the new leader's loop builds: not too often.)
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = started.elapsed();
    let old_now = admin::status(&old_dir, ASK).ok();
    let first = new.leader_first_commit_ns.unwrap_or(0);
    let stopped = old_now
        .as_ref()
        .map(|o| {
            o.leader_last_commit_ns
                .unwrap_or(0)
                .max(o.transfer_started_ns.unwrap_or(0))
        })
        .filter(|&t| t > 0)
        .unwrap_or(first);
    let res = Transferred {
        from: old.id,
        to: new.id,
        old_view: old.view,
        new_view: new.view,
        took_ms: took.as_secs_f64() * 1e3,
        unavailable_ms: first.saturating_sub(stopped) as f64 / 1e6,
    };
    if ui.json {
        output::json_line(out, &serde_json::to_value(&res).expect("serializes"))?;
    } else {
        writeln!(
            out,
            "replica {} leads now (view {} → {}); unavailable for {} ms (last commit under replica {} to first under replica {}); the transfer took {:.1} ms",
            res.to,
            res.old_view,
            res.new_view,
            ms(first.saturating_sub(stopped)),
            res.from,
            res.to,
            res.took_ms
        )?;
    }
    Ok(Status::Success)
}

/// `falcon failover resync`: asks the replica to rebuild its program, shows
/// the progress, and reports whether the rebuilt copy matches the leader's.
fn resync(
    args: &ResyncArgs,
    ui: &Ui,
    out: &mut dyn Write,
    stop: &Arc<AtomicBool>,
) -> Result<Status, FailoverError> {
    let cfg = load(args.config.as_deref())?;
    let target = replica_named(&cfg, "--node", args.node)?;
    let socket = admin::socket_path(&target.data_dir);
    let leader_snapshot = match args.from {
        ResyncFrom::Log => None,
        from => leader_snapshot(&cfg, args, from == ResyncFrom::Leader, ui)?,
    };
    let answer = admin::call(
        &socket,
        &Request::Resync { leader_snapshot },
        Duration::from_secs(60),
    )
    .map_err(|e| FailoverError::Failed(format!("replica {}: {e}", args.node)))?;
    let started_ns = answer
        .get("started_ns")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0);
    let from = answer
        .get("from")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0);
    if let Some(op) = leader_snapshot {
        ui.detail(&format!(
            "replica {}: fetching the leader's snapshot (op {op} or later)",
            args.node
        ));
    } else {
        ui.detail(&format!(
            "replica {}: restarting its program from {} and replaying the log after it",
            args.node,
            if from == 0 {
                "its initial state".to_string()
            } else {
                format!("its snapshot at op {from}")
            },
        ));
    }
    let pb = ui.progress_with(
        0,
        "{msg} [{bar:40}] {pos}/{len} entries eta {eta}",
        "resync",
    );
    let began = Instant::now();
    let mut answered = Instant::now();
    let report = loop {
        if stop.load(Ordering::Relaxed) {
            pb.finish_and_clear();
            ui.note("stopped waiting; the rebuild goes on (falcon failover status shows it)");
            return Ok(Status::Failure);
        }
        match admin::status(&target.data_dir, ASK) {
            Ok(st) => {
                answered = Instant::now();
                if let Some(p) = &st.resync {
                    pb.set_length(p.total);
                    pb.set_position(p.done);
                } else if let Some(r) = st.last_resync.filter(|r| r.started_ns == started_ns) {
                    break r;
                }
            }
            // Busy restarting its program: the loop answers again soon.
            Err(_) if answered.elapsed() < SILENT_MAX => {}
            Err(e) => {
                pb.finish_and_clear();
                return Err(FailoverError::Failed(format!(
                    "replica {} stopped answering during the rebuild ({} without an answer): {e}",
                    args.node,
                    humantime::format_duration(SILENT_MAX)
                )));
            }
        }
        if began.elapsed() > args.timeout {
            pb.finish_and_clear();
            return Err(FailoverError::Failed(format!(
                "the rebuild of replica {} did not end within {} (it goes on; falcon failover status shows how far)",
                args.node,
                humantime::format_duration(args.timeout)
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    pb.finish_and_clear();
    let matches = report.mismatches == 0;
    if ui.json {
        let mut v = serde_json::to_value(&report).expect("serializes");
        v["node"] = args.node.into();
        v["matches"] = matches.into();
        output::json_line(out, &v)?;
    } else {
        let mut t = ui.table();
        t.set_header([
            "replica",
            "rebuilt from",
            "replayed",
            "took",
            "chunks compared",
            "differing",
            "result",
        ]);
        t.add_row([
            args.node.to_string(),
            if report.from_op == 0 {
                report.source.clone()
            } else {
                format!("{} at op {}", report.source, report.from_op)
            },
            format!("ops {}..={}", report.from_op + 1, report.to_op),
            format!("{:.1} s", report.seconds),
            report.compared.to_string(),
            report.mismatches.to_string(),
            if matches {
                ui.good("matches the leader")
            } else {
                ui.bad("still differs")
            },
        ]);
        writeln!(out, "{t}")?;
        if let Some(m) = &report.first_mismatch {
            writeln!(
                out,
                "first difference: {m}\nthe program is not deterministic for this input: see the README on divergence"
            )?;
        } else if report.compared == 0 {
            writeln!(
                out,
                "no chunk of the leader's output was compared on the way (no connection wrote a whole chunk, or detection is off): the rebuild is done, the match is unproven"
            )?;
        }
    }
    Ok(if matches {
        Status::Success
    } else {
        Status::Failure
    })
}

/// `--from leader|auto`: asks the leader for a fresh snapshot and waits for
/// it; the op it covers. None (auto) when the hooks are not there.
fn leader_snapshot(
    cfg: &ClusterConfig,
    args: &ResyncArgs,
    required: bool,
    ui: &Ui,
) -> Result<Option<u64>, FailoverError> {
    let seen = survey(cfg);
    let statuses: Vec<&NodeStatus> = seen.iter().filter_map(|s| s.status.as_ref()).collect();
    let Some(leader) = leader_of(&statuses).cloned() else {
        return Err(FailoverError::Failed(
            "no replica leads now (see falcon failover status): there is no copy to rebuild from"
                .into(),
        ));
    };
    let target = statuses.iter().find(|s| s.id == args.node);
    let why_not = if leader.id == args.node {
        Some(format!(
            "replica {} leads: its copy is the one the others are compared with; hand the leadership to another replica first (falcon failover transfer)",
            args.node
        ))
    } else if !leader.snapshots {
        Some(format!(
            "the leader (replica {}) has no --snapshot-cmd",
            leader.id
        ))
    } else if target.is_some_and(|t| !t.restores) {
        Some(format!("replica {} has no --restore-cmd", args.node))
    } else {
        None
    };
    if let Some(why) = why_not {
        if required || leader.id == args.node {
            return Err(FailoverError::Failed(why));
        }
        ui.detail(&format!("{why}: rebuilding from the log"));
        return Ok(None);
    }
    let dir = cfg
        .replicas
        .iter()
        .find(|r| r.id == leader.id)
        .map(|r| r.data_dir.clone())
        .ok_or_else(|| {
            FailoverError::Failed(format!("no replica {} in the cluster file", leader.id))
        })?;
    let answer = admin::call(
        &admin::socket_path(&dir),
        &Request::Snapshot,
        admin::ANSWER_WAIT,
    )
    .map_err(|e| FailoverError::Failed(format!("the leader (replica {}): {e}", leader.id)))?;
    let op = answer
        .get("op")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0);
    ui.detail(&format!(
        "the leader (replica {}) takes a snapshot covering op {op}",
        leader.id
    ));
    let began = Instant::now();
    loop {
        match admin::status(&dir, ASK) {
            Ok(st) if st.snapshot_op >= op && st.snapshot_op > 0 => {
                return Ok(Some(st.snapshot_op));
            }
            Ok(_) => {}
            Err(e) => {
                return Err(FailoverError::Failed(format!(
                    "the leader (replica {}) stopped answering while taking its snapshot: {e}",
                    leader.id
                )));
            }
        }
        if began.elapsed() > args.timeout {
            return Err(FailoverError::Failed(format!(
                "the leader's snapshot was not done within {}",
                humantime::format_duration(args.timeout)
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
