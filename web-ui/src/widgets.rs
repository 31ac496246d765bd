//! Small pieces the pages share: usage bars, the rate chart, state badges.

use leptos::prelude::*;

use crate::app::Sample;

/// A labelled bar: `used` of `total`.
#[component]
pub fn Bar(label: &'static str, used: u64, total: u64, unit: &'static str) -> impl IntoView {
    let pct = if total == 0 {
        0.0
    } else {
        (used as f64 / total as f64 * 100.0).min(100.0)
    };
    let text = format!("{label}: {used} of {total}{unit}");
    let fill = if pct >= 90.0 {
        "bar-fill full"
    } else {
        "bar-fill"
    };
    view! {
        <div class="bar" title=text.clone()>
            <span class="bar-label">{label}</span>
            <span class="bar-track" role="meter" aria-label=text.clone()
                aria-valuemin="0" aria-valuemax=total.to_string() aria-valuenow=used.to_string()>
                <span class=fill style=format!("width: {pct:.1}%")></span>
            </span>
            <span class="bar-text">{format!("{used} / {total}{unit}")}</span>
        </div>
    }
}

/// A job or task state, coloured.
#[component]
pub fn State(state: String) -> impl IntoView {
    let class = format!("state state-{}", state.to_lowercase());
    view! { <span class=class>{state}</span> }
}

/// Requests per second and errors per second from consecutive samples.
pub fn rates(samples: &[Sample]) -> Vec<(f64, f64, f64)> {
    samples
        .windows(2)
        .filter_map(|w| {
            let dt = (w[1].at_ms - w[0].at_ms) / 1000.0;
            if dt <= 0.0 {
                return None;
            }
            let calls = w[1].invocations.saturating_sub(w[0].invocations) as f64 / dt;
            let errors = w[1].errors.saturating_sub(w[0].errors) as f64 / dt;
            Some((w[1].at_ms, calls, errors))
        })
        .collect()
}

/// A small line chart of invocation and error rates.
#[component]
pub fn RateChart(samples: Signal<Vec<Sample>>) -> impl IntoView {
    const W: f64 = 600.0;
    const H: f64 = 120.0;
    /// The time the chart spans, ms.
    const SPAN: f64 = 300_000.0;
    let chart = move || {
        let points = samples.with(|s| rates(s));
        let top = points.iter().map(|p| p.1.max(p.2)).fold(1.0_f64, f64::max);
        // The newest sample is at the right edge; the left edge is five minutes before.
        let end = points.last().map_or(0.0, |p| p.0);
        let line = |pick: fn(&(f64, f64, f64)) -> f64| {
            let mut coords: Vec<(f64, f64)> = points
                .iter()
                .filter(|p| p.0 >= end - SPAN)
                .map(|p| (W - (end - p.0) / SPAN * W, H - pick(p) / top * (H - 10.0)))
                .collect();
            if let [(x, y)] = coords.as_slice() {
                // One sample: a short flat line up to it.
                coords.insert(0, (x - 2000.0 / SPAN * W, *y));
            }
            coords
                .iter()
                .map(|(x, y)| format!("{x:.1},{y:.1}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let last = points.last().copied().unwrap_or_default();
        (line(|p| p.1), line(|p| p.2), top, last)
    };
    view! {
        <figure class="chart">
            <svg viewBox=format!("0 0 {W} {H}") preserveAspectRatio="none" role="img"
                aria-label="Invocations and errors per second on this node">
                <polyline class="calls" points=move || chart().0/>
                <polyline class="errors" points=move || chart().1/>
            </svg>
            <figcaption>
                <span class="key calls">"invocations/s "</span>
                <strong id="rate">{move || format!("{:.1}", chart().3 .1)}</strong>
                <span class="key errors">" errors/s "</span>
                <strong id="error-rate">{move || format!("{:.1}", chart().3 .2)}</strong>
                <span class="muted">{move || format!(" (top of the chart: {:.1}/s; this node, the last five minutes)", chart().2)}</span>
            </figcaption>
        </figure>
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_deltas_over_time() {
        let s = |at_ms: f64, invocations: u64, errors: u64| Sample {
            at_ms,
            invocations,
            errors,
        };
        let r = rates(&[s(0.0, 10, 1), s(2000.0, 30, 3), s(4000.0, 30, 3)]);
        assert_eq!(r, vec![(2000.0, 10.0, 1.0), (4000.0, 0.0, 0.0)]);
    }
}
