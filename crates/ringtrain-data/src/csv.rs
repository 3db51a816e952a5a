//! Delimited tabular files (CSV, TSV, space-separated) into a dense feature matrix plus labels.
//!
//! The reader streams the file line by line and refuses, with file, line and column:
//! ragged rows, empty (missing) fields, fields that are not finite numbers, and files with no
//! data rows. Blank lines are skipped (they are how editors end files, never data).
//!
//! Quoting follows RFC 4180 within one line: a field may be wrapped in `"` and contain the
//! delimiter or `""` for a quote. A quoted field spanning lines is refused rather than guessed
//! at; none of the datasets this trainer targets needs it. Unquoted fields are trimmed of
//! surrounding whitespace (other than the delimiter itself).
//!
//! scikit-learn's bundled files (`iris.csv`, `breast_cancer.csv`, `wine_data.csv`) start with
//! a line `n_rows,n_features,class_name_0,class_name_1,...` instead of a header; read them
//! with [`read_sklearn_csv`], which also checks those counts and takes the class names from it.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use crate::error::{ColumnRef, DataError};
use crate::source::Lines;

/// Which column holds the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelColumn {
    /// By header name (needs `has_header`).
    Name(String),
    /// By 0-based position among all columns of the file.
    Index(usize),
}

/// Whether the target is a class (classification) or a number (regression).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelKind {
    /// Any string; mapped to dense class ids.
    Class,
    /// A finite number.
    Value,
}

/// How to read a delimited file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsvOptions {
    /// Field separator, e.g. `b','`, `b'\t'` or `b' '`.
    pub delimiter: u8,
    /// Whether the first non-blank line names the columns.
    pub has_header: bool,
    /// The target column; all other columns are features.
    pub label: LabelColumn,
    /// How to interpret the target column.
    pub label_kind: LabelKind,
}

impl CsvOptions {
    /// Comma-separated, header line, class label in the named column.
    pub fn classification(label: impl Into<String>) -> Self {
        CsvOptions {
            delimiter: b',',
            has_header: true,
            label: LabelColumn::Name(label.into()),
            label_kind: LabelKind::Class,
        }
    }

    /// Comma-separated, header line, numeric target in the named column.
    pub fn regression(label: impl Into<String>) -> Self {
        CsvOptions {
            label_kind: LabelKind::Value,
            ..CsvOptions::classification(label)
        }
    }
}

/// The target column of a table.
#[derive(Debug, Clone, PartialEq)]
pub enum Labels {
    /// Class ids; `names[id]` is the class's label as written in the file.
    Class {
        /// One id per row, each `< names.len()`.
        ids: Vec<usize>,
        /// For [`read_csv`]: the distinct label strings sorted (numerically when every label
        /// parses as a number, so `"10"` follows `"9"`; otherwise by byte order).
        /// For [`read_sklearn_csv`]: the names in the file's first line.
        names: Vec<String>,
    },
    /// Regression targets, one per row.
    Value(Vec<f32>),
}

impl Labels {
    /// Number of rows.
    pub fn len(&self) -> usize {
        match self {
            Labels::Class { ids, .. } => ids.len(),
            Labels::Value(v) => v.len(),
        }
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The class ids, or `None` for regression targets.
    pub fn class_ids(&self) -> Option<&[usize]> {
        match self {
            Labels::Class { ids, .. } => Some(ids),
            Labels::Value(_) => None,
        }
    }

    /// Number of classes (0 for regression targets).
    pub fn n_classes(&self) -> usize {
        match self {
            Labels::Class { names, .. } => names.len(),
            Labels::Value(_) => 0,
        }
    }

    /// The rows at `indices`, in that order (class names are kept whole, so ids stay valid).
    pub fn select(&self, indices: &[usize]) -> Labels {
        match self {
            Labels::Class { ids, names } => Labels::Class {
                ids: indices.iter().map(|&i| ids[i]).collect(),
                names: names.clone(),
            },
            Labels::Value(v) => Labels::Value(indices.iter().map(|&i| v[i]).collect()),
        }
    }
}

/// A table of `f32` features with one target per row.
#[derive(Debug, Clone, PartialEq)]
pub struct TabularData {
    /// Feature column names (from the header, else `column_<n>` with the 1-based file column).
    pub feature_names: Vec<String>,
    /// Row-major `n_rows x n_features`.
    pub features: Vec<f32>,
    /// Number of rows.
    pub n_rows: usize,
    /// Number of feature columns.
    pub n_features: usize,
    /// Targets, one per row.
    pub labels: Labels,
}

impl TabularData {
    /// The features of row `i`.
    ///
    /// # Panics
    /// If `i >= n_rows`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.features[i * self.n_features..(i + 1) * self.n_features]
    }

    /// The rows at `indices`, in that order (e.g. one side of a [`crate::Split`]).
    ///
    /// # Panics
    /// If an index is `>= n_rows`.
    pub fn select(&self, indices: &[usize]) -> TabularData {
        let mut features = Vec::with_capacity(indices.len() * self.n_features);
        for &i in indices {
            features.extend_from_slice(self.row(i));
        }
        TabularData {
            feature_names: self.feature_names.clone(),
            features,
            n_rows: indices.len(),
            n_features: self.n_features,
            labels: self.labels.select(indices),
        }
    }
}

/// Splits one line into fields; the error is a problem description for the caller to locate.
pub(crate) fn split_fields(line: &str, delimiter: u8) -> Result<Vec<String>, String> {
    let delim = delimiter as char;
    let is_pad = |c: char| c.is_ascii_whitespace() && c != delim;
    let mut fields = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.next_if(|&c| is_pad(c)).is_some() {}
        let mut field = String::new();
        if chars.next_if_eq(&'"').is_some() {
            loop {
                match chars.next() {
                    None => {
                        return Err(format!(
                            "unterminated quoted field (field {}); quoted fields may not span lines",
                            fields.len() + 1
                        ))
                    }
                    Some('"') => {
                        if chars.next_if_eq(&'"').is_some() {
                            field.push('"');
                        } else {
                            break;
                        }
                    }
                    Some(c) => field.push(c),
                }
            }
            while chars.next_if(|&c| is_pad(c)).is_some() {}
            match chars.next() {
                None => {
                    fields.push(field);
                    return Ok(fields);
                }
                Some(c) if c == delim => fields.push(field),
                Some(c) => {
                    return Err(format!(
                        "unexpected {c:?} after closing quote (field {})",
                        fields.len() + 1
                    ))
                }
            }
        } else {
            let mut ended = true;
            for c in chars.by_ref() {
                if c == delim {
                    ended = false;
                    break;
                }
                field.push(c);
            }
            fields.push(field.trim_matches(is_pad).to_string());
            if ended {
                return Ok(fields);
            }
        }
    }
}

pub(crate) fn parse_number(text: &str) -> Result<f32, String> {
    if text.is_empty() {
        return Err("missing value (empty field)".into());
    }
    match text.parse::<f32>() {
        Ok(v) if v.is_finite() => Ok(v),
        Ok(_) => Err(format!("not a finite number: {text:?}")),
        Err(_) => Err(format!("not a number: {text:?}")),
    }
}

/// Sorts distinct class labels: numerically if every one is a number, else by bytes.
pub(crate) fn sorted_class_names(distinct: BTreeSet<String>) -> Vec<String> {
    let mut names: Vec<String> = distinct.into_iter().collect();
    let numeric: Option<Vec<f64>> = names.iter().map(|s| s.parse::<f64>().ok()).collect();
    if let Some(values) = numeric {
        let mut pairs: Vec<(f64, String)> = values.into_iter().zip(names).collect();
        pairs.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
        names = pairs.into_iter().map(|(_, s)| s).collect();
    }
    names
}

fn column_ref(header: Option<&[String]>, index: usize) -> ColumnRef {
    ColumnRef {
        number: index + 1,
        name: header.and_then(|h| h.get(index).cloned()),
    }
}

/// Reads a delimited file (plain or gzip) into features and labels.
///
/// Every column except the label column must hold finite numbers. Errors name the file, the
/// line and the column.
pub fn read_csv(path: &Path, opts: &CsvOptions) -> Result<TabularData, DataError> {
    if let (LabelColumn::Name(name), false) = (&opts.label, opts.has_header) {
        return Err(DataError::arg(
            "label",
            format!("column name {name:?} given but the file is read without a header"),
        ));
    }
    let mut lines = Lines::open(path)?;
    let mut header: Option<Vec<String>> = None;
    // Fixed by the header, or else by the first data row.
    let mut shape: Option<(usize, usize)> = None; // (fields per row, label index)
    let mut features = Vec::new();
    let mut class_strings: Vec<String> = Vec::new();
    let mut values: Vec<f32> = Vec::new();
    let mut n_rows = 0usize;
    let mut saw_any_line = false;
    let err = |line: usize, column: Option<ColumnRef>, problem: String| DataError::text(path, line, column, problem);

    while let Some((line_no, line)) = lines.next_line()? {
        if line.trim().is_empty() {
            continue;
        }
        saw_any_line = true;
        let fields = split_fields(line, opts.delimiter).map_err(|p| err(line_no, None, p))?;
        if opts.has_header && header.is_none() {
            let label_at = resolve_label(&opts.label, &fields).map_err(|p| err(line_no, None, p))?;
            shape = Some((fields.len(), label_at));
            header = Some(fields);
            continue;
        }
        let (n_cols, label_at) = match shape {
            Some(s) => s,
            None => {
                let s = (
                    fields.len(),
                    resolve_label(&opts.label, &fields).map_err(|p| err(line_no, None, p))?,
                );
                shape = Some(s);
                s
            }
        };
        if fields.len() != n_cols {
            return Err(err(
                line_no,
                None,
                format!("ragged row: expected {n_cols} fields, found {}", fields.len()),
            ));
        }
        for (i, field) in fields.into_iter().enumerate() {
            let at = || Some(column_ref(header.as_deref(), i));
            if i != label_at {
                features.push(parse_number(&field).map_err(|p| err(line_no, at(), p))?);
                continue;
            }
            match opts.label_kind {
                LabelKind::Class if field.is_empty() => {
                    return Err(err(line_no, at(), "missing value (empty field)".into()))
                }
                LabelKind::Class => class_strings.push(field),
                LabelKind::Value => values.push(parse_number(&field).map_err(|p| err(line_no, at(), p))?),
            }
        }
        n_rows += 1;
    }

    let Some((n_cols, label_at)) = shape.filter(|_| n_rows > 0) else {
        let problem = if saw_any_line {
            "header but no data rows"
        } else {
            "empty file"
        };
        return Err(DataError::empty(path, problem));
    };
    let feature_names = (0..n_cols)
        .filter(|&i| i != label_at)
        .map(|i| match &header {
            Some(h) => h[i].clone(),
            None => format!("column_{}", i + 1),
        })
        .collect();
    let labels = match opts.label_kind {
        LabelKind::Value => Labels::Value(values),
        LabelKind::Class => class_labels(class_strings),
    };
    Ok(TabularData {
        feature_names,
        features,
        n_rows,
        n_features: n_cols - 1,
        labels,
    })
}

/// Maps label strings to dense ids in [`sorted_class_names`] order.
pub(crate) fn class_labels(strings: Vec<String>) -> Labels {
    let names = sorted_class_names(strings.iter().cloned().collect());
    let id_of: HashMap<&str, usize> = names.iter().enumerate().map(|(i, n)| (n.as_str(), i)).collect();
    let ids = strings.iter().map(|s| id_of[s.as_str()]).collect();
    Labels::Class { ids, names }
}

fn resolve_label(label: &LabelColumn, row: &[String]) -> Result<usize, String> {
    match label {
        LabelColumn::Index(i) if *i >= row.len() => Err(format!(
            "label column index {i} is out of range: the row has {} fields",
            row.len()
        )),
        LabelColumn::Index(i) => Ok(*i),
        LabelColumn::Name(name) => row
            .iter()
            .position(|c| c == name)
            .ok_or_else(|| format!("no column named {name:?}; the header has {row:?}")),
    }
}

/// Reads the feature rows of a file laid out like a training file (plain or gzip, the same
/// quoting and delimiter rules as [`read_csv`]) for prediction: each row holds the
/// `n_features` feature columns, or those and the `label` column, which is dropped. With
/// `opts.has_header` the first line is a header (and names the label column). Errors name the
/// file, the line and the column.
pub fn read_feature_rows(path: &Path, opts: &CsvOptions, n_features: usize) -> Result<Vec<Vec<f32>>, DataError> {
    let mut lines = Lines::open(path)?;
    let err = |line: usize, column: Option<ColumnRef>, problem: String| DataError::text(path, line, column, problem);
    let mut header: Option<Vec<String>> = None;
    let mut rows = Vec::new();
    while let Some((line_no, line)) = lines.next_line()? {
        if line.trim().is_empty() {
            continue;
        }
        let fields = split_fields(line, opts.delimiter).map_err(|p| err(line_no, None, p))?;
        if opts.has_header && header.is_none() {
            header = Some(fields);
            continue;
        }
        let label_at = if fields.len() == n_features + 1 {
            match &opts.label {
                LabelColumn::Index(i) => Some(*i).filter(|&i| i < fields.len()),
                LabelColumn::Name(name) => header.as_ref().and_then(|h| h.iter().position(|c| c == name)),
            }
        } else {
            None
        };
        if fields.len() != n_features && label_at.is_none() {
            let label = match &opts.label {
                LabelColumn::Name(n) => format!(" (or {} with the label column {n:?})", n_features + 1),
                LabelColumn::Index(c) => format!(" (or {} with the label in column {})", n_features + 1, c + 1),
            };
            let problem = format!("expected {n_features} feature columns{label}, found {}", fields.len());
            return Err(err(line_no, None, problem));
        }
        let mut row = Vec::with_capacity(n_features);
        for (c, field) in fields.iter().enumerate().filter(|(c, _)| Some(*c) != label_at) {
            let v = parse_number(field).map_err(|p| err(line_no, Some(column_ref(header.as_deref(), c)), p))?;
            row.push(v);
        }
        rows.push(row);
    }
    if rows.is_empty() {
        return Err(DataError::empty(path, "no data rows"));
    }
    Ok(rows)
}

/// Reads scikit-learn's bundled CSV layout (`iris.csv`, `breast_cancer.csv`, `wine_data.csv`).
///
/// Line 1 is `n_rows,n_features,class_0,class_1,...`; then `n_rows` lines of `n_features`
/// numbers followed by the class id (an integer `< number of class names`). Both counts are
/// checked. Feature names are `column_<n>`, since the file does not carry them. The labels'
/// `names` are the class names of line 1, so `names[id]` is e.g. `"setosa"`.
pub fn read_sklearn_csv(path: &Path) -> Result<TabularData, DataError> {
    let mut lines = Lines::open(path)?;
    let err = |line: usize, column: Option<ColumnRef>, problem: String| DataError::text(path, line, column, problem);
    let (first_no, first) = loop {
        match lines.next_line()? {
            None => return Err(DataError::empty(path, "empty file")),
            Some((_, l)) if l.trim().is_empty() => continue,
            Some((n, l)) => break (n, split_fields(l, b',').map_err(|p| err(n, None, p))?),
        }
    };
    let count = |i: usize, what: &str| -> Result<usize, DataError> {
        first.get(i).and_then(|f| f.parse::<usize>().ok()).ok_or_else(|| {
            err(
                first_no,
                Some(ColumnRef {
                    number: i + 1,
                    name: None,
                }),
                format!("scikit-learn header: expected the {what} as an integer"),
            )
        })
    };
    let n_expected = count(0, "number of rows")?;
    let n_features = count(1, "number of features")?;
    let names: Vec<String> = first[2..].to_vec();
    if names.is_empty() {
        return Err(err(
            first_no,
            None,
            "scikit-learn header: no class names after the two counts".into(),
        ));
    }
    let mut features = Vec::with_capacity(n_expected * n_features);
    let mut ids = Vec::with_capacity(n_expected);
    let mut last_line = first_no;
    while let Some((line_no, line)) = lines.next_line()? {
        if line.trim().is_empty() {
            continue;
        }
        last_line = line_no;
        let fields = split_fields(line, b',').map_err(|p| err(line_no, None, p))?;
        if fields.len() != n_features + 1 {
            return Err(err(
                line_no,
                None,
                format!(
                    "ragged row: expected {} fields (the header's {n_features} features + class), found {}",
                    n_features + 1,
                    fields.len()
                ),
            ));
        }
        for (i, field) in fields[..n_features].iter().enumerate() {
            let at = Some(ColumnRef {
                number: i + 1,
                name: None,
            });
            features.push(parse_number(field).map_err(|p| err(line_no, at, p))?);
        }
        let class_field = &fields[n_features];
        let at = Some(ColumnRef {
            number: n_features + 1,
            name: None,
        });
        match class_field.parse::<usize>() {
            Ok(id) if id < names.len() => ids.push(id),
            _ => {
                return Err(err(
                    line_no,
                    at,
                    format!(
                        "class must be an integer below {} (the header's class count), found {class_field:?}",
                        names.len()
                    ),
                ))
            }
        }
    }
    if ids.is_empty() {
        return Err(DataError::empty(path, "header but no data rows"));
    }
    if ids.len() != n_expected {
        return Err(err(
            last_line,
            None,
            format!("the header promises {n_expected} rows, the file has {}", ids.len()),
        ));
    }
    Ok(TabularData {
        feature_names: (1..=n_features).map(|i| format!("column_{i}")).collect(),
        features,
        n_rows: ids.len(),
        n_features,
        labels: Labels::Class { ids, names },
    })
}

#[cfg(test)]
mod tests;
