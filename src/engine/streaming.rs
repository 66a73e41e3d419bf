//! The streaming mode (an arena smaller than the experts present): per layer and batch, two
//! graphs. (A) the family's layer graph up to the routed experts and the router logits, read
//! back so the router (`router.rs`) picks experts on the CPU; the scheduler makes them
//! resident in arena slots; (B) the experts' SwiGLU FFN through `mul_mat_id` over slot ids,
//! added to the residual. When a batch needs more distinct experts in a layer than the arena
//! has slots, (B) runs once per group of experts, each group's contribution added up before
//! the residual. The activations between graphs live in the engine's `state`.

use super::io_thread::Prefetcher;
use super::router::{route, route_cached, Choice};
use super::{Engine, GRAPH_NODES, GRAPH_TENSORS};
use crate::error::Result;
use crate::ggml::{Context, GgmlType};
use crate::graph;
use crate::names::*;

/// Where a group of experts stands among a layer's groups (see `Engine::experts`).
#[derive(Clone, Copy, Debug, PartialEq)]
enum GroupStep {
    Only,
    First,
    Middle,
    Last,
}

impl Engine {
    /// Graph A of layer `il`: the family's layer graph up to the routed experts (storing this
    /// batch's K and V), then the router logits, which are returned ([n][n_expert]); the
    /// residual, the experts' input and a shared expert's output are kept in `state`. When
    /// prefetching, also the next layer's router applied to this layer's residual stream (its
    /// prediction).
    pub(super) fn attention(
        &mut self,
        il: u32,
        tokens: &[u32],
        positions: &[i32],
        causal_mask: &[f32],
    ) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
        let cfg = &self.config;
        let n = tokens.len() as i64;
        let ctx = Context::new(GRAPH_TENSORS, GRAPH_NODES);
        let st = self.state.views(&ctx, n);
        let inp = super::Inputs::new(&ctx, n, self.n_past(), self.kv_span(n as usize));
        let x = if il == 0 {
            inp.ids.set_input();
            ctx.get_rows(self.base.token_embd(), inp.ids)
        } else {
            st.hidden
        };
        let w = self.base.layer(il);
        let l = inp.layer(cfg, &self.base, &self.kv, il, x);
        let a = cfg.arch().build_layer(&l);
        let logits = ctx.mul_mat(w.get(FFN_GATE_INP), a.normed); // [n_expert, n]
        logits.set_output();
        let keep_inp = ctx.cpy(a.ffn_inp, st.ffn_inp);
        let keep_normed = ctx.cpy(a.normed, st.normed);
        let keep_shared = a.shared.map(|s| ctx.cpy(s, st.shared.expect("a shared expert has its state")));
        // Decode: the next layer's likely experts are read into buffers (`prefetch_next`); a
        // batch's straight into reserved arena slots where the arena allows
        // (`prefetch_batch`).
        let recording = self.trace.as_ref().is_some_and(|t| t.predicted_logits.is_some());
        let predict =
            ((self.opts.prefetch && self.opts.route_trace.is_none() && (n == 1 || self.arena.writer(0).is_some()))
                || recording)
                && il + 1 < cfg.n_layer;
        let next = predict.then(|| {
            let nw = self.base.layer(il + 1);
            let t = ctx.mul_mat(nw.get(FFN_GATE_INP), l.norm(a.ffn_inp, nw.get(FFN_NORM)));
            t.set_output();
            t
        });
        let mut g = ctx.graph(GRAPH_NODES);
        for t in [a.k_store, a.v_store, logits, keep_inp, keep_normed].into_iter().chain(keep_shared).chain(next) {
            g.expand(t);
        }
        self.runner.run(&g, || inp.write(if il == 0 { Some(tokens) } else { None }, positions, causal_mask))?;
        let next = next.map(|t| t.read_f32((cfg.n_expert as i64 * n) as usize));
        Ok((logits.read_f32((cfg.n_expert as i64 * n) as usize), next))
    }

    /// Graph B of layer `il`: route, make the chosen experts resident, run them, add to the
    /// residual (left in the `hidden` state for the next layer).
    pub(super) fn experts(
        &mut self,
        il: u32,
        n: usize,
        router_logits: &[f32],
        predict_next: Option<&[f32]>,
    ) -> Result<()> {
        let (n_exp, k) = (self.config.n_expert as usize, self.config.n_expert_used as usize);
        self.settle_slot_reads()?;
        self.io.retire_all_but(il);
        let present = &self.present[il as usize];
        let norm = self.config.norm_topk_prob;
        let choices: Vec<Choice> = match &self.opts.route_trace {
            // Benchmarks: the trace's experts, equally weighted (see `EngineOptions::route_trace`).
            Some(trace) => (0..n)
                .map(|t| Choice {
                    experts: trace.token(il as usize, (self.n_past() + t) % trace.n_tokens()).to_vec(),
                    weights: vec![1.0 / k as f32; k],
                })
                .collect(),
            None if self.opts.cache_bias.is_exact() => {
                (0..n).map(|t| route(&router_logits[t * n_exp..(t + 1) * n_exp], present, k, norm)).collect()
            }
            // Cache-aware: every token of the batch prefers what was resident before it.
            None => {
                let resident: Vec<bool> = (0..n_exp as u32).map(|e| self.sched.is_resident(il, e)).collect();
                let cb = &self.opts.cache_bias;
                (0..n)
                    .map(|t| route_cached(&router_logits[t * n_exp..(t + 1) * n_exp], present, &resident, k, norm, cb))
                    .collect()
            }
        };
        // Score the prediction made for this layer (decode: one token).
        if let Some((pl, predicted)) = self.predicted.take() {
            if pl == il && n == 1 {
                let chosen = predicted.iter().filter(|e| choices[0].experts.contains(e)).count();
                self.gate.record(predicted.len(), chosen);
            }
        }
        if let Some(trace) = &mut self.trace {
            trace.choices[il as usize].extend(choices.iter().flat_map(|c| c.experts.iter().copied()));
            if let Some(l) = &mut trace.router_logits {
                l[il as usize].extend_from_slice(&router_logits[..n * n_exp]);
            }
            if let (Some(p), Some(next)) = (&mut trace.predicted_logits, predict_next) {
                p[il as usize + 1].extend_from_slice(&next[..n * n_exp]);
            }
        }
        // Computed for the trace alone when prefetch is off.
        let predict_next = if self.opts.prefetch && self.opts.route_trace.is_none() { predict_next } else { None };
        let mut needed: Vec<u32> = choices.iter().flat_map(|c| c.experts.iter().copied()).collect();
        needed.sort_unstable();
        needed.dedup();

        let n_slots = self.sched.n_slots();
        // Each group of experts is loaded once and runs once for the whole batch.
        let n_groups = needed.len().div_ceil(n_slots);
        for (gi, group) in needed.chunks(n_slots).enumerate() {
            let slots = self.ensure_group(il, group)?;
            // The next layer's predicted experts are read while this layer's experts and the
            // next layer's attention compute; asked for only now, so that they never queue
            // ahead of this layer's own loads.
            match (gi, predict_next) {
                (0, Some(next)) if n == 1 => self.prefetch_next(il + 1, next),
                // Reads into slots only while no other slot of the arena takes part in the
                // graph: one group uses no spare slots.
                (0, Some(next)) if n_groups == 1 => self.prefetch_batch(il + 1, n, next, &slots),
                _ => {}
            }
            let mut ids = Vec::with_capacity(n * k);
            let mut wts = Vec::with_capacity(n * k);
            for c in &choices {
                let mine: Vec<Option<usize>> =
                    c.experts.iter().map(|e| group.iter().position(|g| g == e).map(|i| slots[i])).collect();
                // A choice in another group gets weight 0 on a slot this token does not use
                // otherwise: no expert appears twice in a token's list (ggml's repacked
                // mul_mat_id kernels need distinct ids per token), and every slot holds finite
                // weights, so it adds exactly 0.
                let mut spare = (0..n_slots).filter(|s| !mine.contains(&Some(*s)));
                for (slot, w) in mine.iter().zip(&c.weights) {
                    match slot {
                        Some(s) => {
                            ids.push(*s as i32);
                            wts.push(*w);
                        }
                        None => {
                            ids.push(spare.next().expect("the arena has at least n_expert_used slots") as i32);
                            wts.push(0.0);
                        }
                    }
                }
            }
            let step = match (gi, n_groups) {
                (_, 1) => GroupStep::Only,
                (0, _) => GroupStep::First,
                (g, m) if g + 1 == m => GroupStep::Last,
                _ => GroupStep::Middle,
            };
            self.moe_graph(il, n, step, &ids, &wts)?;
        }
        if self.sched.wants_hints() && self.opts.route_trace.is_none() {
            for (t, c) in choices.iter().enumerate() {
                let logits = &router_logits[t * n_exp..(t + 1) * n_exp];
                let mut up = route(logits, &self.present[il as usize], 2 * k, false).experts;
                up.retain(|e| !c.experts.contains(e));
                up.truncate(k);
                self.sched.hint(il, &up);
            }
        }
        Ok(())
    }

    /// Make `group` (distinct experts of layer `il`, at most one arena's worth) resident and
    /// return their slots. The misses load in the order `ensure` asks for them, while the I/O
    /// thread reads `read_ahead` of them ahead of the one being copied into its slot.
    pub(super) fn ensure_group(&mut self, il: u32, group: &[u32]) -> Result<Vec<usize>> {
        let (md, arena, staging) = (&self.dir, &self.arena, &mut self.staging);
        let drop_cache = !self.opts.page_cache;
        let layer = &md.manifest.layers[il as usize];
        let missing: Vec<u32> = group.iter().copied().filter(|&e| !self.sched.is_resident(il, e)).collect();
        let (io, ahead) = (&mut self.io, self.opts.read_ahead);
        let mut issued = 0;
        let mut read_ahead = |io: &mut Prefetcher, upto: usize| {
            while issued < upto.min(missing.len()) {
                let e = missing[issued];
                let at = layer.record_offset(e).expect("routed experts are present");
                io.request((il, e), at, layer.record_size() as usize, false);
                issued += 1;
            }
        };
        if ahead > 0 {
            read_ahead(io, ahead);
        }
        let mut started = 0;
        self.sched.ensure(il, group, |slot, e| {
            started += 1;
            if ahead > 0 {
                read_ahead(io, started + ahead);
            }
            let pre = io.take((il, e));
            let (bytes, spare) = arena.load_expert(md, staging, drop_cache, il, slot, e, pre)?;
            io.recycle(spare);
            Ok(bytes)
        })
    }

    fn moe_graph(&mut self, il: u32, n: usize, step: GroupStep, ids: &[i32], wts: &[f32]) -> Result<()> {
        let cfg = &self.config;
        let (n_embd, k, n) = (cfg.n_embd as i64, cfg.n_expert_used as i64, n as i64);
        let ctx = Context::new(GRAPH_TENSORS, GRAPH_NODES);
        let st = self.state.views(&ctx, n);
        let x = ctx.reshape_3d(st.normed, n_embd, 1, n);
        let ids_t = ctx.new_tensor(GgmlType::I32, &[k, n]);
        ids_t.set_input();
        let wts_t = ctx.new_tensor(GgmlType::F32, &[1, k, n]);
        wts_t.set_input();
        let exps = Proj::ALL.map(|p| self.arena.view(il, p));
        let moe = graph::moe(&ctx, exps, x, ids_t, wts_t);
        // Groups add up in `acc` first and join the residual last, in the same order of
        // additions as one group would: the result does not depend on the arena's size.
        let store = match step {
            GroupStep::Only => ctx.cpy(graph::layer_out(&ctx, moe, st.shared, st.ffn_inp), st.hidden),
            GroupStep::First => ctx.cpy(moe, st.acc),
            GroupStep::Middle => ctx.cpy(ctx.add(st.acc, moe), st.acc),
            GroupStep::Last => ctx.cpy(graph::layer_out(&ctx, ctx.add(st.acc, moe), st.shared, st.ffn_inp), st.hidden),
        };
        let mut g = ctx.graph(GRAPH_NODES);
        g.expand(store);
        self.runner.run(&g, || {
            ids_t.write_i32(ids);
            wts_t.write_f32(wts);
        })
    }

    /// Output norm and lm head over the last layer's hidden state: every token's logits when
    /// `all`, else the last one's.
    pub(super) fn output_logits(&mut self, n: usize, all: bool) -> Result<Vec<f32>> {
        let cfg = &self.config;
        let n_out = if all { n } else { 1 };
        let ctx = Context::new(GRAPH_TENSORS, GRAPH_NODES);
        let hidden = self.state.views(&ctx, n as i64).hidden;
        let row = hidden.nb()[1];
        let x = ctx.view_2d(hidden, cfg.n_embd as i64, n_out as i64, row, (n - n_out) * row);
        let logits = graph::output(&ctx, cfg.rms_eps, self.base.output_norm(), self.base.output(), x);
        logits.set_output();
        let mut g = ctx.graph(GRAPH_NODES);
        g.expand(logits);
        self.runner.run(&g, || {})?;
        Ok(logits.read_f32(cfg.n_vocab as usize * n_out))
    }
}
