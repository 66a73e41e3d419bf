//! A llama.cpp GGUF given to sage: `sage-convert inspect` and `sage-convert` (GGUF to a model
//! directory). ggml parses the container; sage reads the metadata (hyperparameters,
//! tokenizer), checks tensor names, types, shapes and offsets, and copies the data.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sage_fuzz::{dir_with, fresh_dir};

fuzz_target!(init: sage_fuzz::init(), |data: &[u8]| {
    let dir = dir_with("in", &[("model.gguf", data)]);
    let path = dir.join("model.gguf");
    let _ = sage::inspect::inspect(&path);
    let out = fresh_dir("out");
    let opts = sage::convert::ConvertOptions { force: true, ..Default::default() };
    if sage::convert::convert(&path, &out.join("model"), &opts).is_ok() {
        sage::model_dir::ModelDir::open(&out.join("model")).expect("a directory sage-convert finished opens");
    }
});
