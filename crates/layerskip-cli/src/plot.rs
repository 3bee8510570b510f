//! SVG pictures with `plotters`: per-layer line plots (`eval`) and grid heatmaps (`sweep`).

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

/// One labelled line.
pub struct Series {
    /// Legend text.
    pub label: String,
    /// `(x, y)` points in drawing order.
    pub points: Vec<(f64, f64)>,
}

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("plotting: {e}")
}

fn padded(lo: f64, hi: f64) -> std::ops::Range<f64> {
    let pad = ((hi - lo) * 0.05).max(1e-3);
    (lo - pad)..(hi + pad)
}

/// Stacked line plots sharing the x axis: one panel per `(title, series)`.
pub fn line_plot(path: &Path, x_label: &str, panels: &[(&str, Vec<Series>)]) -> Result<()> {
    let root = SVGBackend::new(path, (720, 340 * panels.len() as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    for (area, (title, series)) in root.split_evenly((panels.len(), 1)).iter().zip(panels) {
        let all = || series.iter().flat_map(|s| s.points.iter().copied());
        let (x0, x1) = all().fold((f64::MAX, f64::MIN), |(a, b), (x, _)| (a.min(x), b.max(x)));
        let (y0, y1) = all().fold((f64::MAX, f64::MIN), |(a, b), (_, y)| (a.min(y), b.max(y)));
        if x0 > x1 {
            continue;
        }
        let mut chart = ChartBuilder::on(area)
            .caption(*title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(padded(x0, x1), padded(y0, y1))
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .draw()
            .map_err(err)?;
        for (i, s) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(s.points.clone(), color.stroke_width(2)))
                .map_err(err)?
                .label(s.label.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            chart
                .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(err)?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)
}

/// A grid heatmap: `values[row][col]` (`None` = not measured) with the value written in each
/// cell; rows are `y_ticks`, columns `x_ticks`.
pub struct Heatmap<'a> {
    /// Title above the grid.
    pub title: &'a str,
    /// Axis descriptions.
    pub x_label: &'a str,
    /// Axis descriptions.
    pub y_label: &'a str,
    /// Column labels.
    pub x_ticks: &'a [usize],
    /// Row labels.
    pub y_ticks: &'a [usize],
    /// Cell values, row-major.
    pub values: &'a [Vec<Option<f64>>],
    /// Decimals written in the cells.
    pub decimals: usize,
}

/// Light yellow (low) to dark blue (high).
fn shade(t: f64) -> RGBColor {
    let t = t.clamp(0.0, 1.0);
    let lerp = |a: f64, b: f64| (a + (b - a) * t).round() as u8;
    RGBColor(lerp(255.0, 33.0), lerp(247.0, 64.0), lerp(188.0, 154.0))
}

/// The label of grid index `v` (blank between cells).
fn tick(ticks: &[usize], v: f64) -> String {
    let i = v.round();
    if (v - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < ticks.len() {
        ticks[i as usize].to_string()
    } else {
        String::new()
    }
}

/// Draws `map` into `path` as SVG.
pub fn heatmap(path: &Path, map: &Heatmap<'_>) -> Result<()> {
    let (nx, ny) = (map.x_ticks.len(), map.y_ticks.len());
    let root =
        SVGBackend::new(path, (80 + 70 * nx as u32, 100 + 44 * ny as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let known = map.values.iter().flatten().flatten().copied();
    let (lo, hi) = known.fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v), b.max(v)));
    let mut chart = ChartBuilder::on(&root)
        .caption(map.title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(-0.5..nx as f64 - 0.5, -0.5..ny as f64 - 0.5)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(nx)
        .y_labels(ny)
        .x_label_formatter(&|v| tick(map.x_ticks, *v))
        .y_label_formatter(&|v| tick(map.y_ticks, *v))
        .x_desc(map.x_label)
        .y_desc(map.y_label)
        .draw()
        .map_err(err)?;
    for (j, row) in map.values.iter().enumerate() {
        for (i, v) in row.iter().enumerate() {
            let (x, y) = (i as f64, j as f64);
            let fill = match v {
                Some(v) => shade((v - lo) / (hi - lo).max(1e-12)),
                None => RGBColor(230, 230, 230),
            };
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(x - 0.5, y - 0.5), (x + 0.5, y + 0.5)],
                    fill.filled(),
                )))
                .map_err(err)?;
            let text = v.map_or("-".to_string(), |v| format!("{v:.*}", map.decimals));
            let dark = v.is_some_and(|v| (v - lo) / (hi - lo).max(1e-12) > 0.55);
            let color = if dark { WHITE } else { BLACK };
            chart
                .draw_series(std::iter::once(Text::new(
                    text,
                    (x - 0.3, y + 0.1),
                    ("sans-serif", 14).into_font().color(&color),
                )))
                .map_err(err)?;
        }
    }
    root.present().map_err(err)
}
