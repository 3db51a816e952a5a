//! Reading the PyTorch reference values in `src/fixtures/*.json` (the scripts beside them made
//! them) for the tests that compare layers with PyTorch.
#![allow(clippy::unwrap_used)] // reason: test support; a malformed fixture should fail loudly

use std::collections::BTreeMap;

use ringtrain_autograd::{Graph, ParamStore, Tensor, Var};

/// A tensor stored as `{"shape": [...], "data": [...]}`.
pub(crate) fn tensor(v: &serde_json::Value) -> Tensor {
    let shape: Vec<usize> = v["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect();
    let data: Vec<f32> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_f64().unwrap() as f32)
        .collect();
    Tensor::from_vec(&shape, data).unwrap()
}

/// Every element within `abs + 1e-4·|want|` of PyTorch's value.
pub(crate) fn assert_close(what: &str, got: &[f32], want: &[f32], abs: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (k, (a, b)) in got.iter().zip(want).enumerate() {
        assert!((a - b).abs() <= abs + 1e-4 * b.abs(), "{what}[{k}]: {a} vs PyTorch {b}");
    }
}

/// The case's parameters (`"params"`), by PyTorch's names.
pub(crate) fn params(case: &serde_json::Value) -> BTreeMap<String, Tensor> {
    case["params"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), tensor(v)))
        .collect()
}

/// Every parameter's gradient in `flat` (the store's layout) against the case's `"grads"`.
pub(crate) fn assert_param_grads(what: &str, case: &serde_json::Value, store: &ParamStore, flat: &[f32], abs: f32) {
    for spec in store.specs() {
        let want = tensor(&case["grads"][&spec.name]);
        assert_close(
            &format!("{what} d{}", spec.name),
            &flat[spec.offset..spec.offset + spec.len],
            want.as_slice(),
            abs,
        );
    }
}

/// Backward from `loss`: the input's gradient against the case's `"dx"`, and every parameter's
/// against its `"grads"`.
pub(crate) fn assert_backward(
    (what, case): (&str, &serde_json::Value),
    (g, store): (&mut Graph<'_>, &ParamStore),
    loss: Var,
    x: Var,
    abs: f32,
) {
    let grads = g.backward(loss).unwrap();
    assert_close(
        &format!("{what} dx"),
        grads.get(x).unwrap().as_slice(),
        tensor(&case["dx"]).as_slice(),
        abs,
    );
    let mut flat = vec![0.0; store.num_elements()];
    g.param_grads_into(&grads, &mut flat).unwrap();
    assert_param_grads(what, case, store, &flat, abs);
}
