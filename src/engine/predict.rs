//! Prediction and its policy: while a layer computes, the engine predicts the experts the
//! next layer will choose by applying that layer's router (and FFN norm) to the current
//! layer's residual stream, which changes little from one layer to the next, and asks the I/O
//! thread (`io_thread`) to read those not resident: for a decode step into buffers the loads
//! take them from, for a batch straight into arena slots reserved for them.
//!
//! A wrong guess costs a whole read on what is then the bottleneck, the disk, so predictions
//! are read only while they have been right lately ([`PrefetchGate`]): the engine keeps
//! predicting (a tiny matrix product) and scores each prediction against the layer's routing
//! whether or not it was read.

use std::time::Instant;

use super::router::route;
use super::Engine;
use crate::error::Result;
use crate::model_dir::{ExpertLayer, ModelDir};

/// Whether predictions have been right lately: the share of predicted experts that would be
/// read (not resident when predicted) that their layer then chose, as a moving average over
/// about the last `1 / WEIGHT` of them. Reads are worth it above `MIN_PRECISION`: with a
/// layer's loads taking about three times its compute (Qwen3-30B-A3B at q4_K with a quarter
/// of its experts resident, 2 cores), prefetching hides at most a third of a layer's reads
/// behind compute, while each wrong guess adds a read; it breaks even near 2 in 3 right.
/// Random-weight models route predictably (98% of predicted reads used); the bundled trained
/// model's routing less so (about 63%).
#[derive(Clone, Debug)]
pub struct PrefetchGate {
    precision: f64,
}

impl Default for PrefetchGate {
    fn default() -> Self {
        PrefetchGate { precision: 1.0 }
    }
}

impl PrefetchGate {
    pub const MIN_PRECISION: f64 = 0.75;
    const WEIGHT: f64 = 1.0 / 64.0;

    /// `predicted` experts were guessed (and not resident), of which `chosen` were then chosen.
    pub fn record(&mut self, predicted: usize, chosen: usize) {
        for i in 0..predicted {
            let right = if i < chosen { 1.0 } else { 0.0 };
            self.precision += Self::WEIGHT * (right - self.precision);
        }
    }

    pub fn precision(&self) -> f64 {
        self.precision
    }

    pub fn open(&self) -> bool {
        self.precision >= Self::MIN_PRECISION
    }
}

/// Where layer `il`'s misses read from: its cold copies when they are in use (`cold`), else
/// its full records (what the I/O thread reads ahead and prefetches).
pub(super) fn miss_layer(md: &ModelDir, cold: bool, il: u32) -> &ExpertLayer {
    if cold {
        &md.manifest.cold[il as usize]
    } else {
        &md.manifest.layers[il as usize]
    }
}

impl Engine {
    /// Start reading the experts layer `il` is predicted to choose for a decode step (from
    /// `logits`, its router applied to the previous layer's residual stream) that are not
    /// resident, into buffers the loads take them from, if recent predictions were right often
    /// enough (`PrefetchGate`). (Reading them straight into reserved slots, as batches do,
    /// decoded no faster: 0.99× median of 5 alternating pairs; and a wrong guess would evict an
    /// expert.)
    pub(super) fn prefetch_next(&mut self, il: u32, logits: &[f32]) {
        let p = &mut self.io;
        let c = &self.config;
        let choice = route(logits, &self.present[il as usize], c.n_expert_used as usize, c.norm_topk_prob);
        let layer = miss_layer(&self.dir, self.cold, il);
        // In ascending ids, the order in which the layer will load its misses (one I/O
        // thread serves requests in order: a load must not wait behind reads it needs later).
        let mut experts = choice.experts;
        experts.sort_unstable();
        experts.retain(|&e| !self.sched.is_resident(il, e));
        if self.gate.open() {
            for &e in &experts {
                let at = layer.record_offset(e).expect("routed experts are present");
                p.request((il, e), at, layer.record_size() as usize, true);
            }
        } else {
            p.stats.skipped += experts.len() as u64;
        }
        self.predicted = Some((il, experts));
    }

    /// A batch: reserve arena slots for the experts layer `il` is predicted to choose for any
    /// of its tokens (`logits`: [n][n_expert], its router applied to the previous layer's
    /// residual stream) that are not resident, and have the I/O thread read each straight into
    /// its slot while the previous layer computes on the slots in `busy`. As many as there
    /// are slots besides `busy` and the predicted experts already resident; nothing reads
    /// those slots before `settle_slot_reads`.
    pub(super) fn prefetch_batch(&mut self, il: u32, n: usize, logits: &[f32], busy: &[usize]) {
        if self.arena.writer(0).is_none() {
            return;
        }
        let c = &self.config;
        let (n_exp, k) = (c.n_expert as usize, c.n_expert_used as usize);
        let mut wanted = vec![false; n_exp];
        for row in logits.chunks(n_exp).take(n) {
            for e in route(row, &self.present[il as usize], k, c.norm_topk_prob).experts {
                wanted[e as usize] = true;
            }
        }
        let mut keep = busy.to_vec();
        let mut missing = Vec::new();
        for e in (0..n_exp as u32).filter(|&e| wanted[e as usize]) {
            match self.sched.slot_of(il, e) {
                Some(s) => keep.push(s),
                None => missing.push(e),
            }
        }
        let layer = miss_layer(&self.dir, self.cold, il);
        let record = layer.record_size();
        for e in missing {
            let Some(slot) = self.sched.reserve((il, e), record, &keep) else { return };
            self.slot_cold[slot] = self.cold;
            keep.push(slot);
            let at = layer.record_offset(e).expect("routed experts are present");
            let (writer, slot_at) = self.arena.writer(slot).expect("checked above");
            self.io.request_into((il, e), at, record as usize, writer, slot_at, self.arena.stride());
        }
    }

    /// Wait for the reads into reserved arena slots to finish: before any slot is used or
    /// evicted again. A failed read leaves its expert out of the arena, and fails the call.
    pub(super) fn settle_slot_reads(&mut self) -> Result<()> {
        let mut first = None;
        let t = Instant::now();
        let failed = self.io.finish_slot_reads();
        // Waiting for reads is stalling on loads, wherever it happens.
        self.sched.stats.stall += t.elapsed();
        for (key, e) in failed {
            self.sched.forget(key);
            first.get_or_insert(e);
        }
        first.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::PrefetchGate;

    #[test]
    fn gate_closes_on_wrong_guesses_and_reopens_on_right_ones() {
        let mut g = PrefetchGate::default();
        assert!(g.open());
        // Mostly right (7 of 8 per layer): stays open.
        for _ in 0..100 {
            g.record(8, 7);
        }
        assert!(g.open(), "{}", g.precision());
        // Half right: closes within a few dozen layers.
        let mut steps = 0;
        while g.open() {
            g.record(8, 4);
            steps += 1;
            assert!(steps < 50, "still open at {}", g.precision());
        }
        assert!(g.precision() < PrefetchGate::MIN_PRECISION);
        // Right again: reopens.
        for _ in 0..50 {
            g.record(8, 8);
        }
        assert!(g.open(), "{}", g.precision());
        // Nothing predicted (all resident) leaves it as it was.
        let before = g.precision();
        g.record(0, 0);
        assert_eq!(g.precision(), before);
    }
}
