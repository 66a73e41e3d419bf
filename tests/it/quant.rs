//! Quantized content against its source, for every type sage writes: each tensor of a
//! converted model, dequantized by ggml, against the checkpoint's own weights read here
//! straight from the safetensors file (bf16 → f32 by hand, names mapped by hand: nothing of
//! sage's reader), row by row; and ggml's quantizers on llama.cpp's own test data within
//! llama.cpp's own bounds.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::SafeTensors;
use sage::ggml::{dequantize, quantize, GgmlType, Gguf};
use sage::model_dir::ModelDir;

use crate::util::*;

/// llama.cpp's tests/test-quantize-fns.cpp: the "total error" sqrt(Σ(x - x̂)²) / n of a
/// quantize → dequantize round trip of its test data must stay below these (n = 4096).
const LLAMA_TOTAL_ERROR: f64 = 0.002; // MAX_QUANTIZATION_TOTAL_ERROR: every type but these:
const LLAMA_TOTAL_ERROR_3BITS: f64 = 0.0040; // MAX_QUANTIZATION_TOTAL_ERROR_3BITS: q3_K
const LLAMA_TOTAL_ERROR_2BITS: f64 = 0.0075; // MAX_QUANTIZATION_TOTAL_ERROR_2BITS: q2_K
/// Its test data: 0.1 + 2 cos(i + offset), 32 × 128 values.
const LLAMA_TEST_SIZE: usize = 32 * 128;

fn llama_bound(ty: GgmlType) -> f64 {
    match ty {
        GgmlType::Q3_K => LLAMA_TOTAL_ERROR_3BITS,
        GgmlType::Q2_K => LLAMA_TOTAL_ERROR_2BITS,
        _ => LLAMA_TOTAL_ERROR,
    }
}

/// The bound on one row of a real tensor: the RMS of its error relative to the RMS of the
/// row. f16 and bf16 round each value to the nearest one they hold: a relative error of at
/// most their unit roundoff, 2^-11 and 2^-8, so no larger an RMS. f32 is a copy: 0. A block
/// quantizer's error is a share of each block's range, so its relative RMS error depends on
/// the weights' distribution, not their scale; trained and random weights are near Gaussian,
/// and the bound is 1.5 times the worst row ggml's quantizer gives on 256 rows of 256 N(0, 1)
/// values (`gaussian_worst_row`, checked by `bounds_are_half_again_the_worst_gaussian_row`):
/// q8_0 0.0064, q6_K 0.021, q5_K 0.041, q4_K 0.082, q4_0 0.101, q3_K 0.175, q2_K 0.346.
/// (llama.cpp's total-error bounds above, turned into a relative RMS error on its cosine data,
/// are 0.090 / 0.181 / 0.339: Gaussian rows, with their rarer large values, need more for
/// q4_0, q3_K and q2_K.) Two rows swapped give about 1.4; a block scaled by 2, about 1.
fn row_bound(ty: GgmlType) -> f64 {
    match ty {
        GgmlType::F32 => 0.0,
        GgmlType::F16 => 2f64.powi(-11),
        GgmlType::BF16 => 2f64.powi(-8),
        GgmlType::Q8_0 => 0.0096,
        GgmlType::Q6_K => 0.032,
        GgmlType::Q5_K => 0.062,
        GgmlType::Q4_K => 0.123,
        GgmlType::Q4_0 => 0.153,
        GgmlType::Q3_K => 0.263,
        GgmlType::Q2_K => 0.52,
        other => panic!("no bound for {other}"),
    }
}

/// The worst row's relative RMS error of a quantize → dequantize round trip through ggml on
/// 256 rows of 256 N(0, 1) values (a fixed seed: the same every run).
fn gaussian_worst_row(ty: GgmlType) -> f64 {
    let mut state = 1u64;
    let mut uniform = || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let data: Vec<f32> = (0..256 * 256)
        .map(|_| ((-2.0 * uniform().ln()).sqrt() * (2.0 * std::f64::consts::PI * uniform()).cos()) as f32)
        .collect();
    let back = dequantize(ty, &quantize(ty, &data, 256).unwrap(), 256).unwrap();
    check_rows(&back, &data, 256, f64::INFINITY).unwrap()
}

/// Every row of `got` (dequantized) against `want` (the source), rows of `ne0`: the largest
/// relative RMS error, or the first row over `bound`.
fn check_rows(got: &[f32], want: &[f32], ne0: usize, bound: f64) -> Result<f64, String> {
    if got.len() != want.len() {
        return Err(format!("{} values, source has {}", got.len(), want.len()));
    }
    let mut worst = 0f64;
    for (r, (g, w)) in got.chunks(ne0).zip(want.chunks(ne0)).enumerate() {
        let err: f64 = g.iter().zip(w).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum::<f64>();
        let norm: f64 = w.iter().map(|b| (*b as f64).powi(2)).sum::<f64>();
        let rel = if norm == 0.0 { err.sqrt() } else { (err / norm).sqrt() };
        if rel > bound {
            return Err(format!("row {r}: relative RMS error {rel:.4} > {bound:.4}"));
        }
        worst = worst.max(rel);
    }
    Ok(worst)
}

/// The fixture checkpoint's tensors as f32, by llama.cpp name (experts as
/// `blk.N.ffn_{gate,up,down}.E`), read from model.safetensors with the safetensors crate.
fn source_f32(dir: &Path) -> BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        assert_eq!(view.dtype(), safetensors::Dtype::BF16, "{name}");
        let f: Vec<f32> =
            view.data().chunks(2).map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)).collect();
        let llama = if let Some(rest) = name.strip_prefix("model.layers.") {
            let (il, rest) = rest.split_once('.').unwrap();
            let part = match rest {
                "input_layernorm.weight" => "attn_norm.weight".to_string(),
                "post_attention_layernorm.weight" => "ffn_norm.weight".to_string(),
                "self_attn.q_proj.weight" => "attn_q.weight".to_string(),
                "self_attn.k_proj.weight" => "attn_k.weight".to_string(),
                "self_attn.v_proj.weight" => "attn_v.weight".to_string(),
                "self_attn.o_proj.weight" => "attn_output.weight".to_string(),
                "self_attn.q_norm.weight" => "attn_q_norm.weight".to_string(),
                "self_attn.k_norm.weight" => "attn_k_norm.weight".to_string(),
                "mlp.gate.weight" => "ffn_gate_inp.weight".to_string(),
                e => {
                    let (e, proj) = e.strip_prefix("mlp.experts.").unwrap().split_once('.').unwrap();
                    let proj = proj.strip_suffix("_proj.weight").unwrap();
                    format!("ffn_{proj}.{e}")
                }
            };
            format!("blk.{il}.{part}")
        } else {
            match name.as_str() {
                "model.embed_tokens.weight" => "token_embd.weight".into(),
                "model.norm.weight" => "output_norm.weight".into(),
                "lm_head.weight" => "output.weight".into(),
                other => panic!("unexpected tensor {other}"),
            }
        };
        out.insert(llama, f);
    }
    out
}

/// Every tensor of the model directory `out` as (name, stored type, row length, dequantized
/// values): base.gguf's, and each expert record's three matrices.
fn converted_f32(out: &Path) -> Vec<(String, GgmlType, usize, Vec<f32>)> {
    let base = out.join("base.gguf");
    let g = Gguf::open(&base).unwrap();
    let bytes = std::fs::read(&base).unwrap();
    let at = g.data_offset() as usize;
    let mut v = Vec::new();
    for t in g.tensors() {
        let ty = t.ty.unwrap();
        let data = &bytes[at + t.offset as usize..at + (t.offset + t.size) as usize];
        v.push((t.name.clone(), ty, t.ne[0] as usize, dequantize(ty, data, t.ne[0]).unwrap()));
    }
    let m = ModelDir::open(out).unwrap();
    for (il, layer) in m.manifest.layers.iter().enumerate() {
        for &e in &layer.ids {
            let rec = m.read_expert(il as u32, e).unwrap();
            let mut at = 0usize;
            for (p, name) in ["gate", "up", "down"].iter().enumerate() {
                let (ty, ne0, size) = (layer.types[p], layer.shapes[p][0], layer.sizes()[p] as usize);
                v.push((
                    format!("blk.{il}.ffn_{name}.{e}"),
                    ty,
                    ne0 as usize,
                    dequantize(ty, &rec[at..at + size], ne0).unwrap(),
                ));
                at += size;
            }
        }
    }
    v
}

#[test]
fn ggml_quantizers_meet_llama_cpps_bounds_on_llama_cpps_data() {
    for (name, ty) in sage::quant::QUANT_NAMES {
        if matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
            continue;
        }
        for offset in [0.0f32, 1.0, 100.0] {
            let data: Vec<f32> = (0..LLAMA_TEST_SIZE).map(|i| 0.1 + 2.0 * (i as f32 + offset).cos()).collect();
            let q = quantize(ty, &data, LLAMA_TEST_SIZE as u64).unwrap();
            let back = dequantize(ty, &q, LLAMA_TEST_SIZE as u64).unwrap();
            let sum: f64 = data.iter().zip(&back).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum();
            let total = sum.sqrt() / LLAMA_TEST_SIZE as f64;
            assert!(total < llama_bound(ty), "{name} offset {offset}: total error {total} >= {}", llama_bound(ty));
        }
    }
}

#[test]
fn every_type_holds_its_source_weights_row_by_row() {
    let dir = tmp();
    let src = source_f32(&plain());
    let mut report = String::new();
    for (name, ty) in sage::quant::QUANT_NAMES {
        let out = dir.path().join(name);
        sage::convert::convert(&plain(), &out, &opts(Some(ty))).unwrap();
        let tensors = converted_f32(&out);
        assert_eq!(tensors.len(), src.len(), "{name}: every source tensor, once");
        let mut worst: BTreeMap<GgmlType, f64> = BTreeMap::new();
        for (t, stored, ne0, got) in &tensors {
            let want = src.get(t).unwrap_or_else(|| panic!("{name}: {t} has no source"));
            // Norms and the router stay f32 whatever the type asked; f32 copies bf16 exactly.
            if matches!(t.as_str(), n if n.contains("norm") || n.contains("ffn_gate_inp")) {
                assert_eq!(*stored, GgmlType::F32, "{name} {t}");
            } else {
                assert_eq!(*stored, ty, "{name} {t}");
            }
            let e = check_rows(got, want, *ne0, row_bound(*stored)).unwrap_or_else(|e| panic!("{name} {t}: {e}"));
            let w = worst.entry(*stored).or_default();
            *w = w.max(e);
        }
        for (ty, w) in &worst {
            report.push_str(&format!("{name}: {} rows within {:.5}, worst {w:.5}\n", ty.name(), row_bound(*ty)));
        }
    }
    println!("{report}");
}

#[test]
fn bounds_are_half_again_the_worst_gaussian_row() {
    for (name, ty) in sage::quant::QUANT_NAMES {
        if matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
            continue;
        }
        let ratio = row_bound(ty) / gaussian_worst_row(ty);
        assert!(
            (1.45..1.55).contains(&ratio),
            "{name}: bound {} is {ratio:.3} x the Gaussian worst row",
            row_bound(ty)
        );
    }
    // f16 and bf16 stay within their unit roundoff on Gaussian rows too.
    assert!(gaussian_worst_row(GgmlType::F16) <= row_bound(GgmlType::F16));
    assert!(gaussian_worst_row(GgmlType::BF16) <= row_bound(GgmlType::BF16));
}

/// The check fails on what a layout bug would do: two rows swapped, a block's scale wrong,
/// rows of the wrong length.
#[test]
fn the_row_check_catches_swapped_rows_and_wrong_scales() {
    let dir = tmp();
    let src = source_f32(&plain());
    let (out, _) = convert_into(&plain(), dir.path(), &opts(Some(GgmlType::Q4_K)));
    let (t, ty, ne0, got) = converted_f32(&out).into_iter().find(|t| t.0 == "blk.1.ffn_down.5").unwrap();
    let want = &src[&t];
    assert!(check_rows(&got, want, ne0, row_bound(ty)).is_ok());
    let mut swapped = got.clone();
    for i in 0..ne0 {
        swapped.swap(3 * ne0 + i, 7 * ne0 + i);
    }
    let e = check_rows(&swapped, want, ne0, row_bound(ty)).unwrap_err();
    assert!(e.starts_with("row 3:"), "{e}");
    let mut scaled = got.clone();
    scaled[10 * ne0..10 * ne0 + 32].iter_mut().for_each(|x| *x *= 2.0);
    assert!(check_rows(&scaled, want, ne0, row_bound(ty)).unwrap_err().starts_with("row 10:"));
    let mut shifted = got.clone();
    shifted.rotate_left(1);
    assert!(check_rows(&shifted, want, ne0, row_bound(ty)).is_err());
}

/// A copy of the Qwen3 fixture whose experts are `ff` wide (the first `ff` rows of gate and
/// up, the first `ff` columns of down), so that down's rows are `ff` long.
fn narrow_experts(dir: &Path, ff: usize) -> std::path::PathBuf {
    let c = dir.join(format!("ff{ff}"));
    copy_dir(&plain(), &c);
    let cfg = std::fs::read_to_string(c.join("config.json")).unwrap();
    std::fs::write(
        c.join("config.json"),
        cfg.replace("\"moe_intermediate_size\": 256", &format!("\"moe_intermediate_size\": {ff}")),
    )
    .unwrap();
    rewrite_safetensors(&c.join("model.safetensors"), |m| {
        for (name, (_, shape, bytes)) in m.iter_mut() {
            if name.contains("mlp.experts.") {
                let (rows, cols) = (shape[0], shape[1]);
                if name.ends_with("down_proj.weight") {
                    *bytes = bytes.chunks(cols * 2).flat_map(|r| r[..ff * 2].to_vec()).collect();
                    *shape = vec![rows, ff];
                } else {
                    bytes.truncate(ff * cols * 2);
                    *shape = vec![ff, cols];
                }
            }
        }
    });
    c
}

/// The block-size fallback: expert down matrices whose rows (96, 80 long) do not fit a
/// k-quant's 256-wide blocks get the nearest type that fits (q4_K → q5_0, q6_K → q8_0; rows
/// that fit no 32-wide block either → f16), the report names each such tensor, the records
/// hold that type, its values are the source's within 1.5× the type's worst Gaussian row (as
/// `row_bound`), and the merged file gives llama.cpp's logits in sage (bit-identical with every
/// expert resident; `engine_tol` streaming).
#[test]
fn rows_that_do_not_fit_fall_back_to_a_type_that_fits_and_are_named() {
    use sage::engine::{ArenaSize, Engine};
    let dir = tmp();
    for (ff, asked, got) in [
        (96, GgmlType::Q4_K, GgmlType::Q5_0),
        (96, GgmlType::Q6_K, GgmlType::Q8_0),
        (80, GgmlType::Q4_K, GgmlType::F16),
    ] {
        let ckpt = narrow_experts(dir.path(), ff);
        let out = dir.path().join(format!("m-{ff}-{asked}"));
        let r = sage::convert::convert(&ckpt, &out, &opts(Some(asked))).unwrap();
        for il in 0..2 {
            let want =
                format!("blk.{il}.ffn_down_exps.weight: rows of {ff} do not fit {asked} blocks of 256; using {got}");
            assert!(r.fallbacks.contains(&want), "{want} not in {:?}", r.fallbacks);
        }
        assert_eq!(r.fallbacks.len(), 2, "only the down matrices fall back: {:?}", r.fallbacks);
        let m = ModelDir::open(&out).unwrap();
        assert!(m.manifest.layers.iter().all(|l| l.types == [asked, asked, got]), "{:?}", m.manifest.layers[0].types);
        // The fallen-back rows hold the source's values.
        let src = source_f32(&ckpt);
        let bound = if got == GgmlType::F16 { row_bound(got) } else { 1.5 * gaussian_worst_row(got) };
        for (t, ty, ne0, values) in converted_f32(&out).iter().filter(|t| t.0.contains("ffn_down.")) {
            assert_eq!((*ty, *ne0), (got, ff), "{t}");
            check_rows(values, &src[t], ff, bound).unwrap_or_else(|e| panic!("{ff} {asked} {t}: {e}"));
        }
        // llama.cpp runs the merged file, and sage gives its logits.
        let gguf = dir.path().join(format!("m-{ff}-{asked}.gguf"));
        sage::merge::merge(&out, &gguf, false).unwrap();
        let llama = load_llama(&gguf);
        let ids: Vec<i32> = reference()[3].ids.clone();
        let want = llama_logits(&llama, &ids);
        let ids_u: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        for arena in [ArenaSize::All, ArenaSize::Experts(2)] {
            let mut e = Engine::load(&out, exact(arena)).unwrap();
            let got_logits = rows(e.eval(&ids_u, true).unwrap(), 512);
            let d = per_position(&got_logits, &want);
            let streaming = arena != ArenaSize::All;
            eprintln!("ff {ff}, {asked} → {got}, {arena:?}: |sage - llama.cpp| {:e}", worst(&d));
            assert!(within_engine_tol(&d, asked, streaming, false), "{ff} {asked} {arena:?}: {d:?}");
        }
    }
}
