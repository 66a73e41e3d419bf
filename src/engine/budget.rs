//! A total memory budget (`--memory`, `ArenaSize::Memory`) split into its parts: the arena
//! gets what remains after the base, every layer's state at the context length, the compute
//! buffer of the largest batch at that context (measured on its graph by the engine), the
//! activations carried between graphs, staging buffers and the process's own memory.
//! Also what the machine has when no size is given (`available`).

use std::fmt;

use crate::config::ModelConfig;

/// What the process holds beyond the parts below, on top of its resident memory when the
/// engine starts loading: ggml's graph metadata (a context per graph), the buffer that carries
/// base tensors from disk while loading (`EngineOptions::load_slice`), allocator slack, and
/// the few slots' worth of the probe load (`Engine::load`).
pub const OVERHEAD_MARGIN: u64 = 64 << 20;

/// The process's own memory as a budget counts it, at least: sage's resident memory before
/// it loads a model (the program, its libraries, the tokenizer) is under this (measured: 11 MB
/// for `sage run` of the 30B shape, 13 MB of the bundled model). A process that holds more
/// when loading starts is counted at what it holds; one that holds less at this, so that the
/// same model, options and total give the same arena in `sage run`, `chat`, `serve` and
/// `sage plan`.
pub const PROCESS_BYTES: u64 = 32 << 20;

/// The budget's `overhead` for a process holding `resident` bytes when loading starts: the
/// larger of that and `PROCESS_BYTES`, plus `OVERHEAD_MARGIN`.
pub fn process_bytes(resident: u64) -> u64 {
    resident.max(PROCESS_BYTES) + OVERHEAD_MARGIN
}

/// The budget before anything is loaded, from the model's shapes: the base's and the state's
/// bytes as they are, the compute buffer as the largest of the bounds below (the engine then
/// measures it), activations of one batch, staging of `2 + n_expert_used + read_ahead`
/// records of `stride` bytes. What the engine checks before it loads, and what `sage plan`
/// counts for a config.json.
#[allow(clippy::too_many_arguments)]
pub fn estimate(
    cfg: &ModelConfig,
    total: u64,
    base: u64,
    state: u64,
    n_batch: u64,
    n_ctx: u64,
    flash_attn: bool,
    stride: u64,
    read_ahead: u64,
    resident: u64,
) -> Budget {
    let n = n_batch.min(n_ctx).max(1);
    Budget {
        total,
        base,
        state,
        compute: experts_graph_bytes(cfg, n)
            .max(output_graph_bytes(cfg, n))
            .max(attention_graph_bytes(cfg, n, n_ctx, flash_attn)),
        activations: activation_bytes(cfg, n),
        staging: staging_bytes(cfg, stride, read_ahead),
        overhead: process_bytes(resident),
    }
}

/// The activations the streaming path carries between its graphs over batches of `n_batch`:
/// the residual stream, its copy after attention, the normed input, the experts' sum and a
/// shared expert's output where the family has one, [n_embd, n_batch] f32 each.
pub fn activation_bytes(cfg: &ModelConfig, n_batch: u64) -> u64 {
    let n = if cfg.n_ff_shexp > 0 { 5 } else { 4 };
    n * 4 * cfg.n_embd * n_batch
}

/// `estimate` for a model of `cfg` run with `opts`, split into slots of `stride` bytes: the
/// state as `engine::memory` lays it out for `opts` (flash attention `auto` counted as on),
/// the process at `resident` (`process_bytes`). The check before loading (`Engine::fit_memory`)
/// and `sage plan`'s figures for a config.json.
pub fn estimate_fit(
    cfg: &ModelConfig,
    opts: &crate::engine::EngineOptions,
    total: u64,
    base: u64,
    stride: u64,
    n_experts: u64,
    resident: u64,
) -> MemoryFit {
    let mopts = crate::engine::memory_options(opts, opts.flash_attn != crate::engine::FlashAttn::Off);
    let b = estimate(
        cfg,
        total,
        base,
        crate::engine::memory::plan(cfg, &mopts).total(),
        opts.n_batch as u64,
        opts.n_ctx as u64,
        mopts.flash_attn,
        stride,
        opts.read_ahead as u64,
        resident,
    );
    MemoryFit::new(b, stride, 0, n_experts, cfg.n_expert_used as u64, opts.n_ctx, false)
}

/// Expert records on their way from disk: the staging record, one token's prefetch buffers
/// and the read-ahead, `2 + n_expert_used + read_ahead` slots of `stride` bytes.
pub fn staging_bytes(cfg: &ModelConfig, stride: u64, read_ahead: u64) -> u64 {
    stride * (2 + cfg.n_expert_used as u64 + read_ahead)
}

/// Left to the rest of the machine when sage sizes itself (`available`): 5% of what it has,
/// at least this.
pub const AUTO_MARGIN_MIN: u64 = 256 << 20;

/// The parts of a budget, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Budget {
    pub total: u64,
    pub base: u64,
    /// Every layer's state at the context length (`memory::plan`).
    pub state: u64,
    /// The largest compute buffer a batch can need at the context length.
    pub compute: u64,
    /// The activations the streaming path carries between its graphs.
    pub activations: u64,
    /// Expert records on their way from disk (the staging record, the I/O thread's buffers).
    pub staging: u64,
    /// The process itself (`process_bytes`: its resident memory when loading started, at
    /// least `PROCESS_BYTES`, plus `OVERHEAD_MARGIN`).
    pub overhead: u64,
}

impl Budget {
    /// Everything but the arena.
    pub fn fixed(&self) -> u64 {
        self.base + self.state + self.compute + self.activations + self.staging + self.overhead
    }

    /// Bytes left for the arena (0 when the parts take it all).
    pub fn arena(&self) -> u64 {
        self.total.saturating_sub(self.fixed())
    }
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = |b: u64| format!("{:.1} MiB", b as f64 / (1 << 20) as f64);
        write!(
            f,
            "base {} + layer state {} + compute {} + activations {} + staging {} + process {}",
            m(self.base),
            m(self.state),
            m(self.compute),
            m(self.activations),
            m(self.staging),
            m(self.overhead)
        )
    }
}

/// A total split for one model and its options (`Engine::fit_memory`): the budget, the arena
/// geometry on the backend, and how many slots the rest holds.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct MemoryFit {
    pub budget: Budget,
    /// Bytes of one arena slot.
    pub stride: u64,
    /// The arena's padding after its last slot.
    pub tail: u64,
    /// Slots the arena gets (all experts at most).
    pub slots: u64,
    pub n_experts: u64,
    pub n_expert_used: u64,
    pub n_ctx: usize,
    /// The compute buffer measured on the model's graphs (false: the estimate before loading,
    /// which already left too little).
    pub measured: bool,
}

impl MemoryFit {
    /// `budget` split into slots of `stride` bytes (the arena's padding `tail` after them), at
    /// most `n_experts`.
    pub fn new(
        budget: Budget,
        stride: u64,
        tail: u64,
        n_experts: u64,
        n_expert_used: u64,
        n_ctx: usize,
        measured: bool,
    ) -> MemoryFit {
        let slots = crate::engine::arena::slots_in(budget.arena(), stride, tail).min(n_experts);
        MemoryFit { budget, stride, tail, slots, n_experts, n_expert_used, n_ctx, measured }
    }

    /// The arena holds one token's experts.
    pub fn runs(&self) -> bool {
        self.slots >= self.n_expert_used
    }

    /// The smallest total that runs: every part but the arena, and one token's experts.
    pub fn need(&self) -> u64 {
        self.budget.fixed() + crate::engine::arena::arena_bytes(self.n_expert_used, self.stride, self.tail)
    }

    /// The error of a total that does not run: every part and the smallest total.
    pub fn too_small(&self) -> crate::error::Error {
        let (total, need, k) = (self.budget.total, self.need(), self.n_expert_used);
        crate::error::Error::Usage(format!(
            "--memory {total} bytes ({:.2} GiB) does not hold this model at --ctx {}: {} + the arena's {k} slots of {} bytes (one token's experts) need {need} bytes ({:.2} GiB); give --memory {need} or more, or a shorter --ctx, a smaller --batch, --flash-attn on or a quantized KV cache",
            total as f64 / (1u64 << 30) as f64,
            self.n_ctx,
            self.budget,
            self.stride,
            need as f64 / (1u64 << 30) as f64
        ))
    }
}

/// The process's resident memory now (`/proc/self/statm`), 0 where unknown.
pub fn resident_bytes() -> u64 {
    let page = rustix::param::page_size() as u64;
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        .map_or(0, |p| p * page)
}

/// An upper bound on the compute buffer of one expert group's graph (the streaming path's
/// graph B) over `n` tokens: the experts' gate, up and activation [n_ff, k, n], their output
/// and its weighted copy [n_embd, k, n], the sums [n_embd, n], ids and weights; f32.
pub fn experts_graph_bytes(cfg: &ModelConfig, n: u64) -> u64 {
    let k = cfg.n_expert_used as u64;
    let f = 4 * n;
    f * (3 * cfg.n_ff_exp * k + 2 * cfg.n_embd * k + 4 * cfg.n_embd + 2 * k) + (1 << 20)
}

/// A lower bound on what one layer's attention graph needs over `n` queries and `n_kv` cells,
/// for the check before loading (which refuses only what surely cannot fit): without flash
/// attention the scores [n_kv, n, n_head] f32 and the f16 copy of their softmax the CPU kernel
/// makes for KQ·V; with it the per-head output; and the mask. The engine then measures the
/// graph, and the budget uses that.
pub fn attention_graph_bytes(cfg: &ModelConfig, n: u64, n_kv: u64, flash_attn: bool) -> u64 {
    let (nh, hd) = (cfg.n_head as u64, cfg.head_dim);
    let scores = if flash_attn { 4 * n * nh * hd * 2 } else { n_kv * n * nh * (4 + 2) };
    scores + 4 * n_kv * n + 4 * n * (cfg.n_embd + 3 * nh * hd)
}

/// An upper bound on the output graph's compute buffer over `n` tokens: the normed input and
/// the logits, f32.
pub fn output_graph_bytes(cfg: &ModelConfig, n: u64) -> u64 {
    4 * n * (cfg.n_vocab + 2 * cfg.n_embd) + (1 << 20)
}

/// What this process may use when no size is given: the memory cgroup's limit where it has
/// one (v2 `memory.max`, v1 `memory.limit_in_bytes`), else the machine's MemAvailable plus
/// what the process already holds; minus 5% (at least `AUTO_MARGIN_MIN`). Returns the size
/// and where it came from.
pub fn available() -> Option<(u64, String)> {
    let (have, from) =
        cgroup_limit().or_else(|| mem_available().map(|a| (a + resident_bytes(), "MemAvailable".into())))?;
    let margin = (have / 20).max(AUTO_MARGIN_MIN);
    Some((have.saturating_sub(margin), from))
}

fn mem_available() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let l = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    Some(l.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// The limit of this process's memory cgroup, if it has one below the machine's memory.
fn cgroup_limit() -> Option<(u64, String)> {
    let cg = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().next().and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()))
        .map_or(u64::MAX, |k| k * 1024);
    for line in cg.lines() {
        // v2: "0::/path"; v1: "N:memory:/path" (or a list of controllers with memory).
        let mut parts = line.splitn(3, ':');
        let (_, ctrl, path) = (parts.next()?, parts.next()?, parts.next()?);
        let file = if ctrl.is_empty() {
            format!("/sys/fs/cgroup{path}/memory.max")
        } else if ctrl.split(',').any(|c| c == "memory") {
            format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes")
        } else {
            continue;
        };
        if let Some(v) = std::fs::read_to_string(&file).ok().and_then(|s| s.trim().parse::<u64>().ok()) {
            if v < total {
                return Some((v, format!("the memory cgroup's limit ({file})")));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_arena_gets_what_the_parts_leave() {
        let b = Budget { total: 1000, base: 100, state: 50, compute: 40, activations: 10, staging: 5, overhead: 95 };
        assert_eq!(b.fixed(), 300);
        assert_eq!(b.arena(), 700);
        assert_eq!(Budget { total: 200, ..b }.arena(), 0);
    }

    #[test]
    fn resident_memory_is_read() {
        assert!(resident_bytes() > 1 << 20);
    }
}
