//! A routing trace (`sage trace`'s files, read by `sage trace map|replay`, `sage plan --trace`
//! and `sage run --route-trace`): parsed and checked, then mapped, measured and replayed as
//! those commands do.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(init: sage_fuzz::init(), |data: &[u8]| {
    let Some(text) = sage_fuzz::text(data) else { return };
    let Ok(t) = sage::engine::trace::RouteTrace::parse(text, Path::new("fuzz/x.trace")) else { return };
    // Keep executions small: a replay is O(tokens × layers × experts used).
    if t.n_tokens() * t.n_layer * t.n_expert_used > 1 << 16 || t.n_layer * t.n_expert > 1 << 16 {
        return;
    }
    let m = t.map_layers(t.n_layer + 1);
    assert_eq!((m.n_layer, m.n_tokens()), (t.n_layer + 1, t.n_tokens()));
    let _ = (t.median_reuse_distance(), t.next_token_repeat());
    let slots = (t.n_layer * t.n_expert / 4).max(t.n_expert_used);
    for p in sage::engine::scheduler::POLICIES {
        let h = t.hit_rate(p, slots);
        assert!((0.0..=1.0).contains(&h));
    }
    assert!(t.optimal_hit_rate(slots) >= t.hit_rate("lru", slots) - 1e-12);
});
