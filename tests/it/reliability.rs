//! Hazards of real use: several processes on one model, damaged weights that still parse.

use std::process::{Command, Stdio};

use sage::ggml::{GgmlType, Gguf};

use crate::util::*;

/// Two `sage run` processes on the same model directory at the same time both work and
/// produce the same greedy text (shards are only ever opened read-only). The runs overlap:
/// both processes are seen holding the same shard open at one moment.
#[test]
fn two_processes_share_a_model_directory() {
    let dir = tmp();
    let (model_dir, _) = convert_into(&plain(), dir.path(), &opts(Some(GgmlType::Q8_0)));
    let shard = std::fs::canonicalize(model_dir.join("experts/blk.000.bin")).unwrap();
    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_sage"))
            .args(["run", model_dir.to_str().unwrap(), "-p", "The quick brown fox", "--temp", "0", "-n", "400"])
            .args(["--arena-experts", "2", "--threads", "1", "--ctx", "512"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let holds_shard = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.flatten().any(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == shard)))
            .unwrap_or(false)
    };
    let (a, b) = (spawn(), spawn());
    let (pa, pb) = (a.id(), b.id());
    let t0 = std::time::Instant::now();
    let mut overlapped = false;
    while !overlapped && t0.elapsed() < std::time::Duration::from_secs(30) {
        overlapped = holds_shard(pa) && holds_shard(pb);
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    for o in [&a, &b] {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert!(overlapped, "the two runs never held the shard open at the same time");
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

/// base.gguf with one manifest key changed (the tensor data kept as it is).
fn with_manifest_key(model_dir: &std::path::Path, key: &str, value: sage::ggml::GgufValue) {
    let base = model_dir.join("base.gguf");
    let bytes = std::fs::read(&base).unwrap();
    let mut g = Gguf::open(&base).unwrap();
    let data = g.data_offset() as usize;
    g.set(key, &value).unwrap();
    let mut out = g.meta_bytes();
    out.extend_from_slice(&bytes[data..]);
    std::fs::write(&base, out).unwrap();
}

/// A manifest that points outside sage's layout, at the wrong offsets, or at unknown types
/// is refused when the model opens, naming the key.
#[test]
fn damaged_expert_manifest_is_refused() {
    use sage::ggml::{GgufArray, GgufValue};
    use sage::model_dir::ModelDir;
    let dir = tmp();
    let (model_dir, _) = convert_into(&plain(), dir.path(), &opts(Some(GgmlType::Q8_0)));
    let pristine = std::fs::read(model_dir.join("base.gguf")).unwrap();
    let stride = ModelDir::open(&model_dir).unwrap().manifest.layers[0].stride();
    let cases: Vec<(&str, GgufValue, &str)> = vec![
        (
            "sage.experts.blk.0.file",
            GgufValue::Str("../../../../etc/passwd".into()),
            "'sage.experts.blk.0.file': expected 'experts/blk.000.bin', got '../../../../etc/passwd'",
        ),
        (
            "sage.experts.blk.1.offsets",
            GgufValue::Array(GgufArray::U64((0..8).map(|i| 4096 + (i + 1) * stride).collect())),
            "offset 212992 of expert 0 is not where its record lies",
        ),
        (
            "sage.experts.blk.1.offsets",
            GgufValue::Array(GgufArray::U64(vec![4096; 8])),
            "of expert 1 is not where its record lies",
        ),
        (
            "sage.experts.blk.0.types",
            GgufValue::Array(GgufArray::U32(vec![8, 999, 8])),
            "'sage.experts.blk.0.types': unknown ggml type id",
        ),
        (
            // i32 (26) is a type ggml knows, but has no dot product to multiply with.
            "sage.experts.blk.0.types",
            GgufValue::Array(GgufArray::U32(vec![8, 26, 8])),
            "'sage.experts.blk.0.types': expected types ggml can multiply, got q8_0, i32, q8_0",
        ),
        (
            "sage.experts.blk.0.ids",
            GgufValue::Array(GgufArray::U32(vec![0, 1, 2, 3, 4, 5, 6, 9])),
            "expected ascending ids below 8",
        ),
        (
            // One expert where each token uses two: no top-2 to take.
            "sage.experts.blk.1.ids",
            GgufValue::Array(GgufArray::U32(vec![5])),
            "'sage.experts.blk.1.ids': expected at least the 2 experts each token uses, got a pool of 1",
        ),
        (
            "sage.experts.blk.0.shapes",
            GgufValue::Array(GgufArray::U64(vec![256, 256, 256, 256, 256, u64::MAX])),
            "'sage.experts.blk.0.shapes': expected",
        ),
        ("sage.format_version", GgufValue::U32(99), "'sage.format_version': expected 1 to 2, got U32(99)"),
    ];
    for (key, value, want) in cases {
        std::fs::write(model_dir.join("base.gguf"), &pristine).unwrap();
        with_manifest_key(&model_dir, key, value);
        let e = ModelDir::open(&model_dir).err().expect("a damaged manifest opened").to_string();
        assert!(e.contains("base.gguf") && e.contains(want), "{key}: {e}");
    }
}

/// Pages of `path` in the page cache (util-linux `fincore`).
fn cached_pages(path: &std::path::Path) -> u64 {
    let o = Command::new("fincore").args(["--bytes", "--noheadings", "--output", "PAGES"]).arg(path).output().unwrap();
    assert!(o.status.success(), "fincore: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).trim().parse().unwrap()
}

/// Expert bytes copied into the arena leave the page cache (unless --page-cache), so a
/// memory limit holds the arena and not a second copy of the experts; and the read path that
/// did it is the one meant: O_DIRECT (this machine's ext4 takes it) with the pages dropped
/// after each read, or with --page-cache positioned reads that keep them. With every expert
/// resident (loaded at start) and with a streaming arena.
#[test]
fn loaded_experts_leave_the_page_cache() {
    let dir = tmp();
    let (model_dir, _) = convert_into(&plain(), dir.path(), &opts(Some(GgmlType::Q8_0)));
    let shard = model_dir.join("experts/blk.000.bin");
    let run = |extra: &[&str]| {
        std::fs::read(&shard).unwrap(); // every page cached
        let all = cached_pages(&shard);
        let o = Command::new(env!("CARGO_BIN_EXE_sage"))
            .args(["run", model_dir.to_str().unwrap(), "-p", "The quick brown fox jumps over the lazy dog", "-n", "8"])
            // Flash attention off: the expert counts below are this prompt's routing without it.
            .args(["--json", "--flash-attn", "off"])
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let last = String::from_utf8_lossy(&o.stdout).lines().last().unwrap().to_string();
        let stats: serde_json::Value = serde_json::from_str(&last).unwrap();
        let r = &stats["stats"]["expert_reads"];
        let n = |k: &str| r[k].as_u64().unwrap_or_else(|| panic!("no {k}: {r}"));
        (all, cached_pages(&shard), (n("direct"), n("positioned"), n("dropped")))
    };
    for arena in [&[][..], &["--arena-experts", "2"][..]] {
        let (all, after, (direct, positioned, dropped)) = run(arena);
        // 8 experts of 51 pages each: a 12-token prompt loads most of them.
        assert!(after * 2 < all, "{arena:?}: {after} of {all} pages still cached");
        assert!(direct >= 8 && positioned == 0 && dropped == direct, "{arena:?}: {direct} / {positioned} / {dropped}");
        let (all, after, (direct, positioned, dropped)) = run(&[arena, &["--page-cache"]].concat());
        assert_eq!(after, all, "{arena:?}");
        assert!(direct == 0 && positioned >= 8 && dropped == 0, "{arena:?}: {direct} / {positioned} / {dropped}");
    }
}

/// What a `sage run` process holds beyond the engine's own parts (base, arena, KV, compute):
/// code, the tokenizer, the allocator's slack, page cache charged to it. `--stats` prints it
/// as "overhead"; docs/reliability.md states it.
const STATED_OVERHEAD: u64 = 32 << 20;

/// A memory-limited cgroup for one test (this machine runs tests as root), removed on drop:
/// cgroup v2 (the unified hierarchy: `memory.max`, `memory.peak`, `memory.events`) where
/// /sys/fs/cgroup is one, else v1's memory controller (`memory.limit_in_bytes`,
/// `memory.max_usage_in_bytes`, `memory.oom_control`).
pub(crate) struct MemCgroup {
    pub(crate) path: std::path::PathBuf,
    v2: bool,
}

impl MemCgroup {
    /// `tag` tells apart the groups of tests that run at once in this process.
    pub(crate) fn new(tag: &str, limit: u64) -> MemCgroup {
        let v2 = std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
        let root = if v2 { "/sys/fs/cgroup" } else { "/sys/fs/cgroup/memory" };
        let path = std::path::PathBuf::from(format!("{root}/sage-test-{}{tag}", std::process::id()));
        if v2 {
            // The memory controller must be enabled for the root's children.
            let _ = std::fs::write("/sys/fs/cgroup/cgroup.subtree_control", "+memory");
        }
        std::fs::create_dir(&path).unwrap_or_else(|e| {
            panic!("this test needs root and a cgroup memory controller ({}): {e}", path.display())
        });
        let limit_file = if v2 { "memory.max" } else { "memory.limit_in_bytes" };
        std::fs::write(path.join(limit_file), limit.to_string()).unwrap();
        if v2 {
            // No swap to hide in.
            let _ = std::fs::write(path.join("memory.swap.max"), "0");
        }
        MemCgroup { path, v2 }
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.path.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    /// Peak memory charged to the group (page cache included).
    pub(crate) fn peak(&self) -> u64 {
        self.read(if self.v2 { "memory.peak" } else { "memory.max_usage_in_bytes" }).trim().parse().unwrap()
    }

    /// OOM kills in the group, and the file that says so.
    pub(crate) fn oom_kills(&self) -> (u64, String) {
        let text = self.read(if self.v2 { "memory.events" } else { "memory.oom_control" });
        let n = text
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .unwrap_or_else(|| panic!("no oom_kill line: {text}"))
            .trim()
            .parse()
            .unwrap();
        (n, text)
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// `sage run` inside a memory cgroup limited to base + arena + KV + compute + the stated
/// overhead completes, and its peak (page cache included) stays under the limit.
#[test]
fn runs_inside_a_memory_cgroup_of_its_stated_budget() {
    let dir = tmp();
    let (model_dir, _) = convert_into(&plain(), dir.path(), &opts(Some(GgmlType::Q8_0)));
    let args = ["run", model_dir.to_str().unwrap(), "-p", "The quick brown fox", "-n", "32", "--temp", "0"];
    let args = [&args[..], &["--arena-experts", "4", "--ctx", "512", "--threads", "2", "--json"]].concat();
    let run = |cg: Option<&MemCgroup>| {
        let mut cmd = Command::new("sh");
        let join_cg = cg.map(|c| format!("echo $$ > {}/cgroup.procs && ", c.path.display())).unwrap_or_default();
        cmd.args(["-c", &format!("{join_cg}exec \"$0\" \"$@\""), env!("CARGO_BIN_EXE_sage")]).args(&args);
        let o = cmd.output().unwrap();
        let last = String::from_utf8_lossy(&o.stdout).lines().last().unwrap_or_default().to_string();
        (o, last)
    };
    let (o, last) = run(None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stats: serde_json::Value = serde_json::from_str(&last).unwrap();
    let m = &stats["stats"]["memory"];
    let part = |k: &str| m[k].as_u64().unwrap_or_else(|| panic!("no {k} in {m}"));
    // The parts against sizes computed here from the files and the options: base.gguf's
    // tensors (ggml's row size × rows), 4 slots of the shards' record stride plus up to a
    // page to align them, and an f16 K and V cache of 512 positions per layer.
    let md = sage::model_dir::ModelDir::open(&model_dir).unwrap();
    let g = Gguf::open(&model_dir.join("base.gguf")).unwrap();
    let base: u64 =
        g.tensors().iter().map(|t| t.ty.unwrap().row_size(t.ne[0]).unwrap() * t.ne[1..].iter().product::<u64>()).sum();
    let shard = std::fs::metadata(model_dir.join("experts/blk.000.bin")).unwrap().len();
    let stride = (shard - 4096) / 8;
    let c = &md.config;
    let kv = c.n_layer as u64 * 2 * 512 * (c.n_head_kv as u64 * c.head_dim) * 2;
    assert_eq!(part("base"), base);
    assert!(
        (4 * stride..=4 * stride + 4096).contains(&part("arena")),
        "arena {} for 4 slots of {stride}",
        part("arena")
    );
    assert_eq!(part("kv"), kv);
    let engine: u64 = ["base", "arena", "kv", "compute", "staging"].iter().map(|k| part(k)).sum();
    let overhead = stats["stats"]["overhead_bytes"].as_u64().unwrap();
    assert!(overhead < STATED_OVERHEAD, "overhead {overhead} is over the stated {STATED_OVERHEAD}");

    let limit = engine + STATED_OVERHEAD;
    let cg = MemCgroup::new("", limit);
    let (o, _) = run(Some(&cg));
    let (peak, (kills, events)) = (cg.peak(), cg.oom_kills());
    eprintln!(
        "cgroup {}: engine {engine} bytes + stated overhead {STATED_OVERHEAD} = limit {limit}; peak {peak}",
        if cg.v2 { "v2" } else { "v1" }
    );
    assert!(
        o.status.success(),
        "killed or failed under {limit} bytes: {}\n{events}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(peak <= limit && kills == 0, "peak {peak} over {limit}: {events}");
}
