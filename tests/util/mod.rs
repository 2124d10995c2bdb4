//! Helpers for tests that run the real `falcon` binary (in the style of
//! ripgrep's tests/util.rs).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The crate root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A fixture log directory.
pub fn fixture(name: &str) -> PathBuf {
    root().join("fixtures/logs").join(name)
}

/// A command for the falcon binary built for these tests.
pub fn falcon() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_falcon"));
    c.env_remove("NO_COLOR").env("COLUMNS", "120");
    c
}

/// The result of one run.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn lines(&self) -> Vec<&str> {
        self.stdout.lines().collect()
    }
    pub fn json_lines(&self) -> Vec<serde_json::Value> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs falcon with `args` and captures everything.
pub fn run(args: &[&str]) -> Run {
    let out: Output = falcon().args(args).output().expect("running falcon");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs falcon with `args` in directory `dir`.
pub fn run_in(dir: &Path, args: &[&str]) -> Run {
    let out: Output = falcon()
        .current_dir(dir)
        .args(args)
        .output()
        .expect("running falcon");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs falcon with `args`, path arguments given as paths.
pub fn run_at(path: &Path, args: &[&str]) -> Run {
    let mut all = vec!["log-inspect", path.to_str().unwrap()];
    all.extend_from_slice(args);
    run(&all)
}

/// All files under `dir`, relative, with contents, sorted.
pub fn tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                out.push((
                    p.strip_prefix(base).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                ));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Polls `f` until it holds or `within` passes.
pub fn wait_until(within: std::time::Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < within {
        if f() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    false
}

/// The suite runs as root (network namespaces), with redis-server installed.
pub fn need_root_and_redis() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "network namespaces need root: run the suite as root (scripts/test.sh under sudo, as CI does)"
    );
    assert!(
        Path::new("/usr/bin/redis-server").exists(),
        "redis-server is installed by scripts/setup.sh"
    );
}

/// Runs `cmd` with `sh -c`.
pub fn sh(cmd: &str) -> Output {
    Command::new("sh").arg("-c").arg(cmd).output().expect("sh")
}

/// Runs `cmd` with `sh -c`; it must succeed.
pub fn must(cmd: &str) {
    let o = sh(cmd);
    assert!(
        o.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Three network hosts: namespaces `<tag>-{1,2,3}`, each with a veth to a
/// bridge in the root namespace and address `<subnet>.i/24`; removed (with a
/// client namespace `<tag>-c`, if a test made one) on drop. Root only.
pub struct Net {
    /// The prefix of every name.
    pub tag: String,
}

impl Net {
    /// `letter` starts the tag (one per test file), `subnet` is like "10.77.0".
    pub fn new(letter: char, subnet: &str) -> Net {
        // One tag per network, so the tests of a file can run at once.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let k = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tag = format!("{letter}{}{k}", std::process::id() % 10_000);
        let net = Net { tag: tag.clone() };
        must(&format!(
            "ip link add {tag}br type bridge && ip addr add {subnet}.254/24 dev {tag}br && ip link set {tag}br up"
        ));
        for i in 1..=3 {
            must(&format!(
                "ip netns add {tag}-{i} && ip link add {tag}v{i} type veth peer name {tag}p{i} && \
                 ip link set {tag}p{i} netns {tag}-{i} && ip link set {tag}v{i} master {tag}br && ip link set {tag}v{i} up && \
                 ip netns exec {tag}-{i} ip link set lo up && \
                 ip netns exec {tag}-{i} ip addr add {subnet}.{i}/24 dev {tag}p{i} && \
                 ip netns exec {tag}-{i} ip link set {tag}p{i} up"
            ));
        }
        net
    }

    /// Host `i`'s namespace.
    pub fn ns(&self, i: usize) -> String {
        format!("{}-{i}", self.tag)
    }

    /// Cuts (or heals) host `i`'s link to the bridge.
    pub fn link(&self, i: usize, up: bool) {
        must(&format!(
            "ip link set {}v{i} {}",
            self.tag,
            if up { "up" } else { "down" }
        ));
    }

    /// Runs `cmd` (no single quotes) in host `i`'s namespace.
    pub fn run(&self, i: usize, cmd: &str) -> Output {
        sh(&format!("ip netns exec {} sh -c '{cmd}'", self.ns(i)))
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in ["1", "2", "3", "c"] {
            let _ = sh(&format!(
                "ip netns pids {t}-{ns} 2>/dev/null | xargs -r kill -9; ip netns del {t}-{ns} 2>/dev/null",
                t = self.tag
            ));
        }
        for i in 1..=3 {
            let _ = sh(&format!("ip link del {}v{i} 2>/dev/null", self.tag));
        }
        let _ = sh(&format!("ip link del {}br 2>/dev/null", self.tag));
    }
}
