//! The base weights on the backend: everything but the experts, loaded once from base.gguf
//! a slice at a time. On the CPU quantized matrices go into ggml's repacking buffer, where
//! its faster kernels run on them, as llama.cpp does by default; the token embedding (read
//! by `get_rows`) stays plain.

use super::ffi;
use super::options::EngineOptions;
use crate::error::{Error, Result};
use crate::ggml::{Backend, Buffer, GgmlType, GgufTensorInfo, Tensor, TensorSet};
use crate::graph::LayerWeights;
use crate::model_dir::ModelDir;
use crate::names::*;

pub(super) struct BaseWeights {
    /// Every base tensor but the token embedding.
    pub weights: TensorSet,
    buf: Buffer,
    /// The token embedding alone (plain layout: get_rows reads it).
    pub embd: TensorSet,
    embd_buf: Buffer,
    /// Per layer: (suffix, index in `weights`) of each of its tensors.
    layers: Vec<Vec<(String, usize)>>,
    output_norm: usize,
    /// None when tied to the token embedding.
    output: Option<usize>,
    /// Capacity of the buffer that carried the base from disk (freed after loading).
    pub load_buffer: usize,
}

impl BaseWeights {
    /// Allocate the base tensors of `md` on `backend` and read them in.
    pub fn load(md: &ModelDir, backend: &Backend, opts: &EngineOptions) -> Result<BaseWeights> {
        let base_path = &md.base_path;
        let repack = if opts.repack { backend.repack_buffer_type() } else { None };
        let mut weights = TensorSet::new(md.base_tensors.len() + 1);
        let mut embd = TensorSet::new(1);
        let mut index = std::collections::HashMap::new();
        for t in &md.base_tensors {
            let ne: Vec<i64> = t.ne.iter().map(|&n| n as i64).collect();
            let ty = t.ty.expect("checked when opened");
            if t.name != TOKEN_EMBD {
                index.insert(t.name.clone(), weights.add(ty, &ne, &t.name));
            } else {
                embd.add(ty, &ne, &t.name);
            }
        }
        let buf =
            backend.alloc_ctx_tensors_in(weights.context(), repack).map_err(|e| ffi(base_path, "base weights", e))?;
        let embd_buf = backend.alloc_ctx_tensors(embd.context()).map_err(|e| ffi(base_path, "token embedding", e))?;
        let mut bytes = Vec::new();
        for t in &md.base_tensors {
            let dst = match index.get(&t.name) {
                Some(&i) => weights.get(i),
                None => embd.get(0),
            };
            if dst.is_repacked() {
                write_repacked(md, t, dst, &buf, opts.load_slice, &mut bytes)?;
            } else {
                write_plain(md, t, dst, opts.load_slice, &mut bytes)?;
            }
        }
        let load_buffer = bytes.capacity();
        let mut layers = vec![Vec::new(); md.config.n_layer as usize];
        for (name, &i) in &index {
            if let Some((il, suffix)) = split_blk(name) {
                if let Some(l) = layers.get_mut(il as usize) {
                    l.push((suffix.to_string(), i));
                }
            }
        }
        let get = |name: &str| -> Result<usize> {
            index
                .get(name)
                .copied()
                .ok_or_else(|| Error::MissingTensor { path: base_path.clone(), tensor: name.into() })
        };
        Ok(BaseWeights {
            output_norm: get(OUTPUT_NORM)?,
            output: get(OUTPUT).ok(),
            weights,
            buf,
            embd,
            embd_buf,
            layers,
            load_buffer,
        })
    }

    /// Layer `il`'s tensors.
    pub fn layer(&self, il: u32) -> LayerWeights<'_> {
        LayerWeights { set: &self.weights, index: &self.layers[il as usize], il }
    }

    pub fn token_embd(&self) -> Tensor<'_> {
        self.embd.get(0)
    }

    pub fn output_norm(&self) -> Tensor<'_> {
        self.weights.get(self.output_norm)
    }

    /// The lm head: `output`, or the token embedding when tied to it.
    pub fn output(&self) -> Tensor<'_> {
        self.output.map_or_else(|| self.embd.get(0), |i| self.weights.get(i))
    }

    /// Bytes on the backend.
    pub fn bytes(&self) -> usize {
        self.buf.size() + self.embd_buf.size()
    }
}

/// Rows per slice when a repacked base matrix is loaded: a multiple of 64 (every row
/// interleave of ggml's repacked layouts divides it) of about `slice` bytes.
fn repack_slice_rows(row_bytes: u64, slice: u64) -> u64 {
    (slice / row_bytes.max(1) / 64).max(1) * 64
}

/// Load base tensor `t` into `dst`, which ggml keeps repacked. ggml repacks only whole
/// tensors, so a slice of rows goes through a proxy tensor of those rows placed at their spot
/// (a repacked layout keeps each group of rows in its own bytes, at the same offset as
/// unpacked): loading the 175 MB output matrix of Qwen3-30B-A3B then needs a buffer of one
/// slice (16 MiB by default), not a second copy of it. Where ggml would lay a slice out
/// differently from the whole matrix, the whole matrix is written at once.
fn write_repacked(
    md: &ModelDir,
    t: &GgufTensorInfo,
    dst: Tensor<'_>,
    dst_buf: &Buffer,
    slice: usize,
    buf: &mut Vec<u8>,
) -> Result<()> {
    let (ne0, ne1) = (t.ne[0], t.ne.get(1).copied().unwrap_or(1));
    let row = t.size / ne1.max(1);
    let rows = repack_slice_rows(row, slice as u64);
    let ty = t.ty.expect("checked when opened");
    let err = |e| ffi(&md.base_path, &t.name, e);
    let at = dst_buf.offset_of(dst);
    let sliced = match at {
        Some(at) if ne1 > rows && t.ne.iter().skip(2).all(|&n| n == 1) => {
            dst_buf.slices_keep_layout(ty, ne0, ne1, at, row as usize, rows).map_err(err)?
        }
        _ => false,
    };
    if !sliced {
        md.read_base_range(t, 0..t.size, buf)?;
        dst.write_whole(buf);
        return Ok(());
    }
    let at = at.expect("checked");
    for r0 in (0..ne1).step_by(rows as usize) {
        let n = rows.min(ne1 - r0);
        md.read_base_range(t, r0 * row..(r0 + n) * row, buf)?;
        dst_buf.write_repacked(ty, ne0, n, at + (r0 * row) as usize, buf, 1).map_err(err)?;
    }
    Ok(())
}

/// Load base tensor `t` into `dst` (plain layout) a slice at a time, so reading a large
/// embedding needs no second copy of it. f32 tensors (norms, biases, routers) are checked on
/// the way: NaN or Inf there silently ruins every token's routing.
fn write_plain(md: &ModelDir, t: &GgufTensorInfo, dst: Tensor<'_>, slice: usize, buf: &mut Vec<u8>) -> Result<()> {
    let f32 = t.ty == Some(GgmlType::F32);
    let step = (slice as u64).max(4) / 4 * 4; // slices hold whole f32 values
    let mut at = 0;
    let mut bad = 0;
    while at < t.size {
        let end = (at + step).min(t.size);
        md.read_base_range(t, at..end, buf)?;
        if f32 {
            bad += buf.chunks_exact(4).filter(|b| !f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite()).count();
        }
        dst.write(at as usize, buf);
        at = end;
    }
    if bad > 0 {
        log::warn!(
            "{}: tensor '{}' has {bad} NaN or infinite values of {}; output will be wrong",
            md.base_path.display(),
            t.name,
            t.size / 4
        );
    }
    Ok(())
}
