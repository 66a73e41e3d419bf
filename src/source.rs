//! Inputs of the converter: a Hugging Face safetensors checkpoint or a llama.cpp GGUF, both
//! seen through one interface that yields tensors under llama.cpp's names, one at a time.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors};

use crate::arch::{base_tensors, FromHf, HfLayout, TensorSpec};
use crate::config::{read_hf_config, ModelConfig};
use crate::error::{Error, IoContext, Result};
use crate::ggml::{dequantize_into, GgmlType, Gguf, GgufTensorInfo, GgufValue, Mapped};
use crate::io::read_at_into;
use crate::names::*;
use crate::tokenizer::TokenizerData;
use std::ops::Range;

/// Type and shape (ggml order: ne[0] is the row length) of a source tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorMeta {
    pub ty: GgmlType,
    pub ne: Vec<u64>,
}

impl TensorMeta {
    pub fn size(&self) -> u64 {
        self.ty.tensor_size(&self.ne).unwrap_or(0)
    }

    /// Bytes of one row (ne[0] elements).
    pub fn row_size(&self) -> u64 {
        self.ty.row_size(self.ne[0]).unwrap_or(0)
    }

    /// Number of rows (all dimensions past the first).
    pub fn n_rows(&self) -> u64 {
        self.ne[1..].iter().product()
    }
}

/// A checkpoint to convert.
pub trait Source {
    /// The file or directory given by the user.
    fn path(&self) -> &Path;
    fn config(&self) -> &ModelConfig;
    fn tokenizer(&self) -> Result<TokenizerData>;
    /// Meta of a non-expert tensor under its llama.cpp name; Ok(None) when absent.
    fn base_meta(&self, name: &str) -> Result<Option<TensorMeta>>;
    /// Rows `rows` of a non-expert tensor, as stored, into `buf` (large tensors are
    /// converted a slice of rows at a time).
    fn read_base(&self, name: &str, rows: Range<u64>, buf: &mut Vec<u8>) -> Result<()>;
    /// Meta of one expert's projection (2-D).
    fn expert_meta(&self, il: u32, e: u32, proj: Proj) -> Result<TensorMeta>;
    /// One expert's projection, as stored, into `buf`.
    fn read_expert(&self, il: u32, e: u32, proj: Proj, buf: &mut Vec<u8>) -> Result<()>;
    /// One expert's bias on projection `proj` (one value per output row), in f32, for
    /// families whose experts have biases (`ModelConfig::expert_bias`).
    fn read_expert_bias(&self, il: u32, _e: u32, proj: Proj, _out: &mut Vec<f32>) -> Result<()> {
        Err(Error::MissingTensor { path: self.path().to_path_buf(), tensor: proj.stacked_bias(il) })
    }
    /// The source's own name for one expert's bias, for error messages.
    fn expert_bias_source_name(&self, il: u32, e: u32, proj: Proj) -> String {
        format!("{}[expert {e}]", proj.stacked_bias(il))
    }
    /// A short description for the manifest (`sage.source`).
    fn describe(&self) -> String;
    /// What of the source the conversion leaves out (a vision tower, next-token-prediction
    /// layers), a line per group.
    fn skipped(&self) -> Vec<String> {
        Vec::new()
    }
    /// Metadata to carry into base.gguf as it is (a GGUF's own keys); sage's keys override.
    fn extra_kv(&self) -> Vec<(String, GgufValue)> {
        Vec::new()
    }
    /// The source's own name for a base tensor, for error messages (`model.norm.weight`).
    fn source_name(&self, name: &str) -> String {
        name.to_string()
    }
    /// The source's own name for one expert's projection, for error messages.
    fn expert_source_name(&self, il: u32, e: u32, proj: Proj) -> String {
        format!("{}[expert {e}]", proj.stacked(il))
    }
    /// A fixed conversion id, for sources whose output is a function of their inputs alone
    /// (synthetic models: same seed, same bytes); None draws a fresh random id.
    fn conversion_id(&self) -> Option<String> {
        None
    }
}

/// Open a checkpoint: a directory with `config.json` (Hugging Face) or a `.gguf` file.
pub fn open(path: &Path) -> Result<Box<dyn Source>> {
    if path.is_dir() {
        Ok(Box::new(HfSource::open(path)?))
    } else if path.is_file() {
        Ok(Box::new(GgufSource::open(path)?))
    } else {
        // Not there (or not readable): let the OS say why.
        std::fs::metadata(path).at(path)?;
        Err(Error::Usage(format!("{}: neither a checkpoint directory nor a GGUF file", path.display())))
    }
}

// ---------------------------------------------------------------------------------------------
// Hugging Face safetensors

struct StEntry {
    file: usize,
    dtype: Dtype,
    /// Hugging Face shape (outermost first).
    shape: Vec<u64>,
    /// Absolute byte range in the file.
    start: u64,
    end: u64,
}

pub struct HfSource {
    dir: PathBuf,
    layout: HfLayout,
    config: ModelConfig,
    files: Vec<(PathBuf, File)>,
    tensors: BTreeMap<String, StEntry>,
    /// The base tensors the family declares, by llama.cpp name.
    specs: BTreeMap<String, TensorSpec>,
    /// Tensors outside the text model (`HfLayout::keep`), by their first two name parts.
    skipped: BTreeMap<String, usize>,
}

fn ggml_type_of(dtype: Dtype) -> Option<GgmlType> {
    match dtype {
        Dtype::F32 => Some(GgmlType::F32),
        Dtype::F16 => Some(GgmlType::F16),
        Dtype::BF16 => Some(GgmlType::BF16),
        _ => None,
    }
}

impl HfSource {
    pub fn open(dir: &Path) -> Result<HfSource> {
        let (layout, config) = read_hf_config(&dir.join("config.json"))?;
        let index = dir.join("model.safetensors.index.json");
        let names: Vec<String> = if index.exists() {
            let text = std::fs::read_to_string(&index).at(&index)?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::BadSafetensors { path: index.clone(), reason: e.to_string() })?;
            let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| Error::BadSafetensors {
                path: index.clone(),
                reason: "no 'weight_map' object".into(),
            })?;
            let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
            files.sort();
            files.dedup();
            for f in &files {
                // Names from the input never become paths outside the checkpoint directory.
                if f.contains('/') || f.contains('\\') || f.starts_with('.') {
                    return Err(Error::BadSafetensors {
                        path: index.clone(),
                        reason: format!("file name '{f}' is not a plain file name"),
                    });
                }
            }
            files
        } else {
            let mut files: Vec<String> = std::fs::read_dir(dir)
                .at(dir)?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".safetensors"))
                .collect();
            files.sort();
            files
        };
        if names.is_empty() {
            return Err(Error::BadSafetensors { path: dir.to_path_buf(), reason: "no *.safetensors files".into() });
        }
        let mut files = Vec::new();
        let mut tensors = BTreeMap::new();
        let mut skipped = BTreeMap::new();
        for (fi, name) in names.iter().enumerate() {
            let path = dir.join(name);
            let file = File::open(&path).at(&path)?;
            let map = Mapped::open(&file).at(&path)?;
            let bad = |reason: String| Error::BadSafetensors { path: path.clone(), reason };
            let (n, meta) = SafeTensors::read_metadata(map.bytes()).map_err(|e| match e {
                safetensors::SafeTensorError::MetadataIncompleteBuffer
                | safetensors::SafeTensorError::InvalidHeaderLength => Error::Truncated {
                    path: path.clone(),
                    what: "tensor data".into(),
                    needed: header_end(map.bytes()),
                    got: map.bytes().len() as u64,
                },
                other => bad(other.to_string()),
            })?;
            let data_start = 8 + n as u64;
            for (tname, info) in meta.tensors() {
                if !layout.keeps(&tname) {
                    let group: Vec<&str> = tname.splitn(3, '.').take(2).collect();
                    *skipped.entry(group.join(".")).or_insert(0) += 1;
                    continue;
                }
                // Layers after the last (next-token prediction: GLM-4.5's model.layers.46,
                // DeepSeek-V3's model.layers.61) are not part of the model sage runs.
                let layers = format!("{}layers.", layout.model_prefix);
                if let Some(il) = tname.strip_prefix(&layers).and_then(|r| r.split('.').next()?.parse::<u32>().ok()) {
                    if il >= config.n_layer {
                        *skipped.entry(format!("{layers}{il}")).or_insert(0) += 1;
                        continue;
                    }
                }
                let (b, e) = info.data_offsets;
                tensors.insert(
                    tname,
                    StEntry {
                        file: fi,
                        dtype: info.dtype,
                        shape: info.shape.iter().map(|&s| s as u64).collect(),
                        start: data_start + b as u64,
                        end: data_start + e as u64,
                    },
                );
            }
            files.push((path, file));
        }
        let specs = base_tensors(&config).into_iter().map(|t| (t.name.clone(), t)).collect();
        Ok(HfSource { dir: dir.to_path_buf(), layout, config, files, tensors, specs, skipped })
    }

    /// Hugging Face name of a base tensor (llama.cpp name in): the first of the family's
    /// names for it that the checkpoint has, else the first (for error messages).
    fn hf_base_name(&self, name: &str) -> Option<String> {
        if name == OUTPUT {
            return Some(self.layout.lm_head.into());
        }
        let names: Vec<String> =
            self.specs.get(name)?.hf.iter().map(|h| format!("{}{h}", self.layout.model_prefix)).collect();
        names.iter().find(|n| self.tensors.contains_key(*n)).or(names.first()).cloned()
    }

    fn entry_meta(&self, hf_name: &str, e: &StEntry) -> Result<TensorMeta> {
        let ty = ggml_type_of(e.dtype).ok_or_else(|| Error::UnsupportedDtype {
            path: self.files[e.file].0.clone(),
            tensor: hf_name.to_string(),
            got: format!("{:?}", e.dtype),
            expected: "F32, F16 or BF16".into(),
        })?;
        // ggml order; trailing 1s dropped, as GGUF files record shapes ([1, n_embd] gates), and
        // inner 1s of 3-D tensors (a depthwise Conv1d's kernels [channels, 1, taps]), as
        // llama.cpp's converter squeezes them.
        let mut ne: Vec<u64> = e.shape.iter().rev().copied().collect();
        while ne.len() > 1 && ne.last() == Some(&1) {
            ne.pop();
        }
        if ne.len() == 3 && ne[1] == 1 {
            ne.remove(1);
        }
        Ok(TensorMeta { ty, ne })
    }

    fn read(&self, hf_name: &str, e: &StEntry, start: u64, len: u64, buf: &mut Vec<u8>) -> Result<()> {
        let (path, file) = &self.files[e.file];
        read_at_into(file, path, start, len, &format!("tensor '{hf_name}'"), buf)
    }

    /// transformers 5's fused tensor holding `proj` of every expert of layer `il`.
    fn fused(&self, il: u32, proj: Proj) -> Option<(String, &StEntry)> {
        let n = self.fused_name(il, proj);
        self.tensors.get(&n).map(|e| (n, e))
    }

    fn fused_name(&self, il: u32, proj: Proj) -> String {
        let [gate_up, down] = self.config.arch().hf_fused_experts(il);
        format!("{}{}", self.layout.model_prefix, if proj == Proj::Down { down } else { gate_up })
    }

    fn per_expert_name(&self, il: u32, e: u32, proj: Proj) -> String {
        format!("{}{}", self.layout.model_prefix, self.config.arch().hf_expert(il, e, proj))
    }

    fn missing(&self, tensor: String) -> Error {
        Error::MissingTensor { path: self.dir.clone(), tensor }
    }

    /// gpt-oss's experts of layer `il` (`Arch::hf_interleaved_experts`): the tensor `name`
    /// under the family's prefix, with its entry.
    fn interleaved(&self, il: u32, name: &str) -> Option<(String, &StEntry)> {
        let prefix = self.config.arch().hf_interleaved_experts(il)?;
        let full = format!("{}{prefix}{name}", self.layout.model_prefix);
        self.tensors.get(&full).map(|e| (full, e))
    }

    fn interleaved_name(&self, il: u32, name: &str) -> String {
        let prefix = self.config.arch().hf_interleaved_experts(il).unwrap_or_default();
        format!("{}{prefix}{name}", self.layout.model_prefix)
    }

    fn wrong_shape(&self, name: &str, e: &StEntry, expected: String) -> Error {
        Error::WrongShape {
            path: self.files[e.file].0.clone(),
            tensor: name.to_string(),
            expected,
            got: format!("{:?}", e.shape),
        }
    }

    /// An interleaved layout's projection `proj` of expert `e` (see `Arch::hf_interleaved_experts`).
    fn interleaved_meta(&self, il: u32, e: u32, proj: Proj) -> Result<Interleaved<'_>> {
        let cfg = &self.config;
        let (d, f, n_exp) = (cfg.n_embd, cfg.n_ff_exp, cfg.n_expert as u64);
        let stem = if proj == Proj::Down { "down_proj" } else { "gate_up_proj" };
        // Rows of the stored matrix per expert (gate and up interleaved: twice F) and inputs.
        let (rows, cols) = if proj == Proj::Down { (d, f) } else { (2 * f, d) };
        let par = match proj {
            Proj::Gate => 0,
            Proj::Up => 1,
            Proj::Down => 0,
        };
        let (out_rows, step) = if proj == Proj::Down { (d, 1) } else { (f, 2) };
        if e as u64 >= n_exp {
            return Err(self.missing(format!("{}[{e}]", self.interleaved_name(il, stem))));
        }
        let blocks_name = format!("{stem}_blocks");
        if let Some((bname, b)) = self.interleaved(il, &blocks_name) {
            // MXFP4: blocks [E, rows, cols/32, 16] and scales [E, rows, cols/32], both u8.
            let nb = cols / 32;
            if b.dtype != Dtype::U8 || b.shape != [n_exp, rows, nb, 16] || cols % 32 != 0 {
                return Err(self.wrong_shape(&bname, b, format!("U8 [{n_exp}, {rows}, {nb}, 16] (MXFP4 blocks)")));
            }
            let sname = self.interleaved_name(il, &format!("{stem}_scales"));
            let sc = self.tensors.get(&sname).ok_or_else(|| self.missing(sname.clone()))?;
            if sc.dtype != Dtype::U8 || sc.shape != [n_exp, rows, nb] {
                return Err(self.wrong_shape(&sname, sc, format!("U8 [{n_exp}, {rows}, {nb}] (MXFP4 scales)")));
            }
            return Ok(Interleaved {
                meta: TensorMeta { ty: GgmlType::MXFP4, ne: vec![cols, out_rows] },
                data: (bname, b),
                scales: Some((sname, sc)),
                rows,
                cols,
                par,
                step,
            });
        }
        // Unquantized, as transformers uses it (x @ W): [E, cols, rows].
        let (name, entry) = self.interleaved(il, stem).ok_or_else(|| self.missing(self.interleaved_name(il, stem)))?;
        let ty = ggml_type_of(entry.dtype).ok_or_else(|| Error::UnsupportedDtype {
            path: self.files[entry.file].0.clone(),
            tensor: name.clone(),
            got: format!("{:?}", entry.dtype),
            expected: "F32, F16 or BF16 (or MXFP4 as *_blocks and *_scales)".into(),
        })?;
        if entry.shape != [n_exp, cols, rows] {
            return Err(self.wrong_shape(&name, entry, format!("[{n_exp}, {cols}, {rows}]")));
        }
        Ok(Interleaved {
            meta: TensorMeta { ty, ne: vec![cols, out_rows] },
            data: (name, entry),
            scales: None,
            rows,
            cols,
            par,
            step,
        })
    }

    /// Expert `e`'s projection from an interleaved layout, in ggml's row order and block layout.
    fn read_interleaved(&self, il: u32, e: u32, proj: Proj, buf: &mut Vec<u8>) -> Result<()> {
        let x = self.interleaved_meta(il, e, proj)?;
        let (name, entry) = &x.data;
        let e = e as u64;
        let mut slab = Vec::new();
        buf.clear();
        match &x.scales {
            Some((sname, sc)) => {
                let nb = x.cols / 32;
                let (row_b, row_s) = (nb * 16, nb);
                self.read(name, entry, entry.start + e * x.rows * row_b, x.rows * row_b, &mut slab)?;
                let mut scales = Vec::new();
                self.read(sname, sc, sc.start + e * x.rows * row_s, x.rows * row_s, &mut scales)?;
                buf.reserve((x.meta.ne[1] * nb * 17) as usize);
                for r in (x.par..x.rows).step_by(x.step as usize) {
                    for b in 0..nb {
                        let at = (r * row_b + b * 16) as usize;
                        buf.push(scales[(r * row_s + b) as usize]);
                        buf.extend_from_slice(&mxfp4_block_to_ggml(slab[at..at + 16].try_into().unwrap()));
                    }
                }
            }
            None => {
                // [cols, rows] elements: output row j gathers column par + j*step.
                let es = x.meta.ty.type_size() as usize;
                let per = x.cols * x.rows * es as u64;
                self.read(name, entry, entry.start + e * per, per, &mut slab)?;
                buf.reserve(per as usize / x.step as usize);
                for r in (x.par..x.rows).step_by(x.step as usize) {
                    for c in 0..x.cols {
                        let at = ((c * x.rows + r) as usize) * es;
                        buf.extend_from_slice(&slab[at..at + es]);
                    }
                }
            }
        }
        Ok(())
    }
}

/// One projection of an interleaved expert layout: its ggml meta, the stored tensor (and the
/// MXFP4 scales), the stored rows and columns per expert, and which rows are this projection's
/// (`par`, `par + step`, …).
struct Interleaved<'a> {
    meta: TensorMeta,
    data: (String, &'a StEntry),
    scales: Option<(String, &'a StEntry)>,
    rows: u64,
    cols: u64,
    par: u64,
    step: u64,
}

/// One 32-value MXFP4 block as transformers (and OpenAI's checkpoints) store it, 16 bytes with
/// value 2j in the low nibble of byte j and 2j+1 in the high one, in ggml's `block_mxfp4`
/// order: value k in the low nibble of byte k and value k + 16 in its high nibble. The 4-bit
/// codes and the E8M0 scale mean the same in both (ggml's value table is twice OCP's and its
/// scale half), so the bytes move and nothing is re-quantized.
pub fn mxfp4_block_to_ggml(hf: &[u8; 16]) -> [u8; 16] {
    let el = |i: usize| if i.is_multiple_of(2) { hf[i / 2] & 15 } else { hf[i / 2] >> 4 };
    std::array::from_fn(|k| el(k) | (el(k + 16) << 4))
}

/// Where the data section of a safetensors buffer claims to end (for truncation messages).
fn header_end(buf: &[u8]) -> u64 {
    let Some(n) = buf.get(..8).map(|b| u64::from_le_bytes(b.try_into().unwrap())) else { return 8 };
    let Some(h) = buf.get(8..(8 + n as usize).min(buf.len())) else { return 8 + n };
    let max_end = serde_json::from_slice::<serde_json::Value>(h)
        .ok()
        .and_then(|v| {
            v.as_object().map(|o| o.values().filter_map(|t| t.get("data_offsets")?.get(1)?.as_u64()).max().unwrap_or(0))
        })
        .unwrap_or(0);
    8 + n + max_end
}

impl Source for HfSource {
    fn path(&self) -> &Path {
        &self.dir
    }

    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn tokenizer(&self) -> Result<TokenizerData> {
        TokenizerData::from_hf_dir(&self.dir, &self.config)
    }

    fn base_meta(&self, name: &str) -> Result<Option<TensorMeta>> {
        let hf = self.hf_base_name(name).ok_or_else(|| self.missing(name.to_string()))?;
        match self.tensors.get(&hf) {
            Some(e) => {
                let mut m = self.entry_meta(&hf, e)?;
                match self.specs.get(name) {
                    Some(TensorSpec { from_hf: FromHf::Values { .. }, .. }) => m.ty = GgmlType::F32,
                    // Rows picked out of a fused tensor: the spec's rows.
                    Some(s @ TensorSpec { from_hf: FromHf::QkvzSplit { .. }, .. }) if m.ne.len() == 2 => {
                        m.ne[1] = s.ne[1]
                    }
                    // Split out of kv_b_proj: the spec's shape, where the source is kv_b_proj's.
                    Some(s @ TensorSpec { from_hf: FromHf::KvB { n_head, nope, v, key }, .. }) => {
                        let kvr = if *key { s.ne[1] } else { s.ne[0] };
                        if m.ne == [kvr, *n_head as u64 * (nope + v)] {
                            m.ne = s.ne.clone();
                        }
                    }
                    _ => {}
                }
                Ok(Some(m))
            }
            None => Ok(None),
        }
    }

    fn read_base(&self, name: &str, rows: Range<u64>, buf: &mut Vec<u8>) -> Result<()> {
        let hf = self.hf_base_name(name).ok_or_else(|| self.missing(name.to_string()))?;
        let e = self.tensors.get(&hf).ok_or_else(|| self.missing(hf.clone()))?;
        let meta = self.entry_meta(&hf, e)?;
        let row = meta.row_size();
        match self.specs.get(name).map_or(FromHf::AsIs, |s| s.from_hf) {
            FromHf::AsIs => self.read(&hf, e, e.start + rows.start * row, (rows.end - rows.start) * row, buf),
            FromHf::Values { map, v_heads } => {
                // The whole tensor in f32, reordered and mapped, then the rows asked for.
                let n = meta.ne.iter().product::<u64>();
                let mut bytes = Vec::new();
                self.read(&hf, e, e.start, meta.size(), &mut bytes)?;
                let mut all = Vec::new();
                dequantize_into(meta.ty, &bytes, n, &mut all).map_err(|source| Error::Tensor {
                    path: self.files[e.file].0.clone(),
                    tensor: hf.clone(),
                    source,
                })?;
                let ne0 = meta.ne[0];
                buf.clear();
                for i in rows.start * ne0..rows.end * ne0 {
                    let from = match v_heads {
                        Some((n_k, per_k)) => crate::arch::v_head_source(i, n_k, per_k, 1),
                        None => i,
                    };
                    buf.extend_from_slice(&map.apply(all[from as usize]).to_le_bytes());
                }
                Ok(())
            }
            FromHf::KvB { nope, v, key: true, .. } => {
                // Row h·R + r is column r of head h's key rows (an unquantized source).
                let es = meta.ty.type_size();
                let kvr = meta.ne[0];
                let mut head_rows = Vec::new();
                let mut held = None;
                buf.clear();
                for out in rows {
                    let (h, r) = (out / kvr, out % kvr);
                    if held != Some(h) {
                        self.read(&hf, e, e.start + h * (nope + v) * row, nope * row, &mut head_rows)?;
                        held = Some(h);
                    }
                    for j in 0..nope {
                        let at = ((j * kvr + r) * es) as usize;
                        buf.extend_from_slice(&head_rows[at..at + es as usize]);
                    }
                }
                Ok(())
            }
            FromHf::VHeadCols { n_k, per_k, head } => {
                // Each row's elements gathered from their columns (an unquantized source).
                let es = meta.ty.type_size();
                let ne0 = meta.ne[0];
                let mut one = Vec::new();
                buf.clear();
                for r in rows {
                    self.read(&hf, e, e.start + r * row, row, &mut one)?;
                    for c in 0..ne0 {
                        let at = (crate::arch::v_head_source(c, n_k, per_k, head) * es) as usize;
                        buf.extend_from_slice(&one[at..at + es as usize]);
                    }
                }
                Ok(())
            }
            // Rows reordered: each read from where it lies.
            from => {
                let n_rows = meta.n_rows();
                buf.clear();
                let mut one = Vec::new();
                for r in rows {
                    self.read(&hf, e, e.start + from.source_row(r, n_rows) * row, row, &mut one)?;
                    buf.extend_from_slice(&one);
                }
                Ok(())
            }
        }
    }

    fn expert_meta(&self, il: u32, e: u32, proj: Proj) -> Result<TensorMeta> {
        if self.config.arch().hf_interleaved_experts(il).is_some() {
            return Ok(self.interleaved_meta(il, e, proj)?.meta);
        }
        let name = self.per_expert_name(il, e, proj);
        if let Some(entry) = self.tensors.get(&name) {
            return self.entry_meta(&name, entry);
        }
        // transformers 5 in memory (and checkpoints saved that way): gate_up_proj [E, 2F, D]
        // (gate rows first) and down_proj [E, D, F].
        let (fname, entry) = self.fused(il, proj).ok_or_else(|| self.missing(name))?;
        let m = self.entry_meta(&fname, entry)?;
        if m.ne.len() != 3 || (proj != Proj::Down && m.ne[1] % 2 != 0) || e as u64 >= m.ne[2] {
            return Err(Error::WrongShape {
                path: self.files[entry.file].0.clone(),
                tensor: fname,
                expected: format!("[n_expert > {e}, rows, cols] (3 dims)"),
                got: format!("{:?}", entry.shape),
            });
        }
        let rows = if proj == Proj::Down { m.ne[1] } else { m.ne[1] / 2 };
        Ok(TensorMeta { ty: m.ty, ne: vec![m.ne[0], rows] })
    }

    fn read_expert(&self, il: u32, e: u32, proj: Proj, buf: &mut Vec<u8>) -> Result<()> {
        if self.config.arch().hf_interleaved_experts(il).is_some() {
            return self.read_interleaved(il, e, proj, buf);
        }
        let meta = self.expert_meta(il, e, proj)?;
        let name = self.per_expert_name(il, e, proj);
        if let Some(entry) = self.tensors.get(&name) {
            return self.read(&name, entry, entry.start, entry.end - entry.start, buf);
        }
        let (fname, entry) = self.fused(il, proj).ok_or_else(|| self.missing(name))?;
        let size = meta.size();
        let per_expert = if proj == Proj::Down { size } else { 2 * size };
        let mut start = entry.start + e as u64 * per_expert;
        if proj == Proj::Up {
            start += size;
        }
        self.read(&fname, entry, start, size, buf)
    }

    fn read_expert_bias(&self, il: u32, e: u32, proj: Proj, out: &mut Vec<f32>) -> Result<()> {
        // gpt-oss: gate_up_proj_bias [E, 2F] (gate and up interleaved), down_proj_bias [E, D].
        let cfg = &self.config;
        let (stem, rows) =
            if proj == Proj::Down { ("down_proj_bias", cfg.n_embd) } else { ("gate_up_proj_bias", 2 * cfg.n_ff_exp) };
        let (name, entry) = self.interleaved(il, stem).ok_or_else(|| self.missing(self.interleaved_name(il, stem)))?;
        let n_exp = cfg.n_expert as u64;
        // F32, F16 or BF16 (as every other tensor), converted by ggml.
        let ty = self.entry_meta(&name, entry)?.ty;
        let es = ty.type_size();
        if entry.shape != [n_exp, rows] || e as u64 >= n_exp {
            return Err(self.wrong_shape(&name, entry, format!("[{n_exp}, {rows}]")));
        }
        let mut bytes = Vec::new();
        self.read(&name, entry, entry.start + e as u64 * rows * es, rows * es, &mut bytes)?;
        let mut all = Vec::new();
        dequantize_into(ty, &bytes, rows, &mut all).map_err(|source| Error::Tensor {
            path: self.files[entry.file].0.clone(),
            tensor: name,
            source,
        })?;
        out.clear();
        match proj {
            Proj::Down => out.extend_from_slice(&all),
            Proj::Gate => out.extend(all.iter().step_by(2)),
            Proj::Up => out.extend(all.iter().skip(1).step_by(2)),
        }
        Ok(())
    }

    fn expert_bias_source_name(&self, il: u32, e: u32, proj: Proj) -> String {
        let stem = if proj == Proj::Down { "down_proj_bias" } else { "gate_up_proj_bias" };
        format!("{}[{e}]", self.interleaved_name(il, stem))
    }

    fn describe(&self) -> String {
        format!("Hugging Face checkpoint {}", self.dir.file_name().unwrap_or_default().to_string_lossy())
    }

    fn skipped(&self) -> Vec<String> {
        self.skipped
            .iter()
            .map(|(g, n)| {
                let what = if g.contains(".layers.") {
                    "a layer after the last (next-token prediction)"
                } else {
                    "not part of the text model"
                };
                format!("{g}.* ({n} tensors): {what}")
            })
            .collect()
    }

    fn source_name(&self, name: &str) -> String {
        self.hf_base_name(name).unwrap_or_else(|| name.to_string())
    }

    fn expert_source_name(&self, il: u32, e: u32, proj: Proj) -> String {
        if self.config.arch().hf_interleaved_experts(il).is_some() {
            let stem = if proj == Proj::Down { "down_proj" } else { "gate_up_proj" };
            let blocks = format!("{stem}_blocks");
            let n = if self.interleaved(il, &blocks).is_some() { blocks } else { stem.to_string() };
            return format!("{}[{e}]", self.interleaved_name(il, &n));
        }
        let name = self.per_expert_name(il, e, proj);
        if self.tensors.contains_key(&name) {
            return name;
        }
        format!("{}[{e}]", self.fused_name(il, proj))
    }
}

// ---------------------------------------------------------------------------------------------
// llama.cpp GGUF

pub struct GgufSource {
    path: PathBuf,
    file: File,
    gguf: Gguf,
    config: ModelConfig,
    tensors: BTreeMap<String, GgufTensorInfo>,
}

impl GgufSource {
    pub fn open(path: &Path) -> Result<GgufSource> {
        let (gguf, file, infos) = Gguf::open_checked(path)?;
        let config = ModelConfig::read_gguf(&gguf, path)?;
        let tensors = infos.into_iter().map(|t| (t.name.clone(), t)).collect();
        Ok(GgufSource { path: path.to_path_buf(), file, gguf, config, tensors })
    }

    fn info(&self, name: &str) -> Result<&GgufTensorInfo> {
        self.tensors.get(name).ok_or_else(|| Error::MissingTensor { path: self.path.clone(), tensor: name.to_string() })
    }

    fn meta_of(&self, t: &GgufTensorInfo) -> Result<TensorMeta> {
        let ty = t.ty.ok_or_else(|| Error::UnsupportedDtype {
            path: self.path.clone(),
            tensor: t.name.clone(),
            got: format!("ggml type id {}", t.raw_type),
            expected: "a type this ggml build knows".into(),
        })?;
        Ok(TensorMeta { ty, ne: t.ne.clone() })
    }

    fn read(&self, t: &GgufTensorInfo, rel: u64, len: u64, buf: &mut Vec<u8>) -> Result<()> {
        let at = self.gguf.data_offset() + t.offset + rel;
        read_at_into(&self.file, &self.path, at, len, &format!("tensor '{}'", t.name), buf)
    }
}

impl Source for GgufSource {
    fn path(&self) -> &Path {
        &self.path
    }

    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn tokenizer(&self) -> Result<TokenizerData> {
        TokenizerData::from_gguf(&self.gguf, &self.path)
    }

    fn base_meta(&self, name: &str) -> Result<Option<TensorMeta>> {
        match self.tensors.get(name) {
            Some(t) => Ok(Some(self.meta_of(t)?)),
            None => Ok(None),
        }
    }

    fn read_base(&self, name: &str, rows: Range<u64>, buf: &mut Vec<u8>) -> Result<()> {
        let t = self.info(name)?;
        let row = self.meta_of(t)?.row_size();
        self.read(t, rows.start * row, (rows.end - rows.start) * row, buf)
    }

    fn expert_meta(&self, il: u32, e: u32, proj: Proj) -> Result<TensorMeta> {
        let name = proj.stacked(il);
        let t = self.info(&name)?;
        let m = self.meta_of(t)?;
        if m.ne.len() != 3 || e as u64 >= m.ne[2] {
            return Err(Error::WrongShape {
                path: self.path.clone(),
                tensor: name,
                expected: format!("3 dims with more than {e} experts"),
                got: format!("{:?}", m.ne),
            });
        }
        Ok(TensorMeta { ty: m.ty, ne: m.ne[..2].to_vec() })
    }

    fn read_expert(&self, il: u32, e: u32, proj: Proj, buf: &mut Vec<u8>) -> Result<()> {
        let size = self.expert_meta(il, e, proj)?.size();
        let t = self.info(&proj.stacked(il))?;
        self.read(t, e as u64 * size, size, buf)
    }

    fn read_expert_bias(&self, il: u32, e: u32, proj: Proj, out: &mut Vec<f32>) -> Result<()> {
        // llama.cpp: blk.N.ffn_*_exps.bias [rows, n_expert].
        let name = proj.stacked_bias(il);
        let t = self.info(&name)?;
        let m = self.meta_of(t)?;
        if m.ne.len() != 2 || e as u64 >= m.ne[1] {
            return Err(Error::WrongShape {
                path: self.path.clone(),
                tensor: name,
                expected: format!("[rows, more than {e} experts]"),
                got: format!("{:?}", m.ne),
            });
        }
        let row = m.row_size();
        let mut bytes = Vec::new();
        self.read(t, e as u64 * row, row, &mut bytes)?;
        dequantize_into(m.ty, &bytes, m.ne[0], out).map_err(|source| Error::Tensor {
            path: self.path.clone(),
            tensor: name,
            source,
        })
    }

    fn describe(&self) -> String {
        format!("GGUF {}", self.path.file_name().unwrap_or_default().to_string_lossy())
    }

    fn extra_kv(&self) -> Vec<(String, GgufValue)> {
        // general.file_type would be stale after re-quantizing; alignment is the writer's own.
        self.gguf
            .keys()
            .into_iter()
            .filter(|k| !k.starts_with(SAGE_PREFIX) && k != GENERAL_ALIGNMENT && k != GENERAL_FILE_TYPE)
            .filter_map(|k| self.gguf.get(&k).map(|v| (k, v)))
            .collect()
    }
}
