//! Hazards of real use: several processes on one model, damaged weights that still parse.

use std::process::{Command, Stdio};

use sage::ggml::{GgmlType, Gguf};

use crate::util::*;

/// Two `sage run` processes on the same model directory at the same time both work and
/// produce the same greedy text (shards are only ever opened read-only).
#[test]
fn two_processes_share_a_model_directory() {
    let dir = tmp();
    let (model_dir, _) = convert_into(&plain(), dir.path(), &opts(Some(GgmlType::Q8_0)));
    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_sage"))
            .args(["run", model_dir.to_str().unwrap(), "-p", "The quick brown fox", "--temp", "0", "-n", "48"])
            .args(["--arena-experts", "2", "--threads", "1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    for o in [&a, &b] {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert_eq!(a.stdout, b.stdout);
    assert!(a.stdout.len() > 20, "{}", String::from_utf8_lossy(&a.stdout));
}

/// NaN in a router's weights parses fine but ruins routing: sage warns, naming the tensor.
#[test]
fn nan_in_router_weights_is_reported() {
    let dir = tmp();
    let (model_dir, _) = convert_into(&plain(), dir.path(), &opts(Some(GgmlType::Q8_0)));
    let base = model_dir.join("base.gguf");
    let g = Gguf::open(&base).unwrap();
    let t = g.tensors().into_iter().find(|t| t.name == "blk.1.ffn_gate_inp.weight").unwrap();
    let mut bytes = std::fs::read(&base).unwrap();
    let at = (g.data_offset() + t.offset) as usize;
    bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    bytes[at + 8..at + 12].copy_from_slice(&f32::INFINITY.to_le_bytes());
    std::fs::write(&base, bytes).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_sage"))
        .args(["run", model_dir.to_str().unwrap(), "-p", "The", "--temp", "0", "-n", "2"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("tensor 'blk.1.ffn_gate_inp.weight' has 2 NaN or infinite values of 2048"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
