//! `--memory` holds under a real memory limit: a one-layer model of Qwen3-30B-A3B's shapes
//! (`sage-convert synth --layers 1`: its 151k-token embeddings and output, 128 experts) runs a
//! prompt that fills the context inside a memory cgroup (v1 here: `memory.limit_in_bytes`;
//! v2's `memory.max` the same way) whose limit is what `--memory` is given: the smallest
//! total that holds the model plus a quarter of its experts. No OOM kill, the cgroup's peak
//! within the limit, the arena streaming. Needs root (CI runs as root); the cgroup is
//! `reliability::MemCgroup`.

use std::process::Command;

use crate::reliability::MemCgroup;
use crate::util::*;

fn sage() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sage"))
}

/// Run `cmd` inside the cgroup (a shell moves itself in, then execs it).
fn run_in(cg: &MemCgroup, cmd: &Command) -> std::process::Output {
    let mut sh = Command::new("sh");
    sh.arg("-c").arg(format!("echo $$ > {}/cgroup.procs && exec \"$@\"", cg.path.display())).arg("sh");
    sh.arg(cmd.get_program()).args(cmd.get_args());
    sh.output().unwrap()
}

/// The smallest `--memory` sage accepts for these arguments (with a one-token prompt: the
/// budget depends on the context, not the prompt). Its error says it: first from what it
/// knows before loading, then, given that, from the compute buffer measured on the graphs.
fn smallest_memory(args: &[&str]) -> u64 {
    let mut size = 1u64;
    for _ in 0..4 {
        let s = size.to_string();
        let out = sage().args(args).args(["--prompt", "hi", "-n", "1", "--memory", &s]).output().unwrap();
        if out.status.success() {
            return size;
        }
        let err = String::from_utf8_lossy(&out.stderr);
        let at = err.find("give --memory ").unwrap_or_else(|| panic!("no smallest size in: {err}"));
        let next: u64 = err[at + 14..].split_whitespace().next().unwrap().parse().unwrap();
        assert!(next > size, "sage asked for {next} after refusing {size}: {err}");
        // The process's own memory, part of the total, differs by a few hundred KiB from
        // one start to the next.
        size = next + (1 << 20);
    }
    panic!("no size accepted after 4 tries (last {size})");
}

#[test]
fn memory_budget_holds_under_a_cgroup_limit() {
    let dir = tmp();
    let model = dir.path().join("q30-1");
    let st = Command::new(env!("CARGO_BIN_EXE_sage-convert"))
        .args(["synth", "--like", "qwen3-30b-a3b", "--quant", "q4_k", "--layers", "1", "-o"])
        .arg(&model)
        .status()
        .unwrap();
    assert!(st.success());
    let experts = sage::model_dir::ModelDir::open(&model).unwrap().expert_bytes();
    let m = model.to_str().unwrap();
    let words = |n: usize| vec!["the quick brown fox jumps over the lazy dog"; n].join(" ");
    // (context, prompt, flash attention, K type, V type): prompts of about 97% of the context.
    let cases = [
        (4096, words(440), "on", "f16", "f16"),
        (4096, words(440), "on", "q8_0", "q8_0"),
        (4096, words(440), "off", "f16", "f16"),
        (4096, words(440), "off", "q8_0", "f16"),
        (16384, words(1780), "on", "f16", "f16"),
        (16384, words(1780), "off", "q8_0", "f16"),
    ];
    for (i, (ctx, prompt, fa, k, v)) in cases.iter().enumerate() {
        let ctx = ctx.to_string();
        let engine = [
            "run",
            m,
            "--ctx",
            &ctx,
            "--flash-attn",
            fa,
            "--cache-type-k",
            k,
            "--cache-type-v",
            v,
            "-t",
            "2",
            "--temp",
            "0",
        ];
        let limit = smallest_memory(&engine) + experts / 4;
        let mut args = engine.to_vec();
        args.extend(["--prompt", prompt.as_str(), "-n", "4", "--json"]);
        let cg = MemCgroup::new(&format!("-budget-{i}"), limit);
        let limit_s = limit.to_string();
        let mut cmd = sage();
        cmd.args(args).args(["--memory", &limit_s]);
        let out = run_in(&cg, &cmd);
        let (peak, (oom_kills, events)) = (cg.peak(), cg.oom_kills());
        let err = String::from_utf8_lossy(&out.stderr);
        eprintln!(
            "ctx {ctx} fa {fa} K {k} V {v}: limit {limit}, cgroup peak {peak} ({:.3} of it)",
            peak as f64 / limit as f64
        );
        // Killed by the OOM killer: no exit code (signal 9).
        assert!(
            out.status.success(),
            "ctx {ctx} fa {fa} K {k} V {v}: {:?} (OOM kill if no code)\n{err}",
            out.status.code()
        );
        assert!(peak <= limit, "peak {peak} over the limit {limit}");
        assert_eq!(oom_kills, 0, "{events}");
        let last: serde_json::Value =
            serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
        let json = &last["stats"];
        assert!(json["prompt_tokens"].as_u64().unwrap() > (ctx.parse::<u64>().unwrap() * 9 / 10));
        assert_eq!(json["all_resident"], false, "a quarter of the experts streams");
        assert!(json["expert_misses"].as_u64().unwrap() > 0);
        assert!(json["memory"]["compute_reserved"].as_u64().unwrap() > 0);
    }
}
