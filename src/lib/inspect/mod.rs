//! `falcon log-inspect`: the operator's view of a replica's log directory.
//!
//! Read-only and lock-free: it can run while the replica appends.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::capture::{PcapError, PcapWriter, TcpSynth};
use crate::log::format::{Kind, RECORD_HEADER_LEN, RecordHeader, SegmentHeader};
use crate::log::scan::Seen;
use crate::log::{FollowEvent, FsStorage, LogError, LogView, TornTail};
use crate::output::{self, Status, Ui};

/// Arguments of `falcon log-inspect`.
#[derive(Clone, Debug, clap::Args)]
#[command(after_help = EXAMPLES)]
pub struct LogInspectArgs {
    /// The log directory (or a replica's data directory holding `log/`).
    pub path: PathBuf,

    /// One row per record: op, view, kind, connection, bytes, time and a preview of the payload.
    #[arg(long, group = "mode")]
    pub entries: bool,

    /// The summary (the default); with --json, as one JSON object.
    #[arg(long, group = "mode")]
    pub summary: bool,

    /// A full hex dump of the record with this op.
    #[arg(long, value_name = "OP", group = "mode")]
    pub hex: Option<u64>,

    /// Check every checksum and the hash chain; exit 1 with the file and byte offset of the first bad record.
    #[arg(long, group = "mode")]
    pub verify: bool,

    /// With --verify: a torn tail (a write cut short by a crash) also fails.
    #[arg(long, requires = "verify")]
    pub strict: bool,

    /// Print records as a running replica appends them, until Ctrl-C.
    #[arg(long, group = "mode")]
    pub follow: bool,

    /// How often --follow looks for new records.
    #[arg(long, value_name = "DURATION", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub interval: Duration,

    /// Write Open/Data/Close records as TCP/IP flows (and Frame records as they are) to a pcap file.
    #[arg(long, value_name = "FILE", group = "mode")]
    pub export_pcap: Option<PathBuf>,

    /// The server port of the flows in --export-pcap, so analysers decode the protocol.
    #[arg(long, value_name = "PORT", default_value_t = 6379)]
    pub pcap_port: u16,

    /// Only records with op >= OP.
    #[arg(long, value_name = "OP")]
    pub from: Option<u64>,

    /// Only records with op <= OP.
    #[arg(long, value_name = "OP")]
    pub to: Option<u64>,

    /// Only records of this connection.
    #[arg(long, value_name = "ID")]
    pub conn: Option<u64>,

    /// Only records of this kind (repeat for several): open, data, close, frame, noop.
    #[arg(long, value_name = "KIND", value_parser = parse_kind)]
    pub kind: Vec<Kind>,

    /// Stop after this many records.
    #[arg(long, value_name = "N")]
    pub limit: Option<u64>,
}

const EXAMPLES: &str = "\
Examples:
  falcon log-inspect data/1/log                       summary table
  falcon log-inspect data/1 --entries --from 100 --to 200
  falcon log-inspect data/1/log --entries --conn 7 --kind data
  falcon log-inspect data/1/log --json                one JSON object per record
  falcon log-inspect data/1/log --summary --json      the summary as JSON
  falcon log-inspect data/1/log --hex 42              full dump of op 42
  falcon log-inspect data/1/log --verify              exit 0 clean, 1 corrupt
  falcon log-inspect data/1/log --follow              tail a running replica
  falcon log-inspect data/1/log --export-pcap s.pcap  open in Wireshark/tcpdump

JSON record fields (stable): op, view, kind, conn, bytes, time_ns, time,
crc, prev, segment, offset, preview, payload_base64.";

fn parse_kind(s: &str) -> Result<Kind, String> {
    Kind::from_name(s)
        .ok_or_else(|| format!("unknown kind {s:?} (expected open, data, close, frame or noop)"))
}

/// Why `log-inspect` failed.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// The log could not be read.
    #[error(transparent)]
    Log(#[from] LogError),
    /// Writing the output failed (a closed pipe is handled by the caller).
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
    /// The pcap file could not be written.
    #[error(transparent)]
    Pcap(#[from] PcapError),
}

impl LogInspectArgs {
    fn wants(&self, h: &RecordHeader) -> bool {
        self.from.is_none_or(|f| h.op >= f)
            && self.to.is_none_or(|t| h.op <= t)
            && self.conn.is_none_or(|c| h.conn == c)
            && (self.kind.is_empty() || self.kind.contains(&h.kind))
    }

    fn past_range(&self, h: &RecordHeader) -> bool {
        self.to.is_some_and(|t| h.op > t)
    }
}

/// Runs `falcon log-inspect`. `stop` ends `--follow` (set it from a Ctrl-C handler).
pub fn run(
    args: &LogInspectArgs,
    ui: &Ui,
    out: &mut dyn Write,
    stop: &AtomicBool,
) -> Result<Status, InspectError> {
    let view = LogView::open_dir(&args.path)?;
    if args.verify {
        verify(args, &view, ui, out)
    } else if let Some(op) = args.hex {
        hex(&view, op, ui, out)
    } else if args.follow {
        follow(args, &view, ui, out, stop)
    } else if let Some(path) = &args.export_pcap {
        export_pcap(args, &view, path, ui, out)
    } else if args.entries || (ui.json && !args.summary) {
        entries(args, &view, ui, out)
    } else {
        summary(&view, ui, out)
    }
}

fn record_json(segment: &str, offset: u64, h: &RecordHeader, payload: &[u8]) -> serde_json::Value {
    json!({
        "op": h.op,
        "view": h.view,
        "kind": h.kind.name(),
        "conn": h.conn,
        "bytes": h.payload_len,
        "time_ns": h.time_ns,
        "time": output::rfc3339(h.time_ns),
        "crc": format!("{:#010x}", h.crc),
        "prev": format!("{:#010x}", h.prev),
        "segment": segment,
        "offset": offset,
        "preview": output::preview(payload, 60),
        "payload_base64": output::base64(payload),
    })
}

/// One record as printed by `--entries` and `--follow`: JSON or a row.
fn record_line(ui: &Ui, segment: &str, offset: u64, h: &RecordHeader, payload: &[u8]) -> String {
    if ui.json {
        record_json(segment, offset, h, payload).to_string()
    } else {
        record_row(h, payload)
    }
}

const ROW_HEADER: &str =
    "      OP   VIEW  KIND    CONN    BYTES  TIME                         PAYLOAD";

fn record_row(h: &RecordHeader, payload: &[u8]) -> String {
    format!(
        "{:>8} {:>6}  {:<5} {:>6} {:>8}  {:<27}  {}",
        h.op,
        h.view,
        h.kind.name(),
        h.conn,
        h.payload_len,
        output::rfc3339(h.time_ns),
        output::preview(payload, 60)
    )
}

/// Reports corruption found part-way: what was printed stays valid.
fn report_scan_error(e: LogError, ui: &Ui) -> Result<Status, InspectError> {
    match e {
        LogError::Corrupt { .. } => {
            ui.error(&e.to_string());
            Ok(Status::Failure)
        }
        other => Err(other.into()),
    }
}

fn warn_torn(torn: &Option<TornTail>, ui: &Ui) {
    if let Some(t) = torn {
        ui.warn(&format!(
            "torn tail: {} at byte offset {} ({} bytes: {}); a crash cut the last write short, \
             and the replica cuts it off when it next starts",
            t.file, t.offset, t.bytes, t.reason
        ));
    }
}

fn entries(
    args: &LogInspectArgs,
    view: &LogView<FsStorage>,
    ui: &Ui,
    out: &mut dyn Write,
) -> Result<Status, InspectError> {
    if !ui.json {
        writeln!(out, "{ROW_HEADER}")?;
    }
    let mut shown = 0u64;
    // A failed write (a closed pipe) stops the scan and is reported as an output error.
    let mut write_error = None;
    let result = view.scan(
        args.from.unwrap_or(0),
        |seen: &Seen<'_>| {
            if args.past_range(seen.header) || args.limit.is_some_and(|l| shown >= l) {
                return Ok(false);
            }
            if args.wants(seen.header) {
                let line = record_line(ui, seen.segment, seen.offset, seen.header, seen.payload());
                if let Err(e) = writeln!(out, "{line}") {
                    write_error = Some(e);
                    return Ok(false);
                }
                shown += 1;
            }
            Ok(true)
        },
        |_| {},
    );
    if let Some(e) = write_error {
        return Err(e.into());
    }
    match result {
        Ok(outcome) => {
            warn_torn(&outcome.torn, ui);
            Ok(Status::Success)
        }
        Err(e) => report_scan_error(e, ui),
    }
}

#[derive(Default)]
struct Stats {
    records: u64,
    first: Option<(u64, u64)>,
    last: Option<(u64, u64)>,
    views: BTreeSet<u64>,
    kinds: BTreeMap<Kind, u64>,
    conns: BTreeSet<u64>,
    first_time: Option<u64>,
    last_time: Option<u64>,
    payload_bytes: u64,
}

impl Stats {
    fn add(&mut self, h: &RecordHeader) {
        self.records += 1;
        if self.first.is_none() {
            self.first = Some((h.view, h.op));
            self.first_time = Some(h.time_ns);
        }
        self.last = Some((h.view, h.op));
        self.last_time = Some(h.time_ns);
        self.views.insert(h.view);
        *self.kinds.entry(h.kind).or_default() += 1;
        if matches!(h.kind, Kind::Open | Kind::Data | Kind::Close) {
            self.conns.insert(h.conn);
        }
        self.payload_bytes += h.payload_len as u64;
    }
}

fn viewstamp(v: Option<(u64, u64)>) -> String {
    v.map(|(view, op)| format!("view {view}, op {op}"))
        .unwrap_or_else(|| "-".into())
}

fn summary(
    view: &LogView<FsStorage>,
    ui: &Ui,
    out: &mut dyn Write,
) -> Result<Status, InspectError> {
    let header: SegmentHeader = view.first_header()?;
    let mut stats = Stats::default();
    let total_bytes = view.total_bytes()?;
    let pb = ui.progress(total_bytes, 256 << 20, "reading");
    let result = view.scan(
        0,
        |seen| {
            stats.add(seen.header);
            Ok(true)
        },
        |n| pb.inc(n),
    );
    pb.finish_and_clear();
    // Bytes of records (and headers), as against the files' length, which
    // includes space the replica preallocated ahead of its writes.
    let mut data_bytes = total_bytes;
    let (segments, torn, problem) = match result {
        Ok(o) => {
            data_bytes = o.data_bytes();
            (o.segments.len(), o.torn, None)
        }
        Err(e @ LogError::Corrupt { .. }) => (
            crate::log::scan::list_segments(view.storage())?.len(),
            None,
            Some(e.to_string()),
        ),
        Err(e) => return Err(e.into()),
    };
    let span = match (stats.first_time, stats.last_time) {
        (Some(a), Some(b)) => Some(Duration::from_nanos(b.saturating_sub(a))),
        _ => None,
    };
    let state = match (&problem, &torn) {
        (Some(p), _) => format!("CORRUPT: {p}"),
        (None, Some(t)) => format!(
            "torn tail at {}:{} ({} bytes; cut at next start)",
            t.file, t.offset, t.bytes
        ),
        (None, None) => "clean".into(),
    };
    if ui.json {
        let kinds: serde_json::Map<String, serde_json::Value> = stats
            .kinds
            .iter()
            .map(|(k, n)| (k.name().to_string(), json!(n)))
            .collect();
        output::json_line(
            out,
            &json!({
                "path": view.storage().path().display().to_string(),
                "cluster_id": format!("{:#x}", header.cluster_id),
                "node_id": header.node_id,
                "format_version": header.version,
                "segments": segments,
                "records": stats.records,
                "first_op": stats.first.map(|v| v.1),
                "last_op": stats.last.map(|v| v.1),
                "first_view": stats.first.map(|v| v.0),
                "last_view": stats.last.map(|v| v.0),
                "views": stats.views.len(),
                "bytes": data_bytes,
                "file_bytes": total_bytes,
                "payload_bytes": stats.payload_bytes,
                "kinds": kinds,
                "connections": stats.conns.len(),
                "first_time": stats.first_time.map(output::rfc3339),
                "last_time": stats.last_time.map(output::rfc3339),
                "span_ns": span.map(|d| d.as_nanos() as u64),
                "state": if problem.is_some() { "corrupt" } else if torn.is_some() { "torn-tail" } else { "clean" },
                "torn_tail": torn,
                "error": problem,
            }),
        )?;
    } else {
        let mut t = ui.table();
        t.set_header(vec!["log", &view.storage().path().display().to_string()]);
        let kinds = Kind::ALL
            .iter()
            .map(|k| format!("{} {}", k.name(), stats.kinds.get(k).copied().unwrap_or(0)))
            .collect::<Vec<_>>()
            .join(", ");
        let rows: Vec<(&str, String)> = vec![
            (
                "cluster / node",
                format!("{:#x} / {}", header.cluster_id, header.node_id),
            ),
            ("format", format!("version {}", header.version)),
            ("segments", segments.to_string()),
            ("records", stats.records.to_string()),
            ("first viewstamp", viewstamp(stats.first)),
            ("last viewstamp", viewstamp(stats.last)),
            ("views", stats.views.len().to_string()),
            (
                "bytes",
                format!(
                    "{} ({} payload{})",
                    output::human_bytes(data_bytes),
                    output::human_bytes(stats.payload_bytes),
                    if total_bytes > data_bytes {
                        format!(
                            "; {} on disk with the space reserved ahead",
                            output::human_bytes(total_bytes)
                        )
                    } else {
                        String::new()
                    }
                ),
            ),
            ("kinds", kinds),
            ("connections seen", stats.conns.len().to_string()),
            (
                "time span",
                match (stats.first_time, stats.last_time, span) {
                    (Some(a), Some(b), Some(d)) => format!(
                        "{} → {} ({})",
                        output::rfc3339(a),
                        output::rfc3339(b),
                        humantime::format_duration(Duration::from_millis(d.as_millis() as u64))
                    ),
                    _ => "-".into(),
                },
            ),
            (
                "state",
                if problem.is_some() {
                    ui.bad(&state)
                } else if torn.is_some() {
                    state.clone()
                } else {
                    ui.good(&state)
                },
            ),
        ];
        for (k, v) in rows {
            t.add_row(vec![k.to_string(), v]);
        }
        writeln!(out, "{t}")?;
    }
    if let Some(p) = problem {
        ui.error(&p);
        return Ok(Status::Failure);
    }
    Ok(Status::Success)
}

fn verify(
    args: &LogInspectArgs,
    view: &LogView<FsStorage>,
    ui: &Ui,
    out: &mut dyn Write,
) -> Result<Status, InspectError> {
    let total = view.total_bytes()?;
    let pb = ui.progress(total, 64 << 20, "verifying");
    let started = Instant::now();
    let mut records = 0u64;
    let result = view.scan(
        0,
        |_| {
            records += 1;
            Ok(true)
        },
        |n| pb.inc(n),
    );
    pb.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    // (Read: every byte of the files, the zeros reserved ahead included.)
    let rate = total as f64 / secs.max(1e-9) / 1e9;
    let verified: u64 = match &result {
        Ok(o) => o.data_bytes(),
        Err(_) => total,
    };
    // A replica that stopped cleanly sealed where its log ended.
    let sealed = match crate::log::seal::data_dir_of(&args.path) {
        Some(dir) => crate::log::seal::read(&dir)
            .map_err(|e| LogError::io(format!("reading the seal in {}", dir.display()), e))?,
        None => None,
    };
    // And where it knew its log committed (a restart replays up to it at once).
    let saved_commit = match crate::log::seal::data_dir_of(&args.path) {
        Some(dir) => crate::log::commit_point::read(&dir),
        None => Ok(None),
    };
    let log_end = result
        .as_ref()
        .ok()
        .and_then(|o| o.segments.last())
        .map(|l| l.last_op);
    let commit_note = match (&saved_commit, log_end) {
        (Ok(Some(cp)), Some(last)) if cp.op > last => Some(format!(
            "the saved commit point (op {}) is past the log's end (op {last}): the next start sets it aside and learns its commit point from the cluster",
            cp.op
        )),
        (Ok(Some(cp)), _) => Some(format!(
            "commit point saved at op {} (view {}): the next start replays up to it at once",
            cp.op, cp.view
        )),
        (Err(why), _) => Some(format!("{why}: the next start sets it aside")),
        (Ok(None), _) => None,
    };
    let mut seal_error = None;
    let (ok, segments, torn, error) = match result {
        Ok(o) => {
            if let (Some(seal), Some(last)) = (&sealed, o.segments.last()) {
                seal_error = crate::log::seal::mismatch(
                    seal,
                    (last.header.cluster_id, last.header.node_id),
                    last.last_op,
                    last.last_crc,
                );
            }
            (
                !(args.strict && o.torn.is_some()) && seal_error.is_none(),
                o.segments.len(),
                o.torn,
                None,
            )
        }
        Err(LogError::Corrupt {
            file,
            offset,
            reason,
        }) => (false, 0, None, Some((file, offset, reason))),
        Err(e) => return Err(e.into()),
    };
    if ui.json {
        output::json_line(
            out,
            &json!({
                "ok": ok,
                "segments": segments,
                "records": records,
                "bytes": verified,
                "file_bytes": total,
                "seconds": secs,
                "gb_per_s": rate,
                "torn_tail": torn,
                "sealed": sealed.is_some(),
                "seal_error": seal_error,
                "commit_point": saved_commit.as_ref().ok().and_then(|c| c.as_ref()).map(|c| json!({"op": c.op, "view": c.view})),
                "commit_point_note": commit_note,
                "error": error.as_ref().map(|(f, o, r)| json!({"file": f, "offset": o, "reason": r})),
            }),
        )?;
    } else if let Some((file, offset, reason)) = &error {
        writeln!(
            out,
            "{} {file} at byte offset {offset}: {reason}",
            ui.bad("CORRUPT")
        )?;
        writeln!(
            out,
            "{records} records before it verified; nothing was changed"
        )?;
    } else {
        writeln!(
            out,
            "{} {records} records in {segments} segments, {} verified in {:.3}s ({rate:.2} GB/s); checksums and hash chain intact",
            if ok { ui.good("ok") } else { ui.bad("FAILED") },
            output::human_bytes(verified),
            secs
        )?;
        if let Some(t) = &torn {
            writeln!(
                out,
                "torn tail: {} at byte offset {} ({} bytes) — cut off when the replica next starts",
                t.file, t.offset, t.bytes
            )?;
        }
        match (&seal_error, &sealed) {
            (Some(reason), _) => writeln!(out, "{} {reason}", ui.bad("SEAL"))?,
            (None, Some(s)) => writeln!(
                out,
                "ends at op {} as sealed when replica {} stopped",
                s.last_op, s.node_id
            )?,
            (None, None) => {}
        }
        if let Some(note) = &commit_note {
            writeln!(out, "{note}")?;
        }
    }
    Ok(if ok { Status::Success } else { Status::Failure })
}

fn hex(
    view: &LogView<FsStorage>,
    op: u64,
    ui: &Ui,
    out: &mut dyn Write,
) -> Result<Status, InspectError> {
    let mut found: Option<(String, u64, RecordHeader, Vec<u8>)> = None;
    let result = view.scan(
        op,
        |seen| {
            if seen.header.op == op {
                found = Some((
                    seen.segment.to_string(),
                    seen.offset,
                    *seen.header,
                    seen.raw.to_vec(),
                ));
            }
            Ok(false)
        },
        |_| {},
    );
    if let Err(e) = result {
        if found.is_none() {
            return report_scan_error(e, ui);
        }
    }
    let Some((segment, offset, h, raw)) = found else {
        ui.error(&format!("op {op} is not in the log"));
        return Ok(Status::Failure);
    };
    if ui.json {
        let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        output::json_line(
            out,
            &json!({
                "op": h.op, "view": h.view, "kind": h.kind.name(), "conn": h.conn, "bytes": h.payload_len,
                "time_ns": h.time_ns, "crc": format!("{:#010x}", h.crc), "prev": format!("{:#010x}", h.prev),
                "segment": segment, "offset": offset, "record_hex": hex,
            }),
        )?;
        return Ok(Status::Success);
    }
    writeln!(
        out,
        "op {} (view {}) in {segment} at byte offset {offset}",
        h.op, h.view
    )?;
    writeln!(
        out,
        "kind {}  conn {}  payload {} bytes  time {}  crc {:#010x}  prev {:#010x}",
        h.kind,
        h.conn,
        h.payload_len,
        output::rfc3339(h.time_ns),
        h.crc,
        h.prev
    )?;
    writeln!(
        out,
        "header: bytes 0..{RECORD_HEADER_LEN}; payload follows; zero padding to 8 bytes"
    )?;
    for (i, chunk) in raw.chunks(16).enumerate() {
        let hexpart: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
        let ascii: String = chunk
            .iter()
            .map(|&b| {
                if (0x20..0x7f).contains(&b) {
                    b as char
                } else {
                    '.'
                }
            })
            .collect();
        writeln!(
            out,
            "{:08x}  {:<47}  |{ascii}|",
            offset + (i * 16) as u64,
            hexpart.join(" ")
        )?;
    }
    Ok(Status::Success)
}

fn follow(
    args: &LogInspectArgs,
    view: &LogView<FsStorage>,
    ui: &Ui,
    out: &mut dyn Write,
    stop: &AtomicBool,
) -> Result<Status, InspectError> {
    let mut f = view.follow(args.from)?;
    if !ui.json {
        writeln!(out, "{ROW_HEADER}")?;
    }
    out.flush()?;
    ui.note("following; Ctrl-C to stop");
    let mut shown = 0u64;
    while !stop.load(Ordering::Relaxed) {
        match f.poll() {
            Ok(Some(FollowEvent::Record {
                segment,
                offset,
                header,
                payload,
            })) => {
                if args.past_range(&header) {
                    return Ok(Status::Success);
                }
                if args.wants(&header) {
                    let line = record_line(ui, &segment, offset, &header, &payload);
                    writeln!(out, "{line}")?;
                    out.flush()?;
                    shown += 1;
                    if args.limit.is_some_and(|l| shown >= l) {
                        return Ok(Status::Success);
                    }
                }
            }
            Ok(Some(FollowEvent::Truncated { after_op })) => {
                if ui.json {
                    output::json_line(out, &json!({"event": "truncated", "after_op": after_op}))?;
                } else {
                    writeln!(
                        out,
                        "-- log truncated after op {after_op} (a view change dropped later entries) --"
                    )?;
                }
                out.flush()?;
            }
            Ok(None) => std::thread::sleep(args.interval),
            Err(e) => return report_scan_error(e, ui),
        }
    }
    Ok(Status::Success)
}

fn export_pcap(
    args: &LogInspectArgs,
    view: &LogView<FsStorage>,
    path: &std::path::Path,
    ui: &Ui,
    out: &mut dyn Write,
) -> Result<Status, InspectError> {
    let mut writer = PcapWriter::create(path)?;
    let mut synth = TcpSynth::new(args.pcap_port);
    let mut conns = BTreeSet::new();
    let mut records = 0u64;
    let result = view.scan(
        args.from.unwrap_or(0),
        |seen| {
            if args.past_range(seen.header) || args.limit.is_some_and(|l| records >= l) {
                return Ok(false);
            }
            if args.wants(seen.header) {
                let h = seen.header;
                if matches!(h.kind, Kind::Open | Kind::Data | Kind::Close) {
                    conns.insert(h.conn);
                }
                for frame in synth.record(h.kind, h.conn, h.time_ns, seen.payload()) {
                    writer.write(&frame);
                }
                records += 1;
            }
            Ok(true)
        },
        |_| {},
    );
    let frames = writer.finish()?;
    let status = match result {
        Ok(o) => {
            warn_torn(&o.torn, ui);
            Status::Success
        }
        Err(e) => report_scan_error(e, ui)?,
    };
    if ui.json {
        output::json_line(
            out,
            &json!({"file": path.display().to_string(), "frames": frames, "records": records, "connections": conns.len(), "server_port": args.pcap_port}),
        )?;
    } else {
        writeln!(
            out,
            "wrote {frames} frames from {records} records ({} connections, server port {}) to {}",
            conns.len(),
            args.pcap_port,
            path.display()
        )?;
    }
    Ok(status)
}
