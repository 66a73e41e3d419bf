//! Online eviction policies tried on a model's real routing (decode order), against LRU and
//! Belady's optimal: LFRU at several half-lives, LRU-2 (evict by the second most recent use),
//! and LRU that also counts the router's m runners-up of each token as a use (m = 2 … 16).
//! docs/quality.md quotes the results; the winner is sage's `lru-ranked` or another policy
//! of `scheduler::POLICIES`.
//!
//! cargo run --release --example policy_explore -- MODEL_DIR TEXT [WINDOW]

use sage::engine::scheduler::{Lfru, Lru, LruRanked, Policy};
use sage::engine::{Engine, EngineOptions};

/// LRU-2 (O'Neil et al. 1993): the victim is the expert whose second most recent use is
/// oldest (one used only once counts as used at time 0), ties by the most recent use.
struct Lru2 {
    last: Vec<u64>,
    prev: Vec<u64>,
    clock: u64,
}

impl Policy for Lru2 {
    fn touch(&mut self, slot: usize) {
        self.clock += 1;
        self.prev[slot] = self.last[slot];
        self.last[slot] = self.clock;
    }
    fn loaded(&mut self, slot: usize, _key: (u32, u32)) {
        self.clock += 1;
        self.prev[slot] = 0;
        self.last[slot] = self.clock;
    }
    fn victim(&mut self, candidates: &[usize]) -> usize {
        *candidates.iter().min_by_key(|&&s| (self.prev[s], self.last[s])).unwrap()
    }
}

/// LFRU that remembers the score of every expert it has seen, resident or not: a reloaded
/// expert starts from its decayed score + 1 instead of 1 (frequency beyond residency, as ARC's
/// ghost lists); a router runner-up adds `hint` to its score.
struct LfruMem {
    slot_key: Vec<(u32, u32)>,
    score: std::collections::HashMap<(u32, u32), (f64, u64)>,
    clock: u64,
    lambda: f64,
    hint: f64,
    /// Experts used within the last `protect` uses are evicted only when nothing else can be
    /// (then by LRU).
    protect: u64,
    last: Vec<u64>,
}

impl LfruMem {
    fn new(n_slots: usize, half_life: f64, hint: f64, protect: u64) -> LfruMem {
        LfruMem {
            protect,
            last: vec![0; n_slots],
            slot_key: vec![(u32::MAX, 0); n_slots],
            score: Default::default(),
            clock: 0,
            lambda: 1.0 / (half_life * n_slots as f64),
            hint,
        }
    }
    fn decayed(&self, key: (u32, u32)) -> f64 {
        self.score.get(&key).map_or(0.0, |&(s, t)| s * (-(self.lambda * (self.clock - t) as f64)).exp2())
    }
    fn add(&mut self, key: (u32, u32), x: f64) {
        let s = self.decayed(key) + x;
        self.score.insert(key, (s, self.clock));
    }
}

impl Policy for LfruMem {
    fn touch(&mut self, slot: usize) {
        self.clock += 1;
        self.last[slot] = self.clock;
        self.add(self.slot_key[slot], 1.0);
    }
    fn loaded(&mut self, slot: usize, key: (u32, u32)) {
        self.clock += 1;
        self.last[slot] = self.clock;
        self.slot_key[slot] = key;
        self.add(key, 1.0);
    }
    fn victim(&mut self, candidates: &[usize]) -> usize {
        let old: Vec<usize> =
            candidates.iter().copied().filter(|&s| self.clock - self.last[s] >= self.protect).collect();
        if old.is_empty() {
            return *candidates.iter().min_by_key(|&&s| self.last[s]).unwrap();
        }
        *old.iter()
            .min_by(|&&a, &&b| self.decayed(self.slot_key[a]).total_cmp(&self.decayed(self.slot_key[b])))
            .unwrap()
    }
    fn hint(&mut self, slot: usize) {
        if self.hint > 0.0 {
            self.add(self.slot_key[slot], self.hint);
        }
    }
    fn wants_hints(&self) -> bool {
        self.hint > 0.0
    }
}

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    anyhow::ensure!(a.len() >= 3, "usage: policy_explore MODEL_DIR TEXT [WINDOW]");
    let window: usize = a.get(3).map(|s| s.parse()).transpose()?.unwrap_or(512);
    sage::ggml::route_logs();
    let tok = sage::tokenizer::Tokenizer::load(a[1].as_ref())?;
    let ids = tok.encode(&std::fs::read_to_string(&a[2])?)?;
    let opts = EngineOptions { n_ctx: window, fused: false, ..Default::default() };
    let mut e = Engine::load(a[1].as_ref(), opts)?;
    let t = sage::eval::profile(&mut e, &ids, window, true, |_, _| {})?;
    println!("{} tokens x {} layers, top-{} of {}", t.n_tokens(), t.n_layer, t.n_expert_used, t.n_expert);
    let total = t.n_layer * t.n_expert;
    let half_lives = [0.25, 0.5, 1.0, 2.0];
    let ms = [2, 4, 8, 16];
    print!("| arena | LRU |");
    half_lives.iter().for_each(|h| print!(" LFRU h={h} |"));
    print!(" LRU-2 |");
    ms.iter().for_each(|m| print!(" LRU + {m} runners-up |"));
    let w = (t.n_layer * t.n_expert_used) as u64;
    let mems = [
        (4.0, 0.0, 0),
        (8.0, 0.0, 0),
        (16.0, 0.0, 0),
        (4.0, 0.0, w),
        (8.0, 0.0, w),
        (16.0, 0.0, w),
        (8.0, 0.0, w / 2),
        (8.0, 0.5, w),
    ];
    mems.iter().for_each(|(h, x, p)| print!(" LFRU-mem h={h} hint={x} protect={p} |"));
    println!(" Belady |");
    for pct in [10, 25, 50] {
        let slots = ((total * pct) as f64 / 100.0).round().max(t.n_expert_used as f64) as usize;
        print!("| {pct}% ({slots}) | {:.1}% |", 100.0 * t.replay(slots, Box::new(Lru::new(slots))));
        for h in half_lives {
            print!(" {:.1}% |", 100.0 * t.replay(slots, Box::new(Lfru::new(slots, h))));
        }
        let lru2 = Lru2 { last: vec![0; slots], prev: vec![0; slots], clock: 0 };
        print!(" {:.1}% |", 100.0 * t.replay(slots, Box::new(lru2)));
        for m in ms {
            print!(" {:.1}% |", 100.0 * t.replay_hinted(slots, Box::new(LruRanked(Lru::new(slots))), m));
        }
        for (h, x, p) in mems {
            print!(
                " {:.1}% |",
                100.0 * t.replay_hinted(slots, Box::new(LfruMem::new(slots, h, x, p)), t.n_expert_used)
            );
        }
        println!(" {:.1}% |", 100.0 * t.optimal_hit_rate(slots));
    }
    Ok(())
}
