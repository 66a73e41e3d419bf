//! The model directory sage-convert writes and sage reads:
//!
//! ```text
//! DIR/base.gguf              hyperparameters, tokenizer, every non-expert tensor, the manifest
//! DIR/tokenizer.json         the same tokenizer for the tokenizers crate
//! DIR/experts/blk.NNN.bin    one shard per layer: a 4 KiB header, then one record per expert
//! DIR/experts/blk.NNN.cold.bin  optional (`sage-convert --cold-quant`): the same experts again
//!                            at a smaller type, the same header and record layout
//! ```
//!
//! A record is the expert's gate, up and down projections back to back, then (format 2, in
//! families whose experts have them: gpt-oss) the f32 biases of gate, up and down, starting on
//! a 4 KiB boundary, so one expert is one contiguous, aligned read (or mapping). The manifest
//! (`sage.experts.blk.N.*` keys in base.gguf) lists per layer which experts exist, their
//! offsets and the three types. `base.gguf` is written last: a directory without it, or with
//! the `.sage-incomplete` marker, is an unfinished conversion and is refused.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::arch::{base_tensors, Role};
use crate::config::ModelConfig;
use crate::error::{dims, Error, Result};
use crate::ggml::{GgmlType, Gguf, GgufArray, GgufTensorInfo, GgufValue};
use crate::io::{read_at_into, WatchedFile};
use crate::names::*;

pub const BASE: &str = "base.gguf";
pub const TOKENIZER: &str = "tokenizer.json";
pub const EXPERT_DIR: &str = "experts";
pub const INCOMPLETE_MARKER: &str = ".sage-incomplete";
/// The format sage-convert writes. 2: a layer's records may end with the experts' biases
/// (`sage.experts.blk.N.biases` true); a directory without biases differs from format 1 only
/// in this number (base.gguf's and the shard headers'). Directories of version 1 still open.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest format sage still reads.
pub const OLDEST_FORMAT_VERSION: u32 = 1;
/// Alignment of shard records (and size of the shard header): a page, so one expert can be
/// mapped on its own or read with O_DIRECT.
pub const RECORD_ALIGN: u64 = 4096;
pub const SHARD_MAGIC: &[u8; 8] = b"SAGEXPRT";

/// Relative path of layer `il`'s shard.
pub fn shard_name(il: u32) -> String {
    format!("{EXPERT_DIR}/blk.{il:03}.bin")
}

/// Relative path of layer `il`'s cold shard: its experts again at the cold type.
pub fn cold_shard_name(il: u32) -> String {
    format!("{EXPERT_DIR}/blk.{il:03}.cold.bin")
}

/// Which record of an expert a shard holds: the full one, or the low-bit copy
/// (`sage-convert --cold-quant`), written in the shard header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    Full,
    Cold,
}

impl RecordKind {
    fn raw(self) -> u32 {
        match self {
            RecordKind::Full => 0,
            RecordKind::Cold => 1,
        }
    }

    fn describe(raw: u32) -> String {
        match raw {
            0 => "full records".into(),
            1 => "cold records".into(),
            n => format!("unknown record kind {n}"),
        }
    }
}

/// The experts of one layer as stored in its shard.
#[derive(Clone, Debug, PartialEq)]
pub struct ExpertLayer {
    pub il: u32,
    /// Shard path relative to the model directory.
    pub file: String,
    /// Expert ids present, ascending.
    pub ids: Vec<u32>,
    /// File offset of each expert's record (same order as `ids`).
    pub offsets: Vec<u64>,
    /// Types of gate, up, down.
    pub types: [GgmlType; 3],
    /// Shapes (ggml order) of gate, up, down.
    pub shapes: [[u64; 2]; 3],
    /// Whether each record ends with the f32 biases of gate, up and down (one per output row).
    pub bias: bool,
}

impl ExpertLayer {
    /// Whether the layer keeps only some of the model's experts (a dense layer, which has
    /// none and no router, is not a pool).
    pub fn is_pool(&self, cfg: &ModelConfig) -> bool {
        !cfg.is_dense(self.il) && self.ids.len() < cfg.n_expert as usize
    }

    /// Bytes of each projection.
    pub fn sizes(&self) -> [u64; 3] {
        std::array::from_fn(|p| self.types[p].tensor_size(&self.shapes[p]).unwrap_or(0))
    }

    /// Bytes of each projection's bias (f32, one per output row), 0 without biases.
    pub fn bias_sizes(&self) -> [u64; 3] {
        std::array::from_fn(|p| if self.bias { 4 * self.shapes[p][1] } else { 0 })
    }

    /// Where projection `p`'s bias starts within a record.
    pub fn bias_offset(&self, p: Proj) -> u64 {
        self.sizes().iter().sum::<u64>() + self.bias_sizes()[..p.index()].iter().sum::<u64>()
    }

    /// Bytes of one expert's record (gate + up + down, their biases, no padding).
    pub fn record_size(&self) -> u64 {
        self.sizes().iter().sum::<u64>() + self.bias_sizes().iter().sum::<u64>()
    }

    /// Distance between records in the shard.
    pub fn stride(&self) -> u64 {
        self.record_size().next_multiple_of(RECORD_ALIGN)
    }

    /// The size the shard file must have.
    pub fn file_size(&self) -> u64 {
        RECORD_ALIGN + self.ids.len() as u64 * self.stride()
    }

    /// Where expert `expert`'s record is among the layer's records (its rank in `ids`).
    pub fn record_index(&self, expert: u32) -> Option<usize> {
        self.ids.binary_search(&expert).ok()
    }

    /// File offset of expert `expert`'s record, None when the layer does not hold it.
    pub fn record_offset(&self, expert: u32) -> Option<u64> {
        self.record_index(expert).map(|i| self.offsets[i])
    }
}

/// What differs between a shard's header `got` and the one base.gguf's manifest implies
/// (`shard_header`): the first field that does, with both values.
fn header_mismatch(got: &[u8], want: &[u8]) -> String {
    let u32_at = |h: &[u8], at: usize| u32::from_le_bytes(h[at..at + 4].try_into().unwrap());
    let u64_at = |h: &[u8], at: usize| u64::from_le_bytes(h[at..at + 8].try_into().unwrap());
    let text = |h: &[u8]| String::from_utf8_lossy(&h[32..64]).trim_end_matches('\0').to_string();
    let (g, w) = (got, want);
    if g[..8] != w[..8] {
        return "not a sage expert shard (no SAGEXPRT magic)".into();
    }
    let field = |name: &str, a: String, b: String| format!("shard header: {name} {a}, base.gguf says {b}");
    if u32_at(g, 8) != u32_at(w, 8) {
        return field("format version", u32_at(g, 8).to_string(), u32_at(w, 8).to_string());
    }
    if u32_at(g, 12) != u32_at(w, 12) {
        return field("layer", u32_at(g, 12).to_string(), u32_at(w, 12).to_string())
            + ": a shard of another layer under this name";
    }
    if u32_at(g, 16) != u32_at(w, 16) {
        return field("expert count", u32_at(g, 16).to_string(), u32_at(w, 16).to_string());
    }
    if u32_at(g, 20) != u32_at(w, 20) {
        return field("kind", RecordKind::describe(u32_at(g, 20)), RecordKind::describe(u32_at(w, 20)));
    }
    if u64_at(g, 24) != u64_at(w, 24) {
        return field("record stride", u64_at(g, 24).to_string(), u64_at(w, 24).to_string());
    }
    if g[32..64] != w[32..64] {
        return field("conversion", text(g), text(w)) + ": the files come from different conversions";
    }
    "shard header does not match base.gguf in its reserved bytes".into()
}

/// The shard header: magic, format version, layer, expert count, record kind (0: full, 1:
/// cold; 0 in shards written before cold records existed), record stride, conversion id.
pub fn shard_header(layer: &ExpertLayer, version: u32, conversion_id: &str, kind: RecordKind) -> Vec<u8> {
    let mut h = Vec::with_capacity(RECORD_ALIGN as usize);
    h.extend_from_slice(SHARD_MAGIC);
    h.extend_from_slice(&version.to_le_bytes());
    h.extend_from_slice(&layer.il.to_le_bytes());
    h.extend_from_slice(&(layer.ids.len() as u32).to_le_bytes());
    h.extend_from_slice(&kind.raw().to_le_bytes());
    h.extend_from_slice(&layer.stride().to_le_bytes());
    let mut id = [0u8; 32];
    let b = conversion_id.as_bytes();
    id[..b.len().min(32)].copy_from_slice(&b[..b.len().min(32)]);
    h.extend_from_slice(&id);
    h.resize(RECORD_ALIGN as usize, 0);
    h
}

/// Where the experts are, as recorded in base.gguf.
#[derive(Clone, Debug, PartialEq)]
pub struct Manifest {
    /// The directory's format version (`FORMAT_VERSION` when written by this sage).
    pub version: u32,
    pub conversion_id: String,
    pub source: String,
    pub layers: Vec<ExpertLayer>,
    /// The cold copies (`sage-convert --cold-quant`): per layer the same experts and shapes
    /// at a smaller type, in the layer's cold shard; empty when the conversion wrote none.
    pub cold: Vec<ExpertLayer>,
}

impl Manifest {
    pub fn write_gguf(&self, g: &mut Gguf) -> Result<()> {
        let mut kv = vec![
            (SAGE_FORMAT_VERSION.to_string(), GgufValue::U32(self.version)),
            (SAGE_CONVERSION_ID.to_string(), GgufValue::Str(self.conversion_id.clone())),
            (SAGE_SOURCE.to_string(), GgufValue::Str(self.source.clone())),
            (SAGE_EXPERT_ALIGNMENT.to_string(), GgufValue::U32(RECORD_ALIGN as u32)),
        ];
        for l in &self.layers {
            kv.push((sage_layer_key(l.il, "file"), GgufValue::Str(l.file.clone())));
            kv.push((sage_layer_key(l.il, "ids"), GgufValue::Array(GgufArray::U32(l.ids.clone()))));
            kv.push((sage_layer_key(l.il, "offsets"), GgufValue::Array(GgufArray::U64(l.offsets.clone()))));
            kv.push((
                sage_layer_key(l.il, "types"),
                GgufValue::Array(GgufArray::U32(l.types.map(|t| t.raw()).to_vec())),
            ));
            kv.push((
                sage_layer_key(l.il, "shapes"),
                GgufValue::Array(GgufArray::U64(l.shapes.iter().flatten().copied().collect())),
            ));
            // Only where there are biases: without them a layer is as format 1 wrote it.
            if l.bias {
                kv.push((sage_layer_key(l.il, BIASES), GgufValue::Bool(true)));
            }
        }
        // Cold copies: the ids and shapes are the layer's; only file, offsets and types differ.
        for l in &self.cold {
            kv.push((sage_layer_key(l.il, COLD_FILE), GgufValue::Str(l.file.clone())));
            kv.push((sage_layer_key(l.il, COLD_OFFSETS), GgufValue::Array(GgufArray::U64(l.offsets.clone()))));
            kv.push((
                sage_layer_key(l.il, COLD_TYPES),
                GgufValue::Array(GgufArray::U32(l.types.map(|t| t.raw()).to_vec())),
            ));
        }
        for (k, v) in &kv {
            g.set(k, v).map_err(|e| Error::Usage(e.to_string()))?;
        }
        Ok(())
    }

    pub fn read_gguf(g: &Gguf, path: &Path, cfg: &ModelConfig) -> Result<Manifest> {
        let bad = |key: &str, reason: String| Error::Config { path: path.to_path_buf(), key: key.to_string(), reason };
        let version = match g.get(SAGE_FORMAT_VERSION) {
            Some(GgufValue::U32(v)) if (OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&v) => v,
            None => {
                return Err(Error::BadModelDir {
                    path: path.to_path_buf(),
                    reason: format!("no '{SAGE_FORMAT_VERSION}': this GGUF has no sage expert manifest"),
                })
            }
            Some(v) => {
                return Err(bad(
                    SAGE_FORMAT_VERSION,
                    format!("expected {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION}, got {v:?} (a newer sage wrote it?)"),
                ))
            }
        };
        let string = |key: &str| match g.get(key) {
            Some(GgufValue::Str(s)) => Ok(s),
            other => Err(bad(key, format!("expected a string, got {other:?}"))),
        };
        let read_types = |key: &str| -> Result<[GgmlType; 3]> {
            let types = match g.get(key) {
                Some(GgufValue::Array(GgufArray::U32(v))) if v.len() == 3 => v,
                other => return Err(bad(key, format!("expected 3 ggml type ids, got {other:?}"))),
            };
            let types: [Option<GgmlType>; 3] = std::array::from_fn(|p| GgmlType::from_raw(types[p]));
            match types {
                [Some(a), Some(b), Some(c)] if [a, b, c].iter().all(|t| t.can_matmul()) => Ok([a, b, c]),
                [Some(a), Some(b), Some(c)] => {
                    let got = format!("{a}, {b}, {c}");
                    Err(bad(key, format!("expected types ggml can multiply, got {got}")))
                }
                _ => Err(bad(key, "unknown ggml type id".into())),
            }
        };
        let check_offsets = |layer: &ExpertLayer, key: &str| -> Result<()> {
            for (i, &off) in layer.offsets.iter().enumerate() {
                if off != RECORD_ALIGN + i as u64 * layer.stride() {
                    return Err(bad(
                        key,
                        format!("offset {off} of expert {} is not where its record lies", layer.ids[i]),
                    ));
                }
            }
            Ok(())
        };
        let mut layers = Vec::new();
        let mut cold = Vec::new();
        for il in 0..cfg.n_layer {
            let key = |f: &str| sage_layer_key(il, f);
            let file = string(&key("file"))?;
            if file != shard_name(il) {
                // Paths come from the file, so only sage's own layout is accepted.
                return Err(bad(&key("file"), format!("expected '{}', got '{file}'", shard_name(il))));
            }
            let ids = match g.get(&key("ids")) {
                Some(GgufValue::Array(GgufArray::U32(v))) => v,
                other => return Err(bad(&key("ids"), format!("expected a u32 array, got {other:?}"))),
            };
            if cfg.is_dense(il) {
                if !ids.is_empty() {
                    return Err(bad(&key("ids"), format!("expected none in a dense layer, got {ids:?}")));
                }
            } else if ids.is_empty() || ids.windows(2).any(|w| w[0] >= w[1]) || ids.iter().any(|&e| e >= cfg.n_expert) {
                return Err(bad(&key("ids"), format!("expected ascending ids below {}, got {ids:?}", cfg.n_expert)));
            }
            if !cfg.is_dense(il) && ids.len() < cfg.n_expert_used as usize {
                return Err(bad(
                    &key("ids"),
                    format!(
                        "expected at least the {} experts each token uses, got a pool of {}",
                        cfg.n_expert_used,
                        ids.len()
                    ),
                ));
            }
            let offsets = match g.get(&key("offsets")) {
                Some(GgufValue::Array(GgufArray::U64(v))) if v.len() == ids.len() => v,
                other => {
                    return Err(bad(&key("offsets"), format!("expected {} u64 offsets, got {other:?}", ids.len())))
                }
            };
            let types = read_types(&key("types"))?;
            let shapes = match g.get(&key("shapes")) {
                Some(GgufValue::Array(GgufArray::U64(v))) if v.len() == 6 => [[v[0], v[1]], [v[2], v[3]], [v[4], v[5]]],
                other => return Err(bad(&key("shapes"), format!("expected 6 u64 dims, got {other:?}"))),
            };
            let want = Proj::ALL.map(|p| cfg.expert_shape(p));
            if shapes != want || (0..3).any(|p| types[p].tensor_size(&shapes[p]).is_none()) {
                return Err(bad(&key("shapes"), format!("expected {want:?} fitting {types:?}, got {shapes:?}")));
            }
            // Format 1 has no biases; format 2 marks the layers whose records end with them,
            // and they must be what the family's experts have.
            let bias = match (version, g.get(&key(BIASES))) {
                (_, None) => false,
                (2.., Some(GgufValue::Bool(b))) => b,
                (_, other) => {
                    return Err(bad(&key(BIASES), format!("expected true or false in format {version}, got {other:?}")))
                }
            };
            if bias != cfg.expert_bias {
                let (want, got) = if cfg.expert_bias { ("with", "without") } else { ("without", "with") };
                return Err(bad(
                    &key(BIASES),
                    format!("{} experts are {want} biases, but the records are {got} them", cfg.arch().family()),
                ));
            }
            let layer = ExpertLayer { il, file, ids, offsets, types, shapes, bias };
            check_offsets(&layer, &key("offsets"))?;
            // Cold copies: all layers or none (a directory without them opens as before).
            let cold_file = g.get(&key(COLD_FILE));
            if il > 0 && cold_file.is_some() == cold.is_empty() {
                let expect = if cold.is_empty() {
                    "absent, as in the layers before"
                } else {
                    "present, as in the layers before"
                };
                return Err(bad(&key(COLD_FILE), format!("expected {expect}, got {cold_file:?}")));
            }
            if cold_file.is_some() {
                let file = string(&key(COLD_FILE))?;
                if file != cold_shard_name(il) {
                    return Err(bad(&key(COLD_FILE), format!("expected '{}', got '{file}'", cold_shard_name(il))));
                }
                let offsets = match g.get(&key(COLD_OFFSETS)) {
                    Some(GgufValue::Array(GgufArray::U64(v))) if v.len() == layer.ids.len() => v,
                    other => {
                        let n = layer.ids.len();
                        return Err(bad(&key(COLD_OFFSETS), format!("expected {n} u64 offsets, got {other:?}")));
                    }
                };
                let types = read_types(&key(COLD_TYPES))?;
                if (0..3).any(|p| types[p].tensor_size(&shapes[p]).is_none()) {
                    return Err(bad(&key(COLD_TYPES), format!("expected types fitting {shapes:?}, got {types:?}")));
                }
                let c = ExpertLayer { il, file, ids: layer.ids.clone(), offsets, types, shapes, bias };
                check_offsets(&c, &key(COLD_OFFSETS))?;
                cold.push(c);
            }
            layers.push(layer);
        }
        Ok(Manifest {
            version,
            conversion_id: string(SAGE_CONVERSION_ID)?,
            source: string(SAGE_SOURCE).unwrap_or_default(),
            layers,
            cold,
        })
    }
}

/// An opened, validated model directory.
pub struct ModelDir {
    pub path: PathBuf,
    pub base_path: PathBuf,
    pub base: Gguf,
    pub base_file: File,
    pub base_tensors: Vec<GgufTensorInfo>,
    pub config: ModelConfig,
    pub manifest: Manifest,
    /// One per layer, opened once: the runtime reads its experts through these.
    pub shards: Arc<Vec<WatchedFile>>,
    /// The cold shards, one per layer, when the directory has cold copies.
    pub cold_shards: Option<Arc<Vec<WatchedFile>>>,
}

/// Open the shards of `layers` (records of `kind`), checking each one's size and header.
fn open_shards(dir: &Path, layers: &[ExpertLayer], m: &Manifest, kind: RecordKind) -> Result<Vec<WatchedFile>> {
    let mut shards = Vec::new();
    let mut header = Vec::new();
    for l in layers {
        let p = dir.join(&l.file);
        let f = WatchedFile::open(&p)?;
        if f.size() != l.file_size() {
            let what = format!("{} experts of {} bytes", l.ids.len(), l.record_size());
            return Err(Error::Truncated { path: p, what, needed: l.file_size(), got: f.size() });
        }
        f.read_into(0, RECORD_ALIGN as usize, "shard header", &mut header)?;
        let want = shard_header(l, m.version, &m.conversion_id, kind);
        if header != want {
            return Err(Error::BadModelDir { path: p, reason: header_mismatch(&header, &want) });
        }
        shards.push(f);
    }
    Ok(shards)
}

/// Whether `dir` looks like a sage model directory at all (a directory, no unfinished
/// conversion, a `base.gguf`), before anything in it is read; what it is instead, when it is
/// not, and how to make one.
pub fn check_model_dir(dir: &Path) -> Result<()> {
    let bad = |reason: String| Error::BadModelDir { path: dir.to_path_buf(), reason };
    if !dir.exists() {
        return Err(bad("no such directory".into()));
    }
    if !dir.is_dir() {
        return Err(bad("not a directory (pass a model directory made by sage-convert)".into()));
    }
    if dir.join(INCOMPLETE_MARKER).exists() {
        return Err(bad(format!(
            "it holds an unfinished conversion ({INCOMPLETE_MARKER} is present); run sage-convert again with --force"
        )));
    }
    if !dir.join(BASE).is_file() {
        let what = if dir.join("config.json").is_file() {
            "it holds a Hugging Face checkpoint (config.json, no base.gguf); convert it with `sage-convert DIR -o OUT`"
        } else {
            "it has no base.gguf; make one with `sage-convert CHECKPOINT -o OUT`"
        };
        return Err(bad(what.into()));
    }
    Ok(())
}

impl ModelDir {
    /// Open `dir`, checking that the conversion finished, that base.gguf is whole, and that
    /// every shard exists with the header and size the manifest says.
    pub fn open(dir: &Path) -> Result<ModelDir> {
        check_model_dir(dir)?;
        let base_path = dir.join(BASE);
        let (base, base_file, stored) = Gguf::open_checked(&base_path)?;
        let config = ModelConfig::read_gguf(&base, &base_path)?;
        for spec in base_tensors(&config) {
            let (name, want, role) = (spec.name, spec.ne, spec.role);
            match stored.iter().find(|t| t.name == name) {
                None => return Err(Error::MissingTensor { path: base_path.clone(), tensor: name }),
                Some(t) if t.ne != want => {
                    return Err(Error::WrongShape {
                        path: base_path.clone(),
                        tensor: name,
                        expected: dims(&want),
                        got: dims(&t.ne),
                    })
                }
                Some(t) => {
                    // sage-convert writes norms, biases and routers in f32, as llama.cpp keeps them;
                    // ggml multiplies by a norm only in f32, and aborts (not errs) on a type
                    // it cannot use.
                    let (ok, expected) = match (t.ty, role) {
                        (None, _) => (false, "a type this ggml build knows"),
                        (Some(ty), Role::Weight | Role::Float) => {
                            (ty.can_matmul(), "a type ggml can multiply (f32, f16, bf16 or a quantized type)")
                        }
                        (Some(ty), Role::Norm | Role::Bias | Role::Router) => (ty == GgmlType::F32, "f32"),
                    };
                    if !ok {
                        return Err(Error::UnsupportedDtype {
                            path: base_path.clone(),
                            tensor: name,
                            got: t.ty.map_or_else(|| format!("ggml type id {}", t.raw_type), |ty| ty.to_string()),
                            expected: expected.into(),
                        });
                    }
                }
            }
        }
        let manifest = Manifest::read_gguf(&base, &base_path, &config)?;
        let shards = Arc::new(open_shards(dir, &manifest.layers, &manifest, RecordKind::Full)?);
        let cold_shards = if manifest.cold.is_empty() {
            None
        } else {
            Some(Arc::new(open_shards(dir, &manifest.cold, &manifest, RecordKind::Cold)?))
        };
        Ok(ModelDir {
            path: dir.to_path_buf(),
            base_path,
            base,
            base_file,
            base_tensors: stored,
            config,
            manifest,
            shards,
            cold_shards,
        })
    }

    /// Whether the directory holds cold copies of its experts (`sage-convert --cold-quant`).
    pub fn has_cold(&self) -> bool {
        self.cold_shards.is_some()
    }

    /// Bytes of the cold copies' records (0 without them): the extra disk they take.
    pub fn cold_bytes(&self) -> u64 {
        self.manifest.cold.iter().map(|l| l.record_size() * l.ids.len() as u64).sum()
    }

    /// Bytes of expert `expert` of layer `il` (gate, up, down back to back).
    pub fn read_expert(&self, il: u32, expert: u32) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        let size = self.manifest.layers[il as usize].record_size();
        self.read_expert_part(il, expert, 0..size, &mut buf)?;
        Ok(buf)
    }

    /// Bytes `range` of an expert's record into `buf`.
    pub fn read_expert_part(&self, il: u32, expert: u32, range: std::ops::Range<u64>, buf: &mut Vec<u8>) -> Result<()> {
        let l = &self.manifest.layers[il as usize];
        let at = l.record_offset(expert).ok_or_else(|| Error::BadModelDir {
            path: self.path.clone(),
            reason: format!("layer {il} has no expert {expert} (pool {:?})", l.ids),
        })?;
        let len = (range.end - range.start) as usize;
        self.shards[il as usize].read_into(at + range.start, len, &format!("expert {expert}"), buf)
    }

    /// Bytes of expert `expert`'s cold copy in layer `il` (gate, up, down back to back, at the
    /// cold types).
    pub fn read_cold_expert(&self, il: u32, expert: u32) -> Result<Vec<u8>> {
        let (Some(shards), Some(l)) = (&self.cold_shards, self.manifest.cold.get(il as usize)) else {
            return Err(Error::BadModelDir {
                path: self.path.clone(),
                reason: "no cold copies of the experts (convert with --cold-quant)".into(),
            });
        };
        let at = l.record_offset(expert).ok_or_else(|| Error::BadModelDir {
            path: self.path.clone(),
            reason: format!("layer {il} has no expert {expert} (pool {:?})", l.ids),
        })?;
        let mut buf = Vec::new();
        shards[il as usize].read_into(at, l.record_size() as usize, &format!("expert {expert} (cold)"), &mut buf)?;
        Ok(buf)
    }

    /// Bytes `range` (relative to the tensor's start) of a base tensor into `buf`.
    pub fn read_base_range(&self, t: &GgufTensorInfo, range: std::ops::Range<u64>, buf: &mut Vec<u8>) -> Result<()> {
        let at = self.base.data_offset() + t.offset + range.start;
        read_at_into(
            &self.base_file,
            &self.base_path,
            at,
            range.end - range.start,
            &format!("tensor '{}'", t.name),
            buf,
        )
    }

    pub fn base_bytes(&self) -> u64 {
        self.base_tensors.iter().map(|t| t.size).sum()
    }

    pub fn expert_bytes(&self) -> u64 {
        self.manifest.layers.iter().map(|l| l.record_size() * l.ids.len() as u64).sum()
    }
}
