//! The lab's pictures (the demo's throughput over time, the tunnel benchmark's bars): SVG
//! only, with text as SVG text, so nothing depends on the machine's fonts.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow};
use plotters::{coord::Shift, prelude::*};

/// A drawing error as anyhow's (plotters' errors borrow the backend).
pub fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("drawing: {e}")
}

/// Draws `size` pixels with `paint` onto a white canvas saved as `path` (its directory
/// made if missing); returns the picture's absolute path.
pub fn draw(
    path: &Path,
    size: (u32, u32),
    paint: impl FnOnce(&DrawingArea<SVGBackend, Shift>) -> Result<()>,
) -> Result<PathBuf> {
    (|| -> Result<()> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let root = SVGBackend::new(path, size).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        paint(&root)?;
        root.present().map_err(err)
    })()
    .with_context(|| format!("drawing {}", path.display()))?;
    Ok(fs::canonicalize(path).unwrap_or_else(|_| path.to_owned()))
}
