//! `--plot`: one SVG with the latency distributions (as CDFs, which show every
//! percentile at once and stay readable with few samples) and throughput over time.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::args::Metric;
use crate::client::RequestOutput;
use crate::error::Error;
use crate::metrics::{Timeline, timeline, tpot};

/// One latency metric's samples, milliseconds.
pub struct Latencies<'a> {
    pub name: &'a str,
    pub ms: Vec<f64>,
}

/// The plot of a finished run: CDFs of TTFT, TPOT, ITL and E2EL over the completed
/// requests, then output throughput and requests in flight over time.
pub fn write_run(
    path: &Path,
    title: &str,
    outputs: &[RequestOutput],
    duration: f64,
) -> Result<(), Error> {
    let samples = |metric: Metric| -> Vec<f64> {
        outputs
            .iter()
            .filter_map(|o| o.result.as_ref().ok())
            .flat_map(|s| match metric {
                Metric::Ttft => vec![s.ttft],
                Metric::Tpot => tpot(s).into_iter().collect(),
                Metric::Itl => s.itl.clone(),
                Metric::E2el => vec![s.latency],
            })
            .map(|x| x * 1000.0)
            .collect()
    };
    let latencies: Vec<Latencies<'_>> = Metric::ALL
        .into_iter()
        .map(|metric| Latencies {
            name: metric.labels().0,
            ms: samples(metric),
        })
        .collect();
    write_svg(path, title, &latencies, &timeline(outputs, duration))
}

pub fn write_svg(
    path: &Path,
    title: &str,
    latencies: &[Latencies<'_>],
    timeline: &Timeline,
) -> Result<(), Error> {
    let fail = |e: String| Error::Write {
        path: path.to_owned(),
        message: e,
    };
    let root = SVGBackend::new(path, (1200, 760)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
    let root = root
        .titled(title, ("sans-serif", 20))
        .map_err(|e| fail(e.to_string()))?;
    let panels = root.split_evenly((2, 3));
    for (panel, lat) in panels.iter().zip(latencies) {
        cdf(panel, lat).map_err(|e| fail(e.to_string()))?;
    }
    let x: Vec<f64> = (0..timeline.tokens_per_s.len())
        .map(|b| (b as f64 + 0.5) * timeline.bin_s)
        .collect();
    if let Some(panel) = panels.get(4) {
        let tokens: Vec<(f64, f64)> = x
            .iter()
            .copied()
            .zip(timeline.tokens_per_s.clone())
            .collect();
        series(panel, "Output throughput", "tokens/s", &tokens, &GREEN)
            .map_err(|e| fail(e.to_string()))?;
    }
    if let Some(panel) = panels.get(5) {
        let flight: Vec<(f64, f64)> = x
            .iter()
            .copied()
            .zip(timeline.in_flight.iter().map(|&n| n as f64))
            .collect();
        series(panel, "Requests in flight", "requests", &flight, &MAGENTA)
            .map_err(|e| fail(e.to_string()))?;
    }
    root.present().map_err(|e| fail(e.to_string()))?;
    Ok(())
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

fn cdf(area: &DrawingArea<SVGBackend<'_>, Shift>, lat: &Latencies<'_>) -> DrawResult {
    let mut xs = lat.ms.clone();
    xs.sort_by(f64::total_cmp);
    let top = xs.last().copied().unwrap_or(1.0).max(1e-3) * 1.05;
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!("{} CDF ({} samples)", lat.name, xs.len()),
            ("sans-serif", 16),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(44)
        .build_cartesian_2d(0f64..top, 0f64..1f64)?;
    chart
        .configure_mesh()
        .x_desc("ms")
        .y_desc("fraction")
        .draw()?;
    let n = xs.len() as f64;
    // A step function: each sample raises the curve by 1/n at its value.
    let mut steps = Vec::with_capacity(2 * xs.len() + 1);
    steps.push((0.0, 0.0));
    for (i, &x) in xs.iter().enumerate() {
        steps.push((x, i as f64 / n));
        steps.push((x, (i + 1) as f64 / n));
    }
    chart.draw_series(LineSeries::new(steps, &BLUE))?;
    Ok(())
}

fn series(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    title: &str,
    unit: &str,
    points: &[(f64, f64)],
    color: &RGBColor,
) -> DrawResult {
    let right = points.last().map(|p| p.0).unwrap_or(1.0).max(1e-3) * 1.02;
    let top = points.iter().map(|p| p.1).fold(0.0, f64::max).max(1.0) * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..right, 0f64..top)?;
    // Small counts get ticks at fractions: show a decimal so labels do not repeat.
    let decimals = if top < 10.0 { 1 } else { 0 };
    chart
        .configure_mesh()
        .y_label_formatter(&|v| format!("{v:.decimals$}"))
        .x_desc("seconds into the run")
        .y_desc(unit)
        .draw()?;
    chart.draw_series(LineSeries::new(points.iter().copied(), color))?;
    Ok(())
}
