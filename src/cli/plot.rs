//! Figures: error and misalignment against step, on log axes, mean ± one standard error.
//!
//! Nothing is clipped silently. Each panel's y axis spans the decades of its data (computed from
//! the plotted means and upper band edges, every decade labelled), up to [`MAX_DECADES`] below
//! the largest value; a mean that a log axis cannot show (exactly 0) or that lies below that
//! limit is drawn on the bottom edge with a ▼ marker, and a note under the panel says so and
//! names the methods. The figure states what the lines and bands are (mean and ±1 s.e. over N
//! seeds, or one seed and no band). Subscripts in axis labels (`g*_{PG}`) are drawn as smaller,
//! lowered text.

use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;
use tpo::experiments::tabular::{Method, MethodCurves};

/// The one font the figures use, embedded (DejaVu Sans), so no system fonts are needed.
pub fn register_font() {
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

/// A figure: what to plot and how to label it. Labels may hold subscripts as `_{...}`.
pub struct Figure<'a> {
    pub title: &'a str,
    pub steps: &'a [f64],
    pub curves: &'a [MethodCurves],
    /// Seeds averaged (for the legend text: a band needs at least two).
    pub seeds: usize,
    pub x_label: &'a str,
    pub error_label: &'a str,
    pub misalignment_label: &'a str,
}

/// "1 seed", "100 seeds".
pub fn seeds_text(n: usize) -> String {
    if n == 1 {
        "1 seed".to_string()
    } else {
        format!("{n} seeds")
    }
}

/// Writes `stem.png` and `stem.svg`.
pub fn draw(fig: &Figure, stem: &Path) -> Result<(), String> {
    register_font();
    let png = stem.with_extension("png");
    let svg = stem.with_extension("svg");
    let size = (1400, 600);
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

type DrawResult<T, DB> = Result<T, DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

fn draw_on<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, fig: &Figure) -> DrawResult<(), DB> {
    root.fill(&WHITE)?;
    let root = root.titled(fig.title, ("sans-serif", 24))?;
    let pa = PanelData::new(fig, Metric::Error);
    let pb = PanelData::new(fig, Metric::Misalignment);
    // The notes under the panels, one full-width line each: what the lines, bands and dots are,
    // then each panel's clipping notes.
    let mut lines = vec![if fig.seeds >= 2 {
        format!(
            "Lines: mean over {}. Shaded bands: ±1 standard error of the mean (s.d. over seeds / √{}).",
            seeds_text(fig.seeds),
            fig.seeds
        )
    } else {
        "Lines: 1 seed. No bands: one seed has no standard error.".to_string()
    }];
    if fig.steps.len() < FEW_STEPS {
        lines.push("Dots: one per step, in sizes that keep equal values visible.".to_string());
    }
    for (name, data) in [("(a)", &pa), ("(b)", &pb)] {
        lines.extend(data.clipped.notes().into_iter().map(|n| format!("{name} {n}")));
    }
    let (_, h) = root.dim_in_pixel();
    let (body, footer) = root.split_vertically(h.saturating_sub(12 + 20 * lines.len() as u32));
    let panels = body.split_evenly((1, 2));
    panel(&panels[0], fig, "(a) Error", fig.error_label, &pa)?;
    panel(&panels[1], fig, "(b) Misalignment", fig.misalignment_label, &pb)?;
    let small = ("sans-serif", 15).into_font().color(&BLACK);
    for (i, line) in lines.iter().enumerate() {
        footer.draw_text(line, &small, (80, 4 + 20 * i as i32))?;
    }
    Ok(())
}

/// Runs shorter than this get a dot per step (a single step has no line to draw).
const FEW_STEPS: usize = 30;

/// Which curve a panel shows.
#[derive(Clone, Copy)]
enum Metric {
    Error,
    Misalignment,
}

/// The most decades a log axis spans below its top; means further down are drawn on the bottom
/// edge and marked (f64 round-off sits 16 decades below 1).
pub const MAX_DECADES: i32 = 20;

/// A log axis from `10^lo` to `10^hi`, computed from the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogAxis {
    pub lo: i32,
    pub hi: i32,
}

/// `10^k` as the nearest f64 (parsed, so the label and the grid line agree exactly).
pub fn decade(k: i32) -> f64 {
    format!("1e{k}").parse().expect("a decimal exponent parses")
}

impl LogAxis {
    /// The smallest whole-decade axis holding every finite positive value of `values`, at most
    /// [`MAX_DECADES`] decades deep and at least one. Zeros, negatives and non-finite values do
    /// not widen it; with no positive value it is `[0.1, 1]`.
    pub fn from_data(values: impl IntoIterator<Item = f64>) -> LogAxis {
        let (mut min, mut max) = (f64::INFINITY, 0.0f64);
        for v in values {
            if v.is_finite() && v > 0.0 {
                min = min.min(v);
                max = max.max(v);
            }
        }
        if max == 0.0 {
            return LogAxis { lo: -1, hi: 0 };
        }
        // Whole decades around the data; `decade` keeps 1e-4 itself inside [1e-4, ...].
        let mut hi = max.log10().ceil() as i32;
        if decade(hi) < max {
            hi += 1;
        }
        let mut lo = min.log10().floor() as i32;
        if decade(lo) > min {
            lo -= 1;
        }
        let lo = lo.max(hi - MAX_DECADES).min(hi - 1);
        LogAxis { lo, hi }
    }

    /// The bottom of the axis.
    pub fn floor(&self) -> f64 {
        decade(self.lo)
    }

    /// Every decade of the axis, bottom to top, as exponents: the labelled ticks.
    pub fn decades(&self) -> Vec<i32> {
        (self.lo..=self.hi).collect()
    }

    /// Unlabelled grid lines at 2..9 times each decade, when the axis is shallow enough for
    /// them to be told apart.
    pub fn minor(&self) -> Vec<f64> {
        if self.hi - self.lo > 8 {
            return Vec::new();
        }
        (self.lo..self.hi).flat_map(|k| (2..10).map(move |m| m as f64 * decade(k))).collect()
    }

    /// The axis in log10 space as a linear [`Ticked`] axis: every decade labelled, the minor
    /// grid lines light (plotted values are `log10(v)`).
    pub fn ticked(&self) -> Ticked {
        Ticked {
            range: self.lo as f64..self.hi as f64,
            bold: self.decades().into_iter().map(f64::from).collect(),
            light: self.minor().into_iter().map(f64::log10).collect(),
        }
    }

    /// Where a mean is drawn, and whether it is marked as below the axis: a value under the
    /// floor (or 0) sits on the bottom edge.
    pub fn place(&self, v: f64) -> (f64, bool) {
        let floor = self.floor();
        if v < floor {
            (floor, true)
        } else {
            (v, false)
        }
    }
}

/// A curve as separate two-point segments, for `draw_series`. One wide plotters path joins its
/// segments with miters that are not limited on the inner side of a near-reversal: a mean that
/// drops to the axis floor and back within one step drew a spike far outside the plot, in the
/// PNG only (SVG viewers limit miters). Segments have no joins.
pub fn segments<X: Clone>(pts: impl IntoIterator<Item = X>, style: ShapeStyle) -> Vec<PathElement<X>> {
    let pts: Vec<X> = pts.into_iter().collect();
    match pts.as_slice() {
        [p] => vec![PathElement::new(vec![p.clone()], style)],
        _ => pts.windows(2).map(|w| PathElement::new(w.to_vec(), style)).collect(),
    }
}

/// "1e-4".
pub fn decade_label(v: f64) -> String {
    format!("{v:.0e}")
}

/// Integer ticks for a step axis from `lo` to `hi`: a 1, 2 or 5 times a power of ten apart,
/// at most 10 of them.
pub fn step_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let span = (hi - lo).max(1.0);
    let mut step = 1.0;
    'outer: for p in 0..18 {
        for m in [1.0, 2.0, 5.0] {
            step = m * 10f64.powi(p);
            if span / step <= 10.0 {
                break 'outer;
            }
        }
    }
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last).map(|i| i as f64 * step).collect()
}

/// A linear axis whose ticks (labelled) and light grid lines are given.
pub struct Ticked {
    pub range: std::ops::Range<f64>,
    pub bold: Vec<f64>,
    pub light: Vec<f64>,
}

impl Ranged for Ticked {
    type ValueType = f64;
    type FormatOption = DefaultFormatting;

    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        let t = (v - self.range.start) / (self.range.end - self.range.start);
        limit.0 + (t * f64::from(limit.1 - limit.0)).round() as i32
    }

    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            self.light.clone()
        } else {
            self.bold.clone()
        }
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.range.clone()
    }
}

/// What a panel had to draw on its bottom edge, per method.
#[derive(Debug, Default, PartialEq)]
pub struct Clipped {
    /// The axis' bottom.
    pub floor: f64,
    /// Methods with a mean of exactly 0 (or below 0) somewhere.
    pub zero: Vec<&'static str>,
    /// Methods with a positive mean below the floor somewhere.
    pub below: Vec<&'static str>,
}

impl Clipped {
    /// The sentences that say so, for under the panel.
    pub fn notes(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.zero.is_empty() {
            out.push(format!(
                "▼ on the bottom edge: mean exactly 0, which a log axis cannot show ({}).",
                self.zero.join(", ")
            ));
        }
        if !self.below.is_empty() {
            out.push(format!(
                "▼ on the bottom edge: mean below {}, drawn at it ({}).",
                decade_label(self.floor),
                self.below.join(", ")
            ));
        }
        out
    }
}

/// One curve of a panel: its mean and, with two seeds or more, its standard error.
struct Series<'a> {
    method: Method,
    mean: &'a [f64],
    se: Option<&'a [f64]>,
}

/// A panel's curves, its axis and what it draws on the bottom edge.
struct PanelData<'a> {
    series: Vec<Series<'a>>,
    axis: LogAxis,
    clipped: Clipped,
}

impl<'a> PanelData<'a> {
    fn new(fig: &Figure<'a>, metric: Metric) -> Self {
        let series: Vec<Series> = fig
            .curves
            .iter()
            .map(|c| match metric {
                Metric::Error => Series { method: c.method, mean: &c.error_mean, se: c.error_se.as_deref() },
                Metric::Misalignment => {
                    Series { method: c.method, mean: &c.misalignment_mean, se: c.misalignment_se.as_deref() }
                }
            })
            .collect();
        // The axis holds every mean and every upper band edge; lower band edges below it are cut
        // by the frame (a band reaching 0 cannot end on a log axis).
        let axis = LogAxis::from_data(series.iter().flat_map(|s| {
            let upper = s.se.map(|se| s.mean.iter().zip(se).map(|(m, e)| m + e).collect::<Vec<_>>());
            s.mean.iter().copied().chain(upper.unwrap_or_default())
        }));
        let clipped = clipped(&axis, series.iter().map(|s| (s.method.name(), s.mean)));
        PanelData { series, axis, clipped }
    }
}

/// Which methods have means the axis cannot show: exactly 0 (or negative), or below its floor.
pub fn clipped<'a>(axis: &LogAxis, curves: impl IntoIterator<Item = (&'static str, &'a [f64])>) -> Clipped {
    let mut out = Clipped { floor: axis.floor(), ..Clipped::default() };
    for (name, mean) in curves {
        if mean.iter().any(|&m| m <= 0.0) {
            out.zero.push(name);
        }
        if mean.iter().any(|&m| m > 0.0 && axis.place(m).1) {
            out.below.push(name);
        }
    }
    out
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    fig: &Figure,
    caption: &str,
    y_label: &str,
    data: &PanelData,
) -> DrawResult<(), DB> {
    let (series, axis) = (&data.series, data.axis);
    // Drawn in log10 space on a linear axis, so that the ticks are exactly the decades.
    let (lo, hi) = (axis.floor(), decade(axis.hi));
    let y_of = |v: f64| v.clamp(lo, hi).log10();
    let first = fig.steps.first().copied().unwrap_or(0.0);
    let last = fig.steps.last().copied().unwrap_or(1.0);
    // Short runs get half a step of room on both sides, so that their markers are whole.
    let (x0, x1) =
        if fig.steps.len() < FEW_STEPS { (first.min(0.0) - 0.5, last + 0.5) } else { (first.min(0.0), last) };
    let x_ticks = step_ticks(x0, x1);
    let few_points = fig.steps.len() < FEW_STEPS;

    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 20))
        .margin_top(8)
        .margin_left(8)
        .margin_right(36) // room for the last step label, centred on the right edge
        .margin_bottom(4)
        .x_label_area_size(45)
        .y_label_area_size(84)
        .build_cartesian_2d(Ticked { range: x0..x1, bold: x_ticks, light: Vec::new() }, axis.ticked())?;
    chart
        .configure_mesh()
        .x_desc(fig.x_label)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| decade_label(decade(v.round() as i32)))
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .draw()?;
    // The y label, drawn here for its subscripts: rotated, centred on the plotting area.
    let (_, py) = chart.plotting_area().get_pixel_range();
    let base = area.get_base_pixel();
    draw_rich(area, y_label, 16.0, (10, (py.start + py.end) / 2 - base.1), true)?;

    let width = {
        let (px, _) = chart.plotting_area().get_pixel_range();
        (px.end - px.start).max(1) as usize
    };
    // At most one ▼ every 8 pixels.
    let stride = (fig.steps.len() * 8).div_ceil(width).max(1);
    for (k, s) in series.iter().enumerate() {
        let c = color(s.method);
        if let Some(se) = s.se {
            let up = |(y, e): (&f64, &f64)| y_of(y + e);
            let down = |(y, e): (&f64, &f64)| y_of(y - e);
            let mut band: Vec<(f64, f64)> =
                fig.steps.iter().zip(s.mean.iter().zip(se).map(up)).map(|(&x, y)| (x, y)).collect();
            band.extend(fig.steps.iter().zip(s.mean.iter().zip(se).map(down)).rev().map(|(&x, y)| (x, y)));
            chart.draw_series(std::iter::once(Polygon::new(band, c.mix(0.2).filled())))?;
        }
        let placed: Vec<(f64, f64, bool)> = fig
            .steps
            .iter()
            .zip(s.mean)
            .filter(|(_, y)| !y.is_nan())
            .map(|(&x, &y)| {
                let (y_drawn, below) = axis.place(y);
                (x, y_of(y_drawn), below)
            })
            .collect();
        chart
            .draw_series(segments(placed.iter().map(|&(x, y, _)| (x, y)), c.stroke_width(2)))?
            .label(s.method.name())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], c.stroke_width(3)));
        if few_points {
            // Earlier curves get larger dots, so that equal values show as concentric rings
            // rather than only the last curve's colour.
            let r = 3 + 2 * (series.len() - 1 - k) as i32;
            let dots = placed.iter().filter(|p| !p.2).map(|&(x, y, _)| Circle::new((x, y), r, c.filled()));
            chart.draw_series(dots)?;
        }
        let mut run_start = None;
        for (i, &(x, y, below)) in placed.iter().enumerate() {
            if !below {
                run_start = None;
                continue;
            }
            let start = *run_start.get_or_insert(i);
            let run_last = !matches!(placed.get(i + 1), Some(p) if p.2);
            if (i - start) % stride == 0 || run_last {
                let tri =
                    EmptyElement::at((x, y)) + Polygon::new(vec![(-5, -9), (5, -9), (0, -1)], c.filled());
                chart.plotting_area().draw(&tri)?;
            }
        }
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

/// Splits `text` at `_{...}` into (text, is_subscript) parts: `g*_{PG})` is `g*`, `PG` lowered,
/// then `)`. An unclosed `_{` is kept as text.
pub fn rich_parts(text: &str) -> Vec<(String, bool)> {
    let mut parts = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("_{") {
        let Some(j) = rest[i + 2..].find('}') else { break };
        if i > 0 {
            parts.push((rest[..i].to_string(), false));
        }
        parts.push((rest[i + 2..i + 2 + j].to_string(), true));
        rest = &rest[i + 3 + j..];
    }
    if !rest.is_empty() {
        parts.push((rest.to_string(), false));
    }
    parts
}

/// Draws `text` with its `_{...}` parts as subscripts (70% size, lowered by a quarter of the
/// size), centred on `at` along its direction; `rotated` draws it bottom to top (a y label),
/// `at` then being its left edge and vertical centre.
fn draw_rich<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    text: &str,
    size: f64,
    at: (i32, i32),
    rotated: bool,
) -> DrawResult<(), DB> {
    let transform = if rotated { FontTransform::Rotate270 } else { FontTransform::None };
    let style = |sub: bool| {
        ("sans-serif", if sub { size * 0.7 } else { size })
            .into_font()
            .transform(transform.clone())
            .color(&BLACK)
            .pos(Pos::new(HPos::Left, VPos::Top))
    };
    let parts = rich_parts(text);
    let mut widths = Vec::with_capacity(parts.len());
    for (t, sub) in &parts {
        // Text sizes are measured unrotated: the width is along the text.
        let plain = TextStyle::from(("sans-serif", if *sub { size * 0.7 } else { size }).into_font());
        widths.push(area.estimate_text_size(t, &plain)?.0 as i32);
    }
    let total: i32 = widths.iter().sum();
    let mut along = -total / 2;
    for ((t, sub), w) in parts.iter().zip(widths) {
        // Offset across the text (downwards in the text's own frame): the plain text's baseline
        // is at half its size below its top; a subscript's sits a quarter size lower still.
        let across = if *sub { (size * 0.75 - size * 0.35) as i32 } else { 0 };
        let pos = if rotated { (at.0 + across, at.1 - along) } else { (at.0 + along, at.1 + across) };
        area.draw_text(t, &style(*sub), pos)?;
        along += w;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_covers_the_data_and_labels_every_decade() {
        // Multi-context panel (a): CE ends at 3.35e-4, the first error is 0.87.
        let a = LogAxis::from_data([0.87, 0.5, 3.35e-4, 4.1e-4]);
        assert_eq!(a, LogAxis { lo: -4, hi: 0 });
        let labels: Vec<String> = a.decades().into_iter().map(|k| decade_label(decade(k))).collect();
        assert_eq!(labels, ["1e-4", "1e-3", "1e-2", "1e-1", "1e0"]);
        // TPO's misalignment at 6.8e-16 and CE's at 3e-17: the axis goes down to them, not to a
        // fixed floor of 1e-12.
        let b = LogAxis::from_data([0.4, 6.8e-16, 3e-17]);
        assert_eq!(b, LogAxis { lo: -17, hi: 0 });
        assert_eq!(b.place(3e-17), (3e-17, false));
        assert_eq!(b.decades().len(), 18);
        // Exact decades are inside the axis, not a decade beyond.
        assert_eq!(LogAxis::from_data([1e-4, 1.0]), LogAxis { lo: -4, hi: 0 });
        // One value: one decade, with the value on a decade at its top.
        assert_eq!(LogAxis::from_data([1e-3, 1e-3]), LogAxis { lo: -4, hi: -3 });
        assert_eq!(LogAxis::from_data([0.5]), LogAxis { lo: -1, hi: 0 });
        // Zeros and non-finite values do not widen the axis; no positive value: [0.1, 1].
        assert_eq!(LogAxis::from_data([0.0, 0.5, f64::NAN, f64::INFINITY]), LogAxis { lo: -1, hi: 0 });
        assert_eq!(LogAxis::from_data([0.0, 0.0]), LogAxis { lo: -1, hi: 0 });
    }

    #[test]
    fn values_below_the_axis_are_marked() {
        // A zero mean is drawn on the bottom edge and marked.
        let a = LogAxis::from_data([0.5, 1e-3, 0.0]);
        assert_eq!(a.place(0.0), (1e-3, true));
        assert_eq!(a.place(1e-3), (1e-3, false));
        // Deeper than MAX_DECADES: the axis stops there and the rest is marked.
        let deep = LogAxis::from_data([1.0, 1e-30]);
        assert_eq!(deep, LogAxis { lo: -MAX_DECADES, hi: 0 });
        assert_eq!(deep.place(1e-30), (decade(-MAX_DECADES), true));
        let c = Clipped { floor: 1e-20, zero: vec!["CE"], below: vec!["TPO", "DG"] };
        assert_eq!(
            c.notes(),
            [
                "▼ on the bottom edge: mean exactly 0, which a log axis cannot show (CE).",
                "▼ on the bottom edge: mean below 1e-20, drawn at it (TPO, DG)."
            ]
        );
        assert!(Clipped::default().notes().is_empty());
        // Which curves get marked: CE has an exact 0, TPO a mean under a 1e-20 floor, PG none.
        let axis = LogAxis::from_data([0.9, 1e-25]);
        let (ce, tpo, pg) = ([0.5, 0.0, 1e-3], [0.5, 1e-25, 1e-20], [0.9, 1e-3, 1e-19]);
        let c = clipped(&axis, [("CE", &ce[..]), ("TPO", &tpo[..]), ("PG", &pg[..])]);
        assert_eq!(c, Clipped { floor: 1e-20, zero: vec!["CE"], below: vec!["TPO"] });
        // Nothing under the axis, nothing marked.
        let axis = LogAxis::from_data([0.9, 1e-3]);
        assert_eq!(clipped(&axis, [("PG", &pg[..2])]), Clipped { floor: 1e-3, ..Clipped::default() });
    }

    #[test]
    fn step_ticks_are_round_and_inside() {
        assert_eq!(step_ticks(0.0, 1000.0), (0..=10).map(|i| i as f64 * 100.0).collect::<Vec<_>>());
        assert_eq!(step_ticks(0.0, 149.0), (0..=7).map(|i| i as f64 * 20.0).collect::<Vec<_>>());
        // One step (0 or 1) padded by half a step: one integer tick each, never "-0" or "0.5".
        assert_eq!(step_ticks(-0.5, 0.5), [0.0]);
        assert_eq!(step_ticks(-0.5, 1.5), [0.0, 1.0]);
        assert_eq!(step_ticks(-0.5, 4.5), [0.0, 1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn subscripts_are_split_out() {
        let p = |v: &[(&str, bool)]| v.iter().map(|&(t, s)| (t.to_string(), s)).collect::<Vec<_>>();
        assert_eq!(
            rich_parts("1 − cos(g, g*_{PG})"),
            p(&[("1 − cos(g, g*", false), ("PG", true), (")", false)])
        );
        assert_eq!(rich_parts("g_{CE}"), p(&[("g", false), ("CE", true)]));
        assert_eq!(rich_parts("error 1 − π(y*)"), p(&[("error 1 − π(y*)", false)]));
        assert_eq!(rich_parts("a_{b"), p(&[("a_{b", false)]));
    }

    /// Coloured pixels in rows `from..` of a drawn RGB buffer `w` wide.
    fn coloured_rows_from(buf: &[u8], w: u32, from: u32) -> usize {
        buf.chunks(3).enumerate().filter(|(i, px)| *i as u32 / w >= from && *px != [255, 255, 255]).count()
    }

    /// A 1000-step noisy curve whose mean drops to the axis floor and back at single steps (as
    /// the 20-seed DG mean hitting 0): drawn as one wide plotters path, its unlimited inner miters
    /// put spikes far below the plot (at 600 x 300 here); as [`segments`], nothing is drawn below
    /// the plotting area at any of these sizes.
    #[test]
    fn a_curve_touching_the_floor_stays_inside_the_plot() {
        let mean =
            |t: usize| if t % 97 == 50 { 0.0 } else { 10f64.powf(-3.5 + 0.5 * (t as f64 * 1.7).sin()) };
        let pts: Vec<(f64, f64)> = (0..1000).map(|t| (t as f64, mean(t).clamp(1e-5, 1.0).log10())).collect();
        for (w, h) in [(400u32, 300u32), (600, 300), (600, 500), (875, 500)] {
            let plot_h = h - 100;
            let mut buf = vec![255u8; (w * h * 3) as usize];
            {
                let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
                let (plot, _) = root.split_vertically(plot_h);
                let mut chart =
                    ChartBuilder::on(&plot).build_cartesian_2d(0.0..999.0f64, -5.0..0.0f64).unwrap();
                chart.draw_series(segments(pts.iter().copied(), RED.stroke_width(2))).unwrap();
                root.present().unwrap();
            }
            assert!(coloured_rows_from(&buf, w, 0) > 0, "{w} x {h}: nothing was drawn");
            assert_eq!(coloured_rows_from(&buf, w, plot_h + 2), 0, "{w} x {h}: pixels drawn below the plot");
        }
    }
}
