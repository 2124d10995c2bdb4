//! `falcon failover` against a real 3-replica Redis cluster, each replica on
//! its own network host (a network namespace; root only, as in CI): status
//! (table, JSON, a replica down), metrics over HTTP, the admin socket's
//! permission check, a planned transfer with its hook, and a drill that
//! kills and restarts replicas in their namespaces.

mod util;
use util::{Net, run_in, sh, wait_until};

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const SUBNET: &str = "10.74.0";

/// Starts replica `i` in its namespace, with a metrics endpoint and a hook
/// that records each time it becomes the leader.
fn start(net: &Net, dir: &Path, i: usize) -> Child {
    Command::new("ip")
        .args(["netns", "exec", &net.ns(i), env!("CARGO_BIN_EXE_falcon")])
        .args(["replicate", "--config", "cluster.toml", "--metrics"])
        .arg(format!("{SUBNET}.{i}:9100"))
        .args([
            "--on-leader",
            "echo \"$FALCON_NODE $FALCON_VIEW\" >> leader-hooks",
        ])
        .args([
            "--",
            "redis-server",
            "--port",
            "7001",
            "--bind",
            "127.0.0.1",
        ])
        .args(["--save", "", "--appendonly", "no"])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join(format!("node{i}.log")))
                .unwrap(),
        ))
        .spawn()
        .unwrap()
}

fn status_json(dir: &Path) -> serde_json::Value {
    let r = run_in(
        dir,
        &["--json", "failover", "status", "--config", "cluster.toml"],
    );
    serde_json::from_str(r.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {r:?}"))
}

fn leader(dir: &Path) -> Option<u64> {
    status_json(dir)["leader"].as_u64()
}

fn scrape(i: usize) -> String {
    let mut s = TcpStream::connect((format!("{SUBNET}.{i}").as_str(), 9100)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    text
}

/// The value of the sample `name{labels}` (labels as they appear).
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

fn redis(net: &Net, i: usize, args: &str) -> Option<String> {
    let o = sh(&format!(
        "ip netns exec {} timeout 3 redis-cli -h {SUBNET}.{i} -p 7201 {args}",
        net.ns(i)
    ));
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

#[test]
fn status_metrics_transfer_and_a_drill_on_a_cluster_in_namespaces() {
    util::need_root_and_redis();
    let net = Net::new('o', SUBNET);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut toml = "cluster = \"ops\"\nkey_file = \"cluster.key\"\n".to_string();
    for i in 1..=3 {
        toml.push_str(&format!(
            "\n[[replica]]\nid = {i}\npeer = \"{SUBNET}.{i}:7101\"\nclient = \"{SUBNET}.{i}:7201\"\napp = \"127.0.0.1:7001\"\ndata_dir = \"data/{i}\"\n"
        ));
    }
    std::fs::write(d.join("cluster.toml"), toml).unwrap();
    assert_eq!(
        run_in(d, &["replicate", "--new-key", "cluster.key"]).code,
        0
    );
    let mut nodes: Vec<Child> = (1..=3).map(|i| start(&net, d, i)).collect();
    let logs = || {
        (1..=3)
            .map(|i| std::fs::read_to_string(d.join(format!("node{i}.log"))).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    assert!(
        wait_until(Duration::from_secs(20), || leader(d).is_some()),
        "no leader:\n{}",
        logs()
    );
    let l = leader(d).unwrap() as usize;
    for k in 0..100 {
        assert_eq!(
            redis(&net, l, &format!("SET k{k} {k}")).as_deref(),
            Some("OK")
        );
    }

    // status: one row per replica, all caught up, one leader.
    assert!(
        wait_until(Duration::from_secs(10), || {
            let v = status_json(d);
            v["replicas"].as_array().unwrap().iter().all(|r| {
                r["up"] == true
                    && r["lag"] == 0
                    && r["status"]["peers_connected"].as_array().unwrap().len() == 2
            })
        }),
        "not all caught up: {}",
        status_json(d)
    );
    let v = status_json(d);
    let reps = v["replicas"].as_array().unwrap();
    assert_eq!(reps.len(), 3);
    assert_eq!(
        reps.iter()
            .filter(|r| r["status"]["role"] == "leader")
            .count(),
        1
    );
    for r in reps {
        let st = &r["status"];
        assert!(st["commit"].as_u64().unwrap() >= 100, "{st}");
        assert_eq!(st["program"]["name"], "redis-server", "{st}");
        assert!(st["log_bytes"].as_u64().unwrap() > 0, "{st}");
        assert!(st["memory_bytes"].as_u64().unwrap() > 0, "{st}");
    }
    let table = run_in(d, &["failover", "status", "--config", "cluster.toml"]);
    assert_eq!(table.code, 0, "{table:?}");
    for h in [
        "role", "view", "last op", "commit", "lag", "peers", "program", "log", "memory", "uptime",
    ] {
        assert!(table.stdout.contains(h), "{h}: {table:?}");
    }
    assert_eq!(table.stdout.matches("leader").count(), 1, "{table:?}");
    assert_eq!(table.stdout.matches("follower").count(), 2, "{table:?}");

    // --watch redraws in place until Ctrl-C, then exits 0.
    let watch = util::falcon()
        .current_dir(d)
        .args([
            "failover",
            "status",
            "--watch",
            "--interval",
            "200ms",
            "--config",
            "cluster.toml",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    sh(&format!("kill -INT {}", watch.id()));
    let o = watch.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{text}");
    assert!(text.matches("\x1b[H\x1b[2J").count() >= 3, "{text}");
    assert!(text.matches("leader").count() >= 3, "{text}");

    // metrics: the leader's commit histogram counted the SETs; roles and views.
    let m = scrape(l);
    assert!(
        m.contains("# TYPE falcon_commit_latency_seconds histogram"),
        "{m}"
    );
    let commits = sample(
        &m,
        &format!("falcon_commit_latency_seconds_count{{node=\"{l}\"}}"),
    );
    assert!(commits >= 100.0, "{m}");
    // Every commit took well under a second (the clock is the leader's own).
    assert_eq!(
        sample(
            &m,
            &format!("falcon_commit_latency_seconds_bucket{{node=\"{l}\",le=\"1\"}}")
        ),
        commits,
        "{m}"
    );
    assert_eq!(
        sample(&m, &format!("falcon_role{{node=\"{l}\",role=\"leader\"}}")),
        1.0
    );
    assert!(sample(&m, &format!("falcon_commits_total{{node=\"{l}\"}}")) >= 100.0);
    assert_eq!(
        sample(&m, &format!("falcon_peers_connected{{node=\"{l}\"}}")),
        2.0
    );
    let f = l % 3 + 1;
    let fm = scrape(f);
    assert_eq!(
        sample(
            &fm,
            &format!("falcon_role{{node=\"{f}\",role=\"follower\"}}")
        ),
        1.0
    );
    assert!(
        sample(
            &fm,
            &format!("falcon_fsync_latency_seconds_count{{node=\"{f}\"}}")
        ) >= 1.0
    );

    // The admin socket is 0600; opened to everyone, SO_PEERCRED still
    // refuses another user.
    let sock = d.join(format!("data/{f}/admin.sock"));
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&sock).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    util::must(&format!(
        "chmod 755 {0} {0}/data {0}/data/{f} && chmod 666 {1}",
        d.display(),
        sock.display()
    ));
    let o = sh(&format!(
        "echo '{{\"cmd\":\"status\"}}' | setpriv --reuid=65534 --regid=65534 --clear-groups nc -N -U {}",
        sock.display()
    ));
    let answer = String::from_utf8_lossy(&o.stdout);
    assert!(
        answer.contains("permission denied") && !answer.contains("\"status\""),
        "{answer} {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = sh(&format!(
        "echo '{{\"cmd\":\"status\"}}' | nc -N -U {}",
        sock.display()
    ));
    assert!(String::from_utf8_lossy(&o.stdout).contains("\"ok\":true"));
    util::must(&format!("chmod 600 {}", sock.display()));

    // transfer: planned, to a follower; its hook runs; the service answers.
    let r = run_in(
        d,
        &[
            "--json",
            "failover",
            "transfer",
            "--to",
            &f.to_string(),
            "--config",
            "cluster.toml",
        ],
    );
    assert_eq!(r.code, 0, "{r:?}\n{}", logs());
    let t: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(t["from"].as_u64(), Some(l as u64));
    assert_eq!(t["to"].as_u64(), Some(f as u64));
    let new_view = t["new_view"].as_u64().unwrap();
    assert!(new_view > t["old_view"].as_u64().unwrap());
    assert!(t["unavailable_ms"].as_f64().unwrap() < 2000.0, "{t}");
    assert_eq!(leader(d), Some(f as u64));
    assert!(
        wait_until(Duration::from_secs(5), || {
            std::fs::read_to_string(d.join("leader-hooks"))
                .unwrap_or_default()
                .lines()
                .any(|l| l == format!("{f} {new_view}"))
        }),
        "the new leader's --on-leader hook did not run: {:?}",
        std::fs::read_to_string(d.join("leader-hooks"))
    );
    assert_eq!(redis(&net, f, "GET k99").as_deref(), Some("99"));
    assert_eq!(redis(&net, f, "SET after transfer").as_deref(), Some("OK"));
    // Transferring to the replica that already leads changes nothing.
    let r = run_in(
        d,
        &[
            "failover",
            "transfer",
            "--to",
            &f.to_string(),
            "--config",
            "cluster.toml",
        ],
    );
    assert_eq!(r.code, 0, "already the leader: {r:?}");
    assert!(r.stderr.contains("already leads"), "{r:?}");

    // A replica that runs but does not answer (stopped here) is shown as
    // not answering, not as down; the tool still answers (exit 0: a leader is up).
    let down = l % 3 + 1;
    let down = if down == f { f % 3 + 1 } else { down };
    let pid = status_json(d)["replicas"][down - 1]["status"]["pid"]
        .as_u64()
        .unwrap();
    sh(&format!("kill -STOP {pid}"));
    let r = run_in(d, &["failover", "status", "--config", "cluster.toml"]);
    sh(&format!("kill -CONT {pid}"));
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout.contains("no answer") && r.stdout.contains("no answer within 2 s"),
        "a stopped replica shows as not answering: {r:?}"
    );

    // drill: kills (in the replicas' own namespaces) and restarts them.
    let r = run_in(
        d,
        &[
            "--json",
            "failover",
            "drill",
            "--config",
            "cluster.toml",
            "--kill",
            "random",
            "--rounds",
            "3",
            "--settle",
            "300ms",
        ],
    );
    assert_eq!(r.code, 0, "{r:?}\n{}", logs());
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["lost"], 0, "{v}");
    assert!(v["acked"].as_u64().unwrap() > 0, "{v}");
    let rounds = v["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 3);
    for r in rounds {
        assert!(r["client_ms"].as_f64().is_some(), "{r}");
        assert!(r["catch_up_ms"].as_f64().is_some(), "{r}");
        if r["was_leader"] == true {
            let (c, e) = (
                r["commit_ms"].as_f64().unwrap(),
                r["elect_ms"].as_f64().unwrap(),
            );
            assert!(e <= c && c < 10_000.0, "{r}");
        }
    }
    // Every replica is back (the drill started the killed ones again, in
    // their namespaces) and the state written before the drill is intact.
    assert!(
        wait_until(Duration::from_secs(10), || {
            status_json(d)["replicas"]
                .as_array()
                .unwrap()
                .iter()
                .all(|r| r["up"] == true)
        }),
        "{}",
        status_json(d)
    );
    let l = leader(d).unwrap() as usize;
    assert_eq!(redis(&net, l, "GET k42").as_deref(), Some("42"));
    // The replicas the drill started again are not this test's children.
    for r in status_json(d)["replicas"].as_array().unwrap() {
        if let Some(pid) = r["status"]["pid"].as_u64() {
            sh(&format!("kill -9 {pid}"));
        }
    }
    for c in nodes.iter_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

#[test]
fn the_drill_runs_its_own_cluster_and_measures_leader_failovers() {
    util::need_root_and_redis();
    let dir = tempfile::tempdir().unwrap();
    let r = run_in(
        dir.path(),
        &[
            "--json",
            "failover",
            "drill",
            "--rounds",
            "2",
            "--election-timeout",
            "50ms",
            "--settle",
            "200ms",
        ],
    );
    assert_eq!(r.code, 0, "{r:?}");
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["lost"], 0, "{v}");
    for r in v["rounds"].as_array().unwrap() {
        assert_eq!(r["was_leader"], true, "{r}");
        assert_ne!(r["leader"], r["killed"], "{r}");
        let (d, e, c) = (
            r["detect_ms"].as_f64().unwrap(),
            r["elect_ms"].as_f64().unwrap(),
            r["commit_ms"].as_f64().unwrap(),
        );
        // A follower waits at least the election timeout before it suspects the leader.
        assert!(d >= 40.0 && d <= e && e <= c, "{r}");
    }
    assert!(v["summary"]["commit"]["p50_ms"].as_f64().is_some(), "{v}");
    assert!(
        v["setup"]
            .as_str()
            .unwrap()
            .contains("election timeout 50ms"),
        "{v}"
    );
}
