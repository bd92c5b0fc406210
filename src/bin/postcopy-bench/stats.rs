//! Medians, spreads and the table.

/// Percentile `p` (0..=100) of sorted values, by nearest rank.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// One figure measured once per repetition.
#[derive(Clone, Debug, Default)]
pub struct Reps(pub Vec<f64>);

impl Reps {
    pub fn push(&mut self, v: f64) {
        self.0.push(v);
    }
    fn sorted(&self) -> Vec<f64> {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        v
    }
    pub fn median(&self) -> f64 {
        percentile(&self.sorted(), 50.0)
    }
    /// p10–p90 over 10 or more repetitions, min–max below that.
    pub fn spread(&self) -> (f64, f64) {
        let s = self.sorted();
        if s.len() >= 10 {
            (percentile(&s, 10.0), percentile(&s, 90.0))
        } else {
            (
                s.first().copied().unwrap_or(f64::NAN),
                s.last().copied().unwrap_or(f64::NAN),
            )
        }
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Per-fault latencies of one repetition, in ns.
pub fn latency_percentiles(lat: &mut [u64]) -> (f64, f64) {
    lat.sort_unstable();
    let v: Vec<f64> = lat.iter().map(|&x| x as f64).collect();
    (percentile(&v, 50.0), percentile(&v, 99.0))
}

/// What a row is judged against.
#[derive(Clone, Debug)]
pub enum Goal {
    /// Informational.
    None,
    /// library / raw at least this (rates).
    RatioAtLeast(f64),
    /// library / raw at most this (latencies).
    RatioAtMost(f64),
    /// The library figure at most this, in the row's unit.
    AtMost(f64),
    /// The library figure at least this, in the row's unit.
    AtLeast(f64),
}

#[derive(Clone, Debug)]
pub struct Row {
    pub id: String,
    pub name: String,
    pub unit: &'static str,
    pub lib: Reps,
    pub raw: Option<Reps>,
    pub goal: Goal,
    /// Shown instead of figures when the row could not be measured.
    pub missing: Option<String>,
}

impl Row {
    pub fn new(
        id: &str,
        name: &str,
        unit: &'static str,
        lib: Reps,
        raw: Option<Reps>,
        goal: Goal,
    ) -> Row {
        Row {
            id: id.into(),
            name: name.into(),
            unit,
            lib,
            raw,
            goal,
            missing: None,
        }
    }

    pub fn missing(id: &str, name: &str, why: String) -> Row {
        Row {
            id: id.into(),
            name: name.into(),
            unit: "",
            lib: Reps::default(),
            raw: None,
            goal: Goal::None,
            missing: Some(why),
        }
    }

    pub fn ratio(&self) -> Option<f64> {
        let raw = self.raw.as_ref()?;
        if raw.is_empty() || self.lib.is_empty() {
            return None;
        }
        Some(self.lib.median() / raw.median())
    }

    fn goal_text(&self) -> String {
        match self.goal {
            Goal::None => "-".into(),
            Goal::RatioAtLeast(r) => format!(">= {r:.2}x"),
            Goal::RatioAtMost(r) => format!("<= {r:.2}x"),
            Goal::AtMost(v) => format!("<= {} {}", fmt(v), self.unit),
            Goal::AtLeast(v) => format!(">= {} {}", fmt(v), self.unit),
        }
    }

    /// "met", "MISSED" or "".
    pub fn verdict(&self) -> &'static str {
        let ok = match self.goal {
            Goal::None => return "",
            Goal::RatioAtLeast(g) => self.ratio().map(|r| r >= g),
            Goal::RatioAtMost(g) => self.ratio().map(|r| r <= g),
            Goal::AtMost(g) => (!self.lib.is_empty()).then(|| self.lib.median() <= g),
            Goal::AtLeast(g) => (!self.lib.is_empty()).then(|| self.lib.median() >= g),
        };
        match ok {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "",
        }
    }
}

/// Three significant figures, without exponent for the magnitudes we print.
pub fn fmt(v: f64) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn fmt_spread(r: &Reps) -> String {
    if r.is_empty() {
        return "-".into();
    }
    let (lo, hi) = r.spread();
    format!("{}-{}", fmt(lo), fmt(hi))
}

/// The table's cells, one Vec per row, header first.
fn cells(rows: &[Row]) -> Vec<Vec<String>> {
    let mut out = vec![vec![
        "row".to_string(),
        "unit".into(),
        "library".into(),
        "raw".into(),
        "library spread".into(),
        "raw spread".into(),
        "lib/raw".into(),
        "goal".into(),
        "".into(),
    ]];
    for r in rows {
        let name = format!("{} {}", r.id, r.name);
        if let Some(why) = &r.missing {
            out.push(vec![
                name,
                "".into(),
                why.clone(),
                "".into(),
                "".into(),
                "".into(),
                "".into(),
                "".into(),
                "".into(),
            ]);
            continue;
        }
        let raw = r.raw.as_ref();
        out.push(vec![
            name,
            r.unit.to_string(),
            fmt(r.lib.median()),
            raw.map_or("-".into(), |x| fmt(x.median())),
            fmt_spread(&r.lib),
            raw.map_or("-".into(), fmt_spread),
            r.ratio().map_or("-".into(), |x| format!("{x:.3}x")),
            r.goal_text(),
            r.verdict().into(),
        ]);
    }
    out
}

pub fn print_table(rows: &[Row], markdown: bool) {
    let cells = cells(rows);
    if markdown {
        for (i, row) in cells.iter().enumerate() {
            println!("| {} |", row.join(" | "));
            if i == 0 {
                println!("|{}", "---|".repeat(row.len()));
            }
        }
        return;
    }
    let ncol = cells[0].len();
    let widths: Vec<usize> = (0..ncol)
        .map(|c| {
            cells
                .iter()
                .map(|r| r[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for (i, row) in cells.iter().enumerate() {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, s)| {
                // A missing row's message spans the figure columns.
                if row[1].is_empty() && c == 2 && i > 0 {
                    s.clone()
                } else if c == 0 {
                    format!("{s:<w$}", w = widths[c])
                } else {
                    format!("{s:>w$}", w = widths[c])
                }
            })
            .collect();
        println!("{}", line.join("  ").trim_end());
        if i == 0 {
            println!(
                "{}",
                "-".repeat(widths.iter().sum::<usize>() + 2 * (ncol - 1))
            );
        }
    }
}
