//! A model directory given to `sage run`: the expert manifest and hyperparameters in
//! base.gguf, the shard headers, and the engine built from them. The first input byte picks
//! the file the rest replaces in the micro model (even: base.gguf, odd: the expert shard);
//! whatever opens is loaded into an engine that evaluates two tokens.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sage::engine::{Engine, EngineOptions};
use sage_fuzz::{dir_with, MICRO_BASE, MICRO_SHARD, MICRO_SHARD_NAME};

fuzz_target!(init: sage_fuzz::init(), |data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else { return };
    let (base, shard) = if which % 2 == 0 { (rest, MICRO_SHARD) } else { (MICRO_BASE, rest) };
    let dir = dir_with("model", &[("base.gguf", base), (MICRO_SHARD_NAME, shard)]);
    let Ok(md) = sage::model_dir::ModelDir::open(&dir) else { return };
    for l in &md.manifest.layers {
        for &e in &l.ids {
            let _ = md.read_expert(l.il, e);
        }
    }
    drop(md);
    let opts = EngineOptions { threads: 1, n_ctx: 16, ..Default::default() };
    let Ok(mut engine) = Engine::load(&dir, opts) else { return };
    let _ = engine.eval(&[1, 2], false);
});
