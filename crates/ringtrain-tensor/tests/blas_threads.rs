//! OpenBLAS's thread count is global to the process: this test changes it, so it runs in a
//! binary of its own, where no other test is inside sgemm meanwhile.

use ringtrain_tensor::threads::{blas_threads, set_blas_threads};

#[test]
fn blas_thread_count_round_trips() {
    let before = blas_threads();
    set_blas_threads(1);
    assert_eq!(blas_threads(), 1);
    set_blas_threads(before);
    assert_eq!(blas_threads(), before);
}
