//! Hit rates of the arena's eviction policies on real routing: profile a model on a text
//! (decode order), then replay the routing through LRU, LFRU at several half-lives, LRU told
//! the current token's routing (what a router lookahead can predict), LRU told the next
//! token's routing too (what a perfect next-token predictor could add) and Belady's optimal,
//! at arenas of 25/50/75% of the experts.
//!
//! cargo run --release --example policy_sweep -- MODEL_DIR TEXT [WINDOW] [TRACE_OUT]
//!
//! TRACE_OUT: also write the routing, one line per layer of the chosen expert ids (token after
//! token, top-k each), and TRACE_OUT.logits, one line per layer of every router logit (token
//! after token, n_expert each; recorded layer by layer), for scripts/policy_sim.py.

use sage::engine::scheduler::{Lfru, Lru};
use sage::engine::{Engine, EngineOptions};

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    anyhow::ensure!(a.len() >= 3, "usage: policy_sweep MODEL_DIR TEXT [WINDOW] [TRACE_OUT]");
    let window: usize = a.get(3).map(|s| s.parse()).transpose()?.unwrap_or(512);
    sage::ggml::route_logs();
    let tok = sage::tokenizer::Tokenizer::load(a[1].as_ref())?;
    let text = std::fs::read_to_string(&a[2])?;
    let ids = tok.encode(&text)?;
    let out = a.get(4);
    let opts = EngineOptions { n_ctx: window, fused: out.is_none(), ..Default::default() };
    let mut e = Engine::load(a[1].as_ref(), opts)?;
    let t = sage::eval::profile(&mut e, &ids, window, out.is_some(), |_, _| {})?;
    if let Some(out) = out {
        fn lines<T: ToString>(rows: &[Vec<T>]) -> String {
            rows.iter().map(|r| r.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(" ") + "\n").collect()
        }
        std::fs::write(out, lines(&t.choices))?;
        std::fs::write(format!("{out}.logits"), lines(t.router_logits.as_deref().expect("recorded")))?;
    }
    let total = t.n_layer * t.n_expert;
    println!("{} tokens x {} layers, top-{} of {}", t.n_tokens(), t.n_layer, t.n_expert_used, t.n_expert);
    let half_lives = [0.25, 0.5, 1.0, 2.0, 4.0, 16.0];
    print!("| arena | LRU |");
    for h in half_lives {
        print!(" LFRU h={h} |");
    }
    println!(" knows this token | knows the next token | optimal |");
    for pct in [25, 50, 75] {
        let slots = (total * pct / 100).max(t.n_expert_used);
        print!("| {pct}% ({slots}) | {:.1}% |", 100.0 * t.replay(slots, Box::new(Lru::new(slots))));
        for h in half_lives {
            print!(" {:.1}% |", 100.0 * t.replay(slots, Box::new(Lfru::new(slots, h))));
        }
        print!(" {:.1}% |", 100.0 * t.lookahead_hit_rate(slots, 0));
        print!(" {:.1}% |", 100.0 * t.lookahead_hit_rate(slots, 1));
        println!(" {:.1}% |", 100.0 * t.optimal_hit_rate(slots));
    }
    Ok(())
}
