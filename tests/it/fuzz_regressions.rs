//! Inputs that crashed a fuzz target (`fuzz/`), each replayed through the commands that read
//! that kind of file: now a clear error naming the file, never a panic.

use std::process::Command;

use sage::ggml::GgmlType;

use crate::util::*;

fn crash_input(name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join("fuzz").join(name)).unwrap()
}

/// tokenizers 0.23 panics (an `expect` in its decoder deserializer) on a syntax error inside
/// the `decoder` object of tokenizer.json; found by `tokenizer_json` in its first minute.
#[test]
fn tokenizer_json_that_panicked_the_tokenizers_crate() {
    let bytes = crash_input("tokenizer-decoder-syntax-error.json");
    let dir = tmp();

    // sage-convert: the checkpoint's tokenizer.json.
    let ckpt = dir.path().join("ckpt");
    copy_dir(&plain(), &ckpt);
    std::fs::write(ckpt.join("tokenizer.json"), &bytes).unwrap();
    let out = dir.path().join("out");
    let err = sage::convert::convert(&ckpt, &out, &opts(Some(GgmlType::Q8_0))).unwrap_err().to_string();
    assert!(err.contains("tokenizer.json") && err.contains("not JSON"), "{err}");
    assert!(!out.join("base.gguf").exists());

    // sage run: a model directory's tokenizer.json (library and CLI).
    let (model, _) = convert_into(&plain(), dir.path(), &opts(Some(GgmlType::Q8_0)));
    std::fs::write(model.join("tokenizer.json"), &bytes).unwrap();
    let err = sage::engine::generate::load_tokenizer(&model).unwrap_err().to_string();
    assert!(err.contains("tokenizer.json") && err.contains("not JSON"), "{err}");
    let run = Command::new(env!("CARGO_BIN_EXE_sage"))
        .args(["run", model.to_str().unwrap(), "--prompt", "hi", "--max-tokens", "2"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("tokenizer.json") && !stderr.contains("panicked"), "{stderr}");
}
