//! Weights on disk: safetensors files, written atomically.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use ringtrain_autograd::{ParamStore, Tensor};
use safetensors::{Dtype, SafeTensors};

use crate::{Result, TrainError};

/// Writes `bytes` to `path` so that a reader sees either the old file or the whole new one:
/// temp file in the same directory, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename is durable only once the directory entry is.
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        TrainError::io(path, format!("cannot write: {e}"))
    })
}

/// Saves named f32 tensors (parameters, optimizer state) as safetensors, atomically.
pub fn save_safetensors(path: &Path, tensors: &[(String, Tensor)], metadata: HashMap<String, String>) -> Result<()> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, t)| {
            let b = t.as_slice().iter().flat_map(|v| v.to_le_bytes()).collect();
            (n.clone(), t.shape().to_vec(), b)
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(n, shape, b)| {
            Ok((
                n.as_str(),
                safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), b)?,
            ))
        })
        .collect::<std::result::Result<Vec<_>, safetensors::SafeTensorError>>()
        .map_err(|e| TrainError::io(path, e))?;
    let data = safetensors::tensor::serialize(views, Some(metadata)).map_err(|e| TrainError::io(path, e))?;
    write_atomic(path, &data)
}

/// Reads every f32 tensor of a safetensors file, by name.
pub fn load_safetensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|e| TrainError::io(path, format!("cannot read: {e}")))?;
    let st =
        SafeTensors::deserialize(&bytes).map_err(|e| TrainError::io(path, format!("not a safetensors file: {e}")))?;
    let mut out = HashMap::new();
    for name in st.names() {
        let view = st.tensor(name).map_err(|e| TrainError::io(path, e))?;
        if view.dtype() != Dtype::F32 {
            return Err(TrainError::io(
                path,
                format!("tensor `{name}` is {:?}, expected F32", view.dtype()),
            ));
        }
        let values = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let t = Tensor::from_vec(view.shape(), values).map_err(|e| TrainError::io(path, e))?;
        out.insert(name.to_string(), t);
    }
    Ok(out)
}

/// Replaces the values in `store` with those of a saved model; names and shapes must match.
pub fn restore_params(path: &Path, store: &mut ParamStore) -> Result<()> {
    let saved = load_safetensors(path)?;
    let names: Vec<String> = store.specs().iter().map(|s| s.name.clone()).collect();
    for name in names {
        let t = saved
            .get(&name)
            .ok_or_else(|| TrainError::io(path, format!("missing parameter `{name}`")))?;
        store.set(&name, t)?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_atomic_replace() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        let a = Tensor::from_vec(&[2, 2], vec![1.0, -2.0, 3.5, 0.0]).unwrap();
        save_safetensors(&p, &[("layers.0.weight".into(), a.clone())], HashMap::new()).unwrap();
        save_safetensors(&p, &[("layers.0.weight".into(), a.scale(2.0))], HashMap::new()).unwrap();
        let back = load_safetensors(&p).unwrap();
        assert_eq!(back["layers.0.weight"], a.scale(2.0));
        // no temp files left behind
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        std::fs::write(&p, b"garbage").unwrap();
        assert!(load_safetensors(&p)
            .unwrap_err()
            .to_string()
            .contains("not a safetensors file"));
    }
}
