//! `sage-convert merge`: a model directory back into one standard GGUF that unmodified
//! llama.cpp loads (stacked `blk.N.ffn_*_exps` tensors; a pool becomes a model with fewer
//! experts and a router cut to the same rows).

use std::path::Path;

use crate::error::{Error, Result};
use crate::ggml::{Gguf, GgufValue};
use crate::io::GgufStream;
use crate::model_dir::ModelDir;
use crate::names::*;

#[derive(Debug)]
pub struct MergeReport {
    pub n_tensors: usize,
    pub n_expert: u32,
    pub bytes: u64,
}

/// Write `dir` as one GGUF at `out`.
pub fn merge(dir: &Path, out: &Path, force: bool) -> Result<MergeReport> {
    let m = ModelDir::open(dir)?;
    if out.exists() && !force {
        return Err(Error::Output {
            path: out.to_path_buf(),
            reason: "already exists; pass --force to replace it".into(),
        });
    }
    // A dense layer has no experts to stack.
    let layers: Vec<_> = m.manifest.layers.iter().filter(|l| !m.config.is_dense(l.il)).collect();
    let n_pool = layers[0].ids.len();
    if let Some(l) = layers.iter().find(|l| l.ids.len() != n_pool) {
        return Err(Error::BadModelDir {
            path: dir.to_path_buf(),
            reason: format!(
                "layer {} keeps {} experts but layer 0 keeps {n_pool}; a single GGUF needs the same count in every layer",
                l.il,
                l.ids.len()
            ),
        });
    }
    let pooled = n_pool as u32 != m.config.n_expert;
    let g = m.config.gating;
    if pooled && g.grouped() {
        // llama.cpp's groups are equal runs of consecutive experts: a pool is one GGUF only
        // where every group keeps the same number of experts, at least 2 (each group scores by
        // its two best).
        let per = m.config.n_expert / g.n_group;
        let kept = |l: &crate::model_dir::ExpertLayer| -> Vec<usize> {
            (0..g.n_group).map(|gi| l.ids.iter().filter(|&&e| e / per == gi).count()).collect()
        };
        if let Some(l) = layers.iter().find(|l| {
            let k = kept(l);
            k.iter().any(|&c| c != k[0] || c < 2)
        }) {
            return Err(Error::BadModelDir {
                path: dir.to_path_buf(),
                reason: format!(
                    "layer {}'s pool keeps {:?} experts of its {} groups; llama.cpp's grouped router needs the same number, at least 2, in every group to be one GGUF",
                    l.il,
                    kept(l),
                    g.n_group
                ),
            });
        }
    }

    let mut g = Gguf::new_empty();
    for key in m.base.keys() {
        if key.starts_with(SAGE_PREFIX) || key == GENERAL_ALIGNMENT {
            continue;
        }
        let v = m.base.get(&key).expect("listed key");
        g.set(&key, &v).map_err(|e| Error::Usage(format!("{key}: {e}")))?;
    }
    if pooled {
        let key = arch_key(m.config.arch().gguf_arch(), K_EXPERT_COUNT);
        g.set(&key, &GgufValue::U32(n_pool as u32)).map_err(|e| Error::Usage(e.to_string()))?;
    }
    let tensor_err = |name: &str, e| Error::Tensor { path: out.to_path_buf(), tensor: name.to_string(), source: e };
    for t in &m.base_tensors {
        let ty = t.ty.expect("checked when opened");
        let mut ne = t.ne.clone();
        if pooled && split_blk(&t.name).is_some_and(|(_, suffix)| suffix == FFN_GATE_INP) {
            ne[1] = n_pool as u64;
        }
        if pooled
            && split_blk(&t.name).is_some_and(|(_, suffix)| suffix == FFN_GATE_INP_BIAS || suffix == FFN_EXP_PROBS_B)
        {
            ne[0] = n_pool as u64;
        }
        g.add_tensor(&t.name, ty, &ne).map_err(|e| tensor_err(&t.name, e))?;
    }
    for &l in &layers {
        for p in Proj::ALL {
            let [ne0, ne1] = l.shapes[p.index()];
            let name = p.stacked(l.il);
            g.add_tensor(&name, l.types[p.index()], &[ne0, ne1, n_pool as u64]).map_err(|e| tensor_err(&name, e))?;
        }
        // The experts' biases, as llama.cpp stacks them: [rows, n_expert] f32.
        if l.bias {
            for p in Proj::ALL {
                let name = p.stacked_bias(l.il);
                let rows = l.shapes[p.index()][1];
                g.add_tensor(&name, crate::ggml::GgmlType::F32, &[rows, n_pool as u64])
                    .map_err(|e| tensor_err(&name, e))?;
            }
        }
    }

    let mut s = GgufStream::create(&g, out)?;
    let mut bytes = 0u64;
    let mut buf = Vec::new();
    for t in &m.base_tensors {
        let il = layers.iter().position(|l| t.name == blk(l.il, FFN_GATE_INP));
        let bias_il =
            layers.iter().position(|l| t.name == blk(l.il, FFN_GATE_INP_BIAS) || t.name == blk(l.il, FFN_EXP_PROBS_B));
        match il.or(bias_il) {
            Some(il) if pooled => {
                // The router keeps only the pool's rows (row e is expert e's logit weights),
                // its bias only the pool's values.
                let row = if bias_il.is_some() { t.size / t.ne[0] } else { t.size / t.ne[1] };
                for &e in &layers[il].ids {
                    m.read_base_range(t, e as u64 * row..(e as u64 + 1) * row, &mut buf)?;
                    s.write_part(&t.name, &buf)?;
                    bytes += row;
                }
            }
            _ => {
                // A slice of whole rows at a time: memory stays small whatever the tensor's size.
                let row = t.size / t.ne[1..].iter().product::<u64>().max(1);
                let step = (32u64 << 20).next_multiple_of(row.max(1));
                for start in (0..t.size).step_by(step as usize) {
                    m.read_base_range(t, start..(start + step).min(t.size), &mut buf)?;
                    s.write_part(&t.name, &buf)?;
                }
                bytes += t.size;
            }
        }
        s.end_tensor(&t.name)?;
    }
    for &l in &layers {
        let sizes = l.sizes();
        for p in Proj::ALL {
            let name = p.stacked(l.il);
            let start: u64 = sizes[..p.index()].iter().sum();
            for &e in &l.ids {
                m.read_expert_part(l.il, e, start..start + sizes[p.index()], &mut buf)?;
                s.write_part(&name, &buf)?;
                bytes += sizes[p.index()];
            }
            s.end_tensor(&name)?;
        }
        if l.bias {
            let bias_sizes = l.bias_sizes();
            for p in Proj::ALL {
                let name = p.stacked_bias(l.il);
                let start = l.bias_offset(p);
                for &e in &l.ids {
                    m.read_expert_part(l.il, e, start..start + bias_sizes[p.index()], &mut buf)?;
                    s.write_part(&name, &buf)?;
                    bytes += bias_sizes[p.index()];
                }
                s.end_tensor(&name)?;
            }
        }
    }
    s.finish()?;
    Ok(MergeReport { n_tensors: g.n_tensors(), n_expert: n_pool as u32, bytes })
}
