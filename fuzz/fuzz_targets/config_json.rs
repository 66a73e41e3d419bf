//! `config.json` of a Hugging Face checkpoint: parsed by sage's reader (both transformers 4
//! and 5 spellings), then everything sage computes from a config without weights: the base
//! tensor list, `sage footprint`, and the hyperparameters written as GGUF metadata.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(init: sage_fuzz::init(), |data: &[u8]| {
    let Some(text) = sage_fuzz::text(data) else { return };
    let path = Path::new("fuzz/config.json");
    let Ok((_layout, cfg)) = sage::config::parse_hf_config(text, path) else { return };
    let _ = sage::arch::base_tensors(&cfg);
    let _ = sage::footprint::of_config(&cfg, &sage::footprint::FootprintOptions::default());
    let _ = cfg.write_gguf(&mut sage::ggml::Gguf::new_empty());
});
