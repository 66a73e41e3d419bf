//! Read-only file mappings.

use std::fs::File;

/// A read-only memory map of a whole file: safetensors files (to validate their headers;
/// the converter reads data with `pread`) and expert shards (the engine copies experts from
/// them into the arena). Reading a mapping whose file another process truncates raises
/// SIGBUS; the engine checks shard sizes when it opens them, not while it runs.
pub struct Mapped {
    map: memmap2::Mmap,
}

impl Mapped {
    pub fn open(file: &File) -> std::io::Result<Mapped> {
        // SAFETY: the mapping is read-only and private to this process; sage never writes the
        // files it maps. The file could still be truncated by another process while mapped;
        // callers only touch ranges they checked against the file's length just before.
        let map = unsafe { memmap2::Mmap::map(file)? };
        Ok(Mapped { map })
    }

    pub fn bytes(&self) -> &[u8] {
        &self.map
    }
}
