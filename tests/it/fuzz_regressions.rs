//! Inputs that crashed a fuzz target (`fuzz/`), each replayed through the commands that read
//! that kind of file: now a clear error naming the file, never a panic.

use std::process::Command;

use sage::ggml::GgmlType;

use crate::util::*;

/// `sage run MODEL` exits 1 (an error, not a panic's 101 or a signal); returns its stderr.
fn sage_run_fails(model: &std::path::Path) -> String {
    let run = Command::new(env!("CARGO_BIN_EXE_sage"))
        .args(["run", model.to_str().unwrap(), "--prompt", "hi", "--max-tokens", "2"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    stderr
}

/// The fixture converted at q8_0 under `dir`, its base.gguf replaced by crash input `name`.
fn model_with_base(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    let (model, _) = convert_into(&plain(), dir, &opts(Some(GgmlType::Q8_0)));
    std::fs::write(model.join("base.gguf"), crash_input(name)).unwrap();
    model
}

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
    let err = sage::tokenizer::Tokenizer::load(&model).err().expect("refused").to_string();
    assert!(err.contains("tokenizer.json") && err.contains("not JSON"), "{err}");
    let stderr = sage_run_fails(&model);
    assert!(stderr.contains("tokenizer.json") && !stderr.contains("panicked"), "{stderr}");
}

/// A GGUF whose `qwen3moe.block_count` is 2^31 + 1 (found by `model_dir`, as base.gguf):
/// sage built a per-layer tensor list of that length and ran out of memory. Layer and expert
/// counts are now held to llama.cpp's limits (512 each) and to what the file can hold.
#[test]
fn gguf_with_a_huge_block_count() {
    let dir = tmp();
    let model = model_with_base(dir.path(), "base-gguf-huge-block-count.gguf");
    let err = sage::model_dir::ModelDir::open(&model).err().expect("refused").to_string();
    assert!(err.contains("base.gguf") && err.contains("qwen3moe.block_count") && err.contains("512"), "{err}");

    // The same kind of file given to sage-convert (found by `gguf`): 33554433 layers.
    let input = dir.path().join("in.gguf");
    std::fs::write(&input, crash_input("gguf-huge-counts.gguf")).unwrap();
    let out = dir.path().join("out");
    let err = sage::convert::convert(&input, &out, &opts(None)).unwrap_err().to_string();
    assert!(err.contains("in.gguf") && err.contains("qwen3moe.block_count"), "{err}");
    assert!(!out.exists());
}

/// A config.json of 6962 layers (found by `config_json`): `sage footprint` took over 20 s on
/// it, and sizes grow with layers without bound. Now refused, naming the key.
#[test]
fn config_json_with_too_many_layers() {
    let path = tmp().path().join("config.json");
    let text = String::from_utf8(crash_input("config-6962-layers.json")).unwrap();
    let err = sage::config::parse_hf_config(&text, &path).unwrap_err().to_string();
    assert!(err.contains("num_hidden_layers") && err.contains("6962") && err.contains("512"), "{err}");
}

/// A config.json at each limit parses; one above each is refused, naming the key.
#[test]
fn config_limits_are_where_they_are_said_to_be() {
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(configs().join("qwen3-30b-a3b.config.json")).unwrap()).unwrap();
    let path = std::path::Path::new("config.json");
    for (key, limit) in
        [("num_hidden_layers", 512u64), ("num_experts", 512), ("hidden_size", 1 << 20), ("vocab_size", 1 << 24)]
    {
        let mut c = base.clone();
        c[key] = limit.into();
        sage::config::parse_hf_config(&c.to_string(), path).unwrap_or_else(|e| panic!("{key} = {limit}: {e}"));
        c[key] = (limit + 1).into();
        let err = sage::config::parse_hf_config(&c.to_string(), path).unwrap_err().to_string();
        assert!(err.contains(key), "{key}: {err}");
    }
}

/// A base.gguf whose `qwen3moe.attention.layer_norm_rms_epsilon` is negative (found by
/// `model_dir`): ggml aborted the process in its RMS norm (`GGML_ASSERT(eps >= 0.0f)`).
/// Now refused when the model opens; a config.json with a negative `rms_norm_eps` or a
/// `rope_theta` of 0 too.
#[test]
fn negative_rms_epsilon_is_refused_before_ggml_sees_it() {
    let dir = tmp();
    let model = model_with_base(dir.path(), "base-gguf-negative-rms-eps.gguf");
    let err = sage::engine::Engine::load(&model, Default::default()).err().expect("refused").to_string();
    assert!(err.contains("base.gguf") && err.contains("layer_norm_rms_epsilon"), "{err}");
    let stderr = sage_run_fails(&model);
    assert!(stderr.contains("layer_norm_rms_epsilon"), "{stderr}");

    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(plain().join("config.json")).unwrap()).unwrap();
    for (key, bad) in [("rms_norm_eps", -1e-6), ("rope_theta", 0.0)] {
        let mut c = base.clone();
        c[key] = bad.into();
        let err =
            sage::config::parse_hf_config(&c.to_string(), std::path::Path::new("config.json")).unwrap_err().to_string();
        assert!(err.contains(key) && err.contains("positive"), "{key}: {err}");
    }
}

/// A base.gguf whose expert manifest declares a projection of type q8_1 (found by
/// `model_dir`): ggml's CPU backend has no dot product for that intermediate type, and the
/// first expert computation called a null function (SIGSEGV). q8_1 and q8_K are now unknown
/// types to sage; the model is refused when it opens.
#[test]
fn expert_type_without_a_cpu_kernel_is_refused() {
    let dir = tmp();
    let model = model_with_base(dir.path(), "base-gguf-q8_1-experts.gguf");
    let err = sage::model_dir::ModelDir::open(&model).err().expect("refused").to_string();
    assert!(err.contains("base.gguf") && err.contains("sage.experts.blk.0.types"), "{err}");
    let stderr = sage_run_fails(&model);
    assert!(stderr.contains("unknown ggml type"), "{stderr}");
    for raw in [llama_cpp_sys_2::GGML_TYPE_Q8_1, llama_cpp_sys_2::GGML_TYPE_Q8_K] {
        assert_eq!(GgmlType::from_raw(raw), None);
    }
}

/// A base.gguf whose output norm weight is q5_1 (found by `model_dir`): ggml multiplies by
/// a norm only in f32 and aborted the process mid-graph ("binary_op: unsupported types").
/// Norms and routers must now be f32 (what sage-convert writes, as llama.cpp keeps them), the
/// other weights of a type ggml can multiply; the model is refused when it opens.
#[test]
fn norm_weight_that_is_not_f32_is_refused() {
    let dir = tmp();
    let model = model_with_base(dir.path(), "base-gguf-q5_1-norm.gguf");
    let err = sage::model_dir::ModelDir::open(&model).err().expect("refused").to_string();
    assert!(err.contains("base.gguf") && err.contains("norm") && err.contains("expected f32"), "{err}");
    let stderr = sage_run_fails(&model);
    assert!(stderr.contains("expected f32"), "{stderr}");
}
