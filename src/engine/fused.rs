//! The all-resident mode: when the arena holds every expert present (all of them, or a
//! pool's), all are loaded with the engine, each layer's into consecutive slots, and a batch
//! is one graph, router included, as in llama.cpp: per layer the family's graph up to the
//! routed experts, softmax → argsort top-k → (renormalize) on the backend, `mul_mat_id` on a
//! view of the layer's slots; then the output. The chosen experts are read back afterwards
//! for the hit counts and the routing trace.

use super::{ffi, Engine, GRAPH_NODES};
use crate::error::Result;
use crate::ggml::{Buffer, Context, GgmlType, Tensor, TensorSet};
use crate::graph;
use crate::model_dir::ExpertLayer;
use crate::names::*;

/// Tensors and nodes per layer in the one graph: about 70 of each at n_expert_used 8, more
/// for a family with a shared expert.
const PER_LAYER: usize = 160;

/// The layout the one graph needs: per layer, the slot of the first expert of its pool (the
/// expert of rank r in the pool sits at that slot + r); and the expert ids of each pooled
/// layer (some experts absent), on the backend once, to cut its router logits to the pool.
pub(super) struct Fused {
    first_slot: Vec<usize>,
    pool_ids: TensorSet,
    /// Per layer: its tensor in `pool_ids`; None where every expert is present.
    pool_index: Vec<Option<usize>>,
    _pool_buf: Option<Buffer>,
}

/// The last `n` columns (tokens) of `t` [ne0, rows].
fn last_rows<'a>(ctx: &'a Context, t: Tensor<'a>, n: i64) -> Tensor<'a> {
    let [ne0, rows, ..] = t.ne();
    ctx.view_2d(t, ne0, n, t.nb()[1], (rows - n) as usize * t.nb()[1])
}

impl Engine {
    /// Load every expert, layer by layer, into consecutive slots, and switch to evaluating
    /// whole batches in one graph. The loads are counted in `warm_stats`, not in the run's.
    pub(super) fn load_all_experts(&mut self, progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
        let n_layer = self.config.n_layer;
        let total: u64 = self.dir.expert_bytes();
        let mut done = 0;
        let mut first_slot = Vec::with_capacity(n_layer as usize);
        for il in 0..n_layer {
            let layer = &self.dir.manifest.layers[il as usize];
            let (ids, bytes) = (layer.ids.clone(), layer.record_size() * layer.ids.len() as u64);
            let slots = self.ensure_group(il, &ids)?;
            // An empty arena fills from slot 0 up, so each layer's experts are consecutive.
            let first = slots.first().copied().unwrap_or(0);
            if slots.iter().enumerate().any(|(i, &s)| s != first + i) {
                log::warn!("blk.{il}: experts not in consecutive slots; evaluating layer by layer");
                return Ok(());
            }
            first_slot.push(first);
            done += bytes;
            progress(done, total);
        }
        let pooled = |l: &&ExpertLayer| l.is_pool(&self.config);
        let mut pool_ids = TensorSet::new(self.dir.manifest.layers.len());
        let pool_index: Vec<Option<usize>> = self
            .dir
            .manifest
            .layers
            .iter()
            .map(|l| pooled(&l).then(|| pool_ids.add(GgmlType::I32, &[l.ids.len() as i64], &format!("pool.{}", l.il))))
            .collect();
        let pool_buf = if pool_ids.is_empty() {
            None
        } else {
            let buf = self
                .runner
                .backend
                .alloc_ctx_tensors(pool_ids.context())
                .map_err(|e| ffi(&self.dir.path, "pool ids", e))?;
            for (l, i) in self.dir.manifest.layers.iter().zip(&pool_index) {
                if let Some(i) = *i {
                    pool_ids.get(i).write_i32(&l.ids.iter().map(|&e| e as i32).collect::<Vec<_>>());
                }
            }
            Some(buf)
        };
        self.warm_stats = std::mem::take(&mut self.sched.stats);
        self.fused = Some(Fused { first_slot, pool_ids, pool_index, _pool_buf: pool_buf });
        log::info!(
            "all {} experts resident ({} bytes loaded): one graph per batch",
            self.warm_stats.misses,
            self.warm_stats.bytes_read
        );
        Ok(())
    }

    /// The whole batch as one graph (see the module documentation).
    pub(super) fn eval_fused(
        &mut self,
        tokens: &[u32],
        plan: &super::memory::BatchPlan,
        all: bool,
    ) -> Result<Vec<f32>> {
        let cfg = &self.config;
        let fused = self.fused.as_ref().expect("fused mode");
        let n = tokens.len() as i64;
        let (n_embd, k) = (cfg.n_embd as i64, cfg.n_expert_used as i64);
        let n_layer = cfg.n_layer as usize;
        let size = PER_LAYER * n_layer + GRAPH_NODES;
        let ctx = Context::new(size, size);
        let inp = super::Inputs::new(&ctx, cfg, &self.memory, plan);
        inp.ids.set_input();
        let mut g = ctx.graph(size);
        let mut x = ctx.get_rows(self.base.token_embd(), inp.ids);
        let mut chosen = Vec::with_capacity(n_layer);
        // Only the last token's logits wanted (and no routing trace): the last layer's FFN
        // runs for that token alone, as in llama.cpp.
        let n_out = if all { n } else { 1 };
        let stride = self.arena.stride();
        for (il, &first) in fused.first_slot.iter().enumerate() {
            let w = self.base.layer(il as u32);
            let l = inp.layer(cfg, &self.base, &self.memory, il as u32, x);
            let a = cfg.arch().build_layer(&l);
            for &t in &a.stores {
                g.expand(t);
            }
            let (mut ffn_inp, mut normed, mut shared, mut rows) = (a.ffn_inp, a.normed, a.shared, n);
            if il + 1 == n_layer && n_out < n && self.trace.is_none() {
                let last = |t| last_rows(&ctx, t, n_out);
                (ffn_inp, normed, shared, rows) = (last(ffn_inp), last(normed), shared.map(last), n_out);
            }
            // A dense layer: its FFN (in `shared`) and the residual.
            if cfg.is_dense(il as u32) {
                x = graph::layer_out(&ctx, shared.expect("a dense layer's FFN"), None, ffn_inp);
                continue;
            }
            // Router: scores [n_expert (or the pool's size), rows], sorted. The full argsort
            // is the output read back: a view of it (the top k) would not keep its memory
            // from being reused later in the graph.
            let mut logits = graph::router_logits(&ctx, &w, normed); // [n_expert, rows]
            let mut bias = w.opt(FFN_EXP_PROBS_B);
            let present = &self.dir.manifest.layers[il].ids;
            let n_here = present.len() as i64;
            // A pooled layer routes over its present experts only: its router logits (and
            // correction bias) are cut down to them, in the order of their slots, so the
            // chosen indices are slot offsets (ranks in the pool), mapped back to ids after
            // the graph (`graph::cut_to_pool`). (A grouped router over a pool runs layer by
            // layer.)
            if let Some(i) = fused.pool_index[il] {
                (logits, bias) = graph::cut_to_pool(&ctx, logits, bias, fused.pool_ids.get(i));
            }
            let (probs, mut select) = graph::router_scores(&ctx, cfg, logits, bias);
            if cfg.gating.grouped() {
                select = graph::mask_groups(&ctx, cfg, select);
            }
            let order = ctx.argsort_desc(select);
            order.set_output();
            let sel = ctx.view_2d(order, k, rows, order.nb()[1], 0); // [k, rows]
            let wts = graph::router_weights(&ctx, cfg, probs, sel);
            let mats = Proj::ALL.map(|p| {
                let t = self.arena.view(il as u32, p);
                let [ne0, ne1, ..] = t.ne();
                ctx.view_3d(t, [ne0, ne1, n_here], t.nb()[1], stride, first * stride)
            });
            let biases = self
                .arena
                .bias_views(il as u32, false)
                .map(|b| b.map(|t| ctx.view_2d(t, t.ne()[0], n_here, stride, first * stride)));
            let exps = graph::Experts { mats, biases };
            let moe = graph::moe(&ctx, cfg.expert_act, exps, ctx.reshape_3d(normed, n_embd, 1, rows), sel, wts);
            x = graph::layer_out(&ctx, moe, shared, ffn_inp);
            chosen.push((il, order, rows, present));
        }
        let last = last_rows(&ctx, x, n_out);
        let logits = graph::output(&ctx, cfg.rms_eps, self.base.output_norm(), self.base.output(), last);
        logits.set_output();
        g.expand(logits);
        self.runner.run(&g, || inp.write(Some(tokens)))?;
        if self.runner.dry.is_some() {
            return Ok(Vec::new());
        }
        for &(il, order, rows, present) in &chosen {
            let n_here = present.len();
            let order = order.read_i32(n_here * rows as usize);
            // Ranks in the layer's pool (its experts in slot order) to expert ids.
            let mut used: Vec<u32> =
                order.chunks(n_here).flat_map(|row| row[..k as usize].iter().map(|&r| present[r as usize])).collect();
            if let Some(trace) = &mut self.trace {
                trace.choices[il].extend(used.iter().copied());
            }
            used.sort_unstable();
            used.dedup();
            self.sched.record_hits(il as u32, &used);
        }
        Ok(logits.read_f32(cfg.n_vocab as usize * n_out as usize))
    }
}
