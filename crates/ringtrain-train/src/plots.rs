//! PNG reports of a run: learning curves and the confusion matrix.
//!
//! Plots are drawn into an in-memory RGB buffer (plotters' bitmap backend, text rasterised by
//! `ab_glyph` with an embedded font) and encoded with `png`, so nothing depends on system fonts
//! or libraries and every file is written atomically like the rest of the run directory.
//!
//! k-fold runs plot the mean over folds of each epoch's metrics (one line per fold would put
//! 2 × K crossing lines on a panel), and the confusion matrix summed over folds: every example
//! is tested in exactly one fold, so the sum is the confusion of the whole dataset.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::FontStyle;
use serde::Deserialize;

use crate::{write_atomic, Result, RunSummary, TrainError};

/// The font family every plot uses; registered once per process.
const FONT: &str = "sans-serif";

/// The fields of a `metrics.jsonl` line the curves need.
#[derive(Debug, Deserialize)]
struct Point {
    epoch: usize,
    train_loss: f64,
    test_loss: f64,
    train_accuracy: Option<f64>,
    test_accuracy: Option<f64>,
}

/// One curve: (epoch, value) pairs.
type Curve = Vec<(f64, f64)>;

/// Writes `learning_curves.png` (and `confusion_matrix.png` for classification) into `dir`
/// from the run's `metrics.jsonl` text and its summary.
pub fn write_plots(dir: &Path, metrics_jsonl: &str, summary: &RunSummary) -> Result<()> {
    register_font();
    let path = dir.join("learning_curves.png");
    let points = metrics_jsonl
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str::<Point>)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| TrainError::io(dir.join("metrics.jsonl"), e))?;
    let folds = summary.folds.len().max(1);
    let title = if folds > 1 {
        format!("{}: mean of {folds} folds", summary.job)
    } else {
        summary.job.clone()
    };
    let png = learning_curves(&title, &points)
        .map_err(|e| TrainError::io(&path, format!("cannot draw learning curves: {e}")))?;
    write_atomic(&path, &png)?;

    let confusion = match &summary.confusion_matrix {
        Some(cm) => Some((cm.clone(), "test split".to_string())),
        None => summed_fold_confusion(summary).map(|cm| (cm, format!("summed over {folds} folds"))),
    };
    if let Some((cm, scope)) = confusion {
        let path = dir.join("confusion_matrix.png");
        let title = format!("{}: confusion matrix ({scope})", summary.job);
        let png = confusion_matrix(&title, &cm, &summary.class_names)
            .map_err(|e| TrainError::io(&path, format!("cannot draw confusion matrix: {e}")))?;
        write_atomic(&path, &png)?;
    }
    Ok(())
}

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The bytes are a valid TrueType font shipped by the crate; a failure here would only
        // mean that text is missing from the plots, which the drawing calls then report.
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, epaint_default_fonts::HACK_REGULAR);
    });
}

fn summed_fold_confusion(summary: &RunSummary) -> Option<Vec<Vec<u64>>> {
    let mut total: Option<Vec<Vec<u64>>> = None;
    for cm in summary.folds.iter().filter_map(|f| f.test.confusion_matrix.as_ref()) {
        match &mut total {
            None => total = Some(cm.clone()),
            Some(t) => {
                for (tr, r) in t.iter_mut().zip(cm) {
                    for (tc, c) in tr.iter_mut().zip(r) {
                        *tc += c;
                    }
                }
            }
        }
    }
    total
}

/// Per epoch, the mean over the folds that reached it of `value` (`None` where no fold has one).
fn mean_curve(points: &[Point], value: impl Fn(&Point) -> Option<f64>) -> Curve {
    let epochs = points.iter().map(|p| p.epoch).max().unwrap_or(0);
    let mut sum = vec![(0.0f64, 0usize); epochs + 1];
    for p in points {
        if let Some(v) = value(p).filter(|v| v.is_finite()) {
            sum[p.epoch].0 += v;
            sum[p.epoch].1 += 1;
        }
    }
    sum.iter()
        .enumerate()
        .filter(|(_, (_, n))| *n > 0)
        .map(|(e, (s, n))| (e as f64, s / *n as f64))
        .collect()
}

type DrawResult<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const TRAIN: RGBColor = RGBColor(31, 119, 180);
const TEST: RGBColor = RGBColor(214, 39, 40);

fn learning_curves(title: &str, points: &[Point]) -> DrawResult<Vec<u8>> {
    let loss = [
        ("train", mean_curve(points, |p| Some(p.train_loss))),
        ("test", mean_curve(points, |p| Some(p.test_loss))),
    ];
    let accuracy = [
        ("train", mean_curve(points, |p| p.train_accuracy)),
        ("test", mean_curve(points, |p| p.test_accuracy)),
    ];
    let classification = accuracy.iter().any(|(_, c)| !c.is_empty());
    let (w, h) = if classification { (1400u32, 560u32) } else { (760, 560) };
    let mut buf = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE)?;
        let body = root.titled(title, (FONT, 26))?;
        if classification {
            let (l, r) = body.split_horizontally(w / 2);
            curve_panel(&l, "loss", &loss)?;
            curve_panel(&r, "accuracy", &accuracy)?;
        } else {
            curve_panel(&body, "loss", &loss)?;
        }
        root.present()?;
    }
    encode_png(&buf, w, h)
}

fn curve_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    name: &str,
    curves: &[(&str, Curve); 2],
) -> DrawResult<()>
where
    DB::ErrorType: 'static,
{
    let all = curves.iter().flat_map(|(_, c)| c.iter());
    let last_epoch = all.clone().map(|p| p.0).fold(1.0f64, f64::max);
    let (lo, hi) = all
        .map(|p| p.1)
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = if name == "accuracy" {
        // Accuracy has a natural scale; start at the lowest value seen so late epochs are legible.
        ((lo - 0.05).clamp(0.0, 1.0).min(0.9), 1.0)
    } else if lo.is_finite() && hi.is_finite() {
        (0.0f64.min(lo), hi * 1.05 + 1e-9)
    } else {
        (0.0, 1.0)
    };
    let mut chart = ChartBuilder::on(area)
        .caption(name, (FONT, 22))
        .margin(16)
        .margin_right(32)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(1.0f64..last_epoch.max(2.0), lo..hi)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .x_labels((last_epoch as usize).clamp(2, 11))
        // Epochs are whole numbers: ticks between them stay unlabelled.
        .x_label_formatter(&|x| {
            if x.fract() == 0.0 {
                format!("{x:.0}")
            } else {
                String::new()
            }
        })
        .y_desc(name)
        .axis_desc_style((FONT, 18))
        .label_style((FONT, 15))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    for ((label, curve), colour) in curves.iter().zip([TRAIN, TEST]) {
        if curve.is_empty() {
            continue;
        }
        chart
            .draw_series(LineSeries::new(curve.iter().copied(), colour.stroke_width(2)))?
            .label(*label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], colour.stroke_width(3)));
        // With few epochs a line hides where the measurements are (one epoch draws no line).
        if curve.len() <= 30 {
            chart.draw_series(curve.iter().map(|&p| Circle::new(p, 4, colour.filled())))?;
        }
    }
    let position = if name == "accuracy" {
        SeriesLabelPosition::LowerRight
    } else {
        SeriesLabelPosition::UpperRight
    };
    chart
        .configure_series_labels()
        .position(position)
        .label_font((FONT, 17))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// A heat map of counts: rows are true classes, columns predicted ones. A cell's colour is its
/// share of the row (the recall of that class), so small classes read as clearly as large ones.
fn confusion_matrix(title: &str, cm: &[Vec<u64>], names: &[String]) -> DrawResult<Vec<u8>> {
    let n = cm.len().max(1);
    let short = |i: usize| -> String {
        let name = names.get(i).cloned().unwrap_or_else(|| i.to_string());
        // Long names would push the grid off the image; 14 characters identify a class.
        if name.chars().count() > 14 {
            name.chars().take(13).chain(['…']).collect()
        } else {
            name
        }
    };
    let labels: Vec<String> = (0..n).map(short).collect();
    let longest = labels.iter().map(|l| l.chars().count()).max().unwrap_or(1) as i32;
    // Hack is monospaced: at 16 px a character is about 10 px wide.
    let char_w = 10;
    let cell = (longest * char_w + 16).clamp(56, 120).max((640 / n as i32).min(120));
    let left = 60 + longest * char_w + 16;
    let top = 70;
    let grid = cell * n as i32;
    let w = (left + grid + 40).max(title.chars().count() as i32 * 13 + 40) as u32;
    let h = (top + grid + 90) as u32;
    let mut buf = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE)?;
        let centred = |size: u32| {
            TextStyle::from((FONT, size).into_font())
                .color(&BLACK)
                .pos(plotters::style::text_anchor::Pos::new(
                    plotters::style::text_anchor::HPos::Center,
                    plotters::style::text_anchor::VPos::Center,
                ))
        };
        root.draw(&Text::new(title.to_string(), (w as i32 / 2, 26), centred(22)))?;
        for (r, row) in cm.iter().enumerate() {
            let total: u64 = row.iter().sum();
            for (c, &count) in row.iter().enumerate() {
                let share = if total > 0 { count as f64 / total as f64 } else { 0.0 };
                let (x0, y0) = (left + c as i32 * cell, top + r as i32 * cell);
                root.draw(&Rectangle::new(
                    [(x0, y0), (x0 + cell, y0 + cell)],
                    heat(share).filled(),
                ))?;
                root.draw(&Rectangle::new([(x0, y0), (x0 + cell, y0 + cell)], BLACK.mix(0.3)))?;
                let ink = if share > 0.55 { WHITE } else { BLACK };
                root.draw(&Text::new(
                    count.to_string(),
                    (x0 + cell / 2, y0 + cell / 2),
                    centred(20).color(&ink),
                ))?;
            }
        }
        let right_aligned = TextStyle::from((FONT, 16).into_font()).pos(plotters::style::text_anchor::Pos::new(
            plotters::style::text_anchor::HPos::Right,
            plotters::style::text_anchor::VPos::Center,
        ));
        for (i, label) in labels.iter().enumerate() {
            let mid = i as i32 * cell + cell / 2;
            root.draw(&Text::new(label.clone(), (left - 8, top + mid), right_aligned.clone()))?;
            root.draw(&Text::new(label.clone(), (left + mid, top + grid + 16), centred(16)))?;
        }
        root.draw(&Text::new(
            "predicted class".to_string(),
            (left + grid / 2, top + grid + 52),
            centred(18),
        ))?;
        let vertical = centred(18).transform(FontTransform::Rotate270);
        root.draw(&Text::new("true class".to_string(), (22, top + grid / 2), vertical))?;
        root.present()?;
    }
    encode_png(&buf, w, h)
}

/// White (0) to dark blue (1).
fn heat(share: f64) -> RGBColor {
    let t = share.clamp(0.0, 1.0);
    let lerp = |a: f64, b: f64| (a + (b - a) * t).round() as u8;
    RGBColor(lerp(247.0, 8.0), lerp(251.0, 48.0), lerp(255.0, 107.0))
}

fn encode_png(rgb: &[u8], w: u32, h: u32) -> DrawResult<Vec<u8>> {
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, w, h);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(rgb)?;
    writer.finish()?;
    Ok(bytes)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::{EvalMetrics, FoldReport};

    fn point(epoch: usize, train_loss: f64, test_accuracy: Option<f64>) -> Point {
        Point {
            epoch,
            train_loss,
            test_loss: 2.0 * train_loss,
            train_accuracy: None,
            test_accuracy,
        }
    }

    fn fold(fold: Option<usize>, cm: Option<Vec<Vec<u64>>>) -> FoldReport {
        FoldReport {
            fold,
            train_examples: 8,
            test_examples: 2,
            train_loss: 0.5,
            test: EvalMetrics {
                examples: 2,
                loss: 0.5,
                accuracy: cm.as_ref().map(|_| 0.5),
                macro_f1: None,
                rmse: None,
                mae: None,
                perplexity: None,
                confusion_matrix: cm,
            },
            early_stopping: None,
        }
    }

    fn summary(folds: Vec<FoldReport>, class_names: &[&str]) -> RunSummary {
        RunSummary {
            job: "unit".into(),
            seed: 1,
            epochs: 2,
            parameters: 3,
            class_names: class_names.iter().map(|s| s.to_string()).collect(),
            test_accuracy: None,
            test_loss: None,
            test_rmse: None,
            test_perplexity: None,
            test_sequence_accuracy: None,
            baseline: Default::default(),
            confusion_matrix: None,
            early_stopping: None,
            folds,
            kfold: Default::default(),
        }
    }

    /// Decodes a PNG; returns (width, height, number of near-black pixels).
    fn decode(path: &Path) -> (u32, u32, usize) {
        let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        let dark = buf[..info.buffer_size()]
            .chunks(3)
            .filter(|p| p.iter().all(|&c| c < 80))
            .count();
        (info.width, info.height, dark)
    }

    #[test]
    fn fold_curves_are_averaged_per_epoch() {
        let points = [point(1, 1.0, Some(0.5)), point(2, 0.5, None), point(1, 3.0, Some(0.7))];
        assert_eq!(
            mean_curve(&points, |p| Some(p.train_loss)),
            vec![(1.0, 2.0), (2.0, 0.5)]
        );
        // An epoch with no value is left out rather than drawn as zero.
        let acc = mean_curve(&points, |p| p.test_accuracy);
        assert_eq!(acc.len(), 1);
        assert!((acc[0].1 - 0.6).abs() < 1e-12);
    }

    #[test]
    fn kfold_confusion_is_the_sum_of_the_folds() {
        let s = summary(
            vec![
                fold(Some(0), Some(vec![vec![1, 0], vec![1, 0]])),
                fold(Some(1), Some(vec![vec![0, 1], vec![0, 1]])),
            ],
            &["a", "b"],
        );
        assert_eq!(summed_fold_confusion(&s), Some(vec![vec![1, 1], vec![1, 1]]));
    }

    #[test]
    fn writes_decodable_pngs_with_text() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = "{\"epoch\":1,\"train_loss\":1.0,\"test_loss\":1.2,\"train_accuracy\":0.4,\"test_accuracy\":0.5}\n\
                       {\"epoch\":2,\"train_loss\":0.6,\"test_loss\":0.9,\"train_accuracy\":0.7,\"test_accuracy\":0.6}\n";
        // An all-zero matrix paints every cell white: the only dark pixels are the text.
        let mut s = summary(vec![fold(None, Some(vec![vec![0, 0], vec![0, 0]]))], &["cat", "dog"]);
        s.confusion_matrix = Some(vec![vec![0, 0], vec![0, 0]]);
        write_plots(dir.path(), metrics, &s).unwrap();
        let (w, h, dark) = decode(&dir.path().join("learning_curves.png"));
        assert_eq!((w, h), (1400, 560));
        assert!(dark > 1000, "{dark} dark pixels: axes, labels and legend missing");
        let (w, h, dark) = decode(&dir.path().join("confusion_matrix.png"));
        assert!(w >= 300 && h >= 300, "{w}x{h}");
        assert!(dark > 500, "{dark} dark pixels: the font did not render");

        // Regression: one loss panel and no confusion matrix.
        let dir = tempfile::tempdir().unwrap();
        let metrics = "{\"epoch\":1,\"train_loss\":1.0,\"test_loss\":1.2}\n";
        write_plots(dir.path(), metrics, &summary(vec![fold(None, None)], &[])).unwrap();
        assert_eq!(decode(&dir.path().join("learning_curves.png")).0, 760);
        assert!(!dir.path().join("confusion_matrix.png").exists());
    }

    #[test]
    fn bad_metrics_line_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = write_plots(dir.path(), "{\"epoch\":1}\n", &summary(vec![], &[])).unwrap_err();
        assert!(err.to_string().contains("metrics.jsonl"), "{err}");
    }
}
