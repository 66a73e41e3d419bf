//! `sage footprint`: the exact memory a model needs at each quant type and arena size,
//! computed from its hyperparameters alone (a Hugging Face `config.json` is enough), and, for
//! a model directory or a GGUF, checked against the bytes the files actually hold.
//!
//! Types follow sage-convert (`arch::Role::target_type`): norms and the router stay f32, the
//! matrices take the requested type or the nearest one whose blocks fit their rows. Sizes come
//! from ggml's block sizes (`GgmlType::tensor_size`); expert records and arena slots from the
//! model directory format (`model_dir::ExpertLayer`), so nothing here restates either.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::arch::{base_tensors, Role, TensorSpec};
use crate::config::{read_hf_config, ModelConfig};
use crate::engine::arena;
use crate::error::{dims, Error, IoContext, Result};
use crate::ggml::{GgmlType, Gguf, GgufTensorInfo, GgufValue};
use crate::inspect::{short_bytes, si_bytes, types_line, Tally};
use crate::model_dir::{shard_name, ExpertLayer, ModelDir, BASE, EXPERT_DIR, RECORD_ALIGN};
use crate::names::{Proj, SAGE_FORMAT_VERSION};
use crate::quant::QUANT_NAMES;

/// An arena size to report the resident total at.
#[derive(Clone, Debug, PartialEq)]
pub enum ArenaSpec {
    /// A share of all experts (0.25 is a quarter of them).
    Share(f64),
    /// At most this many bytes (whole slots only, as `Engine::load` cuts it).
    Bytes(u64),
    /// This many expert slots.
    Experts(u64),
}

impl ArenaSpec {
    /// 25%, 50%, 75% and 100% of all experts.
    pub fn defaults() -> Vec<ArenaSpec> {
        [0.25, 0.5, 0.75, 1.0].into_iter().map(ArenaSpec::Share).collect()
    }

    /// `25%`, `2.00 GiB`, `1000 experts`.
    pub fn label(&self) -> String {
        match self {
            ArenaSpec::Share(s) => format!("{}%", (s * 100.0 * 100.0).round() / 100.0),
            ArenaSpec::Bytes(b) => short_bytes(*b),
            ArenaSpec::Experts(n) => format!("{n} experts"),
        }
    }

    /// Slots of `slot_bytes` this arena holds when the model has `n_experts` experts.
    pub fn slots(&self, n_experts: u64, slot_bytes: u64) -> u64 {
        let n = match self {
            ArenaSpec::Share(s) => (s.max(0.0) * n_experts as f64).round() as u64,
            ArenaSpec::Bytes(b) => arena::slots_in(*b, slot_bytes, 0),
            ArenaSpec::Experts(n) => *n,
        };
        n.min(n_experts)
    }
}

#[derive(Clone, Debug)]
pub struct FootprintOptions {
    /// Quant types to report; empty means all of `quant::QUANT_NAMES`.
    pub quants: Vec<GgmlType>,
    /// Arena sizes to report resident totals at.
    pub arenas: Vec<ArenaSpec>,
    /// Also report the cold copies `sage-convert --cold-quant` would write at this type (a
    /// model directory with cold copies reports its own without it).
    pub cold: Option<GgmlType>,
}

impl Default for FootprintOptions {
    fn default() -> Self {
        FootprintOptions { quants: Vec::new(), arenas: ArenaSpec::defaults(), cold: None }
    }
}

/// The cold copies of every expert (`sage-convert --cold-quant`): extra disk, beside the full
/// records (the arena's slots keep the full records' size).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ColdFootprint {
    /// The type asked for, as `--cold-quant` spells it, or ggml's names of the stored types.
    pub quant: String,
    /// Types of gate, up and down (after the block-size fallback).
    pub expert_types: [String; 3],
    /// One expert's cold record.
    pub expert_bytes: u64,
    /// The cold shards on disk: per layer a 4096-byte header and one record per expert.
    pub shard_bytes: u64,
}

/// The resident total (base + arena) at one arena size.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Resident {
    /// The arena as asked for: `25%`, `2.00 GiB`, `1000 experts`.
    pub arena: String,
    pub slots: u64,
    /// `slots` over all experts.
    pub share: f64,
    /// `slots` x slot bytes.
    pub arena_bytes: u64,
    /// Base + arena.
    pub total_bytes: u64,
    /// Whether the arena holds one token's experts; sage refuses to load a smaller one.
    pub enough: bool,
}

/// Every figure for one requested quant type.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct QuantFootprint {
    /// The type asked for, as `--quant` spells it (`q4_k`).
    pub quant: String,
    /// Bytes of everything that is not an expert.
    pub base_bytes: u64,
    pub n_base_tensors: u64,
    /// Base tensors by the type they get (norms and the router stay f32; fallbacks show here).
    pub base_types: BTreeMap<String, Tally>,
    /// Types of gate, up and down (ggml's names).
    pub expert_types: [String; 3],
    /// One expert: gate + up + down of one expert in one layer.
    pub expert_bytes: u64,
    /// One expert's record in a shard and its slot in the arena: `expert_bytes` rounded up to
    /// the 4096-byte record alignment.
    pub expert_slot_bytes: u64,
    /// All experts, `n_experts` x `expert_bytes`.
    pub experts_bytes: u64,
    /// The expert shards on disk: per layer a 4096-byte header and one record per expert.
    pub shard_bytes: u64,
    /// One token's active experts, n_layer x n_expert_used x `expert_bytes`.
    pub active_bytes: u64,
    /// Tensors whose rows do not fit the requested type, with the type they get instead.
    pub fallbacks: Vec<String>,
    pub resident: Vec<Resident>,
}

/// Bytes computed for the types a file holds beside the bytes it actually holds.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Measured {
    /// The `--quant` whose plan gives exactly the base tensors' types, if one does.
    pub base_quant: Option<String>,
    /// The `--quant` whose plan gives exactly the experts' types, if one does.
    pub expert_quant: Option<String>,
    pub base_types: BTreeMap<String, Tally>,
    pub expert_types: BTreeMap<String, Tally>,
    /// Sum of the base tensors' sizes as the file records them.
    pub base_bytes: u64,
    pub base_computed_bytes: u64,
    /// The whole base file (sage's base.gguf or the GGUF) on disk, metadata included.
    pub base_file_bytes: u64,
    /// Experts stored.
    pub n_experts: u64,
    /// One expert (the largest layer's record, unpadded).
    pub expert_bytes: u64,
    pub expert_computed_bytes: u64,
    /// All experts' bytes (unpadded records, or the GGUF's stacked expert tensors).
    pub experts_bytes: u64,
    pub experts_computed_bytes: u64,
    /// Sizes of the shard files (model directory only).
    pub shard_file_bytes: Option<u64>,
    pub shard_computed_bytes: Option<u64>,
    /// Sizes of the cold shard files (a model directory with cold copies only).
    pub cold_shard_file_bytes: Option<u64>,
    pub cold_shard_computed_bytes: Option<u64>,
    /// Every computed figure equals its measured one.
    pub agree: bool,
    /// What disagrees, and how the computed figures were made.
    pub notes: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Footprint {
    pub path: PathBuf,
    /// `config.json`, `model directory` or `gguf`.
    pub kind: String,
    pub config: ModelConfig,
    /// Experts in the model (a model directory counts the ones it holds).
    pub n_experts: u64,
    /// Experts one token uses, n_layer x n_expert_used.
    pub n_experts_active: u64,
    pub record_align: u64,
    pub quants: Vec<QuantFootprint>,
    /// The cold copies' extra disk (`FootprintOptions::cold`, or a model directory's own).
    pub cold: Option<ColdFootprint>,
    pub measured: Option<Measured>,
    /// One sequence's state between batches (`engine::memory::plan`), outside the resident
    /// totals above.
    pub state: StateFootprint,
}

/// One sequence's layer state: the recurrent layers' fixed part (with the checkpoints the
/// engine keeps of it) and the attention layers' K and V per token, at an f16 cache.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StateFootprint {
    pub recurrent_layers: u32,
    /// The recurrent states: the same at any context length.
    pub recurrent_bytes: u64,
    /// Their checkpoints (`engine::memory::CHECKPOINTS` copies).
    pub checkpoint_bytes: u64,
    pub attention_layers: u32,
    /// K and V of one position in every attention layer (a sliding layer's ring counted as a
    /// full cache: an upper bound).
    pub kv_bytes_per_token: u64,
}

fn state_footprint(cfg: &ModelConfig) -> StateFootprint {
    use crate::engine::memory::{plan, KvType, LayerPlan, MemoryOptions, StateKind, CHECKPOINTS};
    let o = MemoryOptions {
        n_ctx: 1,
        n_seq: 1,
        n_batch: 1,
        k_type: KvType::F16,
        v_type: KvType::F16,
        flash_attn: true,
        swa_full: true,
        checkpoints: CHECKPOINTS,
    };
    let p = plan(cfg, &o);
    let (rec, att): (Vec<&LayerPlan>, Vec<&LayerPlan>) =
        p.layers.iter().partition(|l| matches!(l.kind, StateKind::Recurrent { .. }));
    StateFootprint {
        recurrent_layers: rec.len() as u32,
        recurrent_bytes: rec.iter().map(|l| l.k_bytes + l.v_bytes).sum(),
        checkpoint_bytes: p.checkpoint_bytes,
        attention_layers: att.len() as u32,
        kv_bytes_per_token: att.iter().map(|l| l.k_bytes + l.v_bytes).sum(),
    }
}

fn size_of(ty: GgmlType, ne: &[u64], name: &str) -> Result<u64> {
    ty.tensor_size(ne)
        .ok_or_else(|| Error::Usage(format!("{name}: {} elements of {ty} overflow 64-bit sizes", dims(ne))))
}

/// `blk.7.attn_q.weight` -> `blk.*.attn_q.weight`, to count fallbacks over layers once.
fn layerless(name: &str) -> String {
    match name.strip_prefix("blk.").and_then(|r| r.split_once('.')) {
        Some((_, rest)) => format!("blk.*.{rest}"),
        None => name.to_string(),
    }
}

/// The user's spelling of a type (`q4_k`), or ggml's name when it has none.
fn quant_name(ty: GgmlType) -> String {
    QUANT_NAMES.iter().find(|(_, t)| *t == ty).map(|(n, _)| n.to_string()).unwrap_or_else(|| ty.name().to_string())
}

/// The shard layout of one layer with `n` experts of these types.
fn layer_of(cfg: &ModelConfig, types: [GgmlType; 3], n: u64) -> ExpertLayer {
    ExpertLayer {
        il: 0,
        file: shard_name(0),
        ids: (0..n as u32).collect(),
        offsets: Vec::new(),
        types,
        shapes: Proj::ALL.map(|p| cfg.expert_shape(p)),
        bias: cfg.expert_bias,
    }
}

/// Every figure for quant `quant`, for a model with `per_layer[il]` experts in layer `il`.
fn quant_footprint(
    cfg: &ModelConfig,
    quant: GgmlType,
    per_layer: &[u64],
    arenas: &[ArenaSpec],
) -> Result<QuantFootprint> {
    let mut base_bytes = 0;
    let mut base_types = BTreeMap::new();
    let mut falls: BTreeMap<(String, u64, GgmlType), u64> = BTreeMap::new();
    let layout = base_tensors(cfg);
    for TensorSpec { name, ne, role, .. } in &layout {
        let ty = role.target_type(quant, ne[0]);
        let bytes = size_of(ty, ne, name)?;
        base_bytes += bytes;
        Tally::add(&mut base_types, Some(ty), 0, 1, bytes);
        if *role == Role::Weight && ty != quant {
            *falls.entry((layerless(name), ne[0], ty)).or_default() += 1;
        }
    }
    let types = expert_plan(cfg, quant);
    for p in Proj::ALL {
        let ty = types[p.index()];
        if ty != quant {
            *falls.entry((layerless(&p.stacked(0)), cfg.expert_shape(p)[0], ty)).or_default() +=
                cfg.n_moe_layers() as u64;
        }
    }
    let one = layer_of(cfg, types, 1);
    for p in Proj::ALL {
        size_of(types[p.index()], &one.shapes[p.index()], p.exps())?;
    }
    let (expert_bytes, slot) = (one.record_size(), one.stride());
    let n_experts: u64 = per_layer.iter().sum();
    let shard_bytes = per_layer.iter().map(|&n| layer_of(cfg, types, n).file_size()).sum();
    let resident = arenas
        .iter()
        .map(|a| {
            let slots = a.slots(n_experts, slot);
            let bytes = arena::arena_bytes(slots, slot, 0);
            Resident {
                arena: a.label(),
                slots,
                share: if n_experts == 0 { 0.0 } else { slots as f64 / n_experts as f64 },
                arena_bytes: bytes,
                total_bytes: base_bytes + bytes,
                enough: slots >= cfg.n_expert_used as u64,
            }
        })
        .collect();
    let fallbacks = falls
        .into_iter()
        .map(|((name, ne0, got), n)| {
            format!(
                "{name}: rows of {ne0} do not fit {quant} blocks of {}; using {got} ({n} tensor{})",
                quant.block_size(),
                if n == 1 { "" } else { "s" }
            )
        })
        .collect();
    Ok(QuantFootprint {
        quant: quant_name(quant),
        base_bytes,
        n_base_tensors: layout.len() as u64,
        base_types,
        expert_types: types.map(|t| t.name().to_string()),
        expert_bytes,
        expert_slot_bytes: slot,
        experts_bytes: n_experts * expert_bytes,
        shard_bytes,
        active_bytes: cfg.n_moe_layers() as u64 * cfg.n_expert_used as u64 * expert_bytes,
        fallbacks,
        resident,
    })
}

/// The cold copies of a model with `per_layer[il]` experts in layer `il`, at `types`
/// (`quant` names them).
fn cold_footprint(cfg: &ModelConfig, quant: String, types: [GgmlType; 3], per_layer: &[u64]) -> ColdFootprint {
    ColdFootprint {
        quant,
        expert_types: types.map(|t| t.name().to_string()),
        expert_bytes: layer_of(cfg, types, 1).record_size(),
        shard_bytes: per_layer.iter().map(|&n| layer_of(cfg, types, n).file_size()).sum(),
    }
}

fn quants_of(opts: &FootprintOptions) -> Vec<GgmlType> {
    if opts.quants.is_empty() {
        QUANT_NAMES.iter().map(|(_, t)| *t).collect()
    } else {
        opts.quants.clone()
    }
}

fn compute(
    path: &Path,
    kind: &str,
    cfg: &ModelConfig,
    per_layer: &[u64],
    opts: &FootprintOptions,
) -> Result<Footprint> {
    let quants = quants_of(opts).into_iter().map(|q| quant_footprint(cfg, q, per_layer, &opts.arenas));
    Ok(Footprint {
        path: path.to_path_buf(),
        kind: kind.into(),
        config: cfg.clone(),
        n_experts: per_layer.iter().sum(),
        n_experts_active: cfg.n_moe_layers() as u64 * cfg.n_expert_used as u64,
        record_align: RECORD_ALIGN,
        quants: quants.collect::<Result<_>>()?,
        cold: opts.cold.map(|q| cold_footprint(cfg, quant_name(q), expert_plan(cfg, q), per_layer)),
        measured: None,
        state: state_footprint(cfg),
    })
}

/// The footprint of a model with these hyperparameters (every expert present).
pub fn of_config(cfg: &ModelConfig, opts: &FootprintOptions) -> Result<Footprint> {
    compute(Path::new(""), "config", cfg, &cfg.experts_per_layer(), opts)
}

/// What `footprint` reads a path as.
#[derive(Clone, Debug, PartialEq)]
enum Input {
    HfConfig(PathBuf),
    ModelDir(PathBuf),
    Gguf(PathBuf),
}

fn not_a_model(path: &Path, why: &str) -> Error {
    Error::Usage(format!(
        "{}: {why}; expected a Hugging Face config.json, a sage model directory (with {BASE}) or a GGUF file",
        path.display()
    ))
}

fn detect(path: &Path) -> Result<Input> {
    if path.is_dir() {
        if path.join(BASE).is_file() {
            return Ok(Input::ModelDir(path.to_path_buf()));
        }
        let cfg = path.join("config.json");
        if cfg.is_file() {
            return Ok(Input::HfConfig(cfg));
        }
        return Err(not_a_model(path, &format!("a directory with neither {BASE} nor config.json")));
    }
    if !path.exists() {
        return Err(Error::Usage(format!("{}: does not exist", path.display())));
    }
    let mut f = std::fs::File::open(path).at(path)?;
    let mut head = Vec::with_capacity(64);
    (&mut f).take(64).read_to_end(&mut head).at(path)?;
    if head.starts_with(b"GGUF") {
        // sage's own base.gguf: the directory around it is the model.
        if let Ok(g) = Gguf::open(path) {
            if g.get(SAGE_FORMAT_VERSION).is_some() {
                if let Some(dir) = path.parent().filter(|d| d.join(EXPERT_DIR).is_dir()) {
                    return Ok(Input::ModelDir(dir.to_path_buf()));
                }
            }
        }
        return Ok(Input::Gguf(path.to_path_buf()));
    }
    let text = head.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&head);
    if text.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
        return Ok(Input::HfConfig(path.to_path_buf()));
    }
    Err(not_a_model(path, "neither JSON nor GGUF"))
}

/// The footprint of the model at `path`: a Hugging Face `config.json` (or a checkpoint
/// directory holding one), a sage model directory, or a llama.cpp GGUF of a qwen3moe model.
/// For the last two, `measured` holds the bytes the files hold beside the computed ones.
pub fn footprint(path: &Path, opts: &FootprintOptions) -> Result<Footprint> {
    match detect(path)? {
        Input::HfConfig(p) => {
            let (_, mut cfg) = read_hf_config(&p)?;
            // A config saved under another name (`qwen3-30b-a3b.config.json`) names the model
            // better than the directory it lies in, which `read_hf_config` falls back to.
            let dir_name = p.parent().and_then(|d| d.file_name()).map(|d| d.to_string_lossy().into_owned());
            let file_name = p.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
            if file_name != "config.json" && dir_name.as_deref() == Some(cfg.name.as_str()) {
                let stem = file_name.trim_end_matches(".json").trim_end_matches(".config");
                cfg.name = stem.to_string();
            }
            let mut f = of_config(&cfg, opts)?;
            f.path = p;
            f.kind = "config.json".into();
            Ok(f)
        }
        Input::ModelDir(dir) => of_model_dir(&dir, opts),
        Input::Gguf(p) => of_gguf(&p, opts),
    }
}

/// The first type, `preferred` (the type the file's first tensor has) and then those of
/// `QUANT_NAMES`, whose plan gives exactly the stored types (`stored(q)` says whether it does).
fn matching_quant(stored: impl Fn(GgmlType) -> bool, preferred: Option<GgmlType>) -> Option<GgmlType> {
    let all = QUANT_NAMES.iter().map(|(_, t)| *t);
    preferred.into_iter().chain(all).find(|&q| stored(q))
}

/// Computed and measured base bytes for a file whose base tensors are `stored`.
struct BaseCheck {
    quant: Option<GgmlType>,
    types: BTreeMap<String, Tally>,
    measured: u64,
    computed: u64,
    notes: Vec<String>,
}

fn check_base(cfg: &ModelConfig, stored: &[GgufTensorInfo], is_expert: impl Fn(&str) -> bool) -> Result<BaseCheck> {
    let layout = base_tensors(cfg);
    let by_name: BTreeMap<&str, &GgufTensorInfo> = stored.iter().map(|t| (t.name.as_str(), t)).collect();
    let ty_of = |name: &str| by_name.get(name).and_then(|t| t.ty);
    let mut notes = Vec::new();
    let mut types = BTreeMap::new();
    let mut measured = 0;
    for t in stored.iter().filter(|t| !is_expert(&t.name)) {
        measured += t.size;
        Tally::add(&mut types, t.ty, t.raw_type, 1, t.size);
        if !layout.iter().any(|spec| spec.name == t.name) {
            notes.push(format!("{} is not a tensor sage-convert writes ({} bytes)", t.name, t.size));
        }
    }
    let plan_matches = |q: GgmlType| layout.iter().all(|t| ty_of(&t.name) == Some(t.role.target_type(q, t.ne[0])));
    let quant = matching_quant(plan_matches, layout.first().and_then(|t| ty_of(&t.name)));
    let mut computed = 0;
    for TensorSpec { name, ne, role, .. } in &layout {
        // The plan's type, which for a matching plan is the stored one; else the stored one.
        let ty = match (quant, ty_of(name)) {
            (Some(q), _) => role.target_type(q, ne[0]),
            (None, Some(ty)) => ty,
            (None, None) => {
                notes.push(format!("{name} is missing or of a type this ggml does not know"));
                continue;
            }
        };
        computed += size_of(ty, ne, name)?;
    }
    if quant.is_none() {
        notes.push("the base's types are no single --quant plan; computed from the stored types".into());
    }
    Ok(BaseCheck { quant, types, measured, computed, notes })
}

/// The types sage-convert gives gate, up and down when `quant` is asked for.
fn expert_plan(cfg: &ModelConfig, quant: GgmlType) -> [GgmlType; 3] {
    Proj::ALL.map(|p| Role::Weight.target_type(quant, cfg.expert_shape(p)[0]))
}

/// Per layer expert types of a file; the `--quant` whose plan they all are, if one is.
fn expert_quant(cfg: &ModelConfig, layers: &[[GgmlType; 3]]) -> Option<GgmlType> {
    matching_quant(|q| layers.iter().all(|t| *t == expert_plan(cfg, q)), layers.first().map(|t| t[0]))
}

fn file_len(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path).at(path)?.len())
}

/// The footprint of a sage model directory, with its files' bytes beside the computed ones.
pub fn of_model_dir(dir: &Path, opts: &FootprintOptions) -> Result<Footprint> {
    let md = ModelDir::open(dir)?;
    let cfg = &md.config;
    let per_layer: Vec<u64> = md.manifest.layers.iter().map(|l| l.ids.len() as u64).collect();
    let mut f = compute(dir, "model directory", cfg, &per_layer, opts)?;

    let base = check_base(cfg, &md.base_tensors, |_| false)?;
    let mut notes = base.notes;
    let layer_types: Vec<[GgmlType; 3]> = md.manifest.layers.iter().map(|l| l.types).collect();
    let eq = expert_quant(cfg, &layer_types);
    let mut expert_types = BTreeMap::new();
    let (mut computed, mut shards_computed, mut shards, mut one, mut one_computed) = (0, 0, 0, 0, 0);
    for l in &md.manifest.layers {
        let n = l.ids.len() as u64;
        let types = match eq {
            Some(q) => expert_plan(cfg, q),
            None => l.types,
        };
        let planned = layer_of(cfg, types, n);
        computed += n * planned.record_size();
        shards_computed += planned.file_size();
        one_computed = one_computed.max(planned.record_size());
        one = one.max(l.record_size());
        let sizes = l.sizes();
        for p in Proj::ALL {
            Tally::add(&mut expert_types, Some(l.types[p.index()]), 0, n, n * sizes[p.index()]);
        }
        shards += file_len(&dir.join(&l.file))?;
    }
    if eq.is_none() {
        notes.push("the experts' types are no single --quant plan; computed from the stored types".into());
    }
    let experts = md.expert_bytes();
    // Cold copies: their shards' sizes against the plan of their types.
    let (mut cold_files, mut cold_computed) = (None, None);
    if !md.manifest.cold.is_empty() {
        let cold_types: Vec<[GgmlType; 3]> = md.manifest.cold.iter().map(|l| l.types).collect();
        let cq = expert_quant(cfg, &cold_types);
        let (mut files, mut planned) = (0, 0);
        for l in &md.manifest.cold {
            let types = cq.map_or(l.types, |q| expert_plan(cfg, q));
            planned += layer_of(cfg, types, l.ids.len() as u64).file_size();
            files += file_len(&dir.join(&l.file))?;
        }
        (cold_files, cold_computed) = (Some(files), Some(planned));
        if opts.cold.is_none() {
            let name = cq.map_or_else(|| "as stored".to_string(), quant_name);
            f.cold = Some(cold_footprint(cfg, name, cold_types[0], &per_layer));
            if cq.is_none() {
                notes.push(
                    "the cold copies' types are no single --cold-quant plan; computed from the stored types".into(),
                );
            }
        }
    }
    let agree = base.computed == base.measured
        && computed == experts
        && shards_computed == shards
        && cold_files == cold_computed
        && one == one_computed
        && notes.iter().all(|n| n.contains("computed from the stored types"));
    f.measured = Some(Measured {
        base_quant: base.quant.map(quant_name),
        expert_quant: eq.map(quant_name),
        base_types: base.types,
        expert_types,
        base_bytes: base.measured,
        base_computed_bytes: base.computed,
        base_file_bytes: file_len(&md.base_path)?,
        n_experts: per_layer.iter().sum(),
        expert_bytes: one,
        expert_computed_bytes: one_computed,
        experts_bytes: experts,
        experts_computed_bytes: computed,
        shard_file_bytes: Some(shards),
        shard_computed_bytes: Some(shards_computed),
        cold_shard_file_bytes: cold_files,
        cold_shard_computed_bytes: cold_computed,
        agree,
        notes,
    });
    Ok(f)
}

/// The footprint of a llama.cpp GGUF (experts stacked per layer as `blk.N.ffn_*_exps`), with
/// its tensors' bytes beside the computed ones.
pub fn of_gguf(path: &Path, opts: &FootprintOptions) -> Result<Footprint> {
    let (g, _file, tensors) = Gguf::open_checked(path)?;
    if let Some(GgufValue::U32(_)) = g.get(SAGE_FORMAT_VERSION) {
        log::info!("{}: a sage base.gguf without its experts/ beside it; its experts are not measured", path.display());
    }
    let cfg = ModelConfig::read_gguf(&g, path)?;
    let per_layer = cfg.experts_per_layer();
    let mut f = compute(path, "gguf", &cfg, &per_layer, opts)?;
    let is_expert = |n: &str| n.ends_with("_exps.weight");
    let base = check_base(&cfg, &tensors, is_expert)?;
    let mut notes = base.notes;

    let by_name: BTreeMap<&str, &GgufTensorInfo> = tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut layer_types = Vec::new();
    let mut expert_types = BTreeMap::new();
    let mut experts = 0;
    let mut n_experts = 0;
    for t in tensors.iter().filter(|t| is_expert(&t.name)) {
        experts += t.size;
        Tally::add(&mut expert_types, t.ty, t.raw_type, t.ne.get(2).copied().unwrap_or(1), t.size);
    }
    for il in (0..cfg.n_layer).filter(|&il| !cfg.is_dense(il)) {
        let stacked = Proj::ALL.map(|p| by_name.get(p.stacked(il).as_str()).copied());
        match stacked {
            [Some(a), Some(b), Some(c)] => match [a.ty, b.ty, c.ty] {
                [Some(x), Some(y), Some(z)] => {
                    layer_types.push([x, y, z]);
                    n_experts += a.ne.get(2).copied().unwrap_or(1);
                }
                _ => notes.push(format!("layer {il}: an expert tensor of a type this ggml does not know")),
            },
            _ => notes.push(format!("layer {il}: no ffn_{{gate,up,down}}_exps tensors")),
        }
    }
    let eq = (layer_types.len() == cfg.n_moe_layers() as usize).then(|| expert_quant(&cfg, &layer_types)).flatten();
    let plan_types = |t: &[GgmlType; 3]| match eq {
        Some(q) => expert_plan(&cfg, q),
        None => *t,
    };
    let computed: u64 =
        layer_types.iter().map(|t| cfg.n_expert as u64 * layer_of(&cfg, plan_types(t), 1).record_size()).sum();
    let one_computed = layer_types.iter().map(|t| layer_of(&cfg, plan_types(t), 1).record_size()).max().unwrap_or(0);
    let one = layer_types.iter().map(|t| layer_of(&cfg, *t, 1).record_size()).max().unwrap_or(0);
    if eq.is_none() {
        notes.push("the experts' types are no single --quant plan; computed from the stored types".into());
    }
    let agree = base.computed == base.measured
        && computed == experts
        && n_experts == cfg.n_moe_layers() as u64 * cfg.n_expert as u64
        && notes.iter().all(|n| n.contains("computed from the stored types"));
    f.measured = Some(Measured {
        base_quant: base.quant.map(quant_name),
        expert_quant: eq.map(quant_name),
        base_types: base.types,
        expert_types,
        base_bytes: base.measured,
        base_computed_bytes: base.computed,
        base_file_bytes: file_len(path)?,
        n_experts,
        expert_bytes: one,
        expert_computed_bytes: one_computed,
        experts_bytes: experts,
        experts_computed_bytes: computed,
        shard_file_bytes: None,
        shard_computed_bytes: None,
        cold_shard_file_bytes: None,
        cold_shard_computed_bytes: None,
        agree,
        notes,
    });
    Ok(f)
}

/// Rows of cells as a left-aligned first column and right-aligned others.
fn table(f: &mut fmt::Formatter<'_>, rows: &[Vec<String>]) -> fmt::Result {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let w: Vec<usize> =
        (0..n).map(|c| rows.iter().map(|r| r.get(c).map_or(0, |s| s.chars().count())).max().unwrap_or(0)).collect();
    for r in rows {
        let mut line = String::from("  ");
        for (c, cell) in r.iter().enumerate() {
            if c == 0 {
                line.push_str(&format!("{cell:<w$}", w = w[c]));
            } else {
                line.push_str(&format!("  {cell:>w$}", w = w[c]));
            }
        }
        writeln!(f, "{}", line.trim_end())?;
    }
    Ok(())
}

impl fmt::Display for Footprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        writeln!(f, "{} ({}: {}; {})", c.name, self.kind, self.path.display(), c.arch().family())?;
        let shared =
            if c.n_ff_shexp > 0 { format!(", shared expert {} (in the base)", c.n_ff_shexp) } else { String::new() };
        writeln!(
            f,
            "  n_layer {}, n_embd {}, n_vocab {}, n_head {}/{} (head_dim {}), n_expert {} (n_expert_used {}), n_ff_exp {}{shared}, tied embeddings: {}",
            c.n_layer,
            c.n_embd,
            c.n_vocab,
            c.n_head,
            c.n_head_kv,
            c.head_dim,
            c.n_expert,
            c.n_expert_used,
            c.n_ff_exp,
            if c.tie_word_embeddings { "yes" } else { "no" }
        )?;
        if let Some(m) = c.mla {
            writeln!(
                f,
                "  latent attention: per token and layer a cached row of {} values (latent {} + RoPE {}); heads of {} (q/k) and {} (v){}",
                c.head_dim,
                m.kv_lora_rank,
                c.n_rot,
                m.qk_nope + c.n_rot,
                m.v_head_dim,
                if m.q_lora_rank > 0 { format!(", q LoRA rank {}", m.q_lora_rank) } else { String::new() }
            )?;
        }
        writeln!(
            f,
            "  {} experts in all, {} active per token; expert records and arena slots aligned to {} bytes",
            self.n_experts, self.n_experts_active, self.record_align
        )?;
        if c.n_layer_dense_lead > 0 {
            writeln!(
                f,
                "  {} dense layer(s) first (FFN {}, in the base, no experts); {} layers with experts",
                c.n_layer_dense_lead,
                c.n_ff,
                c.n_moe_layers()
            )?;
        }
        writeln!(f, "  norms and the router stay f32; GiB = 2^30 bytes, GB = 10^9 bytes")?;
        writeln!(f)?;
        let mut rows = vec![["quant", "base", "one expert", "slot", "all experts", "active/token", "shards on disk"]
            .map(String::from)
            .to_vec()];
        for q in &self.quants {
            rows.push(vec![
                q.quant.clone(),
                short_bytes(q.base_bytes),
                short_bytes(q.expert_bytes),
                short_bytes(q.expert_slot_bytes),
                short_bytes(q.experts_bytes),
                short_bytes(q.active_bytes),
                short_bytes(q.shard_bytes),
            ]);
        }
        table(f, &rows)?;
        if let Some(c) = &self.cold {
            writeln!(
                f,
                "  cold copies at {} ({}): one expert {}, cold shards on disk {} more (arena slots unchanged)",
                c.quant,
                c.expert_types.join("/"),
                short_bytes(c.expert_bytes),
                short_bytes(c.shard_bytes)
            )?;
        }
        writeln!(f)?;
        writeln!(f, "  the same in decimal units (exact bytes with --json):")?;
        let mut rows =
            vec![["quant", "base", "one expert", "slot", "all experts", "active/token"].map(String::from).to_vec()];
        for q in &self.quants {
            rows.push(vec![
                q.quant.clone(),
                si_bytes(q.base_bytes),
                si_bytes(q.expert_bytes),
                si_bytes(q.expert_slot_bytes),
                si_bytes(q.experts_bytes),
                si_bytes(q.active_bytes),
            ]);
        }
        table(f, &rows)?;
        if let Some(q) = self.quants.first() {
            if !q.resident.is_empty() {
                writeln!(f)?;
                writeln!(
                    f,
                    "  resident: base + arena (arena = slots × slot + 4 KiB to align them; KV cache and compute buffers not included)"
                )?;
                let st = &self.state;
                let kv = format!(
                    "{} attention layers: KV {} per token (f16)",
                    st.attention_layers,
                    si_bytes(st.kv_bytes_per_token)
                );
                if st.recurrent_layers > 0 {
                    writeln!(
                        f,
                        "  state per sequence: {} recurrent layers {} at any context (+ {} of checkpoints); {kv}",
                        st.recurrent_layers,
                        si_bytes(st.recurrent_bytes),
                        si_bytes(st.checkpoint_bytes)
                    )?;
                } else {
                    writeln!(f, "  state per sequence: {kv}")?;
                }
                // Slot counts go in the header where every quant gets the same (shares, counts).
                let same: Vec<bool> = (0..q.resident.len())
                    .map(|i| {
                        self.quants.iter().all(|o| o.resident.get(i).map(|r| r.slots) == Some(q.resident[i].slots))
                    })
                    .collect();
                let mut head = vec!["quant".to_string()];
                head.extend(q.resident.iter().zip(&same).map(|(r, &same)| {
                    if same {
                        format!("{} ({} slots)", r.arena, r.slots)
                    } else {
                        format!("{} arena", r.arena)
                    }
                }));
                let mut rows = vec![head];
                let mut small = false;
                for q in &self.quants {
                    let mut row = vec![q.quant.clone()];
                    for (r, &same) in q.resident.iter().zip(&same) {
                        small |= !r.enough;
                        let mark = if r.enough { "" } else { "!" };
                        row.push(if same {
                            format!("{}{mark}", short_bytes(r.total_bytes))
                        } else {
                            format!("{} ({} slots){mark}", short_bytes(r.total_bytes), r.slots)
                        });
                    }
                    rows.push(row);
                }
                table(f, &rows)?;
                if small {
                    writeln!(
                        f,
                        "  ! fewer slots than one token's {} experts: sage refuses to load with such an arena",
                        c.n_expert_used
                    )?;
                }
            }
        }
        let falls: Vec<String> =
            self.quants.iter().flat_map(|q| q.fallbacks.iter().map(move |s| format!("{}: {s}", q.quant))).collect();
        if !falls.is_empty() {
            writeln!(f)?;
            writeln!(f, "  fallbacks (rows that do not fit the type's blocks):")?;
            for s in falls {
                writeln!(f, "    {s}")?;
            }
        }
        if let Some(m) = &self.measured {
            let verdict = |a: u64, b: u64| if a == b { "agree" } else { "DISAGREE" };
            let plan = |q: &Option<String>| match q {
                Some(q) => format!("the {q} plan"),
                None => "the stored types".into(),
            };
            writeln!(f)?;
            writeln!(f, "  measured ({}):", self.kind)?;
            writeln!(
                f,
                "    base         computed {} ({}), measured {} bytes: {}",
                m.base_computed_bytes,
                plan(&m.base_quant),
                m.base_bytes,
                verdict(m.base_computed_bytes, m.base_bytes)
            )?;
            writeln!(f, "                 tensors by type: {}", types_line(&m.base_types, "tensors"))?;
            if m.shard_file_bytes.is_some() {
                writeln!(
                    f,
                    "    {BASE}    {} on disk (the tensors plus metadata, tokenizer and padding)",
                    crate::inspect::human_bytes(m.base_file_bytes)
                )?;
            } else {
                writeln!(
                    f,
                    "    file         {} on disk (all tensors plus metadata, tokenizer and padding)",
                    crate::inspect::human_bytes(m.base_file_bytes)
                )?;
            }
            writeln!(
                f,
                "    one expert   computed {}, measured {} bytes: {}",
                m.expert_computed_bytes,
                m.expert_bytes,
                verdict(m.expert_computed_bytes, m.expert_bytes)
            )?;
            writeln!(
                f,
                "    experts      {} stored; computed {} ({}), measured {} bytes: {}",
                m.n_experts,
                m.experts_computed_bytes,
                plan(&m.expert_quant),
                m.experts_bytes,
                verdict(m.experts_computed_bytes, m.experts_bytes)
            )?;
            writeln!(f, "                 projections by type: {}", types_line(&m.expert_types, "projections"))?;
            if let (Some(fc), Some(fm)) = (m.shard_computed_bytes, m.shard_file_bytes) {
                writeln!(f, "    shard files  computed {fc}, measured {fm} bytes: {}", verdict(fc, fm))?;
            }
            if let (Some(fc), Some(fm)) = (m.cold_shard_computed_bytes, m.cold_shard_file_bytes) {
                writeln!(f, "    cold shards  computed {fc}, measured {fm} bytes: {}", verdict(fc, fm))?;
            }
            for n in &m.notes {
                writeln!(f, "    note: {n}")?;
            }
            writeln!(
                f,
                "    => computed and measured {}",
                if m.agree { "agree exactly" } else { "DISAGREE (see above)" }
            )?;
        }
        Ok(())
    }
}

/// Series colours of the chart, one per quant type.
const COLOURS: [(u8, u8, u8); 10] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
];

/// An SVG chart at `out`: resident bytes (GB) against the arena's share of all experts, one
/// line per quant type starting at its base (an empty arena), the base dashed beneath.
pub fn plot_svg(fp: &Footprint, out: &Path) -> Result<()> {
    use plotters::prelude::*;
    let err = |e: String| Error::Output { path: out.to_path_buf(), reason: e };
    let gb = |n: u64| n as f64 / 1e9;
    let y_max = fp
        .quants
        .iter()
        .flat_map(|q| q.resident.iter().map(|r| r.total_bytes).chain([q.base_bytes, q.base_bytes + q.shard_bytes]))
        .max()
        .unwrap_or(1);
    let y_max = gb(y_max) * 1.05;
    {
        let root = SVGBackend::new(out, (960, 600)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        let title = format!("{}: resident memory (base + arena)", fp.config.name);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(0f64..100f64, 0f64..y_max.max(1e-9))
            .map_err(|e| err(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("arena, % of all experts")
            .y_desc("resident GB (10^9 bytes)")
            .draw()
            .map_err(|e| err(e.to_string()))?;
        for (i, q) in fp.quants.iter().enumerate() {
            let (r, g, b) = COLOURS[i % COLOURS.len()];
            let colour = RGBColor(r, g, b);
            let mut pts: Vec<(f64, f64)> = q.resident.iter().map(|r| (100.0 * r.share, gb(r.total_bytes))).collect();
            pts.push((0.0, gb(q.base_bytes)));
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            let base = gb(q.base_bytes);
            chart
                .draw_series(DashedLineSeries::new([(0.0, base), (100.0, base)], 4, 4, colour.mix(0.5).stroke_width(1)))
                .map_err(|e| err(e.to_string()))?;
            chart
                .draw_series(LineSeries::new(pts.clone(), colour.stroke_width(2)))
                .map_err(|e| err(e.to_string()))?
                .label(format!("{} (base {})", q.quant, si_bytes(q.base_bytes)))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2)));
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 3, colour.filled())))
                .map_err(|e| err(e.to_string()))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(e.to_string()))?;
        root.present().map_err(|e| err(e.to_string()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(n_embd: u64, n_ff_exp: u64) -> ModelConfig {
        ModelConfig {
            arch: "qwen3moe",
            name: "t".into(),
            n_vocab: 100,
            n_embd,
            n_layer: 3,
            n_head: 2,
            n_head_kv: 1,
            head_dim: n_embd / 2,
            n_ff: 0,
            n_ff_exp,
            n_ff_shexp: 0,
            n_expert: 8,
            n_expert_used: 2,
            norm_topk_prob: true,
            rms_eps: 1e-6,
            rope_theta: 1e6,
            n_ctx_train: 4096,
            tie_word_embeddings: false,
            n_swa: 0,
            swa_layers: Vec::new(),
            yarn: None,
            expert_bias: false,
            expert_act: crate::config::ExpertAct::SwiGlu,
            n_rot: n_embd / 2,
            rope_sections: None,
            recurrent_layers: Vec::new(),
            ssm: None,
            n_layer_dense_lead: 0,
            gating: Default::default(),
            qk_norm: false,
            mla: None,
        }
    }

    #[test]
    fn rows_that_do_not_fit_fall_back_as_convert_does() {
        let opts = FootprintOptions { quants: vec![GgmlType::Q4_K], ..Default::default() };
        let f = of_config(&cfg(96, 64), &opts).unwrap();
        let q = &f.quants[0];
        // 96 and 64 are not multiples of 256: q4_K falls back to q5_0 (32-wide blocks).
        assert_eq!(q.expert_types, ["q5_0", "q5_0", "q5_0"].map(String::from));
        assert!(q.fallbacks.iter().any(|s| s.contains("blk.*.ffn_down_exps.weight: rows of 64")), "{:?}", q.fallbacks);
        // q5_0: 22 bytes per 32 elements.
        assert_eq!(q.expert_bytes, 3 * 96 * 64 / 32 * 22);
        // 12672 bytes: a slot of 4 pages.
        assert_eq!(q.expert_slot_bytes, 4 * RECORD_ALIGN);
        assert_eq!(q.experts_bytes, 3 * 8 * q.expert_bytes);
        assert_eq!(q.shard_bytes, 3 * (RECORD_ALIGN + 8 * 4 * RECORD_ALIGN));
    }

    #[test]
    fn arena_specs_count_whole_slots() {
        assert_eq!(ArenaSpec::Share(0.25).slots(6144, 10), 1536);
        assert_eq!(ArenaSpec::Bytes(2 << 30).slots(6144, 2_654_208), 809);
        assert_eq!(ArenaSpec::Bytes(u64::MAX).slots(6144, 4096), 6144);
        assert_eq!(ArenaSpec::Experts(7000).slots(6144, 4096), 6144);
        assert_eq!(ArenaSpec::Share(0.5).label(), "50%");
        assert_eq!(ArenaSpec::Bytes(512 << 20).label(), "512.00 MiB");
    }

    #[test]
    fn tied_embeddings_store_no_output() {
        let mut c = cfg(256, 256);
        let opts = FootprintOptions { quants: vec![GgmlType::F32], arenas: vec![], cold: None };
        let untied = of_config(&c, &opts).unwrap().quants[0].base_bytes;
        c.tie_word_embeddings = true;
        let tied = of_config(&c, &opts).unwrap().quants[0].base_bytes;
        assert_eq!(untied - tied, 256 * 100 * 4);
    }
}
