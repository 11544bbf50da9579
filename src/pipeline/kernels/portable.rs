//! The candle-op tier off x86-64: the same items as `ops.rs`, none of which can be constructed
//! (each is an empty enum), so every `prepare` answers `None` and the layers take candle's ops.
//! Compiled into the x86-64 test build too, so a change to `ops.rs`'s signatures that this file
//! misses fails there, not only on another target.

use candle_core::{Result, Tensor};

/// A convolution prepared for the CPU kernels: none here.
#[derive(Debug)]
pub(super) enum FastConv {}

impl FastConv {
    pub fn prepare(_conv: &candle_nn::Conv2d) -> Result<Option<Self>> {
        Ok(None)
    }

    pub fn try_forward(
        &self,
        _x: &Tensor,
        _pre: Option<&FastNorm>,
        _upsample: bool,
        _residual: Option<&Tensor>,
    ) -> Result<Option<Tensor>> {
        match *self {}
    }

    pub fn try_forward_into(
        &self,
        _x: &Tensor,
        _pre: Option<&FastNorm>,
        _residual: &Tensor,
    ) -> Result<bool> {
        match *self {}
    }
}

/// GroupNorm parameters for the CPU kernels: none here.
#[derive(Debug, Clone)]
pub(super) enum FastNorm {}

impl FastNorm {
    pub fn prepare(
        _weight: &Tensor,
        _bias: &Tensor,
        _groups: usize,
        _eps: f64,
        _silu: bool,
    ) -> Result<Option<Self>> {
        Ok(None)
    }

    pub fn try_forward(&self, _x: &Tensor) -> Result<Option<Tensor>> {
        match *self {}
    }
}

/// The packed dense layer: none here.
#[derive(Debug)]
pub enum PackedDense {}

impl PackedDense {
    pub fn prepare(_w_t: &Tensor, _bias: Option<&Tensor>) -> Result<Option<Self>> {
        Ok(None)
    }

    pub fn prepare_swiglu(_w1_t: &Tensor, _w3_t: &Tensor) -> Result<Option<Self>> {
        Ok(None)
    }

    pub fn out_dim(&self) -> usize {
        match *self {}
    }

    pub fn try_forward(&self, _x: &Tensor) -> Result<Option<Tensor>> {
        match *self {}
    }
}

/// An RMSNorm weight for the fused row passes: none here.
#[derive(Debug, Clone)]
pub(super) enum HostWeight {}

impl HostWeight {
    pub fn prepare(_w: &Tensor) -> Result<Option<Self>> {
        Ok(None)
    }

    pub fn norm_scale(&self, _x: &Tensor, _scale: Option<&[f32]>, _eps: f32) -> Result<Tensor> {
        match *self {}
    }

    pub fn residual(
        &self,
        _x: &Tensor,
        _h: &Tensor,
        _gate: Option<&[f32]>,
        _eps: f32,
    ) -> Result<Tensor> {
        match *self {}
    }
}

pub(super) fn qkv_norm_rope(
    _qkv: &Tensor,
    (wq, _wk): (&HostWeight, &HostWeight),
    _rope: (&Tensor, &Tensor),
    _dims: (usize, usize, usize),
    _eps: f32,
) -> Result<(Tensor, Tensor, Tensor)> {
    match *wq {}
}
