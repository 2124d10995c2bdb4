//! `falcon bench --log` runs end to end and reports every row with its
//! baseline (a functional check; the numbers are in docs/BENCHMARKS.md).

mod util;
use util::*;

/// Benchmarks run one at a time: on two cores, one's fsyncs and processes
/// would starve another's measurement window.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

#[test]
fn bench_log_reports_falcon_beside_the_disk() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let r = run(&[
        "bench",
        "--log",
        "--duration",
        "50ms",
        "--verify-mib",
        "2",
        "--json",
        "--dir",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{r:?}");
    let j = &r.json_lines()[0];
    assert!(
        j["setup"]["directory"]
            .as_str()
            .unwrap()
            .contains(dir.path().to_str().unwrap())
    );
    let rows = j["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 8);
    for row in rows {
        assert!(row["records_per_s"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["disk_records_per_s"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["latency"]["samples"].as_u64().unwrap() > 0, "{row}");
    }
    for v in j["verify"].as_array().unwrap() {
        assert!(v["gb_per_s"].as_f64().unwrap() > 0.0);
    }
    // The scratch directory is removed.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

    let r = run(&[
        "bench",
        "--log",
        "--duration",
        "20ms",
        "--verify-mib",
        "1",
        "--dir",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{r:?}");
    for want in [
        "cpu:",
        "directory:",
        "falcon rec/s",
        "disk rec/s",
        "group commit",
        "log-inspect --verify",
    ] {
        assert!(r.stdout.contains(want), "{want}: {r:?}");
    }
}

#[test]
fn bench_without_a_mode_is_a_usage_error() {
    let r = run(&["bench"]);
    assert_eq!(r.code, 2, "{r:?}");
}

#[test]
fn bench_consensus_over_mem_reports_the_engine_beside_no_replication() {
    let _one = serial();
    let r = run(&[
        "bench",
        "--consensus",
        "--transport",
        "mem",
        "--duration",
        "100ms",
        "--json",
    ]);
    assert_eq!(r.code, 0, "{r:?}");
    let j = &r.json_lines()[0];
    let rows = j["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 4);
    let clients: Vec<u64> = rows
        .iter()
        .map(|r| r["clients"].as_u64().unwrap())
        .collect();
    assert_eq!(clients, vec![1, 1, 256, 256]);
    for row in rows {
        assert!(row["entries_per_s"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["latency"]["samples"].as_u64().unwrap() > 0, "{row}");
    }
    assert!(
        j["setup"]["cluster"]
            .as_str()
            .unwrap()
            .contains("3 replicas")
    );
    let r = run(&["bench", "--consensus", "--transport", "rdma"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("no RDMA device"), "{r:?}");
    let r = run(&["bench", "--consensus", "--transport", "shm", "--netns"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("does not go with --netns"), "{r:?}");
}

#[test]
fn bench_consensus_over_tcp_drives_a_real_cluster_and_compares_with_the_round_trip() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let r = run(&[
        "bench",
        "--consensus",
        "--clients",
        "16",
        "--connections",
        "4",
        "--duration",
        "300ms",
        "--compare",
        "--json",
        "--dir",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{r:?}");
    let j = &r.json_lines()[0];
    let row = &j["rows"][0];
    assert_eq!(
        (row["replicas"].as_u64(), row["clients"].as_u64()),
        (Some(3), Some(16))
    );
    assert_eq!(row["sync"], "batch");
    assert!(row["commits_per_s"].as_f64().unwrap() > 0.0, "{row}");
    let lat = &row["latency"];
    assert!(
        lat["p50_us"].as_f64().unwrap() > 0.0 && lat["p50_us"].as_f64() <= lat["p99_us"].as_f64()
    );
    assert!(
        row["replica_cpu_s_per_1000"].as_f64().unwrap() > 0.0,
        "{row}"
    );
    assert!(j["rtt"]["rtt"]["p50_us"].as_f64().unwrap() > 0.0);
    assert!(j["commit_p50_over_rtt_p50"].as_f64().unwrap() > 0.0);
    // The replicas are gone and their scratch directory with them.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    // The same cluster over shared memory.
    let r = run(&[
        "bench",
        "--consensus",
        "--transport",
        "shm",
        "--clients",
        "4",
        "--duration",
        "200ms",
        "--json",
        "--dir",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{r:?}");
    let j = &r.json_lines()[0];
    assert!(
        j["setup"]["cluster"]
            .as_str()
            .unwrap()
            .contains("shared-memory")
    );
    assert!(j["rows"][0]["commits_per_s"].as_f64().unwrap() > 0.0, "{j}");
    // Plain and TLS peer links side by side, one cluster each.
    let r = run(&[
        "bench",
        "--consensus",
        "--tls",
        "--clients",
        "4",
        "--duration",
        "200ms",
        "--json",
        "--dir",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{r:?}");
    let j = &r.json_lines()[0];
    let links: Vec<&str> = j["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["links"].as_str().unwrap())
        .collect();
    assert_eq!(links, ["tcp", "tcp+tls"], "{j}");
    for row in j["rows"].as_array().unwrap() {
        assert!(row["commits_per_s"].as_f64().unwrap() > 0.0, "{row}");
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    let r = run(&["bench", "--consensus", "--tls", "--transport", "shm"]);
    assert_eq!(r.code, 2, "{r:?}");
    // Out-of-range settings are usage errors.
    let r = run(&["bench", "--consensus", "--replicas", "4"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("1, 3, 5, 7 or 9"), "{r:?}");
}

#[test]
fn bench_redis_compares_falcon_with_redis_replication_in_one_run() {
    let _one = serial();
    let r = run(&[
        "bench",
        "--redis",
        "--rounds",
        "1",
        "--requests",
        "2000",
        "--json",
    ]);
    assert_eq!(r.code, 0, "{r:?}");
    let j = &r.json_lines()[0];
    let rows = j["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 16, "eight setups at 50 and at 1 connection");
    for row in rows {
        assert!(row["ops_per_s"].as_f64().unwrap() > 0.0, "{row}");
        // The host's busy time per request is read (this is Linux: /proc/stat);
        // a short run may fit in one clock tick, so only the sum must be above 0.
        assert!(row["host_cpu_us_per_op"].as_f64().unwrap() >= 0.0, "{row}");
    }
    let busy: f64 = rows
        .iter()
        .map(|r| r["host_cpu_us_per_op"].as_f64().unwrap())
        .sum();
    assert!(busy > 0.0, "the host was never busy: {rows:?}");
    assert!(
        rows.iter()
            .any(|r| r["setup"].as_str().unwrap().contains("WAIT 2 0"))
    );
    assert!(rows.iter().any(|r| {
        r["setup"]
            .as_str()
            .unwrap()
            .contains("program_protocol resp")
    }));
    assert!(
        rows.iter()
            .any(|r| r["setup"].as_str().unwrap().starts_with("d: falcon"))
    );
    assert!(
        rows.iter()
            .any(|r| r["setup"].as_str().unwrap().starts_with("e: falcon"))
    );
    assert!(rows.iter().any(|r| {
        r["setup"]
            .as_str()
            .unwrap()
            .contains("divergence detection off")
    }));
    assert!(rows.iter().any(|r| {
        r["setup"]
            .as_str()
            .unwrap()
            .starts_with("h: as g, sync never")
    }));
}

#[test]
fn bench_consensus_drives_an_already_running_cluster() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let ports: Vec<u16> = (0..9)
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        })
        .collect();
    let toml = falcon::config::loopback_cluster(
        "cluster = \"running\"\nkey_file = \"cluster.key\"\n",
        &ports[..9],
    );
    let cfg = dir.path().join("cluster.toml");
    std::fs::write(&cfg, toml).unwrap();
    let key = dir.path().join("cluster.key");
    assert_eq!(
        run(&["replicate", "--new-key", key.to_str().unwrap()]).code,
        0
    );
    let mut nodes: Vec<std::process::Child> = (1..=3)
        .map(|i| {
            falcon()
                .args([
                    "-q",
                    "replicate",
                    "--config",
                    cfg.to_str().unwrap(),
                    "--node",
                ])
                .arg(i.to_string())
                .args(["--null-program", "--follower-clients", "refuse"])
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let r = run(&[
        "bench",
        "--consensus",
        "--cluster",
        cfg.to_str().unwrap(),
        "--clients",
        "8",
        "--duration",
        "300ms",
        "--json",
    ]);
    for n in &mut nodes {
        let _ = n.kill();
        let _ = n.wait();
    }
    assert_eq!(r.code, 0, "{r:?}");
    let j = &r.json_lines()[0];
    assert!(
        j["setup"]["cluster"]
            .as_str()
            .unwrap()
            .contains("already running")
    );
    let row = &j["rows"][0];
    assert!(row["commits_per_s"].as_f64().unwrap() > 0.0, "{row}");
    assert!(
        row["replica_cpu_s_per_1000"].is_null(),
        "not our processes: {row}"
    );
}
