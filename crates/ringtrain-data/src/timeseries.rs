//! Time series from CSV, turned into supervised (window → next values) examples.
//!
//! Missing values (empty fields, e.g. the 59 missing weeks of `co2_weekly.csv`) are refused
//! with their line and column unless the caller picks [`Missing::Drop`] or
//! [`Missing::Interpolate`], because silently skipping a step changes what "the next value"
//! means. Split a series with [`crate::time_series_splits`] (ordered, never shuffled) and
//! window each side separately so no window straddles the boundary.

use std::path::Path;

use crate::csv::{parse_number, split_fields};
use crate::error::{ColumnRef, DataError};
use crate::source::Lines;

/// What to do with empty fields in the selected columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    /// Refuse the file, naming the first empty field's line and column.
    Refuse,
    /// Leave out every row with an empty field (the series then has uneven time steps).
    Drop,
    /// Fill each gap linearly between the nearest present values above and below in the same
    /// column; a gap at the start or end of a column has only one side and is refused.
    Interpolate,
}

/// A multivariate series: `n_steps` rows of `n_vars` values.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Column names, in the order asked for.
    pub names: Vec<String>,
    /// Row-major `n_steps x n_vars`.
    pub values: Vec<f32>,
    /// Number of time steps (rows).
    pub n_steps: usize,
    /// Number of variables (columns).
    pub n_vars: usize,
}

impl Series {
    /// The values of variable `var` over time.
    pub fn column(&self, var: usize) -> Vec<f32> {
        self.values.iter().skip(var).step_by(self.n_vars).copied().collect()
    }

    /// Steps `range` as a new series (e.g. one side of a time-series split).
    ///
    /// # Panics
    /// If the range goes past `n_steps`.
    pub fn slice(&self, range: std::ops::Range<usize>) -> Series {
        Series {
            names: self.names.clone(),
            values: self.values[range.start * self.n_vars..range.end * self.n_vars].to_vec(),
            n_steps: range.len(),
            n_vars: self.n_vars,
        }
    }
}

/// Reads the named columns of a CSV file with a header line (plain or gzip). Other columns
/// (dates, ids) are not parsed. Header names may be quoted (`"YEAR"` reads as `YEAR`).
pub fn read_series_csv(path: &Path, delimiter: u8, columns: &[&str], missing: Missing) -> Result<Series, DataError> {
    if columns.is_empty() {
        return Err(DataError::arg("columns", "name at least one column"));
    }
    let mut lines = Lines::open(path)?;
    let mut header: Option<Vec<String>> = None;
    let mut picks: Vec<usize> = Vec::new();
    // Per row: the line number (for errors) and the values, `None` where empty.
    let mut rows: Vec<(usize, Vec<Option<f32>>)> = Vec::new();
    while let Some((line_no, line)) = lines.next_line()? {
        if line.trim().is_empty() {
            continue;
        }
        let fields = split_fields(line, delimiter).map_err(|p| DataError::text(path, line_no, None, p))?;
        let Some(names) = &header else {
            for want in columns {
                let Some(i) = fields.iter().position(|f| f == want) else {
                    return Err(DataError::text(
                        path,
                        line_no,
                        None,
                        format!("no column named {want:?}; the header has {fields:?}"),
                    ));
                };
                picks.push(i);
            }
            header = Some(fields);
            continue;
        };
        if fields.len() != names.len() {
            return Err(DataError::text(
                path,
                line_no,
                None,
                format!("ragged row: expected {} fields, found {}", names.len(), fields.len()),
            ));
        }
        let mut row = Vec::with_capacity(picks.len());
        for &i in &picks {
            let at = || {
                Some(ColumnRef {
                    number: i + 1,
                    name: Some(names[i].clone()),
                })
            };
            if fields[i].is_empty() {
                if missing == Missing::Refuse {
                    return Err(DataError::text(
                        path,
                        line_no,
                        at(),
                        "missing value (empty field); choose Missing::Drop or \
                         Missing::Interpolate to accept gaps",
                    ));
                }
                row.push(None);
            } else {
                row.push(Some(
                    parse_number(&fields[i]).map_err(|p| DataError::text(path, line_no, at(), p))?,
                ));
            }
        }
        rows.push((line_no, row));
    }
    let Some(header) = header else {
        return Err(DataError::empty(path, "empty file"));
    };
    if missing == Missing::Drop {
        rows.retain(|(_, row)| row.iter().all(Option::is_some));
    }
    if rows.is_empty() {
        return Err(DataError::empty(path, "no data rows"));
    }
    let n_steps = rows.len();
    let n_vars = picks.len();
    let mut values = vec![0.0f32; n_steps * n_vars];
    for (v, &col) in picks.iter().enumerate() {
        let at = |line: usize| {
            let column = Some(ColumnRef {
                number: col + 1,
                name: Some(header[col].clone()),
            });
            (line, column)
        };
        let mut last_present: Option<usize> = None;
        for t in 0..n_steps {
            if let Some(x) = rows[t].1[v] {
                values[t * n_vars + v] = x;
                if let Some(p) = last_present {
                    // Fill the gap (p, t) linearly; empty when there was no gap.
                    let a = values[p * n_vars + v];
                    for g in p + 1..t {
                        let w = (g - p) as f32 / (t - p) as f32;
                        values[g * n_vars + v] = a + w * (x - a);
                    }
                } else if t > 0 {
                    let (line, column) = at(rows[0].0);
                    return Err(DataError::text(
                        path,
                        line,
                        column,
                        "missing value at the start of the series cannot be interpolated",
                    ));
                }
                last_present = Some(t);
            }
        }
        match last_present {
            Some(p) if p + 1 < n_steps => {
                let (line, column) = at(rows[p + 1].0);
                return Err(DataError::text(
                    path,
                    line,
                    column,
                    "missing value at the end of the series cannot be interpolated",
                ));
            }
            None => {
                let (line, column) = at(rows[0].0);
                return Err(DataError::text(path, line, column, "column has no values"));
            }
            _ => {}
        }
    }
    Ok(Series {
        names: columns.iter().map(|c| c.to_string()).collect(),
        values,
        n_steps,
        n_vars,
    })
}

/// Supervised examples cut from a series.
///
/// Example `i` takes steps `i .. i + input_len` (all variables) as input and steps
/// `i + input_len .. i + input_len + horizon` of the target variables as target.
#[derive(Debug, Clone, PartialEq)]
pub struct Windows {
    /// Row-major `n x input_len x n_vars`.
    pub inputs: Vec<f32>,
    /// Row-major `n x horizon x n_targets`.
    pub targets: Vec<f32>,
    /// Number of examples: `n_steps - input_len - horizon + 1`.
    pub n: usize,
    /// Steps per input window.
    pub input_len: usize,
    /// Steps predicted per example.
    pub horizon: usize,
    /// Variables per input step.
    pub n_vars: usize,
    /// Variables per target step.
    pub n_targets: usize,
}

/// Cuts every window of `input_len` steps followed by `horizon` target steps (stride 1).
/// `target_vars` are indices into the series' variables. Errors on zero lengths, unknown
/// target variables, or a series too short for a single example.
pub fn make_windows(
    series: &Series,
    input_len: usize,
    horizon: usize,
    target_vars: &[usize],
) -> Result<Windows, DataError> {
    if input_len == 0 || horizon == 0 {
        return Err(DataError::arg(
            "input_len/horizon",
            format!("both must be at least 1, got {input_len} and {horizon}"),
        ));
    }
    if target_vars.is_empty() {
        return Err(DataError::arg("target_vars", "name at least one target variable"));
    }
    if let Some(bad) = target_vars.iter().find(|&&v| v >= series.n_vars) {
        return Err(DataError::arg(
            "target_vars",
            format!("variable {bad} does not exist; the series has {}", series.n_vars),
        ));
    }
    let span = input_len + horizon;
    if series.n_steps < span {
        return Err(DataError::arg(
            "input_len",
            format!(
                "{} steps are too few for a window of {input_len} + {horizon}",
                series.n_steps
            ),
        ));
    }
    let n = series.n_steps - span + 1;
    let nv = series.n_vars;
    let mut inputs = Vec::with_capacity(n * input_len * nv);
    let mut targets = Vec::with_capacity(n * horizon * target_vars.len());
    for i in 0..n {
        inputs.extend_from_slice(&series.values[i * nv..(i + input_len) * nv]);
        for t in i + input_len..i + span {
            targets.extend(target_vars.iter().map(|&v| series.values[t * nv + v]));
        }
    }
    Ok(Windows {
        inputs,
        targets,
        n,
        input_len,
        horizon,
        n_vars: nv,
        n_targets: target_vars.len(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.csv");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    const GAPPY: &str = "date,a,b\n1,1.0,10\n2,,20\n3,,30\n4,4.0,40\n";

    #[test]
    fn missing_values_refused_dropped_or_interpolated() {
        let (_dir, path) = write(GAPPY);
        let err = read_series_csv(&path, b',', &["a", "b"], Missing::Refuse).unwrap_err();
        assert!(
            err.to_string().contains("line 3, column 2 (\"a\"): missing value"),
            "{err}"
        );
        let dropped = read_series_csv(&path, b',', &["b", "a"], Missing::Drop).unwrap();
        assert_eq!(dropped.values, [10.0, 1.0, 40.0, 4.0]);
        assert_eq!(dropped.names, ["b", "a"]);
        let filled = read_series_csv(&path, b',', &["a"], Missing::Interpolate).unwrap();
        assert_eq!(filled.values, [1.0, 2.0, 3.0, 4.0]);
        let only_b = read_series_csv(&path, b',', &["b"], Missing::Refuse).unwrap();
        assert_eq!(only_b.column(0), [10.0, 20.0, 30.0, 40.0]);
    }

    #[test]
    fn edge_gaps_cannot_be_interpolated() {
        let (_dir, path) = write("t,a\n1,\n2,5\n");
        let err = read_series_csv(&path, b',', &["a"], Missing::Interpolate).unwrap_err();
        assert!(
            err.to_string()
                .contains("line 2, column 2 (\"a\"): missing value at the start"),
            "{err}"
        );
        let (_dir, path) = write("t,a\n1,5\n2,6\n3,\n");
        let err = read_series_csv(&path, b',', &["a"], Missing::Interpolate).unwrap_err();
        assert!(
            err.to_string()
                .contains("line 4, column 2 (\"a\"): missing value at the end"),
            "{err}"
        );
    }

    #[test]
    fn bad_files_are_refused() {
        let (_dir, path) = write("");
        assert!(matches!(
            read_series_csv(&path, b',', &["a"], Missing::Refuse).unwrap_err(),
            DataError::Empty { .. }
        ));
        let (_dir, path) = write("t,a\n1,2,3\n");
        let err = read_series_csv(&path, b',', &["a"], Missing::Refuse).unwrap_err();
        assert!(err.to_string().contains("line 2: ragged row"), "{err}");
        let (_dir, path) = write("t,a\n1,x\n");
        let err = read_series_csv(&path, b',', &["a"], Missing::Refuse).unwrap_err();
        assert!(err.to_string().contains("not a number: \"x\""), "{err}");
        let err = read_series_csv(&path, b',', &["zz"], Missing::Refuse).unwrap_err();
        assert!(err.to_string().contains("line 1: no column named \"zz\""), "{err}");
    }

    #[test]
    fn windows_pair_inputs_with_following_targets() {
        let series = Series {
            names: vec!["x".into(), "y".into()],
            values: (0..10).map(|v| v as f32).collect(), // 5 steps: (0,1), (2,3), ...
            n_steps: 5,
            n_vars: 2,
        };
        let w = make_windows(&series, 2, 1, &[1]).unwrap();
        assert_eq!(w.n, 3);
        assert_eq!(w.inputs[..4], [0.0, 1.0, 2.0, 3.0]);
        assert_eq!(w.targets, [5.0, 7.0, 9.0]);
        let w = make_windows(&series, 3, 2, &[0, 1]).unwrap();
        assert_eq!(w.n, 1);
        assert_eq!(w.targets, [6.0, 7.0, 8.0, 9.0]);
        assert!(make_windows(&series, 5, 1, &[0]).is_err());
        assert!(make_windows(&series, 0, 1, &[0]).is_err());
        assert!(make_windows(&series, 1, 1, &[2]).is_err());
        assert_eq!(series.slice(1..3).values, [2.0, 3.0, 4.0, 5.0]);
    }
}
