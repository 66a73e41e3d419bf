//! Copy the metadata keys of a GGUF whose names start with a prefix into a new GGUF with no
//! tensors: a small file holding one part of a model (its tokenizer, say), as fuzz/make-seeds
//! uses it for the `gguf_tokenizer` target's seeds.
//!
//!     cargo run --release --example gguf_meta -- IN.gguf PREFIX OUT.gguf

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    anyhow::ensure!(a.len() == 4, "usage: gguf_meta IN.gguf PREFIX OUT.gguf");
    let src = sage::ggml::Gguf::open(a[1].as_ref())?;
    let mut out = sage::ggml::Gguf::new_empty();
    for k in src.keys().into_iter().filter(|k| k.starts_with(&a[2])) {
        out.set(&k, &src.get(&k).expect("a listed key"))?;
    }
    std::fs::write(&a[3], out.meta_bytes())?;
    Ok(())
}
