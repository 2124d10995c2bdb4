# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_falcon_global_optspecs
    string join \n json v/verbose q/quiet color= h/help V/version
end

function __fish_falcon_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_falcon_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_falcon_using_subcommand
    set -l cmd (__fish_falcon_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c falcon -n "__fish_falcon_needs_command" -l color -d 'When to use colour' -r -f -a "auto\t'When standard output is a terminal and `NO_COLOR` is not set'
always\t'Always'
never\t'Never'"
complete -c falcon -n "__fish_falcon_needs_command" -l json -d 'Machine-readable output (JSON; JSON Lines for record streams)'
complete -c falcon -n "__fish_falcon_needs_command" -s v -l verbose -d 'More detail on standard error (repeat for more)'
complete -c falcon -n "__fish_falcon_needs_command" -s q -l quiet -d 'Only errors on standard error'
complete -c falcon -n "__fish_falcon_needs_command" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c falcon -n "__fish_falcon_needs_command" -s V -l version -d 'Print version'
complete -c falcon -n "__fish_falcon_needs_command" -f -a "replicate" -d 'Run a server program as one replica of a cluster'
complete -c falcon -n "__fish_falcon_needs_command" -f -a "tap-attach" -d 'Replicate a QEMU virtual machine by ordering its inbound frames'
complete -c falcon -n "__fish_falcon_needs_command" -f -a "bench" -d 'Measure the log, round trips and consensus, beside their baselines'
complete -c falcon -n "__fish_falcon_needs_command" -f -a "log-inspect" -d 'Read, verify, follow and export a replica\'s log'
complete -c falcon -n "__fish_falcon_needs_command" -f -a "failover" -d 'Cluster status, planned leadership transfer, failure drills'
complete -c falcon -n "__fish_falcon_needs_command" -f -a "generate" -d 'Write the man pages and shell completions (for packagers)'
complete -c falcon -n "__fish_falcon_needs_command" -f -a "make-fixtures" -d 'Write the fixture logs under fixtures/ (for falcon\'s own tests)'
complete -c falcon -n "__fish_falcon_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c falcon -n "__fish_falcon_using_subcommand replicate" -l config -d 'The cluster file (default: ./falcon.toml, then /etc/falcon/falcon.toml)' -r -F
complete -c falcon -n "__fish_falcon_using_subcommand replicate" -l node -d 'This replica\'s id in the cluster file (default: $FALCON_NODE, else the replica whose peer address is an address of this host)' -r
complete -c falcon -n "__fish_falcon_using_subcommand replicate" -l election-timeout -d 'Overrides the cluster file\'s election timeout' -r
complete -c falcon -n "__fish_falcon_using_subcommand replicate" -l app-timeout -d 'How long to wait for the program to accept connections on its app address' -r
complete -c falcon -n "__fish_falcon_using_subcommand replicate" -l follower-clients -d 'What a follower does with a client that connects to it' -r -f -a "forward\t'Pass the connection on to the leader\'s client address (both ways, until either side closes)'
refuse\t'Close it: the client tries another replica'"
complete -c falcon -n "__fish_falcon_using_subcommand replicate" -l on-leader -d 'Run CMD (with sh -c) when this replica becomes the leader, for example to move a virtual IP. Environment: FALCON_ROLE, FALCON_VIEW, FALCON_NODE, FALCON_LEADER' -r
complete -c falcon -n "__fish_falcon_using_subcommand replicate" -l on-follower -d 'Run CMD (with sh -c) when this replica becomes a follower (same environment)' -r
complete -c falcon -n "__fish_falcon_using_subcommand replicate" -l reset-cmd -d 'Run CMD (with sh -c) before the program starts, to bring it to its initial state (for example, empty its data directory); the log is then replayed into it. Also before `falcon failover resync` rebuilds the program. Environment: FALCON_NODE, FALCON_DATA_DIR' -r
complete -c falcon -n "__fish_falcon_using_subcommand replicate" -l on-divergence -d 'Run CMD (with sh -c) when this replica finds that its program wrote other bytes than the leader\'s (divergence detection; see divergence_chunk in the cluster file), for example to page someone. Environment: FALCON_NODE, FALCON_DATA_DIR, FALCON_CONN, FALCON_OFFSET (the first byte of the first chunk that differs), FALCON_CHUNK, FALCON_OP, FALCON_DIVERGENCE (the whole message)' -r
complete -c falcon -n "__fish_falcon_using_subcommand replicate" -l snapshot-cmd -d 'Run CMD (with sh -c) to write the program\'s state into the directory $FALCON_SNAPSHOT_DIR, every --snapshot-every entries. Applying pauses while it runs; falcon then packs the directory into DATA_DIR/snapshot and deletes log segments it covers. Environment: FALCON_SNAPSHOT_DIR, FALCON_OP, FALCON_NODE, FALCON_DATA_DIR, FALCON_APP, FALCON_APP_HOST, FALCON_APP_PORT. Needs --restore-cmd' -r
complete -c falcon -n "__fish_falcon_using_subcommand replicate" -l restore-cmd -d 'Run CMD (with sh -c) before the program starts, to put the state in $FALCON_SNAPSHOT_DIR in place: at a restart with a snapshot in the data dir, and when a replica too far behind receives the leader\'s snapshot. Same environment as --snapshot-cmd' -r
complete -c falcon -n "__fish_falcon_using_subcommand replicate" -l snapshot-every -d 'Entries applied between two snapshots' -r
complete -c falcon -n "__fish_falcon_using_subcommand replicate" -l snapshot-timeout -d 'How long --snapshot-cmd may run (applying is paused meanwhile): past it, the command and everything it started are killed, this snapshot is given up (the log keeps every entry) and applying goes on' -r
complete -c falcon -n "__fish_falcon_using_subcommand replicate" -l memory-entries -d 'Delivered entries each replica keeps in memory for followers that fall behind a little; older ones are read back from the log' -r
complete -c falcon -n "__fish_falcon_using_subcommand replicate" -l poll -d 'With transport shm or rdma: how the replica waits for its peers. adaptive spins on the rings for 50 µs after each peer message, then sleeps; spin never sleeps (lowest latency; a core per replica, so only where each replica has a core of its own); sleep never spins. TCP always sleeps in epoll' -r -f -a "spin\t'Spin on the rings, never sleep (lowest latency, a core per replica)'
adaptive\t'Spin for a bounded time, then sleep on the doorbell'
sleep\t'Sleep on the doorbell at once'"
complete -c falcon -n "__fish_falcon_using_subcommand replicate" -l metrics -d 'Serve Prometheus metrics at http://ADDR/metrics (commit latency, commits, view and role, follower lag, log size, fsync latency, connections). Every replica also answers `falcon failover status` on admin.sock in its data directory' -r
complete -c falcon -n "__fish_falcon_using_subcommand replicate" -l tls-cert -d 'Mutual TLS on the peer links: this replica\'s certificate (PEM, signed by --tls-ca, with the IP of its peer address in subjectAltName). Overrides the cluster file\'s tls_cert. scripts/tls-certs.sh makes a CA and one certificate per replica' -r -F
complete -c falcon -n "__fish_falcon_using_subcommand replicate" -l tls-key -d 'Mutual TLS: this replica\'s private key (PEM). Overrides tls_key' -r -F
complete -c falcon -n "__fish_falcon_using_subcommand replicate" -l tls-ca -d 'Mutual TLS: the cluster CA\'s certificate (PEM); peers must present a certificate it signed. Overrides tls_ca. Every replica must use TLS' -r -F
complete -c falcon -n "__fish_falcon_using_subcommand replicate" -l new-key -d 'Write a new random cluster key to FILE (mode 0600) and exit' -r -F
complete -c falcon -n "__fish_falcon_using_subcommand replicate" -l color -d 'When to use colour' -r -f -a "auto\t'When standard output is a terminal and `NO_COLOR` is not set'
always\t'Always'
never\t'Never'"
complete -c falcon -n "__fish_falcon_using_subcommand replicate" -l null-program -d 'Run no program: clients send frames (u32 little-endian length, then the bytes) and the leader answers each committed frame with its op and the nanoseconds from proposing it to applying it on the leader (two u64 little-endian). What `falcon bench --consensus` measures'
complete -c falcon -n "__fish_falcon_using_subcommand replicate" -l json -d 'Machine-readable output (JSON; JSON Lines for record streams)'
complete -c falcon -n "__fish_falcon_using_subcommand replicate" -s v -l verbose -d 'More detail on standard error (repeat for more)'
complete -c falcon -n "__fish_falcon_using_subcommand replicate" -s q -l quiet -d 'Only errors on standard error'
complete -c falcon -n "__fish_falcon_using_subcommand replicate" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c falcon -n "__fish_falcon_using_subcommand replicate" -s V -l version -d 'Print version'
complete -c falcon -n "__fish_falcon_using_subcommand tap-attach" -l capture -d 'Write the ordered inbound frames (what every VM receives, in order) to FILE as pcap' -r -F
complete -c falcon -n "__fish_falcon_using_subcommand tap-attach" -l qemu-socket -d 'Serve a QEMU started separately with -netdev stream,server=on, addr.type=unix,addr.path=PATH: falcon connects, and connects again when QEMU restarts. Without a QEMU command and without this, falcon uses qemu-net.sock in the replica\'s data directory and says so' -r -F
complete -c falcon -n "__fish_falcon_using_subcommand tap-attach" -l deliver -d 'When the leader\'s VM gets an inbound frame: `early`, as the leader proposes it, while what the VM sends waits until that input is committed (the VM works while the replicas agree; a leader deposed before its early input committed, whose input the next view drops, stops and must be restarted); `committed`, only once a majority has it, like every backup\'s VM' -r -f -a "early\t'As the leader proposes it; what the VM sends waits until that input is committed (output commit): the VM works while the replicas agree'
committed\t'Once it is committed, like every backup\'s VM'"
complete -c falcon -n "__fish_falcon_using_subcommand tap-attach" -l config -d 'The cluster file (default: ./falcon.toml, then /etc/falcon/falcon.toml)' -r -F
complete -c falcon -n "__fish_falcon_using_subcommand tap-attach" -l node -d 'This replica\'s id in the cluster file (default: $FALCON_NODE, else the replica whose peer address is an address of this host)' -r
complete -c falcon -n "__fish_falcon_using_subcommand tap-attach" -l election-timeout -d 'Overrides the cluster file\'s election timeout' -r
complete -c falcon -n "__fish_falcon_using_subcommand tap-attach" -l app-timeout -d 'How long to wait for the program to accept connections on its app address' -r
complete -c falcon -n "__fish_falcon_using_subcommand tap-attach" -l follower-clients -d 'What a follower does with a client that connects to it' -r -f -a "forward\t'Pass the connection on to the leader\'s client address (both ways, until either side closes)'
refuse\t'Close it: the client tries another replica'"
complete -c falcon -n "__fish_falcon_using_subcommand tap-attach" -l on-leader -d 'Run CMD (with sh -c) when this replica becomes the leader, for example to move a virtual IP. Environment: FALCON_ROLE, FALCON_VIEW, FALCON_NODE, FALCON_LEADER' -r
complete -c falcon -n "__fish_falcon_using_subcommand tap-attach" -l on-follower -d 'Run CMD (with sh -c) when this replica becomes a follower (same environment)' -r
complete -c falcon -n "__fish_falcon_using_subcommand tap-attach" -l reset-cmd -d 'Run CMD (with sh -c) before the program starts, to bring it to its initial state (for example, empty its data directory); the log is then replayed into it. Also before `falcon failover resync` rebuilds the program. Environment: FALCON_NODE, FALCON_DATA_DIR' -r
complete -c falcon -n "__fish_falcon_using_subcommand tap-attach" -l on-divergence -d 'Run CMD (with sh -c) when this replica finds that its program wrote other bytes than the leader\'s (divergence detection; see divergence_chunk in the cluster file), for example to page someone. Environment: FALCON_NODE, FALCON_DATA_DIR, FALCON_CONN, FALCON_OFFSET (the first byte of the first chunk that differs), FALCON_CHUNK, FALCON_OP, FALCON_DIVERGENCE (the whole message)' -r
complete -c falcon -n "__fish_falcon_using_subcommand tap-attach" -l snapshot-cmd -d 'Run CMD (with sh -c) to write the program\'s state into the directory $FALCON_SNAPSHOT_DIR, every --snapshot-every entries. Applying pauses while it runs; falcon then packs the directory into DATA_DIR/snapshot and deletes log segments it covers. Environment: FALCON_SNAPSHOT_DIR, FALCON_OP, FALCON_NODE, FALCON_DATA_DIR, FALCON_APP, FALCON_APP_HOST, FALCON_APP_PORT. Needs --restore-cmd' -r
complete -c falcon -n "__fish_falcon_using_subcommand tap-attach" -l restore-cmd -d 'Run CMD (with sh -c) before the program starts, to put the state in $FALCON_SNAPSHOT_DIR in place: at a restart with a snapshot in the data dir, and when a replica too far behind receives the leader\'s snapshot. Same environment as --snapshot-cmd' -r
complete -c falcon -n "__fish_falcon_using_subcommand tap-attach" -l snapshot-every -d 'Entries applied between two snapshots' -r
complete -c falcon -n "__fish_falcon_using_subcommand tap-attach" -l snapshot-timeout -d 'How long --snapshot-cmd may run (applying is paused meanwhile): past it, the command and everything it started are killed, this snapshot is given up (the log keeps every entry) and applying goes on' -r
complete -c falcon -n "__fish_falcon_using_subcommand tap-attach" -l memory-entries -d 'Delivered entries each replica keeps in memory for followers that fall behind a little; older ones are read back from the log' -r
complete -c falcon -n "__fish_falcon_using_subcommand tap-attach" -l poll -d 'With transport shm or rdma: how the replica waits for its peers. adaptive spins on the rings for 50 µs after each peer message, then sleeps; spin never sleeps (lowest latency; a core per replica, so only where each replica has a core of its own); sleep never spins. TCP always sleeps in epoll' -r -f -a "spin\t'Spin on the rings, never sleep (lowest latency, a core per replica)'
adaptive\t'Spin for a bounded time, then sleep on the doorbell'
sleep\t'Sleep on the doorbell at once'"
complete -c falcon -n "__fish_falcon_using_subcommand tap-attach" -l metrics -d 'Serve Prometheus metrics at http://ADDR/metrics (commit latency, commits, view and role, follower lag, log size, fsync latency, connections). Every replica also answers `falcon failover status` on admin.sock in its data directory' -r
complete -c falcon -n "__fish_falcon_using_subcommand tap-attach" -l tls-cert -d 'Mutual TLS on the peer links: this replica\'s certificate (PEM, signed by --tls-ca, with the IP of its peer address in subjectAltName). Overrides the cluster file\'s tls_cert. scripts/tls-certs.sh makes a CA and one certificate per replica' -r -F
complete -c falcon -n "__fish_falcon_using_subcommand tap-attach" -l tls-key -d 'Mutual TLS: this replica\'s private key (PEM). Overrides tls_key' -r -F
complete -c falcon -n "__fish_falcon_using_subcommand tap-attach" -l tls-ca -d 'Mutual TLS: the cluster CA\'s certificate (PEM); peers must present a certificate it signed. Overrides tls_ca. Every replica must use TLS' -r -F
complete -c falcon -n "__fish_falcon_using_subcommand tap-attach" -l new-key -d 'Write a new random cluster key to FILE (mode 0600) and exit' -r -F
complete -c falcon -n "__fish_falcon_using_subcommand tap-attach" -l color -d 'When to use colour' -r -f -a "auto\t'When standard output is a terminal and `NO_COLOR` is not set'
always\t'Always'
never\t'Never'"
complete -c falcon -n "__fish_falcon_using_subcommand tap-attach" -l create -d 'Create the TAP device when it is missing (and bring it up); it goes away when falcon stops'
complete -c falcon -n "__fish_falcon_using_subcommand tap-attach" -l null-program -d 'Run no program: clients send frames (u32 little-endian length, then the bytes) and the leader answers each committed frame with its op and the nanoseconds from proposing it to applying it on the leader (two u64 little-endian). What `falcon bench --consensus` measures'
complete -c falcon -n "__fish_falcon_using_subcommand tap-attach" -l json -d 'Machine-readable output (JSON; JSON Lines for record streams)'
complete -c falcon -n "__fish_falcon_using_subcommand tap-attach" -s v -l verbose -d 'More detail on standard error (repeat for more)'
complete -c falcon -n "__fish_falcon_using_subcommand tap-attach" -s q -l quiet -d 'Only errors on standard error'
complete -c falcon -n "__fish_falcon_using_subcommand tap-attach" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c falcon -n "__fish_falcon_using_subcommand tap-attach" -s V -l version -d 'Print version'
complete -c falcon -n "__fish_falcon_using_subcommand bench" -l serve -d '--rtt: answer round trips on ADDR (the other host runs --peer ADDR) until Ctrl-C' -r
complete -c falcon -n "__fish_falcon_using_subcommand bench" -l peer -d '--rtt: measure against a --serve at ADDR' -r
complete -c falcon -n "__fish_falcon_using_subcommand bench" -l size -d '--rtt: message size; --consensus: entry size (bytes)' -r
complete -c falcon -n "__fish_falcon_using_subcommand bench" -l iters -d '--rtt: measured iterations' -r
complete -c falcon -n "__fish_falcon_using_subcommand bench" -l warmup -d '--rtt: iterations run first and not measured' -r
complete -c falcon -n "__fish_falcon_using_subcommand bench" -l poll -d '--transport shm: how a receiver waits (spin: never sleeps; adaptive: spins 50 µs, then sleeps on a futex; sleep: sleeps at once)' -r -f -a "spin\t'Spin on the rings, never sleep (lowest latency, a core per replica)'
adaptive\t'Spin for a bounded time, then sleep on the doorbell'
sleep\t'Sleep on the doorbell at once'"
complete -c falcon -n "__fish_falcon_using_subcommand bench" -l raw -d '--rtt: write every round trip (ns, one per line) to FILE' -r -F
complete -c falcon -n "__fish_falcon_using_subcommand bench" -l replicas -d '--consensus: replicas in the local cluster' -r
complete -c falcon -n "__fish_falcon_using_subcommand bench" -l clients -d '--consensus: closed-loop clients, one entry outstanding each (default: 1, then 256)' -r
complete -c falcon -n "__fish_falcon_using_subcommand bench" -l connections -d '--consensus: connections the clients share (default 8)' -r
complete -c falcon -n "__fish_falcon_using_subcommand bench" -l sync -d '--consensus: the cluster\'s sync policy: always, batch (default) or never' -r
complete -c falcon -n "__fish_falcon_using_subcommand bench" -l cluster -d '--consensus: drive an already running cluster (its replicas started with `falcon replicate --null-program`) instead of starting one' -r -F
complete -c falcon -n "__fish_falcon_using_subcommand bench" -l requests -d 'Requests per run for --redis at 50 connections (a tenth at 1)' -r
complete -c falcon -n "__fish_falcon_using_subcommand bench" -l rounds -d 'Rounds for --redis (the median is reported)' -r
complete -c falcon -n "__fish_falcon_using_subcommand bench" -l transport -d 'The transport: tcp or shm (replicas on this host, over shared memory); for --consensus also mem, the engine alone in one process without a disk' -r
complete -c falcon -n "__fish_falcon_using_subcommand bench" -l dir -d 'Where --log puts its scratch log (on the disk to measure; removed afterwards)' -r -F
complete -c falcon -n "__fish_falcon_using_subcommand bench" -l duration -d 'How long each measurement runs' -r
complete -c falcon -n "__fish_falcon_using_subcommand bench" -l verify-mib -d 'Size of the log that --log builds to measure --verify speed' -r
complete -c falcon -n "__fish_falcon_using_subcommand bench" -l color -d 'When to use colour' -r -f -a "auto\t'When standard output is a terminal and `NO_COLOR` is not set'
always\t'Always'
never\t'Never'"
complete -c falcon -n "__fish_falcon_using_subcommand bench" -l log -d 'The durable log: append throughput and append-to-durable latency for 64 B and 4 KiB records per sync policy, group commit with many writers, and `--verify` speed, beside the disk\'s own write+fdatasync rate'
complete -c falcon -n "__fish_falcon_using_subcommand bench" -l rtt -d 'Round trip of the transport with one message outstanding, perftest style (t_min, t_typical, t_avg, t_stdev, 99%, 99.9%, t_max; round trip and one way). Needs --local, or --serve ADDR on one host and --peer ADDR on the other'
complete -c falcon -n "__fish_falcon_using_subcommand bench" -l local -d '--rtt: both ends on this host'
complete -c falcon -n "__fish_falcon_using_subcommand bench" -l plain-echo -d '--rtt --peer: the server is a plain echo server (TCP port 7 style, such as the test guest\'s), not `falcon bench --rtt --serve`'
complete -c falcon -n "__fish_falcon_using_subcommand bench" -l consensus -d 'Consensus: a local cluster of --replicas processes (falcon replicate without a program) driven by closed-loop clients; commits/s, commit latency, CPU per 1,000 commits. With --transport mem: the engine alone, 3 replicas in one process without a disk'
complete -c falcon -n "__fish_falcon_using_subcommand bench" -l netns -d '--consensus: every replica in a network namespace of its own, joined by a bridge (root only), instead of on 127.0.0.x'
complete -c falcon -n "__fish_falcon_using_subcommand bench" -l tls -d '--consensus: the same measurements twice in one run, on plain TCP peer links and with mutual TLS on them (certificates made by scripts/tls-certs.sh), side by side'
complete -c falcon -n "__fish_falcon_using_subcommand bench" -l compare -d '--consensus: also measure the TCP round trip (--rtt --local) in the same run and print commit latency as a multiple of it'
complete -c falcon -n "__fish_falcon_using_subcommand bench" -l redis -d 'Redis replicated by falcon beside Redis alone, Redis\'s asynchronous replication and its synchronous `WAIT 2 0`, alternating in one window (needs redis-server and redis-benchmark)'
complete -c falcon -n "__fish_falcon_using_subcommand bench" -l json -d 'Machine-readable output (JSON; JSON Lines for record streams)'
complete -c falcon -n "__fish_falcon_using_subcommand bench" -s v -l verbose -d 'More detail on standard error (repeat for more)'
complete -c falcon -n "__fish_falcon_using_subcommand bench" -s q -l quiet -d 'Only errors on standard error'
complete -c falcon -n "__fish_falcon_using_subcommand bench" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c falcon -n "__fish_falcon_using_subcommand bench" -s V -l version -d 'Print version'
complete -c falcon -n "__fish_falcon_using_subcommand log-inspect" -l hex -d 'A full hex dump of the record with this op' -r
complete -c falcon -n "__fish_falcon_using_subcommand log-inspect" -l interval -d 'How often --follow looks for new records' -r
complete -c falcon -n "__fish_falcon_using_subcommand log-inspect" -l export-pcap -d 'Write Open/Data/Close records as TCP/IP flows (and Frame records as they are) to a pcap file' -r -F
complete -c falcon -n "__fish_falcon_using_subcommand log-inspect" -l pcap-port -d 'The server port of the flows in --export-pcap, so analysers decode the protocol' -r
complete -c falcon -n "__fish_falcon_using_subcommand log-inspect" -l from -d 'Only records with op >= OP' -r
complete -c falcon -n "__fish_falcon_using_subcommand log-inspect" -l to -d 'Only records with op <= OP' -r
complete -c falcon -n "__fish_falcon_using_subcommand log-inspect" -l conn -d 'Only records of this connection' -r
complete -c falcon -n "__fish_falcon_using_subcommand log-inspect" -l kind -d 'Only records of this kind (repeat for several): open, data, close, frame, noop' -r
complete -c falcon -n "__fish_falcon_using_subcommand log-inspect" -l limit -d 'Stop after this many records' -r
complete -c falcon -n "__fish_falcon_using_subcommand log-inspect" -l color -d 'When to use colour' -r -f -a "auto\t'When standard output is a terminal and `NO_COLOR` is not set'
always\t'Always'
never\t'Never'"
complete -c falcon -n "__fish_falcon_using_subcommand log-inspect" -l entries -d 'One row per record: op, view, kind, connection, bytes, time and a preview of the payload'
complete -c falcon -n "__fish_falcon_using_subcommand log-inspect" -l summary -d 'The summary (the default); with --json, as one JSON object'
complete -c falcon -n "__fish_falcon_using_subcommand log-inspect" -l verify -d 'Check every checksum and the hash chain; exit 1 with the file and byte offset of the first bad record'
complete -c falcon -n "__fish_falcon_using_subcommand log-inspect" -l strict -d 'With --verify: a torn tail (a write cut short by a crash) also fails'
complete -c falcon -n "__fish_falcon_using_subcommand log-inspect" -l follow -d 'Print records as a running replica appends them, until Ctrl-C'
complete -c falcon -n "__fish_falcon_using_subcommand log-inspect" -l json -d 'Machine-readable output (JSON; JSON Lines for record streams)'
complete -c falcon -n "__fish_falcon_using_subcommand log-inspect" -s v -l verbose -d 'More detail on standard error (repeat for more)'
complete -c falcon -n "__fish_falcon_using_subcommand log-inspect" -s q -l quiet -d 'Only errors on standard error'
complete -c falcon -n "__fish_falcon_using_subcommand log-inspect" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c falcon -n "__fish_falcon_using_subcommand log-inspect" -s V -l version -d 'Print version'
complete -c falcon -n "__fish_falcon_using_subcommand failover; and not __fish_seen_subcommand_from status transfer resync drill help" -l color -d 'When to use colour' -r -f -a "auto\t'When standard output is a terminal and `NO_COLOR` is not set'
always\t'Always'
never\t'Never'"
complete -c falcon -n "__fish_falcon_using_subcommand failover; and not __fish_seen_subcommand_from status transfer resync drill help" -l json -d 'Machine-readable output (JSON; JSON Lines for record streams)'
complete -c falcon -n "__fish_falcon_using_subcommand failover; and not __fish_seen_subcommand_from status transfer resync drill help" -s v -l verbose -d 'More detail on standard error (repeat for more)'
complete -c falcon -n "__fish_falcon_using_subcommand failover; and not __fish_seen_subcommand_from status transfer resync drill help" -s q -l quiet -d 'Only errors on standard error'
complete -c falcon -n "__fish_falcon_using_subcommand failover; and not __fish_seen_subcommand_from status transfer resync drill help" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c falcon -n "__fish_falcon_using_subcommand failover; and not __fish_seen_subcommand_from status transfer resync drill help" -s V -l version -d 'Print version'
complete -c falcon -n "__fish_falcon_using_subcommand failover; and not __fish_seen_subcommand_from status transfer resync drill help" -f -a "status" -d 'A table of the replicas: role, view, ops, lag, links, program, log size, uptime'
complete -c falcon -n "__fish_falcon_using_subcommand failover; and not __fish_seen_subcommand_from status transfer resync drill help" -f -a "transfer" -d 'Hand the leadership to another replica (planned failover)'
complete -c falcon -n "__fish_falcon_using_subcommand failover; and not __fish_seen_subcommand_from status transfer resync drill help" -f -a "resync" -d 'Rebuild a replica\'s program from its initial state and the log, and check it against the leader\'s'
complete -c falcon -n "__fish_falcon_using_subcommand failover; and not __fish_seen_subcommand_from status transfer resync drill help" -f -a "drill" -d 'Kill replicas under load, round after round, and measure the failovers'
complete -c falcon -n "__fish_falcon_using_subcommand failover; and not __fish_seen_subcommand_from status transfer resync drill help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c falcon -n "__fish_falcon_using_subcommand failover; and __fish_seen_subcommand_from status" -l config -d 'The cluster file (default: ./falcon.toml, then /etc/falcon/falcon.toml)' -r -F
complete -c falcon -n "__fish_falcon_using_subcommand failover; and __fish_seen_subcommand_from status" -l interval -d 'Time between two refreshes with --watch' -r
complete -c falcon -n "__fish_falcon_using_subcommand failover; and __fish_seen_subcommand_from status" -l color -d 'When to use colour' -r -f -a "auto\t'When standard output is a terminal and `NO_COLOR` is not set'
always\t'Always'
never\t'Never'"
complete -c falcon -n "__fish_falcon_using_subcommand failover; and __fish_seen_subcommand_from status" -l watch -d 'Refresh in place until Ctrl-C (with --json: one JSON line per refresh)'
complete -c falcon -n "__fish_falcon_using_subcommand failover; and __fish_seen_subcommand_from status" -l json -d 'Machine-readable output (JSON; JSON Lines for record streams)'
complete -c falcon -n "__fish_falcon_using_subcommand failover; and __fish_seen_subcommand_from status" -s v -l verbose -d 'More detail on standard error (repeat for more)'
complete -c falcon -n "__fish_falcon_using_subcommand failover; and __fish_seen_subcommand_from status" -s q -l quiet -d 'Only errors on standard error'
complete -c falcon -n "__fish_falcon_using_subcommand failover; and __fish_seen_subcommand_from status" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c falcon -n "__fish_falcon_using_subcommand failover; and __fish_seen_subcommand_from status" -s V -l version -d 'Print version'
complete -c falcon -n "__fish_falcon_using_subcommand failover; and __fish_seen_subcommand_from transfer" -l config -d 'The cluster file (default: ./falcon.toml, then /etc/falcon/falcon.toml)' -r -F
complete -c falcon -n "__fish_falcon_using_subcommand failover; and __fish_seen_subcommand_from transfer" -l to -d 'The replica (id) to lead next' -r
complete -c falcon -n "__fish_falcon_using_subcommand failover; and __fish_seen_subcommand_from transfer" -l timeout -d 'Give up after this long' -r
complete -c falcon -n "__fish_falcon_using_subcommand failover; and __fish_seen_subcommand_from transfer" -l color -d 'When to use colour' -r -f -a "auto\t'When standard output is a terminal and `NO_COLOR` is not set'
always\t'Always'
never\t'Never'"
complete -c falcon -n "__fish_falcon_using_subcommand failover; and __fish_seen_subcommand_from transfer" -l force -d 'Transfer even to a replica whose program diverged from the leader\'s'
complete -c falcon -n "__fish_falcon_using_subcommand failover; and __fish_seen_subcommand_from transfer" -l json -d 'Machine-readable output (JSON; JSON Lines for record streams)'
complete -c falcon -n "__fish_falcon_using_subcommand failover; and __fish_seen_subcommand_from transfer" -s v -l verbose -d 'More detail on standard error (repeat for more)'
complete -c falcon -n "__fish_falcon_using_subcommand failover; and __fish_seen_subcommand_from transfer" -s q -l quiet -d 'Only errors on standard error'
complete -c falcon -n "__fish_falcon_using_subcommand failover; and __fish_seen_subcommand_from transfer" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c falcon -n "__fish_falcon_using_subcommand failover; and __fish_seen_subcommand_from transfer" -s V -l version -d 'Print version'
complete -c falcon -n "__fish_falcon_using_subcommand failover; and __fish_seen_subcommand_from resync" -l config -d 'The cluster file (default: ./falcon.toml, then /etc/falcon/falcon.toml)' -r -F
complete -c falcon -n "__fish_falcon_using_subcommand failover; and __fish_seen_subcommand_from resync" -l node -d 'The replica (id) to rebuild: a follower' -r
complete -c falcon -n "__fish_falcon_using_subcommand failover; and __fish_seen_subcommand_from resync" -l from -d 'What to rebuild from: leader takes a fresh snapshot on the leader (--snapshot-cmd there, --restore-cmd on the replica) and installs it; log restarts the program from its initial state (--reset-cmd) and replays the whole log; auto is leader when both hooks are there' -r -f -a "auto\t'The leader\'s snapshot when the hooks allow it, else the log'
leader\t'A fresh snapshot of the leader\'s program, then the log after it'
log\t'The initial state, then the whole log (the log must still start at op 1)'"
complete -c falcon -n "__fish_falcon_using_subcommand failover; and __fish_seen_subcommand_from resync" -l timeout -d 'Give up waiting after this long (the rebuild goes on)' -r
complete -c falcon -n "__fish_falcon_using_subcommand failover; and __fish_seen_subcommand_from resync" -l color -d 'When to use colour' -r -f -a "auto\t'When standard output is a terminal and `NO_COLOR` is not set'
always\t'Always'
never\t'Never'"
complete -c falcon -n "__fish_falcon_using_subcommand failover; and __fish_seen_subcommand_from resync" -l json -d 'Machine-readable output (JSON; JSON Lines for record streams)'
complete -c falcon -n "__fish_falcon_using_subcommand failover; and __fish_seen_subcommand_from resync" -s v -l verbose -d 'More detail on standard error (repeat for more)'
complete -c falcon -n "__fish_falcon_using_subcommand failover; and __fish_seen_subcommand_from resync" -s q -l quiet -d 'Only errors on standard error'
complete -c falcon -n "__fish_falcon_using_subcommand failover; and __fish_seen_subcommand_from resync" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c falcon -n "__fish_falcon_using_subcommand failover; and __fish_seen_subcommand_from resync" -s V -l version -d 'Print version'
complete -c falcon -n "__fish_falcon_using_subcommand failover; and __fish_seen_subcommand_from drill" -l config -d 'A cluster the operator started on this host (its replicas run redis-server); without it the drill starts its own 3-replica Redis cluster on 127.0.0.1 and removes it afterwards' -r -F
complete -c falcon -n "__fish_falcon_using_subcommand failover; and __fish_seen_subcommand_from drill" -l kill -d 'Which replica each round kills' -r -f -a "leader\t'The leader: a real failover'
follower\t'A follower: the service must not notice'
random\t'Either, at random'"
complete -c falcon -n "__fish_falcon_using_subcommand failover; and __fish_seen_subcommand_from drill" -l rounds -d 'Rounds' -r
complete -c falcon -n "__fish_falcon_using_subcommand failover; and __fish_seen_subcommand_from drill" -l election-timeout -d 'The drill\'s own cluster: its election timeout' -r
complete -c falcon -n "__fish_falcon_using_subcommand failover; and __fish_seen_subcommand_from drill" -l clients -d 'Checker connections writing during the drill' -r
complete -c falcon -n "__fish_falcon_using_subcommand failover; and __fish_seen_subcommand_from drill" -l rate -d 'Writes per second the checker connections send together, at most (0: as fast as the cluster answers). Headroom matters: a replica that restarts replays the log into its program and must apply faster than the cluster commits to catch up' -r
complete -c falcon -n "__fish_falcon_using_subcommand failover; and __fish_seen_subcommand_from drill" -l settle -d 'Load before each kill' -r
complete -c falcon -n "__fish_falcon_using_subcommand failover; and __fish_seen_subcommand_from drill" -l round-timeout -d 'A round that has not recovered after this long fails (a restarted replica replays the whole log into a fresh program: this grows with the log)' -r
complete -c falcon -n "__fish_falcon_using_subcommand failover; and __fish_seen_subcommand_from drill" -l color -d 'When to use colour' -r -f -a "auto\t'When standard output is a terminal and `NO_COLOR` is not set'
always\t'Always'
never\t'Never'"
complete -c falcon -n "__fish_falcon_using_subcommand failover; and __fish_seen_subcommand_from drill" -l keep -d 'The drill\'s own cluster: keep its directory (logs, data) afterwards, and its replicas running when a round fails'
complete -c falcon -n "__fish_falcon_using_subcommand failover; and __fish_seen_subcommand_from drill" -l json -d 'Machine-readable output (JSON; JSON Lines for record streams)'
complete -c falcon -n "__fish_falcon_using_subcommand failover; and __fish_seen_subcommand_from drill" -s v -l verbose -d 'More detail on standard error (repeat for more)'
complete -c falcon -n "__fish_falcon_using_subcommand failover; and __fish_seen_subcommand_from drill" -s q -l quiet -d 'Only errors on standard error'
complete -c falcon -n "__fish_falcon_using_subcommand failover; and __fish_seen_subcommand_from drill" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c falcon -n "__fish_falcon_using_subcommand failover; and __fish_seen_subcommand_from drill" -s V -l version -d 'Print version'
complete -c falcon -n "__fish_falcon_using_subcommand failover; and __fish_seen_subcommand_from help" -f -a "status" -d 'A table of the replicas: role, view, ops, lag, links, program, log size, uptime'
complete -c falcon -n "__fish_falcon_using_subcommand failover; and __fish_seen_subcommand_from help" -f -a "transfer" -d 'Hand the leadership to another replica (planned failover)'
complete -c falcon -n "__fish_falcon_using_subcommand failover; and __fish_seen_subcommand_from help" -f -a "resync" -d 'Rebuild a replica\'s program from its initial state and the log, and check it against the leader\'s'
complete -c falcon -n "__fish_falcon_using_subcommand failover; and __fish_seen_subcommand_from help" -f -a "drill" -d 'Kill replicas under load, round after round, and measure the failovers'
complete -c falcon -n "__fish_falcon_using_subcommand failover; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c falcon -n "__fish_falcon_using_subcommand generate" -l out -d 'Output directory' -r -F
complete -c falcon -n "__fish_falcon_using_subcommand generate" -l color -d 'When to use colour' -r -f -a "auto\t'When standard output is a terminal and `NO_COLOR` is not set'
always\t'Always'
never\t'Never'"
complete -c falcon -n "__fish_falcon_using_subcommand generate" -l json -d 'Machine-readable output (JSON; JSON Lines for record streams)'
complete -c falcon -n "__fish_falcon_using_subcommand generate" -s v -l verbose -d 'More detail on standard error (repeat for more)'
complete -c falcon -n "__fish_falcon_using_subcommand generate" -s q -l quiet -d 'Only errors on standard error'
complete -c falcon -n "__fish_falcon_using_subcommand generate" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c falcon -n "__fish_falcon_using_subcommand generate" -s V -l version -d 'Print version'
complete -c falcon -n "__fish_falcon_using_subcommand make-fixtures" -l out -d 'Output directory' -r -F
complete -c falcon -n "__fish_falcon_using_subcommand make-fixtures" -l color -d 'When to use colour' -r -f -a "auto\t'When standard output is a terminal and `NO_COLOR` is not set'
always\t'Always'
never\t'Never'"
complete -c falcon -n "__fish_falcon_using_subcommand make-fixtures" -l json -d 'Machine-readable output (JSON; JSON Lines for record streams)'
complete -c falcon -n "__fish_falcon_using_subcommand make-fixtures" -s v -l verbose -d 'More detail on standard error (repeat for more)'
complete -c falcon -n "__fish_falcon_using_subcommand make-fixtures" -s q -l quiet -d 'Only errors on standard error'
complete -c falcon -n "__fish_falcon_using_subcommand make-fixtures" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c falcon -n "__fish_falcon_using_subcommand make-fixtures" -s V -l version -d 'Print version'
complete -c falcon -n "__fish_falcon_using_subcommand help; and not __fish_seen_subcommand_from replicate tap-attach bench log-inspect failover generate make-fixtures help" -f -a "replicate" -d 'Run a server program as one replica of a cluster'
complete -c falcon -n "__fish_falcon_using_subcommand help; and not __fish_seen_subcommand_from replicate tap-attach bench log-inspect failover generate make-fixtures help" -f -a "tap-attach" -d 'Replicate a QEMU virtual machine by ordering its inbound frames'
complete -c falcon -n "__fish_falcon_using_subcommand help; and not __fish_seen_subcommand_from replicate tap-attach bench log-inspect failover generate make-fixtures help" -f -a "bench" -d 'Measure the log, round trips and consensus, beside their baselines'
complete -c falcon -n "__fish_falcon_using_subcommand help; and not __fish_seen_subcommand_from replicate tap-attach bench log-inspect failover generate make-fixtures help" -f -a "log-inspect" -d 'Read, verify, follow and export a replica\'s log'
complete -c falcon -n "__fish_falcon_using_subcommand help; and not __fish_seen_subcommand_from replicate tap-attach bench log-inspect failover generate make-fixtures help" -f -a "failover" -d 'Cluster status, planned leadership transfer, failure drills'
complete -c falcon -n "__fish_falcon_using_subcommand help; and not __fish_seen_subcommand_from replicate tap-attach bench log-inspect failover generate make-fixtures help" -f -a "generate" -d 'Write the man pages and shell completions (for packagers)'
complete -c falcon -n "__fish_falcon_using_subcommand help; and not __fish_seen_subcommand_from replicate tap-attach bench log-inspect failover generate make-fixtures help" -f -a "make-fixtures" -d 'Write the fixture logs under fixtures/ (for falcon\'s own tests)'
complete -c falcon -n "__fish_falcon_using_subcommand help; and not __fish_seen_subcommand_from replicate tap-attach bench log-inspect failover generate make-fixtures help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c falcon -n "__fish_falcon_using_subcommand help; and __fish_seen_subcommand_from failover" -f -a "status" -d 'A table of the replicas: role, view, ops, lag, links, program, log size, uptime'
complete -c falcon -n "__fish_falcon_using_subcommand help; and __fish_seen_subcommand_from failover" -f -a "transfer" -d 'Hand the leadership to another replica (planned failover)'
complete -c falcon -n "__fish_falcon_using_subcommand help; and __fish_seen_subcommand_from failover" -f -a "resync" -d 'Rebuild a replica\'s program from its initial state and the log, and check it against the leader\'s'
complete -c falcon -n "__fish_falcon_using_subcommand help; and __fish_seen_subcommand_from failover" -f -a "drill" -d 'Kill replicas under load, round after round, and measure the failovers'
