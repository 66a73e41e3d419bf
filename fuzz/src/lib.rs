//! Helpers shared by sage's fuzz targets: a scratch directory per process (on tmpfs where
//! there is one) and the files of a micro model (1 layer, n_embd 32, 4 experts, q8_0) made by
//! `fuzz/make-seeds`, so a target can replace one file of a valid model with the fuzzer's bytes.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The micro model's Hugging Face `config.json` (the input of `sage-convert synth`).
pub const MICRO_CONFIG: &[u8] = include_bytes!("../micro/config.json");
/// The micro model converted by sage: base.gguf and its one expert shard.
pub const MICRO_BASE: &[u8] = include_bytes!("../micro/model/base.gguf");
pub const MICRO_SHARD: &[u8] = include_bytes!("../micro/model/experts/blk.000.bin");
pub const MICRO_SHARD_NAME: &str = "experts/blk.000.bin";
/// The tokenizer of sage's tiny test fixture (512 tokens, byte-level BPE, Qwen2 split).
pub const TOKENIZER_JSON: &[u8] = include_bytes!("../../tests/fixtures/tiny-qwen3moe/tokenizer.json");
pub const TOKENIZER_CONFIG_JSON: &[u8] = include_bytes!("../../tests/fixtures/tiny-qwen3moe/tokenizer_config.json");
/// The Mixtral fixture's tokenizer_config.json (its release chat template).
pub const MIXTRAL_TOKENIZER_CONFIG: &[u8] = include_bytes!("../../tests/fixtures/tiny-mixtral/tokenizer_config.json");
/// The chat template references (scripts/make_chat_references.py), with the features template.
pub const CHAT_REFERENCES: &[u8] = include_bytes!("../../tests/fixtures/chat-templates.json");

/// A directory of this process's own, created once: `/dev/shm/sage-fuzz-<target>-<pid>`
/// (`$TMPDIR` where there is no /dev/shm). `fuzz/run` removes them.
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let root = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
        let target = std::env::args()
            .next()
            .and_then(|a| Path::new(&a).file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_default();
        let dir = root.join(format!("sage-fuzz-{target}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the scratch directory");
        dir
    })
}

/// An empty directory `name` under [`scratch`].
pub fn fresh_dir(name: &str) -> PathBuf {
    let dir = scratch().join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create a scratch subdirectory");
    dir
}

/// Write `files` (relative path, bytes) into a fresh directory `name`.
pub fn dir_with(name: &str, files: &[(&str, &[u8])]) -> PathBuf {
    let dir = fresh_dir(name);
    for (rel, bytes) in files {
        let p = dir.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("create a scratch subdirectory");
        }
        std::fs::write(&p, bytes).expect("write a scratch file");
    }
    dir
}

/// The input as text, for targets whose files sage reads as UTF-8 (anything else is refused
/// by `read_to_string` before sage's parser sees it).
pub fn text(data: &[u8]) -> Option<&str> {
    std::str::from_utf8(data).ok()
}

/// libFuzzer's panic hook aborts on every panic, even one that is caught. sage catches the
/// panics of the tokenizers crate (which panics on some damaged files) and reports them as
/// errors, so those are let through to sage's `catch_unwind`; any other panic still aborts,
/// and a tokenizers panic that sage does not catch still reaches libFuzzer's own
/// `catch_unwind`, which aborts too.
pub fn init() {
    let libfuzzer_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let in_tokenizers = info.location().is_some_and(|l| l.file().contains("/tokenizers-"));
        if !in_tokenizers {
            libfuzzer_hook(info);
        }
    }));
}
