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
        println!(" {:.1}% |", 100.0 * t.optimal_hit_rate(slots));
    }
    Ok(())
}
