//! `model.safetensors` of a Hugging Face checkpoint (header, dtypes, shapes, offsets) as
//! `sage-convert` reads it: the micro model's config and tokenizer with the fuzzer's bytes
//! as its weights, converted to a model directory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sage_fuzz::{dir_with, fresh_dir, MICRO_CONFIG, TOKENIZER_CONFIG_JSON, TOKENIZER_JSON};

fuzz_target!(init: sage_fuzz::init(), |data: &[u8]| {
    let dir = dir_with(
        "hf",
        &[
            ("config.json", MICRO_CONFIG),
            ("model.safetensors", data),
            ("tokenizer.json", TOKENIZER_JSON),
            ("tokenizer_config.json", TOKENIZER_CONFIG_JSON),
        ],
    );
    let out = fresh_dir("out");
    let opts = sage::convert::ConvertOptions { force: true, ..Default::default() };
    if sage::convert::convert(&dir, &out.join("model"), &opts).is_ok() {
        sage::model_dir::ModelDir::open(&out.join("model")).expect("a directory sage-convert finished opens");
    }
});
