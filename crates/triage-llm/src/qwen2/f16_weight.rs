//! `dx = dy·W` for f32 rows `dy` and a dense f16 weight `W`, the product every training
//! backward pass makes with each frozen weight (`kernels::frozen_grad`).
//!
//! candle multiplies f16 by f16: the rows are rounded to f16, and the gemm crate converts both
//! operands to f32 while packing them and converts the f16 result back after every block of
//! the inner dimension. On the 1.5B's training step that packing and conversion took ~16 % of
//! the time (perf, `docs/benchmarks.md`), and rounding gradients to f16 loses the small ones.
//! This kernel reads the weight's f16 values straight from its rows and widens them in
//! registers (F16C), accumulates in f32, and never packs: `W`'s rows are already laid out
//! along the output's columns. Tiles are 6 rows × 16 columns of the output (12 AVX
//! accumulators), over blocks of 256 along the inner dimension, columns split over candle's
//! thread pool. Without AVX2, FMA and F16C, `None`: the caller keeps candle's product.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// Rows of the output per tile.
const MR: usize = 6;
/// Columns of the output per tile (two 8-lane registers).
const NR: usize = 16;
/// Inner-dimension block: a tile's slice of `W` (256 × 16 f16 = 8 KiB) stays in L1 while
/// every row strip passes over it.
const KC: usize = 256;

/// `dy·W` for `dy` f32 `[m, k]` and `w` f16 `[k, n]` on the CPU, when this CPU has AVX2,
/// FMA and F16C; `None` otherwise (or for other dtypes or devices).
pub(crate) fn rows_times_f16(dy: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    if !supported() || !dy.device().is_cpu() || dy.dtype() != DType::F32 || w.dtype() != DType::F16 {
        return Ok(None);
    }
    Ok(Some(
        dy.contiguous()?
            .apply_op2_no_bwd(&w.contiguous()?, &RowsTimesF16)?,
    ))
}

fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

struct RowsTimesF16;

impl CustomOp2 for RowsTimesF16 {
    fn name(&self) -> &'static str {
        "rows-times-f16"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = l1.shape().dims2()?;
        let (k2, n) = l2.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("rows-times-f16: [{m}, {k}]·[{k2}, {n}]");
        }
        let (Some((a0, a1)), Some((b0, b1))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            candle_core::bail!("rows-times-f16: contiguous operands expected");
        };
        let a = &s1.as_slice::<f32>()?[a0..a1];
        let b = match s2 {
            CpuStorage::F16(v) => &v[b0..b1],
            _ => candle_core::bail!("rows-times-f16: an f16 weight expected"),
        };
        let mut c = vec![0f32; m * n];
        #[cfg(target_arch = "x86_64")]
        {
            // Each worker owns whole 16-column blocks of the output: disjoint writes.
            let c_ptr = c.as_mut_ptr() as usize;
            let blocks = n.div_ceil(NR);
            candle_core::utils::barrier_pool().execute_chunked(blocks, |range| {
                let cols = range.start * NR..(range.end * NR).min(n);
                // SAFETY: `supported()` checked the CPU features; the slices' sizes are
                // `m·k`, `k·n` and `m·n`; this worker writes only the columns `cols`.
                unsafe { x86::gemm(a, b.as_ptr() as *const u16, c_ptr as *mut f32, m, k, n, cols) }
            });
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (a, b);
            candle_core::bail!("rows-times-f16: x86-64 only");
        }
        Ok((CpuStorage::F32(c), Shape::from((m, n))))
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{KC, MR, NR};

    /// `c[.., cols] = a·b[.., cols]`, `a` `[m, k]` f32, `b` `[k, n]` f16 bits, `c` `[m, n]`
    /// zeroed.
    ///
    /// # Safety
    /// AVX2, FMA and F16C are available; `a` holds `m·k` values, `b` `k·n`, `c` `m·n`, and no
    /// other thread writes `c`'s columns `cols`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn gemm(
        a: &[f32],
        b: *const u16,
        c: *mut f32,
        m: usize,
        k: usize,
        n: usize,
        cols: Range<usize>,
    ) {
        debug_assert_eq!(a.len(), m * k);
        // W's rows are `n` values apart: read in place, a tile's 256 rows would be 256 pages
        // (TLB misses on every step). Each 256 × 16 panel is widened to f32 once, contiguous,
        // and then serves every row strip.
        let mut panel = vec![0f32; KC * NR];
        for p0 in (0..k).step_by(KC) {
            let kc = KC.min(k - p0);
            let mut j = cols.start;
            while j < cols.end {
                let w = NR.min(cols.end - j);
                let b_tile = b.add(p0 * n + j);
                if w == NR {
                    pack(b_tile, n, kc, &mut panel);
                }
                let mut i = 0;
                while i < m {
                    let rows = MR.min(m - i);
                    let a_tile = a.as_ptr().add(i * k + p0);
                    let c_tile = c.add(i * n + j);
                    if w == NR {
                        let b = panel.as_ptr();
                        match rows {
                            6 => tile::<6>(a_tile, k, b, c_tile, n, kc),
                            5 => tile::<5>(a_tile, k, b, c_tile, n, kc),
                            4 => tile::<4>(a_tile, k, b, c_tile, n, kc),
                            3 => tile::<3>(a_tile, k, b, c_tile, n, kc),
                            2 => tile::<2>(a_tile, k, b, c_tile, n, kc),
                            _ => tile::<1>(a_tile, k, b, c_tile, n, kc),
                        }
                    } else {
                        edge(a_tile, k, b_tile, n, c_tile, n, kc, rows, w);
                    }
                    i += rows;
                }
                j += w;
            }
        }
    }

    /// `panel[p·16 + q] = b[p·ldb + q]` widened to f32, for `p < kc`, `q < 16`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn pack(b: *const u16, ldb: usize, kc: usize, panel: &mut [f32]) {
        debug_assert!(panel.len() >= kc * NR);
        let out = panel.as_mut_ptr();
        for p in 0..kc {
            let bp = b.add(p * ldb);
            _mm256_storeu_ps(
                out.add(p * NR),
                _mm256_cvtph_ps(_mm_loadu_si128(bp as *const __m128i)),
            );
            _mm256_storeu_ps(
                out.add(p * NR + 8),
                _mm256_cvtph_ps(_mm_loadu_si128(bp.add(8) as *const __m128i)),
            );
        }
    }

    /// `C[R×16] += A[R×kc]·B[kc×16]` for a packed `B`, accumulated in registers.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile<const R: usize>(
        a: *const f32,
        lda: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        kc: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for (r, row) in acc.iter_mut().enumerate() {
            row[0] = _mm256_loadu_ps(c.add(r * ldc));
            row[1] = _mm256_loadu_ps(c.add(r * ldc + 8));
        }
        for p in 0..kc {
            let b0 = _mm256_loadu_ps(b.add(p * NR));
            let b1 = _mm256_loadu_ps(b.add(p * NR + 8));
            for (r, row) in acc.iter_mut().enumerate() {
                let x = _mm256_broadcast_ss(&*a.add(r * lda + p));
                row[0] = _mm256_fmadd_ps(x, b0, row[0]);
                row[1] = _mm256_fmadd_ps(x, b1, row[1]);
            }
        }
        for (r, row) in acc.iter().enumerate() {
            _mm256_storeu_ps(c.add(r * ldc), row[0]);
            _mm256_storeu_ps(c.add(r * ldc + 8), row[1]);
        }
    }

    /// The last columns (fewer than 16), one value at a time.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn edge(
        a: *const f32,
        lda: usize,
        b: *const u16,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
        kc: usize,
        rows: usize,
        cols: usize,
    ) {
        for r in 0..rows {
            for q in 0..cols {
                let mut s = *c.add(r * ldc + q);
                for p in 0..kc {
                    let h = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(*b.add(p * ldb + q))));
                    s += *a.add(r * lda + p) * _mm_cvtss_f32(h);
                }
                *c.add(r * ldc + q) = s;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qwen2::ops::tests::{fixed, max_rel_diff};

    /// Equal to the f32 product of the same values, for shapes with partial tiles in every
    /// dimension (rows not a multiple of 6, columns not of 16, inner not of 256).
    #[test]
    fn equals_the_f32_product() {
        if !supported() {
            eprintln!("skipped: this CPU lacks AVX2, FMA or F16C");
            return;
        }
        for (m, k, n, seed) in [
            (13, 300, 40, 1),
            (6, 256, 32, 2),
            (1, 7, 3, 3),
            (70, 600, 1536, 4),
        ] {
            let dy = fixed((m, k), 0.0, 1.0, seed);
            let w = fixed((k, n), 0.0, 0.05, seed + 10).to_dtype(DType::F16).unwrap();
            let want = dy.matmul(&w.to_dtype(DType::F32).unwrap()).unwrap();
            let got = rows_times_f16(&dy, &w).unwrap().expect("supported");
            assert_eq!(got.dims(), &[m, n]);
            let d = max_rel_diff(&got, &want);
            assert!(d < 1e-5, "[{m}, {k}]·[{k}, {n}]: relative difference {d}");
        }
    }
}
