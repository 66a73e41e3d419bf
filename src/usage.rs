//! Expert usage: which experts real routing chooses, per layer, as `usage.json`. `sage
//! profile` records a [`RouteTrace`] while evaluating text and writes a [`Usage`];
//! `sage-convert --pool usage.json --keep N` keeps each layer's N most used experts, and `sage
//! run --warm` fills the arena with the most used ones before the first token. The file also
//! keeps the routing statistics `sim` computes from the trace (per-layer entropy, next-token
//! reuse, simulated arenas).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::engine::trace::RouteTrace;
use crate::error::{Error, IoContext, Result};
use crate::sim::RoutingStats;

pub const USAGE_FORMAT: &str = "sage-usage";
pub const USAGE_VERSION: u32 = 1;

impl RouteTrace {
    /// Counts and co-activations per layer, with the routing statistics.
    pub fn usage(&self, source: &str) -> Usage {
        let n = self.n_expert;
        let layers = (0..self.n_layer)
            .map(|il| {
                let mut counts = vec![0u64; n];
                let mut co = vec![vec![0u64; n]; n];
                for t in 0..self.n_tokens() {
                    let ch = self.token(il, t);
                    for &a in ch {
                        counts[a as usize] += 1;
                        for &b in ch {
                            if a != b {
                                co[a as usize][b as usize] += 1;
                            }
                        }
                    }
                }
                LayerUsage { il: il as u32, counts, coactivation: co }
            })
            .collect();
        Usage {
            format: USAGE_FORMAT.into(),
            version: USAGE_VERSION,
            source: source.into(),
            n_layer: self.n_layer as u32,
            n_expert: self.n_expert as u32,
            n_expert_used: self.n_expert_used as u32,
            tokens: self.n_tokens() as u64,
            layers,
            stats: Some(self.stats()),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LayerUsage {
    pub il: u32,
    /// Times each expert was chosen.
    pub counts: Vec<u64>,
    /// `coactivation[a][b]`: tokens that chose both a and b.
    pub coactivation: Vec<Vec<u64>>,
}

/// `usage.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Usage {
    pub format: String,
    pub version: u32,
    /// What text was profiled.
    pub source: String,
    pub n_layer: u32,
    pub n_expert: u32,
    pub n_expert_used: u32,
    pub tokens: u64,
    pub layers: Vec<LayerUsage>,
    #[serde(default)]
    pub stats: Option<RoutingStats>,
}

impl Usage {
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("usage serializes");
        let mut f = crate::io::AtomicFile::create(path)?;
        f.write(text.as_bytes())?;
        f.finish()
    }

    /// Read and check a `usage.json`.
    pub fn load(path: &Path) -> Result<Usage> {
        let text = std::fs::read_to_string(path).at(path)?;
        Usage::parse(&text, path)
    }

    /// Parse and check the text of a `usage.json`; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Usage> {
        let bad = |reason: String| Error::BadUsage { path: path.to_path_buf(), reason };
        let u: Usage = serde_json::from_str(text).map_err(|e| bad(format!("not a sage usage file: {e}")))?;
        if u.format != USAGE_FORMAT {
            return Err(bad(format!("format is '{}', expected '{USAGE_FORMAT}'", u.format)));
        }
        if u.version != USAGE_VERSION {
            return Err(bad(format!("version {} is not supported; expected {USAGE_VERSION}", u.version)));
        }
        if u.layers.len() != u.n_layer as usize {
            return Err(bad(format!("{} layers listed, expected n_layer = {}", u.layers.len(), u.n_layer)));
        }
        for (i, l) in u.layers.iter().enumerate() {
            if l.il as usize != i {
                return Err(bad(format!("layer {i} is labelled il = {}", l.il)));
            }
            if l.counts.len() != u.n_expert as usize {
                return Err(bad(format!(
                    "layer {i}: {} counts, expected one per expert ({})",
                    l.counts.len(),
                    u.n_expert
                )));
            }
            let sum: u64 = l.counts.iter().fold(0u64, |a, &c| a.saturating_add(c));
            // (0: a dense layer, which routes nothing.)
            if sum != 0 && sum != u.tokens.saturating_mul(u.n_expert_used as u64) {
                return Err(bad(format!(
                    "layer {i}: counts sum to {sum}, expected 0 (a dense layer) or tokens x n_expert_used = {} x {}",
                    u.tokens, u.n_expert_used
                )));
            }
            if !l.coactivation.is_empty()
                && (l.coactivation.len() != u.n_expert as usize
                    || l.coactivation.iter().any(|r| r.len() != u.n_expert as usize))
            {
                return Err(bad(format!("layer {i}: co-activation is not {0} x {0}", u.n_expert)));
            }
        }
        Ok(u)
    }

    /// Check that this usage was measured on a model of this shape.
    pub fn check_model(&self, path: &Path, n_layer: u32, n_expert: u32) -> Result<()> {
        if self.n_layer != n_layer || self.n_expert != n_expert {
            return Err(Error::BadUsage {
                path: path.to_path_buf(),
                reason: format!(
                    "measured on a model of {} layers x {} experts; this one has {n_layer} x {n_expert}",
                    self.n_layer, self.n_expert
                ),
            });
        }
        Ok(())
    }

    /// Each layer's `keep` most used experts (ties to the lower id), ids ascending.
    pub fn most_used(&self, keep: usize) -> Vec<Vec<u32>> {
        self.layers
            .iter()
            .map(|l| {
                let mut order: Vec<u32> = (0..l.counts.len() as u32).collect();
                order.sort_by(|&a, &b| l.counts[b as usize].cmp(&l.counts[a as usize]).then(a.cmp(&b)));
                order.truncate(keep);
                order.sort_unstable();
                order
            })
            .collect()
    }

    /// All (layer, expert) pairs, most used first (ties: lower layer, then lower id).
    pub fn ranked(&self) -> Vec<(u32, u32)> {
        let mut all: Vec<(u64, u32, u32)> = self
            .layers
            .iter()
            .flat_map(|l| l.counts.iter().enumerate().map(move |(e, &c)| (c, l.il, e as u32)))
            .collect();
        all.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        all.into_iter().map(|(_, il, e)| (il, e)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_coactivation_and_reuse() {
        let t = RouteTrace::example();
        let u = t.usage("test");
        assert_eq!(u.layers[0].counts, vec![2, 3, 1, 0]);
        assert_eq!(u.layers[0].coactivation[0][1], 2);
        assert_eq!(u.layers[0].coactivation[1][2], 1);
        assert_eq!(u.layers[1].coactivation[2][3], 3);
        // Layer 0: token 1 reuses expert 1 of token 0, token 2 reuses 1: 2 of 4.
        assert_eq!(t.next_token_reuse(), vec![0.5, 1.0]);
        assert_eq!(u.most_used(2), vec![vec![0, 1], vec![2, 3]]);
    }
}
