//! The storage seam under the journal: every file operation the journal does goes through
//! [`Disk`], implemented by real files in production ([`RealDisk`]) and by the in-memory,
//! fault-injecting [`super::memdisk::MemDisk`] in the simulator and tests.
//!
//! The seam is deliberately small: positioned reads and writes, data and full syncs, length,
//! and the directory operations the journal needs (create, rename, remove, list, directory
//! sync). A file handle stays valid across a rename of its file, as a descriptor does.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// An open file on a [`Disk`].
pub trait DiskFile: Send + Sync + fmt::Debug {
    /// Reads exactly `buf.len()` bytes at `offset` (`UnexpectedEof` past the end).
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, extending the file if needed. On error a prefix of
    /// `buf` may have been written.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes the file's data durable (`fdatasync`).
    fn sync_data(&self) -> io::Result<()>;
    /// Makes the file's data and metadata durable (`fsync`).
    fn sync_all(&self) -> io::Result<()>;
    /// The file's length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Whether the file is empty.
    fn is_empty(&self) -> io::Result<bool> {
        self.len().map(|n| n == 0)
    }
    /// Reads the whole file into `buf` (which is cleared first).
    fn read_to_end(&self, buf: &mut Vec<u8>) -> io::Result<()> {
        let len = usize::try_from(self.len()?)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "file too large"))?;
        buf.clear();
        buf.resize(len, 0);
        self.read_exact_at(buf, 0)
    }
}

/// A filesystem as the journal sees it.
pub trait Disk: Send + Sync + fmt::Debug {
    /// Opens an existing file for reading and writing.
    fn open(&self, path: &Path) -> io::Result<Box<dyn DiskFile>>;
    /// Opens an existing file for reading only.
    fn open_read(&self, path: &Path) -> io::Result<Box<dyn DiskFile>>;
    /// Creates a new, empty file (`AlreadyExists` if there is one) for reading and writing.
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn DiskFile>>;
    /// Renames a file, replacing `to` if it exists. Durable after [`Disk::sync_dir`].
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file. Durable after [`Disk::sync_dir`].
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// The names of the entries of a directory, in no particular order.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Makes creations, renames and removals in `dir` durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Creates a directory and its parents.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Whether `dir` is an existing directory.
    fn is_dir(&self, dir: &Path) -> bool;
    /// Whether `path` exists.
    fn exists(&self, path: &Path) -> bool;
}

/// The disk a journal runs on: real files unless a test or the simulator says otherwise.
#[derive(Clone)]
pub struct Storage(Arc<dyn Disk>);

impl Storage {
    /// Real files ([`RealDisk`]).
    pub fn real() -> Storage {
        Storage(Arc::new(RealDisk))
    }

    /// Any disk.
    pub fn new(disk: Arc<dyn Disk>) -> Storage {
        Storage(disk)
    }

    pub fn disk(&self) -> &dyn Disk {
        &*self.0
    }
}

impl Default for Storage {
    fn default() -> Self {
        Storage::real()
    }
}

impl fmt::Debug for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::ops::Deref for Storage {
    type Target = dyn Disk;
    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

/// Real files through `std::fs`.
#[derive(Debug, Clone, Copy, Default)]
pub struct RealDisk;

#[derive(Debug)]
struct RealFile(File);

impl DiskFile for RealFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_exact_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn sync_all(&self) -> io::Result<()> {
        self.0.sync_all()
    }
    fn len(&self) -> io::Result<u64> {
        self.0.metadata().map(|m| m.len())
    }
    fn read_to_end(&self, buf: &mut Vec<u8>) -> io::Result<()> {
        buf.clear();
        (&self.0).read_to_end(buf).map(|_| ())
    }
}

impl Disk for RealDisk {
    fn open(&self, path: &Path) -> io::Result<Box<dyn DiskFile>> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        Ok(Box::new(RealFile(file)))
    }
    fn open_read(&self, path: &Path) -> io::Result<Box<dyn DiskFile>> {
        Ok(Box::new(RealFile(File::open(path)?)))
    }
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn DiskFile>> {
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(path)?;
        Ok(Box::new(RealFile(file)))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(dir)? {
            if let Some(name) = entry?.file_name().to_str() {
                names.push(name.to_string());
            }
        }
        Ok(names)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir).and_then(|d| d.sync_all())
    }
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)
    }
    fn is_dir(&self, dir: &Path) -> bool {
        dir.is_dir()
    }
    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
}

/// Copies a file within one disk and makes the copy durable (the archive's fallback when a
/// rename crosses filesystems).
pub fn copy_file(disk: &dyn Disk, from: &Path, to: &Path) -> io::Result<()> {
    let mut buf = Vec::new();
    disk.open_read(from)?.read_to_end(&mut buf)?;
    let _ = disk.remove(to);
    let out = disk.create_new(to)?;
    out.write_all_at(&buf, 0)?;
    out.sync_all()
}

/// The parent directory of `path` (empty for a bare name).
pub(crate) fn parent_of(path: &Path) -> PathBuf {
    path.parent().map(Path::to_path_buf).unwrap_or_default()
}
