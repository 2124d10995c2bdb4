//! `falcon log-inspect` on the fixture logs and on a log being written.

mod util;
use std::io::{BufRead, BufReader, Read};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use falcon::log::fixtures::{CLUSTER, redis_session};
use falcon::log::format::{Entry, Kind};
use falcon::log::{FsStorage, LogOptions, SegmentLog};
use util::*;

#[test]
fn summary_of_the_clean_log() {
    let r = run_at(&fixture("clean"), &[]);
    assert_eq!(r.code, 0, "{r:?}");
    for want in [
        "records",
        "20",
        "view 1, op 1",
        "view 2, op 20",
        "connections seen",
        "time span",
        "clean",
        "segments",
    ] {
        assert!(r.stdout.contains(want), "missing {want:?}: {r:?}");
    }
    let j = run_at(&fixture("clean"), &["--summary", "--json"]).json_lines();
    assert_eq!(j.len(), 1);
    let s = &j[0];
    assert_eq!(s["records"], 20);
    assert_eq!(s["segments"], 3);
    assert_eq!(
        (s["first_op"].as_u64(), s["last_op"].as_u64()),
        (Some(1), Some(20))
    );
    assert_eq!(
        (s["first_view"].as_u64(), s["last_view"].as_u64()),
        (Some(1), Some(2))
    );
    assert_eq!(s["connections"], 3);
    assert_eq!(s["kinds"]["data"], 12);
    assert_eq!(s["state"], "clean");
    assert_eq!(s["node_id"], 1);
    assert_eq!(s["span_ns"], 1_228_500_000u64);
}

#[test]
fn a_data_directory_holding_log_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    std::fs::create_dir(&log).unwrap();
    for (name, bytes) in tree(&fixture("clean")) {
        std::fs::write(log.join(name), bytes).unwrap();
    }
    let r = run_at(dir.path(), &["--summary", "--json"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json_lines()[0]["records"], 20);
}

#[test]
fn entries_with_filters() {
    let r = run_at(
        &fixture("clean"),
        &[
            "--entries",
            "--from",
            "3",
            "--to",
            "9",
            "--conn",
            "1",
            "--kind",
            "data",
        ],
    );
    assert_eq!(r.code, 0, "{r:?}");
    let ops: Vec<u64> = r.lines()[1..]
        .iter()
        .map(|l| l.split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(ops, vec![3, 6, 7]);
    assert!(r.lines()[1].contains("SET\\r\\n"), "payload preview: {r:?}");
    let r = run_at(
        &fixture("clean"),
        &["--entries", "--kind", "open", "--kind", "close"],
    );
    assert_eq!(r.lines().len() - 1, 6, "{r:?}");
    let r = run_at(&fixture("clean"), &["--entries", "--limit", "4"]);
    assert_eq!(r.lines().len() - 1, 4);
}

#[test]
fn json_lines_have_the_documented_fields() {
    let r = run_at(&fixture("clean"), &["--json"]);
    assert_eq!(r.code, 0, "{r:?}");
    let recs = r.json_lines();
    assert_eq!(recs.len(), 20);
    let session = redis_session();
    for (j, e) in recs.iter().zip(&session) {
        for field in [
            "op",
            "view",
            "kind",
            "conn",
            "bytes",
            "time_ns",
            "time",
            "crc",
            "prev",
            "segment",
            "offset",
            "preview",
            "payload_base64",
        ] {
            assert!(j.get(field).is_some(), "field {field} missing in {j}");
        }
        assert_eq!(j["op"], e.op);
        assert_eq!(j["view"], e.view);
        assert_eq!(j["kind"], e.kind.name());
        assert_eq!(j["conn"], e.conn);
        assert_eq!(j["bytes"], e.payload.len());
        assert_eq!(j["time_ns"], e.time_ns);
        assert_eq!(j["payload_base64"], falcon::output::base64(&e.payload));
    }
    // The chain: each record's prev is the crc of the one before.
    for w in recs.windows(2) {
        assert_eq!(w[1]["prev"], w[0]["crc"]);
    }
    let filtered = run_at(&fixture("clean"), &["--json", "--conn", "3"]).json_lines();
    assert!(filtered.iter().all(|j| j["conn"] == 3) && filtered.len() == 8);
}

#[test]
fn hex_dump_of_one_record() {
    let r = run_at(&fixture("clean"), &["--hex", "5"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("op 5 (view 1)"), "{r:?}");
    assert!(r.stdout.contains("|.greeting.......|"), "{r:?}");
    let dump_bytes: usize = r
        .lines()
        .iter()
        .filter(|l| {
            l.len() > 10 && l.as_bytes()[8] == b' ' && l[..8].chars().all(|c| c.is_ascii_hexdigit())
        })
        .map(|l| l[10..57].split_whitespace().count())
        .sum();
    assert_eq!(
        dump_bytes, 80,
        "48-byte header + 27-byte payload + 5 padding"
    );
    let j = run_at(&fixture("clean"), &["--hex", "5", "--json"]).json_lines();
    assert_eq!(j[0]["record_hex"].as_str().unwrap().len(), 160);
    let r = run_at(&fixture("clean"), &["--hex", "99"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("op 99 is not in the log"), "{r:?}");
}

#[test]
fn verify_clean_torn_and_corrupt() {
    let r = run_at(&fixture("clean"), &["--verify"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout.contains("20 records in 3 segments") && r.stdout.contains("intact"),
        "{r:?}"
    );

    let r = run_at(&fixture("torn-tail"), &["--verify"]);
    assert_eq!(
        r.code, 0,
        "a torn tail is what a crash leaves; recovery cuts it: {r:?}"
    );
    assert!(
        r.stdout.contains("torn tail") && r.stdout.contains("00000000000000000008.seg"),
        "{r:?}"
    );
    let r = run_at(&fixture("torn-tail"), &["--verify", "--strict"]);
    assert_eq!(r.code, 1, "{r:?}");

    let r = run_at(&fixture("corrupt-middle"), &["--verify"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stdout
            .contains("00000000000000000007.seg at byte offset 64"),
        "{r:?}"
    );
    assert!(r.stdout.contains("checksum mismatch"), "{r:?}");
    let j = run_at(&fixture("corrupt-middle"), &["--verify", "--json"]).json_lines();
    assert_eq!(j[0]["ok"], false);
    assert_eq!(j[0]["error"]["offset"], 64);
    assert!(
        j[0]["error"]["file"]
            .as_str()
            .unwrap()
            .ends_with("00000000000000000007.seg")
    );
}

#[test]
fn corruption_stops_listings_with_an_error_after_the_good_records() {
    let r = run_at(&fixture("corrupt-middle"), &["--entries"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert_eq!(r.lines().len() - 1, 6, "ops 1..6 precede the damage: {r:?}");
    assert!(
        r.stderr.contains("corrupt log") && r.stderr.contains("byte offset 64"),
        "{r:?}"
    );
    let r = run_at(&fixture("corrupt-middle"), &[]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stdout.contains("CORRUPT"), "{r:?}");
}

#[test]
fn torn_tail_is_listed_up_to_the_tear_with_a_warning() {
    let r = run_at(&fixture("torn-tail"), &["--entries"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.lines().len() - 1, 20);
    assert!(r.stderr.contains("warning: torn tail"), "{r:?}");
    let r = run_at(&fixture("torn-tail"), &["--entries", "-q"]);
    assert!(r.stderr.is_empty(), "-q hides warnings: {r:?}");
}

#[test]
fn not_a_log_newer_version_and_missing_get_one_clear_line() {
    for (path, want) in [
        (fixture("not-a-log"), "is not a falcon log"),
        (
            fixture("newer-version"),
            "uses log format version 2; this falcon reads up to version 1",
        ),
        (fixture("does-not-exist"), "No such file or directory"),
        (
            fixture("clean").join("00000000000000000001.seg"),
            "not a directory",
        ),
    ] {
        let r = run_at(&path, &[]);
        assert_eq!(r.code, 1, "{r:?}");
        assert!(r.stderr.contains(want), "{path:?}: {r:?}");
        assert_eq!(r.stderr.lines().count(), 1, "{r:?}");
        assert!(r.stdout.is_empty());
    }
}

fn tcpdump(args: &[&str]) -> String {
    let out = std::process::Command::new("tcpdump")
        .args(args)
        .output()
        .expect("tcpdump is installed by the test command (scripts/test.sh); install it with apt-get install tcpdump");
    assert!(
        out.status.success(),
        "tcpdump failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn export_pcap_opens_in_tcpdump_with_consistent_flows() {
    let dir = tempfile::tempdir().unwrap();
    let pcap = dir.path().join("s.pcap");
    let r = run_at(
        &fixture("clean"),
        &["--export-pcap", pcap.to_str().unwrap()],
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("3 connections"), "{r:?}");
    let text = tcpdump(&["-r", pcap.to_str().unwrap(), "-nn", "-vv", "-S"]);
    assert!(!text.contains("incorrect"), "bad checksums:\n{text}");
    assert!(!text.contains("bad"), "{text}");
    // Three handshakes and three FINs from clients, all to port 6379.
    let client_syns = text
        .lines()
        .filter(|l| l.contains("> 192.0.2.1.6379") && l.contains("Flags [S]"))
        .count();
    assert_eq!(client_syns, 3, "{text}");
    let fins = text
        .lines()
        .filter(|l| l.contains("> 192.0.2.1.6379") && l.contains("Flags [F.]"))
        .count();
    assert_eq!(fins, 3, "{text}");
    // Payload bytes towards the server equal the Data payloads of the log.
    let sent: usize = text
        .lines()
        .filter(|l| l.contains("> 192.0.2.1.6379"))
        .filter_map(|l| {
            let after = l.rsplit("length ").next()?;
            after
                .chars()
                .take_while(|c| c.is_ascii_digit())
                .collect::<String>()
                .parse::<usize>()
                .ok()
        })
        .sum();
    let want: usize = redis_session()
        .iter()
        .filter(|e| e.kind == Kind::Data)
        .map(|e| e.payload.len())
        .sum();
    assert_eq!(sent, want, "{text}");

    // Filtered export and VM frames.
    let vm = dir.path().join("vm.pcap");
    let r = run_at(
        &fixture("vm-frames"),
        &["--export-pcap", vm.to_str().unwrap(), "--json"],
    );
    assert_eq!(r.json_lines()[0]["frames"], 3, "{r:?}");
    let text = tcpdump(&["-r", vm.to_str().unwrap(), "-nn"]);
    assert!(
        text.contains("ARP, Request who-has 10.0.2.15 tell 10.0.2.2"),
        "{text}"
    );
    assert!(
        text.contains("10.0.2.2.51000 > 10.0.2.15.22: Flags [S]"),
        "{text}"
    );
}

fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (n, bytes) in tree(&fixture(name)) {
        std::fs::write(dir.path().join(n), bytes).unwrap();
    }
    dir
}

fn entry(view: u64, op: u64, text: &str) -> Entry {
    Entry {
        view,
        op,
        kind: Kind::Data,
        conn: 9,
        time_ns: 1,
        payload: text.as_bytes().to_vec().into(),
    }
}

#[test]
fn follow_prints_appends_rollovers_and_truncations_until_ctrl_c() {
    let dir = copy_fixture("clean");
    let mut child = falcon()
        .args([
            "log-inspect",
            dir.path().to_str().unwrap(),
            "--follow",
            "--json",
            "--interval",
            "10ms",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(serde_json::from_str::<serde_json::Value>(&line).unwrap());
        }
    });
    let next = |what: &str| {
        rx.recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("no output for {what}"))
    };
    // Give the follower time to reach the end of the existing log.
    std::thread::sleep(Duration::from_millis(300));
    let opts = LogOptions {
        segment_bytes_max: 2048,
        ..LogOptions::new(CLUSTER, 1)
    };
    let (mut log, _) = SegmentLog::open(FsStorage::new(dir.path(), false).unwrap(), opts).unwrap();
    log.append(&[entry(3, 21, "first new")]).unwrap();
    log.sync().unwrap();
    let j = next("op 21");
    assert_eq!(
        (j["op"].as_u64(), j["preview"].as_str()),
        (Some(21), Some("first new")),
        "existing records are not repeated"
    );
    // Enough to roll over into new segments.
    let big: Vec<Entry> = (22..=40).map(|op| entry(3, op, &"x".repeat(300))).collect();
    log.append(&big).unwrap();
    log.sync().unwrap();
    for op in 22..=40 {
        assert_eq!(next("rollover")["op"], op);
    }
    assert!(log.segments().len() > 3);
    // A view change cuts the log back and writes other entries.
    log.truncate_after(30).unwrap();
    log.append(&[entry(4, 31, "after the view change")])
        .unwrap();
    log.sync().unwrap();
    // The follower may catch the truncation half-way (later segments removed
    // before the cut): every truncation it reports is at or after op 30, the
    // last one at op 30, and then the new op 31 follows.
    let mut cut_at = Vec::new();
    let j = loop {
        let ev = next("truncation");
        if ev["event"] == "truncated" {
            cut_at.push(ev["after_op"].as_u64().unwrap());
        } else {
            break ev;
        }
    };
    assert!(
        !cut_at.is_empty() && cut_at.iter().all(|&a| a >= 30),
        "{cut_at:?}"
    );
    assert_eq!(cut_at.last(), Some(&30), "{cut_at:?}");
    assert_eq!(
        (j["op"].as_u64(), j["view"].as_u64()),
        (Some(31), Some(4)),
        "{j}"
    );
    // Ctrl-C ends it with status 0.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "follow did not stop on Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_closed_pipe_is_not_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = SegmentLog::open(
        FsStorage::new(dir.path(), false).unwrap(),
        LogOptions::new(1, 1),
    )
    .unwrap();
    let batch: Vec<Entry> = (1..=50_000)
        .map(|op| entry(1, op, "SET key value"))
        .collect();
    log.append(&batch).unwrap();
    log.sync().unwrap();
    drop(log);
    let mut child = falcon()
        .args(["log-inspect", dir.path().to_str().unwrap(), "--entries"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 100];
    child
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut first)
        .unwrap();
    drop(child.stdout.take());
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "{status:?} {err}");
    assert!(err.is_empty(), "{err}");
}

#[test]
fn verify_shows_a_progress_bar_on_a_terminal_for_a_large_log() {
    if std::process::Command::new("script")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!(
            "`script` (util-linux) is needed to give falcon a terminal; scripts/setup.sh installs it"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = SegmentLog::open(
        FsStorage::new(dir.path(), false).unwrap(),
        LogOptions::new(1, 1),
    )
    .unwrap();
    let body = "y".repeat(60_000);
    let batch: Vec<Entry> = (1..=1300).map(|op| entry(1, op, &body)).collect();
    log.append(&batch).unwrap();
    log.sync().unwrap();
    drop(log);
    let cmd = format!(
        "{} log-inspect {} --verify",
        env!("CARGO_BIN_EXE_falcon"),
        dir.path().display()
    );
    let out = std::process::Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("verifying") && text.contains("MiB"),
        "no progress bar on a terminal: {text}"
    );
    assert!(text.contains("1300 records"), "{text}");
    // Not on a pipe.
    let r = run_at(dir.path(), &["--verify"]);
    assert!(!r.stderr.contains("verifying"), "{r:?}");
}
