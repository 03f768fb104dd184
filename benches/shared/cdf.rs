//! What the client benchmarks share: sorted samples, their percentiles, and a chart of two panels of
//! CDFs on a log time axis (`plotters`, DejaVu Sans from Debian's fonts-dejavu-core).

// Counts far below 2^52.
#![allow(clippy::cast_precision_loss)]

use plotters::prelude::*;

pub fn sorted(mut values: Vec<f64>) -> Vec<f64> {
    values.sort_by(f64::total_cmp);
    values
}

/// The nearest-rank percentile `p` (0–100) of sorted samples; NaN for none.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    // Nearest rank: a non-negative index no larger than the last.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let rank = (p / 100.0 * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// One line of a panel: its name (the legend adds its p50), its color and its sorted samples (ms).
pub type Series<'a> = (String, RGBColor, &'a [f64]);

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Draws two panels side by side (`(title, series)` each) into the PNG at `path`.
pub fn draw(
    path: &std::path::Path,
    size: (u32, u32),
    panels: [(&str, Vec<Series>); 2],
) -> Result<(), Box<dyn std::error::Error>> {
    let font: &'static [u8] =
        Box::leak(std::fs::read(FONT).map_err(|e| format!("{FONT}: {e}"))?.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| "the font does not load")?;
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(760);
    for (area, (title, series)) in [left, right].into_iter().zip(panels) {
        let low =
            series.iter().filter_map(|(_, _, v)| v.first()).copied().fold(f64::INFINITY, f64::min).max(0.01)
                / 1.5;
        let high = series.iter().filter_map(|(_, _, v)| v.last()).copied().fold(0.0, f64::max) * 1.5;
        let mut chart = ChartBuilder::on(&area)
            .caption(title, ("sans-serif", 22))
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(54)
            .build_cartesian_2d((low..high).log_scale(), 0.0..1.0)?;
        chart
            .configure_mesh()
            .x_desc("milliseconds (log scale)")
            .y_desc("fraction ≤ x")
            .label_style(("sans-serif", 14))
            .draw()?;
        for (name, color, values) in series {
            let n = values.len() as f64;
            chart
                .draw_series(LineSeries::new(
                    values.iter().enumerate().map(|(i, v)| (*v, (i + 1) as f64 / n)),
                    color.stroke_width(2),
                ))?
                .label(format!("{name} (p50 {:.2} ms)", percentile(values, 50.0)))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(3)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .label_font(("sans-serif", 13))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}
