//! The commit point a replica saves beside its log now and then: an op it
//! knows committed, and the view of its entry there. A restarted replica
//! that finds it (and finds that op, with that view, in its log) knows
//! everything up to it is committed without asking anyone, so it
//!
//! * replays those entries into its program straight from the log while
//!   the cluster elects a leader, and keeps only the uncommitted tail in
//!   memory (not the whole log);
//! * offers only that tail in the view change: a cluster restarted at once
//!   moves kilobytes between replicas where it moved every log whole.
//!
//! The file is written lazily (a new file renamed into place, at most once
//! a second, and at a clean stop): after a crash it may be older than the
//! replica's real commit point, which is safe, since any op once committed
//! stays committed. It never names an op past what the log had on disk
//! when it was written. A file that is missing, unreadable or does not
//! match the log is only a lost shortcut: the replica then learns its
//! commit point from the view change, as without it.

use std::io::{self, Write};
use std::path::Path;

/// The file, in the replica's data directory (beside `log/`).
pub const FILE_NAME: &str = "commit";

/// A committed op, as saved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommitPoint {
    /// The cluster the log belongs to.
    pub cluster_id: u64,
    /// The replica that saved it.
    pub node_id: u32,
    /// An op known committed.
    pub op: u64,
    /// The view of the entry at `op` (the log's entry there must have it).
    pub view: u64,
}

/// The file's contents.
pub fn render(cp: &CommitPoint) -> String {
    format!(
        "falcon-commit 1 cluster={:#x} node={} op={} view={}\n",
        cp.cluster_id, cp.node_id, cp.op, cp.view
    )
}

/// Parses [`render`]'s output (None: not a commit point, e.g. a file a
/// crash left empty).
pub fn parse(text: &str) -> Option<CommitPoint> {
    let mut it = text.split_whitespace();
    if it.next()? != "falcon-commit" || it.next()? != "1" {
        return None;
    }
    let mut field = |name: &str| -> Option<String> {
        let kv = it.next()?;
        kv.strip_prefix(name)?.strip_prefix('=').map(str::to_string)
    };
    let cluster_id = u64::from_str_radix(field("cluster")?.strip_prefix("0x")?, 16).ok()?;
    let node_id = field("node")?.parse().ok()?;
    let op = field("op")?.parse().ok()?;
    let view = field("view")?.parse().ok()?;
    Some(CommitPoint {
        cluster_id,
        node_id,
        op,
        view,
    })
}

/// Writes the commit point: a new file renamed into place. Synced only
/// when `durable` (at a clean stop); between, an older file after a crash
/// is as good, only less far.
pub fn write(data_dir: &Path, cp: &CommitPoint, durable: bool) -> io::Result<()> {
    let tmp = data_dir.join("commit.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(render(cp).as_bytes())?;
    if durable {
        f.sync_all()?;
    }
    std::fs::rename(&tmp, data_dir.join(FILE_NAME))?;
    if durable {
        std::fs::File::open(data_dir)?.sync_all()?;
    }
    Ok(())
}

/// Reads the commit point in `data_dir`: None when there is none; an
/// error says why one is unusable.
pub fn read(data_dir: &Path) -> Result<Option<CommitPoint>, String> {
    let path = data_dir.join(FILE_NAME);
    match std::fs::read_to_string(&path) {
        Ok(text) => parse(&text)
            .map(Some)
            .ok_or_else(|| format!("{}: not a falcon commit point", path.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// The op a restarted replica may take as committed, from its saved
/// commit point: `cp.op` when it is this replica's, within `first..=last`
/// of its log, and the log's entry there has the saved view
/// (`view_at(op)`). Else why not (the replica then takes only what it knew
/// without it).
pub fn check(
    cp: &CommitPoint,
    owner: (u64, u32),
    first: u64,
    last: u64,
    view_at: impl FnOnce(u64) -> Option<u64>,
) -> Result<u64, String> {
    if (cp.cluster_id, cp.node_id) != owner {
        return Err(format!(
            "it is replica {}'s of cluster {:#x}, not this one's",
            cp.node_id, cp.cluster_id
        ));
    }
    if cp.op < first || cp.op > last {
        return Err(format!(
            "it names op {}, outside the log's ops {first}..={last}",
            cp.op
        ));
    }
    match view_at(cp.op) {
        Some(v) if v == cp.view => Ok(cp.op),
        Some(v) => Err(format!(
            "the log's op {} is of view {v}, not of view {} as saved",
            cp.op, cp.view
        )),
        None => Err(format!("the log's op {} cannot be read", cp.op)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_point_reads_back_and_is_checked_against_the_log() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()).unwrap(), None);
        let cp = CommitPoint {
            cluster_id: 0xfa1c,
            node_id: 2,
            op: 300,
            view: 4,
        };
        write(dir.path(), &cp, false).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Some(cp));
        write(dir.path(), &cp, true).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Some(cp));
        let owner = (0xfa1c, 2);
        assert_eq!(check(&cp, owner, 1, 400, |_| Some(4)), Ok(300));
        assert!(
            check(&cp, (0xfa1c, 3), 1, 400, |_| Some(4))
                .unwrap_err()
                .contains("replica 2's")
        );
        assert!(
            check(&cp, owner, 1, 299, |_| Some(4))
                .unwrap_err()
                .contains("outside")
        );
        assert!(
            check(&cp, owner, 301, 400, |_| Some(4))
                .unwrap_err()
                .contains("outside")
        );
        assert!(
            check(&cp, owner, 1, 400, |_| Some(5))
                .unwrap_err()
                .contains("view 5")
        );
        assert!(
            check(&cp, owner, 1, 400, |_| None)
                .unwrap_err()
                .contains("cannot be read")
        );
        // What a crash can leave: an empty or cut file.
        for junk in ["", "falcon-commit 1 cluster=0xfa1c node=2 op=3", "garbage"] {
            std::fs::write(dir.path().join(FILE_NAME), junk).unwrap();
            assert!(read(dir.path()).is_err(), "{junk:?}");
        }
    }
}
