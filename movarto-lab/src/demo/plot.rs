//! The demo's picture: per-connection throughput over time, with the migration's events
//! (switchover, DNS switch, teardown) as vertical lines (see [`crate::svg`]).

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Result;
use plotters::{
    prelude::*,
    style::text_anchor::{HPos, Pos, VPos},
};

use super::report::Event;
use crate::{
    svg::{self, err},
    workload::{Sample, Tracked},
};

/// Draws the throughput of every connection but the idle ones into `path`; returns its
/// absolute path.
pub fn draw(
    path: &Path,
    tracked: &[Arc<Tracked>],
    samples: &[Sample],
    events: &[Event],
) -> Result<PathBuf> {
    let series: Vec<(String, usize, usize)> = tracked
        .iter()
        .enumerate()
        .filter(|(_, t)| t.kind != "idle")
        .map(|(i, t)| {
            // curl's --limit-rate comes in bursts: a longer window.
            let window = if t.kind == "curl" { 20 } else { 4 };
            (t.name.clone(), i, window)
        })
        .collect();
    throughput_svg(path, samples, &series, events)
}

/// Each series: its name, its index in the samples' byte counts, and the number of samples
/// (100 ms apart) its throughput is averaged over (curl's --limit-rate comes in bursts).
fn throughput_svg(
    path: &Path,
    samples: &[Sample],
    series: &[(String, usize, usize)],
    events: &[Event],
) -> Result<PathBuf> {
    // KiB/s per series, over a sliding window.
    let lines: Vec<(String, Vec<(f64, f64)>)> = series
        .iter()
        .map(|(name, i, window)| {
            let window = (*window).max(1);
            let points = samples
                .windows(window + 1)
                .map(|w| {
                    let (first, last) = (&w[0], &w[window]);
                    let dt = (last.at_s - first.at_s).max(1e-3);
                    let bytes = last.bytes.get(*i).copied().unwrap_or(0)
                        - first.bytes.get(*i).copied().unwrap_or(0);
                    (last.at_s, bytes as f64 / 1024.0 / dt)
                })
                .collect();
            (name.clone(), points)
        })
        .collect();
    let x_end = samples
        .last()
        .map_or(1.0, |s| s.at_s)
        .max(events.iter().map(|e| e.at_s).fold(0.0, f64::max))
        + 1.0;
    let y_max = lines
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
        .fold(1.0, f64::max)
        * 1.15;

    svg::draw(path, (1100, 560), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(
                "movarto: per-connection throughput across the move",
                ("sans-serif", 22),
            )
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..x_end, 0.0..y_max)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("seconds since the workload started")
            .y_desc("KiB/s")
            .draw()
            .map_err(err)?;
        let palette = [&BLUE, &GREEN, &MAGENTA, &CYAN, &RGBColor(230, 140, 0)];
        for (n, (name, points)) in lines.iter().enumerate() {
            let color = palette[n % palette.len()];
            chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(err)?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        for (n, e) in events.iter().enumerate() {
            let color = match e.name.as_str() {
                "switchover" => RED,
                "teardown" => BLACK,
                "DNS switch" => RGBColor(120, 0, 160),
                _ => RGBColor(128, 128, 128),
            };
            chart
                .draw_series(LineSeries::new(
                    [(e.at_s, 0.0), (e.at_s, y_max)],
                    color.stroke_width(1),
                ))
                .map_err(err)?;
            // Staggered, so close events stay readable.
            let y = y_max * (0.97 - 0.05 * (n % 4) as f64);
            // Labels of events near the right edge go to the left of their line.
            let right = e.at_s > x_end * 0.75;
            let style = ("sans-serif", 14).into_font().color(&color).pos(Pos::new(
                if right { HPos::Right } else { HPos::Left },
                VPos::Top,
            ));
            chart
                .draw_series(std::iter::once(Text::new(
                    format!(" {} ({:.2}s) ", e.name, e.at_s),
                    (e.at_s, y),
                    style,
                )))
                .map_err(err)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_an_svg_with_the_events() {
        let dir = std::env::temp_dir().join(format!("movarto-plot-{}", std::process::id()));
        let path = dir.join("t.svg");
        let samples: Vec<Sample> = (0..50)
            .map(|i| Sample {
                at_s: i as f64 * 0.1,
                bytes: vec![i * 10_000, i * 3_000],
            })
            .collect();
        let events = [
            Event {
                name: "switchover".into(),
                at_s: 2.0,
            },
            Event {
                name: "teardown".into(),
                at_s: 4.0,
            },
        ];
        throughput_svg(
            &path,
            &samples,
            &[("stream".into(), 0, 5), ("upload".into(), 1, 5)],
            &events,
        )
        .expect("svg");
        let svg = std::fs::read_to_string(&path).expect("read");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
        assert!(svg.contains("switchover"));
        assert!(svg.contains("teardown"));
        assert!(svg.contains("upload"));
        assert!(svg.contains("<polyline"));
    }
}
