//! A dependency-free SVG line chart of the training and validation loss.

use std::fmt::Write as _;

/// One line of the chart: name, colour, (step, value) points.
pub(crate) type Series<'a> = (&'a str, &'a str, Vec<(f64, f64)>);

/// A log-scale line chart of `series`.
pub(crate) fn loss_svg(series: &[Series]) -> String {
    let (w, h, m) = (640.0, 360.0, 50.0);
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.2.iter().copied())
        .filter(|p| p.1 > 0.0)
        .collect();
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    svg.push_str(r#"<rect width="100%" height="100%" fill="white"/>"#);
    if pts.is_empty() {
        svg.push_str("</svg>");
        return svg;
    }
    let x_max = pts.iter().map(|p| p.0).fold(1.0, f64::max);
    let (y_lo, y_hi) = pts.iter().fold((f64::MAX, f64::MIN), |(lo, hi), p| {
        (lo.min(p.1.ln()), hi.max(p.1.ln()))
    });
    let y_span = (y_hi - y_lo).max(1e-6);
    let px = |x: f64| m + (x / x_max) * (w - 2.0 * m);
    let py = |y: f64| h - m - ((y.ln() - y_lo) / y_span) * (h - 2.0 * m);
    let _ = write!(
        svg,
        r#"<line x1="{m}" y1="{}" x2="{}" y2="{}" stroke="black"/>"#,
        h - m,
        w - m,
        h - m
    );
    let _ = write!(
        svg,
        r#"<line x1="{m}" y1="{m}" x2="{m}" y2="{}" stroke="black"/>"#,
        h - m
    );
    let _ = write!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">optimizer step</text>"#,
        w / 2.0,
        h - 12.0
    );
    let _ = write!(
        svg,
        r#"<text x="12" y="{}" transform="rotate(-90 12 {})" text-anchor="middle">loss (log scale)</text>"#,
        h / 2.0,
        h / 2.0
    );
    for (v, label) in [
        (y_lo.exp(), format!("{:.3}", y_lo.exp())),
        (y_hi.exp(), format!("{:.3}", y_hi.exp())),
    ] {
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="end">{label}</text>"#,
            m - 4.0,
            py(v) + 4.0
        );
    }
    let _ = write!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="end">{x_max}</text>"#,
        w - m,
        h - m + 16.0
    );
    for (i, (name, colour, points)) in series.iter().enumerate() {
        let path: Vec<String> = points
            .iter()
            .filter(|p| p.1 > 0.0)
            .map(|p| format!("{:.1},{:.1}", px(p.0), py(p.1)))
            .collect();
        if !path.is_empty() {
            let _ = write!(
                svg,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
                path.join(" ")
            );
        }
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" fill="{colour}">{name}</text>"#,
            w - m - 120.0,
            m + 16.0 * i as f64
        );
    }
    svg.push_str("</svg>");
    svg
}
