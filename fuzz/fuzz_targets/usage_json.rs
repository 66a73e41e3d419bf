//! `usage.json` (`sage profile`'s output, read by `sage run --warm` and
//! `sage-convert --pool`): parsed and checked, then used the way both commands use it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(init: sage_fuzz::init(), |data: &[u8]| {
    let Some(text) = sage_fuzz::text(data) else { return };
    let path = Path::new("fuzz/usage.json");
    let Ok(u) = sage::usage::Usage::parse(text, path) else { return };
    let _ = u.check_model(path, u.n_layer, u.n_expert);
    for keep in [1, u.n_expert_used as usize, u.n_expert as usize] {
        let pool = u.most_used(keep);
        assert_eq!(pool.len(), u.layers.len());
    }
    let _ = u.ranked();
});
