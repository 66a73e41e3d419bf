//! Quantization types a user can ask for, and the fallback when a tensor's rows do not fit a
//! type's block size.

use crate::error::{Error, Result};
use crate::ggml::GgmlType;

/// The types `--quant` accepts, by the names users know from llama.cpp.
pub const QUANT_NAMES: [(&str, GgmlType); 10] = [
    ("f32", GgmlType::F32),
    ("f16", GgmlType::F16),
    ("bf16", GgmlType::BF16),
    ("q8_0", GgmlType::Q8_0),
    ("q6_k", GgmlType::Q6_K),
    ("q5_k", GgmlType::Q5_K),
    ("q4_k", GgmlType::Q4_K),
    ("q4_0", GgmlType::Q4_0),
    ("q3_k", GgmlType::Q3_K),
    ("q2_k", GgmlType::Q2_K),
];

/// Types `--quant` also accepts beyond `QUANT_NAMES` (which every table reports): gpt-oss's
/// experts as published, 4.25 bits per weight.
pub const EXTRA_QUANT_NAMES: [(&str, GgmlType); 1] = [("mxfp4", GgmlType::MXFP4)];

pub fn parse_quant(s: &str) -> Result<GgmlType> {
    let lower = s.to_ascii_lowercase();
    let all = || QUANT_NAMES.iter().chain(&EXTRA_QUANT_NAMES);
    all().find(|(n, _)| *n == lower).map(|(_, t)| *t).ok_or_else(|| {
        Error::Usage(format!(
            "unknown quant type '{s}'; expected one of {}",
            all().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
        ))
    })
}

/// The next type to try when rows don't fit `ty`'s blocks: the closest size with a 32-wide
/// block (as llama.cpp's quantizer falls back), then f16, which fits any row.
fn fallback(ty: GgmlType) -> GgmlType {
    match ty {
        GgmlType::Q2_K | GgmlType::Q3_K => GgmlType::Q4_0,
        GgmlType::Q4_K => GgmlType::Q5_0,
        GgmlType::Q5_K => GgmlType::Q5_1,
        GgmlType::Q6_K => GgmlType::Q8_0,
        _ => GgmlType::F16,
    }
}

/// `wanted` if rows of `ne0` fit it, else the nearest type that does.
pub fn fit(wanted: GgmlType, ne0: u64) -> GgmlType {
    let mut ty = wanted;
    while ty.row_size(ne0).is_none() {
        ty = fallback(ty);
    }
    ty
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_picks_a_type_that_fits() {
        assert_eq!(fit(GgmlType::Q4_K, 256), GgmlType::Q4_K);
        assert_eq!(fit(GgmlType::Q4_K, 96), GgmlType::Q5_0);
        assert_eq!(fit(GgmlType::Q6_K, 64), GgmlType::Q8_0);
        assert_eq!(fit(GgmlType::Q2_K, 48), GgmlType::F16);
        assert_eq!(fit(GgmlType::Q8_0, 33), GgmlType::F16);
        assert_eq!(parse_quant("Q4_K").unwrap(), GgmlType::Q4_K);
        assert!(parse_quant("q4_k_m").unwrap_err().to_string().contains("expected one of f32"));
    }
}
