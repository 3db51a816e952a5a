//! `preprocess.json`: what a saved model's inputs must go through, as fitted on the training
//! split, typed and versioned. A file without a version is of the first layout (untagged),
//! read by recognising its keys and then checked as strictly as a new one.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::inference::format_error;
use crate::Result;

/// The layout `preprocess.json` is written in.
pub(crate) const VERSION: u32 = 2;

/// The input preprocessing of one data format (the `input` of `preprocess.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Preprocessing {
    /// Tabular features: `(x - mean) * inv_std` per feature.
    Features {
        feature_mean: Vec<f32>,
        feature_inv_std: Vec<f32>,
    },
    /// Grey images: `(pixel * scale - mean) / std`.
    Pixels { pixel_scale: f64, mean: f32, std: f32 },
    /// Token ids from a vocabulary (its own JSON), cut to `max_len`.
    Tokens { max_len: usize, vocab: serde_json::Value },
    /// Source and target token ids of an encoder–decoder.
    TokenPairs {
        src_len: usize,
        tgt_len: usize,
        vocab: serde_json::Value,
    },
    /// A series standardised with the training part's mean and deviation, in windows.
    Series {
        series_mean: f32,
        series_std: f32,
        seq_len: usize,
    },
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PreprocessFile {
    pub version: u32,
    pub input: Preprocessing,
    pub input_shape: Vec<usize>,
    pub class_names: Vec<String>,
    /// The data file the run read (absent in run directories written before it was recorded).
    #[serde(default)]
    pub data_path: Option<PathBuf>,
}

impl PreprocessFile {
    /// Reads `path`, of this layout or the first one.
    pub fn read(path: &Path, text: &str) -> Result<PreprocessFile> {
        let bad =
            |e: &dyn std::fmt::Display| format_error(path, format!("not a preprocess.json ringtrain can read: {e}"));
        let mut value: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(&e))?;
        match value.get("version") {
            None => {
                // The first layout: the same fields, no version, an untagged input.
                let input = value.get_mut("input").ok_or_else(|| bad(&"no `input`"))?;
                let kind = legacy_kind(input).ok_or_else(|| bad(&"an `input` of no known kind"))?;
                if let Some(o) = input.as_object_mut() {
                    o.insert("kind".into(), kind.into());
                }
                if let Some(o) = value.as_object_mut() {
                    o.insert("version".into(), VERSION.into());
                }
            }
            Some(v) if v.as_u64() != Some(u64::from(VERSION)) => {
                return Err(bad(&format!("version {v}; this ringtrain reads version {VERSION}")));
            }
            Some(_) => {}
        }
        serde_json::from_value(value).map_err(|e| bad(&e))
    }
}

/// The kind of a first-layout input, by its keys.
fn legacy_kind(input: &serde_json::Value) -> Option<&'static str> {
    let has = |k: &str| input.get(k).is_some();
    Some(if has("feature_mean") {
        "features"
    } else if has("pixel_scale") {
        "pixels"
    } else if has("src_len") {
        "token_pairs"
    } else if has("vocab") {
        "tokens"
    } else if has("series_mean") {
        "series"
    } else {
        return None;
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn both_layouts_read_and_unknown_fields_are_refused() {
        let p = Path::new("preprocess.json");
        let first =
            r#"{"input":{"feature_mean":[1.0],"feature_inv_std":[0.5]},"input_shape":[1],"class_names":["a","b"]}"#;
        let read = PreprocessFile::read(p, first).unwrap();
        assert_eq!(
            read.input,
            Preprocessing::Features {
                feature_mean: vec![1.0],
                feature_inv_std: vec![0.5]
            }
        );
        let now = serde_json::to_string(&read).unwrap();
        assert!(
            now.contains(r#""version":2"#) && now.contains(r#""kind":"features""#),
            "{now}"
        );
        assert_eq!(PreprocessFile::read(p, &now).unwrap(), read);
        let typo = now.replace("feature_inv_std", "feature_inv_sd");
        assert!(PreprocessFile::read(p, &typo).is_err());
        let extra = now.replace(r#""version":2"#, r#""version":2,"extra":1"#);
        assert!(PreprocessFile::read(p, &extra).is_err());
        let later = now.replace(r#""version":2"#, r#""version":3"#);
        assert!(PreprocessFile::read(p, &later)
            .unwrap_err()
            .to_string()
            .contains("version 3"));
    }
}
