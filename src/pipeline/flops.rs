//! The arithmetic of a generation, counted from a configuration: what `diffusiond bench` divides
//! by the measured time to report achieved TFLOP/s.
//!
//! Counted: every matrix product (2 FLOPs per multiply-accumulate): the linear layers, the
//! convolutions (3x3 and 1x1) and both products of attention (`Q K^T` and `P V`, over the full
//! square of each item's own length, as the kernels compute it). Not counted: norms, activations,
//! softmax, RoPE, elementwise glue, the embedding lookup; they are memory-bound and small beside
//! the products. Token counts follow the implementation: Z-Image pads each stream to a multiple
//! of 32 (`SEQ_MULTI_OF`) and runs the context refiner once per prompt; FLUX.2 runs the text
//! encoder and the text stream over all `max_sequence_length` rows. The VAE is counted untiled
//! (a tiled decode adds the tiles' overlap on top).

use serde::Serialize;

use super::flux2::config::TransformerConfig as Flux2Config;
use super::qwen3::Config as Qwen3Config;
use super::vae::VaeConfig;
use super::z_image::config::{
    pad_len, TransformerConfig as ZImageConfig, T_EMBED_HIDDEN, T_FREQ_DIM,
};

/// The work of one request: one prompt, `steps` evaluations per image, one decode per image.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Work {
    /// Encoding one prompt (text encoder and whatever of the transformer depends on the prompt
    /// alone), FLOPs.
    pub text_encode: f64,
    /// One model evaluation of one image, FLOPs.
    pub step_per_image: f64,
    /// Decoding one image, FLOPs.
    pub decode_per_image: f64,
    /// Text tokens the encoder runs over.
    pub text_tokens: usize,
    /// Tokens one evaluation's attention runs over for one image (image + text, as computed).
    pub sequence: usize,
}

impl Work {
    /// FLOPs of a whole request: one prompt, `images` images of `steps` evaluations each.
    pub fn total(&self, images: usize, steps: usize) -> f64 {
        self.text_encode
            + images as f64 * (steps as f64 * self.step_per_image + self.decode_per_image)
    }
}

/// A linear layer over `rows` rows.
fn lin(rows: usize, in_dim: usize, out_dim: usize) -> f64 {
    2.0 * rows as f64 * in_dim as f64 * out_dim as f64
}

/// Both products of attention for one sequence of `len` tokens and total width `width`
/// (heads x head_dim): `Q K^T` and `P V`.
fn attn(len: usize, width: usize) -> f64 {
    4.0 * (len as f64).powi(2) * width as f64
}

/// The Qwen3 text encoder over `tokens` tokens, running its first `layers` layers (the families
/// load only the layers up to the last hidden state they read).
pub fn qwen3(cfg: &Qwen3Config, tokens: usize, layers: usize) -> f64 {
    let h = cfg.hidden_size;
    let q = cfg.num_attention_heads * cfg.head_dim();
    let kv = cfg.num_key_value_heads * cfg.head_dim();
    let per_layer = lin(tokens, h, q)
        + 2.0 * lin(tokens, h, kv)
        + lin(tokens, q, h)
        + 3.0 * lin(tokens, h, cfg.intermediate_size)
        + attn(tokens, q);
    layers as f64 * per_layer
}

/// A 3x3 (or `k`x`k`) convolution over `pixels` output pixels.
fn conv(pixels: usize, cin: usize, cout: usize, k: usize) -> f64 {
    2.0 * pixels as f64 * (cin * cout * k * k) as f64
}

/// The VAE decoder for one `lat_h x lat_w` latent (post-quant conv, conv_in, the mid block with
/// its attention over all latent pixels, the up blocks with their upsampling convolutions at the
/// doubled size, conv_out).
pub fn vae_decoder(cfg: &VaeConfig, lat_h: usize, lat_w: usize) -> f64 {
    let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
    let Some(&top) = rev.first() else {
        return 0.0;
    };
    let resnet = |px: usize, cin: usize, cout: usize| {
        conv(px, cin, cout, 3)
            + conv(px, cout, cout, 3)
            + if cin != cout {
                conv(px, cin, cout, 1)
            } else {
                0.0
            }
    };
    let mut px = lat_h * lat_w;
    let mut total = 0.0;
    if cfg.use_post_quant_conv == Some(true) {
        total += conv(px, cfg.latent_channels, cfg.latent_channels, 1);
    }
    total += conv(px, cfg.latent_channels, top, 3);
    total += 2.0 * resnet(px, top, top);
    if cfg.mid_block_add_attention {
        total += 4.0 * lin(px, top, top) + attn(px, top);
    }
    let mut prev = top;
    for (i, &out) in rev.iter().enumerate() {
        for j in 0..=cfg.layers_per_block {
            total += resnet(px, if j == 0 { prev } else { out }, out);
        }
        if i + 1 < rev.len() {
            px *= 4;
            total += conv(px, out, out, 3);
        }
        prev = out;
    }
    total + conv(px, cfg.block_out_channels[0], cfg.out_channels, 3)
}

/// One Z-Image transformer block (self-attention and SwiGLU FFN) over `len` tokens.
fn z_image_block(cfg: &ZImageConfig, len: usize, modulated: bool) -> f64 {
    let d = cfg.dim;
    let hd = cfg.head_dim();
    let (q, kv) = (cfg.n_heads * hd, cfg.n_kv_heads * hd);
    let f = cfg.ffn_hidden();
    lin(len, d, q)
        + 2.0 * lin(len, d, kv)
        + lin(len, q, d)
        + 2.0 * lin(len, d, f)
        + lin(len, f, d)
        + attn(len, q)
        + if modulated {
            lin(1, cfg.adaln_dim(), 4 * d)
        } else {
            0.0
        }
}

/// Z-Image: a prompt of `text_tokens` tokens (after the chat template), a `width x height` image
/// with VAE spatial factor `vae_factor`; the text encoder runs `te_layers` layers.
pub fn z_image(
    tr: &ZImageConfig,
    te: &Qwen3Config,
    te_layers: usize,
    vae: &VaeConfig,
    text_tokens: usize,
    width: usize,
    height: usize,
) -> Work {
    let f = vae.block_out_channels.len().saturating_sub(1);
    let (lat_h, lat_w) = (height >> f, width >> f);
    let p = tr.patch();
    let n_img = (lat_h / p) * (lat_w / p);
    let x_len = pad_len(n_img);
    let p_len = pad_len(text_tokens);
    let d = tr.dim;
    let text_encode = qwen3(te, text_tokens, te_layers)
        + lin(text_tokens, tr.cap_feat_dim, d)
        + tr.n_refiner_layers as f64 * z_image_block(tr, p_len, false);
    let s = x_len + p_len;
    let step_per_image = lin(1, T_FREQ_DIM, T_EMBED_HIDDEN)
        + lin(1, T_EMBED_HIDDEN, tr.adaln_dim())
        + lin(n_img, tr.patch_dim(), d)
        + tr.n_refiner_layers as f64 * z_image_block(tr, x_len, true)
        + tr.n_layers as f64 * z_image_block(tr, s, true)
        + lin(1, tr.adaln_dim(), d)
        + lin(s, d, tr.patch_dim());
    Work {
        text_encode,
        step_per_image,
        decode_per_image: vae_decoder(vae, lat_h, lat_w),
        text_tokens,
        sequence: s,
    }
}

/// FLUX.2 [klein]: the text encoder and text stream run over `text_rows` rows (the padded
/// `max_sequence_length`), the image stream over `(H/16) x (W/16)` tokens.
pub fn flux2(
    tr: &Flux2Config,
    te: &Qwen3Config,
    te_layers: usize,
    vae: &VaeConfig,
    text_rows: usize,
    width: usize,
    height: usize,
) -> Work {
    let d = tr.dim();
    let f = tr.ff_hidden();
    let n = (height / 16) * (width / 16);
    let s = text_rows + n;
    let text_encode = qwen3(te, text_rows, te_layers) + lin(text_rows, tr.joint_attention_dim, d);
    // Per token of a stream: q, k, v and out (4 D^2), the SwiGLU in (D -> 2F) and out (F -> D);
    // a single-stream block's fused projections come to the same (D (3D + 2F) + (D + F) D).
    let stream = |rows: usize| lin(rows, d, 4 * d) + lin(rows, d, 2 * f) + lin(rows, f, d);
    let double = stream(n) + stream(text_rows) + attn(s, d);
    let single = stream(s) + attn(s, d);
    let step_per_image = lin(1, tr.timestep_guidance_channels, d)
        + lin(1, d, d)
        + lin(1, d, 15 * d)
        + lin(n, tr.in_channels, d)
        + tr.num_layers as f64 * double
        + tr.num_single_layers as f64 * single
        + lin(1, d, 2 * d)
        + lin(n, d, tr.out_channels());
    let fct = vae.block_out_channels.len().saturating_sub(1);
    Work {
        text_encode,
        step_per_image,
        decode_per_image: vae_decoder(vae, height >> fct, width >> fct),
        text_tokens: text_rows,
        sequence: s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The public reference's tiny model (`../shared/reference/tiny`, section 9 of its README).
    const TINY_TRANSFORMER: &str = r#"{"all_f_patch_size": [1], "all_patch_size": [2],
        "axes_dims": [12, 18, 18], "axes_lens": [1536, 512, 512], "cap_feat_dim": 64, "dim": 96,
        "in_channels": 16, "n_heads": 2, "n_kv_heads": 2, "n_layers": 2, "n_refiner_layers": 1,
        "norm_eps": 1e-05, "qk_norm": true, "rope_theta": 256.0, "t_scale": 1000.0}"#;
    const TINY_TEXT: &str = r#"{"vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 24, "rms_norm_eps": 1e-06, "rope_theta": 1000000}"#;
    const TINY_VAE: &str = r#"{"block_out_channels": [16, 32, 32, 32], "layers_per_block": 2,
        "latent_channels": 16, "norm_num_groups": 8, "out_channels": 3,
        "mid_block_add_attention": true, "use_post_quant_conv": false}"#;

    fn parse<T: serde::de::DeserializeOwned>(s: &str) -> T {
        serde_json::from_str(s).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Counted by hand, term by term, for 20 prompt tokens at 64x64 (latent 8x8, 16 image
    /// tokens; both streams padded to 32, so the main layers see 64 tokens).
    #[test]
    fn tiny_z_image_matches_a_hand_count() {
        let (tr, te, vae) = (
            parse(TINY_TRANSFORMER),
            parse::<Qwen3Config>(TINY_TEXT),
            parse::<VaeConfig>(TINY_VAE),
        );
        let w = z_image(&tr, &te, 3, &vae, 20, 64, 64);

        // Text encoder, 3 layers over 20 tokens: q 64->96, k/v 64->48, o 96->64, MLP 3 x 64x128:
        // 2*20*(6144+2*3072+6144+24576) = 1,720,320; attention 4*20^2*96 = 153,600.
        let text = 3 * (1_720_320 + 153_600);
        // Caption embedder 2*20*64*96 = 245,760. Context refiner (1 block, 32 tokens, no adaLN):
        // q,k,v,o 2*32*4*96^2 = 2,359,296; FFN 2*32*3*96*256 = 4,718,592; attention
        // 4*32^2*96 = 393,216.
        let refiner_32 = 2_359_296 + 4_718_592 + 393_216;
        assert_eq!(w.text_encode, f64::from(text + 245_760 + refiner_32));

        // One evaluation: timestep MLP 2*256*1024 + 2*1024*96 = 720,896; x embedder
        // 2*16*64*96 = 196,608; noise refiner at 32 tokens with adaLN (2*96*384 = 73,728);
        // 2 main layers at 64 tokens: 2*64*4*96^2 = 4,718,592, FFN 9,437,184, attention
        // 4*64^2*96 = 1,572,864, adaLN 73,728; final layer 2*96*96 = 18,432 + 2*64*96*64 = 786,432.
        let main_64 = 4_718_592 + 9_437_184 + 1_572_864 + 73_728;
        let step = 720_896 + 196_608 + (refiner_32 + 73_728) + 2 * main_64 + 18_432 + 786_432;
        assert_eq!(w.step_per_image, f64::from(step));
        assert_eq!(w.step_per_image, 40_871_936.0);

        // VAE decoder at 8x8 latent (64 px), channels reversed [32, 32, 32, 16]:
        // conv_in 16->32: 2*64*16*32*9 = 589,824; mid: 4 convs 32->32 at 64 px (1,179,648 each)
        // + attention 4*2*64*32^2 + 4*64^2*32 = 1,048,576; up block 0: 6 convs at 64 px, its
        // upsampler at 256 px (4,718,592); block 1: 6 convs at 256 px, upsampler at 1024 px
        // (18,874,368); block 2: 6 convs at 1024 px, upsampler at 4096 px (75,497,472);
        // block 3 at 4096 px: 32->16 (37,748,736) + 16->16 (18,874,368) + 1x1 shortcut 32->16
        // (4,194,304), then 4 convs 16->16; conv_out 16->3: 2*4096*16*3*9 = 3,538,944.
        let vae_flops: u64 = 589_824
            + 4 * 1_179_648
            + 1_048_576
            + 6 * 1_179_648
            + 4_718_592
            + 6 * 4_718_592
            + 18_874_368
            + 6 * 18_874_368
            + 75_497_472
            + 37_748_736
            + 18_874_368
            + 4_194_304
            + 4 * 18_874_368
            + 3_538_944;
        assert_eq!(w.decode_per_image, vae_flops as f64);
        assert_eq!(w.decode_per_image, 393_936_896.0);
        assert_eq!((w.text_tokens, w.sequence), (20, 64));
        assert_eq!(
            w.total(2, 3),
            w.text_encode + 2.0 * (3.0 * step as f64 + vae_flops as f64)
        );
    }

    /// FLUX.2's tiny model (`../shared/reference-flux2/tiny`): D 64, F 192, 2 double + 2 single
    /// blocks, in 128, joint 96; 16 text rows, 32x32 image (2x2 = 4 tokens), so S = 20.
    #[test]
    fn tiny_flux2_step_matches_a_hand_count() {
        let tr: Flux2Config = parse(
            r#"{"attention_head_dim": 32, "axes_dims_rope": [8, 8, 8, 8], "in_channels": 128,
            "joint_attention_dim": 96, "mlp_ratio": 3.0, "num_attention_heads": 2,
            "num_layers": 2, "num_single_layers": 2, "rope_theta": 2000}"#,
        );
        let te: Qwen3Config = parse(
            r#"{"vocab_size": 1024, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 28, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16, "rms_norm_eps": 1e-06, "rope_theta": 1000000}"#,
        );
        let vae: VaeConfig = parse(TINY_VAE);
        let w = flux2(&tr, &te, 27, &vae, 16, 32, 32);
        // Per stream row: 4*64^2 + 64*384 + 192*64 = 16,384 + 24,576 + 12,288 = 53,248 MACs.
        let row = 2 * 53_248;
        let attn_20 = 4 * 20 * 20 * 64;
        // Time MLP 2*(256*64 + 64*64) = 40,960; modulations 2*64*(15*64) = 122,880; x embedder
        // 2*4*128*64 = 65,536; norm_out 2*64*128 = 16,384; proj_out 2*4*64*128 = 65,536.
        let step = 40_960
            + 122_880
            + 65_536
            + 2 * (4 * row + 16 * row + attn_20)
            + 2 * (20 * row + attn_20)
            + 16_384
            + 65_536;
        assert_eq!(w.step_per_image, f64::from(step));
        // Text: 27 layers over 16 rows (q 32->64, k/v 32->32, o 64->32, MLP 3 x 32x64):
        // 2*16*(2048+2*1024+2048+6144) = 393,216; attention 4*16^2*64 = 65,536; context
        // embedder 2*16*96*64 = 196,608.
        assert_eq!(w.text_encode, f64::from(27 * (393_216 + 65_536) + 196_608));
        assert_eq!(w.sequence, 20);
    }
}
