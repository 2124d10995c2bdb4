//! Replicas on separate network hosts: three network namespaces joined by a
//! bridge (root only, as in CI). A replica cut off from the others falls
//! behind and catches up when healed; a leader on the minority side never
//! answers a client.

mod util;
use util::{Net, sh, wait_until};

use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn redis(ns: &str, host: &str, port: u16, args: &str) -> Option<String> {
    let o = sh(&format!(
        "ip netns exec {ns} timeout 3 redis-cli -h {host} -p {port} {args}"
    ));
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

#[test]
fn a_cut_off_replica_catches_up_and_a_minority_leader_never_answers() {
    util::need_root_and_redis();
    let net = Net::new('f', "10.77.0");
    let dir = tempfile::tempdir().unwrap();
    let mut toml =
        "cluster = \"netns\"\nkey_file = \"cluster.key\"\nelection_timeout = \"1s\"\n".to_string();
    for i in 1..=3 {
        toml.push_str(&format!(
            "\n[[replica]]\nid = {i}\npeer = \"10.77.0.{i}:7101\"\nclient = \"10.77.0.{i}:7201\"\napp = \"127.0.0.1:7001\"\ndata_dir = \"data/{i}\"\n"
        ));
    }
    std::fs::write(dir.path().join("cluster.toml"), toml).unwrap();
    assert!(
        util::falcon()
            .args(["replicate", "--new-key"])
            .arg(dir.path().join("cluster.key"))
            .status()
            .unwrap()
            .success()
    );
    let mut nodes: Vec<Child> = (1..=3)
        .map(|i| {
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &net.ns(i),
                    env!("CARGO_BIN_EXE_falcon"),
                    "replicate",
                    "--config",
                    "cluster.toml",
                ])
                .args([
                    "--follower-clients",
                    "refuse",
                    "--",
                    "redis-server",
                    "--port",
                    "7001",
                    "--bind",
                    "127.0.0.1",
                ])
                .args([
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--enable-debug-command",
                    "local",
                ])
                .current_dir(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::from(
                    std::fs::File::create(dir.path().join(format!("node{i}.log"))).unwrap(),
                ))
                .spawn()
                .unwrap()
        })
        .collect();
    // Each replica found itself by its address: no --node was given.
    let leader = || {
        (1..=3).find(|&i| {
            redis(&net.ns(i), &format!("10.77.0.{i}"), 7201, "PING").as_deref() == Some("PONG")
        })
    };
    let logs = || {
        (1..=3)
            .map(|i| {
                std::fs::read_to_string(dir.path().join(format!("node{i}.log"))).unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    assert!(
        wait_until(Duration::from_secs(20), || leader().is_some()),
        "no leader:\n{}",
        logs()
    );
    let l = leader().unwrap();
    let follower = l % 3 + 1;
    let lh = format!("10.77.0.{l}");
    for k in 0..50 {
        assert_eq!(
            redis(&net.ns(l), &lh, 7201, &format!("SET a{k} {k}")).as_deref(),
            Some("OK")
        );
    }
    // A follower cut off falls behind; healed, it catches up.
    net.link(follower, false);
    for k in 0..50 {
        assert_eq!(
            redis(&net.ns(l), &lh, 7201, &format!("SET b{k} {k}")).as_deref(),
            Some("OK"),
            "the majority keeps serving"
        );
    }
    net.link(follower, true);
    let digest = |i: usize| redis(&net.ns(i), "127.0.0.1", 7001, "DEBUG DIGEST");
    assert!(
        wait_until(Duration::from_secs(20), || digest(follower).is_some()
            && digest(follower) == digest(l)),
        "the healed follower did not catch up"
    );
    // The leader cut off is a minority of one: it never answers a client again.
    net.link(l, false);
    assert_eq!(
        redis(&net.ns(l), &lh, 7201, "SET minority write"),
        None,
        "a minority leader answered"
    );
    // The majority elects a new leader and serves.
    let others: Vec<usize> = (1..=3).filter(|&i| i != l).collect();
    let new_leader = || {
        others.iter().copied().find(|&i| {
            redis(&net.ns(i), &format!("10.77.0.{i}"), 7201, "PING").as_deref() == Some("PONG")
        })
    };
    assert!(
        wait_until(Duration::from_secs(20), || new_leader().is_some()),
        "the majority elected no leader"
    );
    let n = new_leader().unwrap();
    assert_eq!(
        redis(&net.ns(n), &format!("10.77.0.{n}"), 7201, "GET b49").as_deref(),
        Some("49")
    );
    assert_eq!(
        redis(&net.ns(n), &format!("10.77.0.{n}"), 7201, "GET minority").as_deref(),
        Some(""),
        "the minority write never committed"
    );
    // Healed, the old leader follows and ends with the same state.
    net.link(l, true);
    assert!(
        wait_until(Duration::from_secs(20), || digest(l).is_some()
            && digest(l) == digest(n)),
        "the old leader did not converge"
    );
    for c in nodes.iter_mut() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = c.wait();
    }
}

#[test]
fn bench_rtt_between_two_hosts() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "network namespaces need root: run the suite as root (scripts/test.sh under sudo, as CI does)"
    );
    let net = Net::new('f', "10.77.0");
    let exe = env!("CARGO_BIN_EXE_falcon");
    let mut server = Command::new("ip")
        .args([
            "netns",
            "exec",
            &net.ns(1),
            exe,
            "bench",
            "--rtt",
            "--serve",
            "10.77.0.1:7400",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = None;
    wait_until(Duration::from_secs(10), || {
        let o = sh(&format!(
            "ip netns exec {} {exe} bench --rtt --peer 10.77.0.1:7400 --iters 2000 --warmup 100 --size 256 --json",
            net.ns(2)
        ));
        let ok = o.status.success();
        out = Some(o);
        ok
    });
    let _ = server.kill();
    let _ = server.wait();
    let o = out.unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let r = &j["result"];
    assert_eq!(r["iterations"], 2000);
    assert_eq!(r["size"], 256);
    // The path went over the veth link of host 2, not loopback.
    assert_eq!(r["device"], format!("{}p2", net.tag));
    assert!(r["path"].as_str().unwrap().contains("10.77.0.2:"), "{r}");
    let (min, p50) = (
        r["rtt"]["min_us"].as_f64().unwrap(),
        r["rtt"]["p50_us"].as_f64().unwrap(),
    );
    assert!(min > 0.0 && min <= p50, "{r}");
    assert!(
        (r["one_way"]["p50_us"].as_f64().unwrap() * 2.0 - p50).abs() < 0.01,
        "{r}"
    );
}

#[test]
fn bench_consensus_with_every_replica_in_its_own_namespace() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "network namespaces need root: run the suite as root (scripts/test.sh under sudo, as CI does)"
    );
    let dir = tempfile::tempdir().unwrap();
    let o = util::falcon()
        .args([
            "bench",
            "--consensus",
            "--netns",
            "--clients",
            "8",
            "--duration",
            "300ms",
            "--json",
            "--dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let cluster = j["setup"]["cluster"].as_str().unwrap().to_string();
    assert!(cluster.contains("network namespace"), "{cluster}");
    assert!(j["rows"][0]["commits_per_s"].as_f64().unwrap() > 0.0, "{j}");
    // Its namespaces are gone.
    let tag = cluster
        .split('(')
        .nth(1)
        .and_then(|s| s.split('-').next())
        .unwrap()
        .to_string();
    let left = sh("ip netns list");
    assert!(
        !String::from_utf8_lossy(&left.stdout).contains(&tag),
        "namespaces {tag}-* left behind"
    );
}
