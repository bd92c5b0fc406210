//! Row 5: end to end, from the demo (`postcopy-demo --json`, a real two-process migration
//! over TCP loopback). Its own figures are reported; there is no raw counterpart.
use crate::stats::{Goal, Reps, Row};
use crate::Opts;
use std::path::PathBuf;
use std::process::Command;

fn demo_path() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let p = exe.parent()?.join("postcopy-demo");
    p.is_file().then_some(p)
}

fn num(v: &serde_json::Value, path: &[&str]) -> Option<f64> {
    let mut v = v;
    for k in path {
        v = v.get(k)?;
    }
    v.as_f64()
}

/// One demo run: (throughput GB/s, demand-fault p50 µs, p99 µs).
fn one_run(demo: &PathBuf, args: &[String]) -> Result<(f64, f64, f64), String> {
    let out = Command::new(demo)
        .arg("--json")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", demo.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(text.trim()).map_err(|e| {
        format!(
            "demo exited {} without a JSON report ({e}); stderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        )
    })?;
    if v.get("ok").and_then(|o| o.as_bool()) != Some(true) {
        return Err(format!(
            "demo reported a failed migration: {}",
            v.get("problems").map_or("?".into(), |p| p.to_string())
        ));
    }
    let moving = num(&v, &["time", "precopy_s"]).unwrap_or(0.0)
        + num(&v, &["time", "postcopy_s"]).unwrap_or(0.0);
    let bytes = num(&v, &["bytes_sent"]).ok_or("no bytes_sent in the report")?;
    let p50 = num(&v, &["latency", "p50_us"]).ok_or("no latency.p50_us in the report")?;
    let p99 = num(&v, &["latency", "p99_us"]).ok_or("no latency.p99_us in the report")?;
    if moving <= 0.0 {
        return Err("no precopy/postcopy time in the report".into());
    }
    Ok((bytes / moving / 1e9, p50, p99))
}

pub fn run(opts: &Opts) -> Vec<Row> {
    let label = if opts.demo_args.is_empty() {
        "defaults".to_string()
    } else {
        opts.demo_args.join(" ")
    };
    let Some(demo) = demo_path() else {
        return vec![Row::missing(
            "5",
            "end to end (postcopy-demo)",
            "not measured: postcopy-demo is not built next to this binary (cargo build --release --bin postcopy-demo)".into(),
        )];
    };
    let (mut gbs, mut p50, mut p99) = (Reps::default(), Reps::default(), Reps::default());
    for i in 0..opts.demo_runs {
        eprintln!(
            "  postcopy-demo run {}/{} ({label}) ...",
            i + 1,
            opts.demo_runs
        );
        match one_run(&demo, &opts.demo_args) {
            Ok((t, a, b)) => {
                gbs.push(t);
                p50.push(a);
                p99.push(b);
            }
            Err(why) => {
                return vec![Row::missing(
                    "5",
                    "end to end (postcopy-demo)",
                    format!("not measured: {why}"),
                )];
            }
        }
    }
    vec![
        Row::new(
            "5",
            &format!("demo migration throughput ({label}; page data sent / precopy+postcopy time)"),
            "GB/s",
            gbs,
            None,
            Goal::None,
        ),
        Row::new(
            "5",
            "demo demand-fault p50 (request to placed)",
            "us",
            p50,
            None,
            Goal::None,
        ),
        Row::new("5", "demo demand-fault p99", "us", p99, None, Goal::None),
    ]
}
