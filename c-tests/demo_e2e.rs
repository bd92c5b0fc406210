//! The postcopy-demo binary end to end: a real two-process migration (64 MiB, 2 vCPUs) over
//! loopback TCP with real userfaultfd, checked through its --json report; and the clear
//! error a source gets when nobody listens at its address.
use std::net::TcpListener;
use std::process::{Command, Output};

fn demo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_postcopy-demo"))
        .args(args)
        .output()
        .expect("postcopy-demo runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn u(v: &serde_json::Value, path: &[&str]) -> u64 {
    let mut x = v;
    for p in path {
        x = &x[*p];
    }
    x.as_u64()
        .unwrap_or_else(|| panic!("report field {} is not a number: {x}", path.join(".")))
}

#[test]
fn migrates_64_mib_with_2_vcpus_and_every_page_verifies() {
    let out = demo(&["--ram", "64M", "--vcpus", "2", "--json"]);
    let stderr = text(&out.stderr);
    assert!(
        out.status.success(),
        "postcopy-demo failed ({}):\n{stderr}\n{}",
        out.status,
        text(&out.stdout)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("--json prints JSON ({e}):\n{}", text(&out.stdout)));
    assert_eq!(r["ok"], true, "{r:#}");
    assert_eq!(r["verification"]["passed"], true, "{:#}", r["verification"]);
    assert_eq!(u(&r, &["verification", "mismatches"]), 0);

    let total = u(&r, &["pages", "total"]);
    assert_eq!(total, 64 * 1024 * 1024 / 4096);
    assert_eq!(u(&r, &["verification", "pages_checked"]), total);
    let streamed = u(&r, &["pages", "streamed"]);
    let requested = u(&r, &["pages", "requested"]);
    let zero = u(&r, &["pages", "zero"]);
    assert_eq!(
        streamed + requested + zero,
        total,
        "streamed {streamed} + requested {requested} + zero {zero} = total {total}"
    );
    assert_eq!(
        streamed,
        u(&r, &["pages", "streamed_precopy"]) + u(&r, &["pages", "streamed_postcopy"])
    );
    // A realistic guest has zero pages, and the short precopy left work for postcopy.
    assert!(zero > 0 && zero < total, "zero pages: {zero} of {total}");
    assert!(u(&r, &["pages", "streamed_postcopy"]) > 0);
    assert!(u(&r, &["precopy", "discard_ranges"]) > 0);
    // Every page missing at switchover was placed once, from one channel or the other.
    assert_eq!(
        u(&r, &["placement", "placed_from_stream"])
            + u(&r, &["placement", "placed_from_priority_channel"]),
        u(&r, &["placement", "missing_at_switchover"])
    );
    // Every request the destination sent was answered one way or the other.
    assert_eq!(
        u(&r, &["requests", "served_on_priority_channel"])
            + u(&r, &["requests", "already_in_flight"]),
        u(&r, &["requests", "sent"])
    );
    assert_eq!(u(&r, &["library", "request_errors"]), 0);
    assert_eq!(u(&r, &["library", "outstanding_requests"]), 0);
    assert_eq!(r["vcpus"].as_array().map(Vec::len), Some(2));
    // One latency sample per request (a page placed just as its request left has none).
    assert!(u(&r, &["latency", "count"]) <= u(&r, &["requests", "sent"]));
}

#[test]
fn a_source_with_nobody_listening_fails_clearly() {
    // A port that was free a moment ago, and that nobody listens on now.
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let addr = format!("127.0.0.1:{port}");
    let out = demo(&["--connect", &addr, "--ram", "16M"]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "must fail: {stderr}");
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("connection refused") && stderr.contains(&addr),
        "clear message naming the address: {stderr}"
    );
    assert!(out.stdout.is_empty(), "no report: {}", text(&out.stdout));
}

#[test]
fn bad_usage_exits_2_with_a_message() {
    let out = demo(&["--page-size", "8k"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("--page-size"),
        "{}",
        text(&out.stderr)
    );
}
