//! 3x3 convolution (stride 1, padding 1) on CPU f32 by Winograd F(2x2, 3x3).
//!
//! Each 2x2 output tile is `A^T [ (G g G^T) . (B^T d B) ] A` over its 4x4 input patch, which
//! turns the 36 multiply-adds per tile and channel pair of a direct convolution into 16,
//! done as 16 GEMMs (one per transform point: `M = U V`, `Cout x Cin` times `Cin x tiles`).
//! The transforms only add and subtract (the weight transform's halves are exact and done once
//! at load time in f64), so the rounding error stays at the level of a direct convolution.
//!
//! Data flow for one batch item, parallel over bands of tile rows (results do not depend on how
//! the work is split):
//! 1. *stage* each input row a tile row needs, once per band, into a small ring: zero padding,
//!    rows split into even and odd columns so the 4 columns of 8 neighbouring tiles are 4
//!    contiguous loads, and a GroupNorm(+SiLU) given as a per-channel affine map applied on the
//!    way, so it never exists as a tensor.
//! 2. per tile row: input transform into a packed panel, 16 micro-kernel GEMMs, output transform
//!    with bias (and an optional residual) straight into the NCHW output.
//!
//! A nearest 2x upsample of the input is folded in too: the source rows are staged as they are,
//! and since rows 1 and 2 (and columns 1 and 2) of every 4x4 patch of an upsampled image are
//! equal, 7 of the 16 transform points are exactly zero and skipped.

use std::arch::x86_64::__m256;

use pulp::{f32x8, x86::V3, Simd};
use rayon::prelude::*;

use super::group_norm::ChannelAffine;
use super::{
    affine_act, load, microkernel_dyn, pack_weight_blocks, run, store, with_scratch, CONV_MR,
    CONV_NR, LANES,
};

/// Transform points per tile.
const XI: usize = 16;
/// Bytes of per-task scratch (transformed input and GEMM output) to stay within L2.
const SCRATCH_BYTES: usize = 512 * 1024;

/// Parallel tasks per item: bands of consecutive tile rows, each staging its input rows into a
/// small ring as it goes (a staged row is shared by two consecutive tile rows).
const BANDS: usize = 8;
/// Staged rows kept per task: the 4 (3 when upsampling) a tile row reads.
const RING: usize = 4;

/// What to add to the convolution's output.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Residual<'a> {
    None,
    /// A tensor shaped like the output.
    Add(&'a [f32]),
    /// The output buffer already holds the residual: accumulate into it.
    InPlace,
}

/// Weights transformed and packed once at load time.
#[derive(Debug)]
pub(crate) struct Winograd3x3 {
    pub cin: usize,
    pub cout: usize,
    /// `XI` blocks of `pack_weight_blocks(U_xi)`, `U_xi` being `(cout, cin)`.
    u: Vec<f32>,
    bias: Vec<f32>,
}

impl Winograd3x3 {
    /// `w` is `(cout, cin, 3, 3)` row-major.
    pub fn new(w: &[f32], bias: Option<&[f32]>, cout: usize, cin: usize) -> Self {
        const G: [[f64; 3]; 4] = [
            [1.0, 0.0, 0.0],
            [0.5, 0.5, 0.5],
            [0.5, -0.5, 0.5],
            [0.0, 0.0, 1.0],
        ];
        let mut per_xi = vec![vec![0f32; cout * cin]; XI];
        for co in 0..cout {
            for ci in 0..cin {
                let k = &w[(co * cin + ci) * 9..(co * cin + ci + 1) * 9];
                // t = G k (4x3), u = t G^T (4x4)
                let mut t = [[0f64; 3]; 4];
                for (i, gi) in G.iter().enumerate() {
                    for (j, tij) in t[i].iter_mut().enumerate() {
                        *tij = (0..3).map(|r| gi[r] * k[r * 3 + j] as f64).sum();
                    }
                }
                for (i, ti) in t.iter().enumerate() {
                    for (j, gj) in G.iter().enumerate() {
                        let v: f64 = (0..3).map(|c| ti[c] * gj[c]).sum();
                        per_xi[i * 4 + j][co * cin + ci] = v as f32;
                    }
                }
            }
        }
        let u = per_xi
            .iter()
            .flat_map(|m| pack_weight_blocks(m, cout, cin))
            .collect();
        Self {
            cin,
            cout,
            u,
            bias: bias.map_or_else(|| vec![0.0; cout], <[f32]>::to_vec),
        }
    }

    /// Convolve one item `x` `(cin, h, w)` into `out` `(cout, hu, wu)` where `(hu, wu)` is
    /// `(h, w)`, or `(2h, 2w)` with `upsample`. `pre` is applied to the input first;
    /// `residual` is added last.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        s: V3,
        x: &[f32],
        (h, w): (usize, usize),
        upsample: bool,
        pre: Option<&ChannelAffine>,
        residual: Residual<'_>,
        out: &mut [f32],
    ) {
        if h == 0 || w == 0 {
            return;
        }
        let g = Geom::new(h, w, upsample, self.cin);
        let tc = tiles_per_chunk(self.cin, self.cout, g.twr);
        // Output rows 2 ty, 2 ty + 1 of every channel, grouped into bands of tile rows.
        let per_band = g.th.div_ceil(BANDS).max(1);
        let mut bands: Vec<Vec<Vec<&mut [f32]>>> = (0..g.th.div_ceil(per_band))
            .map(|_| (0..per_band).map(|_| Vec::new()).collect())
            .collect();
        for plane in out.chunks_mut(g.hu * g.wu) {
            for (ty, seg) in plane.chunks_mut(2 * g.wu).enumerate() {
                if let Some(t) = bands
                    .get_mut(ty / per_band)
                    .and_then(|b| b.get_mut(ty % per_band))
                {
                    t.push(seg);
                }
            }
        }
        let ctx = Ctx {
            s,
            wg: self,
            x,
            hw: (h, w),
            pre,
            g: &g,
            tc,
            residual,
        };
        let lens = [
            RING * g.rowlen,
            w,
            XI * v_stride(self.cin, tc),
            self.cout * XI * m_stride(tc),
        ];
        bands
            .into_par_iter()
            .enumerate()
            .for_each(|(band, mut rows)| {
                with_scratch(lens.iter().sum(), |buf| {
                    let (ring, rest) = buf.split_at_mut(lens[0]);
                    let (tmp, rest) = rest.split_at_mut(lens[1]);
                    let (v, m) = rest.split_at_mut(lens[2]);
                    let mut scratch = Scratch {
                        ring,
                        ring_rows: [usize::MAX; RING],
                        tmp,
                        v,
                        m,
                    };
                    for (i, segs) in rows.iter_mut().enumerate() {
                        let ty = band * per_band + i;
                        if ty < g.th {
                            run(
                                s,
                                #[inline(always)]
                                || ctx.tile_row(ty, segs, &mut scratch),
                            );
                        }
                    }
                })
            });
    }
}

/// Shapes of the tiling and of a staged row.
struct Geom {
    up: bool,
    hu: usize,
    wu: usize,
    /// Tile rows / columns; columns rounded up to whole micro-kernel panels.
    th: usize,
    twr: usize,
    /// Without upsampling, a channel's staged row is split in an even and an odd half of
    /// `region` floats each; with upsampling it is the padded source row. `row` is a channel's
    /// staged row, `rowlen` a staged row of all channels.
    region: usize,
    row: usize,
    rowlen: usize,
}

impl Geom {
    fn new(h: usize, w: usize, up: bool, cin: usize) -> Self {
        let (hu, wu) = if up { (2 * h, 2 * w) } else { (h, w) };
        let th = hu.div_ceil(2);
        let twr = wu.div_ceil(2).div_ceil(CONV_NR) * CONV_NR;
        let region = twr + LANES;
        let row = if up { region } else { 2 * region };
        Self {
            up,
            hu,
            wu,
            th,
            twr,
            region,
            row,
            rowlen: cin * row,
        }
    }

    /// Transform point `xi` is identically zero: with a nearest 2x upsampled input, rows 1 and
    /// 2 (and columns 1 and 2) of every 4x4 patch are equal, so `B^T d B` has a zero third row
    /// and column.
    #[inline(always)]
    fn skips(&self, xi: usize) -> bool {
        self.up && (xi / 4 == 2 || xi % 4 == 2)
    }
}

/// Distance between the transform points' blocks of `V` (`cin x nt` each), padded by a cache
/// line so the 16 blocks do not all map to the same L1 set.
fn v_stride(cin: usize, nt: usize) -> usize {
    cin * nt + CONV_NR
}

/// Distance between rows (`nt` tiles) of `M`, padded likewise.
fn m_stride(nt: usize) -> usize {
    nt + CONV_NR
}

fn tiles_per_chunk(cin: usize, cout: usize, twr: usize) -> usize {
    let fit = SCRATCH_BYTES / (4 * XI * (cin + cout)).max(1);
    (fit / CONV_NR)
        .max(1)
        .saturating_mul(CONV_NR)
        .min(twr.max(CONV_NR))
}

/// Zero-pad (and pre-process) input row `r - 1` into staged row `dst` (all channels):
/// everything outside the input is zero.
///
/// Without upsampling, a channel's row is split into an even half holding padded columns
/// 0, 2, 4, ... (input columns -1, 1, 3, ...) and an odd half holding padded columns 1, 3, 5, ...
/// (input 0, 2, ...), so that the 4 columns of 8 neighbouring tiles are 4 contiguous loads.
/// With upsampling the source is staged as it is (padded column `c` = source column `c - 1`):
/// the 4x4 patch of upsampled tile `(ty, tx)` is built from source rows and columns
/// `t - 1, t, t, t + 1`.
#[inline(always)]
fn stage_row(ctx: &Ctx<'_>, r: usize, dst: &mut [f32], tmp: &mut [f32]) {
    let (s, g, (h, w)) = (ctx.s, ctx.g, ctx.hw);
    let src_rows = if g.up { h } else { g.hu };
    if r == 0 || r > src_rows {
        dst.fill(0.0);
        return;
    }
    let sy = r - 1;
    for (ci, row) in dst.chunks_exact_mut(g.row).enumerate() {
        let src = &ctx.x[(ci * h + sy) * w..(ci * h + sy + 1) * w];
        let vals: &[f32] = match ctx.pre {
            Some(a) => {
                affine_act(s, src, tmp, a.scale[ci], a.shift[ci], a.silu);
                tmp
            }
            None => src,
        };
        if g.up {
            row[0] = 0.0;
            row[1..=w].copy_from_slice(vals);
            row[w + 1..].fill(0.0);
        } else {
            let (even, odd) = row.split_at_mut(g.region);
            let (ne, no) = (w / 2, w.div_ceil(2));
            even[0] = 0.0;
            for (e, v) in even[1..=ne].iter_mut().zip(vals.iter().skip(1).step_by(2)) {
                *e = *v;
            }
            even[ne + 1..].fill(0.0);
            for (o, v) in odd[..no].iter_mut().zip(vals.iter().step_by(2)) {
                *o = *v;
            }
            odd[no..].fill(0.0);
        }
    }
}

struct Scratch<'a> {
    /// Staged rows, slot `r % RING` holding staged row `ring_rows[slot]`.
    ring: &'a mut [f32],
    ring_rows: [usize; RING],
    /// One pre-processed input row.
    tmp: &'a mut [f32],
    v: &'a mut [f32],
    m: &'a mut [f32],
}

struct Ctx<'a> {
    s: V3,
    wg: &'a Winograd3x3,
    x: &'a [f32],
    hw: (usize, usize),
    pre: Option<&'a ChannelAffine>,
    g: &'a Geom,
    tc: usize,
    residual: Residual<'a>,
}

impl Ctx<'_> {
    /// Output rows `2 ty` and `2 ty + 1` of every output channel (`segs[co]`).
    #[inline(always)]
    fn tile_row(&self, ty: usize, segs: &mut [&mut [f32]], sc: &mut Scratch<'_>) {
        let g = self.g;
        // Staged rows 2 ty .. 2 ty + 4 (ty .. ty + 3 when upsampling), staged once per task.
        let (first, count) = if g.up { (ty, 3) } else { (2 * ty, 4) };
        for r in first..first + count {
            let slot = r % RING;
            if sc.ring_rows[slot] != r {
                let dst = &mut sc.ring[slot * g.rowlen..(slot + 1) * g.rowlen];
                stage_row(self, r, dst, sc.tmp);
                sc.ring_rows[slot] = r;
            }
        }
        let mut rows: [&[f32]; RING] = [&[]; RING];
        for (i, row) in rows.iter_mut().take(count).enumerate() {
            let slot = (first + i) % RING;
            *row = &sc.ring[slot * g.rowlen..(slot + 1) * g.rowlen];
        }
        let mut tc0 = 0;
        while tc0 < g.twr {
            let nt = self.tc.min(g.twr - tc0);
            if g.up {
                self.input_transform_up(&rows, tc0, nt, sc.v);
            } else {
                self.input_transform(&rows, tc0, nt, sc.v);
            }
            self.gemm(nt, sc.v, sc.m);
            self.output_transform(ty, tc0, nt, sc.m, segs);
            tc0 += nt;
        }
    }

    /// `V[xi][panel][ci][16]` for tiles `tc0 .. tc0 + nt` of tile row `ty`.
    #[inline(always)]
    fn input_transform(&self, rows: &[&[f32]; RING], tc0: usize, nt: usize, v: &mut [f32]) {
        let (s, g, cin) = (self.s, self.g, self.wg.cin);
        let mut parts = v.chunks_exact_mut(v_stride(cin, nt));
        // One slice per transform point; tile block `blk` of channel `ci` goes to the same
        // offset in each.
        let mut vx: [&mut [f32]; XI] = std::array::from_fn(|_| parts.next().unwrap_or_default());
        let z = s.splat_f32x8(0.0);
        for ci in 0..cin {
            let mut halves: [(&[f32], &[f32]); 4] = [(&[], &[]); 4];
            for (h, row) in halves.iter_mut().zip(rows) {
                *h = row[ci * g.row..(ci + 1) * g.row].split_at(g.region);
            }
            for blk in 0..nt / LANES {
                let tx0 = tc0 + blk * LANES;
                let mut d = [[z; 4]; 4];
                for (dr, (even, odd)) in d.iter_mut().zip(halves) {
                    *dr = [
                        load(s, even, tx0),
                        load(s, odd, tx0),
                        load(s, even, tx0 + 1),
                        load(s, odd, tx0 + 1),
                    ];
                }
                // B^T d: rows d0 - d2, d1 + d2, d2 - d1, d1 - d3.
                let mut t = [[z; 4]; 4];
                for c in 0..4 {
                    t[0][c] = s.sub_f32s(d[0][c], d[2][c]);
                    t[1][c] = s.add_f32s(d[1][c], d[2][c]);
                    t[2][c] = s.sub_f32s(d[2][c], d[1][c]);
                    t[3][c] = s.sub_f32s(d[1][c], d[3][c]);
                }
                let off = ((blk / 2) * cin + ci) * CONV_NR + (blk % 2) * LANES;
                for (ti, vrow) in t.iter().zip(vx.chunks_exact_mut(4)) {
                    // (.) B: columns t0 - t2, t1 + t2, t2 - t1, t1 - t3.
                    store(vrow[0], off, s.sub_f32s(ti[0], ti[2]));
                    store(vrow[1], off, s.add_f32s(ti[1], ti[2]));
                    store(vrow[2], off, s.sub_f32s(ti[2], ti[1]));
                    store(vrow[3], off, s.sub_f32s(ti[1], ti[3]));
                }
            }
        }
    }

    /// The input transform of tiles of a nearest 2x upsampled input, read from the staged
    /// source: only the 9 transform points that are not identically zero are written. With
    /// `a, b, c` the source values at columns `tx - 1, tx, tx + 1` (rows likewise), the patch
    /// columns are `a, b, b, c`, and the general formulas reduce exactly (the doubled value is
    /// the same `b + b` sum) to the ones below.
    #[inline(always)]
    fn input_transform_up(&self, rows: &[&[f32]; RING], tc0: usize, nt: usize, v: &mut [f32]) {
        let (s, g, cin) = (self.s, self.g, self.wg.cin);
        let mut parts = v.chunks_exact_mut(v_stride(cin, nt));
        let vx: [&mut [f32]; XI] = std::array::from_fn(|_| parts.next().unwrap_or_default());
        // rows: staged rows ty, ty + 1, ty + 2 = source rows ty - 1, ty, ty + 1.
        let z = s.splat_f32x8(0.0);
        for ci in 0..cin {
            let mut src: [&[f32]; 3] = [&[]; 3];
            for (sr, row) in src.iter_mut().zip(rows) {
                *sr = &row[ci * g.row..(ci + 1) * g.row];
            }
            for blk in 0..nt / LANES {
                let tx0 = tc0 + blk * LANES;
                // d[r] = source columns (tx - 1, tx, tx + 1) of source row ty - 1 + r.
                let mut d = [[z; 3]; 3];
                for (dr, sr) in d.iter_mut().zip(src) {
                    *dr = [load(s, sr, tx0), load(s, sr, tx0 + 1), load(s, sr, tx0 + 2)];
                }
                // B^T d with rows (d0, d1, d1, d2): d0 - d1, d1 + d1, 0, d1 - d2.
                let mut t = [[z; 3]; 3];
                for c in 0..3 {
                    t[0][c] = s.sub_f32s(d[0][c], d[1][c]);
                    t[1][c] = s.add_f32s(d[1][c], d[1][c]);
                    t[2][c] = s.sub_f32s(d[1][c], d[2][c]);
                }
                let off = ((blk / 2) * cin + ci) * CONV_NR + (blk % 2) * LANES;
                for (ti, i) in t.iter().zip([0, 1, 3]) {
                    // (.) B with columns (a, b, b, c): a - b, b + b, 0, b - c.
                    store(vx[i * 4], off, s.sub_f32s(ti[0], ti[1]));
                    store(vx[i * 4 + 1], off, s.add_f32s(ti[1], ti[1]));
                    store(vx[i * 4 + 3], off, s.sub_f32s(ti[1], ti[2]));
                }
            }
        }
    }

    /// `M[co][xi][tile] = sum_ci U_xi[co][ci] V[xi][ci][tile]`.
    #[inline(always)]
    fn gemm(&self, nt: usize, v: &[f32], m: &mut [f32]) {
        let (s, cin, cout) = (self.s, self.wg.cin, self.wg.cout);
        let (npanel, vs, ms) = (nt / CONV_NR, v_stride(cin, nt), m_stride(nt));
        for xi in 0..XI {
            if self.g.skips(xi) {
                continue;
            }
            let u = &self.wg.u[xi * cout * cin..(xi + 1) * cout * cin];
            for b0 in (0..cout).step_by(CONV_MR) {
                let cb = CONV_MR.min(cout - b0);
                let a = &u[b0 * cin..(b0 + cb) * cin];
                for p in 0..npanel {
                    let b = &v[xi * vs + p * cin * CONV_NR..xi * vs + (p + 1) * cin * CONV_NR];
                    microkernel_dyn(
                        s,
                        cb,
                        a,
                        b,
                        cin,
                        #[inline(always)]
                        |c, vals| {
                            let o = ((b0 + c) * XI + xi) * ms + p * CONV_NR;
                            m[o..o + CONV_NR].copy_from_slice(&vals);
                        },
                    );
                }
            }
        }
    }

    /// `Y = A^T M A + bias (+ residual)`, written to output rows `2 ty`, `2 ty + 1`.
    #[inline(always)]
    fn output_transform(
        &self,
        ty: usize,
        tc0: usize,
        nt: usize,
        m: &[f32],
        segs: &mut [&mut [f32]],
    ) {
        let (s, g) = (self.s, self.g);
        for (co, seg) in segs.iter_mut().enumerate() {
            let bias = s.splat_f32x8(self.wg.bias[co]);
            let ms = m_stride(nt);
            let mut rows = m[co * XI * ms..(co + 1) * XI * ms].chunks_exact(ms);
            let mx: [&[f32]; XI] = std::array::from_fn(|_| rows.next().unwrap_or_default());
            for blk in 0..nt / LANES {
                let x0 = 2 * (tc0 + blk * LANES);
                if x0 >= g.wu {
                    break;
                }
                let o = blk * LANES;
                let (t0, t1) = if g.up {
                    a_t_m_up(s, &mx, o)
                } else {
                    a_t_m(s, &mx, o)
                };
                let n = CONV_NR.min(g.wu - x0);
                for (r, (lo, hi)) in [out_row(s, &t0, bias), out_row(s, &t1, bias)]
                    .into_iter()
                    .enumerate()
                {
                    let y = 2 * ty + r;
                    if y >= g.hu {
                        break;
                    }
                    let d0 = r * g.wu + x0;
                    let res = match self.residual {
                        Residual::None => None,
                        Residual::Add(res) => Some(&res[(co * g.hu + y) * g.wu + x0..]),
                        Residual::InPlace => Some(&seg[d0..]),
                    };
                    if n == CONV_NR {
                        let (lo, hi) = match res {
                            Some(res) => (
                                s.add_f32s(load(s, res, 0), lo),
                                s.add_f32s(load(s, res, LANES), hi),
                            ),
                            None => (lo, hi),
                        };
                        store(seg, d0, lo);
                        store(seg, d0 + LANES, hi);
                    } else {
                        let mut vals = [0f32; CONV_NR];
                        store(&mut vals, 0, lo);
                        store(&mut vals, LANES, hi);
                        if let Some(res) = res {
                            for (v, rv) in vals.iter_mut().zip(res).take(n) {
                                *v += rv;
                            }
                        }
                        seg[d0..d0 + n].copy_from_slice(&vals[..n]);
                    }
                }
            }
        }
    }
}

/// `A^T M` for 8 tiles at offset `o` of the 16 rows `mx` of `M`: rows `m0 + m1 + m2` and
/// `m1 - m2 - m3`.
#[inline(always)]
fn a_t_m(s: V3, mx: &[&[f32]; XI], o: usize) -> ([f32x8; 4], [f32x8; 4]) {
    let z = s.splat_f32x8(0.0);
    let (mut t0, mut t1) = ([z; 4], [z; 4]);
    for j in 0..4 {
        let (m0, m1) = (load(s, mx[j], o), load(s, mx[4 + j], o));
        let (m2, m3) = (load(s, mx[8 + j], o), load(s, mx[12 + j], o));
        t0[j] = s.add_f32s(s.add_f32s(m0, m1), m2);
        t1[j] = s.sub_f32s(s.sub_f32s(m1, m2), m3);
    }
    (t0, t1)
}

/// [`a_t_m`] when row and column 2 of `M` are zero (upsampled input, see [`Geom::skips`]):
/// the same sums without the zero terms (exact: adding or subtracting zero changes nothing).
#[inline(always)]
fn a_t_m_up(s: V3, mx: &[&[f32]; XI], o: usize) -> ([f32x8; 4], [f32x8; 4]) {
    let z = s.splat_f32x8(0.0);
    let (mut t0, mut t1) = ([z; 4], [z; 4]);
    for j in [0, 1, 3] {
        let (m0, m1, m3) = (
            load(s, mx[j], o),
            load(s, mx[4 + j], o),
            load(s, mx[12 + j], o),
        );
        t0[j] = s.add_f32s(m0, m1);
        t1[j] = s.sub_f32s(m1, m3);
    }
    (t0, t1)
}

/// One output row of 8 tiles from `A^T M` (`t`): columns `t0 + t1 + t2` and `t1 - t2 - t3`
/// plus bias, interleaved into 16 consecutive pixels.
#[inline(always)]
fn out_row(s: V3, t: &[f32x8; 4], bias: f32x8) -> (f32x8, f32x8) {
    let a = s.add_f32s(s.add_f32s(s.add_f32s(t[0], t[1]), t[2]), bias);
    let b = s.add_f32s(s.sub_f32s(s.sub_f32s(t[1], t[2]), t[3]), bias);
    interleave(s, a, b)
}

/// `([a0, b0, .. a3, b3], [a4, b4, .. a7, b7])`.
#[inline(always)]
fn interleave(s: V3, a: f32x8, b: f32x8) -> (f32x8, f32x8) {
    let (a, b): (__m256, __m256) = (pulp::cast(a), pulp::cast(b));
    let lo = s.avx._mm256_unpacklo_ps(a, b);
    let hi = s.avx._mm256_unpackhi_ps(a, b);
    (
        pulp::cast(s.avx._mm256_permute2f128_ps::<0x20>(lo, hi)),
        pulp::cast(s.avx._mm256_permute2f128_ps::<0x31>(lo, hi)),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::pipeline::kernels::avx2::token_for_test;

    fn rnd(n: usize, seed: u64) -> Vec<f32> {
        let mut st = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
        (0..n)
            .map(|_| {
                st ^= st << 13;
                st ^= st >> 7;
                st ^= st << 17;
                ((st >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Direct convolution in f64 (the reference), with optional upsample and residual.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        x: &[f32],
        w: &[f32],
        b: &[f32],
        (cin, cout, h, wd): (usize, usize, usize, usize),
        up: bool,
        res: Option<&[f32]>,
    ) -> Vec<f64> {
        let (hu, wu) = if up { (2 * h, 2 * wd) } else { (h, wd) };
        let mut out = vec![0f64; cout * hu * wu];
        for co in 0..cout {
            for y in 0..hu {
                for xx in 0..wu {
                    let mut acc = b[co] as f64;
                    for ci in 0..cin {
                        for dy in 0..3 {
                            for dx in 0..3 {
                                let (iy, ix) = (y as isize + dy - 1, xx as isize + dx - 1);
                                if iy < 0 || ix < 0 || iy >= hu as isize || ix >= wu as isize {
                                    continue;
                                }
                                let (sy, sx) = if up {
                                    (iy as usize / 2, ix as usize / 2)
                                } else {
                                    (iy as usize, ix as usize)
                                };
                                acc += w[((co * cin + ci) * 3 + dy as usize) * 3 + dx as usize]
                                    as f64
                                    * x[(ci * h + sy) * wd + sx] as f64;
                            }
                        }
                    }
                    let i = (co * hu + y) * wu + xx;
                    out[i] = acc + res.map_or(0.0, |r| r[i] as f64);
                }
            }
        }
        out
    }

    #[test]
    fn matches_direct_convolution() {
        let Some(s) =
            token_for_test("pipeline::kernels::avx2::winograd::tests::matches_direct_convolution")
        else {
            return;
        };
        for &(cin, cout, h, w, up, with_res) in &[
            (3, 5, 7, 9, false, false),
            (13, 7, 12, 37, false, true),
            (16, 32, 8, 8, true, false),
            (9, 3, 5, 6, true, true),
            (32, 13, 33, 17, false, false),
            (1, 1, 1, 1, false, false),
        ] {
            let x = rnd(cin * h * w, 1);
            let wt = rnd(cout * cin * 9, 2);
            let b = rnd(cout, 3);
            let (hu, wu) = if up { (2 * h, 2 * w) } else { (h, w) };
            let res = with_res.then(|| rnd(cout * hu * wu, 4));
            let conv = Winograd3x3::new(&wt, Some(&b), cout, cin);
            let mut out = vec![f32::NAN; cout * hu * wu];
            let residual = res.as_deref().map_or(Residual::None, Residual::Add);
            conv.forward(s, &x, (h, w), up, None, residual, &mut out);
            // The same residual accumulated in place.
            if let Some(r) = &res {
                let mut acc = r.clone();
                conv.forward(s, &x, (h, w), up, None, Residual::InPlace, &mut acc);
                assert_eq!(acc, out, "in-place residual");
            }
            let want = reference(&x, &wt, &b, (cin, cout, h, w), up, res.as_deref());
            let scale = (cin * 9) as f64;
            let err = out
                .iter()
                .zip(&want)
                .map(|(a, b)| (*a as f64 - b).abs())
                .fold(0f64, f64::max);
            // Unit-scale inputs; sums of 9 * cin products: allow a few ulps of the sum's scale.
            assert!(
                err <= 1e-6 * scale.sqrt() * 4.0,
                "cin {cin} cout {cout} {h}x{w} up {up}: err {err}"
            );
        }
    }
}
