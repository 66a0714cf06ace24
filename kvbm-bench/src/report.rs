//! Output: aligned text tables and SVG line charts.

use std::path::Path;

use plotters::prelude::*;

/// Formats rows under headers, right-aligning every column but the first.
///
/// ```
/// let t = kvbm_bench::report::table(&["policy", "hit rate"], &[vec!["lru".into(), "0.5".into()]]);
/// assert_eq!(t, "policy  hit rate\nlru          0.5\n");
/// ```
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, &w))| {
                if i == 0 {
                    format!("{c:<w$}")
                } else {
                    format!("{c:>w$}")
                }
            })
            .collect();
        parts.join("  ").trim_end().to_owned() + "\n"
    };
    let mut out = line(headers.to_vec());
    for row in rows {
        out += &line(row.iter().map(String::as_str).collect());
    }
    out
}

/// One line of a chart.
pub struct Series {
    /// Legend label.
    pub label: String,
    /// Points, x ascending.
    pub points: Vec<(f64, f64)>,
}

/// Draws `series` as an SVG line chart with a log2 x axis.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    line_chart_with_reference(path, title, x_label, y_label, series, None)
}

/// [`line_chart`], plus a `reference` line (an upper bound, say) drawn dashed in black.
pub fn line_chart_with_reference(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    reference: Option<&Series>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let all: Vec<(f64, f64)> = series
        .iter()
        .chain(reference)
        .flat_map(|s| s.points.iter().copied())
        .collect();
    if all.is_empty() {
        return Err("nothing to plot".into());
    }
    let (xmin, xmax) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let ymax = all.iter().fold(0f64, |m, p| m.max(p.1)) * 1.1;
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(
            (xmin.max(1e-9)..xmax.max(xmin * 2.0)).log_scale(),
            0f64..ymax.max(1e-9),
        )
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .x_label_formatter(&|x| format!("{}", x.round() as u64))
        .y_label_formatter(&|y| format!("{y:.1}"))
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                s.points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(|e| e.to_string())?
            .label(s.label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart
            .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(|e| e.to_string())?;
    }
    if let Some(s) = reference {
        let style = BLACK.stroke_width(2);
        chart
            .draw_series(DashedLineSeries::new(s.points.iter().copied(), 8, 5, style))
            .map_err(|e| e.to_string())?
            .label(s.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())?;
    Ok(())
}
