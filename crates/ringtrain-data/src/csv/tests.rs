#![allow(clippy::unwrap_used)]

use super::*;
use crate::testutil::proptest_config;
use proptest::prelude::*;
use std::io::Write;

proptest! {
    #![proptest_config(proptest_config())]

    /// Whatever finite values and labels are written (labels quoted when they contain the
    /// delimiter or a quote), the same table is read back.
    #[test]
    fn written_tables_read_back_exactly(
        rows in prop::collection::vec(
            (prop::collection::vec(-1e6f32..1e6, 3), "[a-z,\" ]{1,6}"),
            1..40,
        ),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.csv");
        let mut text = String::from("x,\"y,1\",z,label\n");
        for (values, label) in &rows {
            let quoted = format!("\"{}\"", label.replace('"', "\"\""));
            text.push_str(&format!("{},{},{},{quoted}\n", values[0], values[1], values[2]));
        }
        std::fs::write(&path, text).unwrap();
        let data = read_csv(&path, &CsvOptions::classification("label")).unwrap();
        prop_assert_eq!(&data.feature_names, &["x", "y,1", "z"]);
        let want: Vec<f32> = rows.iter().flat_map(|(v, _)| v.clone()).collect();
        prop_assert_eq!(&data.features, &want);
        let Labels::Class { ids, names } = &data.labels else { unreachable!() };
        for (i, (_, label)) in rows.iter().enumerate() {
            // Unquoted-field trimming does not apply inside quotes.
            prop_assert_eq!(&names[ids[i]], label);
        }
    }
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn reads_header_features_and_numerically_sorted_classes() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "t.csv", "a,b,y\n1,2,10\n3,4.5,9\n\n-1,0,10\n");
    let data = read_csv(&path, &CsvOptions::classification("y")).unwrap();
    assert_eq!(data.feature_names, ["a", "b"]);
    assert_eq!(data.n_rows, 3);
    assert_eq!(data.n_features, 2);
    assert_eq!(data.features, [1.0, 2.0, 3.0, 4.5, -1.0, 0.0]);
    assert_eq!(
        data.labels,
        Labels::Class {
            ids: vec![1, 0, 1],
            names: vec!["9".into(), "10".into()]
        }
    );
    assert_eq!(data.row(1), [3.0, 4.5]);
    let sub = data.select(&[2, 0]);
    assert_eq!(sub.features, [-1.0, 0.0, 1.0, 2.0]);
    assert_eq!(sub.labels.class_ids().unwrap(), [1, 1]);
}

#[test]
fn string_classes_sort_by_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "t.csv", "x,y\n1,b\n2,a\n3,b\n");
    let data = read_csv(&path, &CsvOptions::classification("y")).unwrap();
    assert_eq!(
        data.labels,
        Labels::Class {
            ids: vec![1, 0, 1],
            names: vec!["a".into(), "b".into()]
        }
    );
}

#[test]
fn headerless_tsv_with_regression_target_by_index() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "t.tsv", "0.5\t1\t2\r\n1.5\t3\t4\r\n");
    let opts = CsvOptions {
        delimiter: b'\t',
        has_header: false,
        label: LabelColumn::Index(0),
        label_kind: LabelKind::Value,
    };
    let data = read_csv(&path, &opts).unwrap();
    assert_eq!(data.feature_names, ["column_2", "column_3"]);
    assert_eq!(data.features, [1.0, 2.0, 3.0, 4.0]);
    assert_eq!(data.labels, Labels::Value(vec![0.5, 1.5]));
}

#[test]
fn reads_gzip_and_space_separated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.csv.gz");
    let mut enc = flate2::write::GzEncoder::new(std::fs::File::create(&path).unwrap(), flate2::Compression::default());
    enc.write_all(b"1 2 3\n4 5 6\n").unwrap();
    enc.finish().unwrap();
    let opts = CsvOptions {
        delimiter: b' ',
        has_header: false,
        label: LabelColumn::Index(2),
        label_kind: LabelKind::Value,
    };
    let data = read_csv(&path, &opts).unwrap();
    assert_eq!(data.features, [1.0, 2.0, 4.0, 5.0]);
    assert_eq!(data.labels, Labels::Value(vec![3.0, 6.0]));
}

#[test]
fn feature_rows_for_prediction_drop_the_label_and_keep_the_quoting_rules() {
    let dir = tempfile::tempdir().unwrap();
    let opts = CsvOptions::classification("label");
    let p = write(&dir, "p.csv", "a,label,b\n1,x,\"2.5\"\n3,y,4\n");
    assert_eq!(
        read_feature_rows(&p, &opts, 2).unwrap(),
        vec![vec![1.0, 2.5], vec![3.0, 4.0]]
    );
    let p = write(&dir, "q.csv", "a,b\n1,2\n\"3,5\",4\n");
    let e = read_feature_rows(&p, &opts, 2).unwrap_err().to_string();
    assert!(
        e.contains("line 3") && e.contains("column 1 (\"a\")") && e.contains("\"3,5\""),
        "{e}"
    );
    let p = write(&dir, "r.csv", "a,b\n1,2,3,4\n");
    let e = read_feature_rows(&p, &opts, 2).unwrap_err().to_string();
    assert!(e.contains("expected 2 feature columns"), "{e}");
}

#[test]
fn quoted_fields() {
    assert_eq!(
        split_fields(r#""YEAR", "a,b" ,"say ""hi""",plain "#, b',').unwrap(),
        ["YEAR", "a,b", "say \"hi\"", "plain"]
    );
    assert_eq!(split_fields("", b',').unwrap(), [""]);
    assert_eq!(split_fields("a,", b',').unwrap(), ["a", ""]);
    assert!(split_fields("\"open", b',').is_err());
    assert!(split_fields("\"a\"b,c", b',').is_err());
}

#[test]
fn not_a_number_names_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        &dir,
        "iris.csv",
        "sepal_len,sepal_wid,petal_len,class\n1,2,3,a\n\n4,5,abc,b\n",
    );
    let err = read_csv(&path, &CsvOptions::classification("class")).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}: line 4, column 3 (\"petal_len\"): not a number: \"abc\"",
            path.display()
        )
    );
}

#[test]
fn missing_value_is_refused_with_row_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "m.csv", "date,co2\n1,316.1\n2,\n");
    let err = read_csv(&path, &CsvOptions::regression("co2")).unwrap_err();
    assert!(
        err.to_string()
            .ends_with("line 3, column 2 (\"co2\"): missing value (empty field)"),
        "{err}"
    );
    let path = write(&dir, "m2.csv", "a,y\n,x\n");
    let err = read_csv(&path, &CsvOptions::classification("y")).unwrap_err();
    assert!(err.to_string().contains("line 2, column 1 (\"a\"): missing"), "{err}");
    let path = write(&dir, "m3.csv", "a,y\n1,\n");
    let err = read_csv(&path, &CsvOptions::classification("y")).unwrap_err();
    assert!(err.to_string().contains("line 2, column 2 (\"y\"): missing"), "{err}");
}

#[test]
fn non_finite_numbers_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "n.csv", "a,y\nNaN,1\n");
    let err = read_csv(&path, &CsvOptions::classification("y")).unwrap_err();
    assert!(err.to_string().contains("not a finite number"), "{err}");
}

#[test]
fn ragged_rows_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "r.csv", "1,2,0\n3,4,1\n5,1\n");
    let opts = CsvOptions {
        has_header: false,
        label: LabelColumn::Index(2),
        ..CsvOptions::classification("")
    };
    let err = read_csv(&path, &opts).unwrap_err();
    assert!(
        err.to_string()
            .ends_with("line 3: ragged row: expected 3 fields, found 2"),
        "{err}"
    );
}

#[test]
fn empty_file_and_header_only_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let empty = write(&dir, "e.csv", "");
    let err = read_csv(&empty, &CsvOptions::classification("y")).unwrap_err();
    assert!(matches!(err, DataError::Empty { .. }), "{err}");
    assert!(err.to_string().ends_with("empty file"), "{err}");
    let header = write(&dir, "h.csv", "a,y\n\n");
    let err = read_csv(&header, &CsvOptions::classification("y")).unwrap_err();
    assert!(err.to_string().ends_with("header but no data rows"), "{err}");
    let err = read_sklearn_csv(&empty).unwrap_err();
    assert!(matches!(err, DataError::Empty { .. }), "{err}");
}

#[test]
fn label_column_problems_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "l.csv", "a,b\n1,2\n");
    let err = read_csv(&path, &CsvOptions::classification("y")).unwrap_err();
    assert!(err.to_string().contains("no column named \"y\""), "{err}");
    let opts = CsvOptions {
        label: LabelColumn::Index(5),
        ..CsvOptions::classification("")
    };
    let err = read_csv(&path, &opts).unwrap_err();
    assert!(err.to_string().contains("out of range"), "{err}");
    let opts = CsvOptions {
        has_header: false,
        ..CsvOptions::classification("a")
    };
    assert!(matches!(
        read_csv(&path, &opts).unwrap_err(),
        DataError::InvalidArgument { .. }
    ));
}

#[test]
fn missing_file_is_an_io_error_naming_it() {
    let err = read_csv(Path::new("/nonexistent/x.csv"), &CsvOptions::classification("y")).unwrap_err();
    assert!(matches!(err, DataError::Io { .. }));
    assert!(err.to_string().starts_with("/nonexistent/x.csv: "), "{err}");
}

#[test]
fn sklearn_layout() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "s.csv", "3,2,setosa,versicolor\n1,2,0\n3,4,1\n5,6,1\n");
    let data = read_sklearn_csv(&path).unwrap();
    assert_eq!(data.n_rows, 3);
    assert_eq!(data.n_features, 2);
    assert_eq!(data.features, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    assert_eq!(
        data.labels,
        Labels::Class {
            ids: vec![0, 1, 1],
            names: vec!["setosa".into(), "versicolor".into()]
        }
    );
    let short = write(&dir, "s2.csv", "3,2,a,b\n1,2,0\n3,4,1\n");
    let err = read_sklearn_csv(&short).unwrap_err();
    assert!(err.to_string().contains("promises 3 rows, the file has 2"), "{err}");
    let bad_class = write(&dir, "s3.csv", "1,2,a,b\n1,2,2\n");
    let err = read_sklearn_csv(&bad_class).unwrap_err();
    assert!(err.to_string().contains("line 2, column 3"), "{err}");
    let ragged = write(&dir, "s4.csv", "1,2,a,b\n1,0\n");
    let err = read_sklearn_csv(&ragged).unwrap_err();
    assert!(err.to_string().contains("line 2: ragged row"), "{err}");
}
