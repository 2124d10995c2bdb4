//! The fixture logs under `fixtures/logs/`, made by `falcon make-fixtures --out fixtures`.
//!
//! Every byte is deterministic (fixed clock, fixed content), so a test can
//! regenerate them and compare.

use std::path::{Path, PathBuf};

use super::format::{self, Entry, Kind};
use super::scan;
use super::{Clock, FsStorage, LogError, LogOptions, LogView, SegmentLog};

/// Cluster id of the fixture logs.
pub const CLUSTER: u64 = 0xfa1c_0de5_0000_0001;
/// 2026-01-01T00:00:00Z in ns.
pub const T0: u64 = 1_767_225_600_000_000_000;

fn resp(args: &[&[u8]]) -> Vec<u8> {
    let mut v = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        v.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        v.extend_from_slice(a);
        v.extend_from_slice(b"\r\n");
    }
    v
}

/// The entries of the clean fixture: two Redis clients in view 1, a view
/// change (the new leader's Noop and a Close for the connection still open),
/// and a third client in view 2.
pub fn redis_session() -> Vec<Entry> {
    let big = vec![b'v'; 3000];
    let plan: Vec<(u64, Kind, u64, Vec<u8>)> = vec![
        (1, Kind::Noop, 0, vec![]),
        (1, Kind::Open, 1, vec![]),
        (1, Kind::Data, 1, resp(&[b"SET", b"greeting", b"hello"])),
        (1, Kind::Open, 2, vec![]),
        (1, Kind::Data, 2, resp(&[b"GET", b"greeting"])),
        (1, Kind::Data, 1, resp(&[b"INCR", b"visits"])),
        (1, Kind::Data, 1, resp(&[b"SET", b"blob", &big])),
        (1, Kind::Data, 2, resp(&[b"INCR", b"visits"])),
        (1, Kind::Close, 1, vec![]),
        (1, Kind::Data, 2, resp(&[b"PING"])),
        (2, Kind::Noop, 0, vec![]),
        (2, Kind::Close, 2, vec![]),
        (2, Kind::Open, 3, vec![]),
        (
            2,
            Kind::Data,
            3,
            resp(&[b"LPUSH", b"queue", b"job-1", b"job-2"]),
        ),
        (
            2,
            Kind::Data,
            3,
            resp(&[b"HSET", b"user:1", b"name", b"ada"]),
        ),
        (2, Kind::Data, 3, resp(&[b"GET", b"greeting"])),
        (2, Kind::Data, 3, resp(&[b"INCR", b"visits"])),
        (2, Kind::Data, 3, resp(&[b"RPOP", b"queue"])),
        (2, Kind::Data, 3, resp(&[b"DEL", b"blob"])),
        (2, Kind::Close, 3, vec![]),
    ];
    plan.into_iter()
        .enumerate()
        .map(|(i, (view, kind, conn, payload))| {
            let op = i as u64 + 1;
            let gap = if view == 2 { 1_200_000_000 } else { 0 };
            Entry {
                view,
                op,
                kind,
                conn,
                time_ns: T0 + op * 1_500_000 + gap,
                payload: payload.into(),
            }
        })
        .collect()
}

fn arp(request: bool) -> Vec<u8> {
    let (dst, src, op, sha, tha) = if request {
        (
            [0xff; 6],
            [0x52, 0x54, 0, 0x12, 0x34, 0x01],
            1u16,
            [0x52, 0x54, 0, 0x12, 0x34, 0x01],
            [0u8; 6],
        )
    } else {
        (
            [0x52, 0x54, 0, 0x12, 0x34, 0x01],
            [0x52, 0x54, 0, 0x12, 0x34, 0x02],
            2u16,
            [0x52, 0x54, 0, 0x12, 0x34, 0x02],
            [0x52, 0x54, 0, 0x12, 0x34, 0x01],
        )
    };
    let (spa, tpa) = if request {
        ([10, 0, 2, 2], [10, 0, 2, 15])
    } else {
        ([10, 0, 2, 15], [10, 0, 2, 2])
    };
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&sha);
    f.extend_from_slice(&spa);
    f.extend_from_slice(&tha);
    f.extend_from_slice(&tpa);
    f.resize(60, 0);
    f
}

/// The entries of the VM fixture: inbound Ethernet frames.
pub fn vm_frames() -> Vec<Entry> {
    let syn = crate::capture::tcp_frame(&crate::capture::TcpFrame {
        src_mac: [0x52, 0x54, 0, 0x12, 0x34, 0x01],
        dst_mac: [0x52, 0x54, 0, 0x12, 0x34, 0x02],
        src_ip: [10, 0, 2, 2],
        dst_ip: [10, 0, 2, 15],
        sport: 51000,
        dport: 22,
        seq: 1,
        ack: 0,
        flags: 0x02,
        ip_id: 7,
        data: &[],
    });
    let frames = [vec![], arp(true), arp(false), syn];
    frames
        .into_iter()
        .enumerate()
        .map(|(i, f)| Entry {
            view: 1,
            op: i as u64 + 1,
            kind: if i == 0 { Kind::Noop } else { Kind::Frame },
            conn: 0,
            time_ns: T0 + i as u64 * 1_000_000,
            payload: f.into(),
        })
        .collect()
}

fn write_log(dir: &Path, entries: &[Entry]) -> Result<(), LogError> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| LogError::io(dir.display().to_string(), e))?;
    }
    let storage =
        FsStorage::new(dir, true).map_err(|e| LogError::io(dir.display().to_string(), e))?;
    let opts = LogOptions {
        segment_bytes_max: 2048,
        clock: Clock::fixed(T0),
        // The committed fixtures stay byte-exact and small: no zero tails.
        preallocate_bytes: 0,
        ..LogOptions::new(CLUSTER, 1)
    };
    let (mut log, _) = SegmentLog::open(storage, opts)?;
    log.append(entries)?;
    log.sync()?;
    drop(log);
    std::fs::remove_file(dir.join("LOCK")).map_err(|e| LogError::io("removing LOCK", e))?;
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    if to.exists() {
        std::fs::remove_dir_all(to)?;
    }
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        std::fs::copy(e.path(), to.join(e.file_name()))?;
    }
    Ok(())
}

/// Where a record lies: (segment file, offset, encoded length).
fn locate(dir: &Path, op: u64) -> Result<(PathBuf, u64, usize), LogError> {
    let view = LogView::open_dir(dir)?;
    let mut at = None;
    view.scan(
        op,
        |seen| {
            at = Some((dir.join(seen.segment), seen.offset, seen.raw.len()));
            Ok(false)
        },
        |_| {},
    )?;
    at.ok_or(LogError::OutOfRange {
        op,
        first: 0,
        last: 0,
    })
}

/// Writes every fixture under `out/logs/`; returns the directories written.
pub fn write_all(out: &Path) -> Result<Vec<PathBuf>, LogError> {
    let logs = out.join("logs");
    let io = |p: &Path| {
        let p = p.display().to_string();
        move |e| LogError::io(p.clone(), e)
    };
    let session = redis_session();

    let clean = logs.join("clean");
    write_log(&clean, &session)?;

    // torn-tail: one more record, cut in the middle as a crash would.
    let torn = logs.join("torn-tail");
    let mut more = session.clone();
    more.push(Entry {
        view: 2,
        op: session.len() as u64 + 1,
        kind: Kind::Data,
        conn: 4,
        time_ns: T0 + 2_000_000_000,
        payload: resp(&[b"SET", b"lost", b"never acknowledged"]).into(),
    });
    write_log(&torn, &more)?;
    let (seg, offset, len) = locate(&torn, more.len() as u64)?;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .map_err(io(&seg))?;
    f.set_len(offset + len as u64 / 2).map_err(io(&seg))?;

    // corrupt-middle: one flipped bit in the payload of op 7 (bit rot).
    let corrupt = logs.join("corrupt-middle");
    write_log(&corrupt, &session)?;
    let (seg, offset, _) = locate(&corrupt, 7)?;
    let mut bytes = std::fs::read(&seg).map_err(io(&seg))?;
    bytes[offset as usize + format::RECORD_HEADER_LEN + 40] ^= 0x04;
    std::fs::write(&seg, bytes).map_err(io(&seg))?;

    let vm = logs.join("vm-frames");
    write_log(&vm, &vm_frames())?;

    // newer-version: a segment that claims format version 2.
    let newer = logs.join("newer-version");
    copy_dir(&vm, &newer).map_err(io(&newer))?;
    let seg = newer.join(scan::segment_name(1));
    let mut bytes = std::fs::read(&seg).map_err(io(&seg))?;
    bytes[8..10].copy_from_slice(&(format::FORMAT_VERSION + 1).to_le_bytes());
    let crc = crc32c::crc32c(&bytes[0..60]);
    bytes[60..64].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&seg, bytes).map_err(io(&seg))?;

    let not_a_log = logs.join("not-a-log");
    std::fs::create_dir_all(&not_a_log).map_err(io(&not_a_log))?;
    std::fs::write(
        not_a_log.join("notes.txt"),
        "This directory holds no falcon log.\n",
    )
    .map_err(io(&not_a_log))?;

    Ok(vec![clean, torn, corrupt, vm, newer, not_a_log])
}
