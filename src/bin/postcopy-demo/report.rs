//! The figures each side collects, and the combined report (text or JSON).
use crate::ram::{fmt_bytes, Layout};
use crate::Config;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

/// Buckets of the latency histograms: bucket i holds [2^i, 2^(i+1)) µs (bucket 0 also 0 µs,
/// the last everything longer), as the library's blocktime histogram.
pub const BUCKETS: usize = 24;

/// What the source counted.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SourceStats {
    pub precopy_rounds: u32,
    /// Pages sent during precopy, re-sends included.
    pub precopy_pages_sent: u64,
    pub precopy_zero_sent: u64,
    /// Writes by the guest during precopy.
    pub pages_dirtied: u64,
    /// Pages the destination had from precopy that the guest changed afterwards.
    pub redirtied_pages: u64,
    /// Pages discarded on the destination (never sent, or changed since).
    pub discard_pages: u64,
    pub discard_ranges: u64,
    pub discard_commands: u64,
    /// Non-zero pages whose final copy went in precopy.
    pub streamed_precopy: u64,
    /// Non-zero pages sent by the background stream after switchover.
    pub streamed_postcopy: u64,
    /// Non-zero pages sent on demand, on the priority channel.
    pub requested: u64,
    /// Pages sent as zero-page markers (any phase, any channel).
    pub zero: u64,
    /// Of which on demand.
    pub zero_requested: u64,
    pub requests_received: u64,
    /// Requests for pages the stream had already sent: not sent twice.
    pub requests_already_sent: u64,
    pub bytes_sent: u64,
    pub bandwidth_limit: Option<u64>,
    /// Allocating and writing the guest's initial image.
    pub prepare_s: f64,
    pub precopy_s: f64,
    pub postcopy_s: f64,
    pub checksum_s: f64,
}

/// The library's counters (postcopy_incoming_get_stats).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LibraryStats {
    pub faults: u64,
    pub faults_already_received: u64,
    pub duplicate_faults: u64,
    pub requests_sent: u64,
    pub request_errors: u64,
    pub pages_placed: u64,
    pub zero_pages_placed: u64,
    pub placed_already_present: u64,
    pub outstanding_requests: u64,
}

/// Demand-fault latency as the destination measured it: from the page request (the
/// library's request callback) to the page placed.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Latency {
    pub count: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
    pub histogram: Vec<u64>,
}

impl Latency {
    pub fn from_ns(mut samples: Vec<u64>) -> Latency {
        if samples.is_empty() {
            return Latency {
                histogram: vec![0; BUCKETS],
                ..Default::default()
            };
        }
        samples.sort_unstable();
        let n = samples.len();
        let pct = |p: f64| samples[(((n as f64) * p).ceil() as usize).clamp(1, n) - 1] as f64 / 1e3;
        let mut histogram = vec![0u64; BUCKETS];
        for &s in &samples {
            histogram[bucket(s / 1000)] += 1;
        }
        Latency {
            count: n as u64,
            p50_us: pct(0.50),
            p99_us: pct(0.99),
            max_us: samples[n - 1] as f64 / 1e3,
            mean_us: samples.iter().sum::<u64>() as f64 / n as f64 / 1e3,
            histogram,
        }
    }
}

fn bucket(us: u64) -> usize {
    if us < 2 {
        0
    } else {
        (63 - us.leading_zeros() as usize).min(BUCKETS - 1)
    }
}

/// postcopy_blocktime_query's figures.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Blocktime {
    /// Time all vCPUs were blocked at once.
    pub total_ms: u32,
    pub total_ns: u64,
    pub latency_avg_us: f64,
    pub faults: u64,
    pub resolved_faults: u64,
    pub non_vcpu_faults: u64,
    pub outstanding_faults: u64,
    pub histogram: Vec<u64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Vcpu {
    pub index: u32,
    pub tid: u32,
    pub touches: u64,
    pub run_ms: f64,
    /// From the library's blocktime (per vCPU).
    pub blocktime_ms: u32,
    pub blocktime_ns: u64,
    pub faults: u64,
    pub latency_avg_us: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Verification {
    pub passed: bool,
    pub pages_checked: u64,
    pub mismatches: u64,
    /// The first few mismatching pages.
    pub examples: Vec<String>,
    pub seconds: f64,
}

/// What the destination counted.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DestStats {
    pub precopy_pages_written: u64,
    pub precopy_zero_pages: u64,
    pub discarded_pages: u64,
    pub discard_commands: u64,
    /// Pages missing at switchover.
    pub pages_needed: u64,
    pub placed_stream: u64,
    pub placed_urgent: u64,
    pub placed_zero: u64,
    /// First discard (or the switchover command) to vCPUs running.
    pub switchover_ms: f64,
    /// postcopy_ram_incoming_setup alone.
    pub setup_ms: f64,
    /// vCPUs running to the last page placed.
    pub postcopy_s: f64,
    pub library: LibraryStats,
    pub latency: Latency,
    pub blocktime: Option<Blocktime>,
    /// Why there is no blocktime, when there is none.
    pub blocktime_note: Option<String>,
    pub vcpus: Vec<Vcpu>,
    pub verification: Verification,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Block {
    pub name: String,
    pub bytes: u64,
    pub pages: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Pages {
    pub total: u64,
    /// Non-zero pages sent in the background: streamed_precopy + streamed_postcopy.
    pub streamed: u64,
    pub streamed_precopy: u64,
    pub streamed_postcopy: u64,
    /// Non-zero pages sent on demand.
    pub requested: u64,
    /// Zero pages (markers, no data), whichever way they went.
    pub zero: u64,
    pub zero_requested: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Times {
    pub total_s: f64,
    /// The source writing the guest's initial image.
    pub prepare_s: f64,
    pub precopy_s: f64,
    pub switchover_ms: f64,
    pub postcopy_s: f64,
    pub verify_s: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Precopy {
    pub rounds: u32,
    pub pages_sent: u64,
    pub pages_dirtied: u64,
    pub redirtied_pages: u64,
    pub discard_pages: u64,
    pub discard_ranges: u64,
    pub discard_commands: u64,
}

/// What the destination did with the pages.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Placement {
    /// Pages kept from precopy at switchover.
    pub kept_from_precopy: u64,
    /// Pages missing at switchover, all placed by the end.
    pub missing_at_switchover: u64,
    pub placed_from_stream: u64,
    pub placed_from_priority_channel: u64,
    pub placed_zero: u64,
    /// postcopy_ram_incoming_setup alone.
    pub setup_ms: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Requests {
    /// Faults the library read from the userfaultfd.
    pub faults: u64,
    /// Page requests the destination sent (one per missing page faulted on).
    pub sent: u64,
    /// Faults on pages already requested: not requested again (destination).
    pub duplicate_faults_not_resent: u64,
    /// Requests for pages the background stream had already sent: not sent twice (source).
    pub already_in_flight: u64,
    /// duplicate_faults_not_resent + already_in_flight.
    pub duplicates_avoided: u64,
    pub served_on_priority_channel: u64,
    pub errors: u64,
}

/// Everything, as printed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub ok: bool,
    pub config: Config,
    pub blocks: Vec<Block>,
    pub time: Times,
    pub bytes_sent: u64,
    pub pages: Pages,
    pub precopy: Precopy,
    pub placement: Placement,
    pub requests: Requests,
    /// Demand-fault latency, request to placed.
    pub latency: Latency,
    pub blocktime: Option<Blocktime>,
    pub blocktime_note: Option<String>,
    pub vcpus: Vec<Vcpu>,
    pub library: LibraryStats,
    pub verification: Verification,
    pub problems: Vec<String>,
}

impl Report {
    pub fn build(
        cfg: &Config,
        layout: &Layout,
        s: &SourceStats,
        d: &DestStats,
        total_s: f64,
    ) -> Report {
        let pages = Pages {
            total: layout.total_pages,
            streamed: s.streamed_precopy + s.streamed_postcopy,
            streamed_precopy: s.streamed_precopy,
            streamed_postcopy: s.streamed_postcopy,
            requested: s.requested,
            zero: s.zero,
            zero_requested: s.zero_requested,
        };
        let mut problems = Vec::new();
        if pages.streamed + pages.requested + pages.zero != pages.total {
            problems.push(format!(
                "page counts do not add up: streamed {} + requested {} + zero {} != {} pages",
                pages.streamed, pages.requested, pages.zero, pages.total
            ));
        }
        if d.placed_stream + d.placed_urgent != d.pages_needed {
            problems.push(format!(
                "{} pages were missing at switchover but {} were placed",
                d.pages_needed,
                d.placed_stream + d.placed_urgent
            ));
        }
        if !d.verification.passed {
            problems.push(format!(
                "verification failed: {} of {} pages differ from the source",
                d.verification.mismatches, d.verification.pages_checked
            ));
        }
        Report {
            ok: problems.is_empty(),
            config: cfg.clone(),
            blocks: layout
                .blocks
                .iter()
                .enumerate()
                .map(|(i, b)| Block {
                    name: b.name.to_string(),
                    bytes: b.len,
                    pages: layout.pages(i),
                })
                .collect(),
            time: Times {
                total_s,
                prepare_s: s.prepare_s,
                precopy_s: s.precopy_s,
                switchover_ms: d.switchover_ms,
                postcopy_s: d.postcopy_s,
                verify_s: d.verification.seconds,
            },
            bytes_sent: s.bytes_sent,
            pages,
            precopy: Precopy {
                rounds: s.precopy_rounds,
                pages_sent: s.precopy_pages_sent,
                pages_dirtied: s.pages_dirtied,
                redirtied_pages: s.redirtied_pages,
                discard_pages: s.discard_pages,
                discard_ranges: s.discard_ranges,
                discard_commands: s.discard_commands,
            },
            placement: Placement {
                kept_from_precopy: layout.total_pages - d.pages_needed,
                missing_at_switchover: d.pages_needed,
                placed_from_stream: d.placed_stream,
                placed_from_priority_channel: d.placed_urgent,
                placed_zero: d.placed_zero,
                setup_ms: d.setup_ms,
            },
            requests: Requests {
                faults: d.library.faults,
                sent: d.library.requests_sent,
                duplicate_faults_not_resent: d.library.duplicate_faults,
                already_in_flight: s.requests_already_sent,
                duplicates_avoided: d.library.duplicate_faults + s.requests_already_sent,
                served_on_priority_channel: s.requested + s.zero_requested,
                errors: d.library.request_errors,
            },
            latency: d.latency.clone(),
            blocktime: d.blocktime.clone(),
            blocktime_note: d.blocktime_note.clone(),
            vcpus: d.vcpus.clone(),
            library: d.library.clone(),
            verification: d.verification.clone(),
            problems,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("the report serialises")
    }

    pub fn to_text(&self) -> String {
        let mut o = String::new();
        let c = &self.config;
        let t = &self.time;
        let p = &self.pages;
        let r = &self.requests;
        let pc = &self.precopy;
        let _ = writeln!(
            o,
            "postcopy-demo: {} of guest RAM ({} pages of {}) migrated in {}",
            fmt_bytes(c.ram),
            p.total,
            fmt_bytes(c.page_size),
            secs(t.total_s)
        );
        let blocks: Vec<String> = self
            .blocks
            .iter()
            .map(|b| format!("{} {}", b.name, fmt_bytes(b.bytes)))
            .collect();
        row(&mut o, "RAM blocks", &blocks.join(", "));
        row(
            &mut o,
            "workload",
            &format!(
                "{} vCPUs, {} pattern; background stream {}",
                c.vcpus,
                c.pattern.name(),
                c.bandwidth.map_or("unlimited".to_string(), |b| format!(
                    "limited to {}/s",
                    fmt_bytes(b)
                ))
            ),
        );
        row(
            &mut o,
            "time",
            &format!(
                "total {}: guest RAM prepared {}, precopy {}, switchover {}, postcopy {}, verification {}",
                secs(t.total_s),
                secs(t.prepare_s),
                secs(t.precopy_s),
                ms(t.switchover_ms),
                secs(t.postcopy_s),
                secs(t.verify_s)
            ),
        );
        let moving = t.precopy_s + t.postcopy_s;
        let mbps = if moving > 0.0 {
            self.bytes_sent as f64 / moving / (1 << 20) as f64
        } else {
            0.0
        };
        row(
            &mut o,
            "sent",
            &format!(
                "{} of page data ({mbps:.0} MiB/s during precopy and postcopy)",
                fmt_bytes(self.bytes_sent)
            ),
        );
        if pc.rounds == 0 {
            row(&mut o, "precopy", "none (pure postcopy)");
        } else {
            row(
                &mut o,
                "precopy",
                &format!(
                    "{} round{} ({}% of each block first): {} pages sent while the guest dirtied {}; {} of the sent pages changed again",
                    pc.rounds,
                    if pc.rounds == 1 { "" } else { "s" },
                    c.precopy_share,
                    pc.pages_sent,
                    pc.pages_dirtied,
                    pc.redirtied_pages
                ),
            );
            row(
                &mut o,
                "discard",
                &format!(
                    "{} pages in {} ranges, {} commands",
                    pc.discard_pages, pc.discard_ranges, pc.discard_commands
                ),
            );
        }
        row(
            &mut o,
            "pages",
            &format!(
                "{} = streamed {} (precopy {} + postcopy {}) + requested {} + zero {}",
                p.total, p.streamed, p.streamed_precopy, p.streamed_postcopy, p.requested, p.zero
            ),
        );
        let pl = &self.placement;
        row(
            &mut o,
            "placed",
            &format!(
                "{} pages missing at switchover ({} kept from precopy): {} from the stream, {} from the priority channel, {} of them zero pages; setup took {}",
                pl.missing_at_switchover,
                pl.kept_from_precopy,
                pl.placed_from_stream,
                pl.placed_from_priority_channel,
                pl.placed_zero,
                ms(pl.setup_ms)
            ),
        );
        row(
            &mut o,
            "demand requests",
            &format!(
                "{} faults, {} requests sent; {} served on the priority channel ({} of them zero pages)",
                r.faults, r.sent, r.served_on_priority_channel, p.zero_requested
            ),
        );
        row(
            &mut o,
            "duplicates avoided",
            &format!(
                "{}: {} faults on pages already requested (destination), {} requests for pages already in flight (source)",
                r.duplicates_avoided, r.duplicate_faults_not_resent, r.already_in_flight
            ),
        );
        let l = &self.latency;
        if l.count == 0 {
            row(&mut o, "fault latency", "no demand faults");
        } else {
            row(
                &mut o,
                "fault latency",
                &format!(
                    "p50 {}  p99 {}  max {}  mean {}  ({} pages, request to placed)",
                    us(l.p50_us),
                    us(l.p99_us),
                    us(l.max_us),
                    us(l.mean_us),
                    l.count
                ),
            );
            histogram(&mut o, &l.histogram);
        }
        match &self.blocktime {
            Some(b) => {
                row(
                    &mut o,
                    "blocktime",
                    &format!(
                        "total {} (all vCPUs blocked at once); {} faults tracked, {} resolved, {} by non-vCPU threads, average latency {}",
                        ms(b.total_ns as f64 / 1e6),
                        b.faults,
                        b.resolved_faults,
                        b.non_vcpu_faults,
                        us(b.latency_avg_us)
                    ),
                );
                for v in &self.vcpus {
                    let _ = writeln!(
                        o,
                        "  {:20}  vCPU {} (tid {}): blocked {}, {} faults, average {}; {} touches in {}",
                        "",
                        v.index,
                        v.tid,
                        ms(v.blocktime_ns as f64 / 1e6),
                        v.faults,
                        us(v.latency_avg_us),
                        v.touches,
                        ms(v.run_ms)
                    );
                }
                if b.histogram.iter().any(|&n| n > 0) {
                    let _ = writeln!(o, "  {:20}  the library's fault-latency histogram:", "");
                    histogram(&mut o, &b.histogram);
                }
            }
            None => {
                row(
                    &mut o,
                    "blocktime",
                    self.blocktime_note.as_deref().unwrap_or("not available"),
                );
                for v in &self.vcpus {
                    let _ = writeln!(
                        o,
                        "  {:20}  vCPU {} (tid {}): {} touches in {}",
                        "",
                        v.index,
                        v.tid,
                        v.touches,
                        ms(v.run_ms)
                    );
                }
            }
        }
        let v = &self.verification;
        if v.passed {
            row(
                &mut o,
                "verification",
                &format!(
                    "PASSED: all {} pages match the source's checksums",
                    v.pages_checked
                ),
            );
        } else {
            row(
                &mut o,
                "verification",
                &format!(
                    "FAILED: {} of {} pages differ from the source",
                    v.mismatches, v.pages_checked
                ),
            );
            for e in &v.examples {
                let _ = writeln!(o, "  {:20}  {e}", "");
            }
        }
        for pr in &self.problems {
            let _ = writeln!(o, "  problem: {pr}");
        }
        o
    }
}

fn row(o: &mut String, name: &str, text: &str) {
    let _ = writeln!(o, "  {name:20}  {text}");
}

fn histogram(o: &mut String, h: &[u64]) {
    let Some(first) = h.iter().position(|&n| n > 0) else {
        return;
    };
    let last = h.iter().rposition(|&n| n > 0).unwrap_or(first);
    let max = *h.iter().max().unwrap_or(&1);
    for (i, &n) in h.iter().enumerate().take(last + 1).skip(first) {
        let lo = if i == 0 { 0 } else { 1u64 << i };
        let range = if i == BUCKETS - 1 {
            format!(">= {}", us(lo as f64))
        } else {
            format!("{} - {}", us(lo as f64), us((1u64 << (i + 1)) as f64))
        };
        let width = if n == 0 {
            0
        } else {
            ((n * 40 + max / 2) / max).max(1) as usize
        };
        let _ = writeln!(o, "  {:20}  {range:>19}  {:40} {n}", "", "#".repeat(width));
    }
}

pub fn us(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2} s", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.2} ms", v / 1e3)
    } else {
        format!("{v:.0} µs")
    }
}

pub fn ms(v: f64) -> String {
    us(v * 1e3)
}

pub fn secs(v: f64) -> String {
    us(v * 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_summary() {
        let l = Latency::from_ns((1..=100).map(|i| i * 1000).collect());
        assert_eq!(l.count, 100);
        assert_eq!(l.p50_us, 50.0);
        assert_eq!(l.p99_us, 99.0);
        assert_eq!(l.max_us, 100.0);
        assert_eq!(l.histogram.iter().sum::<u64>(), 100);
        assert_eq!(l.histogram[0], 1); // 1 µs
        assert_eq!(l.histogram[6], 37); // 64 ..= 100 µs
        assert_eq!(Latency::from_ns(vec![]).count, 0);
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(3), 1);
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
        assert_eq!(us(85.0), "85 µs");
        assert_eq!(us(1500.0), "1.50 ms");
    }
}
