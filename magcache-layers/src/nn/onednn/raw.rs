//! A bf16 product on slices of bf16 pairs, for the attention's two products (`nn::attention`),
//! and the key of a plain linear product.

use super::{Key, OneDnn, Wei, ENV};
use magcache_core::{Error, Result};
use std::ffi::c_void;

impl OneDnn {
    /// `out [m x n] = a [m x k] . b [k x n]`, f32 accumulation and output, on `threads` OpenMP
    /// threads (1 from a task of a thread pool). `a` and `b` hold bf16 values as pairs (the low half
    /// of each `u32` the even element: `bf16_gemm`'s rounding, in memory order); `a`'s rows are
    /// `a_row` bf16 apart, `b`'s element `(i, j)` is at bf16 offset `i * b_strides[0] + j *
    /// b_strides[1]`. Wherever oneDNN implements a bf16 product ([`Self::bf16_implemented`]).
    pub fn bf16_into(
        &self,
        (a, a_row): (&[u32], usize),
        (b, b_strides): (&[u32], [usize; 2]),
        (m, k, n): (usize, usize, usize),
        out: &mut [f32],
        threads: usize,
    ) -> Result<()> {
        if m == 0 || k == 0 || n == 0 {
            out.iter_mut().take(m * n).for_each(|o| *o = 0.0);
            return Ok(());
        }
        if !within_pairs(b.len(), (k, n), b_strides) {
            return Err(Error::msg(format!(
                "{ENV}: a bf16 product [{m} x {k}] by [{k} x {n}]: its right operand's strides reach past its values"
            )));
        }
        let wei = Wei {
            ptr: b.as_ptr() as *const c_void,
            strides: b_strides,
            format: 0,
        };
        self.bf16_on((a, a_row), wei, (m, k, n), out, threads)
            .map(|_| ())
    }

    /// [`Self::bf16_into`] on `packed`, `b` packed once ([`Self::pack_pairs`]), where oneDNN takes
    /// its layout for `m` rows; else (or without one) on the plain `b`.
    pub fn bf16_into_packed(
        &self,
        packed: Option<&super::PackedWeight>,
        a: (&[u32], usize),
        b: (&[u32], [usize; 2]),
        (m, k, n): (usize, usize, usize),
        out: &mut [f32],
        threads: usize,
    ) -> Result<()> {
        if let Some(p) = packed {
            if p.bf16_into(a, m, out, threads)? {
                return Ok(());
            }
        }
        self.bf16_into(a, b, (m, k, n), out, threads)
    }

    /// [`Self::bf16_into`] by the right operand `wei` (plain, with its extent checked by the
    /// caller, or packed); `Ok(false)`, nothing written, when a packed layout is refused for `m`
    /// rows.
    pub(super) fn bf16_on(
        &self,
        (a, a_row): (&[u32], usize),
        wei: Wei,
        (m, k, n): (usize, usize, usize),
        out: &mut [f32],
        threads: usize,
    ) -> Result<bool> {
        if m == 0 || k == 0 || n == 0 {
            out.iter_mut().take(m * n).for_each(|o| *o = 0.0);
            return Ok(true);
        }
        let a_end = (m - 1) * a_row + k;
        if !self.bf16 || a_end > 2 * a.len() || out.len() < m * n {
            return Err(Error::msg(format!(
                "{ENV}: a bf16 product [{m} x {k}] by [{k} x {n}] out of its operands' bounds or not implemented here"
            )));
        }
        let key = Key {
            m,
            k,
            n,
            bf16: true,
            bias: false,
            src_strides: [a_row, 1],
            wei_strides: wei.strides,
            wei_format: wei.format,
            epilogue: Default::default(),
            threads,
        };
        if wei.format != 0 && !self.fits(key) {
            return Ok(false);
        }
        let ptrs = (a.as_ptr() as *const c_void, wei.ptr);
        // SAFETY: `a` and `out` were checked above in bf16 elements (two per `u32`), the right
        // operand by the caller (its strides, or a packed layout's whole buffer), all held.
        unsafe { self.execute(key, ptrs, std::ptr::null(), out.as_mut_ptr().cast()) }
            .map_err(|e| Error::msg(format!("{ENV}: {e}")))?;
        self.counted(false);
        Ok(true)
    }
}

/// Whether a `[k x n]` operand (k, n >= 1) whose element `(i, j)` is at bf16 offset
/// `i * strides[0] + j * strides[1]` lies within `len` bf16 pairs.
pub(super) fn within_pairs(len: usize, (k, n): (usize, usize), strides: [usize; 2]) -> bool {
    (k - 1) * strides[0] + (n - 1) * strides[1] < 2 * len
}

impl Key {
    /// Contiguous activations by a linear layer's transposed weight, no bias, on `threads`.
    pub(super) fn plain(m: usize, k: usize, n: usize, bf16: bool, threads: usize) -> Key {
        let (bias, src_strides, wei_strides) = (false, [k, 1], [1, k]);
        Key {
            m,
            k,
            n,
            bf16,
            bias,
            src_strides,
            wei_strides,
            wei_format: 0,
            epilogue: Default::default(),
            threads,
        }
    }
}
