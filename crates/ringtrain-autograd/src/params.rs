//! Named parameters in one flat buffer.

use std::collections::BTreeMap;

use ringtrain_tensor::Tensor;

use crate::AutogradError;

/// Where one parameter lives in the flat buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub len: usize,
}

/// All parameters of a model, ordered by their dotted names (`layers.0.weight`), stored
/// back to back in one `Vec<f32>`.
///
/// One flat buffer makes the hot path simple: gradients are written into a buffer of the same
/// layout, the all-reduce runs over it directly, the optimizer updates it in one elementwise
/// pass, and "all ranks hold identical parameters" is a comparison of two slices.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamStore {
    specs: Vec<ParamSpec>,
    data: Vec<f32>,
}

impl ParamStore {
    /// Builds the store; the map's order (by name) becomes the layout order.
    pub fn from_named(named: BTreeMap<String, Tensor>) -> ParamStore {
        let mut specs = Vec::with_capacity(named.len());
        let mut data = Vec::with_capacity(named.values().map(Tensor::len).sum());
        for (name, t) in named {
            specs.push(ParamSpec {
                name,
                shape: t.shape().to_vec(),
                offset: data.len(),
                len: t.len(),
            });
            data.extend_from_slice(t.as_slice());
        }
        ParamStore { specs, data }
    }

    pub fn specs(&self) -> &[ParamSpec] {
        &self.specs
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.specs.binary_search_by(|s| s.name.as_str().cmp(name)).ok()
    }

    pub fn spec(&self, name: &str) -> Option<&ParamSpec> {
        self.index_of(name).map(|i| &self.specs[i])
    }

    /// Number of scalar parameters.
    pub fn num_elements(&self) -> usize {
        self.data.len()
    }

    pub fn flat(&self) -> &[f32] {
        &self.data
    }

    pub fn flat_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }

    pub fn slice(&self, name: &str) -> Option<&[f32]> {
        self.spec(name).map(|s| &self.data[s.offset..s.offset + s.len])
    }

    /// A copy of one parameter as a tensor.
    pub fn get(&self, name: &str) -> Result<Tensor, AutogradError> {
        let spec = self
            .spec(name)
            .ok_or_else(|| AutogradError::UnknownParam { name: name.to_string() })?;
        Ok(Tensor::from_vec(
            &spec.shape,
            self.data[spec.offset..spec.offset + spec.len].to_vec(),
        )?)
    }

    /// Replaces one parameter's values; the shape must match.
    pub fn set(&mut self, name: &str, value: &Tensor) -> Result<(), AutogradError> {
        let spec = self
            .spec(name)
            .ok_or_else(|| AutogradError::UnknownParam { name: name.to_string() })?;
        if spec.shape != value.shape() {
            return Err(AutogradError::ParamShape {
                name: name.to_string(),
                expected: spec.shape.clone(),
                got: value.shape().to_vec(),
            });
        }
        let (o, n) = (spec.offset, spec.len);
        self.data[o..o + n].copy_from_slice(value.as_slice());
        Ok(())
    }

    /// Iterates `(name, tensor copy)` in layout order.
    pub fn named_tensors(&self) -> impl Iterator<Item = (&str, Tensor)> + '_ {
        self.specs.iter().map(|s| {
            let t = Tensor::from_vec(&s.shape, self.data[s.offset..s.offset + s.len].to_vec())
                .expect("spec length matches its shape by construction");
            (s.name.as_str(), t)
        })
    }

    /// A 64-bit FNV-1a hash of the names and shapes: two processes with the same model have the
    /// same fingerprint, whatever the values.
    pub fn layout_fingerprint(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |bytes: &[u8]| {
            for &b in bytes {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        };
        for s in &self.specs {
            eat(s.name.as_bytes());
            for d in &s.shape {
                eat(&(*d as u64).to_le_bytes());
            }
        }
        h
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_ordered_by_name() {
        let mut m = BTreeMap::new();
        m.insert("layers.1.weight".to_string(), Tensor::full(&[2], 2.0));
        m.insert("layers.0.weight".to_string(), Tensor::full(&[3], 1.0));
        let s = ParamStore::from_named(m);
        assert_eq!(s.specs()[0].name, "layers.0.weight");
        assert_eq!(s.flat(), &[1., 1., 1., 2., 2.]);
        assert_eq!(s.slice("layers.1.weight").unwrap(), &[2., 2.]);
        assert!(s.get("nope").is_err());
        let mut s2 = s.clone();
        s2.set("layers.1.weight", &Tensor::full(&[2], 5.0)).unwrap();
        assert_eq!(s.layout_fingerprint(), s2.layout_fingerprint());
        assert!(s2.set("layers.1.weight", &Tensor::full(&[3], 5.0)).is_err());
    }
}
