//! sage-convert's pipeline: a checkpoint in, a model directory out (see `model_dir`).
//!
//! Everything is planned and checked before the first byte is written (tensor presence,
//! shapes, types), then tensors stream one at a time: memory use is about one tensor, not
//! the model. Files appear under their final names only when complete, base.gguf last.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};

use crate::arch::{base_tensors, Role};
use crate::error::{dims, Error, IoContext, Result};
use crate::ggml::{dequantize_into, quantize_into, GgmlType, Gguf, GgufValue};
use crate::io::{AtomicFile, GgufStream};
use crate::model_dir::*;
use crate::names::*;
use crate::source::{self, Source, TensorMeta};

/// Told how far a long job is: (bytes done, bytes in all, what it is working on). Library
/// code reports progress through one of these and draws nothing itself.
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64, &str);

#[derive(Clone, Debug, Default)]
pub struct ConvertOptions {
    /// Type of the big non-expert tensors (embeddings, attention, output); None keeps the
    /// source's type.
    pub quant_base: Option<GgmlType>,
    /// Type of the experts; None keeps the source's type.
    pub quant_experts: Option<GgmlType>,
    /// Keep only these expert ids in every layer (a pool); None keeps all.
    pub experts: Option<Vec<u32>>,
    /// Keep these expert ids in each layer (one list per layer, e.g. a calibrated pool from
    /// `Usage::most_used`); overrides `experts`.
    pub experts_per_layer: Option<Vec<Vec<u32>>>,
    /// Also store a second, smaller record of every expert at this type (its cold copy, in
    /// `experts/blk.NNN.cold.bin`), quantized from the same source as the full one, with the
    /// same block-size fallback; None: no cold copies.
    pub cold_quant: Option<GgmlType>,
    /// Replace a model already in the output directory.
    pub force: bool,
}

#[derive(Clone, Debug)]
pub struct ConvertReport {
    pub out: PathBuf,
    pub conversion_id: String,
    /// One line per tensor whose requested type did not fit its rows.
    pub fallbacks: Vec<String>,
    /// One line per group of source tensors left out (`Source::skipped`).
    pub skipped: Vec<String>,
    pub base_bytes: u64,
    pub expert_bytes: u64,
    /// Bytes of the cold copies' records (0 without `cold_quant`).
    pub cold_bytes: u64,
    pub n_base_tensors: usize,
    pub n_experts_per_layer: usize,
}

struct Planned {
    name: String,
    src: TensorMeta,
    target: GgmlType,
}

/// Parse an expert list: `0-7`, `1,3,5`, `0-3,8`.
pub fn parse_expert_spec(spec: &str, n_expert: u32) -> Result<Vec<u32>> {
    let bad = |why: String| Error::Usage(format!("--experts '{spec}': {why}"));
    let mut ids = Vec::new();
    for part in spec.split(',').map(str::trim) {
        let num = |s: &str| s.trim().parse::<u32>().map_err(|_| bad(format!("'{s}' is not an expert id")));
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => (num(part)?, num(part)?),
        };
        if a > b {
            return Err(bad(format!("range {a}-{b} is empty")));
        }
        if b >= n_expert {
            return Err(bad(format!("expert {b} does not exist; the model has experts 0-{}", n_expert - 1)));
        }
        ids.extend(a..=b);
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

fn new_conversion_id() -> String {
    let s = RandomState::new();
    let mut h = s.build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.write_u32(std::process::id());
    let a = h.finish();
    h.write_u64(a);
    format!("{a:016x}{:016x}", h.finish())
}

/// Decide a tensor's output type (`Role::target_type` of what is asked, or of the source's
/// type), noting any fallback.
fn choose(name: &str, role: Role, src: &TensorMeta, wanted: Option<GgmlType>, fallbacks: &mut Vec<String>) -> GgmlType {
    let w = if matches!(role, Role::Weight | Role::Float) { wanted.unwrap_or(src.ty) } else { GgmlType::F32 };
    let got = role.target_type(w, src.ne[0]);
    if role == Role::Float && got != w {
        fallbacks.push(format!("{name}: kept in {got}, as llama.cpp's quantizer leaves it unquantized"));
    } else if got != w {
        fallbacks.push(format!(
            "{name}: rows of {} do not fit {w} blocks of {}; using {got}",
            src.ne[0],
            w.block_size()
        ));
    }
    got
}

fn check_convertible(path: &Path, name: &str, from: GgmlType, to: GgmlType) -> Result<()> {
    if from != to && !(from.can_dequantize() && to.can_quantize()) {
        return Err(Error::UnsupportedDtype {
            path: path.to_path_buf(),
            tensor: name.to_string(),
            got: format!("{from} (cannot be converted to {to})"),
            expected: "a type ggml can convert".into(),
        });
    }
    Ok(())
}

/// Rows of a large tensor converted at a time: bounds memory to a few such slices
/// whatever the tensor's size (a 151936-row embedding is 1.2 GB in f32).
const CHUNK_BYTES: u64 = 32 << 20;

/// Converts tensor bytes between types, reusing its buffers from tensor to tensor.
#[derive(Default)]
struct Transcoder {
    src: Vec<u8>,
    f32: Vec<f32>,
    out: Vec<u8>,
}

impl Transcoder {
    /// `self.src` (rows of `ne0` elements of `from`) as `to`.
    fn run(&mut self, path: &Path, name: &str, from: GgmlType, ne0: u64, to: GgmlType) -> Result<&[u8]> {
        if from == to {
            return Ok(&self.src);
        }
        let err = |source| Error::Tensor { path: path.to_path_buf(), tensor: name.to_string(), source };
        dequantize_into(from, &self.src, ne0, &mut self.f32).map_err(err)?;
        quantize_into(to, &self.f32, ne0, &mut self.out).map_err(err)?;
        Ok(&self.out)
    }
}

/// An expert's bias must have one value per output row, all finite.
fn check_bias(path: &Path, name: &str, b: &[f32], rows: u64) -> Result<()> {
    if b.len() as u64 != rows {
        return Err(shape_err(path, name, &[rows], &[b.len() as u64]));
    }
    if let Some(i) = b.iter().position(|x| !x.is_finite()) {
        return Err(Error::UnsupportedDtype {
            path: path.to_path_buf(),
            tensor: name.to_string(),
            got: format!("a non-finite value ({}) at {i}", b[i]),
            expected: "finite biases".into(),
        });
    }
    Ok(())
}

fn shape_err(path: &Path, name: &str, expected: &[u64], got: &[u64]) -> Error {
    Error::WrongShape { path: path.to_path_buf(), tensor: name.to_string(), expected: dims(expected), got: dims(got) }
}

/// Make the output directory ready, refusing to touch a model in it without `force`.
/// Only sage's own files are removed; anything else in the directory is left alone.
fn prepare_output(input: &Path, out: &Path, force: bool) -> Result<()> {
    let out_err = |reason: String| Error::Output { path: out.to_path_buf(), reason };
    if out.exists() {
        if !out.is_dir() {
            return Err(out_err("exists and is not a directory".into()));
        }
        let canon_out = out.canonicalize().at(out)?;
        let canon_in = input.canonicalize().at(input)?;
        if canon_in.starts_with(&canon_out) {
            return Err(out_err(format!("holds the input {}; choose another output directory", input.display())));
        }
        let non_empty = std::fs::read_dir(out).at(out)?.next().is_some();
        // What a killed conversion left (the marker, no base.gguf) is sage's own debris:
        // replace it without --force.
        let unfinished = out.join(INCOMPLETE_MARKER).exists() && !out.join(BASE).exists();
        if unfinished {
            log::warn!("{}: replacing an unfinished conversion", out.display());
        }
        if non_empty && !force && !unfinished {
            let what = if out.join(BASE).exists() {
                "a model"
            } else if out.join(INCOMPLETE_MARKER).exists() {
                "an unfinished conversion"
            } else {
                "files"
            };
            return Err(out_err(format!("already holds {what}; pass --force to replace it")));
        }
        // The model stops looking complete before anything else changes.
        for name in [BASE, TOKENIZER] {
            let p = out.join(name);
            if p.exists() {
                std::fs::remove_file(&p).at(&p)?;
            }
        }
        let experts = out.join(EXPERT_DIR);
        if experts.is_dir() {
            for e in std::fs::read_dir(&experts).at(&experts)?.filter_map(|e| e.ok()) {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with("blk.") && (n.ends_with(".bin") || n.ends_with(".bin.partial")) {
                    std::fs::remove_file(e.path()).at(e.path())?;
                }
            }
        }
        for e in std::fs::read_dir(out).at(out)?.filter_map(|e| e.ok()) {
            if e.file_name().to_string_lossy().ends_with(".partial") {
                std::fs::remove_file(e.path()).at(e.path())?;
            }
        }
    } else {
        std::fs::create_dir_all(out).at(out)?;
    }
    let experts = out.join(EXPERT_DIR);
    std::fs::create_dir_all(&experts).at(&experts)?;
    Ok(())
}

/// Convert the checkpoint at `input` into a model directory at `out`.
pub fn convert(input: &Path, out: &Path, opts: &ConvertOptions) -> Result<ConvertReport> {
    convert_with_progress(input, out, opts, &mut |_, _, _| {})
}

/// `convert`, telling `progress` how many of the source's bytes are done.
pub fn convert_with_progress(
    input: &Path,
    out: &Path,
    opts: &ConvertOptions,
    progress: Progress,
) -> Result<ConvertReport> {
    let src = source::open(input)?;
    convert_source(src.as_ref(), out, opts, progress)
}

pub fn convert_source(
    src: &dyn Source,
    out: &Path,
    opts: &ConvertOptions,
    progress: Progress,
) -> Result<ConvertReport> {
    let cfg = src.config().clone();
    let path = src.path().to_path_buf();
    let pools: Vec<Vec<u32>> = match (&opts.experts_per_layer, &opts.experts) {
        (Some(per_layer), _) => {
            if per_layer.len() != cfg.n_layer as usize {
                return Err(Error::Usage(format!(
                    "the pool lists {} layers; the model has {}",
                    per_layer.len(),
                    cfg.n_layer
                )));
            }
            per_layer.clone()
        }
        (None, Some(ids)) => vec![ids.clone(); cfg.n_layer as usize],
        (None, None) => vec![(0..cfg.n_expert).collect(); cfg.n_layer as usize],
    };
    // A dense layer has no experts: its pool is empty (its shard holds no record).
    let pools: Vec<Vec<u32>> =
        pools.into_iter().enumerate().map(|(il, ids)| if cfg.is_dense(il as u32) { Vec::new() } else { ids }).collect();
    for ids in pools.iter().filter(|ids| !ids.is_empty()) {
        if let Some(&bad) = ids.iter().find(|&&e| e >= cfg.n_expert) {
            return Err(Error::Usage(format!(
                "expert {bad} does not exist; the model has experts 0-{}",
                cfg.n_expert - 1
            )));
        }
        if (ids.len() as u32) < cfg.n_expert_used {
            return Err(Error::Usage(format!(
                "a pool of {} experts is smaller than the {} experts each token uses",
                ids.len(),
                cfg.n_expert_used
            )));
        }
    }

    // 1. Plan and check everything before writing.
    let mut fallbacks = Vec::new();
    let mut planned = Vec::new();
    for spec in base_tensors(&cfg) {
        let (name, want, role) = (spec.name, spec.ne, spec.role);
        let meta = match src.base_meta(&name)? {
            Some(m) => m,
            None => return Err(Error::MissingTensor { path: path.clone(), tensor: src.source_name(&name) }),
        };
        if meta.ne != want {
            return Err(shape_err(&path, &src.source_name(&name), &want, &meta.ne));
        }
        let wanted = if matches!(role, Role::Weight | Role::Float) { opts.quant_base } else { None };
        let target = choose(&name, role, &meta, wanted, &mut fallbacks);
        check_convertible(&path, &name, meta.ty, target)?;
        planned.push(Planned { name, src: meta, target });
    }
    let mut layers = Vec::new();
    let mut cold_layers = Vec::new();
    let mut src_expert_bytes = 0;
    for il in 0..cfg.n_layer {
        let ids = &pools[il as usize];
        let mut types = [GgmlType::F32; 3];
        let mut cold_types = [GgmlType::F32; 3];
        for p in Proj::ALL {
            let want = cfg.expert_shape(p);
            let mut target = None;
            let mut cold_target = None;
            for &e in ids {
                let m = src.expert_meta(il, e, p)?;
                let name = src.expert_source_name(il, e, p);
                if m.ne != want {
                    return Err(shape_err(&path, &name, &want, &m.ne));
                }
                let t = *target.get_or_insert_with(|| {
                    choose(&p.stacked(il), Role::Weight, &m, opts.quant_experts, &mut fallbacks)
                });
                check_convertible(&path, &name, m.ty, t)?;
                if let Some(cq) = opts.cold_quant {
                    let what = format!("{} (cold copy)", p.stacked(il));
                    let t =
                        *cold_target.get_or_insert_with(|| choose(&what, Role::Weight, &m, Some(cq), &mut fallbacks));
                    check_convertible(&path, &name, m.ty, t)?;
                }
                src_expert_bytes += m.size();
            }
            // (A dense layer's: f32, unused.)
            types[p.index()] = target.unwrap_or(GgmlType::F32);
            cold_types[p.index()] = cold_target.unwrap_or(GgmlType::F32);
            // The experts' biases (gpt-oss): present, one per output row, finite.
            if cfg.expert_bias {
                let mut b = Vec::new();
                for &e in ids {
                    src.read_expert_bias(il, e, p, &mut b)?;
                    check_bias(&path, &src.expert_bias_source_name(il, e, p), &b, want[1])?;
                }
            }
        }
        let shapes = Proj::ALL.map(|p| cfg.expert_shape(p));
        let new_layer = |file: String, types: [GgmlType; 3]| {
            let mut layer =
                ExpertLayer { il, file, ids: ids.clone(), offsets: vec![], types, shapes, bias: cfg.expert_bias };
            layer.offsets = (0..ids.len() as u64).map(|i| RECORD_ALIGN + i * layer.stride()).collect();
            layer
        };
        layers.push(new_layer(shard_name(il), types));
        if opts.cold_quant.is_some() {
            cold_layers.push(new_layer(cold_shard_name(il), cold_types));
        }
    }
    // A dense layer's (empty) shard records the types of the first layer with experts, so
    // that every layer's record geometry is one a slot of the arena holds.
    for ls in [&mut layers, &mut cold_layers] {
        if let Some(types) = ls.iter().find(|l| !l.ids.is_empty()).map(|l| l.types) {
            ls.iter_mut().filter(|l| l.ids.is_empty()).for_each(|l| l.types = types);
        }
    }
    let tokenizer = src.tokenizer()?;
    for f in &fallbacks {
        log::warn!("{f}");
    }

    // 2. Write: shards, tokenizer.json, then base.gguf (the commit point), then drop the marker.
    prepare_output(&path, out, opts.force)?;
    let conversion_id = src.conversion_id().unwrap_or_else(new_conversion_id);
    let marker = out.join(INCOMPLETE_MARKER);
    std::fs::write(
        &marker,
        format!(
            "conversion {conversion_id} of {}
",
            path.display()
        ),
    )
    .at(&marker)?;
    let src_base_bytes: u64 = planned.iter().map(|p| p.src.size()).sum();
    let total = src_base_bytes + src_expert_bytes;
    let mut done = 0;

    let mut tc = Transcoder::default();
    let mut tc_cold = Transcoder::default();
    let mut expert_bytes = 0;
    let mut cold_bytes = 0;
    let mut bias = Vec::new();
    for (i, layer) in layers.iter().enumerate() {
        let il = layer.il;
        let what = format!("experts of layer {il}");
        let mut f = AtomicFile::create(&out.join(&layer.file))?;
        f.write(&shard_header(layer, FORMAT_VERSION, &conversion_id, RecordKind::Full))?;
        // The cold copies are written beside the full records, from the same source bytes.
        let cold = cold_layers.get(i);
        let mut cf = match cold {
            Some(c) => {
                let mut cf = AtomicFile::create(&out.join(&c.file))?;
                cf.write(&shard_header(c, FORMAT_VERSION, &conversion_id, RecordKind::Cold))?;
                Some(cf)
            }
            None => None,
        };
        for &e in &layer.ids {
            for p in Proj::ALL {
                let meta = src.expert_meta(il, e, p)?;
                src.read_expert(il, e, p, &mut tc.src)?;
                let name = src.expert_source_name(il, e, p);
                if let (Some(c), Some(cf)) = (cold, cf.as_mut()) {
                    tc_cold.src.clear();
                    tc_cold.src.extend_from_slice(&tc.src);
                    let bytes = tc_cold.run(&path, &name, meta.ty, meta.ne[0], c.types[p.index()])?;
                    debug_assert_eq!(bytes.len() as u64, c.sizes()[p.index()]);
                    cf.write(bytes)?;
                }
                let bytes = tc.run(&path, &name, meta.ty, meta.ne[0], layer.types[p.index()])?;
                debug_assert_eq!(bytes.len() as u64, layer.sizes()[p.index()]);
                f.write(bytes)?;
                done += meta.size();
                progress(done, total, &what);
            }
            // The biases after the matrices, in f32, in the full and the cold record alike.
            if layer.bias {
                for p in Proj::ALL {
                    src.read_expert_bias(il, e, p, &mut bias)?;
                    let bytes: &[u8] = bytemuck::cast_slice(&bias);
                    f.write(bytes)?;
                    if let Some(cf) = cf.as_mut() {
                        cf.write(bytes)?;
                    }
                }
            }
            f.pad_to(RECORD_ALIGN)?;
            if let Some(cf) = cf.as_mut() {
                cf.pad_to(RECORD_ALIGN)?;
            }
        }
        expert_bytes += layer.record_size() * layer.ids.len() as u64;
        f.finish()?;
        if let (Some(c), Some(cf)) = (cold, cf) {
            cold_bytes += c.record_size() * c.ids.len() as u64;
            cf.finish()?;
        }
    }

    let tok_path = out.join(TOKENIZER);
    let mut tf = AtomicFile::create(&tok_path)?;
    tf.write(tokenizer.json.as_bytes())?;
    tf.finish()?;

    let mut g = Gguf::new_empty();
    let set = |g: &mut Gguf, k: &str, v: &GgufValue| g.set(k, v).map_err(|e| Error::Usage(format!("{k}: {e}")));
    for (k, v) in src.extra_kv() {
        set(&mut g, &k, &v)?;
    }
    cfg.write_gguf(&mut g)?;
    set(&mut g, GENERAL_QUANTIZATION_VERSION, &GgufValue::U32(2))?;
    for (k, v) in &tokenizer.gguf_kv {
        set(&mut g, k, v)?;
    }
    let manifest = Manifest {
        version: FORMAT_VERSION,
        conversion_id: conversion_id.clone(),
        source: src.describe(),
        layers,
        cold: cold_layers,
    };
    manifest.write_gguf(&mut g)?;
    for t in &planned {
        g.add_tensor(&t.name, t.target, &t.src.ne).map_err(|e| Error::Tensor {
            path: path.clone(),
            tensor: t.name.clone(),
            source: e,
        })?;
    }
    let base_path = out.join(BASE);
    let mut stream = GgufStream::create(&g, &base_path)?;
    let mut base_bytes = 0;
    for t in &planned {
        let (n_rows, row) = (t.src.n_rows(), t.src.row_size());
        let step = (CHUNK_BYTES / row.max(1)).max(1);
        for r0 in (0..n_rows).step_by(step as usize) {
            let rows = r0..(r0 + step).min(n_rows);
            src.read_base(&t.name, rows.clone(), &mut tc.src)?;
            let bytes = tc.run(&path, &src.source_name(&t.name), t.src.ty, t.src.ne[0], t.target)?;
            base_bytes += bytes.len() as u64;
            stream.write_part(&t.name, bytes)?;
            done += (rows.end - rows.start) * row;
            progress(done, total, &t.name);
        }
        stream.end_tensor(&t.name)?;
    }
    stream.finish()?;
    std::fs::remove_file(&marker).at(&marker)?;
    if let Ok(d) = std::fs::File::open(out) {
        let _ = d.sync_all();
    }
    Ok(ConvertReport {
        out: out.to_path_buf(),
        conversion_id,
        fallbacks,
        skipped: src.skipped(),
        base_bytes,
        expert_bytes,
        cold_bytes,
        n_base_tensors: planned.len(),
        n_experts_per_layer: pools.iter().map(Vec::len).max().unwrap_or(0),
    })
}
