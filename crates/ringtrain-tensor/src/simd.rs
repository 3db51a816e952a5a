//! Runtime dispatch to AVX-512 or AVX2 + FMA code.
//!
//! The workspace is built for baseline x86-64 (SSE2), so one binary runs on every x86-64
//! machine. The hot elementwise kernels (recurrent cells, activations, optimizer updates) are
//! compiled again with AVX-512, and with AVX2 and FMA, and [`fast`] picks the widest copy the
//! CPU runs: four or two times the vector width for loops the compiler already vectorises. Rust
//! never contracts `a·b + c` into an FMA on its own and never reorders a float sum, so every
//! copy gives bitwise-identical results (tested). The matrix kernels in [`crate::gemm`] use the
//! same [`Isa`] choice with explicit intrinsics.

use std::sync::atomic::{AtomicU8, Ordering};

/// An instruction set a kernel copy is compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Avx512 = 0,
    Avx2 = 1,
    Scalar = 2,
}

/// The widest copy [`Isa::detect`] may pick (0 = AVX-512, 1 = AVX2, 2 = scalar).
static CAP: AtomicU8 = AtomicU8::new(0);

impl Isa {
    /// Keeps every later kernel call at or below `isa`, to run as an older CPU would (the
    /// binary's `--isa`; results are the same bits either way, which is what it lets a user
    /// check on one machine).
    pub fn limit(isa: Isa) {
        CAP.store(isa as u8, Ordering::Relaxed);
    }

    /// The widest copy this CPU runs, within [`Isa::limit`].
    pub fn detect() -> Isa {
        let best = Isa::cpu();
        match CAP.load(Ordering::Relaxed) {
            2 => Isa::Scalar,
            1 if best == Isa::Avx512 => Isa::Avx2,
            _ => best,
        }
    }

    /// The widest copy this CPU runs.
    fn cpu() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f") && has!("avx512bw") && has!("avx512dq") && has!("avx512vl") && has!("fma") {
                return Isa::Avx512;
            }
            if has!("avx2") && has!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    }

    /// Whether this CPU can run `self` (whatever the limit).
    pub fn available(self) -> bool {
        match self {
            Isa::Scalar => true,
            Isa::Avx2 => matches!(Isa::cpu(), Isa::Avx2 | Isa::Avx512),
            Isa::Avx512 => Isa::cpu() == Isa::Avx512,
        }
    }
}

/// Runs `f` compiled for the widest instruction set the CPU supports. `f` should be marked
/// `#[inline(always)]` and hold the kernel (or call only `#[inline(always)]` code), so that the
/// kernel's body is generated inside each copy.
#[inline(always)]
pub fn fast<R>(f: impl FnOnce() -> R) -> R {
    on(Isa::detect(), f)
}

/// Runs `f` compiled for `isa` (tests compare the copies).
///
/// # Panics
/// When the CPU cannot run `isa`.
#[inline(always)]
pub fn on<R>(isa: Isa, f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[allow(unsafe_code)] // reason: calling a target-feature function after checking the CPU has it
        match isa {
            // SAFETY: `detect` found every feature enabled on `avx512`.
            Isa::Avx512 if isa.available() => return unsafe { avx512(f) },
            // SAFETY: `detect` found both features enabled on `avx2_fma`.
            Isa::Avx2 if isa.available() => return unsafe { avx2_fma(f) },
            Isa::Scalar => {}
            _ => panic!("this CPU cannot run {isa:?} code"),
        }
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
fn avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn avx2_fma<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(test)]
mod tests {
    use super::Isa;

    #[test]
    fn every_copy_gives_the_same_bits() {
        let xs: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) / 37.0).collect();
        let run = |isa| {
            super::on(
                isa,
                #[inline(always)]
                || {
                    let mut out: Vec<f32> = xs
                        .iter()
                        .map(|&x| crate::fused::tanh(x) * 0.5 + crate::fused::sigmoid(x) * x * x)
                        .collect();
                    out.push(xs.iter().sum());
                    out
                },
            )
        };
        let plain = run(Isa::Scalar);
        for isa in [Isa::Avx2, Isa::Avx512].into_iter().filter(|i| i.available()) {
            assert!(
                run(isa).iter().zip(&plain).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{isa:?}"
            );
        }
    }
}
