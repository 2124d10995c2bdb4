//! The deterministic simulator: many seeds clean, and proof that the
//! checkers catch a broken protocol.
//!
//! `FALCON_SIM_SEEDS=N` runs N seeds (default 1,000), `FALCON_SIM_FIRST=S`
//! starts at seed S. A failure prints the command that replays it.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use falcon::consensus::Bugs;
use falcon::sim::{Failure, Report, SimOptions, run_seed};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs seeds `first..first + count` on every core; returns the failures and a total.
fn run_many(
    first: u64,
    count: u64,
    opts: &SimOptions,
    stop_at_first: bool,
) -> (Vec<Failure>, Report) {
    let next = AtomicU64::new(first);
    let failures = Mutex::new(Vec::new());
    let total = Mutex::new(Report::default());
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let seed = next.fetch_add(1, Ordering::Relaxed);
                    if seed >= first + count
                        || (stop_at_first && !failures.lock().unwrap().is_empty())
                    {
                        break;
                    }
                    match run_seed(seed, opts) {
                        Ok(r) => {
                            let mut t = total.lock().unwrap();
                            t.committed += r.committed;
                            t.completed += r.completed;
                            t.crashes += r.crashes;
                            t.wipes += r.wipes;
                            t.restarts_from_commit_point += r.restarts_from_commit_point;
                            t.partitions += r.partitions;
                            t.events += r.events;
                            t.sim_ns += r.sim_ns;
                            t.max_view = t.max_view.max(r.max_view);
                        }
                        Err(f) => failures.lock().unwrap().push(*f),
                    }
                }
            });
        }
    });
    let mut f = failures.into_inner().unwrap();
    f.sort_by_key(|f| f.seed);
    (f, total.into_inner().unwrap())
}

#[test]
fn seeds_run_clean() {
    let first = env_u64("FALCON_SIM_FIRST", 1);
    let count = env_u64("FALCON_SIM_SEEDS", 1000);
    let started = Instant::now();
    let (failures, t) = run_many(first, count, &SimOptions::default(), false);
    eprintln!(
        "{count} seeds from {first} in {:.1}s: {} entries committed, {} client ops, {} crashes ({} restarted from a saved commit point, {} lost their disk), {} partition changes, {} events, {:.0} simulated s, max view {}",
        started.elapsed().as_secs_f64(),
        t.committed,
        t.completed,
        t.crashes,
        t.restarts_from_commit_point,
        t.wipes,
        t.partitions,
        t.events,
        t.sim_ns as f64 / 1e9,
        t.max_view
    );
    let mut by_checker = std::collections::BTreeMap::new();
    for f in &failures {
        *by_checker.entry(f.violation.checker).or_insert(0) += 1;
    }
    for f in failures.iter().take(8) {
        eprintln!("seed {}: {}", f.seed, f.violation);
    }
    if let Some(f) = failures.first() {
        eprintln!("failures by checker: {by_checker:?}");
        panic!(
            "{} of {count} seeds failed; the first:\n{f}",
            failures.len()
        );
    }
    assert!(
        t.committed > 0 && t.crashes > 0 && t.partitions > 0,
        "the seeds must exercise faults"
    );
    assert!(
        count < 100 || (t.restarts_from_commit_point > 0 && t.wipes > 0),
        "no restart used a saved commit point"
    );
}

fn catches(bugs: Bugs, name: &str) {
    let started = Instant::now();
    let (failures, _) = run_many(
        1,
        400,
        &SimOptions {
            bugs,
            verbose: false,
        },
        true,
    );
    let f = failures
        .first()
        .unwrap_or_else(|| panic!("the checkers missed {name} in 400 seeds"));
    eprintln!(
        "{name}: caught at seed {} in {:.1}s by {}",
        f.seed,
        started.elapsed().as_secs_f64(),
        f.violation
    );
}

#[test]
fn checkers_catch_commit_at_a_minority() {
    catches(
        Bugs {
            commit_at_minority: true,
            ..Bugs::default()
        },
        "commit at a minority",
    );
}

/// A replica that lost its disk and starts as in a new cluster (no
/// recovery: what falcon did before) breaks agreement or durability.
#[test]
fn checkers_catch_a_replica_that_forgot_what_it_voted() {
    catches(
        Bugs {
            amnesiac_restart: true,
            ..Bugs::default()
        },
        "a restart without recovery after a lost disk",
    );
}

#[test]
fn checkers_catch_a_view_change_without_log_merge() {
    catches(
        Bugs {
            skip_log_merge: true,
            ..Bugs::default()
        },
        "view change without log merge",
    );
}

/// Replays one seed with a trace: FALCON_SIM_SEED=S cargo test --release --test sim replay -- --ignored --nocapture
#[test]
#[ignore = "a tool: replays the seed in FALCON_SIM_SEED"]
fn replay() {
    let seed = env_u64("FALCON_SIM_SEED", 1);
    match run_seed(
        seed,
        &SimOptions {
            bugs: Bugs::default(),
            verbose: true,
        },
    ) {
        Ok(r) => eprintln!("seed {seed} clean: {r:?}"),
        Err(f) => panic!("{f}"),
    }
}
