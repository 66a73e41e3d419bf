//! `sage-convert synth`: model directories with the real shapes of a published model and
//! deterministic random weights, for benchmarks of the expert arena without downloading (or
//! licensing) the real checkpoint.
//!
//! [`SynthSource`] is a [`Source`] like a checkpoint on disk: it serves every tensor the
//! model's config implies, drawn from a seeded PRNG row by row, and the ordinary converter
//! (`convert_source`) writes the model directory.
//!
//! The base (embeddings, attention, output, norms, routers) is served as f16 matrices and f32
//! vectors and quantized by ggml, tensor by tensor, like a real checkpoint. The experts (95% of
//! a 30B-A3B model's weights) would take about 25 minutes of ggml's q4_K quantizer on two cores,
//! so by default they are served already quantized: each row of each expert matrix is drawn
//! from a pool of [`POOL_ROWS`] rows of random floats that ggml quantized once per row length.
//! Every row is a real quantization and every record is valid, finite ggml data; the records
//! differ from one another (rows are picked per expert, row by row), only individual rows
//! repeat. `exact` quantizes every expert row from its own random floats instead.
//!
//! What does not behave like a real model is the routing: with the weight scales chosen for it
//! ([`EMBD_STD`], [`WRITE_STD`]) the random routers pick experts near uniformly and nearly
//! independently from token to token, while trained models reuse some experts far more than
//! others. Expert hit rates measured on a synthetic model are a worst case ([`ROUTING_NOTICE`]).

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::arch::{base_tensors, Role};
use crate::config::{read_hf_config, ModelConfig};
use crate::convert::{convert_source, ConvertOptions, ConvertReport, Progress};
use crate::error::{Error, IoContext, Result};
use crate::ggml::{GgmlType, GgufValue};
use crate::merge::{merge, MergeReport};
use crate::names::*;
use crate::source::{Source, TensorMeta};
use crate::tokenizer::TokenizerData;

/// The models `--like` knows, with their published `config.json` (configs/README.md says
/// where each comes from): every family's (`Arch::published`).
pub fn like_names() -> Vec<(&'static str, &'static str)> {
    crate::arch::ARCHS.iter().flat_map(|a| a.published().iter().copied()).collect()
}

/// The tokenizer every synthetic model gets, whatever its family: a tiny byte-level BPE
/// (Qwen2 split, 503 tokens). Embedding rows past it are padding (`[PADn]`, unused), as
/// llama.cpp's converter writes for checkpoints whose embedding is larger than their
/// tokenizer.
const TOKENIZER_JSON: &str = include_str!("../configs/synth-tokenizer/tokenizer.json");
const TOKENIZER_CONFIG_JSON: &str = include_str!("../configs/synth-tokenizer/tokenizer_config.json");

/// What to tell whoever measures on a synthetic model.
pub const ROUTING_NOTICE: &str = "random weights: the router is random, so expert routing is near uniform \
(every expert about equally likely, little reuse from token to token); expert hit rates, bytes read and \
speeds measured on this model are a worst case, not what a trained model gives";

/// Standard deviations of the weights. With the same 0.02 everywhere, each layer's attention
/// output (an average over the context, much the same from token to token) outweighs the token
/// embedding 50 to 1, and the routers of deeper layers see nearly the same input at every
/// token: on 8 layers of the 30B shape, 60-70% of a token's experts were the previous token's
/// and an LRU arena of 25% of the experts hit 97%, far from a worst case. So the embedding is
/// N(0, 1) and the matrices that write into the residual stream (attn_output, ffn_down_exps)
/// are N(0, 0.001): the residual stays token-specific through all 48 layers, and routing is
/// near uniform (measured: 5-7% next-token reuse per layer against 6.25% for independent
/// uniform choices; LRU at 25% of the experts hits 30%).
pub const EMBD_STD: f64 = 1.0;
pub const WRITE_STD: f64 = 0.001;
/// The other matrices (attn_q/k/v, output, ffn_gate_exps, ffn_up_exps).
pub const WEIGHT_STD: f64 = 0.02;
/// The router: spread out, so top-k choices are well separated.
pub const ROUTER_STD: f64 = 0.5;

/// Version of the generator, part of the conversion id: bump it when the same options start to
/// give other bytes, so shards of two versions are never taken for one conversion.
const GENERATOR: &str = "sage-synth-2";

/// Rows of random floats quantized once per row length; expert matrices pick their rows here.
pub const POOL_ROWS: u64 = 32768;

/// How the weights are made, for the notice and the docs.
pub fn strategy(exact: bool) -> String {
    let common = "weights drawn from a seeded PRNG (token embedding ~N(0, 1), attn_output and ffn_down \
~N(0, 0.001), other matrices ~N(0, 0.02), norms uniform in [0.9, 1.1], routers ~N(0, 0.5)); the base is \
quantized by ggml tensor by tensor";
    if exact {
        format!("{common}, and so is every expert (--exact): every byte is its own quantization")
    } else {
        format!(
            "{common}; each expert row is picked from a pool of {POOL_ROWS} rows per row length that ggml \
quantized once (every record valid and distinct, rows repeat); --exact quantizes every expert (slow)"
        )
    }
}

#[derive(Clone, Debug)]
pub struct SynthOptions {
    /// A name from [`like_names`] or the path of a Hugging Face `config.json`.
    pub like: String,
    /// Type of the matrices (base and experts); norms and routers stay f32.
    pub quant: GgmlType,
    /// Keep only the first `n` layers (same per-layer shapes); None keeps all.
    pub layers: Option<u32>,
    pub seed: u64,
    /// Quantize every expert from its own random floats instead of picking rows from a pool.
    pub exact: bool,
    /// Also write the model as one standard GGUF here (`merge`).
    pub merged: Option<PathBuf>,
    /// Replace an existing model directory and merged file.
    pub force: bool,
    /// Also write cold copies of the experts at this type (`ConvertOptions::cold_quant`):
    /// quantized by ggml from the expert's own weights, as a conversion does.
    pub cold_quant: Option<GgmlType>,
}

#[derive(Debug)]
pub struct SynthReport {
    pub config: ModelConfig,
    pub convert: ConvertReport,
    pub merged: Option<MergeReport>,
    /// Seconds spent writing the model directory and the merged GGUF.
    pub dir_seconds: f64,
    pub merge_seconds: f64,
}

/// Write a synthetic model directory at `out` (and the merged GGUF when asked), telling
/// `progress` how far the model directory is.
pub fn synth(out: &Path, opts: &SynthOptions, progress: Progress) -> Result<SynthReport> {
    if let Some(m) = &opts.merged {
        // Refuse before minutes of writing, not after.
        if m.exists() && !opts.force {
            return Err(Error::Output { path: m.clone(), reason: "already exists; pass --force to replace it".into() });
        }
        if m.is_dir() {
            return Err(Error::Output {
                path: m.clone(),
                reason: "is a directory; --merged names a .gguf file".into(),
            });
        }
    }
    let src = SynthSource::new(&opts.like, opts.layers, opts.seed, opts.quant, opts.exact)?;
    let copts = ConvertOptions {
        quant_base: Some(opts.quant),
        quant_experts: Some(opts.quant),
        cold_quant: opts.cold_quant,
        force: opts.force,
        ..Default::default()
    };
    let t0 = std::time::Instant::now();
    let convert = convert_source(&src, out, &copts, progress)?;
    let dir_seconds = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();
    let merged = match &opts.merged {
        Some(m) => Some(merge(out, m, opts.force)?),
        None => None,
    };
    Ok(SynthReport { config: src.cfg.clone(), convert, merged, dir_seconds, merge_seconds: t1.elapsed().as_secs_f64() })
}

/// The config of `like` (a [`like_names`] name or a config.json path) cut to `layers` layers.
pub fn synth_config(like: &str, layers: Option<u32>) -> Result<ModelConfig> {
    let spec = SpecDir::create()?;
    spec_config(&spec, like, layers)
}

fn spec_config(spec: &SpecDir, like: &str, layers: Option<u32>) -> Result<ModelConfig> {
    let (name, config_path) = match like_names().into_iter().find(|(n, _)| *n == like) {
        Some((n, json)) => {
            let p = spec.path.join("config.json");
            std::fs::write(&p, json).at(&p)?;
            (format!("synth-{n}"), p)
        }
        None if like.ends_with(".json") || Path::new(like).is_file() => {
            let p = PathBuf::from(like);
            let stem = p.parent().and_then(|d| d.file_name()).map(|d| d.to_string_lossy().into_owned());
            (format!("synth-{}", stem.unwrap_or_else(|| "model".into())), p)
        }
        None => {
            return Err(Error::Usage(format!(
                "--like '{like}': unknown model; expected one of {} or the path of a config.json",
                like_names().iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
            )))
        }
    };
    let (_, mut cfg) = read_hf_config(&config_path)?;
    cfg.name = name;
    if let Some(n) = layers {
        if n == 0 || n > cfg.n_layer {
            return Err(Error::Usage(format!("--layers {n}: the model has layers 1 to {}", cfg.n_layer)));
        }
        cfg.n_layer = n;
        // Per-layer patterns keep their first n entries.
        cfg.swa_layers.truncate(n as usize);
        cfg.recurrent_layers.truncate(n as usize);
        // At least one layer keeps its experts.
        cfg.n_layer_dense_lead = cfg.n_layer_dense_lead.min(n - 1);
    }
    Ok(cfg)
}

/// A scratch directory holding the tokenizer files (and a built-in config.json), removed when
/// dropped: the tokenizer and config readers take paths.
struct SpecDir {
    path: PathBuf,
}

impl SpecDir {
    fn create() -> Result<SpecDir> {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let path = std::env::temp_dir().join(format!("sage-synth-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&path).at(&path)?;
        let dir = SpecDir { path };
        for (name, text) in [("tokenizer.json", TOKENIZER_JSON), ("tokenizer_config.json", TOKENIZER_CONFIG_JSON)] {
            let p = dir.path.join(name);
            std::fs::write(&p, text).at(&p)?;
        }
        Ok(dir)
    }
}

impl Drop for SpecDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

// ---------------------------------------------------------------------------------------------
// Random numbers: splitmix64 streams, one per row of each tensor, so any range of rows is
// generated on its own (the converter reads large tensors a slice at a time) and the bytes do
// not depend on how the rows are split. Each 16 bits of the stream pick one of 65536 quantiles
// of the tensor's distribution.

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(GOLDEN);
    mix(*state)
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn hash_str(seed: u64, s: &str) -> u64 {
    // FNV-1a, then mixed with the seed.
    let h = s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3));
    mix(h ^ mix(seed))
}

/// 65536 quantiles of a distribution, as f32 and as f16 bits.
struct Dist {
    f32: Vec<f32>,
    f16: Vec<u16>,
}

impl Dist {
    fn from_quantile(q: impl Fn(f64) -> f64) -> Dist {
        let f32: Vec<f32> = (0..65536u32).map(|i| q((i as f64 + 0.5) / 65536.0) as f32).collect();
        let f16 = f32.iter().map(|&x| f32_to_f16(x)).collect();
        Dist { f32, f16 }
    }

    fn normal(mean: f64, std: f64) -> Dist {
        Dist::from_quantile(|u| mean + std * std::f64::consts::SQRT_2 * erfinv(2.0 * u - 1.0))
    }

    fn uniform(lo: f64, hi: f64) -> Dist {
        Dist::from_quantile(|u| lo + (hi - lo) * u)
    }

    /// Rows `rows` (of `ne0` values each) of the tensor seeded `tensor_seed`, as `ty` bytes.
    fn fill(&self, ty: GgmlType, tensor_seed: u64, ne0: u64, rows: Range<u64>, buf: &mut Vec<u8>) {
        let width = if ty == GgmlType::F16 { 2 } else { 4 };
        let row_bytes = (ne0 * width) as usize;
        let n_rows = (rows.end - rows.start) as usize;
        buf.clear();
        buf.resize(n_rows * row_bytes, 0);
        let fill_rows = |first: u64, part: &mut [u8]| {
            for (i, row) in part.chunks_exact_mut(row_bytes).enumerate() {
                let mut st = mix(tensor_seed ^ (first + i as u64).wrapping_mul(GOLDEN));
                let mut bits = 0u64;
                for (j, v) in row.chunks_exact_mut(width as usize).enumerate() {
                    if j % 4 == 0 {
                        bits = splitmix(&mut st);
                    }
                    let k = (bits >> (16 * (j % 4))) as u16 as usize;
                    if width == 2 {
                        v.copy_from_slice(&self.f16[k].to_le_bytes());
                    } else {
                        v.copy_from_slice(&self.f32[k].to_le_bytes());
                    }
                }
            }
        };
        let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        if n_rows * row_bytes < (1 << 20) || threads == 1 {
            fill_rows(rows.start, buf);
            return;
        }
        let per = n_rows.div_ceil(threads);
        std::thread::scope(|s| {
            for (c, part) in buf.chunks_mut(per * row_bytes).enumerate() {
                let fill_rows = &fill_rows;
                s.spawn(move || fill_rows(rows.start + (c * per) as u64, part));
            }
        });
    }
}

/// IEEE half-precision bits of `x`, rounded to nearest even (subnormals included).
fn f32_to_f16(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let a = x.abs();
    if a.is_nan() {
        return sign | 0x7e00;
    }
    if a >= 65520.0 {
        return sign | 0x7c00;
    }
    if a < 6.103_515_6e-5 {
        // Subnormal: multiples of 2^-24 (rounding up to 1024 gives the smallest normal).
        return sign | (a * 16_777_216.0).round_ties_even() as u16;
    }
    let e = ((b >> 23) & 0xff) as i32 - 127 + 15;
    let m = b & 0x7f_ffff;
    let mut h = ((e as u32) << 10) | (m >> 13);
    let rest = m & 0x1fff;
    if rest > 0x1000 || (rest == 0x1000 && h & 1 == 1) {
        h += 1; // a carry into the exponent is the right result
    }
    sign | h as u16
}

/// Inverse error function (M. Giles, "Approximating the erfinv function", 2010), |x| < 1.
fn erfinv(x: f64) -> f64 {
    let mut w = -((1.0 - x) * (1.0 + x)).ln();
    let p = if w < 5.0 {
        w -= 2.5;
        [
            3.43273939e-07,
            -3.5233877e-06,
            -4.39150654e-06,
            0.00021858087,
            -0.00125372503,
            -0.00417768164,
            0.246640727,
            1.50140941,
        ]
        .iter()
        .fold(2.81022636e-08, |p, c| c + p * w)
    } else {
        w = w.sqrt() - 3.0;
        [
            0.000100950558,
            0.00134934322,
            -0.00367342844,
            0.00573950773,
            -0.0076224613,
            0.00943887047,
            1.00167406,
            2.83297682,
        ]
        .iter()
        .fold(-0.000200214257, |p, c| c + p * w)
    };
    p * x
}

// ---------------------------------------------------------------------------------------------

/// Quantized rows of one row length (`ne0`), for expert matrices to pick from.
struct RowPool {
    row_bytes: usize,
    n_rows: u64,
    data: Vec<u8>,
}

impl RowPool {
    /// `n_rows` rows of `ne0` random values (`dist`, stream `seed`) quantized to `ty`.
    fn build(dist: &Dist, seed: u64, ty: GgmlType, ne0: u64, n_rows: u64, path: &Path) -> Result<RowPool> {
        let row_bytes = ty.row_size(ne0).expect("type chosen to fit the rows") as usize;
        let mut data = Vec::with_capacity(n_rows as usize * row_bytes);
        let (mut raw, mut f32, mut q) = (Vec::new(), Vec::new(), Vec::new());
        // A slice at a time: memory stays at the pool plus a few MB.
        let step = ((16u64 << 20) / (4 * ne0)).max(1);
        for r0 in (0..n_rows).step_by(step as usize) {
            dist.fill(GgmlType::F16, seed, ne0, r0..(r0 + step).min(n_rows), &mut raw);
            let err = |source| Error::Tensor { path: path.to_path_buf(), tensor: format!("row pool {ne0}"), source };
            crate::ggml::dequantize_into(GgmlType::F16, &raw, ne0, &mut f32).map_err(err)?;
            crate::ggml::quantize_into(ty, &f32, ne0, &mut q).map_err(err)?;
            data.extend_from_slice(&q);
        }
        Ok(RowPool { row_bytes, n_rows, data })
    }

    /// `n_rows` rows picked by the stream `seed`, back to back, into `buf`.
    fn pick(&self, seed: u64, n_rows: u64, buf: &mut Vec<u8>) {
        buf.clear();
        buf.reserve(n_rows as usize * self.row_bytes);
        let mut st = seed;
        for _ in 0..n_rows {
            let i = ((splitmix(&mut st) >> 32) * self.n_rows) >> 32;
            let at = i as usize * self.row_bytes;
            buf.extend_from_slice(&self.data[at..at + self.row_bytes]);
        }
    }
}

/// A checkpoint that exists only as a config and a seed.
pub struct SynthSource {
    spec: SpecDir,
    cfg: ModelConfig,
    like: String,
    seed: u64,
    quant: GgmlType,
    exact: bool,
    base: HashMap<String, (Vec<u64>, Role)>,
    weight: Dist,
    embd: Dist,
    /// Matrices that write into the residual stream (attn_output, ffn_down_exps).
    write: Dist,
    norm: Dist,
    router: Dist,
    /// Types the experts are served in: f16 with `exact`, else already the output type.
    expert_types: [GgmlType; 3],
    /// Row pools of gate/up and of down, built on first use.
    pools: OnceLock<[RowPool; 2]>,
}

impl SynthSource {
    /// `quant` is the type the model will be converted to: pooled experts are served in it.
    pub fn new(like: &str, layers: Option<u32>, seed: u64, quant: GgmlType, exact: bool) -> Result<SynthSource> {
        let spec = SpecDir::create()?;
        let cfg = spec_config(&spec, like, layers)?;
        let base = base_tensors(&cfg).into_iter().map(|t| (t.name, (t.ne, t.role))).collect();
        let expert_types =
            Proj::ALL
                .map(|p| if exact { GgmlType::F16 } else { Role::Weight.target_type(quant, cfg.expert_shape(p)[0]) });
        if !exact && !expert_types.iter().all(|t| t.can_quantize()) {
            return Err(Error::Usage(format!("ggml cannot quantize to {quant} without an importance matrix")));
        }
        Ok(SynthSource {
            spec,
            cfg,
            like: like.to_string(),
            seed,
            quant,
            exact,
            base,
            weight: Dist::normal(0.0, WEIGHT_STD),
            embd: Dist::normal(0.0, EMBD_STD),
            write: Dist::normal(0.0, WRITE_STD),
            norm: Dist::uniform(0.9, 1.1),
            router: Dist::normal(0.0, ROUTER_STD),
            expert_types,
            pools: OnceLock::new(),
        })
    }

    fn base_entry(&self, name: &str) -> Result<&(Vec<u64>, Role)> {
        self.base.get(name).ok_or_else(|| Error::MissingTensor { path: self.spec.path.clone(), tensor: name.into() })
    }

    fn ty(role: Role) -> GgmlType {
        match role {
            Role::Weight | Role::Float => GgmlType::F16,
            Role::Norm | Role::Bias | Role::Router => GgmlType::F32,
        }
    }

    fn pools(&self) -> Result<&[RowPool; 2]> {
        if let Some(p) = self.pools.get() {
            return Ok(p);
        }
        let c = &self.cfg;
        let experts = c.n_expert as u64 * c.n_moe_layers() as u64;
        // No larger than the rows the experts have (a small model quantizes no more than --exact).
        let gate_up = POOL_ROWS.min(2 * c.n_ff_exp * experts);
        let down = POOL_ROWS.min(c.n_embd * experts);
        let path = &self.spec.path;
        let (gt, dt) = (self.expert_types[Proj::Gate.index()], self.expert_types[Proj::Down.index()]);
        let pools = [
            RowPool::build(&self.weight, hash_str(self.seed, "pool.gate_up"), gt, c.n_embd, gate_up, path)?,
            RowPool::build(&self.write, hash_str(self.seed, "pool.down"), dt, c.n_ff_exp, down, path)?,
        ];
        Ok(self.pools.get_or_init(|| pools))
    }
}

impl Source for SynthSource {
    fn path(&self) -> &Path {
        &self.spec.path
    }

    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn tokenizer(&self) -> Result<TokenizerData> {
        TokenizerData::from_hf_dir(&self.spec.path, &self.cfg)
    }

    fn base_meta(&self, name: &str) -> Result<Option<TensorMeta>> {
        let (ne, role) = self.base_entry(name)?;
        Ok(Some(TensorMeta { ty: Self::ty(*role), ne: ne.clone() }))
    }

    fn read_base(&self, name: &str, rows: Range<u64>, buf: &mut Vec<u8>) -> Result<()> {
        let (ne, role) = self.base_entry(name)?;
        let writes = |suffix: &str| split_blk(name).is_some_and(|(_, s)| s == suffix);
        let dist = match role {
            Role::Weight if name == TOKEN_EMBD => &self.embd,
            Role::Weight if writes(ATTN_OUT) || writes(FFN_DOWN_SHEXP) || writes(FFN_DOWN) => &self.write,
            Role::Weight | Role::Float | Role::Bias => &self.weight,
            Role::Norm => &self.norm,
            Role::Router => &self.router,
        };
        dist.fill(Self::ty(*role), hash_str(self.seed, name), ne[0], rows, buf);
        Ok(())
    }

    fn expert_meta(&self, _il: u32, _e: u32, proj: Proj) -> Result<TensorMeta> {
        Ok(TensorMeta { ty: self.expert_types[proj.index()], ne: self.cfg.expert_shape(proj).to_vec() })
    }

    fn read_expert(&self, il: u32, e: u32, proj: Proj, buf: &mut Vec<u8>) -> Result<()> {
        let [ne0, ne1] = self.cfg.expert_shape(proj);
        let seed = hash_str(self.seed, &format!("{}[{e}]", proj.stacked(il)));
        if self.exact {
            let dist = if proj == Proj::Down { &self.write } else { &self.weight };
            dist.fill(GgmlType::F16, seed, ne0, 0..ne1, buf);
        } else {
            let pool = &self.pools()?[if proj == Proj::Down { 1 } else { 0 }];
            pool.pick(seed, ne1, buf);
        }
        Ok(())
    }

    fn read_expert_bias(&self, il: u32, e: u32, proj: Proj, out: &mut Vec<f32>) -> Result<()> {
        // Small random biases (as the base's bias vectors), one per output row.
        let rows = self.cfg.expert_shape(proj)[1];
        let mut bytes = Vec::new();
        let seed = hash_str(self.seed, &format!("{}[{e}]", proj.stacked_bias(il)));
        self.weight.fill(GgmlType::F32, seed, rows, 0..1, &mut bytes);
        out.clear();
        out.extend(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
        Ok(())
    }

    fn describe(&self) -> String {
        let how = if self.exact { "every expert quantized" } else { "expert rows from a quantized pool" };
        format!("synthetic {} (random weights, seed {}, {how})", self.like, self.seed)
    }

    fn extra_kv(&self) -> Vec<(String, GgufValue)> {
        vec![(
            "general.description".into(),
            GgufValue::Str(format!(
                "sage-convert synth --like {} --seed {}: random weights with real shapes; {}; {ROUTING_NOTICE}",
                self.like,
                self.seed,
                strategy(self.exact)
            )),
        )]
    }

    fn conversion_id(&self) -> Option<String> {
        // The output is a function of these alone: same inputs, same bytes, shard headers
        // included. GENERATOR changes whenever the values drawn for the same inputs change.
        let key = format!("{GENERATOR}|{:?}|{}|{}|{}", self.cfg, self.seed, self.quant, self.exact);
        Some(format!("{:016x}{:016x}", hash_str(1, &key), hash_str(2, &key)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_conversion_matches_known_values() {
        assert_eq!(f32_to_f16(0.0), 0);
        assert_eq!(f32_to_f16(1.0), 0x3c00);
        assert_eq!(f32_to_f16(-2.0), 0xc000);
        assert_eq!(f32_to_f16(0.02), 0x251f);
        assert_eq!(f32_to_f16(65504.0), 0x7bff);
        assert_eq!(f32_to_f16(5.960_464_5e-8), 0x0001);
        assert_eq!(f32_to_f16(6.097_555e-5), 0x03ff);
        assert_eq!(f32_to_f16(1.0 + 1.0 / 2048.0), 0x3c00); // tie to even
        assert_eq!(f32_to_f16(1.0 + 3.0 / 2048.0), 0x3c02);
    }

    #[test]
    fn distributions_have_the_asked_moments() {
        let n = Dist::normal(0.0, 0.5);
        let mean = n.f32.iter().map(|&x| x as f64).sum::<f64>() / 65536.0;
        let var = n.f32.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / 65536.0;
        assert!(mean.abs() < 1e-6 && (var.sqrt() - 0.5).abs() < 0.01, "{mean} {var}");
        let u = Dist::uniform(0.9, 1.1);
        assert!(u.f32.iter().all(|&x| (0.9..=1.1).contains(&x)));
    }

    #[test]
    fn rows_do_not_depend_on_how_they_are_split() {
        let d = Dist::normal(0.0, 0.02);
        let (mut all, mut a, mut b) = (Vec::new(), Vec::new(), Vec::new());
        d.fill(GgmlType::F16, 7, 2048, 0..600, &mut all);
        d.fill(GgmlType::F16, 7, 2048, 0..123, &mut a);
        d.fill(GgmlType::F16, 7, 2048, 123..600, &mut b);
        a.extend_from_slice(&b);
        assert_eq!(all, a);
        d.fill(GgmlType::F16, 8, 2048, 0..600, &mut b);
        assert_ne!(all, b);
    }
}
