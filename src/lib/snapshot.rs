//! Snapshots of the replicated program.
//!
//! `--snapshot-cmd` writes the program's state into a directory; falcon packs
//! that directory into one file, `snapshot` in the data dir, together with the
//! last op the state covers and the connections open at that op. The file is
//! what moves between replicas and what `--restore-cmd` gets back, unpacked.
//!
//! Layout (integers little-endian):
//!
//! ```text
//! magic "FALCONS1" | op u64 | conns u32 | conn u64 × conns | files u32 |
//!   per file: name_len u16 | name (UTF-8, relative, '/'-separated) | len u64 | bytes
//! crc32c u32 of everything before it
//! ```

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Component, Path, PathBuf};

/// The file's first bytes.
pub const MAGIC: &[u8; 8] = b"FALCONS1";
/// The name of the snapshot file in a data dir.
pub const FILE_NAME: &str = "snapshot";
/// Longest file name inside a snapshot.
const NAME_MAX: usize = 4096;
/// Most files and open connections a snapshot may list.
const COUNT_MAX: u32 = 1 << 20;

/// What a snapshot covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotMeta {
    /// Every op up to this one is in the snapshot.
    pub op: u64,
    /// Connections open at `op`.
    pub open_conns: Vec<u64>,
    /// Files in it.
    pub files: usize,
    /// Length of the snapshot file.
    pub bytes: u64,
    /// `program_protocol = "resp"`: falcon's own state beside the
    /// program's (see [`crate::app::resp::Mux::export`]); filled in by the
    /// node when it restores the snapshot, empty otherwise.
    pub resp_state: Vec<u8>,
    /// Why the node could not take `resp_state` from the snapshot (then
    /// empty): clients in the middle of a command then may see errors.
    pub resp_state_problem: Option<String>,
}

/// The file falcon adds to a snapshot's directory for its `resp_state`.
pub const RESP_STATE_FILE: &str = ".falcon-resp-state";

/// Why a snapshot file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Reading or writing failed.
    #[error("{context}: {source}")]
    Io {
        /// What falcon was doing.
        context: String,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// The file is not a valid snapshot.
    #[error("{path}: not a valid falcon snapshot: {why}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
}

fn io_ctx(context: impl Into<String>) -> impl FnOnce(io::Error) -> SnapshotError {
    let context = context.into();
    move |source| SnapshotError::Io { context, source }
}

/// A writer that keeps the CRC32C of what went through it.
struct CrcWriter<W> {
    inner: W,
    crc: u32,
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(b)?;
        self.crc = crc32c::crc32c_append(self.crc, &b[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Every regular file under `dir`, as relative '/'-separated names, and
/// every empty directory, as its name and a '/' (a program may need it to
/// exist: PostgreSQL's pg_notify), sorted.
fn list_files(dir: &Path) -> io::Result<Vec<(String, PathBuf)>> {
    // `path` relative to `dir`, as UTF-8.
    let relative = |path: &Path| -> io::Result<String> {
        path.strip_prefix(dir)
            .map_err(io::Error::other)?
            .to_str()
            .map(str::to_string)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: name is not UTF-8", path.display()),
                )
            })
    };
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if d != dir && std::fs::read_dir(&d)?.next().is_none() {
            out.push((format!("{}/", relative(&d)?), d));
            continue;
        }
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let path = entry.path();
            let ft = entry.file_type()?;
            if ft.is_dir() {
                stack.push(path);
            } else if ft.is_file() {
                out.push((relative(&path)?, path));
            } else {
                // Left out, it would be missing from every restore, and the
                // log below the snapshot is dropped: refuse instead. A link
                // to a file is packed as the file.
                let target = std::fs::metadata(&path);
                match target {
                    Ok(m) if ft.is_symlink() && m.is_file() => {
                        out.push((relative(&path)?, path));
                    }
                    _ => {
                        let what = if !ft.is_symlink() {
                            "neither a file nor a directory (a FIFO, socket or device)"
                        } else if target.is_err() {
                            "a symbolic link to nothing"
                        } else {
                            "a symbolic link to something other than a file"
                        };
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidInput,
                            format!(
                                "{} is {what}: a snapshot carries files and directories only (copy the files it names into the snapshot directory)",
                                path.display()
                            ),
                        ));
                    }
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Packs the files under `src` into the snapshot file `dest` (written to a
/// temporary name, synced, then renamed over `dest`).
pub fn pack(
    src: &Path,
    op: u64,
    open_conns: &[u64],
    dest: &Path,
) -> Result<SnapshotMeta, SnapshotError> {
    let files = list_files(src).map_err(io_ctx(format!("reading {}", src.display())))?;
    if files.len() > COUNT_MAX as usize || open_conns.len() > COUNT_MAX as usize {
        return Err(io_ctx(format!("packing {}", src.display()))(
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} files and {} open connections: a snapshot holds at most {COUNT_MAX} of each",
                    files.len(),
                    open_conns.len()
                ),
            ),
        ));
    }
    let tmp = dest.with_extension("tmp");
    let ctx = || format!("writing {}", tmp.display());
    let f = File::create(&tmp).map_err(io_ctx(ctx()))?;
    let mut w = CrcWriter {
        inner: BufWriter::with_capacity(1 << 20, f),
        crc: 0,
    };
    let mut write = || -> io::Result<()> {
        w.write_all(MAGIC)?;
        w.write_all(&op.to_le_bytes())?;
        w.write_all(&(open_conns.len() as u32).to_le_bytes())?;
        for c in open_conns {
            w.write_all(&c.to_le_bytes())?;
        }
        w.write_all(&(files.len() as u32).to_le_bytes())?;
        for (name, path) in &files {
            if name.len() > NAME_MAX {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{name}: file name longer than {NAME_MAX} bytes"),
                ));
            }
            if name.ends_with('/') {
                // An empty directory: its name, no bytes.
                w.write_all(&(name.len() as u16).to_le_bytes())?;
                w.write_all(name.as_bytes())?;
                w.write_all(&0u64.to_le_bytes())?;
                continue;
            }
            let mut f = File::open(path)?;
            let len = f.metadata()?.len();
            w.write_all(&(name.len() as u16).to_le_bytes())?;
            w.write_all(name.as_bytes())?;
            w.write_all(&len.to_le_bytes())?;
            let copied = io::copy(&mut (&mut f).take(len), &mut w)?;
            if copied != len {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{} shrank while it was packed", path.display()),
                ));
            }
        }
        let crc = w.crc;
        w.inner.write_all(&crc.to_le_bytes())?;
        w.inner.flush()?;
        w.inner.get_ref().sync_all()
    };
    // Half a snapshot (a full disk, a file that shrank) is not left behind
    // to keep the disk full.
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_ctx(ctx())(e));
    }
    if let Err(e) = std::fs::rename(&tmp, dest) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_ctx(format!("renaming {}", tmp.display()))(e));
    }
    if let Some(parent) = dest.parent() {
        File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(io_ctx(format!("syncing {}", parent.display())))?;
    }
    read_meta(dest)
}

/// A reader over the snapshot body with the checks every field needs.
struct Body<R> {
    r: R,
    left: u64,
    path: String,
}

impl<R: Read> Body<R> {
    fn invalid(&self, why: impl Into<String>) -> SnapshotError {
        SnapshotError::Invalid {
            path: self.path.clone(),
            why: why.into(),
        }
    }
    fn bytes(&mut self, n: u64) -> Result<Vec<u8>, SnapshotError> {
        if n > self.left {
            return Err(self.invalid(format!("cut short ({n} bytes needed, {} left)", self.left)));
        }
        let mut b = vec![0u8; n as usize];
        self.r
            .read_exact(&mut b)
            .map_err(io_ctx(format!("reading {}", self.path)))?;
        self.left -= n;
        Ok(b)
    }
    fn u64(&mut self) -> Result<u64, SnapshotError> {
        let b = self.bytes(8)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
    fn u32(&mut self) -> Result<u32, SnapshotError> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }
    fn u16(&mut self) -> Result<u16, SnapshotError> {
        let b = self.bytes(2)?;
        Ok(u16::from_le_bytes(b.try_into().expect("2 bytes")))
    }
}

/// Checks the whole file (length, CRC) and returns a reader positioned after
/// the magic, with the body length left to read.
fn open_checked(path: &Path) -> Result<(Body<BufReader<File>>, u64), SnapshotError> {
    let shown = path.display().to_string();
    let ctx = || format!("reading {shown}");
    let mut f = File::open(path).map_err(io_ctx(ctx()))?;
    let len = f.metadata().map_err(io_ctx(ctx()))?.len();
    let invalid = |why: String| SnapshotError::Invalid {
        path: shown.clone(),
        why,
    };
    if len < (MAGIC.len() + 8 + 4 + 4 + 4) as u64 {
        return Err(invalid(format!("only {len} bytes")));
    }
    let mut r = BufReader::with_capacity(1 << 20, &mut f);
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic).map_err(io_ctx(ctx()))?;
    if &magic != MAGIC {
        return Err(invalid("wrong magic (not a snapshot file)".into()));
    }
    let mut crc = crc32c::crc32c(&magic);
    let mut left = len - 8 - 4;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let n = (left as usize).min(buf.len());
        r.read_exact(&mut buf[..n]).map_err(io_ctx(ctx()))?;
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        left -= n as u64;
    }
    let mut stored = [0u8; 4];
    r.read_exact(&mut stored).map_err(io_ctx(ctx()))?;
    if u32::from_le_bytes(stored) != crc {
        return Err(invalid(
            "checksum mismatch (damaged or incomplete)".to_string(),
        ));
    }
    drop(r);
    f.seek(SeekFrom::Start(8)).map_err(io_ctx(ctx()))?;
    Ok((
        Body {
            r: BufReader::with_capacity(1 << 20, f),
            left: len - 8 - 4,
            path: shown,
        },
        len,
    ))
}

fn read_head<R: Read>(b: &mut Body<R>) -> Result<(u64, Vec<u64>, u32), SnapshotError> {
    let op = b.u64()?;
    let n = b.u32()?;
    if n > COUNT_MAX || u64::from(n) * 8 > b.left {
        return Err(b.invalid(format!("{n} open connections listed")));
    }
    let mut conns = Vec::with_capacity(n as usize);
    for _ in 0..n {
        conns.push(b.u64()?);
    }
    let files = b.u32()?;
    if files > COUNT_MAX {
        return Err(b.invalid(format!("{files} files listed")));
    }
    Ok((op, conns, files))
}

/// A relative name that stays inside the directory it is unpacked into.
fn safe_name(name: &str) -> bool {
    !name.is_empty()
        && Path::new(name)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

/// Checks the snapshot file and reads what it covers, without unpacking it.
pub fn read_meta(path: &Path) -> Result<SnapshotMeta, SnapshotError> {
    walk(path, None)
}

/// Checks the snapshot file and unpacks its files into `dir` (created; must be empty or absent).
pub fn unpack(path: &Path, dir: &Path) -> Result<SnapshotMeta, SnapshotError> {
    walk(path, Some(dir))
}

fn walk(path: &Path, into: Option<&Path>) -> Result<SnapshotMeta, SnapshotError> {
    let (mut b, bytes) = open_checked(path)?;
    let (op, open_conns, files) = read_head(&mut b)?;
    if let Some(dir) = into {
        std::fs::create_dir_all(dir).map_err(io_ctx(format!("creating {}", dir.display())))?;
    }
    for _ in 0..files {
        let name_len = u64::from(b.u16()?);
        let name = String::from_utf8(b.bytes(name_len)?)
            .map_err(|_| b.invalid("a file name is not UTF-8"))?;
        if !safe_name(&name) {
            return Err(b.invalid(format!("file name {name:?} leaves the directory")));
        }
        let len = b.u64()?;
        if len > b.left {
            return Err(b.invalid(format!("{name}: {len} bytes listed, {} left", b.left)));
        }
        if let Some(sub) = name.strip_suffix('/') {
            if len != 0 || !safe_name(sub) {
                return Err(b.invalid(format!("{name:?} is not an empty directory")));
            }
            if let Some(dir) = into {
                let dest = dir.join(sub);
                std::fs::create_dir_all(&dest)
                    .map_err(io_ctx(format!("creating {}", dest.display())))?;
            }
            continue;
        }
        match into {
            Some(dir) => {
                let dest = dir.join(&name);
                let ctx = || format!("writing {}", dest.display());
                if let Some(parent) = dest.parent() {
                    std::fs::create_dir_all(parent).map_err(io_ctx(ctx()))?;
                }
                let mut f = BufWriter::new(File::create(&dest).map_err(io_ctx(ctx()))?);
                let copied = io::copy(&mut (&mut b.r).take(len), &mut f).map_err(io_ctx(ctx()))?;
                f.flush().map_err(io_ctx(ctx()))?;
                if copied != len {
                    return Err(b.invalid(format!("{name}: cut short")));
                }
            }
            None => {
                io::copy(&mut (&mut b.r).take(len), &mut io::sink())
                    .map_err(io_ctx(format!("reading {}", b.path)))?;
            }
        }
        b.left -= len;
    }
    if b.left != 0 {
        return Err(b.invalid(format!("{} bytes after the last file", b.left)));
    }
    Ok(SnapshotMeta {
        op,
        open_conns,
        files: files as usize,
        bytes,
        resp_state: Vec::new(),
        resp_state_problem: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(dir: &Path) -> PathBuf {
        let src = dir.join("src");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::write(src.join("dump.rdb"), b"REDIS0011 state").unwrap();
        std::fs::write(src.join("sub/extra"), vec![7u8; 300_000]).unwrap();
        std::fs::create_dir_all(src.join("empty/deeper")).unwrap();
        let dest = dir.join(FILE_NAME);
        pack(&src, 42, &[5, 9], &dest).unwrap();
        dest
    }

    #[test]
    fn packs_and_unpacks_files_with_the_op_and_connections() {
        let d = tempfile::tempdir().unwrap();
        let snap = sample(d.path());
        let meta = read_meta(&snap).unwrap();
        assert_eq!(
            (meta.op, meta.open_conns.clone(), meta.files),
            (42, vec![5, 9], 3)
        );
        let out = d.path().join("out");
        assert_eq!(unpack(&snap, &out).unwrap(), meta);
        assert_eq!(
            std::fs::read(out.join("dump.rdb")).unwrap(),
            b"REDIS0011 state"
        );
        assert_eq!(
            std::fs::read(out.join("sub/extra")).unwrap(),
            vec![7u8; 300_000]
        );
        // An empty directory comes back too (PostgreSQL needs its pg_notify).
        assert!(out.join("empty/deeper").is_dir());
    }

    #[test]
    fn a_link_to_a_file_is_packed_as_the_file_and_what_cannot_be_packed_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(d.path().join("dump.rdb"), b"REDIS0011 state").unwrap();
        std::os::unix::fs::symlink(d.path().join("dump.rdb"), src.join("dump.rdb")).unwrap();
        let dest = d.path().join(FILE_NAME);
        pack(&src, 7, &[], &dest).unwrap();
        let out = d.path().join("out");
        unpack(&dest, &out).unwrap();
        assert_eq!(
            std::fs::read(out.join("dump.rdb")).unwrap(),
            b"REDIS0011 state"
        );
        // A FIFO, a link to nothing, a link to a directory: an error that
        // names the entry, no snapshot written, the old one kept.
        let before = std::fs::read(&dest).unwrap();
        let bad = src.join("bad");
        let make: [(&dyn Fn(), &str); 3] = [
            (
                &|| nix::unistd::mkfifo(&bad, nix::sys::stat::Mode::S_IRWXU).unwrap(),
                "neither a file nor a directory",
            ),
            (
                &|| std::os::unix::fs::symlink(d.path().join("nothing"), &bad).unwrap(),
                "a symbolic link to nothing",
            ),
            (
                &|| std::os::unix::fs::symlink(d.path(), &bad).unwrap(),
                "a symbolic link to something other than a file",
            ),
        ];
        for (create, what) in make {
            create();
            let e = pack(&src, 8, &[], &dest).unwrap_err().to_string();
            assert!(
                e.contains(&bad.display().to_string()) && e.contains(what),
                "{e}"
            );
            std::fs::remove_file(&bad).unwrap();
        }
        assert_eq!(std::fs::read(&dest).unwrap(), before);
        // A file that says it is longer than it reads (sysfs: 4096 bytes
        // said, a line read): the half-written snapshot does not stay.
        let sysfs = Path::new("/sys/kernel/mm/transparent_hugepage/enabled");
        if sysfs.exists() {
            std::os::unix::fs::symlink(sysfs, src.join("short")).unwrap();
            let e = pack(&src, 9, &[], &dest).unwrap_err().to_string();
            assert!(e.contains("shrank while it was packed"), "{e}");
            assert!(!d.path().join("snapshot.tmp").exists());
            assert_eq!(std::fs::read(&dest).unwrap(), before);
        }
    }

    #[test]
    fn every_damage_is_refused_without_a_panic() {
        let d = tempfile::tempdir().unwrap();
        let snap = sample(d.path());
        let good = std::fs::read(&snap).unwrap();
        let bad = d.path().join("bad");
        // Flipped bytes anywhere, and every cut, are caught by the checksum or the bounds.
        for at in (0..good.len())
            .step_by(997)
            .chain([0, 8, 20, good.len() - 1])
        {
            let mut b = good.clone();
            b[at] ^= 0x40;
            std::fs::write(&bad, &b).unwrap();
            assert!(read_meta(&bad).is_err(), "flip at {at}");
        }
        for cut in [0, 7, 8, 30, good.len() / 2, good.len() - 1] {
            std::fs::write(&bad, &good[..cut]).unwrap();
            assert!(read_meta(&bad).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn a_name_that_leaves_the_directory_is_refused() {
        let d = tempfile::tempdir().unwrap();
        // Hand-made: one file named ../evil, with a correct checksum.
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&1u64.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&1u32.to_le_bytes());
        let name = b"../evil";
        b.extend_from_slice(&(name.len() as u16).to_le_bytes());
        b.extend_from_slice(name);
        b.extend_from_slice(&1u64.to_le_bytes());
        b.push(b'x');
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        let path = d.path().join("evil.snap");
        std::fs::write(&path, &b).unwrap();
        let err = unpack(&path, &d.path().join("out"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("leaves the directory"), "{err}");
        assert!(!d.path().join("evil").exists());
    }
}
