//! Text classification data: `label<TAB>text` lines, or one directory per class.
//!
//! Class ids must mean the same thing in the training and the test file, so every reader
//! takes an optional list of class names: `None` derives it from the file (sorted as in
//! [`crate::Labels`]), `Some(names)` maps labels onto those ids and refuses unknown labels with
//! their position. Read the training data first and pass its `label_names` to the test reader.

use std::path::{Path, PathBuf};

use crate::csv::sorted_class_names;
use crate::error::DataError;
use crate::source::{Lines, Source};

/// Texts with class ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextDataset {
    /// One text per example.
    pub texts: Vec<String>,
    /// One class id per example, `< label_names.len()`.
    pub labels: Vec<usize>,
    /// `label_names[id]` is the label as written in the file (or the class directory's name).
    pub label_names: Vec<String>,
}

impl TextDataset {
    /// Number of examples.
    pub fn len(&self) -> usize {
        self.texts.len()
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.texts.is_empty()
    }

    /// Examples per class id.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.label_names.len()];
        for &l in &self.labels {
            counts[l] += 1;
        }
        counts
    }

    /// The examples at `indices`, in that order.
    pub fn select(&self, indices: &[usize]) -> TextDataset {
        TextDataset {
            texts: indices.iter().map(|&i| self.texts[i].clone()).collect(),
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            label_names: self.label_names.clone(),
        }
    }
}

/// Where a label came from, for error messages.
enum Origin {
    Line(PathBuf, usize),
    Dir(PathBuf),
}

fn assign_ids(raw: Vec<(String, String, Origin)>, classes: Option<&[String]>) -> Result<TextDataset, DataError> {
    let label_names = match classes {
        Some(names) => names.to_vec(),
        None => sorted_class_names(raw.iter().map(|(l, _, _)| l.clone()).collect()),
    };
    let mut texts = Vec::with_capacity(raw.len());
    let mut labels = Vec::with_capacity(raw.len());
    for (label, text, origin) in raw {
        let Some(id) = label_names.iter().position(|n| *n == label) else {
            let problem = format!("unknown label {label:?}; known labels are {label_names:?}");
            return Err(match origin {
                Origin::Line(path, line) => DataError::text(path, line, None, problem),
                Origin::Dir(path) => DataError::empty(path, problem),
            });
        };
        texts.push(text);
        labels.push(id);
    }
    Ok(TextDataset {
        texts,
        labels,
        label_names,
    })
}

/// Reads `label<TAB>text` lines (plain or gzip). The line is split at its first TAB; the
/// label must be non-empty; blank lines are skipped.
pub fn read_labeled_lines(path: &Path, classes: Option<&[String]>) -> Result<TextDataset, DataError> {
    let mut lines = Lines::open(path)?;
    let mut raw = Vec::new();
    while let Some((line_no, line)) = lines.next_line()? {
        if line.trim().is_empty() {
            continue;
        }
        let Some((label, text)) = line.split_once('\t') else {
            return Err(DataError::text(
                path,
                line_no,
                None,
                "no TAB: expected `label<TAB>text`",
            ));
        };
        let label = label.trim();
        if label.is_empty() {
            return Err(DataError::text(path, line_no, None, "empty label before the TAB"));
        }
        raw.push((
            label.to_string(),
            text.to_string(),
            Origin::Line(path.to_path_buf(), line_no),
        ));
    }
    if raw.is_empty() {
        return Err(DataError::empty(path, "empty file"));
    }
    assign_ids(raw, classes)
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        entries.push(entry.map_err(|e| DataError::io(dir, e))?.path());
    }
    // Directory order is filesystem-dependent; sorting makes example order reproducible.
    entries.sort();
    Ok(entries)
}

/// Reads the IMDb-style layout: each class is a subdirectory of `dir` named after it, each
/// `*.txt` file in it (plain or `.txt.gz`) one example, files in name order; other files are
/// ignored.
///
/// With `classes = None` every subdirectory is a class (sorted as in [`crate::Labels`]).
/// With `Some(names)` exactly those subdirectories are read, with ids in that order, and
/// others are ignored: IMDb's `train/` also holds `unsup/` (unlabelled reviews), so read it
/// with `Some(&["neg".into(), "pos".into()])`. Refuses a named class directory that does not
/// exist, and a layout without any example.
pub fn read_class_dirs(dir: &Path, classes: Option<&[String]>) -> Result<TextDataset, DataError> {
    let class_dirs: Vec<(String, PathBuf)> = match classes {
        Some(names) => names
            .iter()
            .map(|name| {
                let path = dir.join(name);
                if path.is_dir() {
                    Ok((name.clone(), path))
                } else {
                    Err(DataError::empty(&path, format!("class directory {name:?} not found")))
                }
            })
            .collect::<Result<_, _>>()?,
        None => sorted_entries(dir)?
            .into_iter()
            .filter(|p| p.is_dir())
            .filter_map(|p| Some((p.file_name()?.to_str()?.to_string(), p)))
            .collect(),
    };
    if class_dirs.is_empty() {
        return Err(DataError::empty(dir, "no class subdirectories"));
    }
    let mut raw = Vec::new();
    for (label, class_dir) in &class_dirs {
        for file in sorted_entries(class_dir)? {
            let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if !(name.ends_with(".txt") || name.ends_with(".txt.gz")) || !file.is_file() {
                continue;
            }
            let text = Source::open(&file)?.read_to_string()?;
            raw.push((label.clone(), text, Origin::Dir(file)));
        }
    }
    if raw.is_empty() {
        return Err(DataError::empty(dir, "no *.txt files in the class subdirectories"));
    }
    assign_ids(raw, classes)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn tab_lines_with_shared_classes() {
        let dir = tempfile::tempdir().unwrap();
        let train = dir.path().join("train.tsv");
        std::fs::write(&train, "1\tgood film\n0\tbad\tfilm\n\n1\tfine\n").unwrap();
        let data = read_labeled_lines(&train, None).unwrap();
        assert_eq!(data.label_names, ["0", "1"]);
        assert_eq!(data.labels, [1, 0, 1]);
        assert_eq!(data.texts[1], "bad\tfilm");
        assert_eq!(data.class_counts(), [1, 2]);

        let test = dir.path().join("test.tsv");
        std::fs::write(&test, "1\tok\n2\tnew label\n").unwrap();
        let err = read_labeled_lines(&test, Some(&data.label_names)).unwrap_err();
        assert!(err.to_string().contains("line 2: unknown label \"2\""), "{err}");
    }

    #[test]
    fn malformed_lines_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.tsv");
        std::fs::write(&path, "1\tok\nno tab here\n").unwrap();
        let err = read_labeled_lines(&path, None).unwrap_err();
        assert!(
            err.to_string().ends_with("line 2: no TAB: expected `label<TAB>text`"),
            "{err}"
        );
        std::fs::write(&path, "\tno label\n").unwrap();
        assert!(read_labeled_lines(&path, None).is_err());
        std::fs::write(&path, "").unwrap();
        let err = read_labeled_lines(&path, None).unwrap_err();
        assert!(matches!(err, DataError::Empty { .. }));
    }

    #[test]
    fn class_directories() {
        let dir = tempfile::tempdir().unwrap();
        for (class, file, text) in [
            ("pos", "1_10.txt", "great"),
            ("pos", "0_9.txt", "superb"),
            ("neg", "3_1.txt", "awful"),
            ("neg", "notes.md", "ignored"),
        ] {
            std::fs::create_dir_all(dir.path().join(class)).unwrap();
            std::fs::write(dir.path().join(class).join(file), text).unwrap();
        }
        std::fs::write(dir.path().join("urls.txt"), "not a class").unwrap();
        let data = read_class_dirs(dir.path(), None).unwrap();
        assert_eq!(data.label_names, ["neg", "pos"]);
        assert_eq!(data.texts, ["awful", "superb", "great"]);
        assert_eq!(data.labels, [0, 1, 1]);
        // Named classes: ids in the given order, other directories (IMDb's `unsup`) ignored.
        std::fs::create_dir(dir.path().join("unsup")).unwrap();
        std::fs::write(dir.path().join("unsup/0_0.txt"), "unlabelled").unwrap();
        let names = [String::from("pos"), String::from("neg")];
        let data = read_class_dirs(dir.path(), Some(&names)).unwrap();
        assert_eq!(data.texts, ["superb", "great", "awful"]);
        assert_eq!(data.labels, [0, 0, 1]);
        let missing = [String::from("neutral")];
        let err = read_class_dirs(dir.path(), Some(&missing)).unwrap_err();
        assert!(
            err.to_string().contains("class directory \"neutral\" not found"),
            "{err}"
        );

        let empty = tempfile::tempdir().unwrap();
        assert!(read_class_dirs(empty.path(), None).is_err());
        std::fs::create_dir(empty.path().join("pos")).unwrap();
        assert!(read_class_dirs(empty.path(), None).is_err());
    }
}
