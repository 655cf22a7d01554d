//! The AVX512-BF16 kernel's micro-kernel: one tile of up to [`MR`](super::MR) rows by a panel of
//! [`NR`] columns on `vdpbf16ps`.

use super::NR;

/// One tile of the product: up to [`MR`](super::MR) rows of `a` (bf16 pairs, stride `lda`) against a panel
/// block `b` of `kc` pairs, into `c` (stride `ldc`, `cols` valid columns), added to what `c` holds
/// unless `first`.
pub(super) struct Tile {
    pub(super) a: *const u32,
    pub(super) lda: usize,
    pub(super) b: *const u16,
    pub(super) kc: usize,
    pub(super) c: *mut f32,
    pub(super) ldc: usize,
    pub(super) cols: usize,
    pub(super) first: bool,
}

#[cfg(target_arch = "x86_64")]
impl Tile {
    pub(super) unsafe fn run(&self, rows: usize) {
        match rows {
            12 => self.kernel::<12>(),
            11 => self.kernel::<11>(),
            10 => self.kernel::<10>(),
            9 => self.kernel::<9>(),
            8 => self.kernel::<8>(),
            7 => self.kernel::<7>(),
            6 => self.kernel::<6>(),
            5 => self.kernel::<5>(),
            4 => self.kernel::<4>(),
            3 => self.kernel::<3>(),
            2 => self.kernel::<2>(),
            _ => self.kernel::<1>(),
        }
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn kernel<const R: usize>(&self) {
        use std::arch::x86_64::*;
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for q in 0..self.kc {
            let bq = self.b.add(q * NR * 2) as *const __m512i;
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bq));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bq.add(1)));
            for (r, acc) in acc.iter_mut().enumerate() {
                let pair = *self.a.add(r * self.lda + q) as i32;
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                acc[0] = _mm512_dpbf16_ps(acc[0], av, b0);
                acc[1] = _mm512_dpbf16_ps(acc[1], av, b1);
            }
        }
        let lo = self.cols.min(16);
        let hi = self.cols.saturating_sub(16);
        let mask = |n: usize| -> __mmask16 { ((1u32 << n) - 1) as __mmask16 };
        for (r, acc) in acc.iter().enumerate() {
            let c = self.c.add(r * self.ldc);
            for (h, (&v, n)) in acc.iter().zip([lo, hi]).enumerate() {
                if n == 0 {
                    continue;
                }
                let at = c.add(16 * h);
                let v = if self.first {
                    v
                } else {
                    _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask(n), at))
                };
                _mm512_mask_storeu_ps(at, mask(n), v);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
impl Tile {
    pub(super) unsafe fn run(&self, _: usize) {
        unreachable!("the bf16 kernel runs on x86_64 only")
    }
}
