//! Runtime dispatch to AVX2 + FMA code.
//!
//! The workspace is built for baseline x86-64 (SSE2), so one binary runs on every x86-64
//! machine. The hot elementwise kernels (recurrent cells, activations) are compiled a second
//! time with AVX2 and FMA enabled, and [`fast`] picks that copy when the CPU has both: twice
//! the vector width for loops the compiler already vectorises. Rust never contracts `a·b + c`
//! into an FMA on its own, so both copies give bitwise-identical results.

/// Runs `f`, compiled with AVX2 and FMA when the CPU supports them. `f` should be marked
/// `#[inline(always)]` and hold the kernel (or call only `#[inline(always)]` code), so that the
/// kernel's body is generated inside the AVX2 copy.
#[inline(always)]
pub fn fast<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            #[allow(unsafe_code)] // reason: calling a target-feature function after checking the CPU has it
            // SAFETY: the CPU supports both features enabled on `avx2_fma`, checked just above.
            return unsafe { avx2_fma(f) };
        }
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn avx2_fma<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(test)]
mod tests {
    #[test]
    fn fast_path_gives_the_same_bits() {
        let xs: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) / 37.0).collect();
        let plain: Vec<f32> = xs.iter().map(|&x| crate::fused::tanh(x) * 0.5 + x * x).collect();
        let fast = super::fast(|| {
            xs.iter()
                .map(|&x| crate::fused::tanh(x) * 0.5 + x * x)
                .collect::<Vec<f32>>()
        });
        assert_eq!(plain, fast);
    }
}
