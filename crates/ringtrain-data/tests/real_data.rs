use std::path::PathBuf;

use ringtrain_data::*;

/// The shared datasets, or `None` (see `ringtrain_testkit::shared_data`).
fn data_dir() -> Option<PathBuf> {
    ringtrain_testkit::shared_data(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.."), "")
}

/// sklearn's files have no header line and name the label column by position.
fn headerless(delimiter: u8, label: usize, label_kind: LabelKind) -> CsvOptions {
    CsvOptions {
        delimiter,
        has_header: false,
        label: LabelColumn::Index(label),
        label_kind,
    }
}

fn class_counts(labels: &Labels) -> Vec<usize> {
    let ids = labels.class_ids().unwrap();
    let mut counts = vec![0; labels.n_classes()];
    for &id in ids {
        counts[id] += 1;
    }
    counts
}

#[test]
fn iris_in_sklearn_layout() {
    let Some(dir) = data_dir() else { return };
    let iris = read_sklearn_csv(&dir.join("sklearn/iris.csv")).unwrap();
    assert_eq!((iris.n_rows, iris.n_features), (150, 4));
    assert_eq!(class_counts(&iris.labels), [50, 50, 50]);
    let Labels::Class { names, ids } = &iris.labels else {
        panic!("iris labels are classes")
    };
    assert_eq!(names, &["setosa", "versicolor", "virginica"]);
    // First and last rows of the file: 5.1,3.5,1.4,0.2,0 and 5.9,3.0,5.1,1.8,2.
    assert_eq!(iris.row(0), [5.1, 3.5, 1.4, 0.2]);
    assert_eq!(ids[0], 0);
    assert_eq!(iris.row(149), [5.9, 3.0, 5.1, 1.8]);
    assert_eq!(ids[149], 2);

    let folds = kfold(150, 5, 0, Some(ids)).unwrap();
    for fold in &folds {
        assert_eq!(class_counts(&iris.labels.select(&fold.test)), [10, 10, 10]);
    }
}

#[test]
fn breast_cancer_and_wine_in_sklearn_layout() {
    let Some(dir) = data_dir() else { return };
    let bc = read_sklearn_csv(&dir.join("sklearn/breast_cancer.csv")).unwrap();
    assert_eq!((bc.n_rows, bc.n_features), (569, 30));
    assert_eq!(class_counts(&bc.labels), [212, 357]);
    let wine = read_sklearn_csv(&dir.join("sklearn/wine_data.csv")).unwrap();
    assert_eq!((wine.n_rows, wine.n_features), (178, 13));
    assert_eq!(class_counts(&wine.labels), [59, 71, 48]);
}

#[test]
fn generic_reader_on_gzip_and_space_separated_sklearn_files() {
    let Some(dir) = data_dir() else { return };
    let digits = read_csv(
        &dir.join("sklearn/digits.csv.gz"),
        &headerless(b',', 64, LabelKind::Class),
    )
    .unwrap();
    assert_eq!((digits.n_rows, digits.n_features), (1797, 64));
    assert_eq!(digits.labels.n_classes(), 10);
    assert!(digits.features.iter().all(|&p| (0.0..=16.0).contains(&p)));

    let diabetes = read_csv(
        &dir.join("sklearn/diabetes_data_raw.csv.gz"),
        &headerless(b' ', 9, LabelKind::Value),
    )
    .unwrap();
    assert_eq!((diabetes.n_rows, diabetes.n_features), (442, 9));
    // First line: 59 2 32.1 101.0 157 93.2 38.0 4.0 4.8598 87
    assert_eq!(diabetes.row(0)[..3], [59.0, 2.0, 32.1]);
    let Labels::Value(target) = &diabetes.labels else {
        panic!("diabetes column 10 is read as values")
    };
    assert_eq!(target[0], 87.0);
}

#[test]
fn generic_reader_refuses_sklearn_header_and_co2_gaps_with_position() {
    let Some(dir) = data_dir() else { return };
    let path = dir.join("sklearn/iris.csv");
    let err = read_csv(&path, &headerless(b',', 4, LabelKind::Class)).unwrap_err();
    assert!(
        err.to_string().ends_with("line 1, column 3: not a number: \"setosa\""),
        "{err}"
    );
    let co2 = dir.join("timeseries/co2_weekly.csv");
    let err = read_csv(&co2, &CsvOptions::regression("co2")).unwrap_err();
    // 19580510 is the first week without a value, on line 8.
    assert!(
        err.to_string()
            .ends_with("line 8, column 2 (\"co2\"): missing value (empty field)"),
        "{err}"
    );
}

fn digit_histogram(labels: &[u8]) -> [usize; 10] {
    let mut counts = [0; 10];
    for &l in labels {
        counts[usize::from(l)] += 1;
    }
    counts
}

#[test]
fn mnist_gzip_idx() {
    let Some(dir) = data_dir() else { return };
    let mnist = load_mnist(&dir.join("mnist")).unwrap();
    let (train, test) = (&mnist.train, &mnist.test);
    assert_eq!((train.images.n, train.images.rows, train.images.cols), (60000, 28, 28));
    assert_eq!(test.images.n, 10000);
    // Histograms from the data README.
    assert_eq!(
        digit_histogram(&train.labels),
        [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    );
    assert_eq!(
        digit_histogram(&test.labels),
        [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    );
    assert_eq!(train.labels[..10], [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]);
    assert_eq!(test.labels[..10], [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]);
    // Pixel values (computed independently with Python's gzip module).
    let first = train.images.image(0);
    assert_eq!(first[151..157], [0, 3, 18, 18, 18, 126]);
    let pixel_sum = |img: &[u8]| img.iter().map(|&p| u64::from(p)).sum::<u64>();
    assert_eq!(pixel_sum(first), 27525);
    assert_eq!(train.images.image(59999)[14 * 28 + 14], 97);
    assert_eq!(pixel_sum(train.images.image(59999)), 20920);
    assert_eq!(pixel_sum(test.images.image(0)), 18454);
}

#[test]
fn rotten_tomatoes_and_spam_assassin_tsv() {
    let Some(dir) = data_dir() else { return };
    let rt = dir.join("rotten-tomatoes");
    let train = read_labeled_lines(&rt.join("train.tsv"), None).unwrap();
    assert_eq!(train.label_names, ["0", "1"]);
    assert_eq!(train.len(), 10234);
    assert_eq!(train.class_counts(), [4306, 5928]);
    assert_eq!(train.texts[0], "A three-hour cinema master class.");
    let test = read_labeled_lines(&rt.join("test.tsv"), Some(&train.label_names)).unwrap();
    assert_eq!(test.class_counts(), [1078, 1440]);

    let sa = dir.join("spam-assassin");
    let train = read_labeled_lines(&sa.join("train.tsv.gz"), None).unwrap();
    assert_eq!(train.class_counts(), [3277, 1423]);
    let test = read_labeled_lines(&sa.join("test.tsv.gz"), Some(&train.label_names)).unwrap();
    assert_eq!(test.class_counts(), [831, 385]);
    // Longest text (164,015 chars) and lines with U+FFFD, per the data README (train file).
    let longest = train.texts.iter().map(|t| t.chars().count()).max();
    assert_eq!(longest, Some(164015));
    let replaced = train.texts.iter().filter(|t| t.contains('\u{FFFD}')).count();
    assert_eq!(replaced, 46);
}

#[test]
fn hamlet_char_and_word_language_modelling() {
    let Some(dir) = data_dir() else { return };
    let text = read_text(&dir.join("shakespeare/hamlet.txt")).unwrap();
    assert_eq!(text.len(), 173942);
    assert!(text.is_ascii());
    let (train, valid) = split_text_tail(&text, 0.1).unwrap();
    assert_eq!(valid.len(), 17394);

    let chars = Vocab::build(Tokenizer::Char, [train], &VocabOptions::default()).unwrap();
    // Every id round-trips on training text; the held-out tail may contain unseen characters.
    assert_eq!(chars.decode(&chars.encode(train)), train);
    assert!(chars.len() <= 4 + 128);
    let ids = chars.encode(valid);
    let seqs = LmSequences::new(ids, 64, 64).unwrap();
    assert_eq!(seqs.len(), (17394 - 65) / 64 + 1);

    let words = Vocab::build(
        Tokenizer::Word { lowercase: true },
        [train],
        &VocabOptions {
            max_size: Some(1000),
            min_freq: 2,
        },
    )
    .unwrap();
    assert_eq!(words.len(), 1000);
    assert!(words.id("hamlet") > UNK && words.id("the") < 10);
}

#[test]
fn complete_shakespeare_gzip_corpus() {
    let Some(dir) = data_dir() else { return };
    let text = read_text(&dir.join("shakespeare/shakespeare_complete.txt.gz")).unwrap();
    assert_eq!(text.len(), 5_057_321);
    let mut distinct: Vec<char> = text.chars().collect();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), 84);
}

#[test]
fn time_series_files() {
    let Some(dir) = data_dir() else { return };
    let ts = dir.join("timeseries");
    let co2 = ts.join("co2_weekly.csv");
    let err = read_series_csv(&co2, b',', &["co2"], Missing::Refuse).unwrap_err();
    assert!(
        err.to_string().contains("line 8, column 2 (\"co2\"): missing value"),
        "{err}"
    );
    let dropped = read_series_csv(&co2, b',', &["co2"], Missing::Drop).unwrap();
    assert_eq!(dropped.n_steps, 2284 - 59);
    let filled = read_series_csv(&co2, b',', &["co2"], Missing::Interpolate).unwrap();
    assert_eq!(filled.n_steps, 2284);
    // Lines 7..9 are `19580503,316.9`, `19580510,`, `19580517,317.5`: step 6 is filled halfway.
    let c = filled.column(0);
    assert_eq!((c[5], c[7]), (316.9, 317.5));
    assert!((c[6] - 317.2).abs() < 1e-4, "{:?}", &c[4..9]);

    let airline = read_series_csv(
        &ts.join("airline_passengers.csv"),
        b',',
        &["Passengers"],
        Missing::Refuse,
    )
    .unwrap();
    assert_eq!(airline.n_steps, 144);
    assert_eq!(airline.values[0], 112.0);
    let windows = make_windows(&airline, 12, 1, &[0]).unwrap();
    assert_eq!(windows.n, 132);
    let splits = time_series_splits(windows.n, 5, None, 0, Window::Expanding).unwrap();
    assert_eq!(splits.last().unwrap().test.last(), Some(&131));

    let sunspots = read_series_csv(&ts.join("sunspots_yearly.csv"), b',', &["SUNACTIVITY"], Missing::Refuse).unwrap();
    assert_eq!(sunspots.n_steps, 309);
    let monthly = read_series_csv(
        &ts.join("sunspots_monthly.csv"),
        b',',
        &["month", "sunspots"],
        Missing::Refuse,
    )
    .unwrap();
    assert_eq!((monthly.n_steps, monthly.n_vars), (3126, 2));
}

#[test]
fn ucr_series_classification() {
    let Some(dir) = data_dir() else { return };
    let opts = CsvOptions {
        delimiter: b',',
        has_header: false,
        label: LabelColumn::Index(0),
        label_kind: LabelKind::Class,
    };
    let train = read_csv(&dir.join("ucr/ItalyPowerDemand_TRAIN.csv"), &opts).unwrap();
    assert_eq!((train.n_rows, train.n_features), (67, 24));
    assert_eq!(class_counts(&train.labels), [34, 33]);
    let test = read_csv(&dir.join("ucr/ItalyPowerDemand_TEST.csv"), &opts).unwrap();
    assert_eq!(class_counts(&test.labels), [513, 516]);
}
