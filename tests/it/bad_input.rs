//! Bad input: a clear error naming the file and tensor, and nothing that looks like a model
//! left behind.

use std::path::{Path, PathBuf};

use sage::convert::{convert, ConvertOptions};
use sage::ggml::{GgmlType, GgufValue};
use sage::merge::merge;
use sage::model_dir::ModelDir;

use crate::util::*;

/// Convert a damaged copy and return the error text; the output must not look complete.
fn convert_err(input: &Path, dir: &Path) -> String {
    let out = dir.join("out");
    let e = convert(input, &out, &opts(Some(GgmlType::Q8_0))).expect_err("conversion should fail").to_string();
    assert!(!out.join("base.gguf").exists(), "a failed conversion left base.gguf: {e}");
    e
}

fn damaged_copy(dir: &Path) -> PathBuf {
    let c = dir.join("ckpt");
    copy_dir(&plain(), &c);
    c
}

#[test]
fn unknown_architecture() {
    let dir = tmp();
    let c = damaged_copy(dir.path());
    let cfg = std::fs::read_to_string(c.join("config.json"))
        .unwrap()
        .replace("Qwen3MoeForCausalLM", "DeepseekV32ForCausalLM");
    std::fs::write(c.join("config.json"), cfg).unwrap();
    let e = convert_err(&c, dir.path());
    // One error, listing every architecture sage converts, and nothing written.
    assert!(!dir.path().join("out").exists(), "{e}");
    assert!(e.contains("config.json: unsupported architecture 'DeepseekV32ForCausalLM'; sage supports "), "{e}");
    for a in ["Qwen3MoeForCausalLM", "MixtralForCausalLM", "OlmoeForCausalLM", "Qwen2MoeForCausalLM"] {
        assert!(e.contains(a), "{a} not listed: {e}");
    }
}

#[test]
fn gguf_of_another_architecture() {
    let dir = tmp();
    let mut g = sage::ggml::Gguf::new_empty();
    g.set("general.architecture", &GgufValue::Str("llama".into())).unwrap();
    let p = dir.path().join("llama.gguf");
    std::fs::write(&p, g.meta_bytes()).unwrap();
    let e = convert_err(&p, dir.path());
    // llama.cpp writes Mixtral as `llama` with experts; a dense Llama is not a Mixture of Experts.
    assert!(
        e.contains("llama.gguf: unsupported architecture 'llama' without experts; sage supports 'qwen3moe'"),
        "{e}"
    );
    let mut g = sage::ggml::Gguf::new_empty();
    g.set("general.architecture", &GgufValue::Str("gemma".into())).unwrap();
    std::fs::write(&p, g.meta_bytes()).unwrap();
    let e = convert_err(&p, dir.path());
    assert!(
        e.contains("unsupported architecture 'gemma'; sage supports 'qwen3moe' (Qwen3-MoE), 'llama' (Mixtral)"),
        "{e}"
    );
}

#[test]
fn missing_tensor() {
    let dir = tmp();
    let c = damaged_copy(dir.path());
    rewrite_safetensors(&c.join("model.safetensors"), |m| {
        m.remove("model.layers.1.self_attn.k_proj.weight");
    });
    let e = convert_err(&c, dir.path());
    assert!(e.contains("missing tensor 'model.layers.1.self_attn.k_proj.weight'"), "{e}");

    copy_dir(&plain(), &c);
    rewrite_safetensors(&c.join("model.safetensors"), |m| {
        m.remove("model.layers.0.mlp.experts.6.up_proj.weight");
    });
    let e = convert_err(&c, dir.path());
    assert!(e.contains("missing tensor 'model.layers.0.mlp.experts.6.up_proj.weight'"), "{e}");
}

#[test]
fn wrong_shape() {
    let dir = tmp();
    let c = damaged_copy(dir.path());
    rewrite_safetensors(&c.join("model.safetensors"), |m| {
        let t = m.get_mut("model.layers.1.self_attn.k_proj.weight").unwrap();
        t.1 = vec![64, 256];
        t.2.truncate(64 * 256 * 2);
    });
    let e = convert_err(&c, dir.path());
    assert!(
        e.contains("tensor 'model.layers.1.self_attn.k_proj.weight' has wrong shape; expected 256 x 128, got 256 x 64"),
        "{e}"
    );
    copy_dir(&plain(), &c);
    rewrite_safetensors(&c.join("model.safetensors"), |m| {
        let t = m.get_mut("model.layers.1.mlp.experts.3.down_proj.weight").unwrap();
        t.1 = vec![128, 512];
    });
    let e = convert_err(&c, dir.path());
    assert!(
        e.contains(
            "'model.layers.1.mlp.experts.3.down_proj.weight' has wrong shape; expected 256 x 256, got 512 x 128"
        ),
        "{e}"
    );
}

#[test]
fn unsupported_dtype() {
    let dir = tmp();
    let c = damaged_copy(dir.path());
    rewrite_safetensors(&c.join("model.safetensors"), |m| {
        let t = m.get_mut("model.layers.0.self_attn.q_proj.weight").unwrap();
        t.0 = safetensors::Dtype::I16;
    });
    let e = convert_err(&c, dir.path());
    assert!(
        e.contains("model.safetensors: tensor 'model.layers.0.self_attn.q_proj.weight' has unsupported type I16; expected F32, F16 or BF16"),
        "{e}"
    );
}

#[test]
fn truncated_safetensors() {
    let dir = tmp();
    let c = damaged_copy(dir.path());
    let f = c.join("model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    for cut in [len - 1, len / 2, 100, 4] {
        let bytes = std::fs::read(plain().join("model.safetensors")).unwrap();
        std::fs::write(&f, &bytes[..cut as usize]).unwrap();
        let e = convert_err(&c, dir.path());
        assert!(
            e.contains("model.safetensors") && (e.contains("truncated") || e.contains("not a valid safetensors")),
            "cut at {cut}: {e}"
        );
        if cut > 1000 {
            assert!(
                e.contains(&format!("truncated: tensor data ends at byte {len}, but the file has {cut} bytes")),
                "{e}"
            );
        }
    }
}

#[test]
fn truncated_gguf() {
    let dir = tmp();
    let (m, _) = convert_into(&plain(), dir.path(), &opts(Some(GgmlType::Q8_0)));
    let whole = dir.path().join("whole.gguf");
    merge(&m, &whole, false).unwrap();
    let bytes = std::fs::read(&whole).unwrap();
    let data_start = sage::ggml::Gguf::open(&whole).unwrap().data_offset() as usize;
    let cut_file = dir.path().join("cut.gguf");
    // Positions in the header, the metadata, the tensor infos and the tensor data.
    for cut in [0, 3, 10, 24, 200, 5000, data_start - 10, data_start + 10, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&cut_file, &bytes[..cut]).unwrap();
        let e = convert_err(&cut_file, dir.path());
        assert!(e.contains("cut.gguf"), "cut at {cut}: {e}");
        if cut > data_start {
            assert!(
                e.contains("truncated: tensor '") && e.contains(&format!("but the file has {cut} bytes")),
                "cut at {cut}: {e}"
            );
        } else {
            assert!(e.contains("not a valid GGUF file"), "cut at {cut}: {e}");
        }
    }
}

#[test]
fn output_directory_not_writable() {
    let dir = tmp();
    // Below a regular file no directory can be made, even as root.
    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let out = file.join("model");
    let e = convert(&plain(), &out, &ConvertOptions::default()).unwrap_err().to_string();
    assert!(e.contains(&format!("{}: Not a directory", out.display())), "{e}");
    let e = convert(&plain(), &file, &ConvertOptions::default()).unwrap_err().to_string();
    assert!(e.contains("a-file: exists and is not a directory"), "{e}");
    // --force pointed at the input itself, on a copy (never at a committed fixture): refused,
    // and every file of the input is left as it was.
    let ckpt = damaged_copy(dir.path());
    let before: Vec<(std::ffi::OsString, Vec<u8>)> = files_of(&ckpt);
    let e = convert(&ckpt, &ckpt, &ConvertOptions { force: true, ..Default::default() }).unwrap_err().to_string();
    assert!(e.contains("holds the input"), "{e}");
    assert_eq!(files_of(&ckpt), before, "the input changed");
    // --force into a directory of someone else's files: only sage's own files are replaced.
    let (model, _) = convert_into(&plain(), &dir.path().join("x"), &opts(Some(GgmlType::Q8_0)));
    std::fs::write(model.join("notes.txt"), "mine").unwrap();
    convert(&plain(), &model, &ConvertOptions { force: true, ..opts(Some(GgmlType::Q4_K)) }).unwrap();
    assert_eq!(std::fs::read_to_string(model.join("notes.txt")).unwrap(), "mine");
    assert_eq!(ModelDir::open(&model).unwrap().manifest.layers[0].types[0], GgmlType::Q4_K);
}

/// Every file of `dir` (not recursive) with its bytes, sorted by name.
fn files_of(dir: &Path) -> Vec<(std::ffi::OsString, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| (e.file_name(), std::fs::read(e.path()).unwrap()))
        .collect();
    v.sort();
    v
}

#[test]
fn damaged_model_directory_is_refused() {
    let dir = tmp();
    let (m, _) = convert_into(&plain(), dir.path(), &opts(Some(GgmlType::Q8_0)));
    let shard = m.join("experts/blk.001.bin");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 4096]).unwrap();
    let e = ModelDir::open(&m).err().unwrap().to_string();
    assert!(
        e.contains("blk.001.bin: truncated: 8 experts of")
            && e.contains(&format!("the file has {} bytes", bytes.len() - 4096)),
        "{e}"
    );
    // A shard from another conversion of the same model.
    let (other, _) = convert_into(&plain(), &dir.path().join("o"), &opts(Some(GgmlType::Q8_0)));
    std::fs::copy(other.join("experts/blk.001.bin"), &shard).unwrap();
    let e = ModelDir::open(&m).err().unwrap().to_string();
    assert!(e.contains("the files come from different conversions"), "{e}");
    std::fs::remove_file(&shard).unwrap();
    let e = ModelDir::open(&m).err().unwrap().to_string();
    assert!(e.contains("blk.001.bin: No such file"), "{e}");
    std::fs::remove_file(m.join("base.gguf")).unwrap();
    let e = ModelDir::open(&m).err().unwrap().to_string();
    assert!(e.contains("not a usable sage model directory: it has no base.gguf"), "{e}");
}

/// The command line as a new user tries it: out-of-range sampling options, an arena size that
/// overflows, and a directory that is not a model directory are refused with a message that
/// says which, before anything loads, by every command that takes them.
#[test]
fn command_line_refuses_bad_options_and_directories() {
    let dir = tmp();
    let (model, _) = convert_into(&plain(), dir.path(), &opts(Some(GgmlType::Q8_0)));
    let m = model.to_str().unwrap();
    let sage = |args: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_sage")).args(args).output().unwrap();
        (o.status.success(), String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr))
    };
    for (opt, value, says) in [
        ("--top-p", "7", "7 is out of range: above 0 up to 1"),
        ("--top-p", "0", "0 is out of range: above 0 up to 1"),
        ("--top-p", "nan", "nan is out of range"),
        ("--temp", "-1", "-1 is out of range: from 0 up to 2"),
        ("--temp", "inf", "inf is out of range"),
        ("--repeat-penalty", "0", "0 is out of range: above 0 up to 10"),
        ("--repeat-penalty", "x", "'x' is not a number"),
        ("--top-k", "-3", "invalid value"),
        ("--arena", "99999999999999999999GiB", "2^64"),
        ("--arena", "12 potatoes", "12 potatoes"),
    ] {
        for cmd in [&["run", m, "--prompt", "hi"][..], &["chat", m], &["serve", m]] {
            let (ok, out) = sage(&[cmd, &[opt, value]].concat());
            assert!(!ok && out.contains(says), "{cmd:?} {opt} {value}: {out}");
            assert!(!out.contains("panicked"), "{out}");
        }
    }
    // Values at the ends of the ranges run.
    let (ok, out) =
        sage(&["run", m, "--prompt", "hi", "-n", "2", "--top-p", "1", "--temp", "2", "--repeat-penalty", "10"]);
    assert!(ok, "{out}");
    // Not a model directory: /etc, a Hugging Face checkpoint, a file, nothing.
    let ckpt = plain();
    let readme = Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    let missing = dir.path().join("missing");
    for (d, says) in [
        (
            Path::new("/etc"),
            "/etc: not a usable sage model directory: it has no base.gguf; make one with `sage-convert",
        ),
        (ckpt.as_path(), "not a usable sage model directory: it holds a Hugging Face checkpoint"),
        (readme.as_path(), "README.md: not a usable sage model directory: not a directory"),
        (missing.as_path(), "missing: not a usable sage model directory: no such directory"),
    ] {
        let d = d.to_str().unwrap();
        for cmd in [&["run", d, "--prompt", "hi"][..], &["chat", d], &["serve", d], &["eval", d, "--text", d]] {
            let (ok, out) = sage(cmd);
            assert!(!ok && out.contains(says), "{cmd:?}: {out}");
            assert!(!out.contains("tokenizer.json"), "blames the tokenizer: {out}");
        }
    }
}

/// A shard whose header disagrees with base.gguf, field by field (the shard of another layer
/// under this name, another expert count, another record stride, another format version, no
/// magic, another conversion): refused when the directory opens, naming the shard, the field
/// and both values, by the library and `sage run`; nothing is read from it.
#[test]
fn shard_headers_that_disagree_with_base_gguf_are_refused() {
    let dir = tmp();
    let (m, _) = convert_into(&plain(), dir.path(), &opts(Some(GgmlType::Q8_0)));
    let shard = m.join("experts/blk.000.bin");
    let good = std::fs::read(&shard).unwrap();
    let stride = u64::from_le_bytes(good[24..32].try_into().unwrap());
    let other_layer = std::fs::read(m.join("experts/blk.001.bin")).unwrap();
    let patched = |at: usize, bytes: &[u8]| {
        let mut b = good.clone();
        b[at..at + bytes.len()].copy_from_slice(bytes);
        b
    };
    let cases: Vec<(&str, Vec<u8>, String)> = vec![
        ("another layer", other_layer, "shard header: layer 1, base.gguf says 0: a shard of another layer".into()),
        ("expert count", patched(16, &7u32.to_le_bytes()), "shard header: expert count 7, base.gguf says 8".into()),
        (
            "stride",
            patched(24, &(stride + 4096).to_le_bytes()),
            format!("shard header: record stride {}, base.gguf says {stride}", stride + 4096),
        ),
        ("version", patched(8, &9u32.to_le_bytes()), "shard header: format version 9, base.gguf says 2".into()),
        ("magic", patched(0, b"GGUF"), "not a sage expert shard (no SAGEXPRT magic)".into()),
        ("conversion", patched(32, b"someone-else"), "the files come from different conversions".into()),
    ];
    for (what, bytes, says) in cases {
        std::fs::write(&shard, &bytes).unwrap();
        let e = ModelDir::open(&m).err().unwrap_or_else(|| panic!("{what}: opened")).to_string();
        assert!(e.contains("blk.000.bin: not a usable sage model directory") && e.contains(&says), "{what}: {e}");
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_sage"))
            .args(["run", m.to_str().unwrap(), "--prompt", "hi", "-n", "2"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(&says) && !err.contains("panicked"), "{what}: {err}");
    }
    std::fs::write(&shard, &good).unwrap();
    ModelDir::open(&m).unwrap();
}

/// A base.gguf whose RoPE base frequency is 0, negative or NaN (every position's rotation
/// would be NaN): refused when the directory opens, naming the file and the key.
#[test]
fn non_positive_rope_theta_in_base_gguf_is_refused() {
    let dir = tmp();
    let (m, _) = convert_into(&plain(), dir.path(), &opts(Some(GgmlType::Q8_0)));
    let base = m.join("base.gguf");
    let good = std::fs::read(&base).unwrap();
    let key = b"qwen3moe.rope.freq_base";
    let at = good.windows(key.len()).position(|w| w == key).expect("the key is in base.gguf") + key.len();
    assert_eq!(u32::from_le_bytes(good[at..at + 4].try_into().unwrap()), 6, "stored as GGUF float32");
    assert_eq!(f32::from_le_bytes(good[at + 4..at + 8].try_into().unwrap()), 1e6);
    for bad in [0.0f32, -1e6, f32::NAN] {
        let mut b = good.clone();
        b[at + 4..at + 8].copy_from_slice(&bad.to_le_bytes());
        std::fs::write(&base, &b).unwrap();
        let e = ModelDir::open(&m).err().unwrap_or_else(|| panic!("{bad}: opened")).to_string();
        assert!(e.contains("base.gguf") && e.contains("qwen3moe.rope.freq_base") && e.contains("positive"), "{e}");
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_sage"))
            .args(["run", m.to_str().unwrap(), "--prompt", "hi", "-n", "2"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains("qwen3moe.rope.freq_base"), "{bad}: {err}");
    }
}
