//! Figures: error and misalignment against step, log scale, mean ± one standard error.

use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;
use tpo::experiments::tabular::{Method, MethodCurves};

/// The one font the figures use, embedded (DejaVu Sans), so no system fonts are needed.
fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The embedded font is a valid TrueType file; a failure would leave text undrawn, not crash.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
    });
}

fn color(m: Method) -> RGBColor {
    match m {
        Method::Pg => RGBColor(31, 119, 180),
        Method::Dg => RGBColor(214, 39, 40),
        Method::Grpo => RGBColor(44, 160, 44),
        Method::Tpo => RGBColor(148, 103, 189),
        Method::Ce => RGBColor(110, 110, 110),
    }
}

/// A figure: what to plot and how to label it.
pub struct Figure<'a> {
    pub title: &'a str,
    pub steps: &'a [f64],
    pub curves: &'a [MethodCurves],
    pub x_label: &'a str,
    pub error_label: &'a str,
    pub misalignment_label: &'a str,
}

/// Writes `stem.png` and `stem.svg`.
pub fn draw(fig: &Figure, stem: &Path) -> Result<(), String> {
    register_font();
    let png = stem.with_extension("png");
    let svg = stem.with_extension("svg");
    let size = (1400, 520);
    {
        let root = BitMapBackend::new(&png, size).into_drawing_area();
        draw_on(&root, fig).map_err(|e| format!("drawing {}: {e}", png.display()))?;
        root.present().map_err(|e| format!("writing {}: {e}", png.display()))?;
    }
    let root = SVGBackend::new(&svg, size).into_drawing_area();
    draw_on(&root, fig).map_err(|e| format!("drawing {}: {e}", svg.display()))?;
    root.present().map_err(|e| format!("writing {}: {e}", svg.display()))?;
    Ok(())
}

type DrawResult<DB> = Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

fn draw_on<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, fig: &Figure) -> DrawResult<DB> {
    root.fill(&WHITE)?;
    let root = root.titled(fig.title, ("sans-serif", 24))?;
    let panels = root.split_evenly((1, 2));
    panel(&panels[0], fig, "(a) Error", fig.error_label, Metric::Error)?;
    panel(&panels[1], fig, "(b) Misalignment", fig.misalignment_label, Metric::Misalignment)?;
    Ok(())
}

/// Which curve a panel shows.
#[derive(Clone, Copy)]
enum Metric {
    Error,
    Misalignment,
}

/// The lowest value shown on a log axis; smaller values (exact zeros) are drawn there.
const FLOOR: f64 = 1e-12;

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    fig: &Figure,
    caption: &str,
    y_label: &str,
    metric: Metric,
) -> DrawResult<DB> {
    let series: Vec<(Method, &[f64], &[f64])> = fig
        .curves
        .iter()
        .map(|c| match metric {
            Metric::Error => (c.method, &c.error_mean[..], &c.error_se[..]),
            Metric::Misalignment => (c.method, &c.misalignment_mean[..], &c.misalignment_se[..]),
        })
        .collect();
    let mut lo = f64::INFINITY;
    let mut hi: f64 = FLOOR;
    for (_, m, se) in &series {
        for (x, s) in m.iter().zip(se.iter()) {
            if x - s > FLOOR {
                lo = lo.min(x - s);
            } else if *x > FLOOR {
                lo = lo.min(*x);
            }
            hi = hi.max(x + s);
        }
    }
    if !lo.is_finite() {
        lo = FLOOR;
    }
    let lo = 10f64.powf(lo.log10().floor());
    let hi = 10f64.powf(hi.log10().ceil()).max(lo * 10.0);
    let (x0, x1) = (fig.steps[0], *fig.steps.last().unwrap_or(&1.0));
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, (lo..hi).log_scale())?;
    chart
        .configure_mesh()
        .x_desc(fig.x_label)
        .y_desc(y_label)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0e}"))
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .draw()?;
    let clamp = |v: f64| v.clamp(lo, hi);
    for &(m, mean, se) in &series {
        let c = color(m);
        let mut band: Vec<(f64, f64)> =
            fig.steps.iter().zip(mean.iter().zip(se)).map(|(&x, (y, s))| (x, clamp(y + s))).collect();
        band.extend(fig.steps.iter().zip(mean.iter().zip(se)).rev().map(|(&x, (y, s))| (x, clamp(y - s))));
        chart.draw_series(std::iter::once(Polygon::new(band, c.mix(0.2).filled())))?;
        chart
            .draw_series(LineSeries::new(
                fig.steps.iter().zip(mean).map(|(&x, &y)| (x, clamp(y))),
                c.stroke_width(2),
            ))?
            .label(m.name())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], c.stroke_width(3)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}
