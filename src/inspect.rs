//! `sage-convert inspect`: what a model directory or a GGUF holds.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::ModelConfig;
use crate::error::Result;
use crate::ggml::{GgmlType, Gguf};
use crate::model_dir::ModelDir;
use crate::names::Proj;

/// Count and bytes of tensors of one type.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Tally {
    pub count: u64,
    pub bytes: u64,
}

impl Tally {
    /// Count `count` tensors of `bytes` in all under `ty` (ggml's name, or `type N` for a type
    /// this ggml does not know).
    pub fn add(map: &mut BTreeMap<String, Tally>, ty: Option<GgmlType>, raw: u32, count: u64, bytes: u64) {
        let name = ty.map_or_else(|| format!("type {raw}"), |t| t.name().to_string());
        let t = map.entry(name).or_default();
        t.count += count;
        t.bytes += bytes;
    }
}

/// `f32: 21 tensors, 75.00 KiB; q4_K: 18 tensors, 1.55 MiB` (`what` names the things counted).
pub fn types_line(map: &BTreeMap<String, Tally>, what: &str) -> String {
    map.iter().map(|(t, v)| format!("{t}: {} {what}, {}", v.count, short_bytes(v.bytes))).collect::<Vec<_>>().join("; ")
}

#[derive(Clone, Debug, Serialize)]
pub struct Inspection {
    pub path: PathBuf,
    /// "model directory" or "gguf".
    pub kind: String,
    /// llama.cpp's name of the architecture (`general.architecture`).
    pub architecture: String,
    /// The model family (`Qwen3-MoE`, `Mixtral`, …).
    pub family: String,
    pub config: ModelConfig,
    pub conversion_id: Option<String>,
    pub source: Option<String>,
    pub n_base_tensors: u64,
    pub base_bytes: u64,
    pub base_types: BTreeMap<String, Tally>,
    /// Expert projections (3 per expert).
    pub n_expert_tensors: u64,
    pub expert_bytes: u64,
    pub expert_types: BTreeMap<String, Tally>,
    /// The cold copies of the experts (`sage-convert --cold-quant`): bytes on disk beside the
    /// full records (0 without them) and their types.
    pub cold_bytes: u64,
    pub cold_types: BTreeMap<String, Tally>,
    /// Expert ids present in each layer.
    pub experts_per_layer: Vec<Vec<u32>>,
}

pub fn inspect(path: &Path) -> Result<Inspection> {
    let mut base_types = BTreeMap::new();
    let mut expert_types = BTreeMap::new();
    let mut cold_types = BTreeMap::new();
    if path.is_dir() {
        let m = ModelDir::open(path)?;
        for t in &m.base_tensors {
            Tally::add(&mut base_types, t.ty, t.raw_type, 1, t.size);
        }
        for l in &m.manifest.layers {
            let sizes = l.sizes();
            for p in Proj::ALL {
                let n = l.ids.len() as u64;
                Tally::add(&mut expert_types, Some(l.types[p.index()]), 0, n, n * sizes[p.index()]);
            }
        }
        for l in &m.manifest.cold {
            let sizes = l.sizes();
            for p in Proj::ALL {
                let n = l.ids.len() as u64;
                Tally::add(&mut cold_types, Some(l.types[p.index()]), 0, n, n * sizes[p.index()]);
            }
        }
        return Ok(Inspection {
            path: path.to_path_buf(),
            kind: "model directory".into(),
            architecture: m.config.arch().gguf_arch().into(),
            family: m.config.arch().family().into(),
            n_base_tensors: m.base_tensors.len() as u64,
            base_bytes: m.base_bytes(),
            base_types,
            n_expert_tensors: m.manifest.layers.iter().map(|l| 3 * l.ids.len() as u64).sum(),
            expert_bytes: m.expert_bytes(),
            expert_types,
            cold_bytes: m.cold_bytes(),
            cold_types,
            experts_per_layer: m.manifest.layers.iter().map(|l| l.ids.clone()).collect(),
            conversion_id: Some(m.manifest.conversion_id.clone()),
            source: Some(m.manifest.source.clone()),
            config: m.config,
        });
    }
    let (g, _file, tensors) = Gguf::open_checked(path)?;
    let config = ModelConfig::read_gguf(&g, path)?;
    let mut experts_per_layer = vec![Vec::new(); config.n_layer as usize];
    let (mut n_base, mut base_bytes, mut n_exp, mut exp_bytes) = (0, 0, 0, 0);
    for t in &tensors {
        if t.name.ends_with("_exps.weight") {
            let n = t.ne.get(2).copied().unwrap_or(1);
            Tally::add(&mut expert_types, t.ty, t.raw_type, n, t.size);
            n_exp += n;
            exp_bytes += t.size;
            let il: Option<usize> = t.name.split('.').nth(1).and_then(|s| s.parse().ok());
            if let Some(ids) = il.and_then(|il| experts_per_layer.get_mut(il)) {
                *ids = (0..n as u32).collect();
            }
        } else {
            Tally::add(&mut base_types, t.ty, t.raw_type, 1, t.size);
            n_base += 1;
            base_bytes += t.size;
        }
    }
    Ok(Inspection {
        path: path.to_path_buf(),
        kind: "gguf".into(),
        architecture: config.arch().gguf_arch().into(),
        family: config.arch().family().into(),
        config,
        conversion_id: None,
        source: None,
        n_base_tensors: n_base,
        base_bytes,
        base_types,
        n_expert_tensors: n_exp,
        expert_bytes: exp_bytes,
        expert_types,
        cold_bytes: 0,
        cold_types,
        experts_per_layer,
    })
}

/// `n` in the largest of `units` (each `step` times the one before) that keeps it ≥ 1.
fn scaled(n: u64, step: f64, units: [&str; 5]) -> String {
    let mut x = n as f64;
    let mut u = 0;
    while x >= step && u < units.len() - 1 {
        x /= step;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{x:.2} {}", units[u])
    }
}

/// `1.23 GiB`.
pub fn short_bytes(n: u64) -> String {
    scaled(n, 1024.0, ["B", "KiB", "MiB", "GiB", "TiB"])
}

/// `3.11 GB` (decimal units, as model sizes are usually quoted).
pub fn si_bytes(n: u64) -> String {
    scaled(n, 1000.0, ["B", "kB", "MB", "GB", "TB"])
}

/// `1.23 GiB (1320702443 bytes)`.
pub fn human_bytes(n: u64) -> String {
    if n < 1024 {
        short_bytes(n)
    } else {
        format!("{} ({n} bytes)", short_bytes(n))
    }
}

/// `0-7`, `0-3,6`.
pub fn id_ranges(ids: &[u32]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < ids.len() {
        let mut j = i;
        while j + 1 < ids.len() && ids[j + 1] == ids[j] + 1 {
            j += 1;
        }
        out.push(if i == j { ids[i].to_string() } else { format!("{}-{}", ids[i], ids[j]) });
        i = j + 1;
    }
    out.join(",")
}

impl fmt::Display for Inspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        writeln!(f, "{}: {}", self.kind, self.path.display())?;
        writeln!(f, "  architecture    {} ({}, {})", self.architecture, self.family, c.name)?;
        if let Some(id) = &self.conversion_id {
            writeln!(f, "  conversion      {id} from {}", self.source.as_deref().unwrap_or("?"))?;
        }
        writeln!(f, "  layers          {}", c.n_layer)?;
        writeln!(f, "  n_embd          {}", c.n_embd)?;
        writeln!(f, "  heads           {} query, {} KV, head_dim {}", c.n_head, c.n_head_kv, c.head_dim)?;
        writeln!(f, "  vocab           {}", c.n_vocab)?;
        writeln!(f, "  context         {}", c.n_ctx_train)?;
        writeln!(
            f,
            "  experts         {} per layer, {} used per token, FFN {}, norm_topk_prob {}",
            c.n_expert, c.n_expert_used, c.n_ff_exp, c.norm_topk_prob
        )?;
        if c.n_ff_shexp > 0 {
            writeln!(f, "  shared expert   FFN {} (always resident, in the base)", c.n_ff_shexp)?;
        }
        writeln!(f, "  rope theta      {}", c.rope_theta)?;
        writeln!(f, "  rms eps         {:e}", c.rms_eps)?;
        writeln!(f, "  base            {} tensors, {}", self.n_base_tensors, human_bytes(self.base_bytes))?;
        writeln!(f, "                  {}", types_line(&self.base_types, "tensors"))?;
        writeln!(
            f,
            "  experts         {} expert projections, {}",
            self.n_expert_tensors,
            human_bytes(self.expert_bytes)
        )?;
        writeln!(f, "                  {}", types_line(&self.expert_types, "projections"))?;
        if self.cold_bytes > 0 {
            writeln!(f, "  cold copies     {} (read by sage run --cold-quant)", human_bytes(self.cold_bytes))?;
            writeln!(f, "                  {}", types_line(&self.cold_types, "projections"))?;
        }
        let total = self.base_bytes + self.expert_bytes + self.cold_bytes;
        writeln!(f, "  total           {}", human_bytes(total))?;
        write!(f, "  experts/layer  ")?;
        // Group equal layers: "blk.0-47: 128 (0-127)".
        let mut i = 0;
        while i < self.experts_per_layer.len() {
            let mut j = i;
            while j + 1 < self.experts_per_layer.len() && self.experts_per_layer[j + 1] == self.experts_per_layer[i] {
                j += 1;
            }
            let ids = &self.experts_per_layer[i];
            let layers = if i == j { format!("{i}") } else { format!("{i}-{j}") };
            write!(f, " blk.{layers}: {} ({})", ids.len(), id_ranges(ids))?;
            i = j + 1;
        }
        writeln!(f)
    }
}
