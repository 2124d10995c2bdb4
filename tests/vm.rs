//! `falcon tap-attach` with real QEMU guests (scripts/vm-guest.sh: Debian's
//! kernel, busybox, tests/guest/server.c) on three network hosts —
//! namespaces joined by a bridge (root only, as in CI). Every guest runs
//! under `-accel tcg`.

mod util;
use util::{Net, falcon, must, root, sh, wait_until};

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Replica(Child);

impl Drop for Replica {
    fn drop(&mut self) {
        // SIGTERM: falcon stops QEMU and reports what went where.
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        if !wait_until(Duration::from_secs(10), || {
            matches!(self.0.try_wait(), Ok(Some(_)))
        }) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// QEMU running the test guest (console to `console`), its NIC on netdev
/// `falcon` with the same MAC everywhere; the netdev itself is added by
/// falcon (or by the caller).
/// A server on a replica's host for the guest to dial: a line to each
/// connection, then it closes.
const FAR_SERVER: &str = r#"
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("10.0.0.1", 9009))
s.listen(8)
while True:
    c, _ = s.accept()
    c.sendall(b"hello-from-outside\n")
    c.close()
"#;

fn qemu_command(guest: &Path, console: &Path) -> Vec<std::ffi::OsString> {
    let mut v: Vec<std::ffi::OsString> = [
        "qemu-system-x86_64",
        "-accel",
        "tcg",
        "-m",
        "128",
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
    ]
    .iter()
    .map(Into::into)
    .collect();
    v.push(format!("file:{}", console.display()).into());
    v.push("-kernel".into());
    v.push(guest.join("vmlinux").into());
    v.push("-initrd".into());
    v.push(guest.join("initrd.cpio.gz").into());
    v.push("-append".into());
    v.push("console=ttyS0 quiet panic=-1 falcon.ip=10.0.0.2/24".into());
    v.push("-device".into());
    v.push("virtio-net-pci,netdev=falcon,mac=52:54:00:12:34:56,romfile=".into());
    v
}

/// The guest (built, or reused, by scripts/vm-guest.sh).
fn guest() -> PathBuf {
    let dir = std::env::var_os("FALCON_VM_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/falcon-vm-guest"));
    let o = Command::new("bash")
        .arg(root().join("scripts/vm-guest.sh"))
        .arg(&dir)
        .output()
        .expect("bash");
    assert!(
        o.status.success(),
        "scripts/vm-guest.sh failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    dir
}

fn log(dir: &Path, i: usize) -> String {
    std::fs::read_to_string(dir.join(format!("replica{i}.log"))).unwrap_or_default()
}

/// The replica whose log last says it leads.
fn leader(dir: &Path) -> Option<usize> {
    (1..=3).find(|&i| {
        let l = log(dir, i);
        let last_role = l
            .lines()
            .rfind(|x| {
                x.contains(&format!("role: replica {i} "))
                    || x.contains(&format!("view change: replica {i} "))
            })
            .unwrap_or("");
        last_role.contains(&format!("role: replica {i} leads view"))
    })
}

/// Three replicas of the test guest behind `falcon tap-attach`, booted.
/// With `shared_lan`, every replica's tap0 is bridged onto one client
/// network (namespace `<tag>-c`, 10.0.0.1) as on real hosts; without, each
/// host's tap0 has 10.0.0.1 itself.
struct Setup {
    replicas: Vec<Option<Replica>>,
    _serial: std::sync::MutexGuard<'static, ()>,
    dir: tempfile::TempDir,
    net: Net,
}

impl Setup {
    fn d(&self) -> &Path {
        self.dir.path()
    }
}

/// One cluster of guests at a time: three TCG guests already fill two cores.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn start(shared_lan: bool) -> Setup {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "network namespaces and TAP devices need root: run the suite as root (scripts/test.sh under sudo, as CI does)"
    );
    let serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let guest = guest();
    let net = Net::new('v', "10.76.0");
    if shared_lan {
        must(&format!(
            "ip netns add {tag}-c && ip netns exec {tag}-c ip link set lo up && \\
             ip netns exec {tag}-c ip link add cbr type bridge && \\
             ip netns exec {tag}-c ip addr add 10.0.0.1/24 dev cbr && ip netns exec {tag}-c ip link set cbr up",
            tag = net.tag
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("cluster.key"), [0x5au8; 32]).unwrap();
    let mut toml = String::from(
        "cluster = \"vm-test\"\nkey_file = \"cluster.key\"\nelection_timeout = \"1s\"\n",
    );
    for i in 1..=3 {
        toml.push_str(&format!(
            "\n[[replica]]\nid = {i}\npeer = \"10.76.0.{i}:7101\"\nclient = \"10.76.0.{i}:7201\"\napp = \"10.76.0.{i}:7001\"\ndata_dir = \"data/{i}\"\n"
        ));
    }
    std::fs::write(d.join("cluster.toml"), toml).unwrap();
    let mut replicas = Vec::new();
    for i in 1..=3 {
        let err = std::fs::File::create(d.join(format!("replica{i}.log"))).unwrap();
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &net.ns(i)])
            .arg(falcon().get_program())
            .current_dir(d)
            .args([
                "tap-attach",
                "tap0",
                "--create",
                "--config",
                "cluster.toml",
                "--node",
            ])
            .arg(i.to_string())
            .arg("--capture")
            .arg(d.join(format!("inbound{i}.pcap")))
            .arg("--")
            .args(qemu_command(&guest, &d.join(format!("console{i}.log"))))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err);
        replicas.push(Some(Replica(c.spawn().unwrap())));
    }
    // Each host's side of its TAP device: the VM is 10.0.0.2 behind every one.
    for i in 1..=3 {
        assert!(
            wait_until(Duration::from_secs(30), || net
                .run(i, "ip link show tap0")
                .status
                .success()),
            "replica {i} made no tap0; its log:\n{}",
            log(d, i)
        );
        let cmd = if shared_lan {
            format!(
                "ip link add vbr type bridge && ip link set vbr up && ip link set tap0 master vbr && \\
                 ip link add vc{i} type veth peer name {tag}h{i} && ip link set {tag}h{i} netns {tag}-c && \\
                 ip link set vc{i} master vbr && ip link set vc{i} up",
                tag = net.tag
            )
        } else {
            "ip addr add 10.0.0.1/24 dev tap0".to_string()
        };
        let o = net.run(i, &cmd);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        if shared_lan {
            must(&format!(
                "ip netns exec {tag}-c ip link set {tag}h{i} master cbr && ip netns exec {tag}-c ip link set {tag}h{i} up",
                tag = net.tag
            ));
        }
    }
    assert!(
        wait_until(Duration::from_secs(30), || leader(d).is_some()),
        "no leader; logs:\n{}\n{}\n{}",
        log(d, 1),
        log(d, 2),
        log(d, 3)
    );
    // Every guest boots (each prints a line on its console when its network is up).
    for i in 1..=3 {
        assert!(
            wait_until(Duration::from_secs(120), || std::fs::read_to_string(
                d.join(format!("console{i}.log"))
            )
            .unwrap_or_default()
            .contains("falcon guest: listening")),
            "guest {i} did not come up; console:\n{}",
            std::fs::read_to_string(d.join(format!("console{i}.log"))).unwrap_or_default()
        );
    }
    Setup {
        replicas,
        _serial: serial,
        dir,
        net,
    }
}

#[test]
fn three_vms_behind_tap_attach_answer_arp_icmp_and_tcp_through_the_leader() {
    let setup = start(false);
    let (net, d) = (&setup.net, setup.d());
    let lead = leader(d).unwrap();
    // ARP and ICMP through the leader: every frame to the VM was ordered first.
    assert!(
        wait_until(Duration::from_secs(60), || net
            .run(lead, "ping -c 1 -W 2 10.0.0.2")
            .status
            .success()),
        "no ping answer through the leader (replica {lead}); its log:\n{}",
        log(d, lead)
    );
    let o = net.run(lead, "ping -c 5 -i 0.2 -W 2 10.0.0.2");
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("5 received"), "{text}");
    // TCP through the leader: the guest's key-value server.
    let o = net.run(
        lead,
        "printf \"set k1 v1\\nset k2 v2\\nget k1\\ncount\\n\" | timeout 20 nc -q 2 10.0.0.2 80",
    );
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        text,
        "ok\nok\nv1\n4\n",
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = net.run(lead, "echo through-falcon | timeout 20 nc -q 2 10.0.0.2 7");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "through-falcon\n");
    // A second connection, many requests: the backups' guests must serve
    // the same requests in the same order (their TCP is translated).
    let mut script = String::new();
    for k in 0..40 {
        script.push_str(&format!("set key{k} value{k}\\n"));
    }
    script.push_str("count\\n");
    let o = net.run(
        lead,
        &format!("printf \"{script}\" | timeout 30 nc -q 3 10.0.0.2 80 | tail -1"),
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout), "45\n");
    let served = |i: usize| -> Vec<String> {
        std::fs::read_to_string(d.join(format!("console{i}.log")))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("falcon guest: request "))
            .map(str::to_string)
            .collect()
    };
    let want = served(lead);
    assert_eq!(want.len(), 45, "the leader's guest served {:?}", want);
    for i in (1..=3).filter(|&i| i != lead) {
        assert!(
            wait_until(Duration::from_secs(30), || served(i) == want),
            "backup {i}'s guest served other requests than the leader's:\n{:?}\nleader:\n{:?}\nits log:\n{}",
            served(i),
            want,
            log(d, i)
        );
    }
    // What frame-level replication cannot make agree: randomness and clocks
    // inside the guest. Every guest serves the same two requests …
    let o = net.run(
        lead,
        "printf \"random\\ntime\\n\" | timeout 20 nc -q 2 10.0.0.2 80",
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 2);
    let answers = |i: usize, what: &str| -> Option<String> {
        std::fs::read_to_string(d.join(format!("console{i}.log")))
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with(&format!("falcon guest: answer to {what}: ")))
            .map(str::to_string)
    };
    for what in ["random", "time"] {
        assert!(
            wait_until(Duration::from_secs(30), || (1..=3)
                .all(|i| answers(i, what).is_some())),
            "not every guest answered {what}"
        );
        let got: Vec<String> = (1..=3).filter_map(|i| answers(i, what)).collect();
        // … and answers differently: say so, never pretend otherwise.
        assert!(
            got[0] != got[1] || got[1] != got[2],
            "three guests gave the same {what}: {got:?}"
        );
        println!("{what}: {got:?}");
    }
    // A connection the guest opens itself, to a server on the leader's host
    // (10.0.0.1, the host's side of tap0): the far end's SYN-ACK and data
    // reach every guest through the log, each moved into its own guest's
    // numbering (the leader's by nothing), and the leader's guest gets its
    // answer. (Such a connection once hung on every replica.)
    let mut far = Command::new("ip")
        .args(["netns", "exec", &net.ns(lead), "python3", "-c", FAR_SERVER])
        .spawn()
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || net
            .run(lead, "ss -ltn | grep -q 10.0.0.1:9009")
            .status
            .success()),
        "the far server did not listen"
    );
    let o = net.run(
        lead,
        "printf \"dial 10.0.0.1 9009\\n\" | timeout 30 nc -q 10 10.0.0.2 80",
    );
    let _ = far.kill();
    let _ = far.wait();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "dialed: hello-from-outside",
        "the guest's own connection; leader's console:\n{}\nlog:\n{}",
        std::fs::read_to_string(d.join(format!("console{lead}.log"))).unwrap_or_default(),
        log(d, lead)
    );
    // A backup's host reaches nothing: its VM's answers are dropped.
    let backup = (1..=3).find(|&i| i != lead).unwrap();
    assert!(
        !net.run(backup, "ping -c 2 -W 1 10.0.0.2").status.success(),
        "a backup's VM answered on its host's network"
    );
    let mut setup = setup;
    setup.replicas.clear(); // SIGTERM: each replica reports its counters and closes its capture
    let d = setup.d();
    let counters = |i: usize| {
        log(d, i)
            .lines()
            .find(|l| l.contains("tap tap0:") && l.contains("frames proposed"))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("replica {i} reported no counters; log:\n{}", log(d, i)))
    };
    for i in 1..=3 {
        println!(
            "replica {i}{}: {}",
            if i == lead { " (leader)" } else { "" },
            counters(i)
        );
        if let Some(t) = log(d, i).lines().find(|l| l.contains("TCP translation")) {
            println!("replica {i}: {t}");
        }
    }
    // The backups' VMs got the same frames and answered them (dropped).
    for i in (1..=3).filter(|&i| i != lead) {
        let c = counters(i);
        let dropped: u64 = c
            .split(", ")
            .find(|p| p.contains("from the VM dropped as a backup"))
            .and_then(|p| p.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        assert!(dropped > 0, "backup {i}'s VM answered nothing: {c}");
    }
    // Every replica's capture holds the same ordered frames (libpcap reads them back).
    let frames = |i: usize| -> Vec<Vec<u8>> {
        let mut cap = pcap::Capture::from_file(d.join(format!("inbound{i}.pcap"))).unwrap();
        let mut v = Vec::new();
        while let Ok(p) = cap.next_packet() {
            v.push(p.data.to_vec());
        }
        v
    };
    let leader_frames = frames(lead);
    // The log holds the same frames: log-inspect exports them as they are.
    let exported = d.join("exported.pcap");
    let o = falcon()
        .arg("log-inspect")
        .arg(d.join(format!("data/{lead}/log")))
        .arg("--export-pcap")
        .arg(&exported)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut cap = pcap::Capture::from_file(&exported).unwrap();
    let mut from_log = Vec::new();
    while let Ok(p) = cap.next_packet() {
        from_log.push(p.data.to_vec());
    }
    assert_eq!(
        from_log, leader_frames,
        "log-inspect's export differs from the capture"
    );
    println!(
        "captured {} ordered inbound frames on the leader",
        leader_frames.len()
    );
    assert!(
        leader_frames.len() >= 10,
        "{} frames captured",
        leader_frames.len()
    );
    for i in (1..=3).filter(|&i| i != lead) {
        let f = frames(i);
        let n = f.len().min(leader_frames.len());
        assert!(
            n + 3 >= leader_frames.len(),
            "backup {i} captured {} of {}",
            f.len(),
            leader_frames.len()
        );
        assert_eq!(
            f[..n],
            leader_frames[..n],
            "backup {i}'s frames differ from the leader's"
        );
    }
}

#[test]
fn a_clients_tcp_connection_survives_the_leaders_death() {
    let mut setup = start(true);
    let d = setup.d().to_path_buf();
    let lead = leader(&d).unwrap();
    let client = format!("{}-c", setup.net.tag);
    let in_client = |cmd: &str| sh(&format!("ip netns exec {client} bash -c '{cmd}'"));
    assert!(
        wait_until(Duration::from_secs(60), || in_client(
            "ping -c 1 -W 2 10.0.0.2"
        )
        .status
        .success()),
        "the client network does not reach the VM; leader log:\n{}",
        log(&d, lead)
    );
    // FALCON_VM_TCPDUMP=FILE: capture the client's side, to see a failure.
    let _dump = std::env::var("FALCON_VM_TCPDUMP").ok().map(|f| {
        Replica(
            Command::new("ip")
                .args([
                    "netns", "exec", &client, "tcpdump", "-i", "cbr", "-U", "-w", &f,
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    });
    // One connection, a request every 100 ms for 12 s; each answer must come.
    let conversation = std::thread::spawn(move || {
        sh(&format!(
            "ip netns exec {client} bash -c 'exec 3<>/dev/tcp/10.0.0.2/80 || exit 9; \
             for i in $(seq 1 120); do echo \"set k$i v$i\" >&3; \
             read -t 30 line <&3 || {{ echo \"no answer to request $i\"; exit 1; }}; \
             echo \"$i $line\"; sleep 0.1; done; echo count >&3; read -t 30 line <&3; echo \"count $line\"'"
        ))
    });
    std::thread::sleep(Duration::from_secs(3));
    // The leader's host dies: falcon by SIGKILL (its QEMU follows).
    let mut old = setup.replicas[lead - 1].take().unwrap();
    let _ = old.0.kill();
    let _ = old.0.wait();
    std::mem::forget(old);
    let o = conversation.join().unwrap();
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    let new_lead = (1..=3)
        .find(|&i| i != lead && log(&d, i).contains(&format!("role: replica {i} leads view")));
    assert!(
        o.status.success() && text.lines().filter(|l| l.ends_with(" ok")).count() == 120,
        "the connection did not survive the failover (new leader {new_lead:?}):\n{text}\n{}\nlogs:\n{}\n{}",
        String::from_utf8_lossy(&o.stderr),
        log(&d, (lead % 3) + 1),
        log(&d, ((lead + 1) % 3) + 1)
    );
    let new_lead = new_lead.expect("a new leader");
    assert!(
        log(&d, new_lead).contains("announced the VM on tap0"),
        "{}",
        log(&d, new_lead)
    );
    // The guest the client now talks to served all of it, in one count.
    assert!(text.contains("count 121"), "{text}");
    println!("the connection survived; new leader: replica {new_lead}");
}

#[test]
fn a_qemu_started_separately_is_served_and_found_again_after_a_restart() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "network namespaces and TAP devices need root: run the suite as root"
    );
    let guest = guest();
    let net = Net::new('w', "10.75.0");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("cluster.key"), [0x5au8; 32]).unwrap();
    std::fs::write(
        d.join("cluster.toml"),
        "cluster = \"vm-socket\"\nkey_file = \"cluster.key\"\n\n[[replica]]\nid = 1\npeer = \"10.75.0.1:7101\"\nclient = \"10.75.0.1:7201\"\napp = \"10.75.0.1:7001\"\ndata_dir = \"data/1\"\n",
    )
    .unwrap();
    let sock = d.join("qemu.sock");
    let qemu = |n: usize| {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &net.ns(1)])
            .args(qemu_command(&guest, &d.join(format!("console-{n}.log"))))
            .arg("-netdev")
            .arg(format!(
                "stream,id=falcon,server=on,addr.type=unix,addr.path={}",
                sock.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        Replica(c.spawn().unwrap())
    };
    let first = qemu(1);
    let err = std::fs::File::create(d.join("replica1.log")).unwrap();
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &net.ns(1)])
        .arg(falcon().get_program())
        .current_dir(d)
        .args([
            "tap-attach",
            "tap0",
            "--create",
            "--config",
            "cluster.toml",
            "--node",
            "1",
        ])
        .arg("--qemu-socket")
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err);
    let _falcon = Replica(c.spawn().unwrap());
    assert!(
        wait_until(Duration::from_secs(30), || net
            .run(1, "ip link show tap0")
            .status
            .success()),
        "no tap0; log:\n{}",
        log(d, 1)
    );
    must(&format!(
        "ip netns exec {} ip addr add 10.0.0.1/24 dev tap0",
        net.ns(1)
    ));
    let answers = || {
        wait_until(Duration::from_secs(90), || {
            net.run(1, "ping -c 1 -W 2 10.0.0.2").status.success()
        })
    };
    assert!(
        answers(),
        "the separately started guest never answered; log:\n{}",
        log(d, 1)
    );
    assert!(log(d, 1).contains("connected to QEMU at"), "{}", log(d, 1));
    // QEMU restarts: falcon notices, waits, and serves the new one.
    drop(first);
    assert!(
        wait_until(Duration::from_secs(10), || log(d, 1)
            .contains("waiting for QEMU to listen")),
        "{}",
        log(d, 1)
    );
    let _second = qemu(2);
    assert!(
        answers(),
        "the restarted guest never answered; log:\n{}",
        log(d, 1)
    );
    assert_eq!(
        log(d, 1).matches("connected to QEMU at").count(),
        2,
        "{}",
        log(d, 1)
    );
}

/// The lines of guest `i`'s console that say it served `request`.
fn served_request(d: &Path, i: usize, request: &str) -> bool {
    std::fs::read_to_string(d.join(format!("console{i}.log")))
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("falcon guest: request ") && l.ends_with(&format!(": {request}")))
}

#[test]
fn the_leaders_vm_works_ahead_but_answers_only_what_a_majority_has_and_a_deposed_leader_with_lost_input_stops()
 {
    let mut setup = start(false);
    let d = setup.d().to_path_buf();
    let lead = leader(&d).unwrap();
    let backups: Vec<usize> = (1..=3).filter(|&i| i != lead).collect();
    assert!(
        wait_until(Duration::from_secs(60), || setup
            .net
            .run(lead, "ping -c 1 -W 2 10.0.0.2")
            .status
            .success()),
        "no ping answer through the leader; its log:\n{}",
        log(&d, lead)
    );
    // A client on the leader's host, one connection, three requests; each
    // waits for a file the test makes, and what came back is printed.
    let client = d.join("client.sh");
    std::fs::write(
        &client,
        format!(
            "cd {d}\nexec 3<>/dev/tcp/10.0.0.2/80 || exit 9\n\
             echo 'set before 1' >&3; read -t 30 l <&3; echo \"first $l\"; touch opened\n\
             while [ ! -e go ]; do sleep 0.05; done\n\
             echo 'set held 1' >&3; read -t 60 l <&3 && echo \"second $l\"; touch answered\n\
             while [ ! -e go2 ]; do sleep 0.05; done\n\
             echo 'set lost 1' >&3; if read -t 20 l <&3; then echo \"third $l\"; else echo 'third none'; fi\n",
            d = d.display()
        ),
    )
    .unwrap();
    let ns = setup.net.ns(lead);
    let conversation =
        std::thread::spawn(move || sh(&format!("ip netns exec {ns} bash {}", client.display())));
    assert!(
        wait_until(Duration::from_secs(60), || d.join("opened").exists()),
        "the first request got no answer; leader log:\n{}",
        log(&d, lead)
    );
    // 1. No majority: both backups' falcons stopped. The leader's guest gets
    // the request at once and serves it, but its answer waits.
    let pid = |i: usize| setup.replicas[i - 1].as_ref().unwrap().0.id();
    for &b in &backups {
        must(&format!("kill -STOP {}", pid(b)));
    }
    std::fs::write(d.join("go"), "").unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || served_request(
            &d,
            lead,
            "set held 1"
        )),
        "the leader's guest did not get the request before it committed (--deliver early); log:\n{}",
        log(&d, lead)
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        !d.join("answered").exists(),
        "the client got an answer to input no majority had"
    );
    // A majority again: the input commits and the held answer goes out.
    for &b in &backups {
        must(&format!("kill -CONT {}", pid(b)));
    }
    assert!(
        wait_until(Duration::from_secs(30), || d.join("answered").exists()),
        "no answer once the backups were back; leader log:\n{}",
        log(&d, lead)
    );
    for &b in &backups {
        assert!(
            wait_until(Duration::from_secs(30), || served_request(
                &d,
                b,
                "set held 1"
            )),
            "backup {b}'s guest never got the committed request"
        );
    }
    // 2. The leader cut off from the other replicas: its guest serves the
    // next request at once, the answer waits for a commit that never comes,
    // the others elect a leader whose log does not hold that request.
    setup.net.link(lead, false);
    std::fs::write(d.join("go2"), "").unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || served_request(
            &d,
            lead,
            "set lost 1"
        )),
        "the cut-off leader's guest did not get the request early; log:\n{}",
        log(&d, lead)
    );
    let new_lead = {
        let mut found = None;
        wait_until(Duration::from_secs(30), || {
            found = backups
                .iter()
                .copied()
                .find(|&i| log(&d, i).contains(&format!("role: replica {i} leads view")));
            found.is_some()
        });
        found.unwrap_or_else(|| {
            panic!(
                "the other two elected no leader; logs:\n{}\n{}",
                log(&d, backups[0]),
                log(&d, backups[1])
            )
        })
    };
    // The new leader's VM serves its own host's network.
    assert!(
        wait_until(Duration::from_secs(60), || setup
            .net
            .run(new_lead, "ping -c 1 -W 2 10.0.0.2")
            .status
            .success()),
        "the new leader's VM does not answer; its log:\n{}",
        log(&d, new_lead)
    );
    // Healed: the old leader learns the new view, finds that its VM
    // processed input the log does not hold, and stops rather than serve
    // as a copy that differs.
    setup.net.link(lead, true);
    let mut old = setup.replicas[lead - 1].take().unwrap();
    let status = {
        let mut st = None;
        wait_until(Duration::from_secs(60), || {
            st = old.0.try_wait().ok().flatten();
            st.is_some()
        });
        st
    };
    let old_log = log(&d, lead);
    assert!(
        status.is_some_and(|s| !s.success()),
        "the deposed leader did not stop ({status:?}); its log:\n{old_log}"
    );
    assert!(
        old_log.contains("restart this replica (its VM starts over and replays the log)"),
        "{old_log}"
    );
    let _ = old.0.wait();
    std::mem::forget(old);
    let o = conversation.join().unwrap();
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        text.contains("first ok") && text.contains("second ok") && text.contains("third none"),
        "the client saw an answer to input the cluster lost, or missed one it was owed:\n{text}"
    );
    assert!(
        !served_request(&d, new_lead, "set lost 1"),
        "the new leader's guest got the lost request"
    );
    // The cluster goes on without it.
    let o = setup.net.run(new_lead, "ping -c 3 -i 0.2 -W 2 10.0.0.2");
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("3 received"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let counters = old_log
        .lines()
        .find(|l| l.contains("frames proposed"))
        .unwrap_or_else(|| panic!("no counters from the deposed leader:\n{old_log}"));
    println!("deposed leader: {counters}");
    assert!(
        counters.contains("after waiting for a commit"),
        "{counters}"
    );
}
