//! Explicit control of the two thread pools a worker uses.
//!
//! OpenBLAS keeps its own pthread pool; rayon keeps another. With several worker processes on
//! one machine, each pool sized to "all cores" would oversubscribe the CPU many times over.
//! The binary therefore decides both counts once at start-up (flags or `RINGTRAIN_THREADS`,
//! defaulting to cores / local workers) and calls [`configure`]; library code never does.

/// Thread counts for one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadConfig {
    /// Threads OpenBLAS may use inside one sgemm.
    pub blas: usize,
    /// Threads in the global rayon pool (elementwise kernels, im2col, ...).
    pub rayon: usize,
}

#[allow(unsafe_code)] // reason: FFI declaration of an OpenBLAS extension that cblas-sys lacks
mod ffi {
    extern "C" {
        pub fn openblas_set_num_threads(num_threads: std::os::raw::c_int);
        pub fn openblas_get_num_threads() -> std::os::raw::c_int;
    }

    pub fn set(n: usize) {
        let n = i32::try_from(n.max(1)).unwrap_or(i32::MAX);
        // SAFETY: OpenBLAS documents this call as safe at any time outside a running BLAS call;
        // it only stores the count used by the next call.
        unsafe { openblas_set_num_threads(n) }
    }

    pub fn get() -> usize {
        // SAFETY: a plain getter of a global integer.
        let n = unsafe { openblas_get_num_threads() };
        usize::try_from(n).unwrap_or(1)
    }
}

/// Sets OpenBLAS's thread count for subsequent calls.
pub fn set_blas_threads(n: usize) {
    ffi::set(n);
}

/// OpenBLAS's current thread count.
pub fn blas_threads() -> usize {
    ffi::get()
}

/// OpenBLAS on one thread until dropped, then back to the count it had: for products that are
/// split among the rayon threads, one single-threaded call each.
#[derive(Debug)]
pub(crate) struct BlasThreads(usize);

impl BlasThreads {
    pub(crate) fn one() -> BlasThreads {
        let before = blas_threads();
        set_blas_threads(1);
        BlasThreads(before)
    }
}

impl Drop for BlasThreads {
    fn drop(&mut self) {
        set_blas_threads(self.0);
    }
}

/// Applies `config`: sets the BLAS threads and builds the global rayon pool.
///
/// The rayon pool can be built only once per process; a second call keeps the first pool and
/// returns `false` for it.
pub fn configure(config: ThreadConfig) -> bool {
    set_blas_threads(config.blas);
    rayon::ThreadPoolBuilder::new()
        .num_threads(config.rayon.max(1))
        .build_global()
        .is_ok()
}
