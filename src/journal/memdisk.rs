//! An in-memory [`Disk`] that can fail: a write torn after a prefix, a sync that returns EIO, a
//! full disk (ENOSPC), and a crash that loses whatever was not synced. For the simulator and
//! the tests; deterministic given its seed and the order of calls.
//!
//! # Model
//!
//! Each file has its current contents (what reads see: the page cache) and its durable
//! contents (what survives a crash). A write changes the current contents and remembers the
//! range as unsynced; `sync_data`/`sync_all` make the file's unsynced ranges durable. Names
//! work the same way: creating, renaming or removing a file changes the current directory at
//! once and the durable directory at the next [`Disk::sync_dir`] of its parent. Directories
//! themselves are durable as soon as they are created (the journal only creates them once).
//!
//! [`MemDisk::crash`] ends the "process": every [`Storage`] handed out before it fails every
//! later call with EIO (a dead process writes nothing more), unsynced 4 KiB pages are each kept
//! or lost by the seeded PRNG (pages reach a real disk out of order), and the directory reverts
//! to its durable state. A new [`MemDisk::storage`] then sees what a restarted process would.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::storage::{parent_of, Disk, DiskFile, Storage};

/// Granularity at which unsynced data is kept or lost at a crash.
const PAGE_BYTES: u64 = 4096;

/// A fault armed for the next matching call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFault {
    /// The next write fails with this OS error before writing anything.
    FailWrite(i32),
    /// The next write lands only a (seeded, possibly empty) prefix, then fails with EIO.
    TearWrite,
    /// The next `sync_data`/`sync_all` fails with this OS error; nothing more becomes durable.
    FailSync(i32),
}

#[derive(Debug, Default)]
struct MemFile {
    data: Vec<u8>,
    durable: Vec<u8>,
    /// Ranges written since the last sync, in write order.
    unsynced: Vec<(u64, u64)>,
}

#[derive(Debug)]
struct Inner {
    /// Bumped at every crash: handles of an older generation are dead.
    generation: u64,
    next_id: u64,
    files: BTreeMap<u64, MemFile>,
    names: BTreeMap<PathBuf, u64>,
    durable_names: BTreeMap<PathBuf, u64>,
    dirs: BTreeSet<PathBuf>,
    /// Faults armed by [`MemDisk::arm`], fired in order by the calls they match.
    armed: Vec<DiskFault>,
    /// Total bytes the named files may hold; beyond it writes fail with ENOSPC.
    capacity: Option<u64>,
    rng: u64,
    fired: u64,
}

impl Inner {
    fn next_random(&mut self) -> u64 {
        // SplitMix64: small, fast, and good enough to pick pages and prefixes.
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn take_fault(&mut self, matches: impl Fn(&DiskFault) -> bool) -> Option<DiskFault> {
        let i = self.armed.iter().position(matches)?;
        self.fired += 1;
        Some(self.armed.remove(i))
    }

    fn used(&self) -> u64 {
        let ids: BTreeSet<u64> = self.names.values().copied().collect();
        ids.iter().filter_map(|id| self.files.get(id)).map(|f| f.data.len() as u64).sum()
    }

    fn file(&mut self, id: u64) -> io::Result<&mut MemFile> {
        self.files.get_mut(&id).ok_or_else(|| io::Error::from_raw_os_error(libc::EBADF))
    }
}

/// The in-memory disk. Clones share the same disk.
#[derive(Debug, Clone)]
pub struct MemDisk(Arc<Mutex<Inner>>);

impl MemDisk {
    /// An empty disk whose random choices (torn prefixes, pages lost at a crash) follow `seed`.
    pub fn new(seed: u64) -> MemDisk {
        MemDisk(Arc::new(Mutex::new(Inner {
            generation: 0,
            next_id: 1,
            files: BTreeMap::new(),
            names: BTreeMap::new(),
            durable_names: BTreeMap::new(),
            dirs: BTreeSet::from([PathBuf::new(), PathBuf::from("/")]),
            armed: Vec::new(),
            capacity: None,
            rng: seed,
            fired: 0,
        })))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; it stays usable.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A handle for one "process": valid until the next [`MemDisk::crash`].
    pub fn storage(&self) -> Storage {
        let generation = self.lock().generation;
        Storage::new(Arc::new(MemView { disk: self.clone(), generation }))
    }

    /// Arms a fault for the next matching call.
    pub fn arm(&self, fault: DiskFault) {
        self.lock().armed.push(fault);
    }

    /// Disarms every armed fault.
    pub fn disarm(&self) {
        self.lock().armed.clear();
    }

    /// Faults fired so far.
    pub fn fired(&self) -> u64 {
        self.lock().fired
    }

    /// Limits the bytes the disk holds (`None`: unlimited). A write that would grow the files
    /// beyond it lands the prefix that fits and fails with ENOSPC.
    pub fn set_capacity(&self, bytes: Option<u64>) {
        self.lock().capacity = bytes;
    }

    /// Bytes held by named files.
    pub fn used(&self) -> u64 {
        self.lock().used()
    }

    /// Simulates a crash (power loss): see the module documentation. Armed faults are dropped.
    pub fn crash(&self) {
        let mut inner = self.lock();
        inner.generation += 1;
        inner.armed.clear();
        let ids: Vec<u64> = inner.files.keys().copied().collect();
        for id in ids {
            let Some(mut file) = inner.files.remove(&id) else { continue };
            for (start, end) in std::mem::take(&mut file.unsynced) {
                let mut page = start - start % PAGE_BYTES;
                while page < end {
                    let from = page.max(start);
                    let to = (page + PAGE_BYTES).min(end);
                    if inner.next_random().is_multiple_of(2) {
                        land(&mut file, from, to);
                    }
                    page += PAGE_BYTES;
                }
            }
            file.data = file.durable.clone();
            inner.files.insert(id, file);
        }
        inner.names = inner.durable_names.clone();
        let live: BTreeSet<u64> = inner.names.values().copied().collect();
        inner.files.retain(|id, _| live.contains(id));
    }

    /// Every named file and its current contents, by path (to copy the disk onto real files
    /// for the offline auditor).
    pub fn files(&self) -> Vec<(PathBuf, Vec<u8>)> {
        let inner = self.lock();
        inner
            .names
            .iter()
            .filter_map(|(path, id)| inner.files.get(id).map(|f| (path.clone(), f.data.clone())))
            .collect()
    }
}

/// Makes `[from, to)` of the file's current data durable.
fn land(file: &mut MemFile, from: u64, to: u64) {
    let (from, to) = (from as usize, (to as usize).min(file.data.len()));
    if from >= to {
        return;
    }
    if file.durable.len() < to {
        file.durable.resize(to, 0);
    }
    file.durable[from..to].copy_from_slice(&file.data[from..to]);
}

fn dead() -> io::Error {
    io::Error::other("the disk crashed under this process (simulated)")
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("{}: no such file (memdisk)", path.display()))
}

/// One process's view of a [`MemDisk`].
#[derive(Debug)]
struct MemView {
    disk: MemDisk,
    generation: u64,
}

impl MemView {
    fn live(&self) -> io::Result<MutexGuard<'_, Inner>> {
        let inner = self.disk.lock();
        if inner.generation != self.generation {
            return Err(dead());
        }
        Ok(inner)
    }

    fn handle(&self, id: u64, writable: bool) -> Box<dyn DiskFile> {
        Box::new(MemHandle { disk: self.disk.clone(), generation: self.generation, id, writable })
    }

    fn check_dir(inner: &Inner, path: &Path) -> io::Result<()> {
        if inner.dirs.contains(&parent_of(path)) {
            Ok(())
        } else {
            Err(not_found(path))
        }
    }
}

impl Disk for MemView {
    fn open(&self, path: &Path) -> io::Result<Box<dyn DiskFile>> {
        let inner = self.live()?;
        let id = *inner.names.get(path).ok_or_else(|| not_found(path))?;
        Ok(self.handle(id, true))
    }

    fn open_read(&self, path: &Path) -> io::Result<Box<dyn DiskFile>> {
        let inner = self.live()?;
        let id = *inner.names.get(path).ok_or_else(|| not_found(path))?;
        Ok(self.handle(id, false))
    }

    fn create_new(&self, path: &Path) -> io::Result<Box<dyn DiskFile>> {
        let mut inner = self.live()?;
        Self::check_dir(&inner, path)?;
        if inner.names.contains_key(path) || inner.dirs.contains(path) {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, "file exists (memdisk)"));
        }
        let id = inner.next_id;
        inner.next_id += 1;
        inner.files.insert(id, MemFile::default());
        inner.names.insert(path.to_path_buf(), id);
        Ok(self.handle(id, true))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut inner = self.live()?;
        Self::check_dir(&inner, to)?;
        let id = inner.names.remove(from).ok_or_else(|| not_found(from))?;
        inner.names.insert(to.to_path_buf(), id);
        Ok(())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut inner = self.live()?;
        inner.names.remove(path).map(|_| ()).ok_or_else(|| not_found(path))
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let inner = self.live()?;
        if !inner.dirs.contains(dir) {
            return Err(not_found(dir));
        }
        let files = inner.names.keys().filter(|p| p.parent() == Some(dir));
        let dirs = inner.dirs.iter().filter(|p| p.parent() == Some(dir));
        Ok(files
            .chain(dirs)
            .filter_map(|p| p.file_name().and_then(|n| n.to_str()).map(str::to_string))
            .collect())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut inner = self.live()?;
        if !inner.dirs.contains(dir) {
            return Err(not_found(dir));
        }
        if let Some(DiskFault::FailSync(code)) =
            inner.take_fault(|f| matches!(f, DiskFault::FailSync(_)))
        {
            return Err(io::Error::from_raw_os_error(code));
        }
        inner.durable_names.retain(|p, _| p.parent() != Some(dir));
        let current: Vec<(PathBuf, u64)> = inner
            .names
            .iter()
            .filter(|(p, _)| p.parent() == Some(dir))
            .map(|(p, id)| (p.clone(), *id))
            .collect();
        inner.durable_names.extend(current);
        Ok(())
    }

    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut inner = self.live()?;
        for ancestor in dir.ancestors() {
            if inner.names.contains_key(ancestor) {
                return Err(io::Error::new(io::ErrorKind::AlreadyExists, "a file is in the way"));
            }
            inner.dirs.insert(ancestor.to_path_buf());
        }
        Ok(())
    }

    fn is_dir(&self, dir: &Path) -> bool {
        self.live().is_ok_and(|inner| inner.dirs.contains(dir))
    }

    fn exists(&self, path: &Path) -> bool {
        self.live().is_ok_and(|inner| inner.dirs.contains(path) || inner.names.contains_key(path))
    }
}

/// An open file of a [`MemView`]; keeps working after a rename or removal of its name.
#[derive(Debug)]
struct MemHandle {
    disk: MemDisk,
    generation: u64,
    id: u64,
    writable: bool,
}

impl MemHandle {
    fn live(&self) -> io::Result<MutexGuard<'_, Inner>> {
        let inner = self.disk.lock();
        if inner.generation != self.generation {
            return Err(dead());
        }
        Ok(inner)
    }

    fn sync(&self) -> io::Result<()> {
        let mut inner = self.live()?;
        if let Some(DiskFault::FailSync(code)) =
            inner.take_fault(|f| matches!(f, DiskFault::FailSync(_)))
        {
            return Err(io::Error::from_raw_os_error(code));
        }
        let file = inner.file(self.id)?;
        for (from, to) in std::mem::take(&mut file.unsynced) {
            land(file, from, to);
        }
        if file.durable.len() != file.data.len() {
            file.durable.resize(file.data.len(), 0);
        }
        Ok(())
    }
}

impl DiskFile for MemHandle {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut inner = self.live()?;
        let file = inner.file(self.id)?;
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let end = start.saturating_add(buf.len());
        if end > file.data.len() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end"));
        }
        buf.copy_from_slice(&file.data[start..end]);
        Ok(())
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut inner = self.live()?;
        if !self.writable {
            return Err(io::Error::from_raw_os_error(libc::EBADF));
        }
        let mut len = buf.len();
        let mut error = None;
        match inner.take_fault(|f| matches!(f, DiskFault::FailWrite(_) | DiskFault::TearWrite)) {
            Some(DiskFault::FailWrite(code)) => return Err(io::Error::from_raw_os_error(code)),
            Some(DiskFault::TearWrite) => {
                len = (inner.next_random() % (buf.len() as u64 + 1)) as usize;
                error = Some(io::Error::from_raw_os_error(libc::EIO));
            }
            _ => {}
        }
        if let Some(capacity) = inner.capacity {
            let used = inner.used();
            let size = inner.file(self.id)?.data.len() as u64;
            let grows = (offset + len as u64).saturating_sub(size);
            let room = capacity.saturating_sub(used);
            if grows > room {
                len = (size + room).saturating_sub(offset).min(len as u64) as usize;
                error = Some(io::Error::from_raw_os_error(libc::ENOSPC));
            }
        }
        let file = inner.file(self.id)?;
        let start = offset as usize;
        let end = start + len;
        if file.data.len() < end {
            file.data.resize(end, 0);
        }
        file.data[start..end].copy_from_slice(&buf[..len]);
        if len > 0 {
            file.unsynced.push((offset, offset + len as u64));
        }
        error.map_or(Ok(()), Err)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.sync()
    }

    fn sync_all(&self) -> io::Result<()> {
        self.sync()
    }

    fn len(&self) -> io::Result<u64> {
        let mut inner = self.live()?;
        Ok(inner.file(self.id)?.data.len() as u64)
    }
}
