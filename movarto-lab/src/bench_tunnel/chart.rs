//! The benchmark's bar chart: median Gbit/s per variant, one bar per stream count and
//! direction, with the rounds' minimum to maximum as a whisker.

use std::path::{Path, PathBuf};

use anyhow::Result;
use plotters::{
    prelude::*,
    style::text_anchor::{HPos, Pos, VPos},
};

use super::{Report, Row};
use crate::svg::{self, err};

pub fn draw(path: &Path, report: &Report) -> Result<PathBuf> {
    let names: Vec<&str> = report.variants.iter().map(|v| v.name).collect();
    let mut series: Vec<(u32, super::Direction)> = report
        .rows
        .iter()
        .map(|r| (r.streams, r.direction))
        .collect();
    series.sort();
    series.dedup();
    let y_max = report.rows.iter().map(|r| r.gbit_s.max).fold(0.1, f64::max) * 1.15;
    let width = (140 * names.len().max(4)) as u32 + 120;
    svg::draw(path, (width, 560), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(
                format!(
                    "iperf3 TCP: median Gbit/s ({} s runs, {} rounds; whiskers min-max)",
                    report.seconds, report.rounds
                ),
                ("sans-serif", 20),
            )
            .margin(16)
            .x_label_area_size(50)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..names.len() as f64, 0.0..y_max)
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_desc("Gbit/s")
            .draw()
            .map_err(err)?;
        let palette = [
            RGBColor(70, 110, 200),
            RGBColor(140, 170, 230),
            RGBColor(210, 110, 40),
            RGBColor(240, 180, 120),
        ];
        let slot = 0.8 / series.len().max(1) as f64;
        for (k, (streams, direction)) in series.iter().enumerate() {
            let color = palette[k % palette.len()];
            let rows: Vec<(usize, &Row)> = report
                .rows
                .iter()
                .filter(|r| r.streams == *streams && r.direction == *direction)
                .filter_map(|r| names.iter().position(|n| *n == r.variant).map(|i| (i, r)))
                .collect();
            let x0 = |i: usize| i as f64 + 0.1 + slot * k as f64;
            chart
                .draw_series(rows.iter().map(|(i, r)| {
                    Rectangle::new(
                        [(x0(*i), 0.0), (x0(*i) + slot * 0.9, r.gbit_s.median)],
                        color.filled(),
                    )
                }))
                .map_err(err)?
                .label(format!("{streams} stream(s) {}", direction.name()))
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 14, y + 5)], color.filled())
                });
            chart
                .draw_series(rows.iter().map(|(i, r)| {
                    let x = x0(*i) + slot * 0.45;
                    PathElement::new(
                        vec![(x, r.gbit_s.min), (x, r.gbit_s.max)],
                        BLACK.stroke_width(1),
                    )
                }))
                .map_err(err)?;
        }
        // The variants' names under their groups, in the plot's pixel space.
        let style = ("sans-serif", 13)
            .into_font()
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Top));
        for (i, name) in names.iter().enumerate() {
            let (x, y) = chart.backend_coord(&(i as f64 + 0.5, 0.0));
            root.draw(&Text::new(name.to_string(), (x, y + 8), style.clone()))
                .map_err(err)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
        Ok(())
    })
}
