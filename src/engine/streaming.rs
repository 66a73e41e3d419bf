//! The streaming mode (an arena smaller than the experts present): per layer and batch, two
//! graphs. (A) the family's layer graph up to the routed experts and the router logits, read
//! back so the router (`router.rs`) picks experts on the CPU; the scheduler makes them
//! resident in arena slots; (B) the experts' SwiGLU FFN through `mul_mat_id` over slot ids,
//! added to the residual. When a batch needs more distinct experts in a layer than the arena
//! has slots, (B) runs once per group of experts, each group's contribution added up before
//! the residual. The activations between graphs live in the engine's `state`.
//!
//! With cold copies in use (`EngineOptions::cold`), a group's slots hold full or cold
//! records: (B) then runs `mul_mat_id` once over the full records' views with the slots that
//! hold those and once over the cold views with the cold slots, and adds the two; a group of
//! one kind runs one pass, so with every expert cold the layer computes exactly what a model
//! converted at the cold type does.

use super::io_thread::Prefetcher;
use super::router::{route, route_cached, route_scores, Choice, Rule};
use super::{Engine, GRAPH_NODES, GRAPH_TENSORS};
use crate::error::Result;
use crate::ggml::{Context, GgmlType};
use crate::graph;
use crate::names::*;

/// What graph A returns for the router: per token the logits over every expert, the
/// softmax over the experts present (`present`, in id order), and the next layer's
/// predicted logits where asked.
pub(super) struct Routed {
    pub logits: Vec<f32>,
    pub probs: Vec<f32>,
    /// What experts are chosen by: `probs` plus the correction bias, where the model has one
    /// (else empty: `probs`).
    pub select: Vec<f32>,
    /// A dense layer: graph A computed the whole layer, there is nothing to route.
    pub dense: bool,
    pub present: Vec<u32>,
    pub next: Option<Vec<f32>>,
}

/// One `graph::moe` over the arena: through the full records' views or the cold ones, `k`
/// entries per token (`ids`, `wts`: [n][k]).
struct MoePass {
    cold: bool,
    k: usize,
    ids: Vec<i32>,
    wts: Vec<f32>,
}

/// The pass over the slots of `group` (their `slots`, whose kinds `slot_cold` gives) that hold
/// records of kind `cold`, None when none does. Each token's chosen experts of that kind in
/// this group come in its choice order; a token with fewer than the most any token has is
/// padded with weight 0 on other slots of the same kind in the group (never a slot of the
/// other kind: its bytes read through this view could be NaN or infinite scales, and
/// 0 × NaN is NaN), distinct within the token.
fn moe_pass(choices: &[Choice], group: &[u32], slots: &[usize], slot_cold: &[bool], cold: bool) -> Option<MoePass> {
    let mine = |s: usize| slot_cold[s] == cold;
    let kind_slots: Vec<usize> = slots.iter().copied().filter(|&s| mine(s)).collect();
    let per_token: Vec<Vec<(usize, f32)>> = choices
        .iter()
        .map(|c| {
            c.experts
                .iter()
                .zip(&c.weights)
                .filter_map(|(e, &w)| group.iter().position(|g| g == e).map(|i| (slots[i], w)))
                .filter(|&(s, _)| mine(s))
                .collect()
        })
        .collect();
    let k = per_token.iter().map(Vec::len).max().unwrap_or(0);
    if k == 0 {
        return None;
    }
    let (mut ids, mut wts) = (Vec::with_capacity(k * choices.len()), Vec::with_capacity(k * choices.len()));
    for used in &per_token {
        let mut spare = kind_slots.iter().copied().filter(|s| !used.iter().any(|(u, _)| u == s));
        for &(s, w) in used {
            ids.push(s as i32);
            wts.push(w);
        }
        for _ in used.len()..k {
            // The token with the most has k distinct slots of this kind in the group.
            ids.push(spare.next().expect("the group has k slots of this kind") as i32);
            wts.push(0.0);
        }
    }
    Some(MoePass { cold, k, ids, wts })
}

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
    /// batch's K and V, or its recurrent state), then the router logits ([n][n_expert]) and
    /// the softmax over the experts present ([n][present], as `engine::fused` computes it, so
    /// that exact routing takes its weights bit for bit), which are returned; the residual,
    /// the experts' input and a shared expert's output are kept in `state`. When prefetching,
    /// also the next layer's router applied to this layer's residual stream (its prediction).
    pub(super) fn attention(&mut self, il: u32, tokens: &[u32], plan: &super::memory::BatchPlan) -> Result<Routed> {
        let cfg = &self.config;
        let n = tokens.len() as i64;
        let ctx = Context::new(GRAPH_TENSORS, GRAPH_NODES);
        let st = self.state.views(&ctx, n);
        let inp = super::Inputs::new(&ctx, cfg, &self.memory, plan);
        let x = if il == 0 {
            inp.ids.set_input();
            ctx.get_rows(self.base.token_embd(), inp.ids)
        } else {
            st.hidden
        };
        let w = self.base.layer(il);
        let l = inp.layer(cfg, &self.base, &self.memory, il, x);
        let a = cfg.arch().build_layer(&l);
        if cfg.is_dense(il) {
            // The dense FFN (in `shared`) and the residual, into the next layer's input.
            let out =
                ctx.cpy(graph::layer_out(&ctx, a.shared.expect("a dense layer's FFN"), None, a.ffn_inp), st.hidden);
            let mut g = ctx.graph(GRAPH_NODES);
            for t in a.stores.iter().copied().chain([out]) {
                g.expand(t);
            }
            self.runner.run(&g, || inp.write(if il == 0 { Some(tokens) } else { None }))?;
            return Ok(Routed {
                logits: Vec::new(),
                probs: Vec::new(),
                select: Vec::new(),
                dense: true,
                present: Vec::new(),
                next: None,
            });
        }
        let logits = graph::router_logits(&ctx, &w, a.normed); // [n_expert, n]
        logits.set_output();
        // The softmax over the experts present: a pooled layer's logits cut down to them
        // (get_rows picks rows, dimension 1: experts go there and back).
        let present: Vec<u32> =
            self.present[il as usize].iter().enumerate().filter(|(_, &p)| p).map(|(e, _)| e as u32).collect();
        let pool_ids = (present.len() < cfg.n_expert as usize).then(|| {
            let t = ctx.new_tensor(GgmlType::I32, &[present.len() as i64]);
            t.set_input();
            t
        });
        let (cut, bias) = match pool_ids {
            Some(ids) => graph::cut_to_pool(&ctx, logits, w.opt(FFN_EXP_PROBS_B), ids),
            None => (logits, w.opt(FFN_EXP_PROBS_B)),
        };
        let (probs, select) = graph::router_scores(&ctx, cfg, cut, bias);
        probs.set_output();
        let select = bias.is_some().then(|| {
            select.set_output();
            select
        });
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
                && il + 1 < cfg.n_layer
                && !cfg.is_dense(il + 1);
        let next = predict.then(|| {
            let nw = self.base.layer(il + 1);
            let t = graph::router_logits(&ctx, &nw, l.norm(a.ffn_inp, nw.ffn_norm()));
            t.set_output();
            t
        });
        let mut g = ctx.graph(GRAPH_NODES);
        for t in a
            .stores
            .iter()
            .copied()
            .chain([logits, probs, keep_inp, keep_normed])
            .chain(keep_shared)
            .chain(select)
            .chain(next)
        {
            g.expand(t);
        }
        self.runner.run(&g, || {
            inp.write(if il == 0 { Some(tokens) } else { None });
            if let Some(t) = pool_ids {
                t.write_i32(&present.iter().map(|&e| e as i32).collect::<Vec<_>>());
            }
        })?;
        if self.runner.dry.is_some() {
            return Ok(Routed {
                logits: Vec::new(),
                probs: Vec::new(),
                select: Vec::new(),
                dense: false,
                present,
                next: None,
            });
        }
        let next = next.map(|t| t.read_f32((cfg.n_expert as i64 * n) as usize));
        Ok(Routed {
            logits: logits.read_f32((cfg.n_expert as i64 * n) as usize),
            probs: probs.read_f32(present.len() * n as usize),
            select: select.map_or(Vec::new(), |t| t.read_f32(present.len() * n as usize)),
            dense: false,
            present,
            next,
        })
    }

    /// Graph B of layer `il`: route, make the chosen experts resident, run them, add to the
    /// residual (left in the `hidden` state for the next layer).
    pub(super) fn experts(&mut self, il: u32, n: usize, routed: &Routed) -> Result<()> {
        if routed.dense {
            return Ok(());
        }
        let (router_logits, predict_next) = (&routed.logits[..], routed.next.as_deref());
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
                let m = routed.present.len();
                let rule = Rule::of(&self.config);
                let select = if routed.select.is_empty() { &routed.probs } else { &routed.select };
                (0..n)
                    .map(|t| {
                        let r = t * m..(t + 1) * m;
                        route_scores(&routed.probs[r.clone()], &select[r], &routed.present, &rule)
                    })
                    .collect()
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
            let step = match (gi, n_groups) {
                (_, 1) => GroupStep::Only,
                (0, _) => GroupStep::First,
                (g, m) if g + 1 == m => GroupStep::Last,
                _ => GroupStep::Middle,
            };
            if self.cold {
                let passes: Vec<MoePass> = [false, true]
                    .into_iter()
                    .filter_map(|cold| moe_pass(&choices, group, &slots, &self.slot_cold, cold))
                    .collect();
                self.moe_graph(il, n, step, &passes)?;
                continue;
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
            self.moe_graph(il, n, step, &[MoePass { cold: false, k, ids, wts }])?;
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
    /// thread reads `read_ahead` of them ahead of the one being copied into its slot. With cold
    /// copies in use, misses load cold records, and (`ColdUse::Upgrade`) hits on experts whose
    /// slot holds a cold record load their full record into the same slot.
    pub(super) fn ensure_group(&mut self, il: u32, group: &[u32]) -> Result<Vec<usize>> {
        let (md, arena, staging, slot_cold) = (&self.dir, &self.arena, &mut self.staging, &mut self.slot_cold);
        let (drop_cache, cold) = (!self.opts.page_cache, self.cold);
        // What a miss loads: the I/O thread reads those records.
        let layer = super::predict::miss_layer(md, cold, il);
        let missing: Vec<u32> = group.iter().copied().filter(|&e| !self.sched.is_resident(il, e)).collect();
        let sched = &self.sched;
        let cold_slot = |e: u32| sched.slot_of(il, e).is_some_and(|s| slot_cold[s]);
        // Loaded ahead into reserved slots (as cold records): misses whose load is done.
        let reserved_cold = group.iter().filter(|&&e| sched.is_reserved((il, e)) && cold_slot(e)).count() as u64;
        let upgrades: Vec<u32> = if self.opts.cold == super::ColdUse::Upgrade {
            group.iter().copied().filter(|&e| !sched.is_reserved((il, e)) && cold_slot(e)).collect()
        } else {
            Vec::new()
        };
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
        let mut cold_loads = 0;
        let slots = self.sched.ensure(il, group, |slot, e| {
            started += 1;
            if ahead > 0 {
                read_ahead(io, started + ahead);
            }
            let pre = io.take((il, e));
            let (bytes, spare) = arena.load_expert(md, staging, drop_cache, il, slot, e, pre, cold)?;
            slot_cold[slot] = cold;
            cold_loads += cold as u64;
            io.recycle(spare);
            Ok(bytes)
        })?;
        let st = &mut self.sched.stats;
        st.cold_loads += cold_loads + reserved_cold;
        for e in upgrades {
            let i = group.iter().position(|&g| g == e).expect("an upgrade is in the group");
            let t = std::time::Instant::now();
            let (bytes, spare) = arena.load_expert(md, staging, drop_cache, il, slots[i], e, None, false)?;
            io.recycle(spare);
            slot_cold[slots[i]] = false;
            st.upgrades += 1;
            st.bytes_read += bytes;
            st.stall += t.elapsed();
        }
        Ok(slots)
    }

    /// Graph B for one group of experts: `passes` (one, or a pass over full records and one
    /// over cold ones, added), then the group's `step` in the layer.
    fn moe_graph(&mut self, il: u32, n: usize, step: GroupStep, passes: &[MoePass]) -> Result<()> {
        let cfg = &self.config;
        let (n_embd, n) = (cfg.n_embd as i64, n as i64);
        let ctx = Context::new(GRAPH_TENSORS, GRAPH_NODES);
        let st = self.state.views(&ctx, n);
        let x = ctx.reshape_3d(st.normed, n_embd, 1, n);
        let mut inputs = Vec::with_capacity(passes.len());
        let mut moe = None;
        for pass in passes {
            let k = pass.k as i64;
            let ids_t = ctx.new_tensor(GgmlType::I32, &[k, n]);
            ids_t.set_input();
            let wts_t = ctx.new_tensor(GgmlType::F32, &[1, k, n]);
            wts_t.set_input();
            let exps = Proj::ALL.map(|p| match pass.cold {
                false => Some(self.arena.view(il, p)),
                true => self.arena.cold_view(il, p),
            });
            let [Some(g), Some(u), Some(d)] = exps else {
                return Err(crate::error::Error::Usage("a cold pass over an arena without cold views".into()));
            };
            let exps = graph::Experts { mats: [g, u, d], biases: self.arena.bias_views(il, pass.cold) };
            let out = graph::moe(&ctx, cfg.expert_act, exps, x, ids_t, wts_t);
            moe = Some(match moe {
                None => out,
                Some(m) => ctx.add(m, out),
            });
            inputs.push((ids_t, wts_t, pass));
        }
        let moe = moe.expect("a group has at least one pass");
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
            for (ids_t, wts_t, pass) in &inputs {
                ids_t.write_i32(&pass.ids);
                wts_t.write_f32(&pass.wts);
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_pads_only_with_slots_of_its_kind_in_the_group() {
        // Group experts 3, 5, 7, 9 in slots 10, 11, 12, 13; slots 11 and 13 hold cold records.
        let (group, slots) = ([3, 5, 7, 9], [10, 11, 12, 13]);
        let mut slot_cold = vec![false; 16];
        slot_cold[11] = true;
        slot_cold[13] = true;
        // Slot 0 is of neither pass's group: never a pad, whatever its kind.
        let choices = [
            Choice { experts: vec![5, 3, 2], weights: vec![0.5, 0.3, 0.2] }, // 2: another group
            Choice { experts: vec![9, 7, 5], weights: vec![0.6, 0.3, 0.1] },
            Choice { experts: vec![2, 4, 6], weights: vec![0.4, 0.4, 0.2] }, // none here
        ];
        let hot = moe_pass(&choices, &group, &slots, &slot_cold, false).unwrap();
        assert_eq!((hot.cold, hot.k), (false, 1));
        assert_eq!(hot.ids, vec![10, 12, 10]);
        assert_eq!(hot.wts, vec![0.3, 0.3, 0.0]);
        let cold = moe_pass(&choices, &group, &slots, &slot_cold, true).unwrap();
        assert_eq!((cold.cold, cold.k), (true, 2));
        // Token 0: its cold expert 5 (slot 11), padded with the other cold slot, 13; token 1:
        // 9 then 5 in its order; token 2: both pads.
        assert_eq!(cold.ids, vec![11, 13, 13, 11, 11, 13]);
        assert_eq!(cold.wts, vec![0.5, 0.0, 0.6, 0.1, 0.0, 0.0]);
        // A group of one kind has one pass.
        assert!(moe_pass(&choices, &group, &slots, &[false; 16], true).is_none());
        let all = moe_pass(&choices, &group, &slots, &[false; 16], false).unwrap();
        assert_eq!((all.k, &all.ids[..3]), (3, &[11, 10, 12][..]));
    }
}
