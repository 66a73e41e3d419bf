//! Cold copies of the experts (`sage-convert --cold-quant`, `sage run --cold-quant`): the
//! records a conversion writes, the checks a model directory gets when it opens, the extra
//! disk `inspect` and `footprint` report, and the engine that loads them.

use std::path::{Path, PathBuf};
use std::process::Command;

use sage::convert::{convert, ConvertOptions, ConvertReport};
use sage::footprint::{footprint, FootprintOptions};
use sage::ggml::GgmlType;
use sage::merge::merge;
use sage::model_dir::ModelDir;

use crate::util::*;

/// The fixture with experts at `hot` (base q8_0), and cold copies at `cold` if asked.
fn convert_cold(dir: &Path, name: &str, hot: GgmlType, cold: Option<GgmlType>) -> (PathBuf, ConvertReport) {
    let out = dir.join(name);
    let o = ConvertOptions {
        quant_base: Some(GgmlType::Q8_0),
        quant_experts: Some(hot),
        cold_quant: cold,
        ..Default::default()
    };
    let r = convert(&plain(), &out, &o).unwrap();
    (out, r)
}

#[test]
fn cold_copies_are_the_records_of_a_conversion_at_the_cold_type() {
    let dir = tmp();
    for cold in [GgmlType::Q4_0, GgmlType::Q2_K] {
        let (with, r) = convert_cold(dir.path(), &format!("with-{cold}"), GgmlType::Q8_0, Some(cold));
        let (hot_only, _) = convert_cold(dir.path(), &format!("hot-{cold}"), GgmlType::Q8_0, None);
        let (at_cold, _) = convert_cold(dir.path(), &format!("at-{cold}"), cold, None);
        let (m, h, c) =
            (ModelDir::open(&with).unwrap(), ModelDir::open(&hot_only).unwrap(), ModelDir::open(&at_cold).unwrap());
        assert!(m.has_cold() && !h.has_cold() && !c.has_cold());
        assert_eq!(m.manifest.cold.len(), 2);
        for (il, l) in m.manifest.cold.iter().enumerate() {
            assert!(with.join(format!("experts/blk.{il:03}.cold.bin")).is_file());
            assert_eq!(l.types, [cold; 3]);
            assert_eq!(l.ids, m.manifest.layers[il].ids);
            assert_eq!(l.shapes, m.manifest.layers[il].shapes);
            // The cold copy is smaller than the full record: it fits the full record's slot.
            assert!(l.record_size() < m.manifest.layers[il].record_size());
        }
        assert_eq!(r.cold_bytes, m.cold_bytes());
        assert!(r.cold_bytes > 0 && r.cold_bytes < r.expert_bytes, "{} vs {}", r.cold_bytes, r.expert_bytes);
        for l in &m.manifest.layers {
            for &e in &l.ids {
                // Full records as without cold copies; cold ones as a conversion at the cold type.
                assert_eq!(
                    m.read_expert(l.il, e).unwrap(),
                    h.read_expert(l.il, e).unwrap(),
                    "layer {} expert {e}",
                    l.il
                );
                let cold_rec = m.read_cold_expert(l.il, e).unwrap();
                assert_eq!(cold_rec, c.read_expert(l.il, e).unwrap(), "{cold}: cold layer {} expert {e}", l.il);
                assert_ne!(cold_rec, m.read_expert(l.il, e).unwrap());
            }
        }
        let e = h.read_cold_expert(0, 0).unwrap_err().to_string();
        assert!(e.contains("no cold copies") && e.contains("--cold-quant"), "{e}");
    }
}

/// A damaged cold shard: the directory is refused, naming the cold shard and what is wrong.
#[test]
fn a_damaged_cold_shard_is_a_clear_error() {
    let dir = tmp();
    let (good, _) = convert_cold(dir.path(), "good", GgmlType::Q8_0, Some(GgmlType::Q4_0));
    let (same_type, _) = convert_cold(dir.path(), "same", GgmlType::Q4_0, Some(GgmlType::Q4_0));
    let fresh = |name: &str, from: &Path| {
        let out = dir.path().join(name);
        std::fs::create_dir_all(&out).unwrap();
        for f in ["base.gguf", "tokenizer.json"] {
            std::fs::copy(from.join(f), out.join(f)).unwrap();
        }
        copy_dir(&from.join("experts"), &out.join("experts"));
        out
    };
    let err = |m: &Path| ModelDir::open(m).err().expect("a damaged cold shard is refused").to_string();
    let cold0 = |m: &Path| m.join("experts/blk.000.cold.bin");

    // Truncated.
    let m = fresh("truncated", &good);
    let f = std::fs::OpenOptions::new().write(true).open(cold0(&m)).unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len - 100).unwrap();
    let e = err(&m);
    assert!(e.contains("blk.000.cold.bin") && e.contains("truncated") && e.contains(&format!("{len}")), "{e}");

    // Missing.
    let m = fresh("missing", &good);
    std::fs::remove_file(cold0(&m)).unwrap();
    let e = err(&m);
    assert!(e.contains("blk.000.cold.bin") && e.contains("No such file"), "{e}");

    // Wrong magic.
    let m = fresh("magic", &good);
    let mut bytes = std::fs::read(cold0(&m)).unwrap();
    bytes[..8].copy_from_slice(b"NOTSAGE!");
    std::fs::write(cold0(&m), &bytes).unwrap();
    let e = err(&m);
    assert!(e.contains("blk.000.cold.bin") && e.contains("no SAGEXPRT magic"), "{e}");

    // Another layer's cold shard under this name.
    let m = fresh("layer", &good);
    std::fs::copy(m.join("experts/blk.001.cold.bin"), cold0(&m)).unwrap();
    let e = err(&m);
    assert!(e.contains("blk.000.cold.bin") && e.contains("layer 1, base.gguf says 0"), "{e}");

    // The full records' shard under the cold name (same size: the cold type is the full one).
    let m = fresh("kind", &same_type);
    std::fs::copy(m.join("experts/blk.000.bin"), cold0(&m)).unwrap();
    let e = err(&m);
    assert!(e.contains("blk.000.cold.bin") && e.contains("kind full records, base.gguf says cold records"), "{e}");

    // A cold shard of another conversion (the same cold type, so the same size).
    let m = fresh("foreign", &good);
    std::fs::copy(cold0(&same_type), cold0(&m)).unwrap();
    let e = err(&m);
    assert!(e.contains("blk.000.cold.bin") && e.contains("different conversions"), "{e}");

    // The undamaged ones open.
    ModelDir::open(&good).unwrap();
    ModelDir::open(&same_type).unwrap();
}

/// A directory without cold keys (every conversion before cold copies existed) opens as
/// before; merge writes the full-precision model whether or not there are cold copies.
#[test]
fn without_cold_keys_a_directory_opens_and_merge_ignores_cold_copies() {
    let dir = tmp();
    let (plain_dir, _) = convert_cold(dir.path(), "plain", GgmlType::Q8_0, None);
    let m = ModelDir::open(&plain_dir).unwrap();
    assert!(!m.has_cold() && m.manifest.cold.is_empty() && m.cold_bytes() == 0);
    let names: Vec<String> = std::fs::read_dir(plain_dir.join("experts"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains("cold")), "{names:?}");

    let (cold_dir, _) = convert_cold(dir.path(), "cold", GgmlType::Q8_0, Some(GgmlType::Q2_K));
    let (a, b) = (dir.path().join("plain.gguf"), dir.path().join("cold.gguf"));
    merge(&plain_dir, &a, false).unwrap();
    merge(&cold_dir, &b, false).unwrap();
    // The same tensors, the same bytes (the metadata differs only in the conversion id).
    let (ga, gb) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    assert_eq!(ga.len(), gb.len());
    let differing = ga.iter().zip(&gb).filter(|(x, y)| x != y).count();
    assert!(differing <= 32, "{differing} bytes differ between the merges");
}

#[test]
fn inspect_and_footprint_report_the_cold_copies() {
    let dir = tmp();
    let (out, r) = convert_cold(dir.path(), "m", GgmlType::Q8_0, Some(GgmlType::Q2_K));
    let i = sage::inspect::inspect(&out).unwrap();
    assert_eq!(i.cold_bytes, r.cold_bytes);
    assert_eq!(i.cold_types["q2_K"].count, 2 * 8 * 3);
    let text = i.to_string();
    assert!(text.contains("cold copies") && text.contains("q2_K: 48 projections"), "{text}");

    let f = footprint(&out, &FootprintOptions::default()).unwrap();
    let m = f.measured.as_ref().unwrap();
    assert!(m.agree, "{f}");
    let files: u64 =
        (0..2).map(|il| std::fs::metadata(out.join(format!("experts/blk.{il:03}.cold.bin"))).unwrap().len()).sum();
    assert_eq!(m.cold_shard_file_bytes, Some(files));
    assert_eq!(m.cold_shard_computed_bytes, Some(files));
    let c = f.cold.as_ref().expect("a directory with cold copies reports them");
    assert_eq!((c.quant.as_str(), c.shard_bytes), ("q2_k", files));
    assert!(f.to_string().contains("cold copies at q2_k"), "{f}");
    // From config.json alone, with --cold-quant: the same bytes.
    let o = FootprintOptions { cold: Some(GgmlType::Q2_K), ..Default::default() };
    let fc = footprint(&plain().join("config.json"), &o).unwrap();
    assert_eq!(fc.cold.as_ref().unwrap(), c);
    assert!(footprint(&plain().join("config.json"), &FootprintOptions::default()).unwrap().cold.is_none());

    // The CLIs.
    let run = |bin: &str, args: &[&str]| {
        let o = Command::new(bin).args(args).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let cli_out = dir.path().join("cli");
    let src = plain();
    let args = [src.to_str().unwrap(), "-o", cli_out.to_str().unwrap(), "--quant", "q8_0", "--cold-quant", "q4_0"];
    let stdout = run(env!("CARGO_BIN_EXE_sage-convert"), &args);
    assert!(stdout.contains("cold copies:"), "{stdout}");
    assert_eq!(ModelDir::open(&cli_out).unwrap().manifest.cold[1].types, [GgmlType::Q4_0; 3]);
    let stdout = run(
        env!("CARGO_BIN_EXE_sage"),
        &["footprint", plain().join("config.json").to_str().unwrap(), "--cold-quant", "q4_0"],
    );
    assert!(stdout.contains("cold copies at q4_0"), "{stdout}");
}
