//! `Flux2Transformer2DModel`: embedders, the shared modulations, 4-axis RoPE, double-stream
//! then single-stream blocks, the final adaptive norm and projection. Runs a group of items of
//! equal text and image lengths as one batch; every row operation is per item, so an item's
//! output does not depend on its batch mates.

use candle_core::{DType, Device, Tensor, D};

use super::blocks::{layer_norm, DoubleBlock, Mod3, Mod6, Rope, SingleBlock};
use super::config::TransformerConfig;
use super::rope;
use crate::pipeline::error::{load_err, Result};
use crate::pipeline::linear::Dense;
use crate::pipeline::quant::Weights;

pub struct Transformer {
    x_embedder: Dense,
    context_embedder: Dense,
    time_linear_1: Dense,
    time_linear_2: Dense,
    mod_img: Dense,
    mod_txt: Dense,
    mod_single: Dense,
    double: Vec<DoubleBlock>,
    single: Vec<SingleBlock>,
    norm_out: Dense,
    proj_out: Dense,
    cfg: TransformerConfig,
    dtype: DType,
    device: Device,
}

impl Transformer {
    pub fn new(cfg: &TransformerConfig, vb: Weights) -> Result<Self> {
        cfg.check()?;
        let d = cfg.dim();
        let tg = vb.pp("time_guidance_embed.timestep_embedder");
        Ok(Self {
            x_embedder: Dense::load(&vb, &["x_embedder"], cfg.in_channels, &[d], false)?,
            context_embedder: Dense::load(
                &vb,
                &["context_embedder"],
                cfg.joint_attention_dim,
                &[d],
                false,
            )?,
            time_linear_1: Dense::load(
                &tg,
                &["linear_1"],
                cfg.timestep_guidance_channels,
                &[d],
                false,
            )?,
            time_linear_2: Dense::load(&tg, &["linear_2"], d, &[d], false)?,
            mod_img: Dense::load(
                &vb,
                &["double_stream_modulation_img.linear"],
                d,
                &[6 * d],
                false,
            )?,
            mod_txt: Dense::load(
                &vb,
                &["double_stream_modulation_txt.linear"],
                d,
                &[6 * d],
                false,
            )?,
            mod_single: Dense::load(
                &vb,
                &["single_stream_modulation.linear"],
                d,
                &[3 * d],
                false,
            )?,
            double: (0..cfg.num_layers)
                .map(|i| DoubleBlock::new(cfg, vb.pp(format!("transformer_blocks.{i}"))))
                .collect::<Result<_>>()?,
            single: (0..cfg.num_single_layers)
                .map(|i| SingleBlock::new(cfg, vb.pp(format!("single_transformer_blocks.{i}"))))
                .collect::<Result<_>>()?,
            norm_out: Dense::load(&vb, &["norm_out.linear"], d, &[2 * d], false)?,
            proj_out: Dense::load(&vb, &["proj_out"], d, &[cfg.out_channels()], false)?,
            cfg: cfg.clone(),
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    pub fn config(&self) -> &TransformerConfig {
        &self.cfg
    }

    /// Text features `(S, joint_attention_dim)` -> the text stream's input `(S, D)` (run dtype).
    pub fn embed_context(&self, feats: &Tensor) -> Result<Tensor> {
        let width = feats.dim(D::Minus1)?;
        if width != self.cfg.joint_attention_dim {
            return Err(load_err(format!(
                "text features have width {width}, the transformer expects {}",
                self.cfg.joint_attention_dim
            )));
        }
        self.context_embedder
            .forward(&feats.to_device(&self.device)?.to_dtype(self.dtype)?)
    }

    /// The RoPE tables of `text_len` text tokens followed by an `h x w` image grid.
    pub fn rope(&self, text_len: usize, h: usize, w: usize) -> Result<Rope> {
        let ids = rope::positions(text_len, h, w);
        let (cos, sin) = rope::tables(
            &ids,
            &self.cfg.axes_dims_rope,
            self.cfg.rope_theta,
            &self.device,
        )?;
        Ok(Rope { cos, sin })
    }

    /// `temb (B, D)` for the items' sigmas. The pipeline passes `timesteps / 1000` with
    /// `timesteps = sigma * 1000` and the model multiplies by 1000 again; the sinusoid
    /// (`[cos, sin]` of `u f_k`, `f_k = exp(-ln(10000) k / half)`) is computed in f32.
    fn time_embedding(&self, sigmas: &[f32]) -> Result<Tensor> {
        let ch = self.cfg.timestep_guidance_channels;
        let half = ch / 2;
        let neg_ln = -(10000f64.ln()) as f32;
        let freqs: Vec<f32> = (0..half)
            .map(|k| (neg_ln * k as f32 / half as f32).exp())
            .collect();
        let mut feats = Vec::with_capacity(sigmas.len() * ch);
        for &s in sigmas {
            let u = ((s * 1000.0) / 1000.0) * 1000.0;
            feats.extend(freqs.iter().map(|f| (u * f).cos()));
            feats.extend(freqs.iter().map(|f| (u * f).sin()));
        }
        let e = Tensor::from_vec(feats, (sigmas.len(), ch), &self.device)?.to_dtype(self.dtype)?;
        let h = candle_nn::ops::silu(&self.time_linear_1.forward(&e)?)?;
        self.time_linear_2.forward(&h)
    }

    /// One evaluation of a group: packed latents `x (B, N, in_channels)` of an `h x w` token
    /// grid, text streams `txt (B, S, D)` (from [`Self::embed_context`]), one sigma per item.
    /// Returns the velocity `(B, N, in_channels)` in f32.
    pub fn forward(
        &self,
        x: &Tensor,
        txt: &Tensor,
        sigmas: &[f32],
        h: usize,
        w: usize,
    ) -> Result<Tensor> {
        self.forward_traced(x, txt, sigmas, h, w, &mut None)
    }

    /// As [`Self::forward`], also collecting the intermediate stages under the reference
    /// fixtures' `dbg.*` names (item 0 for the per-block rows) when `trace` is given.
    pub fn forward_traced(
        &self,
        x: &Tensor,
        txt: &Tensor,
        sigmas: &[f32],
        h: usize,
        w: usize,
        trace: &mut Option<Vec<(String, Tensor)>>,
    ) -> Result<Tensor> {
        let mut keep = |name: String, t: &Tensor| -> Result<()> {
            if let Some(v) = trace.as_mut() {
                v.push((name, t.to_dtype(DType::F32)?));
            }
            Ok(())
        };
        let s = txt.dim(1)?;
        let n = x.dim(1)?;
        let mut img = self.x_embedder.forward(&x.to_dtype(self.dtype)?)?;
        let mut txt = txt.to_dtype(self.dtype)?;
        keep("dbg.x_embedder_out".into(), &img)?;
        keep("dbg.context_embedder_out".into(), &txt.get(0)?)?;
        let temb = self.time_embedding(sigmas)?;
        let m = candle_nn::ops::silu(&temb)?;
        let (mi, mt, ms) = (
            self.mod_img.forward(&m)?,
            self.mod_txt.forward(&m)?,
            self.mod_single.forward(&m)?,
        );
        keep("dbg.temb".into(), &temb)?;
        keep("dbg.mod_double_img".into(), &mi)?;
        keep("dbg.mod_double_txt".into(), &mt)?;
        keep("dbg.mod_single".into(), &ms)?;
        let (mi, mt, ms) = (Mod6::from(&mi)?, Mod6::from(&mt)?, Mod3::from(&ms)?);
        let pe = self.rope(s, h, w)?;
        for (i, block) in self.double.iter().enumerate() {
            (img, txt) = block.forward(&img, &txt, &mi, &mt, &pe)?;
            keep(format!("dbg.double_block.{i}.img"), &img.get(0)?)?;
            keep(format!("dbg.double_block.{i}.txt"), &txt.get(0)?)?;
        }
        let mut joint = Tensor::cat(&[txt, img], 1)?;
        for (j, block) in self.single.iter().enumerate() {
            joint = block.forward(&joint, &ms, &pe)?;
            keep(
                format!("dbg.single_block.{j}.img"),
                &joint.get(0)?.narrow(0, s, n)?,
            )?;
            keep(
                format!("dbg.single_block.{j}.txt"),
                &joint.get(0)?.narrow(0, 0, s)?,
            )?;
        }
        let img = joint.narrow(1, s, n)?;
        let no = self.norm_out.forward(&m)?.unsqueeze(1)?;
        let d = self.cfg.dim();
        let (scale, shift) = (no.narrow(D::Minus1, 0, d)?, no.narrow(D::Minus1, d, d)?);
        let y = layer_norm(&img, self.cfg.eps)?
            .broadcast_mul(&(scale + 1.0)?)?
            .broadcast_add(&shift)?;
        keep("dbg.norm_out".into(), &y)?;
        Ok(self.proj_out.forward(&y)?.to_dtype(DType::F32)?)
    }
}
