//! Crafted GGUF files, byte by byte (as candle's GGUF tests build them): every malformation
//! ends in an error that names the file and the problem; nothing panics, nothing allocates
//! what the file claims without checking.

use std::path::Path;

use crate::util::*;

const GGUF_TYPE_U32: u32 = 4;
const GGUF_TYPE_STRING: u32 = 8;
const F32: u32 = 0;
const Q4_K: u32 = 12;

/// A tensor info: name, dims, ggml type id, offset in the data section.
struct Info<'a>(&'a str, Vec<i64>, u32, u64);

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// GGUF v3: header, key-values (strings and u32s), tensor infos, padding to `align`, data.
fn gguf(n_tensors: u64, kv: &[(&str, Result<&str, u32>)], infos: &[Info], align: usize, data: usize) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(n_tensors.to_le_bytes());
    b.extend((kv.len() as u64).to_le_bytes());
    for (k, v) in kv {
        string(&mut b, k);
        match v {
            Ok(s) => {
                b.extend(GGUF_TYPE_STRING.to_le_bytes());
                string(&mut b, s);
            }
            Err(n) => {
                b.extend(GGUF_TYPE_U32.to_le_bytes());
                b.extend(n.to_le_bytes());
            }
        }
    }
    for Info(name, ne, ty, off) in infos {
        string(&mut b, name);
        b.extend((ne.len() as u32).to_le_bytes());
        for n in ne {
            b.extend(n.to_le_bytes());
        }
        b.extend(ty.to_le_bytes());
        b.extend(off.to_le_bytes());
    }
    b.resize(b.len().next_multiple_of(align), 0);
    b.resize(b.len() + data, 0);
    b
}

fn open_err(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    let e = match sage::source::open(&p) {
        Ok(_) => panic!("{name}: a malformed GGUF opened"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains(name), "{name}: the error does not name the file: {e}");
    // The CLI says the same, without panicking.
    let o =
        std::process::Command::new(env!("CARGO_BIN_EXE_sage")).args(["inspect", p.to_str().unwrap()]).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && stderr.contains("sage: error") && !stderr.contains("panicked"), "{name}: {stderr}");
    e
}

#[test]
fn crafted_gguf_files_are_refused_with_the_reason() {
    let dir = tmp();
    let arch = ("general.architecture", Ok("qwen3moe"));
    let a = |off| Info("a", vec![32], F32, off);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("past-end.gguf", gguf(1, &[arch], &[a(0)], 32, 64), "truncated: tensor 'a' ends at byte"),
        (
            "overlap.gguf",
            gguf(2, &[arch], &[a(0), Info("b", vec![32], F32, 0)], 32, 256),
            "tensor 'b' has offset 0, expected 128",
        ),
        (
            "misaligned.gguf",
            gguf(2, &[arch], &[Info("a", vec![3], F32, 0), Info("b", vec![32], F32, 12)], 32, 256),
            "tensor 'b' has offset 12, expected 32",
        ),
        ("overflow.gguf", gguf(1, &[arch], &[Info("a", vec![1 << 40, 1 << 40], F32, 0)], 32, 64), "overflow"),
        ("negative-dim.gguf", gguf(1, &[arch], &[Info("a", vec![-4], F32, 0)], 32, 64), "invalid number of elements"),
        ("unknown-type.gguf", gguf(1, &[arch], &[Info("a", vec![32], 200, 0)], 32, 256), "invalid ggml type 200"),
        ("bad-row.gguf", gguf(1, &[arch], &[Info("a", vec![100], Q4_K, 0)], 32, 256), "not a multiple of block size"),
        (
            "alignment.gguf",
            gguf(1, &[arch, ("general.alignment", Err(3))], &[a(0)], 32, 256),
            "alignment 3 is not a power of 2",
        ),
        ("many-tensors.gguf", gguf(u64::MAX / 2, &[arch], &[], 32, 0), "number of tensors is"),
        ("dup-tensor.gguf", gguf(2, &[arch], &[a(0), a(128)], 32, 256), "duplicate tensor name 'a'"),
        ("dup-key.gguf", gguf(0, &[arch, arch], &[], 32, 0), "duplicate key 'general.architecture'"),
        (
            "long-string.gguf",
            {
                let mut b = gguf(0, &[arch], &[], 1, 0);
                // The architecture's length prefix claims 2^62 bytes.
                let at = b.len() - "qwen3moe".len() - 8;
                b[at..at + 8].copy_from_slice(&(1u64 << 62).to_le_bytes());
                b
            },
            "string length",
        ),
        ("not-gguf.gguf", b"GGML\x03\x00\x00\x00".to_vec(), "invalid magic characters"),
        ("empty.gguf", Vec::new(), "failed to read magic"),
    ];
    for (name, bytes, want) in cases {
        let e = open_err(dir.path(), name, &bytes);
        assert!(e.contains(want), "{name}: {e}");
    }
}
