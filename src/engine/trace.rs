//! The route trace: the experts routing chose, layer by layer, token after token (and on
//! request every router logit), recorded by the engine while `Some` (`Engine::start_trace`).
//! `usage` turns one into usage.json's counts; `sim` replays one through eviction policies.
//! A trace is saved as text (`save`, `open`) for `sage trace` and for trace-driven runs
//! (`EngineOptions::route_trace`): a header line `sage-route-trace 1 n_layer=L n_expert=E
//! n_expert_used=K n_tokens=T`, comment lines starting with `#`, then one line per token of
//! L×K expert ids, layer after layer.

use std::path::Path;

use crate::error::{Error, IoContext, Result};

const MAGIC: &str = "sage-route-trace";
const VERSION: u32 = 1;
const MAX_LAYERS: usize = 4096;
const MAX_EXPERTS: usize = 1 << 16;

/// The experts routing chose, per layer, token after token.
#[derive(Clone, Debug, Default)]
pub struct RouteTrace {
    pub n_layer: usize,
    pub n_expert: usize,
    pub n_expert_used: usize,
    /// `choices[il]` holds `n_expert_used` ids per token, tokens in order of evaluation.
    pub choices: Vec<Vec<u32>>,
    /// When recorded (`Engine::start_trace(true)`): `router_logits[il]` holds the router's
    /// `n_expert` logits per token, tokens in the order of `choices`.
    pub router_logits: Option<Vec<Vec<f32>>>,
    /// Recorded with `router_logits`: `predicted_logits[il]` (il ≥ 1) holds, per token, layer
    /// il's router applied to the residual stream before layer il−1's experts (the prediction
    /// prefetch reads ahead by); `predicted_logits[0]` stays empty.
    pub predicted_logits: Option<Vec<Vec<f32>>>,
}

impl RouteTrace {
    pub fn new(n_layer: usize, n_expert: usize, n_expert_used: usize) -> RouteTrace {
        RouteTrace {
            n_layer,
            n_expert,
            n_expert_used,
            choices: vec![Vec::new(); n_layer],
            router_logits: None,
            predicted_logits: None,
        }
    }

    /// Tokens recorded (counted in the last layer: a model's dense layers, which route
    /// nothing, are its first).
    pub fn n_tokens(&self) -> usize {
        self.choices.last().map_or(0, |c| c.len() / self.n_expert_used.max(1))
    }

    /// The experts token `t` chose in layer `il` (none in a dense layer).
    pub fn token(&self, il: usize, t: usize) -> &[u32] {
        let k = self.n_expert_used;
        self.choices[il].get(t * k..(t + 1) * k).unwrap_or(&[])
    }

    /// Share of a token's experts that the next token also uses, per layer.
    pub fn next_token_reuse(&self) -> Vec<f64> {
        (0..self.n_layer)
            .map(|il| {
                let (mut same, mut all) = (0u64, 0u64);
                for t in 1..self.n_tokens() {
                    let prev = self.token(il, t - 1);
                    same += self.token(il, t).iter().filter(|e| prev.contains(e)).count() as u64;
                    all += self.n_expert_used as u64;
                }
                if all == 0 {
                    0.0
                } else {
                    same as f64 / all as f64
                }
            })
            .collect()
    }

    /// Write the trace (its choices; router logits are not saved) to `path`, atomically, with
    /// `comment` lines after the header (e.g. where it came from).
    pub fn save(&self, path: &Path, comment: &str) -> Result<()> {
        use std::fmt::Write as _;
        if let Some(il) = (0..self.n_layer).find(|&il| self.choices[il].len() != self.n_tokens() * self.n_expert_used) {
            return Err(Error::Usage(format!(
                "{}: layer {il} routed no experts (a dense layer); the trace format has no place for it yet",
                path.display()
            )));
        }
        let mut text = format!(
            "{MAGIC} {VERSION} n_layer={} n_expert={} n_expert_used={} n_tokens={}\n",
            self.n_layer,
            self.n_expert,
            self.n_expert_used,
            self.n_tokens()
        );
        for line in comment.lines() {
            let _ = writeln!(text, "# {line}");
        }
        for t in 0..self.n_tokens() {
            let ids: Vec<String> =
                (0..self.n_layer).flat_map(|il| self.token(il, t).iter().map(|e| e.to_string())).collect();
            text.push_str(&ids.join(" "));
            text.push('\n');
        }
        let mut f = crate::io::AtomicFile::create(path)?;
        f.write(text.as_bytes())?;
        f.finish()
    }

    /// Read a trace `save` wrote; every line is checked (counts, ids in range, no expert
    /// twice in a token's layer).
    pub fn open(path: &Path) -> Result<RouteTrace> {
        let text = std::fs::read_to_string(path).at(path)?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<RouteTrace> {
        let bad = |reason: String| Error::BadTrace { path: path.to_path_buf(), reason };
        let mut lines = text.lines().enumerate();
        let header = lines.next().map(|(_, l)| l).unwrap_or("");
        let mut words = header.split_whitespace();
        if words.next() != Some(MAGIC) {
            return Err(bad(format!("the first line should start with '{MAGIC}', got '{}'", short(header))));
        }
        let version = words.next().unwrap_or("");
        if version != VERSION.to_string() {
            return Err(bad(format!("format version {VERSION} expected, got '{version}'")));
        }
        let mut field = |name: &str| -> Result<usize> {
            let w = words.next().unwrap_or("");
            w.strip_prefix(name)
                .and_then(|v| v.strip_prefix('='))
                .and_then(|v| v.parse::<usize>().ok())
                .ok_or_else(|| bad(format!("header field {name}=N expected, got '{w}'")))
        };
        let (n_layer, n_expert, k, n_tokens) =
            (field("n_layer")?, field("n_expert")?, field("n_expert_used")?, field("n_tokens")?);
        // Bounds far above any model's (as config.json's are held to `config::LIMITS`), so a
        // header cannot make sage allocate without limit before a line is read.
        if n_layer == 0 || n_layer > MAX_LAYERS || k == 0 || k > n_expert || n_expert > MAX_EXPERTS {
            return Err(bad(format!(
                "n_layer {n_layer}, n_expert {n_expert}, n_expert_used {k}: need 1 ≤ n_layer ≤ {MAX_LAYERS} and 1 ≤ n_expert_used ≤ n_expert ≤ {MAX_EXPERTS}"
            )));
        }
        let mut t = RouteTrace::new(n_layer, n_expert, k);
        let mut seen = 0usize;
        for (i, line) in lines {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let n = i + 1;
            if seen == n_tokens {
                return Err(bad(format!("line {n}: more tokens than the header's n_tokens={n_tokens}")));
            }
            let mut count = 0;
            for (j, w) in line.split_whitespace().enumerate() {
                let e: u32 = w.parse().map_err(|_| bad(format!("line {n}: '{}' is not an expert id", short(w))))?;
                if e as usize >= n_expert {
                    return Err(bad(format!("line {n}: expert {e} is outside 0..{n_expert}")));
                }
                let il = j / k;
                if il >= n_layer {
                    return Err(bad(format!("line {n}: more than n_layer × n_expert_used = {} ids", n_layer * k)));
                }
                let c = &mut t.choices[il];
                if c[c.len() - j % k..].contains(&e) {
                    return Err(bad(format!("line {n}: expert {e} chosen twice in layer {il}")));
                }
                c.push(e);
                count += 1;
            }
            if count != n_layer * k {
                return Err(bad(format!(
                    "line {n}: {} ids expected (n_layer × n_expert_used), got {count}",
                    n_layer * k
                )));
            }
            seen += 1;
        }
        if seen != n_tokens {
            return Err(bad(format!("the header says n_tokens={n_tokens}, the file has {seen} (truncated?)")));
        }
        if n_tokens == 0 {
            return Err(bad("it has no tokens".into()));
        }
        Ok(t)
    }

    /// The same routing on `n_layer` layers: layer `il` takes this trace's layer `il % L`,
    /// its tokens shifted by `(il / L) × T / ⌈n_layer / L⌉` (wrapping), so that the copies of
    /// a layer are different stretches of the routing rather than the same one repeated in
    /// lockstep; each layer keeps its own reuse pattern and expert popularity.
    pub fn map_layers(&self, n_layer: usize) -> RouteTrace {
        let (l, n, k) = (self.n_layer, self.n_tokens(), self.n_expert_used);
        let copies = n_layer.div_ceil(l).max(1);
        let mut out = RouteTrace::new(n_layer, self.n_expert, k);
        for il in 0..n_layer {
            let shift = (il / l) * n / copies;
            let src = il % l;
            for t in 0..n {
                out.choices[il].extend_from_slice(self.token(src, (t + shift) % n));
            }
        }
        out
    }

    /// Median, over every choice that repeats an earlier one of its layer, of the tokens since
    /// that layer last chose the expert (1: the previous token did); None without repeats.
    pub fn median_reuse_distance(&self) -> Option<usize> {
        let mut counts: Vec<u64> = Vec::new();
        for il in 0..self.n_layer {
            let mut last = vec![usize::MAX; self.n_expert];
            for t in 0..self.n_tokens() {
                for &e in self.token(il, t) {
                    let prev = last[e as usize];
                    if prev != usize::MAX {
                        let d = t - prev;
                        if counts.len() <= d {
                            counts.resize(d + 1, 0);
                        }
                        counts[d] += 1;
                    }
                    last[e as usize] = t;
                }
            }
        }
        let total: u64 = counts.iter().sum();
        let mut acc = 0;
        counts.iter().enumerate().find_map(|(d, &c)| {
            acc += c;
            (total > 0 && 2 * acc >= total).then_some(d)
        })
    }

    /// Share of a token's experts that the next token also uses, over all layers.
    pub fn next_token_repeat(&self) -> f64 {
        let r = self.next_token_reuse();
        r.iter().sum::<f64>() / r.len().max(1) as f64
    }

    /// 2 layers, 4 experts, top-2, 3 tokens: layer 0 chooses {0,1} {1,2} {1,0}, layer 1 {3,2}
    /// three times (for tests).
    #[cfg(test)]
    pub(crate) fn example() -> RouteTrace {
        let mut t = RouteTrace::new(2, 4, 2);
        t.choices[0] = vec![0, 1, 1, 2, 1, 0];
        t.choices[1] = vec![3, 2, 3, 2, 3, 2];
        t
    }
}

fn short(s: &str) -> String {
    s.chars().take(60).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_trace_reads_back_and_bad_ones_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.trace");
        let t = RouteTrace::example();
        t.save(&p, "from a test\nsecond line").unwrap();
        let back = RouteTrace::open(&p).unwrap();
        assert_eq!((back.n_layer, back.n_expert, back.n_expert_used), (2, 4, 2));
        assert_eq!(back.choices, t.choices);
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.starts_with("sage-route-trace 1 n_layer=2 n_expert=4 n_expert_used=2 n_tokens=3\n# from a test\n"));
        let err = |s: &str| RouteTrace::parse(s, Path::new("x.trace")).unwrap_err().to_string();
        let h = "sage-route-trace 1 n_layer=2 n_expert=4 n_expert_used=2 n_tokens=1\n";
        assert!(err("hello\n").contains("first line should start with 'sage-route-trace'"));
        assert!(err("sage-route-trace 2 n_layer=2\n").contains("format version 1 expected, got '2'"));
        assert!(err("sage-route-trace 1 n_layer=2 n_expert=4\n").contains("n_expert_used=N expected"));
        assert!(err(&format!("{h}0 1 2\n")).contains("line 2: 4 ids expected"));
        assert!(err(&format!("{h}0 1 2 3 0\n")).contains("more than n_layer"));
        assert!(err(&format!("{h}0 4 2 3\n")).contains("expert 4 is outside 0..4"));
        assert!(err(&format!("{h}0 0 2 3\n")).contains("expert 0 chosen twice in layer 0"));
        assert!(RouteTrace::parse(&format!("{h}0 1 0 1\n"), Path::new("x")).is_ok());
        assert!(err(&format!("{h}0 1 x 3\n")).contains("'x' is not an expert id"));
        assert!(err(h).contains("n_tokens=1, the file has 0"));
        assert!(err(&format!("{h}0 1 2 3\n0 1 2 3\n")).contains("line 3: more tokens"));
        assert!(err("sage-route-trace 1 n_layer=2 n_expert=4 n_expert_used=5 n_tokens=1\n").contains("n_expert_used"));
        let huge =
            "sage-route-trace 1 n_layer=1000000000000 n_expert=4000000000000 n_expert_used=4000000000000 n_tokens=1\n";
        assert!(err(huge).contains("1 ≤ n_layer ≤ 4096"), "{}", err(huge));
        assert!(RouteTrace::open(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn mapped_layers_keep_each_layers_routing_and_statistics() {
        let t = RouteTrace::example();
        let m = t.map_layers(5);
        assert_eq!((m.n_layer, m.n_tokens()), (5, 3));
        // Layers 0 and 1 are the source's; 2 and 3 its layers 0 and 1 a third of the tokens on.
        assert_eq!(m.choices[0], t.choices[0]);
        assert_eq!(m.choices[1], t.choices[1]);
        assert_eq!(m.token(2, 0), t.token(0, 1));
        assert_eq!(m.token(2, 2), t.token(0, 0));
        assert_eq!(m.token(4, 0), t.token(0, 2));
        // Layer 0 chooses {0,1} {1,2} {1,0}: repeats at distances 1, 2, 1 (and 1 for expert 1
        // twice); layer 1 repeats both experts each token.
        assert_eq!(t.median_reuse_distance(), Some(1));
        assert!((t.next_token_repeat() - (0.5 * (0.5 + 1.0))).abs() < 1e-12);
    }
}
