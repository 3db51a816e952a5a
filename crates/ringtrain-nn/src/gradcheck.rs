//! Gradient checks for the layer tests: backward against central differences.
#![allow(clippy::unwrap_used)] // reason: test support; a failed op should fail the test loudly

use ringtrain_autograd::{Graph, ParamStore, Tensor, Var};
use ringtrain_tensor::random;

/// Central differences over every parameter (and the input, when it is real-valued)
/// against backward, for `loss = Σ w ⊙ run(x)` with fixed weights `w`.
pub(crate) fn check_all(run: &dyn Fn(&mut Graph<'_>, Var) -> Var, store: &ParamStore, x: &Tensor, input_grad: bool) {
    let eval = |store: &ParamStore, x: &Tensor, grads: bool| {
        let mut g = Graph::new(store);
        let xv = if input_grad {
            g.variable(x.clone())
        } else {
            g.input(x.clone())
        };
        let out = run(&mut g, xv);
        let w = random::uniform(g.shape(out), 0.5, 1.5, &mut random::rng(11));
        let w = g.input(w);
        let p = g.mul(out, w).unwrap();
        let loss = g.sum(p);
        let value = f64::from(g.value(loss).item().unwrap());
        if !grads {
            return (value, Vec::new(), None);
        }
        let gr = g.backward(loss).unwrap();
        let mut flat = vec![0.0; store.num_elements()];
        g.param_grads_into(&gr, &mut flat).unwrap();
        (value, flat, gr.get(xv).cloned())
    };
    let (_, analytic, dx) = eval(store, x, true);
    let eps = 1e-2f32;
    let close = |a: f32, n: f32| (a - n).abs() <= 1e-2 + 1e-2 * n.abs();
    let mut s = store.clone();
    for k in 0..s.num_elements() {
        let orig = s.flat()[k];
        s.flat_mut()[k] = orig + eps;
        let plus = eval(&s, x, false).0;
        s.flat_mut()[k] = orig - eps;
        let minus = eval(&s, x, false).0;
        s.flat_mut()[k] = orig;
        let numeric = ((plus - minus) / (2.0 * f64::from(eps))) as f32;
        let name = &store.specs().iter().rfind(|p| p.offset <= k).unwrap().name;
        assert!(close(analytic[k], numeric), "{name}[{k}]: {} vs {numeric}", analytic[k]);
    }
    if input_grad {
        let dx = dx.unwrap();
        let mut xs = x.clone();
        for k in 0..x.len() {
            let orig = xs.as_slice()[k];
            xs.as_mut_slice()[k] = orig + eps;
            let plus = eval(store, &xs, false).0;
            xs.as_mut_slice()[k] = orig - eps;
            let minus = eval(store, &xs, false).0;
            xs.as_mut_slice()[k] = orig;
            let numeric = ((plus - minus) / (2.0 * f64::from(eps))) as f32;
            assert!(
                close(dx.as_slice()[k], numeric),
                "x[{k}]: {} vs {numeric}",
                dx.as_slice()[k]
            );
        }
    }
}
