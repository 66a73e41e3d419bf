//! Graph pieces every architecture shares, written once, as llama.cpp's `llm_graph_context`:
//! norms, projections, RoPE, attention over the KV cache, a dense SwiGLU FFN (shared experts),
//! the routed experts over matrices picked by id (`moe`, llama.cpp's `build_moe_ffn` without
//! its router), and the output. A family's layer graph (`Arch::build_layer`) is made of these.

use crate::config::{ExpertAct, GatingFunc, ModelConfig};
use crate::engine::memory::{LayerKv, LayerRs, LayerState};
use crate::ggml::{Context, GgmlType, Tensor, TensorSet};
use crate::names::{
    ATTN_OUT, ATTN_POST_NORM, FFN_GATE_INP, FFN_GATE_INP_BIAS, FFN_NORM, SSM_A, SSM_CONV1D, SSM_DT, SSM_NORM, SSM_OUT,
};

/// llama.cpp's RoPE modes (`GGML_ROPE_TYPE_*` in ggml.h, macros bindgen skips): "normal"
/// rotates adjacent pairs (llama), NEOX the two halves of each head (Qwen, OLMoE).
pub const ROPE_NORMAL: i32 = 0;
pub const ROPE_NEOX: i32 = crate::ggml::ROPE_TYPE_NEOX;

/// One layer's base tensors, by suffix (`attn_q.weight`).
#[derive(Clone, Copy)]
pub struct LayerWeights<'a> {
    pub set: &'a TensorSet,
    /// (suffix, index in `set`) of each tensor the layer has.
    pub index: &'a [(String, usize)],
    pub il: u32,
}

impl<'a> LayerWeights<'a> {
    /// The layer's tensor `suffix`, if the model has it.
    pub fn opt(&self, suffix: &str) -> Option<Tensor<'a>> {
        self.index.iter().find(|(s, _)| s == suffix).map(|&(_, i)| self.set.get(i))
    }

    /// The layer's tensor `suffix`. Every tensor a family declares was checked present when
    /// the model directory opened, so a missing one is a bug in the family's file.
    pub fn get(&self, suffix: &str) -> Tensor<'a> {
        self.opt(suffix).unwrap_or_else(|| panic!("blk.{}.{suffix} is not among the layer's tensors", self.il))
    }

    /// The norm before the FFN: `ffn_norm`, or `post_attention_norm` in the families
    /// llama.cpp names it so (gpt-oss).
    pub fn ffn_norm(&self) -> Tensor<'a> {
        self.opt(FFN_NORM).unwrap_or_else(|| self.get(ATTN_POST_NORM))
    }
}

/// The router's logits over `x` ([n_embd, n] → [n_expert, n]), plus its bias where the family
/// has one (gpt-oss): added before the softmax and the top-k, as llama.cpp's `build_moe_ffn`.
pub fn router_logits<'a>(ctx: &'a Context, w: &LayerWeights<'a>, x: Tensor<'a>) -> Tensor<'a> {
    let logits = ctx.mul_mat(w.get(FFN_GATE_INP), x);
    match w.opt(FFN_GATE_INP_BIAS) {
        Some(b) => ctx.add(logits, b),
        None => logits,
    }
}

/// A pool's router: `logits` ([n_expert, n]) and the correction bias ([n_expert]) cut down to
/// the experts `ids` (i32 [n_here], in slot order): [n_here, n] and [n_here]. get_rows picks
/// rows (dimension 1): experts go there and back.
pub fn cut_to_pool<'a>(
    ctx: &'a Context,
    logits: Tensor<'a>,
    bias: Option<Tensor<'a>>,
    ids: Tensor<'a>,
) -> (Tensor<'a>, Option<Tensor<'a>>) {
    let [n_expert, ..] = logits.ne();
    let n_here = ids.ne()[0];
    let cut = ctx.cont(ctx.transpose(ctx.get_rows(ctx.cont(ctx.transpose(logits)), ids)));
    let bias = bias.map(|b| ctx.reshape_2d(ctx.get_rows(ctx.reshape_2d(b, 1, n_expert), ids), n_here, 1));
    (cut, bias)
}

/// The router's scores over `logits` ([n_here, n]: every expert, or a pool's cut to it) by
/// the model's gating function (softmax over them, or the sigmoid of each), and the scores
/// experts are chosen by: plus the correction bias `bias` ([n_here], where the model has one)
/// (llama.cpp's `build_moe_ffn`, which keeps the unbiased scores for the weights).
pub fn router_scores<'a>(
    ctx: &'a Context,
    cfg: &ModelConfig,
    logits: Tensor<'a>,
    bias: Option<Tensor<'a>>,
) -> (Tensor<'a>, Tensor<'a>) {
    let probs = match cfg.gating.func {
        GatingFunc::Softmax => ctx.soft_max(logits),
        GatingFunc::Sigmoid => ctx.sigmoid(logits),
    };
    let select = match bias {
        Some(b) => ctx.add(probs, b),
        None => probs,
    };
    (probs, select)
}

/// `select` ([n_expert, n]) with every expert outside the best `n_group_used` groups at
/// -inf, as llama.cpp's `build_moe_ffn` masks them: groups of consecutive ids, each scored by
/// the sum of its two highest values. Only for all the experts (a pool's groups are chosen on
/// the CPU, `engine::router::route_scores`).
pub fn mask_groups<'a>(ctx: &'a Context, cfg: &ModelConfig, select: Tensor<'a>) -> Tensor<'a> {
    let (ng, used) = (cfg.gating.n_group as i64, cfg.gating.n_group_used as i64);
    let [n_exp, n, ..] = select.ne();
    let per = n_exp / ng;
    let groups = ctx.reshape_3d(select, per, ng, n);
    let order = ctx.argsort_desc(groups);
    let top2 = ctx.view_3d(order, [2, ng, n], order.nb()[1], order.nb()[2], 0);
    let best = ctx.get_rows(ctx.reshape_4d(groups, [1, per, ng, n]), top2); // [1, 2, ng, n]
    let scores = ctx.reshape_2d(ctx.sum_rows(ctx.reshape_3d(best, 2, ng, n)), ng, n);
    let gorder = ctx.argsort_desc(scores);
    let kept = ctx.view_2d(gorder, used, n, gorder.nb()[1], 0); // [used, n]
    let rows = ctx.get_rows(groups, kept); // [per, used, n]
    let masked = ctx.set_rows(ctx.fill(groups, f32::NEG_INFINITY), rows, kept);
    ctx.reshape_2d(masked, n_exp, n)
}

/// The chosen experts' weights ([1, k, n]): `probs` ([n_here, n]) at `sel` ([k, n]),
/// renormalized where the model does (their sum floored as llama.cpp floors it), scaled by
/// `routed_scaling_factor`.
pub fn router_weights<'a>(ctx: &'a Context, cfg: &ModelConfig, probs: Tensor<'a>, sel: Tensor<'a>) -> Tensor<'a> {
    let [n_here, n, ..] = probs.ne();
    let k = sel.ne()[0];
    let mut wts = ctx.get_rows(ctx.reshape_3d(probs, 1, n_here, n), sel); // [1, k, n]
    if cfg.norm_topk_prob {
        let w2 = ctx.reshape_2d(wts, k, n);
        let sum = ctx.clamp(ctx.sum_rows(w2), crate::engine::router::WEIGHTS_SUM_MIN, f32::INFINITY);
        wts = ctx.reshape_3d(ctx.div(w2, sum), 1, k, n);
    }
    if cfg.gating.scale != 1.0 {
        wts = ctx.scale(wts, cfg.gating.scale);
    }
    wts
}

/// What a family's layer graph starts from.
pub struct LayerInput<'a> {
    pub ctx: &'a Context,
    pub cfg: &'a ModelConfig,
    pub w: LayerWeights<'a>,
    /// The residual stream entering the layer: [n_embd, n].
    pub x: Tensor<'a>,
    /// Positions (i32 [n]).
    pub pos: Tensor<'a>,
    /// The positions for M-RoPE (i32 [4 n]: each of the four components in turn, text
    /// positions equal in the first three, 0 in the fourth, as llama.cpp expands them), where
    /// the model has M-RoPE sections.
    pub pos_multi: Option<Tensor<'a>>,
    /// The layer's state for this batch (`engine::memory`): a KV cache (its tensors, where the
    /// batch's K and V go, the cells attended over and the mask of the layer's kind: a sliding
    /// layer's masks everything outside its window), or a recurrent state.
    pub state: LayerState<'a>,
}

/// What some families add to attention (`LayerInput::attend_with`).
#[derive(Clone, Copy, Default)]
pub struct Attention<'a> {
    /// One logit per head ([n_head], f32) in each softmax's normalization, with no value
    /// (gpt-oss's attention sinks).
    pub sinks: Option<Tensor<'a>>,
    /// A bias on the output projection.
    pub o_bias: Option<Tensor<'a>>,
    /// An output gate ([head_dim * n_head, n]): sigmoid(gate) multiplies the heads' output
    /// before the output projection (Qwen3.5's and Qwen3-Next's gated attention).
    pub o_gate: Option<Tensor<'a>>,
}

/// A layer's graph up to the routed experts.
pub struct PreMoe<'a> {
    /// The copies of this batch's K and V into the cache (expand them before anything that
    /// reads the layer's output): K then V, per piece of the cells they go to.
    pub stores: Vec<Tensor<'a>>,
    /// The residual stream after attention ([n_embd, n]).
    pub ffn_inp: Tensor<'a>,
    /// `ffn_inp` through the FFN norm: what the router and the experts see.
    pub normed: Tensor<'a>,
    /// Added to the routed experts' output before the residual (a shared expert's output).
    pub shared: Option<Tensor<'a>>,
}

impl<'a> LayerInput<'a> {
    /// `x` through RMSNorm and the weight `w`.
    pub fn norm(&self, x: Tensor<'a>, w: Tensor<'a>) -> Tensor<'a> {
        self.ctx.mul(self.ctx.rms_norm(x, self.cfg.rms_eps), w)
    }

    /// `w · x`, plus the bias `b` when there is one.
    pub fn proj(&self, w: Tensor<'a>, b: Option<Tensor<'a>>, x: Tensor<'a>) -> Tensor<'a> {
        let y = self.ctx.mul_mat(w, x);
        match b {
            Some(b) => self.ctx.add(y, b),
            None => y,
        }
    }

    /// `t` [head_dim * heads, n] as [head_dim, heads, n].
    pub fn heads(&self, t: Tensor<'a>) -> Tensor<'a> {
        let hd = self.cfg.head_dim as i64;
        let ne = t.ne();
        self.ctx.reshape_3d(t, hd, ne[0] / hd, ne[1])
    }

    /// RoPE of `t` [head_dim, heads, n] at the batch's positions, in `mode` (`ROPE_NORMAL`,
    /// `ROPE_NEOX`).
    pub fn rope(&self, t: Tensor<'a>, mode: i32) -> Tensor<'a> {
        self.ctx.rope(t, self.pos, &self.cfg.rope_params(mode))
    }

    /// M-RoPE of `t` [head_dim, heads, n] at the batch's positions in the model's sections,
    /// in `mode` (`ggml::ROPE_TYPE_IMROPE`).
    pub fn rope_multi(&self, t: Tensor<'a>, mode: i32) -> Tensor<'a> {
        let sections = self.cfg.rope_sections.expect("a model with M-RoPE has its sections");
        let pos = self.pos_multi.expect("a model with M-RoPE has its positions");
        self.ctx.rope_multi(t, pos, sections, &self.cfg.rope_params(mode))
    }

    /// The layer's KV cache.
    fn kv(&self) -> &LayerKv<'a> {
        match &self.state {
            LayerState::Kv(kv) => kv,
            LayerState::Recurrent(_) => panic!("layer {} is a recurrent layer, not an attention layer", self.w.il),
        }
    }

    /// The residual `x` plus a layer's attention output `o` [n_embd, n], then the FFN norm,
    /// with the stores that update the layer's state.
    pub fn residual(&self, o: Tensor<'a>, stores: Vec<Tensor<'a>>) -> PreMoe<'a> {
        let ffn_inp = self.ctx.add(o, self.x);
        let normed = self.norm(ffn_inp, self.w.ffn_norm());
        PreMoe { stores, ffn_inp, normed, shared: None }
    }

    /// A Gated-DeltaNet linear-attention layer over its recurrent state, as llama.cpp's
    /// qwen35moe / qwen3next graphs compute it: `qkv` [conv channels, n] (q, k, v of every
    /// head, value heads in llama.cpp's tiled order) through the causal convolution over the
    /// kept window and silu; q and k L2-normalized per head; the gated delta rule with gate
    /// softplus(`alpha` + dt) · a and beta sigmoid(`beta`) ([value heads, n] each) from the
    /// state; its output through the gated RMS norm (norm · silu(`z`), `z` [value heads ·
    /// d_state, n]) and the output projection; the residual and the FFN norm. The last
    /// `d_conv - 1` inputs and the new state are stored back.
    ///
    /// Where value heads outnumber key heads, ggml's gated delta rule gives value head h key
    /// head h mod n_k (Qwen3.5's checkpoints are reordered to match, `arch::FromHf::VHeadRows`);
    /// with `interleaved` (Qwen3-Next: value heads grouped by key head) q and k are repeated
    /// per key head first, as llama.cpp's qwen3next graph does.
    pub fn delta_net(
        &self,
        qkv: Tensor<'a>,
        z: Tensor<'a>,
        beta: Tensor<'a>,
        alpha: Tensor<'a>,
        interleaved: bool,
    ) -> PreMoe<'a> {
        let (ctx, w) = (self.ctx, &self.w);
        let rs: &LayerRs<'a> = match &self.state {
            LayerState::Recurrent(rs) => rs,
            LayerState::Kv(_) => panic!("layer {} is an attention layer, not a recurrent one", w.il),
        };
        let s = self.cfg.ssm.expect("a model with recurrent layers has their sizes");
        let n = self.x.ne()[1];
        let (hd, nk, nv) = (s.d_state as i64, s.n_group as i64, s.dt_rank as i64);
        let (ch, k_conv) = (s.conv_channels() as i64, s.d_conv as i64);
        let beta = ctx.sigmoid(ctx.reshape_4d(beta, [1, nv, n, 1]));
        let g = ctx.mul(ctx.softplus(ctx.add(ctx.reshape_3d(alpha, nv, n, 1), w.get(SSM_DT))), w.get(SSM_A));
        let g = ctx.reshape_4d(g, [1, nv, n, 1]);
        // The convolution's input: the kept window, then this batch, along ne0.
        let window = ctx.reshape_3d(rs.conv, k_conv - 1, ch, 1);
        let x = ctx.concat(window, ctx.transpose(ctx.reshape_3d(qkv, ch, n, 1)), 0); // [k-1+n, ch, 1]
        let f32 = x.nb()[0];
        let last = ctx.view_3d(x, [k_conv - 1, ch, 1], x.nb()[1], x.nb()[2], n as usize * f32);
        let mut stores = vec![ctx.cpy(last, rs.conv)];
        let c = ctx.silu(ctx.ssm_conv(x, w.get(SSM_CONV1D))); // [ch, n, 1]
        let row = c.nb()[1];
        let head = |heads: i64, at: i64| {
            ctx.view_4d(c, [hd, heads, n, 1], [hd as usize * f32, row, row * n as usize], at as usize * f32)
        };
        let l2 = |t: Tensor<'a>| ctx.scale(ctx.rms_norm(t, self.cfg.rms_eps / hd as f32), 1.0 / (hd as f32).sqrt());
        let (mut q, mut k) = (l2(head(nk, 0)), l2(head(nk, hd * nk)));
        let v = head(nv, 2 * hd * nk);
        if interleaved && nk != nv {
            let rep = |t: Tensor<'a>| {
                let t = ctx.repeat_4d(ctx.reshape_4d(t, [hd, 1, nk, n]), [hd, nv / nk, nk, n]);
                ctx.reshape_4d(t, [hd, nv, n, 1])
            };
            (q, k) = (rep(q), rep(k));
        }
        let state = ctx.reshape_4d(rs.delta, [hd, hd, nv, 1]);
        let r = ctx.gated_delta_net(q, k, v, g, beta, state);
        let out_bytes = (hd * nv * n) as usize * f32;
        let o = ctx.view_4d(r, [hd, nv, n, 1], [hd as usize * f32, (hd * nv) as usize * f32, out_bytes], 0);
        let new_state = ctx.view_2d(r, hd * hd * nv, 1, (hd * hd * nv) as usize * f32, out_bytes);
        stores.push(ctx.cpy(new_state, rs.delta));
        let z = ctx.reshape_4d(z, [hd, nv, n, 1]);
        let o = ctx.mul(self.norm(o, w.get(SSM_NORM)), ctx.silu(z));
        let o = ctx.mul_mat(w.get(SSM_OUT), ctx.reshape_2d(o, hd * nv, n));
        self.residual(o, stores)
    }

    /// Attention of `q` [head_dim, n_head, n] over the cache after this batch's `k`
    /// [head_dim, n_head_kv, n] and `v` [head_dim * n_head_kv, n] are stored in it; the heads'
    /// output through `attn_output`, plus the residual `x`, then the FFN norm. `q` and `k`
    /// arrive with RoPE applied. Without flash attention V is cached transposed (a row per
    /// channel, positions along it), as llama.cpp caches it: KQ·V then reads it in place, with
    /// no per-step copy of the whole V cache; with it (`LayerKv::flash_attn`) one
    /// `flash_attn_ext` reads K and V as cached, a row per position. Around a quantized cache
    /// Q and K (and V, and the heads' output) are rotated by Walsh-Hadamard matrices, as
    /// llama.cpp rotates them (`engine::memory::rotation`).
    pub fn attend(&self, q: Tensor<'a>, k: Tensor<'a>, v: Tensor<'a>) -> PreMoe<'a> {
        self.attend_with(q, k, v, Attention::default())
    }

    /// `attend` with what some families add (`Attention`).
    pub fn attend_with(&self, q: Tensor<'a>, k: Tensor<'a>, v: Tensor<'a>, extra: Attention<'a>) -> PreMoe<'a> {
        let (ctx, cfg, kv) = (self.ctx, self.cfg, self.kv());
        let n = self.x.ne()[1];
        let (hd, nh, nkv) = (cfg.head_dim as i64, cfg.n_head as i64, cfg.n_head_kv as i64);
        let n_kv = kv.n_kv as i64;
        let (q, k) = match kv.rot_k {
            Some(r) => (ctx.mul_mat_hadamard(q, r), ctx.mul_mat_hadamard(k, r)),
            None => (q, k),
        };
        let v = match kv.rot_v {
            Some(r) => ctx.mul_mat_hadamard(v, r),
            None => v,
        };
        let (kc, vc) = (kv.k, kv.v);
        let (row_k, row_v) = (kc.nb()[1], vc.nb()[1]);
        let head = |t: GgmlType| t.row_size(hd as u64).expect("heads checked against the cache type") as usize;
        let (k2, v2) = (ctx.reshape_2d(k, hd * nkv, n), ctx.reshape_2d(v, hd * nkv, n));
        // K (and V with flash attention) by row index; a transposed V (f32 or f16 only) by
        // copies into views of its columns, a piece per run of cells.
        let mut stores = vec![ctx.set_rows(kc, k2, kv.cells)];
        if kv.v_trans {
            let esz = vc.nb()[0];
            for &(cell, first, len) in kv.stores {
                let len_i = len as i64;
                let src = if first == 0 && len_i == n {
                    ctx.transpose(v)
                } else {
                    ctx.transpose(ctx.view_2d(v2, hd * nkv, len_i, v2.nb()[1], first * v2.nb()[1]))
                };
                stores.push(ctx.cpy(src, ctx.view_2d(vc, len_i, hd * nkv, row_v, cell * esz)));
            }
        } else {
            stores.push(ctx.set_rows(vc, v2, kv.cells));
        }
        let kview = ctx.view_3d(kc, [hd, n_kv, nkv], row_k, head(kv.k_type), 0);
        let scale = 1.0 / (hd as f32).sqrt();
        let o = if kv.flash_attn {
            let vview = ctx.view_3d(vc, [hd, n_kv, nkv], row_v, head(kv.v_type), 0);
            // An f32 cache goes to the kernel as f16, as llama.cpp passes it.
            let f16 = |t: Tensor<'a>, ty: GgmlType| if ty == GgmlType::F32 { ctx.cast(t, GgmlType::F16) } else { t };
            let (kview, vview) = (f16(kview, kv.k_type), f16(vview, kv.v_type));
            let fa = ctx.flash_attn_ext(ctx.permute(q, [0, 2, 1, 3]), kview, vview, kv.mask, scale, extra.sinks);
            ctx.reshape_2d(fa, hd * nh, n) // [hd, n_head, n] → [hd * n_head, n]
        } else {
            let kq = ctx.mul_mat(kview, ctx.permute(q, [0, 2, 1, 3])); // [n_kv, n, n_head]
            let kq = match extra.sinks {
                Some(sinks) => ctx.soft_max_ext_sinks(kq, kv.mask, scale, sinks),
                None => ctx.soft_max_ext(kq, kv.mask, scale),
            };
            let vt = ctx.view_3d(vc, [n_kv, hd, nkv], row_v, hd as usize * row_v, 0); // [n_kv, hd, n_head_kv]
            let kqv = ctx.mul_mat(vt, kq); // [hd, n, n_head]
            ctx.reshape_2d(ctx.cont(ctx.permute(kqv, [0, 2, 1, 3])), hd * nh, n)
        };
        let o = match kv.rot_v {
            Some(r) => ctx.mul_mat_hadamard(o, r),
            None => o,
        };
        let o = match extra.o_gate {
            Some(g) => ctx.mul(o, ctx.sigmoid(g)),
            None => o,
        };
        self.residual(self.proj(self.w.get(ATTN_OUT), extra.o_bias, o), stores)
    }

    /// Latent attention (DeepSeek's MLA with its up-projections absorbed, as llama.cpp's
    /// deepseek2 graph computes it): `k` [row, 1, n] (each token's normed latent, then its key's
    /// RoPE part) is stored in the cache; `q` [row, n_head, n] (each head's query through its key
    /// up-projection, then its RoPE part) attends over the cached rows as one key head shared by
    /// every head, with their latent part (the first `kv_lora_rank` values) as values; each
    /// head's output through its value up-projection `v_b` ([kv_lora_rank, v_head_dim, n_head])
    /// and `attn_output`, plus the residual, then the FFN norm. Logits are scaled by `scale`.
    /// Without flash attention the values are the cached rows transposed for each batch, as
    /// llama.cpp reads them.
    pub fn attend_latent(&self, q: Tensor<'a>, k: Tensor<'a>, v_b: Tensor<'a>, scale: f32) -> PreMoe<'a> {
        let (ctx, kv) = (self.ctx, self.kv());
        let [row, nh, n, ..] = q.ne();
        let [kvr, vd, ..] = v_b.ne();
        let n_kv = kv.n_kv as i64;
        let kc = kv.k;
        let row_k = kc.nb()[1];
        let stores = vec![ctx.set_rows(kc, ctx.reshape_2d(k, row, n), kv.cells)];
        let kview = ctx.view_3d(kc, [row, n_kv, 1], row_k, row_k, 0);
        let vview = ctx.view_3d(kc, [kvr, n_kv, 1], row_k, row_k, 0);
        let qp = ctx.permute(q, [0, 2, 1, 3]); // [row, n, n_head]
        let latent = if kv.flash_attn {
            let f16 = |t: Tensor<'a>| if kv.k_type == GgmlType::F32 { ctx.cast(t, GgmlType::F16) } else { t };
            let fa = ctx.flash_attn_ext(qp, f16(kview), f16(vview), kv.mask, scale, None); // [kvr, n_head, n]
            ctx.permute(fa, [0, 2, 1, 3]) // [kvr, n, n_head]
        } else {
            let kq = ctx.soft_max_ext(ctx.mul_mat(kview, qp), kv.mask, scale); // [n_kv, n, n_head]
            ctx.mul_mat(ctx.cont(ctx.transpose(vview)), kq) // [kvr, n, n_head]
        };
        let o = ctx.mul_mat(v_b, latent); // [v_head_dim, n, n_head]
        let o = ctx.reshape_2d(ctx.cont(ctx.permute(o, [0, 2, 1, 3])), vd * nh, n);
        self.residual(self.proj(self.w.get(ATTN_OUT), None, o), stores)
    }

    /// A dense SwiGLU FFN over `x`: down(silu(gate x) * (up x)), as llama.cpp's `build_ffn`
    /// with parallel gate and up.
    pub fn swiglu(&self, x: Tensor<'a>, gate: Tensor<'a>, up: Tensor<'a>, down: Tensor<'a>) -> Tensor<'a> {
        let ctx = self.ctx;
        let u = ctx.mul_mat(up, x);
        let g = ctx.mul_mat(gate, x);
        ctx.mul_mat(down, ctx.swiglu_split(g, u))
    }

    /// sigmoid(`x`), computed as llama.cpp computes a shared expert's gate: silu(x) / x.
    pub fn sigmoid_as_llama(&self, x: Tensor<'a>) -> Tensor<'a> {
        self.ctx.div(self.ctx.silu(x), x)
    }
}

/// The routed experts: per matrix [ne0, ne1, n_mat] (gate, up, down), and where the family
/// has them the experts' biases [ne1, n_mat] (gate, up, down), all indexed alike.
#[derive(Clone, Copy)]
pub struct Experts<'a> {
    pub mats: [Tensor<'a>; 3],
    pub biases: Option<[Tensor<'a>; 3]>,
}

/// The routed experts' gated FFN over `x` ([n_embd, 1, n]): per token, the experts `ids`
/// ([k, n], i32) picks from `exps`, each projection plus its bias (where there are biases),
/// gate and up through `act`, weighted by `wts` ([1, k, n]) and summed over the k experts in
/// id-list order, as llama.cpp's `build_moe_ffn`. Returns [n_embd, n].
pub fn moe<'a>(
    ctx: &'a Context,
    act: ExpertAct,
    exps: Experts<'a>,
    x: Tensor<'a>,
    ids: Tensor<'a>,
    wts: Tensor<'a>,
) -> Tensor<'a> {
    let [gate, up, down] = exps.mats;
    let (n_embd, k, n) = (x.ne()[0], ids.ne()[0], ids.ne()[1]);
    let bias = |t: Tensor<'a>, i: usize| match exps.biases {
        Some(b) => ctx.add_id(t, b[i], ids),
        None => t,
    };
    let u = bias(ctx.mul_mat_id(up, x, ids), 1);
    let g = bias(ctx.mul_mat_id(gate, x, ids), 0);
    let h = match act {
        ExpertAct::SwiGlu => ctx.swiglu_split(g, u),
        ExpertAct::SwiGluOai { alpha, limit } => ctx.swiglu_oai(g, u, alpha, limit),
    };
    let d = bias(ctx.mul_mat_id(down, h, ids), 2); // [n_embd, k, n]
    let d = ctx.mul(d, wts);
    let nb = d.nb();
    let mut out = ctx.view_2d(d, n_embd, n, nb[2], 0);
    for j in 1..k as usize {
        out = ctx.add(out, ctx.view_2d(d, n_embd, n, nb[2], j * nb[1]));
    }
    out
}

/// The layer's output: the routed experts' `moe` plus what the family adds beside them
/// (`shared`), plus the residual `ffn_inp`, in llama.cpp's order of additions.
pub fn layer_out<'a>(ctx: &'a Context, moe: Tensor<'a>, shared: Option<Tensor<'a>>, ffn_inp: Tensor<'a>) -> Tensor<'a> {
    let ffn = match shared {
        Some(s) => ctx.add(moe, s),
        None => moe,
    };
    ctx.add(ffn, ffn_inp)
}

/// Output norm and lm head over `x` ([n_embd, n_out]): the logits [n_vocab, n_out].
pub fn output<'a>(ctx: &'a Context, eps: f32, norm: Tensor<'a>, head: Tensor<'a>, x: Tensor<'a>) -> Tensor<'a> {
    ctx.mul_mat(head, ctx.mul(ctx.rms_norm(x, eps), norm))
}
