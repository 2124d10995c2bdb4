//! The seal a replica leaves beside its log when it stops cleanly: whose log
//! it is and exactly where it ended. At the next start (and in
//! `log-inspect --verify`) a log that no longer ends there — truncated at a
//! record boundary, rolled back to an older copy, or swapped with another
//! replica's while the replica was stopped — is refused by name, where the
//! log alone would look whole. The seal is removed before the replica
//! writes again, so a later crash never meets a stale one.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The seal's file, in the replica's data directory (beside `log/`).
pub const FILE_NAME: &str = "log.seal";

/// Where a stopped log ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seal {
    /// The cluster the log belongs to.
    pub cluster_id: u64,
    /// The replica that wrote it.
    pub node_id: u32,
    /// Its last op.
    pub last_op: u64,
    /// The hash chain's value after the last op.
    pub last_crc: u32,
}

/// The data directory a log path given to `log-inspect` belongs to: the
/// path itself when it holds `log/`, else the log directory's parent.
pub fn data_dir_of(path: &Path) -> Option<PathBuf> {
    if path.join("log").is_dir() {
        Some(path.to_path_buf())
    } else {
        path.parent().map(Path::to_path_buf)
    }
}

/// Writes the seal (durably: a new file renamed into place, then the directory synced).
pub fn write(data_dir: &Path, seal: &Seal) -> io::Result<()> {
    let tmp = data_dir.join("log.seal.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    writeln!(
        f,
        "falcon-log-seal 1 cluster={:#x} node={} last_op={} last_crc={:#010x}",
        seal.cluster_id, seal.node_id, seal.last_op, seal.last_crc
    )?;
    f.sync_all()?;
    std::fs::rename(&tmp, data_dir.join(FILE_NAME))?;
    std::fs::File::open(data_dir)?.sync_all()
}

/// Reads the seal in `data_dir`, if there is one.
pub fn read(data_dir: &Path) -> io::Result<Option<Seal>> {
    let path = data_dir.join(FILE_NAME);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    parse(&text).map(Some).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: not a falcon log seal", path.display()),
        )
    })
}

fn parse(text: &str) -> Option<Seal> {
    let mut it = text.split_whitespace();
    if it.next()? != "falcon-log-seal" || it.next()? != "1" {
        return None;
    }
    let mut field = |name: &str| -> Option<String> {
        let kv = it.next()?;
        kv.strip_prefix(name)?.strip_prefix('=').map(str::to_string)
    };
    let hex = |s: String| u64::from_str_radix(s.strip_prefix("0x")?, 16).ok();
    let cluster_id = hex(field("cluster")?)?;
    let node_id = field("node")?.parse().ok()?;
    let last_op = field("last_op")?.parse().ok()?;
    let last_crc = u32::try_from(hex(field("last_crc")?)?).ok()?;
    Some(Seal {
        cluster_id,
        node_id,
        last_op,
        last_crc,
    })
}

/// Removes the seal before the replica writes again (and syncs the directory).
pub fn remove(data_dir: &Path) -> io::Result<()> {
    match std::fs::remove_file(data_dir.join(FILE_NAME)) {
        Ok(()) => std::fs::File::open(data_dir)?.sync_all(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// What differs between the seal and the log as found (None: it matches).
/// `owner` is the log's (cluster, replica) from its segment headers.
pub fn mismatch(seal: &Seal, owner: (u64, u32), last_op: u64, last_crc: u32) -> Option<String> {
    if owner != (seal.cluster_id, seal.node_id) {
        return Some(format!(
            "the log belongs to cluster {:#x} replica {}, but replica {} of cluster {:#x} stopped here: was the log swapped with another replica's?",
            owner.0, owner.1, seal.node_id, seal.cluster_id
        ));
    }
    if last_op != seal.last_op {
        return Some(format!(
            "the log ends at op {last_op}, but it ended at op {} when the replica stopped: it was {} while the replica was stopped",
            seal.last_op,
            if last_op < seal.last_op {
                "truncated or rolled back"
            } else {
                "extended by someone else"
            }
        ));
    }
    if last_crc != seal.last_crc {
        return Some(format!(
            "the log ends at op {last_op} as when the replica stopped, but with other contents (hash chain {last_crc:#010x}, sealed {:#010x}): it was replaced while the replica was stopped",
            seal.last_crc
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seal_reads_back_and_names_every_kind_of_difference() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()).unwrap(), None);
        let s = Seal {
            cluster_id: 0xfa1c,
            node_id: 2,
            last_op: 300,
            last_crc: 0xdead_beef,
        };
        write(dir.path(), &s).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Some(s));
        assert_eq!(mismatch(&s, (0xfa1c, 2), 300, 0xdead_beef), None);
        assert!(
            mismatch(&s, (0xfa1c, 3), 300, 0xdead_beef)
                .unwrap()
                .contains("swapped")
        );
        assert!(
            mismatch(&s, (0xfa1c, 2), 250, 0xdead_beef)
                .unwrap()
                .contains("truncated")
        );
        assert!(
            mismatch(&s, (0xfa1c, 2), 300, 1)
                .unwrap()
                .contains("replaced")
        );
        remove(dir.path()).unwrap();
        assert_eq!(read(dir.path()).unwrap(), None);
        std::fs::write(dir.path().join(FILE_NAME), "garbage").unwrap();
        assert!(read(dir.path()).is_err());
    }
}
