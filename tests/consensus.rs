//! The engine, step by step, named after the sections of "Viewstamped
//! Replication Revisited" (Liskov and Cowling, 2012) they check. Each test
//! feeds inputs and asserts the exact commands that come out.

use bytes::Bytes;
use falcon::consensus::message::{self, DecodeError};
use falcon::consensus::{
    Command, Config, Envelope, Event, Input, Message, PersistentState, Reject, Replica, Role,
    Status,
};
use falcon::log::storage::SplitMix;
use falcon::log::{Entry, Kind};

const CLUSTER: u64 = 0xc1;
const MS: u64 = 1_000_000;

fn cfg(id: u32, n: u32) -> Config {
    Config {
        heartbeat_ns: 10 * MS,
        election_timeout_ns: 100 * MS,
        ..Config::new(CLUSTER, id, n)
    }
}

fn ev(payload: &str) -> Event {
    Event {
        kind: Kind::Data,
        conn: 7,
        payload: Bytes::from(payload.to_string()),
    }
}

fn entry(view: u64, op: u64, time_ns: u64, payload: &str) -> Entry {
    Entry {
        view,
        op,
        kind: Kind::Data,
        conn: 7,
        time_ns,
        payload: Bytes::from(payload.to_string()),
    }
}

fn noop(view: u64, op: u64, time_ns: u64) -> Entry {
    Entry {
        view,
        op,
        kind: Kind::Noop,
        conn: 0,
        time_ns,
        payload: Bytes::new(),
    }
}

fn recv(from: u32, to: u32, msg: Message) -> Input {
    Input::Receive(Envelope {
        cluster: CLUSTER,
        from,
        to,
        msg,
    })
}

fn send(to: u32, msg: Message) -> Command {
    Command::Send {
        to,
        msg,
        after_durable: 0,
    }
}

fn step(r: &mut Replica, now: u64, input: Input) -> Vec<Command> {
    let mut out = Vec::new();
    r.step(now, input, &mut out);
    out
}

fn sends(cmds: &[Command]) -> Vec<(u32, &'static str)> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Send { to, msg, .. } => Some((*to, msg.name())),
            _ => None,
        })
        .collect()
}

/// 4.1 Normal operation: the primary assigns the next op, appends and sends Prepare to every backup.
#[test]
fn normal_4_1_leader_appends_and_prepares() {
    let mut leader = Replica::new(cfg(0, 3), 1, 0);
    assert_eq!(leader.role(), Role::Leader);
    let out = step(
        &mut leader,
        5,
        Input::Propose(vec![ev("SET a 1"), ev("SET b 2")]),
    );
    let batch = vec![entry(0, 1, 5, "SET a 1"), entry(0, 2, 5, "SET b 2")];
    let prepare = Message::Prepare {
        view: 0,
        op_start: 1,
        entries: batch.clone(),
        commit: 0,
    };
    // The first step of a new leader saves its state, so a restart can tell it led view 0.
    assert_eq!(
        out,
        vec![
            Command::SaveState(PersistentState {
                view: 0,
                log_view: 0,
                ..PersistentState::default()
            }),
            Command::Append(batch),
            send(1, prepare.clone()),
            send(2, prepare)
        ]
    );
}

/// 4.1: a backup appends the entries and answers PrepareOk only once they are durable.
#[test]
fn normal_4_1_backup_persists_then_acknowledges() {
    let mut backup = Replica::new(cfg(1, 3), 1, 0);
    let batch = vec![entry(0, 1, 5, "SET a 1")];
    let out = step(
        &mut backup,
        6,
        recv(
            0,
            1,
            Message::Prepare {
                view: 0,
                op_start: 1,
                entries: batch.clone(),
                commit: 0,
            },
        ),
    );
    assert_eq!(
        out,
        vec![
            Command::Append(batch),
            Command::Send {
                to: 0,
                msg: Message::PrepareOk { view: 0, op: 1 },
                after_durable: 1
            },
        ]
    );
}

/// 4.1: the primary commits once a majority (itself included) has the entry,
/// delivers it, and tells backups that have everything at once.
#[test]
fn normal_4_1_commit_at_a_majority_counting_the_leader() {
    let mut leader = Replica::new(cfg(0, 3), 1, 0);
    step(&mut leader, 5, Input::Propose(vec![ev("x")]));
    assert_eq!(
        step(&mut leader, 6, Input::Durable { op: 1 }),
        vec![],
        "one of three is not a majority"
    );
    let out = step(
        &mut leader,
        7,
        recv(1, 0, Message::PrepareOk { view: 0, op: 1 }),
    );
    assert_eq!(out, vec![Command::Deliver(vec![entry(0, 1, 5, "x")])]);
    assert_eq!(leader.commit(), 1);
    // A late acknowledgement changes nothing.
    assert_eq!(
        step(
            &mut leader,
            8,
            recv(2, 0, Message::PrepareOk { view: 0, op: 1 })
        ),
        vec![]
    );
    // The backups learn the commit point in a Commit of its own once
    // commit_notify_ns (1 ms) has passed without a Prepare to carry it …
    assert_eq!(step(&mut leader, 9, Input::Tick), vec![], "too early");
    assert_eq!(
        step(&mut leader, 7 + MS, Input::Tick),
        vec![
            send(1, Message::Commit { view: 0, commit: 1 }),
            send(2, Message::Commit { view: 0, commit: 1 }),
        ]
    );
}

/// 4.1: … and with the next Prepare when one goes first: one message per
/// entry and backup instead of two.
#[test]
fn normal_4_1_the_next_prepare_carries_the_commit_point() {
    let mut leader = Replica::new(cfg(0, 3), 1, 0);
    step(&mut leader, 5, Input::Propose(vec![ev("x")]));
    step(&mut leader, 6, Input::Durable { op: 1 });
    step(
        &mut leader,
        7,
        recv(1, 0, Message::PrepareOk { view: 0, op: 1 }),
    );
    assert_eq!(leader.commit(), 1);
    let out = step(&mut leader, 8, Input::Propose(vec![ev("y")]));
    let prepare = Message::Prepare {
        view: 0,
        op_start: 2,
        entries: vec![entry(0, 2, 8, "y")],
        commit: 1,
    };
    assert_eq!(
        out,
        vec![
            Command::Append(vec![entry(0, 2, 8, "y")]),
            send(1, prepare.clone()),
            send(2, prepare),
        ]
    );
    // Told already: no Commit follows.
    assert_eq!(step(&mut leader, 8 + 2 * MS, Input::Tick), vec![]);
}

/// 4.1: with `commit_notify_ns = 0`, a Commit goes at once.
#[test]
fn normal_4_1_commit_notify_zero_tells_at_once() {
    let mut leader = Replica::new(
        Config {
            commit_notify_ns: 0,
            ..cfg(0, 3)
        },
        1,
        0,
    );
    step(&mut leader, 5, Input::Propose(vec![ev("x")]));
    step(&mut leader, 6, Input::Durable { op: 1 });
    let out = step(
        &mut leader,
        7,
        recv(1, 0, Message::PrepareOk { view: 0, op: 1 }),
    );
    assert_eq!(
        out,
        vec![
            Command::Deliver(vec![entry(0, 1, 5, "x")]),
            send(1, Message::Commit { view: 0, commit: 1 }),
            send(2, Message::Commit { view: 0, commit: 1 }),
        ]
    );
}

/// 4.1: with one replica, the leader's own disk is the majority: nothing commits before it.
#[test]
fn normal_4_1_single_replica_commits_on_its_own_disk() {
    let mut solo = Replica::new(cfg(0, 1), 1, 0);
    let out = step(&mut solo, 5, Input::Propose(vec![ev("x")]));
    assert_eq!(out, vec![Command::Append(vec![entry(0, 1, 5, "x")])]);
    assert_eq!(
        step(&mut solo, 6, Input::Durable { op: 1 }),
        vec![Command::Deliver(vec![entry(0, 1, 5, "x")])]
    );
}

/// 4.1: the commit point reaches backups on an idle heartbeat, so the last
/// request never waits for a next one; backups deliver on it.
#[test]
fn normal_4_1_idle_heartbeat_carries_the_commit_point() {
    let mut leader = Replica::new(cfg(0, 3), 1, 0);
    step(&mut leader, 5, Input::Propose(vec![ev("x")]));
    step(
        &mut leader,
        6,
        recv(1, 0, Message::PrepareOk { view: 0, op: 1 }),
    );
    step(
        &mut leader,
        7,
        recv(2, 0, Message::PrepareOk { view: 0, op: 1 }),
    );
    assert_eq!(
        step(&mut leader, 8, Input::Tick),
        vec![],
        "not idle long enough"
    );
    let out = step(&mut leader, 7 + 10 * MS, Input::Tick);
    assert_eq!(
        out,
        vec![
            send(1, Message::Commit { view: 0, commit: 1 }),
            send(2, Message::Commit { view: 0, commit: 1 })
        ]
    );

    let mut backup = Replica::new(cfg(1, 3), 1, 0);
    step(
        &mut backup,
        6,
        recv(
            0,
            1,
            Message::Prepare {
                view: 0,
                op_start: 1,
                entries: vec![entry(0, 1, 5, "x")],
                commit: 0,
            },
        ),
    );
    let out = step(
        &mut backup,
        20,
        recv(0, 1, Message::Commit { view: 0, commit: 1 }),
    );
    assert_eq!(out, vec![Command::Deliver(vec![entry(0, 1, 5, "x")])]);
}

/// 4.1: a backup that missed entries says where its log ends instead of accepting a gap.
#[test]
fn normal_4_1_a_gap_asks_for_the_missing_entries() {
    let mut backup = Replica::new(cfg(2, 3), 1, 0);
    let out = step(
        &mut backup,
        6,
        recv(
            0,
            2,
            Message::Prepare {
                view: 0,
                op_start: 4,
                entries: vec![entry(0, 4, 5, "d")],
                commit: 2,
            },
        ),
    );
    assert_eq!(out, vec![send(0, Message::Missing { view: 0, from: 1 })]);
    // The leader answers with its whole log from there (StartView).
    let mut leader = Replica::new(cfg(0, 3), 1, 0);
    step(&mut leader, 1, Input::Propose(vec![ev("a"), ev("b")]));
    let out = step(
        &mut leader,
        2,
        recv(2, 0, Message::Missing { view: 0, from: 1 }),
    );
    assert_eq!(
        out,
        vec![send(
            2,
            Message::StartView {
                view: 0,
                op_start: 1,
                entries: vec![entry(0, 1, 1, "a"), entry(0, 2, 1, "b")],
                commit: 0,
                last_op: 2,
            }
        )]
    );
}

/// 4.1: only the leader takes requests; others refuse with a hint.
#[test]
fn normal_4_1_proposals_at_a_backup_are_refused_with_a_hint() {
    let mut backup = Replica::new(cfg(1, 3), 1, 0);
    let out = step(&mut backup, 1, Input::Propose(vec![ev("x")]));
    assert_eq!(
        out,
        vec![Command::Rejected {
            events: vec![ev("x")],
            reason: Reject::NotLeader(Some(0))
        }]
    );
}

/// 4.1: a bounded number of uncommitted entries; beyond it the leader pushes back.
#[test]
fn normal_4_1_the_uncommitted_window_is_bounded() {
    let mut c = cfg(0, 3);
    c.uncommitted_max = 2;
    let mut leader = Replica::new(c, 1, 0);
    step(&mut leader, 1, Input::Propose(vec![ev("a"), ev("b")]));
    let out = step(&mut leader, 2, Input::Propose(vec![ev("c")]));
    assert_eq!(
        out,
        vec![Command::Rejected {
            events: vec![ev("c")],
            reason: Reject::Busy
        }]
    );
}

/// 4.2 View changes: a backup that hears nothing for the timeout first asks
/// whether the others would follow (a pre-vote, nothing saved); with a
/// majority's yes it moves to the next view, persists it, tells everyone,
/// and sends its log to the new leader.
#[test]
fn view_change_4_2_timeout_starts_a_view_change() {
    let mut backup = Replica::new(cfg(2, 3), 1, 0);
    step(
        &mut backup,
        1,
        recv(
            0,
            2,
            Message::Prepare {
                view: 0,
                op_start: 1,
                entries: vec![entry(0, 1, 1, "a")],
                commit: 0,
            },
        ),
    );
    assert_eq!(
        step(&mut backup, 50 * MS, Input::Tick),
        vec![],
        "before the timeout"
    );
    let out = step(&mut backup, 250 * MS, Input::Tick);
    assert_eq!(
        out,
        vec![
            send(0, Message::ViewProbe { view: 1 }),
            send(1, Message::ViewProbe { view: 1 }),
        ],
        "a probe first: nothing saved, no view moved"
    );
    assert_eq!(backup.view(), 0);
    // A yes from another replica makes a majority of 3 with its own.
    let out = step(
        &mut backup,
        251 * MS,
        recv(1, 2, Message::ViewProbeOk { view: 1 }),
    );
    assert_eq!(
        out,
        vec![
            Command::SaveState(PersistentState {
                view: 1,
                log_view: 0,
                ..PersistentState::default()
            }),
            Command::RoleChanged {
                role: Role::ViewChange,
                view: 1,
                leader: 1
            },
            send(0, Message::StartViewChange { view: 1 }),
            send(1, Message::StartViewChange { view: 1 }),
            send(
                1,
                Message::DoViewChange {
                    view: 1,
                    log_view: 0,
                    last_op: 1,
                    commit: 0,
                    op_start: 1,
                    entries: vec![entry(0, 1, 1, "a")]
                }
            ),
        ]
    );
}

/// falcon: the pre-vote. A replica that hears from its leader refuses to
/// join a view change (a replica cut off or just restarted cannot disturb a
/// working cluster); once the leader has been silent for the election
/// timeout, it says yes. A leader never says yes; a probe of an old view
/// learns the newer one.
#[test]
fn a_replica_that_hears_its_leader_refuses_a_probe() {
    let mut backup = Replica::new(cfg(2, 3), 1, 0);
    step(
        &mut backup,
        200 * MS,
        recv(0, 2, Message::Commit { view: 0, commit: 0 }),
    );
    assert_eq!(
        step(
            &mut backup,
            250 * MS,
            recv(1, 2, Message::ViewProbe { view: 1 })
        ),
        vec![],
        "the leader spoke 50 ms ago"
    );
    assert_eq!(
        step(
            &mut backup,
            360 * MS,
            recv(1, 2, Message::ViewProbe { view: 1 })
        ),
        vec![send(1, Message::ViewProbeOk { view: 1 })],
        "silent for the 150 ms timeout"
    );
    assert_eq!(backup.view(), 0, "a probe moves no view");
    assert_eq!(
        step(
            &mut backup,
            361 * MS,
            recv(1, 2, Message::ViewProbe { view: 0 })
        ),
        vec![send(1, Message::NewerView { view: 0 })]
    );
    let mut leader = Replica::new(cfg(0, 3), 1, 0);
    step(&mut leader, 1, Input::Tick);
    assert!(
        step(
            &mut leader,
            10_000 * MS,
            recv(1, 0, Message::ViewProbe { view: 1 })
        )
        .iter()
        .all(|c| !matches!(
            c,
            Command::Send {
                msg: Message::ViewProbeOk { .. },
                ..
            }
        )),
        "a leader never says yes"
    );
}

/// 4.2: the new leader, with a majority of logs, keeps the best (highest log
/// view, then longest), starts the view with a Noop and sends its log to every backup.
#[test]
fn view_change_4_2_new_leader_merges_the_best_log() {
    let mut next = Replica::new(cfg(1, 3), 1, 0);
    // It has only op 1; replica 2 has ops 1 and 2 of view 0.
    step(
        &mut next,
        1,
        recv(
            0,
            1,
            Message::Prepare {
                view: 0,
                op_start: 1,
                entries: vec![entry(0, 1, 1, "a")],
                commit: 0,
            },
        ),
    );
    // The leader goes silent for an election timeout: then it joins.
    let later = 200 * MS;
    let out = step(
        &mut next,
        later,
        recv(2, 1, Message::StartViewChange { view: 1 }),
    );
    assert_eq!(
        out,
        vec![
            Command::SaveState(PersistentState {
                view: 1,
                log_view: 0,
                ..PersistentState::default()
            }),
            Command::RoleChanged {
                role: Role::ViewChange,
                view: 1,
                leader: 1
            },
            send(0, Message::StartViewChange { view: 1 }),
            send(2, Message::StartViewChange { view: 1 }),
        ]
    );
    let dvc = Message::DoViewChange {
        view: 1,
        log_view: 0,
        last_op: 2,
        commit: 1,
        op_start: 1,
        entries: vec![entry(0, 1, 1, "a"), entry(0, 2, 1, "b")],
    };
    let out = step(&mut next, later + 1, recv(2, 1, dvc));
    let log = [
        entry(0, 1, 1, "a"),
        entry(0, 2, 1, "b"),
        noop(1, 3, later + 1),
    ];
    assert_eq!(
        out,
        vec![
            Command::Append(vec![entry(0, 2, 1, "b")]),
            Command::SaveState(PersistentState {
                view: 1,
                log_view: 1,
                ..PersistentState::default()
            }),
            Command::RoleChanged {
                role: Role::Leader,
                view: 1,
                leader: 1
            },
            Command::Deliver(vec![entry(0, 1, 1, "a")]),
            Command::Append(vec![noop(1, 3, later + 1)]),
            send(
                0,
                Message::StartView {
                    view: 1,
                    op_start: 2,
                    entries: log[1..].to_vec(),
                    commit: 1,
                    last_op: 3,
                }
            ),
            send(
                2,
                Message::StartView {
                    view: 1,
                    op_start: 2,
                    entries: log[1..].to_vec(),
                    commit: 1,
                    last_op: 3,
                }
            ),
        ]
    );
    assert_eq!(next.role(), Role::Leader);
}

/// 4.2: a log of a higher view wins over a longer log of a lower view.
#[test]
fn view_change_4_2_higher_log_view_beats_longer_log() {
    let mut next = Replica::restart(
        cfg(1, 3),
        1,
        0,
        PersistentState {
            view: 3,
            log_view: 1,
            ..PersistentState::default()
        },
        1,
        vec![
            entry(1, 1, 1, "a"),
            entry(1, 2, 1, "old-b"),
            entry(1, 3, 1, "old-c"),
        ],
        vec![],
    );
    // View 4 is led by replica 1.
    step(
        &mut next,
        1,
        recv(2, 1, Message::StartViewChange { view: 4 }),
    );
    let out = step(
        &mut next,
        2,
        recv(
            2,
            1,
            Message::DoViewChange {
                view: 4,
                log_view: 2,
                last_op: 2,
                commit: 1,
                op_start: 1,
                entries: vec![entry(1, 1, 1, "a"), entry(2, 2, 2, "new-b")],
            },
        ),
    );
    // Its own commit point is 0 (it restarted): a log sent from op 2 would not
    // do, so that case asks for more first.
    assert_eq!(out[0], Command::Truncate { after: 1 });
    assert_eq!(out[1], Command::Append(vec![entry(2, 2, 2, "new-b")]));
    assert_eq!(next.entry(2), Some(&entry(2, 2, 2, "new-b")));
    assert_eq!(
        next.entry(3).map(|e| e.kind),
        Some(Kind::Noop),
        "the stale op 3 is gone; the view's Noop is there"
    );
}

/// 4.2 and falcon's rule: the new view closes every connection still open,
/// so every replica closes them alike.
#[test]
fn view_change_closes_every_open_connection() {
    let open = |op, conn| Entry {
        view: 0,
        op,
        kind: Kind::Open,
        conn,
        time_ns: 1,
        payload: Bytes::new(),
    };
    let close = |op, conn| Entry {
        view: 0,
        op,
        kind: Kind::Close,
        conn,
        time_ns: 1,
        payload: Bytes::new(),
    };
    let mut next = Replica::restart(
        cfg(1, 3),
        1,
        0,
        PersistentState {
            view: 0,
            log_view: 0,
            ..PersistentState::default()
        },
        1,
        vec![open(1, 5), open(2, 6), close(3, 5), open(4, 9)],
        vec![],
    );
    // It has heard from no leader for an election timeout since its start.
    step(
        &mut next,
        200 * MS,
        recv(2, 1, Message::StartViewChange { view: 1 }),
    );
    let out = step(
        &mut next,
        200 * MS + 1,
        recv(
            2,
            1,
            Message::DoViewChange {
                view: 1,
                log_view: 0,
                last_op: 4,
                commit: 4,
                op_start: 5,
                entries: vec![],
            },
        ),
    );
    let appended: Vec<(Kind, u64)> = out
        .iter()
        .filter_map(|c| match c {
            Command::Append(es) => Some(es.iter().map(|e| (e.kind, e.conn)).collect::<Vec<_>>()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(
        appended,
        vec![(Kind::Noop, 0), (Kind::Close, 6), (Kind::Close, 9)]
    );
}

/// 4.2: a backup in a view change installs the new leader's log whole and acknowledges it.
#[test]
fn view_change_4_2_backup_installs_start_view() {
    let mut backup = Replica::restart(
        cfg(2, 3),
        1,
        0,
        PersistentState {
            view: 1,
            log_view: 0,
            ..PersistentState::default()
        },
        1,
        vec![entry(0, 1, 1, "a"), entry(0, 2, 1, "stale")],
        vec![],
    );
    assert_eq!(backup.status(), Status::ViewChange);
    let out = step(
        &mut backup,
        5,
        recv(
            1,
            2,
            Message::StartView {
                view: 1,
                op_start: 1,
                entries: vec![entry(0, 1, 1, "a"), noop(1, 2, 4)],
                commit: 1,
                last_op: 2,
            },
        ),
    );
    assert_eq!(
        out,
        vec![
            Command::Truncate { after: 1 },
            Command::Append(vec![noop(1, 2, 4)]),
            Command::SaveState(PersistentState {
                view: 1,
                log_view: 1,
                ..PersistentState::default()
            }),
            Command::RoleChanged {
                role: Role::Follower,
                view: 1,
                leader: 1
            },
            Command::Deliver(vec![entry(0, 1, 1, "a")]),
            Command::Send {
                to: 1,
                msg: Message::PrepareOk { view: 1, op: 2 },
                after_durable: 2
            },
        ]
    );
}

/// 4.3 Recovery (with a disk): a restarted replica never acts in a view older
/// than the one it promised; it tells the sender about the newer view.
#[test]
fn recovery_4_3_never_acts_in_an_older_view() {
    // View 4 is led by replica 1; this is replica 2.
    let mut r = Replica::restart(
        cfg(2, 3),
        1,
        0,
        PersistentState {
            view: 4,
            log_view: 4,
            ..PersistentState::default()
        },
        1,
        vec![],
        vec![],
    );
    let out = step(
        &mut r,
        1,
        recv(
            0,
            2,
            Message::Prepare {
                view: 3,
                op_start: 1,
                entries: vec![entry(3, 1, 1, "a")],
                commit: 0,
            },
        ),
    );
    assert_eq!(out, vec![send(0, Message::NewerView { view: 4 })]);
    assert_eq!(r.last_op(), 0, "nothing from an older view is accepted");
    let out = step(
        &mut r,
        2,
        recv(
            1,
            2,
            Message::DoViewChange {
                view: 2,
                log_view: 2,
                last_op: 0,
                commit: 0,
                op_start: 1,
                entries: vec![],
            },
        ),
    );
    assert_eq!(out, vec![send(1, Message::NewerView { view: 4 })]);
}

/// 4.3: replica 0 restarted with no entries and no saved view still must not
/// lead view 0 again: a new leader saves its state at its first step, so a
/// restart means it may have ordered entries it no longer has.
#[test]
fn recovery_4_3_a_restarted_first_leader_does_not_lead_view_0_again() {
    let mut r = Replica::restart(
        cfg(0, 3),
        1,
        0,
        PersistentState::default(),
        1,
        vec![],
        vec![],
    );
    assert_eq!(r.status(), Status::ViewChange);
    let out = step(&mut r, 1, Input::Propose(vec![ev("x")]));
    assert_eq!(
        out[0],
        Command::SaveState(PersistentState {
            view: 1,
            log_view: 0,
            ..PersistentState::default()
        })
    );
    assert!(matches!(out.last(), Some(Command::Rejected { .. })));
}

/// 4.3: a replica restarted as the leader of its view never starts that view
/// again (it could order different entries at the same ops): it moves on.
#[test]
fn recovery_4_3_a_restarted_leader_leaves_its_view() {
    let mut r = Replica::restart(
        cfg(2, 3),
        1,
        0,
        PersistentState {
            view: 2,
            log_view: 2,
            ..PersistentState::default()
        },
        1,
        vec![],
        vec![],
    );
    let out = step(&mut r, 1, Input::Tick);
    assert_eq!(
        out[0],
        Command::SaveState(PersistentState {
            view: 3,
            log_view: 2,
            ..PersistentState::default()
        })
    );
    assert_eq!(r.view(), 3);
}

/// falcon: a planned transfer waits until the target has every entry, then
/// starts the view the target leads.
#[test]
fn transfer_hands_leadership_to_a_caught_up_replica() {
    let mut leader = Replica::new(cfg(0, 3), 1, 0);
    step(&mut leader, 1, Input::Propose(vec![ev("a")]));
    assert_eq!(
        step(&mut leader, 2, Input::TransferLeadership { to: 2 }),
        vec![],
        "2 has not got op 1 yet"
    );
    let out = step(&mut leader, 3, Input::Propose(vec![ev("refused")]));
    assert_eq!(
        out,
        vec![Command::Rejected {
            events: vec![ev("refused")],
            reason: Reject::NotLeader(Some(2))
        }]
    );
    // Op 1 is on replica 2 (not yet on the leader's disk): 2 is caught up.
    let out = step(
        &mut leader,
        4,
        recv(2, 0, Message::PrepareOk { view: 0, op: 1 }),
    );
    assert_eq!(
        sends(&out),
        vec![
            (1, "start_view_change"),
            (2, "start_view_change"),
            (2, "do_view_change")
        ]
    );
    assert!(
        out.contains(&Command::SaveState(PersistentState {
            view: 2,
            log_view: 0,
            ..PersistentState::default()
        })),
        "view 2 is led by replica 2"
    );
}

/// Every message carries the cluster id: another cluster's message is ignored.
#[test]
fn a_message_of_another_cluster_is_refused() {
    let mut backup = Replica::new(cfg(1, 3), 1, 0);
    let mut out = Vec::new();
    backup.step(
        1,
        Input::Receive(Envelope {
            cluster: CLUSTER + 1,
            from: 0,
            to: 1,
            msg: Message::Prepare {
                view: 0,
                op_start: 1,
                entries: vec![entry(0, 1, 1, "x")],
                commit: 0,
            },
        }),
        &mut out,
    );
    assert_eq!(out, vec![]);
    assert_eq!(backup.last_op(), 0);
    // And a sender id outside the cluster.
    let out = step(
        &mut backup,
        2,
        recv(7, 1, Message::Commit { view: 0, commit: 0 }),
    );
    assert_eq!(out, vec![]);
}

/// The message decoder on random and mutated bytes: an error, never a panic
/// (the cargo-fuzz target engine_message runs the same for longer).
#[test]
fn message_decoder_survives_random_bytes() {
    let mut rng = SplitMix(42);
    let samples: Vec<Vec<u8>> = [
        Message::Prepare {
            view: 1,
            op_start: 5,
            entries: vec![entry(1, 5, 1, "abc"), entry(1, 6, 1, "")],
            commit: 4,
        },
        Message::DoViewChange {
            view: 2,
            log_view: 1,
            last_op: 5,
            commit: 4,
            op_start: 5,
            entries: vec![entry(1, 5, 1, "z")],
        },
        Message::PrepareOk { view: 1, op: 5 },
    ]
    .into_iter()
    .map(|msg| {
        message::to_bytes(&Envelope {
            cluster: 1,
            from: 0,
            to: 1,
            msg,
        })
    })
    .collect();
    let mut decoded = 0;
    for i in 0..200_000u64 {
        let b: Vec<u8> = if i % 2 == 0 {
            (0..rng.next_u64() % 120)
                .map(|_| rng.next_u64() as u8)
                .collect()
        } else {
            let mut b = samples[(i % 3) as usize].clone();
            for _ in 0..1 + rng.next_u64() % 3 {
                let at = (rng.next_u64() % b.len() as u64) as usize;
                b[at] = rng.next_u64() as u8;
            }
            b.truncate(b.len() - (rng.next_u64() % 3) as usize);
            b
        };
        if message::decode(&b).is_ok() {
            decoded += 1;
        }
    }
    assert!(
        decoded > 0,
        "some mutations stay valid (for example a changed payload byte)"
    );
    assert_eq!(message::decode(&[]), Err(DecodeError::Truncated(2)));
}

/// 4.2: when the best log starts above the new leader's commit point, the
/// new leader asks for more of it instead of guessing what lies between.
#[test]
fn view_change_4_2_new_leader_asks_for_the_rest_of_the_best_log() {
    let mut next = Replica::restart(
        cfg(1, 3),
        1,
        0,
        PersistentState {
            view: 3,
            log_view: 1,
            ..PersistentState::default()
        },
        1,
        vec![entry(1, 1, 1, "a")],
        vec![],
    );
    step(
        &mut next,
        1,
        recv(2, 1, Message::StartViewChange { view: 4 }),
    );
    let out = step(
        &mut next,
        2,
        recv(
            2,
            1,
            Message::DoViewChange {
                view: 4,
                log_view: 2,
                last_op: 2,
                commit: 1,
                op_start: 2,
                entries: vec![entry(2, 2, 2, "b")],
            },
        ),
    );
    assert_eq!(
        out,
        vec![send(2, Message::RequestDoViewChange { view: 4, from: 1 })]
    );
    assert_eq!(next.status(), Status::ViewChange);
}

/// Fields no correct replica can send (a view or op near 2^64) are refused
/// before they reach the protocol, so no counter can overflow.
#[test]
fn impossible_views_and_ops_are_refused() {
    let mut backup = Replica::new(cfg(1, 3), 1, 0);
    for msg in [
        Message::StartViewChange { view: u64::MAX },
        Message::Commit {
            view: 0,
            commit: u64::MAX - 1,
        },
        Message::DoViewChange {
            view: u64::MAX / 2,
            log_view: 0,
            last_op: u64::MAX,
            commit: 0,
            op_start: 1,
            entries: vec![],
        },
    ] {
        assert_eq!(step(&mut backup, 1, recv(0, 1, msg)), vec![]);
    }
    assert_eq!(backup.view(), 0);
}

/// 5.2 State transfer: when the entries a follower needs are compacted away
/// at the leader, the follower is told to fetch a snapshot, asks the node
/// for it, and resumes after it from the next op.
#[test]
fn state_transfer_5_2_compacted_entries_need_a_snapshot() {
    let mut leader = Replica::new(cfg(0, 3), 1, 0);
    step(
        &mut leader,
        1,
        Input::Propose(vec![ev("a"), ev("b"), ev("c")]),
    );
    step(&mut leader, 2, Input::Durable { op: 3 });
    step(
        &mut leader,
        3,
        recv(1, 0, Message::PrepareOk { view: 0, op: 3 }),
    );
    assert_eq!(leader.commit(), 3);
    step(&mut leader, 4, Input::Compacted { below: 3 });
    assert_eq!(leader.first_op(), 3);
    // Replica 2 lost everything and asks from op 1.
    let out = step(
        &mut leader,
        5,
        recv(2, 0, Message::Missing { view: 0, from: 1 }),
    );
    assert_eq!(out, vec![send(2, Message::NeedSnapshot { view: 0, op: 2 })]);

    let mut lagging = Replica::new(cfg(2, 3), 1, 0);
    let out = step(
        &mut lagging,
        6,
        recv(0, 2, Message::NeedSnapshot { view: 0, op: 2 }),
    );
    assert_eq!(out, vec![Command::FetchSnapshot { from: 0, op: 2 }]);
    assert_eq!(
        step(
            &mut lagging,
            7,
            recv(0, 2, Message::NeedSnapshot { view: 0, op: 2 })
        ),
        vec![],
        "one fetch at a time"
    );
    let out = step(
        &mut lagging,
        8,
        Input::SnapshotInstalled {
            op: 2,
            open_conns: vec![],
        },
    );
    assert_eq!(out, vec![send(0, Message::Missing { view: 0, from: 3 })]);
    assert_eq!((lagging.first_op(), lagging.commit()), (3, 2));
    // The leader sends the rest; the follower takes it and acknowledges.
    let out = step(
        &mut leader,
        9,
        recv(2, 0, Message::Missing { view: 0, from: 3 }),
    );
    let Command::Send { msg, .. } = &out[0] else {
        panic!("{out:?}")
    };
    let out = step(&mut lagging, 10, recv(0, 2, msg.clone()));
    assert_eq!(
        out.last(),
        Some(&Command::Send {
            to: 0,
            msg: Message::PrepareOk { view: 0, op: 3 },
            after_durable: 3
        })
    );
}

/// falcon: a follower far behind gets committed entries in chunks (CatchUp),
/// asking for each next one, and the view's StartView once the rest is small.
#[test]
fn catch_up_sends_committed_entries_in_chunks() {
    let mut c = cfg(0, 3);
    c.catch_up_entries = 2;
    let mut leader = Replica::new(c, 1, 0);
    step(
        &mut leader,
        1,
        Input::Propose(vec![ev("a"), ev("b"), ev("c"), ev("d"), ev("e")]),
    );
    step(&mut leader, 2, Input::Durable { op: 5 });
    step(
        &mut leader,
        3,
        recv(1, 0, Message::PrepareOk { view: 0, op: 5 }),
    );
    assert_eq!(leader.commit(), 5);
    let out = step(
        &mut leader,
        4,
        recv(2, 0, Message::Missing { view: 0, from: 1 }),
    );
    let chunk = vec![entry(0, 1, 1, "a"), entry(0, 2, 1, "b")];
    assert_eq!(
        out,
        vec![send(
            2,
            Message::CatchUp {
                view: 0,
                op_start: 1,
                entries: chunk.clone(),
                commit: 5
            }
        )]
    );

    let mut behind = Replica::restart(
        cfg(2, 3),
        1,
        0,
        PersistentState {
            view: 0,
            log_view: 0,
            ..PersistentState::default()
        },
        1,
        vec![],
        vec![],
    );
    let out = step(
        &mut behind,
        5,
        recv(
            0,
            2,
            Message::CatchUp {
                view: 0,
                op_start: 1,
                entries: chunk.clone(),
                commit: 5,
            },
        ),
    );
    assert_eq!(
        out,
        vec![
            Command::Append(chunk.clone()),
            Command::Deliver(chunk),
            send(0, Message::Missing { view: 0, from: 3 })
        ]
    );
    // Uncommitted entries never come as CatchUp: a chunk claiming past the commit point is ignored.
    let out = step(
        &mut behind,
        6,
        recv(
            0,
            2,
            Message::CatchUp {
                view: 0,
                op_start: 3,
                entries: vec![entry(0, 3, 1, "c")],
                commit: 2,
            },
        ),
    );
    assert_eq!(out, vec![]);
    // Once the rest is small, the leader sends the StartView.
    let out = step(
        &mut leader,
        7,
        recv(2, 0, Message::Missing { view: 0, from: 4 }),
    );
    assert!(
        matches!(
            &out[0],
            Command::Send {
                msg: Message::StartView { op_start: 4, .. },
                ..
            }
        ),
        "{out:?}"
    );
}

#[test]
fn an_entry_at_op_0_is_refused_without_a_panic() {
    // Found by the engine_message fuzz target: a DoViewChange whose entries
    // start at op 0 made the new leader compute op 0 - 1.
    let mut r = Replica::new(cfg(1, 3), 1, 0);
    let dvc = Message::DoViewChange {
        view: 1,
        log_view: 0,
        last_op: 1,
        commit: 0,
        op_start: 0,
        entries: (0..=1)
            .map(|op| falcon::log::Entry {
                view: 0,
                op,
                kind: falcon::log::Kind::Noop,
                conn: 0,
                time_ns: 0,
                payload: Default::default(),
            })
            .collect(),
    };
    step(&mut r, 1, recv(0, 1, dvc.clone()));
    step(&mut r, 2, recv(2, 1, dvc));
    step(&mut r, 3, Input::Tick);
    assert_eq!(r.last_op(), 0, "nothing was taken from it");
}

/// A follower that hears from a working leader is not moved to another view
/// by anyone else — a restarted replica, one cut off, or a hostile peer with
/// the key: neither a StartViewChange from another replica nor a message of
/// a newer view from a replica that does not lead it. The leader's own view
/// change (a transfer) it joins, and once the leader is silent for an
/// election timeout it joins anyone's.
#[test]
fn a_follower_with_a_working_leader_is_moved_by_nobody_else() {
    let mut f = Replica::new(cfg(1, 3), 1, 0);
    step(
        &mut f,
        5 * MS,
        recv(0, 1, Message::Commit { view: 0, commit: 0 }),
    );
    for (at, msg) in [
        (10 * MS, Message::StartViewChange { view: 1 }),
        (11 * MS, Message::StartViewChange { view: 1_000_000 }),
        (
            12 * MS,
            Message::DoViewChange {
                view: 4,
                log_view: 0,
                last_op: 0,
                commit: 0,
                op_start: 1,
                entries: vec![],
            },
        ),
        (13 * MS, Message::Commit { view: 7, commit: 0 }),
        (14 * MS, Message::NewerView { view: 9 }),
    ] {
        let out = step(&mut f, at, recv(2, 1, msg.clone()));
        assert_eq!(f.view(), 0, "moved by {msg:?}: {out:?}");
        assert_eq!(f.status(), Status::Normal);
        assert!(out.is_empty(), "{msg:?} made it do {out:?}");
    }
    // The leader's own view change (a transfer to replica 2) is joined.
    step(
        &mut f,
        20 * MS,
        recv(0, 1, Message::StartViewChange { view: 2 }),
    );
    assert_eq!((f.view(), f.status()), (2, Status::ViewChange));

    // Silent leader: after an election timeout, another replica's view change is joined.
    let mut g = Replica::new(cfg(1, 3), 1, 0);
    step(
        &mut g,
        5 * MS,
        recv(0, 1, Message::Commit { view: 0, commit: 0 }),
    );
    step(
        &mut g,
        200 * MS,
        recv(2, 1, Message::StartViewChange { view: 1 }),
    );
    assert_eq!((g.view(), g.status()), (1, Status::ViewChange));
}

/// falcon: a whole cluster restarted (every replica's commit point is 0
/// again, so every log suffix is the whole log) with logs larger than one
/// message. The network here refuses any message over 4 KiB, as a peer
/// refuses one over its limit. The new leader gets the best log in
/// DoViewChange chunks, the followers get the StartView in parts, the view
/// starts, and no entry of the old logs is cut.
#[test]
fn a_restarted_cluster_moves_logs_larger_than_a_message_in_chunks() {
    const LIMIT: usize = 4096;
    let payload = "x".repeat(100);
    let old: Vec<Entry> = (1..=200).map(|op| entry(0, op, op, &payload)).collect();
    // Replica 1 leads view 1 and has the shortest log: it must fetch the
    // best one (200 entries, about 30 KB) from another.
    let lens = [200usize, 150, 200];
    let mut logs: Vec<Vec<Entry>> = lens.iter().map(|&n| old[..n].to_vec()).collect();
    let mut rs: Vec<Replica> = (0..3)
        .map(|id| {
            let mut c = cfg(id, 3);
            c.chunk_bytes_max = 1000;
            Replica::restart(
                c,
                u64::from(id) + 7,
                0,
                PersistentState {
                    view: 0,
                    log_view: 0,
                    ..PersistentState::default()
                },
                1,
                logs[id as usize].clone(),
                Vec::new(),
            )
        })
        .collect();
    let mut queue: std::collections::VecDeque<(u32, Envelope)> = Default::default();
    let (mut refused, mut largest, mut dvc_chunks, mut start_view_parts) = (0, 0, 0, 0);
    let mut now = 0;
    let mut lowest_cut = u64::MAX;
    let started = |rs: &[Replica]| {
        rs.iter()
            .all(|r| r.status() == Status::Normal && r.view() == rs[1].view())
            && rs[1].role() == Role::Leader
    };
    while now < 2_000 * MS && !(started(&rs) && rs[1].commit() > 200) {
        now += MS / 4;
        let mut inputs: Vec<(usize, Input)> = (0..3).map(|i| (i, Input::Tick)).collect();
        while let Some((to, env)) = queue.pop_front() {
            inputs.push((to as usize, Input::Receive(env)));
        }
        while let Some((i, input)) = inputs.pop() {
            let mut out = Vec::new();
            rs[i].step(now, input, &mut out);
            for c in out {
                match c {
                    Command::Append(es) => {
                        let last = es.last().map_or(0, |e| e.op);
                        logs[i].extend(es);
                        inputs.push((i, Input::Durable { op: last }));
                    }
                    Command::Truncate { after } => {
                        lowest_cut = lowest_cut.min(after);
                        logs[i].truncate(after as usize);
                    }
                    Command::Send { to, msg, .. } => {
                        match &msg {
                            Message::DoViewChange {
                                last_op,
                                op_start,
                                entries,
                                ..
                            } if !entries.is_empty()
                                && op_start + entries.len() as u64 <= *last_op =>
                            {
                                dvc_chunks += 1
                            }
                            Message::StartView {
                                last_op,
                                op_start,
                                entries,
                                ..
                            } if op_start + entries.len() as u64 <= *last_op => {
                                start_view_parts += 1
                            }
                            _ => {}
                        }
                        let env = Envelope {
                            cluster: CLUSTER,
                            from: i as u32,
                            to,
                            msg,
                        };
                        let size = message::to_bytes(&env).len();
                        largest = largest.max(size);
                        if size > LIMIT {
                            refused += 1;
                        } else {
                            queue.push_back((to, env));
                        }
                    }
                    Command::SendFromLog { .. } => panic!("every entry is in memory here"),
                    _ => {}
                }
            }
        }
    }
    assert!(
        started(&rs),
        "no view started in 2 s: {:?}",
        rs.iter()
            .map(|r| (r.role(), r.view(), r.last_op(), r.commit()))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        refused, 0,
        "a message over {LIMIT} bytes (largest {largest})"
    );
    assert!(dvc_chunks > 0, "the best log came in DoViewChange chunks");
    assert!(start_view_parts > 0, "the StartView went in parts");
    // Every old entry survives, on every replica, and the new view's
    // entries follow them; the leader committed them all.
    assert!(
        lowest_cut >= 200,
        "an old entry was cut (after op {lowest_cut})"
    );
    for (i, log) in logs.iter().enumerate() {
        assert_eq!(log[..200], old[..], "replica {i}'s old entries");
        assert_eq!(
            log[200].kind,
            Kind::Noop,
            "replica {i}: the new view's Noop"
        );
        assert_eq!(log, &logs[1], "replica {i}'s log is the leader's");
    }
    assert!(rs[1].commit() > 200);
}

/// Memory: the engine counts what it holds (entries and bytes, all and
/// delivered), and `window_start` says where to cut so that the delivered
/// entries kept stay within an entry count and a byte count — at least
/// the last delivered one, never an undelivered one.
#[test]
fn the_memory_window_is_counted_in_entries_and_bytes() {
    let mut solo = Replica::new(cfg(0, 1), 1, 0);
    // Ten entries of 1,000 bytes, then two more proposed but not durable.
    let big = "x".repeat(1000);
    for i in 1..=10u64 {
        step(&mut solo, i, Input::Propose(vec![ev(&big)]));
        step(&mut solo, i, Input::Durable { op: i });
    }
    step(&mut solo, 11, Input::Propose(vec![ev(&big), ev("y")]));
    let one = 1000 + 48;
    assert_eq!(solo.memory(), (12, 11 * one + 1 + 48));
    assert_eq!(solo.window(), (10, 10 * one));
    solo.check_memory_counts().unwrap();

    // By entries: keep 4 → cut below op 7.
    assert_eq!(solo.window_start(4, usize::MAX), 7);
    // By bytes: 3.5 entries' worth → 3 kept, cut below op 8.
    assert_eq!(solo.window_start(u64::MAX, 3 * one + one / 2), 8);
    // Less than one entry's worth still keeps the last delivered one.
    assert_eq!(solo.window_start(u64::MAX, 10), 10);
    // Nothing to keep by count: nothing delivered is kept.
    assert_eq!(solo.window_start(0, usize::MAX), 11);

    step(&mut solo, 12, Input::Forget { below: 8 });
    assert_eq!(solo.first_op(), 8);
    assert_eq!(solo.window(), (3, 3 * one));
    assert_eq!(solo.memory(), (5, 4 * one + 1 + 48));
    // Forgetting past the delivered ones stops at the first undelivered.
    step(&mut solo, 13, Input::Forget { below: 100 });
    assert_eq!(solo.first_op(), 11);
    assert_eq!(solo.window(), (0, 0));
    assert_eq!(solo.memory(), (2, one + 1 + 48));
    solo.check_memory_counts().unwrap();
    // Delivering the rest moves them into the window.
    step(&mut solo, 14, Input::Durable { op: 12 });
    assert_eq!(solo.window(), (2, one + 1 + 48));
    solo.check_memory_counts().unwrap();
}

/// 5.2 with the memory window past the snapshot: entries left memory
/// (`Forget`) well after the log was compacted below op 4 (the snapshot
/// covers op 3). A follower that needs op 1 is told to fetch the snapshot
/// at op 3, the one the node has (not at the first op memory holds), and
/// one that needs op 5 gets it read back from the log, not a snapshot.
#[test]
fn state_transfer_5_2_the_snapshot_named_is_the_logs_not_memorys() {
    let mut leader = Replica::new(cfg(0, 3), 1, 0);
    let evs: Vec<Event> = (0..10).map(|i| ev(&format!("e{i}"))).collect();
    step(&mut leader, 1, Input::Propose(evs));
    step(&mut leader, 2, Input::Durable { op: 10 });
    step(
        &mut leader,
        3,
        recv(1, 0, Message::PrepareOk { view: 0, op: 10 }),
    );
    assert_eq!(leader.commit(), 10);
    step(&mut leader, 4, Input::Forget { below: 9 });
    step(&mut leader, 5, Input::Compacted { below: 4 });
    assert_eq!(leader.first_op(), 9);
    let out = step(
        &mut leader,
        6,
        recv(2, 0, Message::Missing { view: 0, from: 1 }),
    );
    assert_eq!(out, vec![send(2, Message::NeedSnapshot { view: 0, op: 3 })]);
    let out = step(
        &mut leader,
        7 + 100 * MS,
        recv(2, 0, Message::Missing { view: 0, from: 5 }),
    );
    assert!(
        matches!(
            out.as_slice(),
            [Command::SendFromLog {
                to: 2,
                from: 5,
                upto: 10,
                msg: Message::CatchUp { .. },
            }]
        ),
        "{out:?}"
    );
}
