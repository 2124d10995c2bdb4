//! `falcon bench --log`: the durable log against the disk it runs on.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

use super::stats::{Summary, summarize};
use super::{BenchArgs, BenchError};
use crate::log::format::{Entry, Kind};
use crate::log::{
    FsStorage, GroupCommit, GroupCommitOptions, LogOptions, LogView, SegmentLog, SyncPolicy,
};
use crate::output::{self, Status, Ui};

/// Writer threads in the group-commit test.
pub const GROUP_WRITERS: usize = 4;
/// Records each group-commit writer keeps in flight.
pub const GROUP_WINDOW: usize = 256;

/// One measured line.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Row {
    /// What was measured.
    pub test: String,
    /// Payload bytes per record.
    pub payload: usize,
    /// Records per fdatasync (average for group commit; 0 for no sync).
    pub records_per_sync: f64,
    /// falcon's records per second.
    pub records_per_s: f64,
    /// falcon's payload megabytes per second.
    pub mb_per_s: f64,
    /// falcon's latency from append to durable (or per append call with no sync).
    pub latency: Summary,
    /// The disk's own rate for the same write pattern, in records per second.
    pub disk_records_per_s: f64,
    /// falcon ÷ disk.
    pub ratio: f64,
}

fn entry(op: u64, payload: &[u8]) -> Entry {
    Entry {
        view: 1,
        op,
        kind: Kind::Data,
        conn: op % 64,
        time_ns: op,
        payload: payload.to_vec().into(),
    }
}

fn fresh_log(
    dir: &Path,
    name: &str,
    sync: SyncPolicy,
) -> Result<SegmentLog<FsStorage>, BenchError> {
    let storage = FsStorage::new(dir.join(name), true)?;
    let opts = LogOptions {
        sync,
        ..LogOptions::new(0xbe7c, 1)
    };
    Ok(SegmentLog::open(storage, opts)?.0)
}

/// The disk alone: append `bytes_per_sync` bytes with pwrite, then fdatasync, for `d`.
/// Returns syncs per second and the latency of each write+fdatasync.
fn disk_rate(
    dir: &Path,
    bytes_per_sync: usize,
    sync: bool,
    d: Duration,
) -> Result<(f64, Summary), BenchError> {
    let path = dir.join(format!("disk-{bytes_per_sync}-{sync}"));
    let open = |p: &Path| -> std::io::Result<File> {
        let f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .read(true)
            .open(p)?;
        // Space reserved ahead, as the log reserves it (best effort, as there).
        let _ = crate::log::storage::preallocate(&f, 64 << 20);
        Ok(f)
    };
    settle();
    let mut file = open(&path)?;
    let mut rolled = Vec::new();
    let buf = vec![0x5au8; bytes_per_sync];
    let mut offset = 0u64;
    let mut samples = Vec::new();
    let mut n = 0u64;
    let start = Instant::now();
    while start.elapsed() < d {
        let t = Instant::now();
        file.write_all_at(&buf, offset)?;
        if sync {
            file.sync_data()?;
        }
        samples.push(t.elapsed());
        offset += buf.len() as u64;
        n += 1;
        // Roll over to a new file like the log does, keeping the old one
        // (deleting it would let unsynced pages vanish without write-back).
        if offset >= 64 << 20 {
            drop(file);
            let kept = path.with_extension(format!("{}", rolled.len()));
            std::fs::rename(&path, &kept)?;
            rolled.push(kept);
            file = open(&path)?;
            offset = 0;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    drop(file);
    std::fs::remove_file(&path)?;
    for p in rolled {
        std::fs::remove_file(p)?;
    }
    Ok((n as f64 / secs, summarize(&mut samples)))
}

/// Writes back everything dirty, so one test's leftovers do not slow the next.
fn settle() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

fn record_bytes(payload: usize) -> usize {
    crate::log::format::padded_len(crate::log::format::RECORD_HEADER_LEN + payload)
}

/// Single writer, `per_sync` records per append+sync (0 = policy never, 1024 per append).
fn falcon_single(
    dir: &Path,
    payload: usize,
    per_sync: usize,
    d: Duration,
) -> Result<(f64, Summary), BenchError> {
    let name = format!("log-{payload}-{per_sync}");
    let sync = if per_sync == 0 {
        SyncPolicy::Never
    } else {
        SyncPolicy::Batch
    };
    let mut log = fresh_log(dir, &name, sync)?;
    settle();
    let batch_len = if per_sync == 0 { 1024 } else { per_sync };
    let body = vec![0xa5u8; payload];
    let mut batch: Vec<Entry> = (0..batch_len as u64).map(|i| entry(i + 1, &body)).collect();
    let mut samples = Vec::new();
    let mut records = 0u64;
    let start = Instant::now();
    while start.elapsed() < d {
        let next = log.next_op();
        for (i, e) in batch.iter_mut().enumerate() {
            e.op = next + i as u64;
        }
        let t = Instant::now();
        log.append(&batch)?;
        if per_sync > 0 {
            log.sync()?;
        }
        samples.push(t.elapsed());
        records += batch_len as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    drop(log);
    std::fs::remove_dir_all(dir.join(&name))?;
    Ok((records as f64 / secs, summarize(&mut samples)))
}

/// Many writers share each fdatasync through [`GroupCommit`]. Returns
/// records/s, latency from submit to durable, and the average records per sync.
fn falcon_group(
    dir: &Path,
    payload: usize,
    d: Duration,
) -> Result<(f64, Summary, f64), BenchError> {
    let name = format!("group-{payload}");
    let log = fresh_log(dir, &name, SyncPolicy::Batch)?;
    settle();
    let gc = Arc::new(GroupCommit::start(log, GroupCommitOptions::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    let start = Instant::now();
    for _ in 0..GROUP_WRITERS {
        let gc = gc.clone();
        let stop = stop.clone();
        handles.push(std::thread::spawn(
            move || -> Result<(u64, Vec<Duration>), crate::log::LogError> {
                let body = vec![0x3cu8; payload];
                let mut inflight: VecDeque<(u64, Instant)> = VecDeque::with_capacity(GROUP_WINDOW);
                let mut samples = Vec::new();
                let mut done = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    while inflight.len() < GROUP_WINDOW {
                        let t = Instant::now();
                        let op = gc.submit(1, Kind::Data, 1, 0, body.clone())?;
                        inflight.push_back((op, t));
                    }
                    let (oldest, _) = inflight[0];
                    gc.wait_durable(oldest)?;
                    let durable = gc.durable_op();
                    let now = Instant::now();
                    while let Some(&(op, t)) = inflight.front() {
                        if op > durable {
                            break;
                        }
                        samples.push(now - t);
                        inflight.pop_front();
                        done += 1;
                    }
                }
                Ok((done, samples))
            },
        ));
    }
    std::thread::sleep(d);
    stop.store(true, Ordering::Relaxed);
    let mut records = 0;
    let mut samples = Vec::new();
    for h in handles {
        let (n, s) = h
            .join()
            .map_err(|_| std::io::Error::other("writer thread panicked"))??;
        records += n;
        samples.extend(s);
    }
    let secs = start.elapsed().as_secs_f64();
    let rounds = gc.rounds();
    drop(gc);
    std::fs::remove_dir_all(dir.join(&name))?;
    let per_sync = if rounds == 0 {
        0.0
    } else {
        records as f64 / rounds as f64
    };
    Ok((records as f64 / secs, summarize(&mut samples), per_sync))
}

/// Builds a log of about `mib` MiB and times a full verification over it (warm cache).
fn verify_speed(dir: &Path, payload: usize, mib: u64) -> Result<(f64, u64), BenchError> {
    let name = format!("verify-{payload}");
    let mut log = fresh_log(dir, &name, SyncPolicy::Never)?;
    let body = vec![0x77u8; payload];
    let per = record_bytes(payload) as u64;
    let total_records = (mib << 20) / per;
    let mut op = 1u64;
    while op <= total_records {
        let n = 1024.min(total_records - op + 1);
        let batch: Vec<Entry> = (op..op + n).map(|o| entry(o, &body)).collect();
        log.append(&batch)?;
        op += n;
    }
    log.sync()?;
    drop(log);
    let view = LogView::new(FsStorage::new(dir.join(&name), false)?)?;
    // The records' bytes (not the space reserved past them).
    let bytes = view.scan(0, |_| Ok(true), |_| {})?.data_bytes();
    let mut best = 0f64;
    for _ in 0..3 {
        let t = Instant::now();
        let mut n = 0u64;
        view.scan(
            0,
            |_| {
                n += 1;
                Ok(true)
            },
            |_| {},
        )?;
        assert_eq!(n, total_records, "verification must read every record");
        best = best.max(bytes as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    std::fs::remove_dir_all(dir.join(&name))?;
    Ok((best, bytes))
}

/// Runs the log benchmark and prints the setup and a table (or JSON).
pub fn run(args: &BenchArgs, ui: &Ui, out: &mut dyn Write) -> Result<Status, BenchError> {
    let dir = args
        .dir
        .join(format!("falcon-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let _scratch = super::Scratch(dir.clone());
    let d = args.duration;
    let mut setup = super::setup_lines(Some(&args.dir));
    setup.push((
        "per test".into(),
        format!("{}", humantime::format_duration(d)),
    ));
    setup.push((
        "group commit".into(),
        format!(
            "{GROUP_WRITERS} writer threads x {GROUP_WINDOW} records in flight = {} writers",
            GROUP_WRITERS * GROUP_WINDOW
        ),
    ));
    setup.push((
        "baseline".into(),
        "pwrite of the same bytes per fdatasync, into space reserved ahead with fallocate as the log does, in the same directory".into(),
    ));
    if !ui.json {
        super::print_setup(out, &setup)?;
    }
    let mut rows = Vec::new();
    let tests = 8u64;
    let pb = indicatif::ProgressBar::new(tests);
    if !ui.stderr_tty || ui.quiet {
        pb.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    for payload in [64usize, 4096] {
        let rb = record_bytes(payload);
        pb.set_message(format!("{payload} B, sync never"));
        let (rate, lat) = falcon_single(&dir, payload, 0, d)?;
        let (disk, _) = disk_rate(&dir, rb * 1024, false, d)?;
        rows.push(row(
            "append, sync never (1024/append)",
            payload,
            0.0,
            rate,
            lat,
            disk * 1024.0,
        ));
        pb.inc(1);
        for per_sync in [1usize, 64] {
            pb.set_message(format!("{payload} B, {per_sync} per sync"));
            let (rate, lat) = falcon_single(&dir, payload, per_sync, d)?;
            let (disk, _) = disk_rate(&dir, rb * per_sync, true, d)?;
            rows.push(row(
                &format!("append+sync batch, {per_sync}/sync"),
                payload,
                per_sync as f64,
                rate,
                lat,
                disk * per_sync as f64,
            ));
            pb.inc(1);
        }
        pb.set_message(format!("{payload} B, group commit"));
        let (rate, lat, per_sync) = falcon_group(&dir, payload, d)?;
        let bytes = ((per_sync.max(1.0)) * rb as f64) as usize;
        let (disk, _) = disk_rate(&dir, bytes, true, d)?;
        rows.push(row(
            &format!("group commit, {} writers", GROUP_WRITERS * GROUP_WINDOW),
            payload,
            per_sync,
            rate,
            lat,
            disk * per_sync.max(1.0),
        ));
        pb.inc(1);
    }
    pb.set_message("verify");
    let (verify_4k, bytes_4k) = verify_speed(&dir, 4096, args.verify_mib)?;
    let (verify_64, bytes_64) = verify_speed(&dir, 64, args.verify_mib / 4)?;
    pb.finish_and_clear();
    if ui.json {
        output::json_line(
            out,
            &json!({
                "setup": super::setup_json(&setup),
                "rows": rows,
                "verify": [
                    {"payload": 4096, "bytes": bytes_4k, "gb_per_s": verify_4k},
                    {"payload": 64, "bytes": bytes_64, "gb_per_s": verify_64},
                ],
            }),
        )?;
        return Ok(Status::Success);
    }
    let mut t = ui.table();
    t.set_header(vec![
        "test",
        "record",
        "rec/sync",
        "falcon rec/s",
        "MB/s",
        "p50 µs",
        "p99 µs",
        "disk rec/s",
        "falcon/disk",
    ]);
    for r in &rows {
        t.add_row(vec![
            r.test.clone(),
            format!("{} B", r.payload),
            if r.records_per_sync == 0.0 {
                "-".into()
            } else {
                format!("{:.0}", r.records_per_sync)
            },
            format!("{:.0}", r.records_per_s),
            format!("{:.1}", r.mb_per_s),
            format!("{:.0}", r.latency.p50_us),
            format!("{:.0}", r.latency.p99_us),
            format!("{:.0}", r.disk_records_per_s),
            format!("{:.2}", r.ratio),
        ]);
    }
    writeln!(out, "{t}")?;
    writeln!(
        out,
        "log-inspect --verify: {verify_4k:.2} GB/s over {} of 4 KiB records, {verify_64:.2} GB/s over {} of 64 B records (warm page cache, best of 3)",
        output::human_bytes(bytes_4k),
        output::human_bytes(bytes_64)
    )?;
    writeln!(
        out,
        "latency: per append call for 'sync never'; from submit to durable otherwise"
    )?;
    Ok(Status::Success)
}

fn row(test: &str, payload: usize, per_sync: f64, rate: f64, latency: Summary, disk: f64) -> Row {
    Row {
        test: test.into(),
        payload,
        records_per_sync: per_sync,
        records_per_s: rate,
        mb_per_s: rate * payload as f64 / 1e6,
        latency,
        disk_records_per_s: disk,
        ratio: if disk > 0.0 { rate / disk } else { 0.0 },
    }
}
