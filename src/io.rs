//! File helpers: positioned reads with a truncation check, and writers that only ever leave
//! a file under its final name once it is complete (write to `NAME.partial`, fsync, rename).

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, IoContext, Result};
use crate::ggml::Gguf;

/// Bytes read from a file into a buffer kept for reuse: `buf[range]` (O_DIRECT reads land
/// at an aligned offset of the buffer, so the range need not start at 0).
#[derive(Default)]
pub struct Record {
    buf: Vec<u8>,
    range: std::ops::Range<usize>,
}

impl Record {
    pub fn bytes(&self) -> &[u8] {
        &self.buf[self.range.clone()]
    }

    /// Bytes allocated.
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }
}

/// A file the runtime reads pieces of while it runs (an expert shard). Reads are positioned
/// reads (`pread`, or O_DIRECT `pread` for `read_record`), never a memory map: a file truncated by another process while mapped
/// kills the reader with SIGBUS, a short `pread` is an error. Each read first checks that
/// the file still has the size and modification time it had when opened, so a shard
/// rewritten in place is refused instead of silently mixing two conversions. (A shard
/// replaced by rename keeps being read from the open file, consistently.)
pub struct WatchedFile {
    file: File,
    /// The same file opened with O_DIRECT, where the file system allows it.
    direct: Option<File>,
    path: PathBuf,
    len: u64,
    modified: Option<std::time::SystemTime>,
    /// Records read by each path (`read_paths`).
    direct_reads: AtomicU64,
    positioned_reads: AtomicU64,
    dropped: AtomicU64,
}

/// How the records of files were read (`WatchedFile::read_record_to`): straight from the
/// disk with O_DIRECT, with a positioned read through the page cache, and how many of those
/// reads then told the kernel to drop the pages (`drop_cached`).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct ReadPaths {
    pub direct: u64,
    pub positioned: u64,
    pub dropped: u64,
}

impl std::ops::Add for ReadPaths {
    type Output = ReadPaths;
    fn add(self, o: ReadPaths) -> ReadPaths {
        ReadPaths {
            direct: self.direct + o.direct,
            positioned: self.positioned + o.positioned,
            dropped: self.dropped + o.dropped,
        }
    }
}

/// Offset, length and memory alignment O_DIRECT reads use (the page size; every logical
/// block size of common disks divides it). Shard records start on such boundaries.
pub const DIRECT_ALIGN: usize = 4096;

impl WatchedFile {
    pub fn open(path: &Path) -> Result<WatchedFile> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = File::open(path).at(path)?;
        let m = file.metadata().at(path)?;
        let direct = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
            .open(path)
            .ok();
        Ok(WatchedFile {
            file,
            direct,
            path: path.to_path_buf(),
            len: m.len(),
            modified: m.modified().ok(),
            direct_reads: AtomicU64::new(0),
            positioned_reads: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        })
    }

    /// How this file's records were read so far.
    pub fn read_paths(&self) -> ReadPaths {
        ReadPaths {
            direct: self.direct_reads.load(Ordering::Relaxed),
            positioned: self.positioned_reads.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
        }
    }

    /// Read `len` bytes at `offset` into `rec`. `uncached`: leave none of them in the page
    /// cache: O_DIRECT (straight from the disk into an aligned part of the buffer, no copy in
    /// the kernel, no readahead past the record) where the file system supports it and
    /// `offset` is aligned, otherwise a positioned read; then `drop_cached`.
    pub fn read_record(&self, offset: u64, len: usize, what: &str, uncached: bool, rec: &mut Record) -> Result<()> {
        let span = len.next_multiple_of(DIRECT_ALIGN);
        if rec.buf.len() < span + DIRECT_ALIGN {
            rec.buf.resize(span + DIRECT_ALIGN, 0);
        }
        let a = rec.buf.as_ptr().align_offset(DIRECT_ALIGN);
        self.read_record_to(offset, len, what, uncached, &mut rec.buf[a..a + span])?;
        rec.range = a..a + len;
        Ok(())
    }

    /// `read_record` into the first `len` bytes of `dst`. The O_DIRECT path reads whole
    /// blocks: it needs `dst` aligned to `DIRECT_ALIGN` with room for `len` rounded up to it
    /// (the bytes past `len` are overwritten); otherwise a positioned read fills `dst[..len]`.
    pub fn read_record_to(&self, offset: u64, len: usize, what: &str, uncached: bool, dst: &mut [u8]) -> Result<()> {
        assert!(dst.len() >= len, "a destination smaller than the record");
        let span = len.next_multiple_of(DIRECT_ALIGN);
        let aligned = offset.is_multiple_of(DIRECT_ALIGN as u64)
            && dst.as_ptr().align_offset(DIRECT_ALIGN) == 0
            && dst.len() >= span;
        self.check_unchanged()?;
        let end = offset.saturating_add(len as u64);
        if end > self.len {
            return Err(self.truncated(what, end));
        }
        match &self.direct {
            Some(d) if uncached && aligned => {
                let mut got = 0;
                let mut path = &self.direct_reads;
                while got < len {
                    // Reads end early only at the end of the file.
                    match d.read_at(&mut dst[got..span], offset + got as u64) {
                        Ok(0) => return Err(self.truncated(what, end)),
                        Ok(n) => got += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        // EINVAL: this file system or device refuses O_DIRECT after all.
                        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                            read_exact_to(&self.file, &self.path, offset, &mut dst[..len], what)?;
                            path = &self.positioned_reads;
                            break;
                        }
                        Err(source) => return Err(Error::Io { path: self.path.clone(), source }),
                    }
                }
                path.fetch_add(1, Ordering::Relaxed);
                // Pages another reader cached stay cached under O_DIRECT; drop them too.
                self.drop_cached(offset, len);
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                read_exact_to(&self.file, &self.path, offset, &mut dst[..len], what)?;
                self.positioned_reads.fetch_add(1, Ordering::Relaxed);
                if uncached {
                    self.drop_cached(offset, len);
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }

    fn truncated(&self, what: &str, needed: u64) -> Error {
        Error::Truncated { path: self.path.clone(), what: what.to_string(), needed, got: self.len }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's size when it was opened (reads check it still has it).
    pub fn size(&self) -> u64 {
        self.len
    }

    /// Tell the kernel the bytes at `offset..offset + len` will not be needed again: their
    /// clean pages leave the page cache, so under a memory limit the budget goes to the arena
    /// rather than to a second copy of what it holds. Advice only; errors are ignored.
    pub fn drop_cached(&self, offset: u64, len: usize) {
        let _ = rustix::fs::fadvise(
            &self.file,
            offset,
            std::num::NonZeroU64::new(len as u64),
            rustix::fs::Advice::DontNeed,
        );
    }

    /// Read `len` bytes at `offset` into `buf` (resized to `len`).
    pub fn read_into(&self, offset: u64, len: usize, what: &str, buf: &mut Vec<u8>) -> Result<()> {
        self.check_unchanged()?;
        read_at_into(&self.file, &self.path, offset, len as u64, what, buf)
    }

    /// The file still has the size and modification time it had when opened.
    fn check_unchanged(&self) -> Result<()> {
        let m = self.file.metadata().at(&self.path)?;
        if m.len() != self.len || m.modified().ok() != self.modified {
            return Err(Error::Changed {
                path: self.path.clone(),
                reason: format!(
                    "{} bytes when opened, {} now{}; reload the model",
                    self.len,
                    m.len(),
                    if m.len() == self.len { ", rewritten in place" } else { "" }
                ),
            });
        }
        Ok(())
    }
}

/// Read `len` bytes at `offset`; a short file is a `Truncated` error naming `what`.
pub fn read_at(file: &File, path: &Path, offset: u64, len: u64, what: &str) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    read_at_into(file, path, offset, len, what, &mut buf)?;
    Ok(buf)
}

/// `read_at` into a reused buffer.
pub fn read_at_into(file: &File, path: &Path, offset: u64, len: u64, what: &str, buf: &mut Vec<u8>) -> Result<()> {
    buf.clear();
    buf.resize(len as usize, 0);
    read_exact_to(file, path, offset, buf, what)
}

/// Fill `dst` from `offset`; a short file is a `Truncated` error naming `what`.
fn read_exact_to(file: &File, path: &Path, offset: u64, dst: &mut [u8], what: &str) -> Result<()> {
    let file_len = file.metadata().at(path)?.len();
    let end = offset.saturating_add(dst.len() as u64);
    if end > file_len {
        return Err(Error::Truncated { path: path.to_path_buf(), what: what.to_string(), needed: end, got: file_len });
    }
    file.read_exact_at(dst, offset).map_err(|source| match source.kind() {
        // The file shrank between the size check and the read.
        std::io::ErrorKind::UnexpectedEof => {
            Error::Truncated { path: path.to_path_buf(), what: what.to_string(), needed: end, got: file_len }
        }
        _ => Error::Io { path: path.to_path_buf(), source },
    })
}

pub fn partial_name(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".partial");
    PathBuf::from(s)
}

/// A file written under `NAME.partial` and renamed to `NAME` by `finish`; dropped unfinished,
/// the partial file is removed.
pub struct AtomicFile {
    file: Option<File>,
    tmp: PathBuf,
    path: PathBuf,
    pub written: u64,
}

impl AtomicFile {
    pub fn create(path: &Path) -> Result<AtomicFile> {
        let tmp = partial_name(path);
        let file = File::create(&tmp).at(&tmp)?;
        Ok(AtomicFile { file: Some(file), tmp, path: path.to_path_buf(), written: 0 })
    }

    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.file.as_mut().expect("written after finish").write_all(bytes).at(&self.tmp)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Pad with zeros to a multiple of `align`.
    pub fn pad_to(&mut self, align: u64) -> Result<()> {
        let pad = self.written.next_multiple_of(align) - self.written;
        if pad > 0 {
            self.write(&vec![0u8; pad as usize])?;
        }
        Ok(())
    }

    /// fsync and rename into place.
    pub fn finish(mut self) -> Result<()> {
        let file = self.file.take().expect("finished twice");
        file.sync_all().at(&self.tmp)?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path).at(&self.path)?;
        Ok(())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Streams a GGUF file: the metadata of a prepared `Gguf` first, then each declared tensor's
/// data in declaration order, each checked against its declared size and padded.
pub struct GgufStream {
    out: AtomicFile,
    tensors: Vec<(String, u64)>,
    next: usize,
    alignment: u64,
    /// Where the data of the next tensor starts.
    starts_at: u64,
}

impl GgufStream {
    pub fn create(g: &Gguf, path: &Path) -> Result<GgufStream> {
        let mut out = AtomicFile::create(path)?;
        out.write(&g.meta_bytes())?;
        let tensors = g.tensors().into_iter().map(|t| (t.name, t.size)).collect();
        let starts_at = out.written;
        Ok(GgufStream { out, tensors, next: 0, alignment: g.alignment(), starts_at })
    }

    pub fn write_part(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        self.check_name(name)?;
        self.out.write(bytes)
    }

    pub fn end_tensor(&mut self, name: &str) -> Result<()> {
        self.check_name(name)?;
        let (_, size) = &self.tensors[self.next];
        let start = self.starts_at;
        if self.out.written - start != *size {
            return Err(Error::Output {
                path: self.out.path.clone(),
                reason: format!("tensor '{name}': wrote {} bytes, declared {size}", self.out.written - start),
            });
        }
        self.out.pad_to(self.alignment)?;
        self.next += 1;
        self.starts_at = self.out.written;
        Ok(())
    }

    fn check_name(&self, name: &str) -> Result<()> {
        match self.tensors.get(self.next) {
            Some((n, _)) if n == name => Ok(()),
            other => Err(Error::Output {
                path: self.out.path.clone(),
                reason: format!("tensor '{name}' written where {:?} was declared", other.map(|o| &o.0)),
            }),
        }
    }

    pub fn finish(self) -> Result<()> {
        if self.next != self.tensors.len() {
            return Err(Error::Output {
                path: self.out.path.clone(),
                reason: format!("only {} of {} tensors written", self.next, self.tensors.len()),
            });
        }
        self.out.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads return the file's bytes at aligned offsets (uncached: O_DIRECT where the file
    /// system of the temp directory allows it), unaligned ones (positioned reads), up to the
    /// end of a file whose length is not a multiple of the alignment, into a reused buffer,
    /// and refuse reads past the end.
    #[test]
    fn records_hold_the_files_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shard.bin");
        let data: Vec<u8> = (0..3 * DIRECT_ALIGN + 1000).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let f = WatchedFile::open(&path).unwrap();
        let mut rec = Record::default();
        for uncached in [true, false] {
            for (off, len) in [(0, 10), (4096, 4096), (4096, 5000), (8192, 4096 + 1000), (100, 3000), (0, data.len())] {
                f.read_record(off as u64, len, "record", uncached, &mut rec).unwrap();
                assert_eq!(rec.bytes(), &data[off..off + len], "{off} + {len}, uncached {uncached}");
            }
        }
        // Uncached reads at aligned offsets went straight from the disk (the temp directory is
        // on ext4 here, which takes O_DIRECT); the one at offset 100 and every cached read
        // were positioned reads; the uncached ones dropped their pages.
        assert_eq!(f.read_paths(), ReadPaths { direct: 5, positioned: 7, dropped: 6 });
        let err = f.read_record(8192, 8192, "record", true, &mut rec).unwrap_err().to_string();
        assert!(err.contains("record") && err.contains("shard.bin"), "{err}");
    }
}
