//! The route trace: the experts routing chose, layer by layer, token after token (and on
//! request every router logit), recorded by the engine while `Some` (`Engine::start_trace`).
//! `usage` turns one into usage.json's counts; `sim` replays one through eviction policies.

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
}

impl RouteTrace {
    pub fn new(n_layer: usize, n_expert: usize, n_expert_used: usize) -> RouteTrace {
        RouteTrace { n_layer, n_expert, n_expert_used, choices: vec![Vec::new(); n_layer], router_logits: None }
    }

    pub fn n_tokens(&self) -> usize {
        self.choices.first().map_or(0, |c| c.len() / self.n_expert_used.max(1))
    }

    /// The experts token `t` chose in layer `il`.
    pub fn token(&self, il: usize, t: usize) -> &[u32] {
        let k = self.n_expert_used;
        &self.choices[il][t * k..(t + 1) * k]
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
