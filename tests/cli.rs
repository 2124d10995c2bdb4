//! The command line itself: help, exit codes, generated man pages and completions.

mod util;
use util::*;

#[test]
fn help_lists_every_subcommand_with_a_summary() {
    let r = run(&["--help"]);
    assert_eq!(r.code, 0, "{r:?}");
    for sub in [
        "replicate",
        "tap-attach",
        "bench",
        "log-inspect",
        "failover",
    ] {
        let line = r
            .lines()
            .into_iter()
            .find(|l| l.trim_start().starts_with(sub))
            .unwrap_or_else(|| panic!("{sub} missing: {r:?}"));
        assert!(
            line.trim().len() > sub.len() + 10,
            "no summary for {sub}: {line}"
        );
    }
    for flag in ["--json", "--verbose", "--quiet", "--color"] {
        assert!(r.stdout.contains(flag), "{flag} missing");
    }
    assert!(r.stdout.contains("Exit status"));
    assert!(
        !r.stdout.contains("generate"),
        "hidden commands stay hidden"
    );
}

#[test]
fn every_subcommand_has_a_help_page_with_examples() {
    for sub in [
        "replicate",
        "tap-attach",
        "bench",
        "log-inspect",
        "failover",
    ] {
        let r = run(&[sub, "--help"]);
        assert_eq!(r.code, 0, "{sub}: {r:?}");
        assert!(
            r.stdout.contains("falcon ")
                && (r.stdout.contains("Examples") || r.stdout.contains("Planned usage")),
            "{sub}: {r:?}"
        );
    }
}

#[test]
fn a_transport_this_build_lacks_says_so_and_exits_2() {
    let args = ["bench", "--rtt", "--local", "--transport", "rdma"];
    let r = run(&args);
    assert_eq!(r.code, 2, "{args:?}: {r:?}");
    assert!(
        (r.stderr.contains("not built") || r.stderr.contains("not available"))
            && r.stderr.contains("no RDMA device"),
        "{args:?}: {r:?}"
    );
    assert_eq!(r.stderr.lines().count(), 1, "one clear line: {r:?}");
}

#[test]
fn failover_without_a_cluster_file_or_with_a_wrong_replica_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let r = run_in(dir.path(), &["failover", "status"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("no cluster file"), "{r:?}");
    assert_eq!(r.stderr.lines().count(), 1, "one clear line: {r:?}");
    // A cluster file whose replicas are not running: every one is down,
    // shown as such (not as an error of the tool), and no leader means exit 1.
    std::fs::write(
        dir.path().join("falcon.toml"),
        "cluster = \"c\"\n[[replica]]\nid = 1\npeer = \"127.0.0.1:1\"\nclient = \"127.0.0.1:2\"\napp = \"127.0.0.1:3\"\ndata_dir = \"d1\"\n",
    )
    .unwrap();
    let r = run_in(dir.path(), &["failover", "status"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stdout.contains("down") && r.stdout.contains("not running"),
        "{r:?}"
    );
    assert!(r.stdout.contains("no replica leads"), "{r:?}");
    let r = run_in(dir.path(), &["--json", "failover", "status"]);
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(v["replicas"][0]["up"], false, "{r:?}");
    assert!(v["leader"].is_null(), "{r:?}");
    let r = run_in(dir.path(), &["failover", "transfer", "--to", "9"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr.contains("no such replica") && r.stderr.contains("ids: 1"),
        "{r:?}"
    );
    let r = run_in(dir.path(), &["failover", "transfer", "--to", "1"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("no replica leads"), "{r:?}");
    let r = run_in(
        dir.path(),
        &[
            "failover",
            "drill",
            "--rounds",
            "1",
            "--config",
            "falcon.toml",
        ],
    );
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("at least 3 replicas"), "{r:?}");
}

#[test]
fn tap_attach_without_qemu_or_tap_says_what_is_missing() {
    let r = run(&[
        "tap-attach",
        "tap0",
        "--qemu-socket",
        "/tmp/x.sock",
        "--",
        "qemu",
    ]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr.contains("does not go with a QEMU command"),
        "{r:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(dir.path().join("k"), [7u8; 32]).unwrap();
    std::fs::write(
        &cfg,
        "cluster = \"t\"\nkey_file = \"k\"\n[[replica]]\nid = 1\npeer = \"127.0.0.1:1\"\nclient = \"127.0.0.1:2\"\napp = \"127.0.0.1:3\"\ndata_dir = \"d\"\n",
    )
    .unwrap();
    let r = run(&[
        "tap-attach",
        "falcon-nosuch1",
        "--config",
        cfg.to_str().unwrap(),
        "--node",
        "1",
        "--",
        "true",
    ]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr.contains("no network interface falcon-nosuch1") && r.stderr.contains("--create"),
        "{r:?}"
    );
}

#[test]
fn a_cluster_key_others_can_read_is_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    let key = dir.path().join("k");
    std::fs::write(&key, [7u8; 32]).unwrap();
    std::fs::write(
        &cfg,
        "cluster = \"t\"\nkey_file = \"k\"\n[[replica]]\nid = 1\npeer = \"127.0.0.1:1\"\nclient = \"127.0.0.1:2\"\napp = \"127.0.0.1:3\"\ndata_dir = \"d\"\n",
    )
    .unwrap();
    let args = [
        "replicate",
        "--config",
        cfg.to_str().unwrap(),
        "--node",
        "1",
        "--app-timeout",
        "1s",
        "--",
        "/nonexistent/program",
    ];
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let r = run(&args);
    assert!(
        r.stderr.contains("can be read by others (mode 644)") && r.stderr.contains("chmod 600"),
        "{r:?}"
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let r = run(&args);
    assert!(!r.stderr.contains("can be read by others"), "{r:?}");
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(run(&["no-such-command"]).code, 2);
    assert_eq!(run(&["log-inspect"]).code, 2);
    let r = run(&["log-inspect", "x", "--kind", "banana"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("unknown kind"), "{r:?}");
    assert_eq!(
        run(&["log-inspect", "x", "--verify", "--entries"]).code,
        2,
        "modes exclude each other"
    );
    assert_eq!(
        run(&["log-inspect", "x", "--follow", "--interval", "soon"]).code,
        2,
        "durations are humantime"
    );
}

#[test]
fn version_prints() {
    let r = run(&["--version"]);
    assert_eq!(r.code, 0);
    assert!(r.stdout.starts_with("falcon "), "{r:?}");
}

#[test]
fn committed_man_pages_and_completions_are_current() {
    let dir = tempfile::tempdir().unwrap();
    let r = run(&["generate", "--out", dir.path().to_str().unwrap()]);
    assert_eq!(r.code, 0, "{r:?}");
    for sub in ["man", "completions"] {
        let fresh = tree(&dir.path().join(sub));
        let committed = tree(&root().join(sub));
        let names =
            |t: &[(std::path::PathBuf, Vec<u8>)]| t.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
        assert_eq!(
            names(&fresh),
            names(&committed),
            "{sub}/ differs: run `cargo run -- generate --out .`"
        );
        for ((name, a), (_, b)) in fresh.iter().zip(&committed) {
            assert!(
                a == b,
                "{sub}/{} is stale: run `cargo run -- generate --out .`",
                name.display()
            );
        }
    }
    let man = std::fs::read_to_string(root().join("man/falcon.1")).unwrap();
    assert!(
        man.contains("EXIT STATUS"),
        "exit codes are documented in the man page"
    );
    for sub in [
        "replicate",
        "tap-attach",
        "bench",
        "log-inspect",
        "failover",
    ] {
        assert!(root().join(format!("man/falcon-{sub}.1")).exists());
    }
}

#[test]
fn committed_fixtures_are_what_make_fixtures_writes() {
    let dir = tempfile::tempdir().unwrap();
    let r = run(&["make-fixtures", "--out", dir.path().to_str().unwrap()]);
    assert_eq!(r.code, 0, "{r:?}");
    let fresh = tree(&dir.path().join("logs"));
    let committed = tree(&root().join("fixtures/logs"));
    assert_eq!(fresh.len(), committed.len());
    for ((na, a), (nb, b)) in fresh.iter().zip(&committed) {
        assert_eq!(na, nb);
        assert!(
            a == b,
            "fixtures/logs/{} differs from what `falcon make-fixtures --out fixtures` writes",
            na.display()
        );
    }
}

/// Every broken TLS file stops the replica before it starts anything, with
/// one line that names the file and what is wrong (exit 2).
#[test]
fn broken_tls_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("k"), [7u8; 32]).unwrap();
    std::fs::write(
        d.join("c.toml"),
        "cluster = \"t\"\nkey_file = \"k\"\n[[replica]]\nid = 1\npeer = \"127.0.0.1:1\"\nclient = \"127.0.0.1:2\"\napp = \"127.0.0.1:3\"\ndata_dir = \"d\"\n",
    )
    .unwrap();
    let script = util::root().join("scripts/tls-certs.sh");
    for out in ["tls", "other"] {
        let r = std::process::Command::new("bash")
            .arg(&script)
            .args(["--config", d.join("c.toml").to_str().unwrap(), "--out"])
            .arg(d.join(out))
            .output()
            .unwrap();
        assert!(r.status.success(), "{r:?}");
    }
    std::fs::write(d.join("garbage.pem"), "not a certificate\n").unwrap();
    let p = |f: &str| d.join(f).display().to_string();
    let cases = [
        // (cert, key, ca, expected words)
        (
            p("tls/none.pem"),
            p("tls/replica-1.key"),
            p("tls/ca.pem"),
            "reading the certificate",
        ),
        (
            p("garbage.pem"),
            p("tls/replica-1.key"),
            p("tls/ca.pem"),
            "holds no PEM certificate",
        ),
        (
            p("tls/replica-1.pem"),
            p("garbage.pem"),
            p("tls/ca.pem"),
            "no PEM private key",
        ),
        (
            p("tls/replica-1.pem"),
            p("tls/replica-1.key"),
            p("garbage.pem"),
            "CA certificate",
        ),
        (
            p("tls/replica-1.pem"),
            p("other/replica-1.key"),
            p("tls/ca.pem"),
            "do not go together",
        ),
    ];
    for (cert, key, ca, words) in cases {
        let r = run(&[
            "replicate",
            "--config",
            &p("c.toml"),
            "--node",
            "1",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-ca",
            &ca,
            "--",
            "/nonexistent/program",
        ]);
        assert_eq!(r.code, 2, "{r:?}");
        assert!(
            r.stderr.contains("TLS:") && r.stderr.contains(words),
            "expected {words:?}: {r:?}"
        );
    }
    // The three flags go together.
    let r = run(&["replicate", "--tls-cert", "x", "--", "true"]);
    assert_eq!(r.code, 2, "{r:?}");
}
