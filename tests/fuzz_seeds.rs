//! The committed seeds of the fuzz targets that decode engine messages and
//! log records (fuzz/seeds/TARGET): one valid input of every message type
//! and record kind, so that a bounded fuzz run starts past the magic and the
//! lengths instead of rediscovering them. They are made here from the
//! encoders and must stay current: after a format change, run
//! `FALCON_WRITE_FUZZ_SEEDS=1 cargo test --test fuzz_seeds`.

use std::path::PathBuf;

use bytes::Bytes;
use falcon::consensus::{Envelope, Message, message};
use falcon::log::{Entry, Kind, format};

fn entry(op: u64, kind: Kind, payload: &[u8]) -> Entry {
    Entry {
        view: 2,
        op,
        kind,
        conn: 7,
        time_ns: 1_700_000_000_000_000_000 + op,
        payload: Bytes::copy_from_slice(payload),
    }
}

fn entries() -> Vec<Entry> {
    vec![
        entry(5, Kind::Open, b""),
        entry(6, Kind::Data, b"*1\r\n$4\r\nPING\r\n"),
        entry(7, Kind::Close, b""),
        entry(8, Kind::Frame, &[0xff; 60]),
        entry(9, Kind::Noop, b""),
        entry(
            10,
            Kind::Digest,
            &falcon::node::divergence::Chunk {
                conn: 7,
                end: 16384,
                len: 16384,
                hash: 0x0123_4567_89ab_cdef,
                last: false,
                chunk_size: 16384,
            }
            .encode(),
        ),
    ]
}

fn messages() -> Vec<(&'static str, Message)> {
    let (view, commit) = (2, 4);
    vec![
        (
            "prepare",
            Message::Prepare {
                view,
                op_start: 5,
                entries: entries(),
                commit,
            },
        ),
        (
            "start_view",
            Message::StartView {
                view,
                op_start: 5,
                entries: entries(),
                commit,
                last_op: 5 + entries().len() as u64 - 1,
            },
        ),
        (
            "catch_up",
            Message::CatchUp {
                view,
                op_start: 5,
                entries: entries(),
                commit,
            },
        ),
        ("prepare_ok", Message::PrepareOk { view, op: 9 }),
        ("commit", Message::Commit { view, commit }),
        ("missing", Message::Missing { view, from: 5 }),
        ("start_view_change", Message::StartViewChange { view }),
        (
            "do_view_change",
            Message::DoViewChange {
                view,
                log_view: 1,
                last_op: 9,
                commit,
                op_start: 5,
                entries: entries(),
            },
        ),
        (
            "request_do_view_change",
            Message::RequestDoViewChange { view, from: 5 },
        ),
        ("newer_view", Message::NewerView { view }),
        ("view_probe", Message::ViewProbe { view }),
        ("view_probe_ok", Message::ViewProbeOk { view }),
        ("need_snapshot", Message::NeedSnapshot { view, op: 4 }),
        (
            "snapshot_request",
            Message::SnapshotRequest {
                view,
                op: 4,
                offset: 0,
            },
        ),
        (
            "snapshot_chunk",
            Message::SnapshotChunk {
                view,
                op: 4,
                offset: 0,
                total: 16,
                data: Bytes::from_static(b"0123456789abcdef"),
            },
        ),
        (
            "link_setup",
            Message::LinkSetup {
                view,
                data: Bytes::from_static(&[1, 2, 3, 4]),
            },
        ),
        ("recover", Message::Recover { view: 0, nonce: 42 }),
        (
            "recover_ok",
            Message::RecoverOk {
                view,
                nonce: 42,
                last_op: 9,
                flags: 2,
            },
        ),
    ]
}

/// (target, file name, bytes) of every seed.
fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    for (name, msg) in messages() {
        let env = Envelope {
            cluster: 0x7e57,
            from: 1,
            to: 0,
            msg,
        };
        let bytes = message::to_bytes(&env);
        assert_eq!(message::decode(&bytes).unwrap(), env, "{name} round-trips");
        out.push(("engine_message", name.to_string(), bytes));
    }
    let mut prev = 0;
    for e in entries() {
        let mut bytes = Vec::new();
        prev = format::encode_record(&e, prev, &mut bytes);
        let (_, decoded) = format::decode_entry(&bytes).unwrap();
        assert_eq!(decoded, e);
        out.push((
            "record_decoder",
            format!("{:?}", e.kind).to_lowercase(),
            bytes,
        ));
    }
    out
}

#[test]
fn committed_fuzz_seeds_are_current() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    let write = std::env::var_os("FALCON_WRITE_FUZZ_SEEDS").is_some();
    for (target, name, bytes) in seeds() {
        let path = root.join(target).join(&name);
        if write {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &bytes).unwrap();
        }
        let committed = std::fs::read(&path).unwrap_or_default();
        assert!(
            committed == bytes,
            "{} is stale or missing: run FALCON_WRITE_FUZZ_SEEDS=1 cargo test --test fuzz_seeds",
            path.display()
        );
    }
}
