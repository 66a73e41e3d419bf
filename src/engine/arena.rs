//! The expert arena: one backend buffer of fixed size, allocated once, cut into slots of one
//! stride (the largest expert record of any layer, rounded up to 4 KiB); slot 0 starts on a
//! 4 KiB boundary (up to 4 KiB before it), so O_DIRECT reads land in slots, and backends that
//! pad quantized rows get room after the last slot. For each layer and projection a 3-D
//! tensor `[ne0, ne1, n_slots]` of that layer's type is placed in the buffer at the
//! projection's offset within a record, with `nb[2]` = the stride: `mul_mat_id` picks slot
//! `s` as "expert `s`", and the graph never sees which expert a slot holds. The arena owns the
//! geometry, the slot addresses and the loading of a record into a slot; the scheduler decides
//! which expert is where.
//!
//! With cold copies in use (`EngineOptions::cold`), a second set of per-layer views of the cold
//! types lies over the same slots (same offsets within a slot, same stride): a slot holds either
//! an expert's full record or its cold one, and the engine picks the view by what it loaded.

use std::sync::Arc;

use super::ffi;
use super::options::EngineOptions;
use crate::error::Result;
use crate::ggml::{Backend, BufType, Context, FfiError, GgmlType, HostWriter, SharedBuffer, Tensor, TensorSet};
use crate::io::{Record, WatchedFile, DIRECT_ALIGN};
use crate::model_dir::{ExpertLayer, ModelDir};
use crate::names::Proj;

/// Bytes of the arena before slot 0: at most this much to align the slots (`DIRECT_ALIGN`).
const HEAD_ROOM: u64 = DIRECT_ALIGN as u64;

/// Distance between slots for a model's expert layers: the largest record, rounded up to
/// `DIRECT_ALIGN`.
pub fn slot_stride(layers: &[ExpertLayer]) -> u64 {
    layers.iter().map(|l| l.record_size()).max().unwrap_or(0).next_multiple_of(HEAD_ROOM)
}

/// Distance between slots in a GPU backend's memory: the largest record rounded up to a whole
/// number of blocks of every projection type and to the buffer's `align`. A GPU backend reads
/// the arena in place and finds slot `s` of a `[ne0, ne1, n_slots]` view at `nb[2]` = the
/// stride, which ggml-vulkan turns into a count of blocks (`nb[2] / type_size`): a stride that
/// is not a whole number of blocks (4 KiB is not, at q8_0's 34 bytes) reads every slot past
/// the first from the wrong bytes. O_DIRECT never reads into device memory, so the 4 KiB rule
/// of `slot_stride` is not needed there.
pub fn device_slot_stride(layers: &[ExpertLayer], align: u64) -> u64 {
    fn gcd(a: u64, b: u64) -> u64 {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    let unit =
        layers.iter().flat_map(|l| l.types).map(|t| t.type_size()).fold(align.max(1), |acc, b| acc / gcd(acc, b) * b);
    layers.iter().map(|l| l.record_size()).max().unwrap_or(0).next_multiple_of(unit)
}

/// Slots of `stride` bytes an arena of at most `bytes` holds, with `tail` bytes of padding
/// after the last (0 on the CPU). `sage footprint` and `Engine::load` both cut by this rule.
pub fn slots_in(bytes: u64, stride: u64, tail: u64) -> u64 {
    bytes.saturating_sub(HEAD_ROOM + tail).checked_div(stride).unwrap_or(0)
}

/// Bytes an arena of `n_slots` slots of `stride` occupies (what `slots_in` fits in).
pub fn arena_bytes(n_slots: u64, stride: u64, tail: u64) -> u64 {
    HEAD_ROOM + n_slots * stride + tail
}

/// Bytes the backend reserves past the end of the largest expert projection (some GPU
/// backends pad the last row of quantized matrices; 0 on the CPU).
pub fn tail_padding(backend: &Backend, layers: &[ExpertLayer]) -> u64 {
    let probe = Context::new(3 * layers.len(), 0);
    layers
        .iter()
        .flat_map(|l| Proj::ALL.map(|p| (l.types[p.index()], l.shapes[p.index()])))
        .map(|(ty, [ne0, ne1])| backend.alloc_padding(probe.new_tensor(ty, &[ne0 as i64, ne1 as i64])) as u64)
        .max()
        .unwrap_or(0)
}

pub(super) struct Arena {
    /// Per layer gate/up/down views ([ne0, ne1, n_slots], a stride apart), then one raw byte
    /// view of the whole arena (index 3 * n_layer), then, with cold copies, per layer the
    /// gate/up/down views of the cold types over the same slots; then, for experts with biases,
    /// per layer the f32 bias views of gate/up/down ([ne1, n_slots]), full records' then cold ones'.
    views: TensorSet,
    /// Per layer, the index in `views` of the first of its three bias views (full, cold).
    bias_views: Vec<(Option<usize>, Option<usize>)>,
    /// Whether the cold views exist.
    cold: bool,
    buf: Arc<SharedBuffer>,
    /// Writes into the arena from the I/O thread: when the arena is host memory in the files'
    /// layout (a plain copy loads a slot), for batches' reads straight into reserved slots.
    writer: Option<HostWriter>,
    /// Where slot 0 starts in `buf`.
    head: usize,
    stride: usize,
    /// Threads that repack one expert's matrices, and the smallest matrix split over them
    /// (starting a thread costs tens of microseconds).
    threads: usize,
    split_min: usize,
}

impl Arena {
    /// Allocate an arena of `n_slots` slots of `stride` (plus `tail` bytes of padding) for
    /// the layers of `md`, in buffer type `layout` (the backend's default when None), zeroed.
    /// `cold`: also views of `md`'s cold copies (the caller keeps the file layout and a stride
    /// that holds their records).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        backend: &Backend,
        md: &ModelDir,
        n_slots: usize,
        stride: u64,
        tail: u64,
        layout: Option<BufType>,
        opts: &EngineOptions,
        cold: bool,
    ) -> Result<Arena> {
        let dir = &md.path;
        let stride = stride as usize;
        let size = arena_bytes(n_slots as u64, stride as u64, tail) as usize;
        let buf = backend.alloc_buffer_in(layout, size).map_err(|e| ffi(dir, "expert arena", e))?;
        // Slots start on a DIRECT_ALIGN boundary (their stride is a multiple of it), so the I/O
        // thread can read records straight into them with O_DIRECT.
        let head = buf.offset_to_aligned(DIRECT_ALIGN);
        let cold = cold && !md.manifest.cold.is_empty();
        let n_views = if cold { 12 } else { 6 } * md.manifest.layers.len() + 1;
        let mut views = TensorSet::new(n_views);
        let add_views = |views: &mut TensorSet, layers: &[ExpertLayer], kind: &str| -> Result<()> {
            for l in layers {
                let sizes = l.sizes();
                let mut off = 0usize;
                for p in Proj::ALL {
                    let [ne0, ne1] = l.shapes[p.index()];
                    let i = views.add(
                        l.types[p.index()],
                        &[ne0 as i64, ne1 as i64, n_slots as i64],
                        &format!("arena{kind}.{}.{}", l.il, p.exps()),
                    );
                    let t = views.get(i);
                    t.set_outer_strides(stride);
                    buf.place(t, head + off).map_err(|e| ffi(dir, "expert arena", e))?;
                    off += sizes[p.index()] as usize;
                }
            }
            Ok(())
        };
        add_views(&mut views, &md.manifest.layers, "")?;
        let raw = views.add(GgmlType::I8, &[(n_slots * stride) as i64], "arena.bytes");
        buf.place(views.get(raw), head).map_err(|e| ffi(dir, "expert arena", e))?;
        if cold {
            add_views(&mut views, &md.manifest.cold, ".cold")?;
        }
        // The biases lie after a record's matrices, one f32 per output row.
        let add_bias_views = |views: &mut TensorSet, l: &ExpertLayer, kind: &str| -> Result<Option<usize>> {
            if !l.bias {
                return Ok(None);
            }
            let first = views.len();
            for p in Proj::ALL {
                let ne1 = l.shapes[p.index()][1];
                let i = views.add(
                    GgmlType::F32,
                    &[ne1 as i64, n_slots as i64],
                    &format!("arena{kind}.{}.{}.bias", l.il, p.exps()),
                );
                let t = views.get(i);
                t.set_row_stride(stride);
                buf.place(t, head + l.bias_offset(p) as usize).map_err(|e| ffi(dir, "expert arena", e))?;
            }
            Ok(Some(first))
        };
        let mut bias_views = Vec::new();
        for (i, l) in md.manifest.layers.iter().enumerate() {
            let full = add_bias_views(&mut views, l, "")?;
            let c = match (cold, md.manifest.cold.get(i)) {
                (true, Some(c)) => add_bias_views(&mut views, c, ".cold")?,
                _ => None,
            };
            bias_views.push((full, c));
        }
        // Zeros are valid weights of every type: a slot that a batch uses only with weight 0
        // (see `Engine::experts`) before anything was loaded into it contributes exactly 0,
        // never NaN from uninitialized device memory. It also commits the arena's memory up
        // front.
        buf.clear(0);
        let buf = SharedBuffer::new(buf);
        let writer = if layout.is_none() { buf.host_writer() } else { None };
        // 0 (the default): --threads threads, for matrices of 256 KiB or more (a Qwen3-30B-A3B
        // expert projection at q4_K is 884 KiB); N: exactly N, for any matrix.
        let (threads, split_min) = match opts.load_threads {
            0 => (opts.threads, 256 << 10),
            n => (n, 0),
        };
        Ok(Arena { views, bias_views, cold, buf, writer, head, stride, threads, split_min })
    }

    /// Index of the raw byte view in `views`.
    fn raw_index(&self) -> usize {
        3 * self.bias_views.len()
    }

    /// Layer `il`'s experts' biases (gate, up, down: [ne1, n_slots] f32) over every slot, read
    /// as full records (`cold` false) or cold ones; None when its experts have no biases.
    pub fn bias_views(&self, il: u32, cold: bool) -> Option<[Tensor<'_>; 3]> {
        let (full, c) = self.bias_views[il as usize];
        let first = if cold { c } else { full }?;
        Some(std::array::from_fn(|p| self.views.get(first + p)))
    }

    /// Layer `il`'s projection `p` over every slot: [ne0, ne1, n_slots].
    pub fn view(&self, il: u32, p: Proj) -> Tensor<'_> {
        self.views.get(3 * il as usize + p.index())
    }

    /// The same over the cold copies' types (slots that hold cold records); None when the
    /// arena was made without them.
    pub fn cold_view(&self, il: u32, p: Proj) -> Option<Tensor<'_>> {
        self.cold.then(|| self.views.get(self.raw_index() + 1 + 3 * il as usize + p.index()))
    }

    pub fn stride(&self) -> usize {
        self.stride
    }

    /// Bytes of the arena's buffer.
    pub fn size(&self) -> usize {
        self.buf.size()
    }

    /// Where slot `slot` starts in the buffer, and a writer for it where another thread may
    /// fill slots (host memory in the files' layout).
    pub fn writer(&self, slot: usize) -> Option<(HostWriter, usize)> {
        self.writer.clone().map(|w| (w, self.head + slot * self.stride))
    }

    /// Copy one expert's record (layer `il`, laid out as `layer` says) into slot `slot`:
    /// projections whose arena tensor is repacked are written through proxies placed at their
    /// spot (ggml repacks on write, split over threads); the others are copied as they are.
    fn load_slot(&self, il: u32, slot: usize, layer: &ExpertLayer, record: &[u8]) -> std::result::Result<(), FfiError> {
        let at = slot * self.stride;
        let raw = self.views.get(self.raw_index());
        let sizes = layer.sizes();
        let mut off = 0usize;
        for p in Proj::ALL {
            let size = sizes[p.index()] as usize;
            let part = &record[off..off + size];
            if self.view(il, p).is_repacked() {
                let [ne0, ne1] = layer.shapes[p.index()];
                let threads = if part.len() >= self.split_min { self.threads } else { 1 };
                self.buf.write_repacked(layer.types[p.index()], ne0, ne1, self.head + at + off, part, threads)?;
            } else {
                raw.write(at + off, part);
            }
            off += size;
        }
        // The biases (f32, never repacked) after the matrices.
        if off < layer.record_size() as usize {
            raw.write(at + off, &record[off..layer.record_size() as usize]);
        }
        Ok(())
    }

    /// Read expert `e` of layer `il` from its shard (through the `staging` buffer, or take the
    /// bytes the I/O thread read) into slot `slot`: its cold record from the cold shard when
    /// `cold` (the arena must have been made with the cold views). Returns the bytes read and a
    /// buffer free for reuse.
    #[allow(clippy::too_many_arguments)]
    pub fn load_expert(
        &self,
        md: &ModelDir,
        staging: &mut Record,
        drop_cache: bool,
        il: u32,
        slot: usize,
        e: u32,
        prefetched: Option<Result<Record>>,
        cold: bool,
    ) -> Result<(u64, Record)> {
        let (layer, shard): (&ExpertLayer, &WatchedFile) = match (cold, &md.cold_shards) {
            (true, Some(cold_shards)) if self.cold => (&md.manifest.cold[il as usize], &cold_shards[il as usize]),
            (false, _) => (&md.manifest.layers[il as usize], &md.shards[il as usize]),
            (true, _) => return Err(crate::error::Error::Usage("a cold load into an arena without cold views".into())),
        };
        let record = layer.record_size() as usize;
        let rec = match prefetched {
            Some(r) => r?,
            None => {
                let at = layer.record_offset(e).expect("routed experts are present");
                shard.read_record(at, record, &format!("expert {e}"), drop_cache, staging)?;
                std::mem::take(staging)
            }
        };
        let r = self.load_slot(il, slot, layer, rec.bytes()).map_err(|e| ffi(shard.path(), "expert arena", e));
        // The record just used becomes the staging buffer; the one it replaces is returned for
        // reuse (empty when the staging buffer itself was used).
        let spare = std::mem::replace(staging, rec);
        r?;
        Ok((record as u64, spare))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_fit_in_their_bytes() {
        let stride = 8192;
        for n in [0u64, 1, 3, 100] {
            let bytes = arena_bytes(n, stride, 512);
            assert_eq!(slots_in(bytes, stride, 512), n);
            assert_eq!(slots_in(bytes - 1, stride, 512), n.saturating_sub(1));
        }
        assert_eq!(slots_in(100, 0, 0), 0);
    }

    #[test]
    fn device_strides_are_whole_blocks_of_every_type() {
        let layer = |types: [GgmlType; 3], ne0: u64, ne1: u64| ExpertLayer {
            il: 0,
            file: String::new(),
            ids: vec![0, 1],
            offsets: vec![],
            shapes: [[ne0, ne1], [ne0, ne1], [ne1, ne0]],
            types,
            bias: false,
        };
        for (types, ne0, ne1) in [
            ([GgmlType::Q8_0; 3], 256, 256),
            ([GgmlType::Q4_K, GgmlType::Q4_K, GgmlType::Q5_0], 256, 96),
            ([GgmlType::Q6_K; 3], 2048, 768),
            ([GgmlType::F32; 3], 256, 256),
        ] {
            let l = layer(types, ne0, ne1);
            let s = device_slot_stride(std::slice::from_ref(&l), 64);
            assert!(s >= l.record_size() && s.is_multiple_of(64), "{types:?}: {s}");
            for t in types {
                assert_eq!(s % t.type_size(), 0, "{t}: stride {s}");
            }
            // The smallest such stride: one unit less would not hold the record.
            let unit = types.iter().fold(64u64, |a, t| num_lcm(a, t.type_size()));
            assert!(s - unit < l.record_size(), "{types:?}: {s} wastes a whole unit of {unit}");
        }
    }

    fn num_lcm(a: u64, b: u64) -> u64 {
        (1..=b).map(|k| a * k).find(|m| m % b == 0).unwrap()
    }
}
