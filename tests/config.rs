//! The cluster file: the documented example parses; every mistake names the
//! line and the field.

mod util;
use std::path::Path;
use std::time::Duration;

use falcon::config::{ClusterConfig, ConfigError, TransportKind, cluster_id};
use falcon::log::SyncPolicy;

fn parse(text: &str) -> Result<ClusterConfig, ConfigError> {
    ClusterConfig::parse(Path::new("/etc/falcon/test.toml"), text)
}

const GOOD: &str = r#"cluster = "demo"
key_file = "cluster.key"
election_timeout = "200ms"

[[replica]]
id = 1
peer = "127.0.0.1:7101"
client = "127.0.0.1:7201"
app = "127.0.0.1:7001"
data_dir = "data/1"

[[replica]]
id = 2
peer = "127.0.0.2:7102"
client = "127.0.0.2:7202"
app = "127.0.0.2:7002"
data_dir = "/var/lib/falcon/2"

[[replica]]
id = 3
peer = "127.0.0.3:7103"
client = "127.0.0.3:7203"
app = "127.0.0.3:7003"
data_dir = "data/3"
"#;

#[test]
fn the_documented_example_parses() {
    let c = ClusterConfig::load(&util::root().join("fixtures/cluster.toml")).unwrap();
    assert_eq!(c.cluster, "demo");
    assert_eq!(c.cluster_id, cluster_id("demo"));
    assert_eq!(c.transport, TransportKind::Tcp);
    assert_eq!(c.sync, SyncPolicy::Batch);
    assert_eq!(c.election_timeout, Duration::from_millis(150));
    assert_eq!(c.heartbeat, Duration::from_millis(15));
    assert_eq!(c.segment_bytes, 64 << 20);
    assert_eq!(c.log_preallocate, 4 << 20);
    assert_eq!(c.replicas.len(), 3);
    assert_eq!(
        c.key_file.as_deref(),
        Some(util::root().join("fixtures/cluster.key").as_path())
    );
    assert_eq!(c.replicas[1].peer, "127.0.0.2:7102".parse().unwrap());
    assert_eq!(c.replicas[2].data_dir, util::root().join("fixtures/data/3"));
}

#[test]
fn defaults_and_relative_paths() {
    let c = parse(GOOD).unwrap();
    assert_eq!(
        c.heartbeat,
        Duration::from_millis(20),
        "a tenth of the election timeout"
    );
    assert_eq!(c.replicas[0].data_dir, Path::new("/etc/falcon/data/1"));
    assert_eq!(
        c.replicas[1].data_dir,
        Path::new("/var/lib/falcon/2"),
        "absolute paths stay"
    );
    assert_eq!(
        c.key_file.as_deref(),
        Some(Path::new("/etc/falcon/cluster.key"))
    );
    assert_eq!(cluster_id("demo"), cluster_id("demo"));
    assert_ne!(cluster_id("demo"), cluster_id("demo2"));
}

fn err(text: &str) -> String {
    parse(text).expect_err("must be refused").to_string()
}

#[test]
fn every_mistake_names_the_line_and_the_field() {
    let cases: Vec<(String, &str)> = vec![
        (
            GOOD.replace("peer = \"127.0.0.2:7102\"", "peer = \"localhost\""),
            "test.toml:14: replica[2].peer: \"localhost\" is not an address",
        ),
        (
            GOOD.replace("id = 3", "id = 2"),
            "test.toml:20: replica[3].id: id 2 is used twice",
        ),
        (
            GOOD.replace("client = \"127.0.0.3:7203\"", "client = \"127.0.0.1:7201\""),
            "test.toml:22: replica[3].client: 127.0.0.1:7201 is used twice on one host",
        ),
        (
            GOOD.replace(
                "election_timeout = \"200ms\"",
                "election_timeout = \"soon\"",
            ),
            "test.toml:3: election_timeout: \"soon\"",
        ),
        (
            GOOD.replace(
                "cluster = \"demo\"",
                "cluster = \"demo\"\nsync = \"sometimes\"",
            ),
            "test.toml:2: sync: unknown sync policy",
        ),
        (
            GOOD.replace(
                "cluster = \"demo\"",
                "cluster = \"demo\"\ntransport = \"carrier-pigeon\"",
            ),
            "test.toml:2: transport: \"carrier-pigeon\" is not tcp, shm or rdma",
        ),
        (
            GOOD.replace("data_dir = \"data/3\"", "data_dir = \"data/1\""),
            "test.toml:24: replica[3].data_dir: two replicas share",
        ),
        (
            GOOD.replace(
                "app = \"127.0.0.2:7002\"",
                "app = \"127.0.0.2:7002\"\nbanana = 1",
            ),
            "test.toml:17: banana: unknown field `banana`",
        ),
        (GOOD.replace("id = 1\n", "id = \"one\"\n"), "test.toml:6:"),
        (
            GOOD.replace("cluster = \"demo\"\n", ""),
            "missing field `cluster`",
        ),
        (
            GOOD.replace(
                "election_timeout = \"200ms\"",
                "election_timeout = \"200ms\"\nheartbeat = \"1s\"",
            ),
            "test.toml:4: heartbeat: must be shorter",
        ),
        (
            GOOD.replace(
                "election_timeout = \"200ms\"",
                "election_timeout = \"200ms\"\nsegment_size = \"12 parsecs\"",
            ),
            "test.toml:4: segment_size: \"12 parsecs\" is not a size",
        ),
        (
            GOOD.replace(
                "election_timeout = \"200ms\"",
                "election_timeout = \"200ms\"\nsegment_size = \"1KiB\"",
            ),
            "test.toml:4: segment_size: \"1KiB\" is not a size of at least 64KiB",
        ),
        (
            GOOD.replace(
                "election_timeout = \"200ms\"",
                "election_timeout = \"200ms\"\nlog_preallocate = \"lots\"",
            ),
            "test.toml:4: log_preallocate: \"lots\" is not a size of at least 64KiB, or \"off\"",
        ),
        (
            "cluster = \"x\"\n[[replica]]\nid = 1\n".to_string(),
            "missing field",
        ),
        (
            GOOD.split("[[replica]]")
                .take(3)
                .collect::<Vec<_>>()
                .join("[[replica]]"),
            "2 [[replica]] tables; a cluster has 1, 3, 5, 7 or 9 replicas",
        ),
        ("cluster = [".to_string(), "test.toml:1:"),
    ];
    for (text, want) in cases {
        let e = err(&text);
        assert!(e.contains(want), "wanted {want:?} in {e:?}");
        assert!(e.starts_with("/etc/falcon/test.toml"), "{e}");
    }
}

#[test]
fn replicas_on_different_hosts_may_reuse_a_local_address() {
    let hosts = GOOD
        .replace("127.0.0.1:71", "10.0.0.1:71")
        .replace("127.0.0.2:71", "10.0.0.2:71")
        .replace("127.0.0.3:71", "10.0.0.3:71")
        .replace("127.0.0.2:7002", "127.0.0.1:7001")
        .replace("127.0.0.3:7003", "127.0.0.1:7001");
    let c = parse(&hosts).unwrap();
    assert!(
        c.replicas
            .iter()
            .all(|r| r.app == "127.0.0.1:7001".parse().unwrap())
    );
    let same_host = hosts.replace("10.0.0.2:7102", "10.0.0.1:7102");
    assert!(
        err(&same_host).contains("127.0.0.1:7001 is used twice on one host"),
        "{}",
        err(&same_host)
    );
}

#[test]
fn choosing_this_replica() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.choose_node(Some(3)).unwrap(), 2);
    let e = c.choose_node(Some(9)).unwrap_err().to_string();
    assert!(
        e.contains("--node 9: no such replica") && e.contains("ids: 1, 2, 3"),
        "{e}"
    );
    // By address: 127.0.0.x are all addresses of this host, so several match.
    let e = c.choose_node(None).unwrap_err().to_string();
    assert!(e.contains("give --node ID"), "{e}");
    let one_local = GOOD
        .replace("127.0.0.2:7102", "192.0.2.55:7102")
        .replace("127.0.0.3:7103", "192.0.2.56:7103");
    let c = parse(&one_local).unwrap();
    assert_eq!(
        c.choose_node(None).unwrap(),
        0,
        "only replica 1's peer address is local"
    );
}

#[test]
fn limits_have_defaults_and_each_bad_one_is_named() {
    use falcon::config::Limits;
    assert_eq!(parse(GOOD).unwrap().limits, Limits::default());
    let fixture = ClusterConfig::load(&util::root().join("fixtures/cluster.toml")).unwrap();
    assert_eq!(
        fixture.limits,
        Limits::default(),
        "the example shows the defaults"
    );
    let with = |table: &str| {
        GOOD.replace(
            "\n[[replica]]\nid = 1",
            &format!("\n[limits]\n{table}\n\n[[replica]]\nid = 1"),
        )
    };
    let l = parse(&with("client_connections = 8\nclient_buffer = \"1MiB\"\npending_entries = 100\nbatch_entries = 50\nbatch_bytes = \"64KiB\"\nmemory_window = \"2MiB\"\npending_bytes = \"3MiB\"\nprogram_backlog_bytes = \"5MiB\""))
        .unwrap()
        .limits;
    assert_eq!(
        (l.memory_window, l.pending_bytes, l.program_backlog_bytes),
        (2 << 20, 3 << 20, 5 << 20)
    );
    assert_eq!(
        (
            l.client_connections,
            l.client_buffer,
            l.pending_entries,
            l.batch_bytes,
            l.batch_entries
        ),
        (8, 1 << 20, 100, 64 << 10, 50)
    );
    for (table, expect) in [
        (
            "client_connections = 0",
            "test.toml:6: limits.client_connections: 0 is outside 1..=",
        ),
        (
            "client_buffer = \"1KiB\"",
            "test.toml:6: limits.client_buffer: \"1KiB\" is not a size from 65536",
        ),
        ("batch_bytes = \"1GiB\"", "limits.batch_bytes"),
        (
            "batch_entries = 100000",
            "limits.batch_entries: 100000 is outside 1..=65536",
        ),
        (
            "batch_entries = 500\npending_entries = 100",
            "test.toml:7: limits.pending_entries: 100 is outside 500..=",
        ),
        ("program_backlog = 1", "limits.program_backlog"),
        (
            "memory_window = \"4KiB\"",
            "limits.memory_window: \"4KiB\" is not a size from 1048576",
        ),
        ("pending_bytes = \"lots\"", "limits.pending_bytes"),
        (
            "program_backlog_bytes = \"0\"",
            "limits.program_backlog_bytes",
        ),
        ("clients = 5", "unknown field `clients`"),
    ] {
        let e = err(&with(table));
        assert!(e.contains(expect), "{table:?}: {e}");
    }
}

/// GOOD with `top` added at the top and `each(id)` in every replica table.
fn with_tls(top: &str, each: impl Fn(u32) -> String) -> String {
    let mut out = String::new();
    let mut id = 0;
    for line in GOOD.lines() {
        if line.starts_with("election_timeout") {
            out += line;
            out += "\n";
            out += top;
            continue;
        }
        out += line;
        out += "\n";
        if line.starts_with("data_dir") {
            id += 1;
            out += &each(id);
        }
    }
    out
}

#[test]
fn tls_fields_resolve_and_each_inconsistency_is_named() {
    let both = |id: u32| format!("tls_cert = \"tls/r{id}.pem\"\ntls_key = \"tls/r{id}.key\"\n");
    let c = parse(&with_tls("tls_ca = \"tls/ca.pem\"\n", both)).unwrap();
    let files = c.tls_files(1).expect("TLS is set");
    assert_eq!(files.ca, Path::new("/etc/falcon/tls/ca.pem"));
    assert_eq!(files.cert, Path::new("/etc/falcon/tls/r2.pem"));
    assert_eq!(files.key, Path::new("/etc/falcon/tls/r2.key"));
    assert!(
        parse(GOOD).unwrap().tls_files(0).is_none(),
        "no TLS unless asked"
    );

    // A replica without its key.
    let e = err(&with_tls("tls_ca = \"tls/ca.pem\"\n", |id| {
        if id == 2 {
            format!("tls_cert = \"tls/r{id}.pem\"\n")
        } else {
            both(id)
        }
    }));
    assert!(
        e.contains("replica[2].tls_key") && e.contains("every replica needs"),
        "{e}"
    );
    // Certificates without a CA.
    let e = err(&with_tls("", both));
    assert!(
        e.contains("replica[1].tls_cert") && e.contains("needs tls_ca"),
        "{e}"
    );
    // TLS is for TCP.
    let e = err(&with_tls(
        "transport = \"shm\"\ntls_ca = \"tls/ca.pem\"\n",
        both,
    ));
    assert!(e.contains("tls_ca") && e.contains("tcp"), "{e}");
}

#[test]
fn divergence_fields_have_defaults_and_bad_ones_are_named() {
    use falcon::node::normalize::Protocol;
    let d = parse(GOOD).unwrap();
    assert_eq!(
        (d.divergence_chunk, d.divergence_protocol),
        (16 << 10, Protocol::Bytes)
    );
    let fixture = ClusterConfig::load(&util::root().join("fixtures/cluster.toml")).unwrap();
    assert_eq!(
        (fixture.divergence_chunk, fixture.divergence_protocol),
        (d.divergence_chunk, d.divergence_protocol),
        "the example shows the defaults"
    );
    let with = |lines: &str| {
        GOOD.replace(
            "election_timeout = \"200ms\"\n",
            &format!("election_timeout = \"200ms\"\n{lines}\n"),
        )
    };
    let c = parse(&with(
        "divergence_chunk = \"64KiB\"\ndivergence_protocol = \"postgres\"",
    ))
    .unwrap();
    assert_eq!(
        (c.divergence_chunk, c.divergence_protocol),
        (64 << 10, Protocol::Postgres)
    );
    assert_eq!(
        parse(&with("divergence_chunk = \"off\""))
            .unwrap()
            .divergence_chunk,
        0
    );
    for (line, field) in [
        ("divergence_chunk = \"12\"", "divergence_chunk"),
        ("divergence_chunk = \"1GiB\"", "divergence_chunk"),
        ("divergence_protocol = \"mysql\"", "divergence_protocol"),
    ] {
        let e = err(&with(line));
        assert!(
            e.contains(field) && e.contains("test.toml:4:"),
            "{line}: {e}"
        );
    }
}
