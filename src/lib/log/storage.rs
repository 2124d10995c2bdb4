//! Where segment files live: a real directory, or an in-memory one that can
//! simulate a crash (unsynced writes lost, the last write torn).
//!
//! The log is generic over [`Storage`] so that the same code, and the same
//! on-disk format, runs on a real disk and inside the deterministic simulator.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// A directory of segment files.
///
/// To be correct, an implementation must make a file's data durable on
/// [`StorageFile::sync_data`], and the set of names durable on
/// [`Storage::sync_dir`]; the log calls both before it reports anything
/// durable.
pub trait Storage: Send + 'static {
    /// An open file.
    type File: StorageFile;
    /// Names of the files in the directory (no particular order).
    fn list(&self) -> io::Result<Vec<String>>;
    /// Creates a new, empty file; fails if it exists.
    fn create_new(&self, name: &str) -> io::Result<Self::File>;
    /// Opens an existing file for reading and writing.
    fn open_rw(&self, name: &str) -> io::Result<Self::File>;
    /// Opens an existing file for reading only.
    fn open_ro(&self, name: &str) -> io::Result<Self::File>;
    /// Removes a file.
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Makes creations and removals durable.
    fn sync_dir(&self) -> io::Result<()>;
    /// A name for the file in messages (a path for real directories).
    fn describe(&self, name: &str) -> String;
    /// Takes an exclusive writer lock on the directory, held until the guard drops.
    fn lock(&self) -> io::Result<Box<dyn Send>>;
    /// A failed fsync leaves a note (best effort). It need not be durable:
    /// what it warns of is the page cache, which a reboot empties anyway.
    fn leave_fsync_note(&self) -> io::Result<()> {
        Ok(())
    }
    /// If a failed fsync left its note: drops what the OS caches of the
    /// directory's files, so that they are read from the disk again (a page
    /// whose writeback failed may stay cached, readable, and not on the
    /// disk), and says so. The note stays until
    /// [`clear_fsync_note`](Self::clear_fsync_note).
    fn forget_cache_after_failed_fsync(&self) -> io::Result<bool> {
        Ok(false)
    }
    /// The log was read and synced again after a failed fsync: the note goes.
    fn clear_fsync_note(&self) {}
}

/// The note a failed fsync leaves in a log directory.
pub const FSYNC_NOTE: &str = "FSYNC-FAILED";

/// One open file.
#[allow(clippy::len_without_is_empty)]
pub trait StorageFile: Send + 'static {
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Reads up to `buf.len()` bytes at `offset`; returns how many were read (0 at the end).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Writes all of `buf` at `offset`, extending the file if needed.
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Cuts or extends the file to `len` bytes.
    fn set_len(&mut self, len: u64) -> io::Result<()>;
    /// Makes the file's data durable (`fdatasync`).
    fn sync_data(&mut self) -> io::Result<()>;
    /// Reserves space so that the file is at least `len` bytes long, reading
    /// as zeros past what was written (`fallocate`). Writes inside it then
    /// change neither the file's size nor its block map, so each
    /// `fdatasync` has less to commit. May fail (no space, a file system
    /// without it); the log then appends without it.
    fn preallocate(&mut self, len: u64) -> io::Result<()>;
    /// Another handle to the same file, for an fsync thread. On a real file
    /// it is another open of it, not a `dup`: each open has its own record
    /// of writeback errors, so a failed writeback fails the next fsync on
    /// either handle. (A `dup` shares one record: the thread's failed fsync
    /// would let the loop's next one on the same file succeed.)
    fn try_clone(&self) -> io::Result<Self>
    where
        Self: Sized;

    /// Reads exactly `buf.len()` bytes at `offset`, or fewer at the end of the file;
    /// returns how many were read.
    fn read_full_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }
}

/// A real directory on a file system.
#[derive(Clone, Debug)]
pub struct FsStorage {
    dir: PathBuf,
}

impl FsStorage {
    /// Uses `dir`, creating it when `create` is set.
    pub fn new(dir: impl AsRef<Path>, create: bool) -> io::Result<FsStorage> {
        let dir = dir.as_ref().to_path_buf();
        if create {
            std::fs::create_dir_all(&dir)?;
        }
        let meta = std::fs::metadata(&dir)?;
        if !meta.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                format!("{} is not a directory", dir.display()),
            ));
        }
        Ok(FsStorage { dir })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

/// A real file.
#[derive(Debug)]
pub struct FsFile(File);

impl StorageFile for FsFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        FileExt::read_at(&self.0, buf, offset)
    }
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(&self.0, buf, offset)
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn sync_data(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn preallocate(&mut self, len: u64) -> io::Result<()> {
        preallocate(&self.0, len)
    }
    fn try_clone(&self) -> io::Result<FsFile> {
        // The descriptor's link names the file even when it was renamed or
        // removed since, and opening it is a new open of the same file.
        use std::os::fd::AsRawFd;
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/self/fd/{}", self.0.as_raw_fd()))
            .map(FsFile)
    }
}

/// Reserves space so that `file` is at least `len` bytes long: `fallocate`
/// mode 0, which allocates `[0, len)` and extends the size; blocks not yet
/// written read as zeros.
pub fn preallocate(file: &File, len: u64) -> io::Result<()> {
    let len = libc::off_t::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "length out of range"))?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(file);
    loop {
        // SAFETY: fallocate on a descriptor `file` keeps open; no memory is passed.
        if unsafe { libc::fallocate(fd, 0, 0, len) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

struct FsLock {
    _file: File,
}

impl Storage for FsStorage {
    type File = FsFile;
    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            if let Some(name) = entry.file_name().to_str() {
                names.push(name.to_string());
            }
        }
        Ok(names)
    }
    fn create_new(&self, name: &str) -> io::Result<FsFile> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(self.dir.join(name))
            .map(FsFile)
    }
    fn open_rw(&self, name: &str) -> io::Result<FsFile> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.dir.join(name))
            .map(FsFile)
    }
    fn open_ro(&self, name: &str) -> io::Result<FsFile> {
        File::open(self.dir.join(name)).map(FsFile)
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        std::fs::remove_file(self.dir.join(name))
    }
    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }
    fn describe(&self, name: &str) -> String {
        if name.is_empty() {
            self.dir.display().to_string()
        } else {
            self.dir.join(name).display().to_string()
        }
    }
    fn leave_fsync_note(&self) -> io::Result<()> {
        std::fs::write(
            self.dir.join(FSYNC_NOTE),
            "an fsync of this log failed; falcon reads the log from the disk (not the page cache) at its next start\n",
        )
    }
    fn forget_cache_after_failed_fsync(&self) -> io::Result<bool> {
        if !self.dir.join(FSYNC_NOTE).exists() {
            return Ok(false);
        }
        for name in self.list()? {
            if !name.ends_with(".seg") {
                continue;
            }
            let file = File::open(self.dir.join(&name))?;
            // Dirty pages are written first (and stay); clean ones go.
            // SAFETY: fadvise on a descriptor we own.
            let r = unsafe {
                libc::posix_fadvise(
                    std::os::fd::AsRawFd::as_raw_fd(&file),
                    0,
                    0,
                    libc::POSIX_FADV_DONTNEED,
                )
            };
            // (A file system without it has no page cache of its own to drop.)
            if r != 0 && r != libc::EINVAL && r != libc::ESPIPE {
                return Err(io::Error::from_raw_os_error(r));
            }
        }
        Ok(true)
    }
    fn clear_fsync_note(&self) {
        let _ = std::fs::remove_file(self.dir.join(FSYNC_NOTE));
    }
    fn lock(&self) -> io::Result<Box<dyn Send>> {
        use std::io::Write;
        let path = self.dir.join("LOCK");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        // flock: released by the kernel when the process dies, so a crash
        // never leaves a stale lock behind.
        let rc = unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&file),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        };
        if rc != 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::WouldBlock {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!(
                        "{} is locked by another falcon process{}",
                        self.dir.display(),
                        match holder.trim() {
                            "" => String::new(),
                            pid => format!(" (pid {pid})"),
                        }
                    ),
                ));
            }
            return Err(err);
        }
        file.set_len(0)?;
        write!(file, "{}", std::process::id())?;
        Ok(Box::new(FsLock { _file: file }))
    }
}

/// An in-memory directory for tests and the simulator.
///
/// Each file keeps what was written and what was last made durable; a
/// [`MemStorage::crash`] keeps the durable state plus a random, possibly torn,
/// part of what was not synced — as a real disk may after a power loss.
/// Clones share the same directory.
#[derive(Clone, Default)]
pub struct MemStorage {
    state: Arc<Mutex<MemState>>,
}

#[derive(Default)]
struct MemState {
    files: BTreeMap<String, Arc<Mutex<MemFileData>>>,
    /// Names made durable by the last `sync_dir`.
    durable_names: BTreeMap<String, Arc<Mutex<MemFileData>>>,
    locked: bool,
    /// When set, writes fail with "no space" once a file would exceed this many bytes in total.
    space_bytes: Option<u64>,
}

#[derive(Default, Clone)]
struct MemFileData {
    data: Vec<u8>,
    durable: Vec<u8>,
}

/// An in-memory file.
pub struct MemFile {
    data: Arc<Mutex<MemFileData>>,
    storage: Arc<Mutex<MemState>>,
    writable: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl MemStorage {
    /// A new, empty directory.
    pub fn new() -> MemStorage {
        MemStorage::default()
    }

    /// Simulates a power loss: every file keeps its durable bytes; of the bytes
    /// written since the last sync, a random prefix survives and the rest is
    /// lost or, for the last few bytes, replaced by zeros or garbage — or, one
    /// time in four, a random set of their 512-byte sectors survives. Files
    /// created or removed since the last directory sync may come back or vanish.
    /// `seed` makes the outcome reproducible. The writer lock is released.
    pub fn crash(&self, seed: u64) {
        let mut rng = SplitMix(seed);
        let mut st = lock(&self.state);
        let mut names: BTreeMap<String, Arc<Mutex<MemFileData>>> = BTreeMap::new();
        for (name, f) in st.durable_names.iter() {
            names.insert(name.clone(), f.clone());
        }
        // Creations not yet made durable survive half of the time.
        for (name, f) in st.files.iter() {
            if !names.contains_key(name) && rng.next_u64() % 2 == 0 {
                names.insert(name.clone(), f.clone());
            }
        }
        for f in names.values() {
            let mut f = lock(f);
            let durable = f.durable.clone();
            let mut kept = durable.clone();
            // The unsynced part: bytes of `data` from where it first differs
            // from `durable` (appended, or written over preallocated zeros).
            let p = f
                .data
                .iter()
                .zip(durable.iter())
                .take_while(|(a, b)| a == b)
                .count();
            if f.data.len() > p && rng.next_u64() % 4 == 0 {
                // Sectors reach the disk in any order: each unsynced 512-byte
                // sector is there or not (then it holds what was durable,
                // zeros past it), as when writing over preallocated space.
                kept = durable.clone();
                kept.resize(f.data.len(), 0);
                let mut at = p - p % 512;
                while at < f.data.len() {
                    let end = (at + 512).min(f.data.len());
                    if rng.next_u64() % 2 == 0 {
                        kept[at..end].copy_from_slice(&f.data[at..end]);
                    }
                    at = end;
                }
            } else if f.data.len() > p {
                let extra = &f.data[p..];
                let keep = (rng.next_u64() % (extra.len() as u64 + 1)) as usize;
                kept = f.data[..p + keep].to_vec();
                match rng.next_u64() % 4 {
                    // A torn sector: the tail of what was kept is garbage or zeros.
                    0 if keep > 0 => {
                        let n = 1 + (rng.next_u64() % keep.min(16) as u64) as usize;
                        let at = kept.len() - n;
                        for b in &mut kept[at..] {
                            *b = rng.next_u64() as u8;
                        }
                    }
                    1 => {
                        let n = (rng.next_u64() % 64) as usize;
                        kept.extend(std::iter::repeat_n(0u8, n));
                    }
                    _ => {}
                }
                // Past what survived, the file holds what was durable there.
                if durable.len() > kept.len() {
                    kept.extend_from_slice(&durable[kept.len()..]);
                }
            }
            f.data = kept.clone();
            f.durable = kept;
        }
        st.files = names.clone();
        st.durable_names = names;
        st.locked = false;
    }

    /// Limits the total bytes of all files; writes beyond it fail with "no space".
    pub fn set_space_limit(&self, bytes: Option<u64>) {
        lock(&self.state).space_bytes = bytes;
    }

    /// The current contents of a file (for tests that damage files on purpose).
    pub fn read_file(&self, name: &str) -> Option<Vec<u8>> {
        lock(&self.state)
            .files
            .get(name)
            .map(|f| lock(f).data.clone())
    }

    /// Replaces a file's contents, durably (for tests that damage files on purpose).
    pub fn write_file(&self, name: &str, bytes: &[u8]) {
        let mut st = lock(&self.state);
        let f = Arc::new(Mutex::new(MemFileData {
            data: bytes.to_vec(),
            durable: bytes.to_vec(),
        }));
        st.files.insert(name.to_string(), f.clone());
        st.durable_names.insert(name.to_string(), f);
    }

    /// A deep copy that shares nothing with `self`.
    pub fn snapshot(&self) -> MemStorage {
        let st = lock(&self.state);
        let copy = |m: &BTreeMap<String, Arc<Mutex<MemFileData>>>| {
            m.iter()
                .map(|(k, v)| (k.clone(), Arc::new(Mutex::new(lock(v).clone()))))
                .collect::<BTreeMap<_, _>>()
        };
        let files = copy(&st.files);
        let durable_names = st
            .durable_names
            .keys()
            .filter_map(|k| files.get(k).map(|f| (k.clone(), f.clone())))
            .collect();
        MemStorage {
            state: Arc::new(Mutex::new(MemState {
                files,
                durable_names,
                locked: false,
                space_bytes: st.space_bytes,
            })),
        }
    }
}

fn not_found(name: &str) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("{name}: no such file"))
}

struct MemLock(Arc<Mutex<MemState>>);
impl Drop for MemLock {
    fn drop(&mut self) {
        lock(&self.0).locked = false;
    }
}

impl Storage for MemStorage {
    type File = MemFile;
    fn list(&self) -> io::Result<Vec<String>> {
        Ok(lock(&self.state).files.keys().cloned().collect())
    }
    fn create_new(&self, name: &str) -> io::Result<MemFile> {
        let mut st = lock(&self.state);
        if st.files.contains_key(name) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                name.to_string(),
            ));
        }
        let data = Arc::new(Mutex::new(MemFileData::default()));
        st.files.insert(name.to_string(), data.clone());
        Ok(MemFile {
            data,
            storage: self.state.clone(),
            writable: true,
        })
    }
    fn open_rw(&self, name: &str) -> io::Result<MemFile> {
        let st = lock(&self.state);
        let data = st.files.get(name).ok_or_else(|| not_found(name))?.clone();
        Ok(MemFile {
            data,
            storage: self.state.clone(),
            writable: true,
        })
    }
    fn open_ro(&self, name: &str) -> io::Result<MemFile> {
        let mut f = self.open_rw(name)?;
        f.writable = false;
        Ok(f)
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        let mut st = lock(&self.state);
        st.files
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| not_found(name))
    }
    fn sync_dir(&self) -> io::Result<()> {
        let mut st = lock(&self.state);
        st.durable_names = st.files.clone();
        Ok(())
    }
    fn describe(&self, name: &str) -> String {
        format!("mem:{name}")
    }
    fn lock(&self) -> io::Result<Box<dyn Send>> {
        let mut st = lock(&self.state);
        if st.locked {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "in-memory log is locked by another writer",
            ));
        }
        st.locked = true;
        Ok(Box::new(MemLock(self.state.clone())))
    }
}

impl StorageFile for MemFile {
    fn len(&self) -> io::Result<u64> {
        Ok(lock(&self.data).data.len() as u64)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let f = lock(&self.data);
        let Ok(offset) = usize::try_from(offset) else {
            return Ok(0);
        };
        if offset >= f.data.len() {
            return Ok(0);
        }
        let n = buf.len().min(f.data.len() - offset);
        buf[..n].copy_from_slice(&f.data[offset..offset + n]);
        Ok(n)
    }
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, "read-only"));
        }
        let offset = offset as usize;
        let end = offset + buf.len();
        let limit = lock(&self.storage).space_bytes;
        let mut f = lock(&self.data);
        room(limit, end, f.data.len())?;
        if f.data.len() < end {
            f.data.resize(end, 0);
        }
        f.data[offset..end].copy_from_slice(buf);
        Ok(())
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        lock(&self.data).data.resize(len as usize, 0);
        Ok(())
    }
    fn sync_data(&mut self) -> io::Result<()> {
        let mut f = lock(&self.data);
        f.durable = f.data.clone();
        Ok(())
    }
    fn preallocate(&mut self, len: u64) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, "read-only"));
        }
        let limit = lock(&self.storage).space_bytes;
        let mut f = lock(&self.data);
        let len = len as usize;
        room(limit, len, f.data.len())?;
        if f.data.len() < len {
            f.data.resize(len, 0);
        }
        Ok(())
    }
    fn try_clone(&self) -> io::Result<MemFile> {
        Ok(MemFile {
            data: self.data.clone(),
            storage: self.storage.clone(),
            writable: self.writable,
        })
    }
}

/// Whether a file of `have` bytes may grow to `end` under the space limit.
fn room(limit: Option<u64>, end: usize, have: usize) -> io::Result<()> {
    if limit.is_some_and(|limit| end as u64 > limit) && end > have {
        return Err(io::Error::new(
            io::ErrorKind::StorageFull,
            "no space left on device",
        ));
    }
    Ok(())
}

/// A small deterministic generator (SplitMix64) so simulations need no crate.
#[derive(Clone, Debug)]
pub struct SplitMix(pub u64);

impl SplitMix {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// The fsync thread's handle is another open of the segment, not a
    /// `dup`: the two have their own file offsets (and so their own
    /// records of writeback errors, which the kernel keeps per open).
    #[test]
    fn a_clone_for_the_fsync_thread_is_another_open_of_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let storage = FsStorage::new(dir.path(), true).unwrap();
        let mut file = storage.create_new("seg").unwrap();
        file.write_all_at(b"hello", 0).unwrap();
        let mut clone = file.try_clone().unwrap();
        // SAFETY: lseek on descriptors these handles own.
        let (moved, other) = unsafe {
            (
                libc::lseek(clone.0.as_raw_fd(), 3, libc::SEEK_SET),
                libc::lseek(file.0.as_raw_fd(), 0, libc::SEEK_CUR),
            )
        };
        assert_eq!((moved, other), (3, 0), "the clone shares the offset: a dup");
        // The same file: what one writes, the other reads and syncs.
        clone.write_all_at(b"HE", 0).unwrap();
        clone.sync_data().unwrap();
        let mut buf = [0u8; 5];
        assert_eq!(file.read_full_at(&mut buf, 0).unwrap(), 5);
        assert_eq!(&buf, b"HEllo");
        // Still the file after it is removed (a segment cut while the
        // thread holds it).
        storage.remove("seg").unwrap();
        assert!(file.try_clone().unwrap().sync_data().is_ok());
    }

    /// Pages of `path` in the page cache.
    fn resident(path: &Path) -> usize {
        let file = File::open(path).unwrap();
        let len = file.metadata().unwrap().len() as usize;
        let page = 4096;
        let mut vec = vec![0u8; len.div_ceil(page)];
        // SAFETY: a shared read-only mapping of a file we hold open, unmapped
        // before return; mincore writes one byte per page into `vec`.
        unsafe {
            let at = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            );
            assert_ne!(at, libc::MAP_FAILED);
            assert_eq!(libc::mincore(at, len, vec.as_mut_ptr()), 0);
            libc::munmap(at, len);
        }
        vec.iter().filter(|&&b| b & 1 != 0).count()
    }

    /// After a failed fsync's note, the directory's files are read from the
    /// disk again: their cached pages are dropped. Without the note, nothing
    /// is dropped.
    #[test]
    fn after_a_failed_fsync_the_cache_of_the_log_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let storage = FsStorage::new(dir.path(), true).unwrap();
        let mut file = storage.create_new("1.seg").unwrap();
        file.write_all_at(&vec![7u8; 1 << 20], 0).unwrap();
        file.sync_data().unwrap();
        let path = dir.path().join("1.seg");
        let mut buf = vec![0u8; 1 << 20];
        assert_eq!(file.read_full_at(&mut buf, 0).unwrap(), 1 << 20);
        assert!(resident(&path) > 0, "a file just written is cached");
        assert!(!storage.forget_cache_after_failed_fsync().unwrap());
        assert!(resident(&path) > 0, "no note: the cache stays");
        storage.leave_fsync_note().unwrap();
        assert!(storage.forget_cache_after_failed_fsync().unwrap());
        assert_eq!(resident(&path), 0, "the note: read from the disk again");
        assert_eq!(file.read_full_at(&mut buf, 0).unwrap(), 1 << 20);
        assert!(buf.iter().all(|&b| b == 7));
        storage.clear_fsync_note();
        assert!(!dir.path().join(FSYNC_NOTE).exists());
    }
}
