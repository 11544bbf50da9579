//! Qwen3 text encoder, shared by the families: each says which hidden states it reads
//! (Z-Image: `hidden_states[-2]` of the unpadded ids; FLUX.2 [klein]: states 9, 18 and 27 side by
//! side, over a right-padded sequence), and only the layers up to the last of those are loaded.
//!
//! Follows transformers' `Qwen3Model`: RMSNorm before attention and MLP, q/k RMSNorm per head,
//! rotate-half RoPE with f32 angles, grouped-query causal attention, SwiGLU MLP. Tensors carry the
//! checkpoint's `model.` prefix. Hidden state 0 is the embedding output, state k the output of
//! layer k-1; the final norm is never needed and not loaded.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{embedding, linear_no_bias, rms_norm, Embedding, Linear, RmsNorm};
use serde::Deserialize;

use crate::pipeline::error::{load_err, PipelineError, Result};
use crate::pipeline::quant::{QuantParts, Weights};

/// A projection without bias: candle's dense `Linear` for full-precision weights (as before),
/// or a block-quantized matrix.
enum Proj {
    Dense(Linear),
    Quant(QuantParts),
}

impl Proj {
    fn new(w: &Weights, name: &str, in_dim: usize, out: usize) -> Result<Self> {
        Ok(match w.quantized(&[name], in_dim, &[out])? {
            Some(q) => Self::Quant(q),
            None => Self::Dense(linear_no_bias(in_dim, out, w.vb().pp(name))?),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(l) => Ok(l.forward(x)?),
            Self::Quant(q) => {
                let dims = x.dims().to_vec();
                let k = dims[dims.len() - 1];
                let y = q.forward(&x.reshape(((), k))?)?;
                let mut out = dims;
                let last = out.len() - 1;
                out[last] = y.dim(1)?;
                Ok(y.reshape(out)?)
            }
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: Option<usize>,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    #[serde(default)]
    pub hidden_act: Option<String>,
}

impl Config {
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }
}

struct Attention {
    q_proj: Proj,
    k_proj: Proj,
    v_proj: Proj,
    o_proj: Proj,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(cfg: &Config, w: Weights) -> Result<Self> {
        let hd = cfg.head_dim();
        let h = cfg.hidden_size;
        let vb = w.vb();
        Ok(Self {
            q_proj: Proj::new(&w, "q_proj", h, cfg.num_attention_heads * hd)?,
            k_proj: Proj::new(&w, "k_proj", h, cfg.num_key_value_heads * hd)?,
            v_proj: Proj::new(&w, "v_proj", h, cfg.num_key_value_heads * hd)?,
            o_proj: Proj::new(&w, "o_proj", cfg.num_attention_heads * hd, h)?,
            q_norm: rms_norm(hd, cfg.rms_norm_eps, vb.pp("q_norm"))?,
            k_norm: rms_norm(hd, cfg.rms_norm_eps, vb.pp("k_norm"))?,
            n_heads: cfg.num_attention_heads,
            n_kv_heads: cfg.num_key_value_heads,
            head_dim: hd,
        })
    }

    /// x: (1, L, hidden); cos/sin: (L, head_dim) in the run dtype; mask: (L, L) additive.
    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let q = self
            .q_proj
            .forward(x)?
            .reshape((b, l, self.n_heads, self.head_dim))?;
        let k = self
            .k_proj
            .forward(x)?
            .reshape((b, l, self.n_kv_heads, self.head_dim))?;
        let v = self
            .v_proj
            .forward(x)?
            .reshape((b, l, self.n_kv_heads, self.head_dim))?;
        let q = self.q_norm.forward(&q)?.transpose(1, 2)?.contiguous()?;
        let k = self.k_norm.forward(&k)?.transpose(1, 2)?.contiguous()?;
        let v = v.transpose(1, 2)?.contiguous()?;
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
        let rep = self.n_heads / self.n_kv_heads;
        let (k, v) = if rep > 1 {
            (repeat_kv(&k, rep)?, repeat_kv(&v, rep)?)
        } else {
            (k, v)
        };
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, l, ()))?;
        self.o_proj.forward(&out)
    }
}

fn repeat_kv(x: &Tensor, rep: usize) -> Result<Tensor> {
    let (b, h, l, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .expand((b, h, rep, l, d))?
        .reshape((b, h * rep, l, d))?)
}

struct Layer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    gate_proj: Proj,
    up_proj: Proj,
    down_proj: Proj,
}

impl Layer {
    fn new(cfg: &Config, w: Weights) -> Result<Self> {
        let h = cfg.hidden_size;
        let i = cfg.intermediate_size;
        let vb = w.vb();
        Ok(Self {
            input_layernorm: rms_norm(h, cfg.rms_norm_eps, vb.pp("input_layernorm"))?,
            self_attn: Attention::new(cfg, w.pp("self_attn"))?,
            post_attention_layernorm: rms_norm(
                h,
                cfg.rms_norm_eps,
                vb.pp("post_attention_layernorm"),
            )?,
            gate_proj: Proj::new(&w, "mlp.gate_proj", h, i)?,
            up_proj: Proj::new(&w, "mlp.up_proj", h, i)?,
            down_proj: Proj::new(&w, "mlp.down_proj", i, h)?,
        })
    }

    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let h = self
            .self_attn
            .forward(&self.input_layernorm.forward(x)?, cos, sin, mask)?;
        let x = (x + h)?;
        let n = self.post_attention_layernorm.forward(&x)?;
        let mlp = self.down_proj.forward(
            &(candle_nn::ops::silu(&self.gate_proj.forward(&n)?)? * self.up_proj.forward(&n)?)?,
        )?;
        Ok((x + mlp)?)
    }
}

/// The Qwen3 encoder truncated to the layers whose output feeds the transformer.
pub struct TextEncoder {
    embed_tokens: Embedding,
    layers: Vec<Layer>,
    /// Hidden-state indices read, in the order their vectors are concatenated.
    states: Vec<usize>,
    cfg: Config,
    dtype: DType,
    device: Device,
}

/// The hidden state Z-Image reads: `hidden_states[-2]`, the output of the second-to-last layer.
pub fn second_to_last(cfg: &Config) -> Result<Vec<usize>> {
    if cfg.num_hidden_layers < 2 {
        return Err(load_err(
            "text encoder needs at least 2 layers (the pipeline uses hidden_states[-2])",
        ));
    }
    Ok(vec![cfg.num_hidden_layers - 1])
}

impl TextEncoder {
    /// Loads `model.embed_tokens` and the layers up to the last hidden state of `states`
    /// (indices into `hidden_states`: 0 the embeddings, k the output of layer k-1; the final
    /// normed state `num_hidden_layers` is not supported).
    /// From a GGUF file, `rope.freq_base` is read from the file (the Qwen3-4B Instruct files
    /// people pair with Z-Image use 5e6, Z-Image's own encoder 1e6) and overrides the config.
    pub fn new(cfg: &Config, states: &[usize], w: Weights) -> Result<Self> {
        let mut cfg = cfg.clone();
        if let Some(base) = w.gguf_number("qwen3.rope.freq_base") {
            if base != cfg.rope_theta {
                tracing::info!(
                    config = cfg.rope_theta,
                    file = base,
                    "text encoder: RoPE base from the GGUF file"
                );
            }
            cfg.rope_theta = base;
        }
        let cfg = &cfg;
        let last = match states.iter().max() {
            Some(&m) if m < cfg.num_hidden_layers => m,
            _ => {
                return Err(load_err(format!(
                    "text encoder hidden states {states:?} not readable from {} layers",
                    cfg.num_hidden_layers
                )))
            }
        };
        if let Some(act) = &cfg.hidden_act {
            if act != "silu" {
                return Err(load_err(format!(
                    "text encoder hidden_act '{act}' unsupported"
                )));
            }
        }
        if !cfg
            .num_attention_heads
            .is_multiple_of(cfg.num_key_value_heads)
        {
            return Err(load_err(
                "num_attention_heads must be a multiple of num_key_value_heads",
            ));
        }
        let w = w.pp("model");
        let vb = w.vb();
        let embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size, vb.pp("embed_tokens"))?;
        let layers = (0..last)
            .map(|i| Layer::new(cfg, w.pp(format!("layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embed_tokens,
            layers,
            states: states.to_vec(),
            cfg: cfg.clone(),
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    pub fn hidden_size(&self) -> usize {
        self.cfg.hidden_size
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Layers this encoder runs (up to the last hidden state it reads).
    pub fn layers_run(&self) -> usize {
        self.layers.len()
    }

    /// Width of the features [`Self::encode`] returns: `hidden_size` per state read.
    pub fn feature_size(&self) -> usize {
        self.cfg.hidden_size * self.states.len()
    }

    /// The RoPE tables for positions 0..len, computed as transformers does (f32 inverse
    /// frequencies, f32 products), then cast to the run dtype.
    fn rope_tables(&self, len: usize) -> Result<(Tensor, Tensor)> {
        let hd = self.cfg.head_dim();
        let half = hd / 2;
        let base = self.cfg.rope_theta as f32;
        let inv: Vec<f32> = (0..half)
            .map(|k| 1.0f32 / base.powf((2 * k) as f32 / hd as f32))
            .collect();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for p in 0..len {
            for f in &inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (len, half), &self.device)?.to_dtype(self.dtype)?;
        let sin = Tensor::from_vec(sin, (len, half), &self.device)?.to_dtype(self.dtype)?;
        Ok((cos, sin))
    }

    /// Encode one prompt's unpadded ids into its features `(L, feature_size)`.
    pub fn encode(&self, ids: &[u32]) -> Result<Tensor> {
        self.encode_padded(ids, ids.len())
    }

    /// Encode ids of which the first `valid` are the prompt and the rest right padding, as the
    /// reference runs a padded batch: every query (pad rows included, at their own positions)
    /// attends to the prompt tokens at or before it and never to a pad token, so a pad row is
    /// the pad embedding attending to the whole prompt. Returns `(ids.len(), feature_size)`:
    /// the states read, concatenated per token in the order given at load.
    pub fn encode_padded(&self, ids: &[u32], valid: usize) -> Result<Tensor> {
        let all = self.run(ids, valid, false)?;
        let mut picked = Vec::with_capacity(self.states.len());
        for &k in &self.states {
            if let Some(Some(t)) = all.get(k) {
                picked.push(t.clone());
            }
        }
        if picked.len() == 1 {
            return Ok(picked.swap_remove(0));
        }
        Ok(Tensor::cat(&picked, 1)?)
    }

    /// Every hidden state up to the last one read (`hidden_states[0..=max]`), for
    /// stage-by-stage checks against the reference.
    pub fn hidden_states(&self, ids: &[u32]) -> Result<Vec<Tensor>> {
        self.hidden_states_padded(ids, ids.len())
    }

    /// As [`Self::hidden_states`] for a right-padded sequence (see [`Self::encode_padded`]).
    pub fn hidden_states_padded(&self, ids: &[u32], valid: usize) -> Result<Vec<Tensor>> {
        Ok(self.run(ids, valid, true)?.into_iter().flatten().collect())
    }

    /// The hidden states up to the last one read; with `keep_all` false only the states read
    /// are kept (`None` for the others).
    fn run(&self, ids: &[u32], valid: usize, keep_all: bool) -> Result<Vec<Option<Tensor>>> {
        let l = ids.len();
        if l == 0 || valid == 0 || valid > l {
            return Err(PipelineError::InvalidInput(format!(
                "bad token sequence: {valid} prompt tokens of {l}"
            )));
        }
        let ids_t = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        let mut x = self.embed_tokens.forward(&ids_t)?;
        let (cos, sin) = self.rope_tables(l)?;
        // Causal mask over the prompt tokens only (row i sees keys j <= i with j < valid).
        let mask: Vec<f32> = (0..l)
            .flat_map(|i| {
                (0..l).map(move |j| {
                    if j <= i && j < valid {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (l, l), &self.device)?.to_dtype(self.dtype)?;
        let keep = |k: usize| keep_all || self.states.contains(&k);
        let mut out = Vec::with_capacity(self.layers.len() + 1);
        out.push(keep(0).then(|| x.squeeze(0)).transpose()?);
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, &cos, &sin, &mask)?;
            out.push(keep(i + 1).then(|| x.squeeze(0)).transpose()?);
        }
        Ok(out)
    }
}
