//! `tokenizer.json` of a checkpoint: what `sage-convert` takes from it for base.gguf, and the
//! tokenizer `sage run` loads from a model directory, used on a short text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sage_fuzz::{dir_with, MICRO_CONFIG, TOKENIZER_CONFIG_JSON};
use std::path::Path;

fuzz_target!(init: sage_fuzz::init(), |data: &[u8]| {
    let dir = dir_with(
        "tok",
        &[("config.json", MICRO_CONFIG), ("tokenizer.json", data), ("tokenizer_config.json", TOKENIZER_CONFIG_JSON)],
    );
    let (_, cfg) = sage::config::parse_hf_config(
        std::str::from_utf8(MICRO_CONFIG).expect("utf-8"),
        Path::new("micro/config.json"),
    )
    .expect("the micro config parses");
    let _ = sage::tokenizer::TokenizerData::from_hf_dir(&dir, &cfg);
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(tok) = sage::tokenizer::validate_json(text, &dir.join("tokenizer.json")) {
        if let Ok(enc) = tok.encode("And God said unto Moses, def f(x): return x", false) {
            let _ = tok.decode(enc.get_ids(), false);
        }
    }
});
