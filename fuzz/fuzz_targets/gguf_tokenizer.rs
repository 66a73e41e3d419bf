//! A GGUF's `tokenizer.*` metadata, as `sage-convert` reads it from a llama.cpp GGUF: byte-level
//! BPE (`gpt2`, qwen2 or GPT-2 pre-tokenizers) or SentencePiece-style BPE (`llama`: scores,
//! token types, byte tokens), turned into a tokenizer.json, which is then loaded and used on a
//! short text, as `sage run` does.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sage_fuzz::dir_with;

fuzz_target!(init: sage_fuzz::init(), |data: &[u8]| {
    let dir = dir_with("gtok", &[("t.gguf", data)]);
    let path = dir.join("t.gguf");
    let Ok(g) = sage::ggml::Gguf::open(&path) else { return };
    let Ok(t) = sage::tokenizer::TokenizerData::from_gguf(&g, &path) else { return };
    let tok = sage::tokenizer::validate_json(&t.json, &path).expect("the tokenizer.json sage builds loads");
    if let Ok(enc) = tok.encode("And God said unto Moses, déjà vu 日本 <s> def f(x): return x", false) {
        let _ = tok.decode(enc.get_ids(), false);
    }
});
