//! Figures, the printed table and the JSON report.

use comfy_table::{presets::UTF8_FULL_CONDENSED, Cell, CellAlignment, ContentArrangement, Table};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Order statistics of repeated trials of one figure.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Stats {
    /// Trials.
    pub n: usize,
    /// Median (mean of the two middle values for an even count).
    pub median: f64,
    /// Smallest trial.
    pub min: f64,
    /// Largest trial.
    pub max: f64,
}

impl Stats {
    /// `None` for no values (NaNs are left out).
    pub fn of(values: &[f64]) -> Option<Stats> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n == 0 {
            return None;
        }
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Stats {
            n,
            median,
            min: v[0],
            max: v[n - 1],
        })
    }

    /// One value measured once (a count over a window, say).
    pub fn single(x: f64) -> Stats {
        Stats {
            n: 1,
            median: x,
            min: x,
            max: x,
        }
    }
}

/// One line of the table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    /// What is measured, e.g. `sum epoch, 15 tasks`.
    pub figure: String,
    /// Unit of `stats`.
    pub unit: String,
    /// The trials, or `None` when nothing could be measured.
    pub stats: Option<Stats>,
    /// A comparison measured in the same run, e.g. `÷ limit 2.4×`.
    pub versus: String,
}

impl Row {
    /// A row from raw trial values.
    pub fn new(figure: impl Into<String>, unit: &str, values: &[f64]) -> Row {
        Row {
            figure: figure.into(),
            unit: unit.to_owned(),
            stats: Stats::of(values),
            versus: String::new(),
        }
    }

    /// A row of a value measured once.
    pub fn single(figure: impl Into<String>, unit: &str, value: f64) -> Row {
        Row {
            figure: figure.into(),
            unit: unit.to_owned(),
            stats: Some(Stats::single(value)),
            versus: String::new(),
        }
    }

    /// Adds the comparison column.
    pub fn versus(mut self, text: impl Into<String>) -> Row {
        self.versus = text.into();
        self
    }

    /// The median, if any.
    pub fn median(&self) -> Option<f64> {
        self.stats.map(|s| s.median)
    }
}

/// `a / b` as text (`2.41×`), or `-` when either is missing or `b` is zero.
pub fn ratio_text(label: &str, a: Option<f64>, b: Option<f64>) -> String {
    match ratio(a, b) {
        Some(r) => format!("{label} {r:.2}×"),
        None => format!("{label} -"),
    }
}

/// `a / b`, when both are known and `b` is not zero.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => Some(a / b),
        _ => None,
    }
}

/// The outcome of one scenario.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioReport {
    /// Scenario name (`epoch`, `failover`, …).
    pub name: String,
    /// One-line description of the setup.
    pub setup: String,
    /// Whether it ran to the end.
    pub ok: bool,
    /// Why not.
    pub error: Option<String>,
    /// Wall time of the scenario.
    pub seconds: f64,
    /// The figures measured (also those measured before a failure).
    pub rows: Vec<Row>,
    /// Everything else worth keeping (raw counters, per-trial values).
    pub details: Value,
}

fn number(x: f64) -> String {
    let a = x.abs();
    if x == 0.0 {
        "0".to_owned()
    } else if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else if a >= 0.1 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

/// The table of every scenario's figures.
pub fn table(reports: &[ScenarioReport]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(vec![
            "scenario",
            "figure",
            "n",
            "median",
            "min",
            "max",
            "unit",
            "vs. (same run)",
        ]);
    for r in reports {
        if let Some(e) = &r.error {
            t.add_row(vec![
                Cell::new(&r.name),
                Cell::new(format!("FAILED: {}", first_line(e, 100))),
            ]);
        }
        for row in &r.rows {
            let (n, med, min, max) = match row.stats {
                Some(s) => (
                    s.n.to_string(),
                    number(s.median),
                    number(s.min),
                    number(s.max),
                ),
                None => ("0".into(), "-".into(), "-".into(), "-".into()),
            };
            t.add_row(vec![
                Cell::new(&r.name),
                Cell::new(&row.figure),
                Cell::new(n).set_alignment(CellAlignment::Right),
                Cell::new(med).set_alignment(CellAlignment::Right),
                Cell::new(min).set_alignment(CellAlignment::Right),
                Cell::new(max).set_alignment(CellAlignment::Right),
                Cell::new(&row.unit),
                Cell::new(&row.versus),
            ]);
        }
    }
    t
}

fn first_line(s: &str, max: usize) -> String {
    let line = s.lines().next().unwrap_or_default();
    if line.chars().count() > max {
        let cut: String = line.chars().take(max).collect();
        format!("{cut}…")
    } else {
        line.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_of_odd_and_even_counts_and_nans() {
        let s = Stats::of(&[3.0, 1.0, 2.0]).map(|s| (s.n, s.median, s.min, s.max));
        assert_eq!(s, Some((3, 2.0, 1.0, 3.0)));
        let s = Stats::of(&[4.0, 1.0, 2.0, 3.0, f64::NAN]).map(|s| (s.n, s.median, s.min, s.max));
        assert_eq!(s, Some((4, 2.5, 1.0, 4.0)));
        assert!(Stats::of(&[]).is_none());
        assert!(Stats::of(&[f64::NAN]).is_none());
    }

    #[test]
    fn ratios_need_both_figures_and_a_divisor() {
        assert_eq!(ratio(Some(3.0), Some(2.0)), Some(1.5));
        assert_eq!(ratio(Some(3.0), Some(0.0)), None);
        assert_eq!(ratio(None, Some(2.0)), None);
        assert_eq!(ratio_text("÷ bare", Some(3.0), Some(2.0)), "÷ bare 1.50×");
        assert_eq!(ratio_text("÷ bare", Some(3.0), None), "÷ bare -");
    }

    #[test]
    fn a_failed_scenario_is_shown_with_its_rows() {
        let r = ScenarioReport {
            name: "scale".into(),
            setup: String::new(),
            ok: false,
            error: Some("not staffed after 1s\nmore".into()),
            seconds: 1.0,
            rows: vec![Row::new("sum epoch", "ms", &[1.0, 2.0, 3.0]).versus("÷ limit 2.00×")],
            details: Value::Null,
        };
        let text = table(&[r]).to_string();
        assert!(text.contains("FAILED: not staffed after 1s"), "{text}");
        assert!(!text.contains("more"), "{text}");
        assert!(text.contains("÷ limit 2.00×"), "{text}");
        assert!(text.contains("2.00"), "{text}");
    }
}
