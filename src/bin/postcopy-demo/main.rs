//! postcopy-demo: a real two-process postcopy migration of a guest's RAM, through
//! postcopy-ram's C entrypoints and its standalone host.
//!
//! The source holds the guest's RAM (several blocks with deterministic content), runs a
//! short precopy while the guest keeps dirtying pages, sends discards for what the
//! destination must drop, and switches over. The destination then runs vCPU threads on
//! the RAM at once, faulting on missing pages: the library's fault thread requests them on
//! the return path, the source sends them (with `--preempt on`, the default, on the
//! preempt channel, a second connection opened through the library's preempt API; with
//! `--preempt off` queued into the main stream, as QEMU's vanilla postcopy does), and the
//! destination places them. With `--cut-after` the connections are dropped mid-postcopy
//! and the migration recovers: the fault thread pauses, the source reconnects, and every
//! outstanding request is sent again, once. Every page is checked against the source at
//! the end.
//!
//! By default both sides run on this machine (the source spawns the destination as a
//! child on loopback); `--listen` and `--connect` run one side each.
#![deny(clippy::undocumented_unsafe_blocks)]

mod destination;
mod protocol;
mod ram;
mod report;
mod source;
mod vcpu;

use ram::{fmt_bytes, GIB, HUGE_PAGE, KIB, MIB, TARGET_PAGE};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader};
use std::process::{Command, ExitCode, Stdio};

/// What the vCPUs do on the destination's RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    /// Pages all over RAM, uniformly.
    Random,
    /// Each vCPU walks its own slice of RAM in order.
    Sequential,
    /// Mostly a small hot set shared by all vCPUs, sometimes anywhere.
    Hotset,
}

impl Pattern {
    fn parse(s: &str) -> Option<Pattern> {
        match s {
            "random" => Some(Pattern::Random),
            "sequential" => Some(Pattern::Sequential),
            "hotset" => Some(Pattern::Hotset),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Pattern::Random => "random",
            Pattern::Sequential => "sequential",
            Pattern::Hotset => "hotset",
        }
    }
}

/// The migration's parameters. The source owns them and sends them to the destination in
/// its HELLO, so a `--listen` destination needs no options beyond its address.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Config {
    pub ram: u64,
    pub page_size: u64,
    pub vcpus: u32,
    pub pattern: Pattern,
    pub precopy_rounds: u32,
    /// Percent of each block the first precopy round covers before switchover.
    pub precopy_share: u32,
    /// Background stream limit in bytes/s (demand-requested pages are not limited).
    pub bandwidth: Option<u64>,
    /// Requested pages on a second connection (postcopy-preempt); without it they are
    /// queued into the main stream.
    #[serde(default = "default_preempt")]
    pub preempt: bool,
    /// Drop the connections once this many pages have been placed in postcopy, then
    /// reconnect and resume.
    #[serde(default)]
    pub cut_after: Option<u64>,
    /// How long the source waits after a cut before it reconnects, ms.
    #[serde(default = "default_cut_outage_ms")]
    pub cut_outage_ms: u64,
}

fn default_preempt() -> bool {
    true
}

fn default_cut_outage_ms() -> u64 {
    100
}

enum Mode {
    Local,
    Listen(String),
    Connect(String),
}

struct Options {
    config: Config,
    mode: Mode,
    json: bool,
    /// Spawned by a local run: no progress bar, no report; errors go to the source.
    child: bool,
}

const USAGE: &str = "\
postcopy-demo: migrate a guest's RAM postcopy-style between two processes over TCP,
using postcopy-ram through its C entrypoints.

USAGE:
    postcopy-demo [OPTIONS]                  both sides on this machine (loopback)
    postcopy-demo --listen ADDR              run the destination, e.g. --listen 0.0.0.0:4444
    postcopy-demo --connect ADDR [OPTIONS]   run the source against a listening destination

OPTIONS (given to the source; the destination takes them from it):
    --ram SIZE             guest RAM, e.g. 1G, 512M, 64MiB            [default: 1G]
    --vcpus N              vCPU threads on the destination            [default: 4]
    --pattern P            vCPU access pattern: random, sequential, hotset
                                                                      [default: random]
    --page-size S          4k, or 2m (destination RAM on hugetlbfs)   [default: 4k]
    --precopy-rounds N     precopy rounds before switchover (0: pure postcopy)
                                                                      [default: 1]
    --precopy-share PCT    share of each RAM block the first precopy round sends before
                           switchover                                 [default: 25]
    --bandwidth RATE       background stream limit in bytes/s, e.g. 500M, or
                           unlimited; demand-requested pages bypass it [default: unlimited]
    --preempt [on|off]     on: requested pages travel on a second connection, the
                           postcopy preempt channel, so they never queue behind the
                           background stream; off: QEMU's vanilla postcopy, requested
                           pages are queued into the main stream. On by default: it is
                           what makes postcopy usable on a busy link (QEMU leaves the
                           capability off)                            [default: on]
    --cut-after PAGES      drop the connections once PAGES pages have been placed in
                           postcopy; the destination pauses its page requests (vCPUs keep
                           faulting), the source reconnects, the channels are set up
                           again and every outstanding request is sent again once
    --cut-outage MS        how long the link stays down after the cut before the source
                           reconnects, in ms                          [default: 100]
    --json                 print the report as JSON on stdout
    -h, --help             this text

Exit status: 0 when every page arrived and matches the source, 1 on any error or
mismatch, 2 for bad usage.";

/// "on"/"off" and their synonyms.
fn parse_switch(s: &str) -> Option<bool> {
    match s.to_ascii_lowercase().as_str() {
        "on" | "yes" | "true" | "1" => Some(true),
        "off" | "no" | "false" | "0" => Some(false),
        _ => None,
    }
}

/// "1G", "512M", "64MiB", "4k", "4096".
fn parse_size(s: &str) -> Option<u64> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let lower = lower
        .strip_suffix("/s")
        .unwrap_or(&lower)
        .trim_end_matches("ib")
        .trim_end_matches('b');
    let (num, mult) = match lower.chars().last()? {
        'k' => (&lower[..lower.len() - 1], KIB),
        'm' => (&lower[..lower.len() - 1], MIB),
        'g' => (&lower[..lower.len() - 1], GIB),
        't' => (&lower[..lower.len() - 1], GIB * 1024),
        _ => (lower, 1),
    };
    let num = num.trim();
    if let Ok(v) = num.parse::<u64>() {
        return v.checked_mul(mult);
    }
    let f: f64 = num.parse().ok()?;
    (f.is_finite() && f >= 0.0).then_some((f * mult as f64) as u64)
}

fn parse_args(args: &[String]) -> Result<Options, String> {
    let mut config = Config {
        ram: GIB,
        page_size: TARGET_PAGE,
        vcpus: 4,
        pattern: Pattern::Random,
        precopy_rounds: 1,
        precopy_share: 25,
        bandwidth: None,
        preempt: true,
        cut_after: None,
        cut_outage_ms: default_cut_outage_ms(),
    };
    let mut mode = Mode::Local;
    let mut json = false;
    let mut child = false;
    let mut it = args.iter().peekable();
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let mut value = || -> Result<String, String> {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match name {
            "-h" | "--help" => return Err(String::new()),
            "--json" => json = true,
            "--child" => child = true,
            "--listen" => mode = Mode::Listen(value()?),
            "--connect" => mode = Mode::Connect(value()?),
            "--ram" => {
                let v = value()?;
                config.ram = parse_size(&v)
                    .filter(|&r| r > 0)
                    .ok_or_else(|| format!("--ram: '{v}' is not a size (e.g. 1G, 512M)"))?;
            }
            "--vcpus" => {
                let v = value()?;
                config.vcpus = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=256).contains(n))
                    .ok_or_else(|| format!("--vcpus: '{v}' is not a number from 1 to 256"))?;
            }
            "--pattern" => {
                let v = value()?;
                config.pattern = Pattern::parse(&v).ok_or_else(|| {
                    format!("--pattern: '{v}' is not one of random, sequential, hotset")
                })?;
            }
            "--page-size" => {
                let v = value()?;
                config.page_size = match parse_size(&v) {
                    Some(TARGET_PAGE) => TARGET_PAGE,
                    Some(HUGE_PAGE) => HUGE_PAGE,
                    _ => return Err(format!("--page-size: '{v}' is not 4k or 2m")),
                };
            }
            "--precopy-rounds" => {
                let v = value()?;
                config.precopy_rounds = v.parse().ok().filter(|n| *n <= 100).ok_or_else(|| {
                    format!("--precopy-rounds: '{v}' is not a number from 0 to 100")
                })?;
            }
            "--precopy-share" => {
                let v = value()?;
                config.precopy_share =
                    v.trim_end_matches('%')
                        .parse()
                        .ok()
                        .filter(|n| *n <= 100)
                        .ok_or_else(|| format!("--precopy-share: '{v}' is not a percentage"))?;
            }
            "--bandwidth" => {
                let v = value()?;
                config.bandwidth = if v == "unlimited" || v == "0" {
                    None
                } else {
                    Some(parse_size(&v).filter(|&b| b >= 64 * KIB).ok_or_else(|| {
                        format!("--bandwidth: '{v}' is not a rate of at least 64K (bytes/s), or unlimited")
                    })?)
                };
            }
            "--preempt" => {
                // The value is optional: a bare --preempt means on.
                let v = match &inline {
                    Some(v) => Some(v.clone()),
                    None => it.next_if(|n| parse_switch(n).is_some()).cloned(),
                };
                config.preempt = match v {
                    None => true,
                    Some(v) => parse_switch(&v)
                        .ok_or_else(|| format!("--preempt: '{v}' is not on or off"))?,
                };
            }
            "--no-preempt" => config.preempt = false,
            "--cut-after" => {
                let v = value()?;
                config.cut_after =
                    Some(v.parse().ok().filter(|&n: &u64| n > 0).ok_or_else(|| {
                        format!("--cut-after: '{v}' is not a number of pages (at least 1)")
                    })?);
            }
            "--cut-outage" => {
                let v = value()?;
                config.cut_outage_ms = v
                    .trim_end_matches("ms")
                    .parse()
                    .ok()
                    .filter(|&n: &u64| n <= 60_000)
                    .ok_or_else(|| {
                        format!("--cut-outage: '{v}' is not a number of ms from 0 to 60000")
                    })?;
            }
            other => return Err(format!("unknown option '{other}' (see --help)")),
        }
    }
    ram::Layout::new(config.ram, config.page_size)?;
    Ok(Options {
        config,
        mode,
        json,
        child,
    })
}

/// How a run ended: the report (when there is one) and whether everything checked out.
pub struct Outcome {
    pub report: Option<report::Report>,
    pub ok: bool,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match parse_args(&args) {
        Ok(o) => o,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("postcopy-demo: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match &opts.mode {
        Mode::Local => run_local(&opts),
        Mode::Connect(addr) => source::run(&opts.config, addr, true),
        Mode::Listen(addr) => destination::run(addr, opts.child),
    };
    match result {
        Ok(outcome) => {
            if let Some(r) = &outcome.report {
                if !opts.child {
                    if opts.json {
                        println!("{}", r.to_json());
                    } else {
                        print!("{}", r.to_text());
                    }
                }
            }
            if outcome.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            let side = match opts.mode {
                Mode::Listen(_) => "destination",
                _ => "source",
            };
            if !(opts.child && e.reported_to_peer) {
                eprintln!("postcopy-demo ({side}): error: {}", e.message);
            }
            ExitCode::FAILURE
        }
    }
}

/// The progress bar both sides draw on stderr (hidden when stderr is not a terminal).
pub fn progress_bar(total_pages: u64, visible: bool) -> indicatif::ProgressBar {
    let bar = if visible {
        indicatif::ProgressBar::with_draw_target(
            Some(total_pages),
            indicatif::ProgressDrawTarget::stderr(),
        )
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:24} [{bar:32}] {pos:>7}/{len} pages {percent:>3}%  {elapsed}",
        )
        .expect("a valid progress template")
        .progress_chars("=> "),
    );
    bar
}

/// The library's log messages (the standalone host's log callback), on stderr with a
/// prefix that tells them from the demo's own.
///
/// # Safety
/// `msg` is NULL or a NUL-terminated string valid for the call (the library's contract).
pub unsafe extern "C" fn library_log(
    _opaque: *mut std::ffi::c_void,
    level: std::ffi::c_int,
    msg: *const std::ffi::c_char,
) {
    if msg.is_null() {
        return;
    }
    // SAFETY: the library passes a NUL-terminated message valid for the call.
    let msg = unsafe { std::ffi::CStr::from_ptr(msg) }.to_string_lossy();
    let level = match level {
        0 => "error",
        1 => "warning",
        _ => "info",
    };
    eprintln!("postcopy-ram {level}: {msg}");
}

/// A failed run: the message for the user, and whether the peer was told already.
#[derive(Debug)]
pub struct Failure {
    pub message: String,
    pub reported_to_peer: bool,
}

impl From<String> for Failure {
    fn from(message: String) -> Failure {
        Failure {
            message,
            reported_to_peer: false,
        }
    }
}

/// Both sides on this machine: spawn the destination as a child listening on loopback,
/// then run the source against it.
fn run_local(opts: &Options) -> Result<Outcome, Failure> {
    let c = &opts.config;
    // The source's image and the destination's RAM, plus the destination's page buffers.
    ram::check_memory(
        2 * c.ram + 64 * MIB,
        &format!(
            "migrating {} on one machine (the source's copy and the destination's)",
            fmt_bytes(c.ram)
        ),
    )?;
    let exe = std::env::current_exe()
        .map_err(|e| format!("cannot find this program to start the destination: {e}"))?;
    let mut child = Command::new(exe)
        .args(["--listen", "127.0.0.1:0", "--child"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start the destination process: {e}"))?;
    let mut line = String::new();
    let read = child
        .stdout
        .take()
        .map(|out| BufReader::new(out).read_line(&mut line));
    let addr = match (read, line.trim().strip_prefix("listening on ")) {
        (Some(Ok(_)), Some(addr)) => addr.to_string(),
        _ => {
            let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
            return Err(
                format!("the destination process did not start listening ({status})").into(),
            );
        }
    };
    let result = source::run(c, &addr, true);
    // The destination ends by itself once the source is done or gone; give it a moment,
    // then stop it (it is our child, stopped by its pid).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    match (result, status) {
        (Ok(mut outcome), Some(s)) => {
            if !s.success() {
                outcome.ok = false;
                eprintln!("postcopy-demo: the destination process exited with {s}");
            }
            Ok(outcome)
        }
        (Ok(mut outcome), None) => {
            outcome.ok = false;
            eprintln!("postcopy-demo: the destination process did not exit; it was stopped");
            Ok(outcome)
        }
        (Err(e), _) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1G"), Some(GIB));
        assert_eq!(parse_size("64MiB"), Some(64 * MIB));
        assert_eq!(parse_size("4k"), Some(4096));
        assert_eq!(parse_size("2m"), Some(2 * MIB));
        assert_eq!(parse_size("500MB/s"), Some(500 * MIB));
        assert_eq!(parse_size("1.5g"), Some(3 * GIB / 2));
        assert_eq!(parse_size("12345"), Some(12345));
        assert_eq!(parse_size("lots"), None);
    }

    #[test]
    fn options() {
        let a = |v: &[&str]| parse_args(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let o = a(&["--ram", "64M", "--vcpus=2", "--pattern", "hotset", "--json"]).unwrap();
        assert_eq!(o.config.ram, 64 * MIB);
        assert_eq!(o.config.vcpus, 2);
        assert_eq!(o.config.pattern, Pattern::Hotset);
        assert!(o.json);
        assert!(a(&["--page-size", "8k"]).is_err());
        assert!(a(&["--ram"]).is_err());
        assert!(a(&["--bogus"]).is_err());
        assert!(a(&["--ram", "3M", "--page-size", "2m"]).is_err());
        assert!(o.config.preempt, "preempt is on by default");
        assert!(a(&["--preempt", "--json"]).unwrap().config.preempt);
        let off = a(&["--preempt", "off", "--json"]).unwrap();
        assert!(!off.config.preempt && off.json);
        assert!(!a(&["--preempt=no"]).unwrap().config.preempt);
        assert!(a(&["--preempt=maybe"]).is_err());
        let cut = a(&["--cut-after", "5000", "--cut-outage", "250"]).unwrap();
        assert_eq!(cut.config.cut_after, Some(5000));
        assert_eq!(cut.config.cut_outage_ms, 250);
        assert!(a(&["--cut-after", "0"]).is_err());
    }
}
