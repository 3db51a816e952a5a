//! Ready-made models, named as a deep-learning course names them.

use crate::{Activation, Init, Linear, Sequential};

/// A single neuron: `sigmoid(w·x + b)` when trained with binary cross-entropy (logistic
/// regression); the sigmoid is folded into the loss, so the module outputs the logit.
pub fn logistic(inputs: usize) -> Sequential {
    let mut s = Sequential::new("layers");
    let name = s.next_name();
    s.push(Linear::new(name, inputs, 1).with_init(Init::XavierUniform));
    s
}

/// A multi-layer perceptron: `Linear → act → … → Linear`, outputs are logits (or values).
pub fn mlp(inputs: usize, hidden: &[usize], outputs: usize, act: Activation) -> Sequential {
    let mut s = Sequential::new("layers");
    let mut width = inputs;
    for &h in hidden {
        let name = s.next_name();
        s.push(Linear::new(name, width, h).with_init(act.preferred_init()));
        s.push_activation(act);
        width = h;
    }
    let name = s.next_name();
    s.push(Linear::new(name, width, outputs).with_init(Init::XavierUniform));
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::{init_store, Module};
    use ringtrain_autograd::gradcheck::{check, Tolerance};
    use ringtrain_autograd::{Graph, Tensor};

    #[test]
    fn mlp_names_and_shapes_match_pytorch_sequential() {
        let m = mlp(4, &[8, 6], 3, Activation::Relu);
        let store = init_store(&m, 1);
        let names: Vec<_> = store
            .specs()
            .iter()
            .map(|s| (s.name.as_str(), s.shape.clone()))
            .collect();
        assert_eq!(
            names,
            vec![
                ("layers.0.bias", vec![8]),
                ("layers.0.weight", vec![8, 4]),
                ("layers.2.bias", vec![6]),
                ("layers.2.weight", vec![6, 8]),
                ("layers.4.bias", vec![3]),
                ("layers.4.weight", vec![3, 6]),
            ]
        );
        let mut rows = Vec::new();
        assert_eq!(m.describe(&[4], &mut rows).unwrap(), vec![3]);
        assert_eq!(
            rows.iter().map(|r| r.params).sum::<usize>(),
            store.num_elements()
        );
        let err = m.describe(&[5], &mut Vec::new()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "layer `layers.0`: expects inputs with last axis 4, got shape [5]"
        );
    }

    #[test]
    fn same_seed_same_init() {
        let m = mlp(4, &[8], 3, Activation::Tanh);
        assert_eq!(init_store(&m, 3), init_store(&m, 3));
        assert_ne!(init_store(&m, 3), init_store(&m, 4));
    }

    #[test]
    fn mlp_backward_matches_finite_differences() {
        // Check d(loss)/d(weights) through the whole model: each weight tensor becomes a
        // gradcheck input by rebuilding the store from the perturbed values.
        let m = mlp(3, &[4], 2, Activation::Tanh);
        let store = init_store(&m, 9);
        let names: Vec<String> = store.specs().iter().map(|s| s.name.clone()).collect();
        let inputs: Vec<Tensor> = names.iter().map(|n| store.get(n).unwrap()).collect();
        let x = Tensor::from_vec(&[2, 3], vec![0.5, -1.0, 2.0, 1.5, 0.2, -0.3]).unwrap();
        let res = check(
            |g, v| {
                // Route the parameters through a store-shaped forward by hand: Linear reads
                // params by name, so evaluate the same math with the variables.
                let xv = g.input(x.clone());
                let h = g.matmul_t(xv, v[1], false, true)?;
                let h = g.add(h, v[0])?;
                let h = g.tanh(h);
                let y = g.matmul_t(h, v[3], false, true)?;
                g.add(y, v[2])
            },
            &inputs,
            Tolerance::default(),
        )
        .unwrap();
        assert!(res.is_none(), "{res:?}");
        // …and the module computes exactly that math.
        let mut g = Graph::new(&store);
        let xv = g.input(x.clone());
        let y = m.forward(&mut g, xv).unwrap();
        let mut g2 = Graph::standalone();
        let vs: Vec<_> = inputs.iter().map(|t| g2.variable(t.clone())).collect();
        let xv2 = g2.input(x);
        let h = g2.matmul_t(xv2, vs[1], false, true).unwrap();
        let h = g2.add(h, vs[0]).unwrap();
        let h = g2.tanh(h);
        let y2 = g2.matmul_t(h, vs[3], false, true).unwrap();
        let y2 = g2.add(y2, vs[2]).unwrap();
        assert_eq!(g.value(y), g2.value(y2));
    }
}
