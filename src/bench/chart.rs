//! The ratios as a bar chart (SVG): for each packet kind, l4lb's share of the
//! plain floor and of the encapsulation floor (outer IPv4 or IPv6, as the
//! row's backends), and the untracked l4lb's share of the encapsulation
//! floor; median bars with min-max whiskers, and the target line.
//! Pure: returns the SVG text.

use std::error::Error;

use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::report::{Context, Results, Summary, Throughput, TARGET};

const WIDTH: u32 = 1280;
const HEIGHT: u32 = 480;
const PLAIN_COLOR: RGBColor = RGBColor(0x9e, 0xc5, 0xe8);
const ENCAP_COLOR: RGBColor = RGBColor(0x1f, 0x5f, 0x9e);
const UNTRACKED_COLOR: RGBColor = RGBColor(0x8a, 0x9a, 0xa8);
const TARGET_COLOR: RGBColor = RGBColor(0xc0, 0x39, 0x2b);
/// Width of a bar; a group of bars (one packet kind) is 1 wide.
const BAR: f64 = 0.26;
/// Space between the bars of a group.
const GAP: f64 = 0.015;

/// A bar per packet kind: its place in the group, its color, its legend and the ratio it shows.
struct Series {
    offset: f64,
    color: RGBColor,
    label: &'static str,
    ratio: fn(&Throughput) -> Summary,
}

/// Three bars per group: plain, encap (tracked: l4lb's default), untracked.
const SERIES: [Series; 3] = [
    Series {
        offset: -1.5 * BAR - GAP,
        color: PLAIN_COLOR,
        label: "l4lb / plain floor (count, XDP_TX)",
        ratio: |t| t.ratio_plain,
    },
    Series {
        offset: -0.5 * BAR,
        color: ENCAP_COLOR,
        label: "l4lb / encapsulation floor (count, push the outer IPv4 or IPv6 header of the row, XDP_TX)",
        ratio: |t| t.ratio_encap,
    },
    Series {
        offset: 0.5 * BAR + GAP,
        color: UNTRACKED_COLOR,
        label: "l4lb with track_flows = false / encapsulation floor (l4lb's default tracks flows)",
        ratio: |t| t.ratio_encap_untracked,
    },
];

/// The whole SVG image.
type Root<'a> = DrawingArea<SVGBackend<'a>, Shift>;
/// The plot: a group per packet kind along x, ratios up y.
type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// The chart of `results` as an SVG document.
pub fn svg(results: &Results) -> Result<String, String> {
    let mut out = String::new();
    draw(results, &mut out).map_err(|err| format!("drawing the chart: {err}"))?;
    Ok(out)
}

fn draw(results: &Results, out: &mut String) -> Result<(), Box<dyn Error>> {
    let groups = results.kinds.len().max(1) as f64;
    let top = y_top(results);
    let root = SVGBackend::with_string(out, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = axes(&root, &results.context, groups, top)?;
    draw_bars(&mut chart, results)?;
    draw_whiskers(&mut chart, results, top)?;
    draw_target_and_legend(&mut chart, groups)?;
    draw_kind_labels(&root, &chart, results)?;
    root.present()?;
    Ok(())
}

/// The top of the y axis: above the highest whisker, at least 1.1.
fn y_top(results: &Results) -> f64 {
    let top = results
        .kinds
        .iter()
        .flat_map(|k| SERIES.iter().map(|series| (series.ratio)(&k.throughput).max))
        .fold(1.1f64, f64::max);
    // Room above the bars for the legend.
    ((top + 0.3) * 10.0).ceil() / 10.0
}

/// The x position of the middle of group `i`.
fn group_center(i: usize) -> f64 {
    i as f64 + 0.5
}

/// The caption, and a y axis from 0 to `top` over `groups` groups.
fn axes<'a, 'b>(root: &'a Root<'b>, c: &Context, groups: f64, top: f64) -> Result<Chart<'a, 'b>, Box<dyn Error>> {
    let caption = format!(
        "l4lb throughput as a share of floors measured in the same run ({} CPUs, {}, median of {} rounds)",
        c.cpus, c.date, c.rounds
    );
    let mut chart = ChartBuilder::on(root)
        .caption(caption, ("sans-serif", 15))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..groups, 0f64..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_labels(((top * 10.0).round() as usize) + 1)
        .y_label_formatter(&|v| format!("{v:.1}"))
        .y_desc("l4lb Mpps / floor Mpps (wall clock, CPU-bound)")
        .max_light_lines(0)
        .draw()?;
    Ok(chart)
}

/// The median bars, a series at a time, each with its legend entry.
fn draw_bars(chart: &mut Chart, results: &Results) -> Result<(), Box<dyn Error>> {
    for series in &SERIES {
        let color = series.color;
        chart
            .draw_series(results.kinds.iter().enumerate().map(|(i, k)| {
                let s = (series.ratio)(&k.throughput);
                let x0 = group_center(i) + series.offset;
                Rectangle::new([(x0, 0.0), (x0 + BAR, s.median)], color.filled())
            }))?
            .label(series.label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], color.filled()));
    }
    Ok(())
}

/// Whiskers: min to max over the rounds, and the median's value.
fn draw_whiskers(chart: &mut Chart, results: &Results, top: f64) -> Result<(), Box<dyn Error>> {
    for (i, k) in results.kinds.iter().enumerate() {
        for series in &SERIES {
            let s = (series.ratio)(&k.throughput);
            let middle_of_bar = series.offset + BAR / 2.0;
            let x = group_center(i) + middle_of_bar;
            let w = BAR / 6.0;
            let black = BLACK.stroke_width(1);
            chart.draw_series([
                PathElement::new(vec![(x, s.min), (x, s.max)], black),
                PathElement::new(vec![(x - w, s.min), (x + w, s.min)], black),
                PathElement::new(vec![(x - w, s.max), (x + w, s.max)], black),
            ])?;
            let label = ("sans-serif", 10).into_font().color(&BLACK).pos(Pos::new(HPos::Center, VPos::Bottom));
            chart.draw_series([Text::new(format!("{:.3}", s.median), (x, s.max + top * 0.012), label)])?;
        }
    }
    Ok(())
}

/// The target line across all groups, then the legend of every series.
fn draw_target_and_legend<'a, 'b: 'a>(chart: &mut Chart<'a, 'b>, groups: f64) -> Result<(), Box<dyn Error>> {
    chart
        .draw_series([PathElement::new(vec![(0.0, TARGET), (groups, TARGET)], TARGET_COLOR.stroke_width(1))])?
        .label(format!("target: {TARGET:.2} of the encapsulation floor (64 B TCP SYN, TCP ACK and UDP)"))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], TARGET_COLOR.stroke_width(2)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.3))
        .label_font(("sans-serif", 12))
        .draw()?;
    Ok(())
}

/// Packet kinds under their groups.
fn draw_kind_labels(root: &Root, chart: &Chart, results: &Results) -> Result<(), Box<dyn Error>> {
    for (i, k) in results.kinds.iter().enumerate() {
        let (x, y) = chart.backend_coord(&(group_center(i), 0.0));
        let style = ("sans-serif", 13).into_font().color(&BLACK).pos(Pos::new(HPos::Center, VPos::Top));
        root.draw(&Text::new(k.label.to_string(), (x, y + 8), style))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_has_a_bar_pair_per_kind_labels_and_target() {
        let results = crate::bench::report::tests::example();
        let text = svg(&results).unwrap();
        assert!(text.starts_with("<svg"), "{}", &text[..80.min(text.len())]);
        for k in &results.kinds {
            assert!(text.contains(k.label), "missing {}", k.label);
        }
        assert!(text.contains("target: 0.95"));
        assert!(text.contains("0.950"), "median labels");
        let encap_fill = format!("#{:02X}{:02X}{:02X}", ENCAP_COLOR.0, ENCAP_COLOR.1, ENCAP_COLOR.2);
        let bars = text.matches(&encap_fill).count();
        assert!(bars >= results.kinds.len(), "{bars} encap bars");
        let untracked_fill = format!("#{:02X}{:02X}{:02X}", UNTRACKED_COLOR.0, UNTRACKED_COLOR.1, UNTRACKED_COLOR.2);
        assert!(text.matches(&untracked_fill).count() >= results.kinds.len(), "untracked bars");
        assert!(text.contains("track_flows = false"));
        assert!(text.contains("1.188"), "the untracked bars' medians");
    }
}
