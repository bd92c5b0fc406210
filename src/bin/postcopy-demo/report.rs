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
    /// Non-zero pages sent on demand (preempt channel, or queued into the main stream).
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
    #[serde(default)]
    pub recovery: SourceRecovery,
}

/// What the source saw of cuts and resumes.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SourceRecovery {
    /// Times it connected again after losing the destination in postcopy.
    pub reconnects: u64,
    /// Lost to resumed (the destination's RESUME read, channels open again), summed.
    pub outage_ms: f64,
    /// Pages sent before a cut that the destination never got: sent again.
    pub lost_in_flight: u64,
    /// Pages the destination still lacked at the (last) resume.
    pub dest_lacked_at_resume: u64,
    /// Page requests received since the last resume.
    pub requests_after_resume: u64,
    /// Pages requested more than once since the last resume (each extra request counts).
    pub duplicate_requests_after_resume: u64,
    /// Requests since the last resume for pages also requested before it.
    pub repeat_requests_after_resume: u64,
    /// Requests received on a connection that broke before they were served.
    pub requests_dropped_in_cut: u64,
    /// Preempt channels opened (postcopy_preempt_establish_channel), resumes included.
    pub preempt_channels_opened: u64,
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
    #[serde(default)]
    pub pauses: u64,
    #[serde(default)]
    pub resent_after_resume: u64,
}

/// What the destination saw of cuts and resumes.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DestRecovery {
    /// The cut happened (--cut-after was reached).
    pub cut: bool,
    /// Pages placed in postcopy when the connections were dropped.
    pub placed_at_cut: u64,
    /// Times the migration resumed after a broken connection.
    pub resumes: u64,
    /// Connection lost to page requests flowing again, summed over resumes.
    pub outage_ms: f64,
    /// Faults the fault thread recorded while paused.
    pub faults_during_outage: u64,
    /// Requests outstanding when the return path came back (summed over resumes): what the
    /// library must send again, once each.
    pub outstanding_at_resume: u64,
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
    /// Of those: pages sent because they were asked for.
    #[serde(default)]
    pub latency_on_demand: Latency,
    /// Of those: pages the stream had sent already when the request came (they wait
    /// behind the stream in either mode).
    #[serde(default)]
    pub latency_in_stream: Latency,
    pub blocktime: Option<Blocktime>,
    /// Why there is no blocktime, when there is none.
    pub blocktime_note: Option<String>,
    /// vCPU threads started; `vcpus` lists those that finished their workload.
    pub vcpus_started: u32,
    pub vcpus: Vec<Vcpu>,
    /// Preempt channels the library was handed (postcopy_preempt_channels_seen).
    pub preempt_channels: i64,
    /// Pages that arrived when they were already in place (never expected).
    pub placed_twice: u64,
    pub recovery: DestRecovery,
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
    /// Placed because they were asked for: from the preempt channel, or (without preempt)
    /// sent on demand on the main channel. The name predates vanilla mode.
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
    /// Requests the source answered with the page (preempt channel, or queued into the
    /// main stream without preempt).
    pub served_on_priority_channel: u64,
    pub errors: u64,
}

/// The cut and the resume, both sides.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Recovery {
    /// --cut-after.
    pub cut_after: Option<u64>,
    /// Whether the cut happened (postcopy may end before that many pages are placed).
    pub cut: bool,
    pub placed_at_cut: u64,
    pub resumes: u64,
    /// Times the library's fault thread paused for a broken return path.
    pub pauses: u64,
    /// Destination: connection lost to page requests flowing again.
    pub outage_ms: f64,
    /// Source: connection lost to channels open again.
    pub source_outage_ms: f64,
    pub faults_during_outage: u64,
    /// Requests outstanding at the moment of the resume (recorded by the destination).
    pub outstanding_at_resume: u64,
    /// Requests the library sent again after the resume (must equal the above).
    pub resent_after_resume: u64,
    /// Requests the library failed to send (the connection had just broken).
    pub request_errors: u64,
    pub preempt_channels: i64,
    pub reconnects: u64,
    pub pages_lost_in_flight: u64,
    pub dest_lacked_at_resume: u64,
    pub requests_after_resume: u64,
    /// Must be 0: no page requested twice after the resume.
    pub duplicate_requests_after_resume: u64,
    /// Pages requested both before and after the resume (at most resent_after_resume).
    pub repeat_requests_after_resume: u64,
    pub requests_dropped_in_cut: u64,
}

/// Everything, as printed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub ok: bool,
    pub config: Config,
    /// "preempt" (requested pages on their own connection) or "vanilla" (queued into the
    /// main stream).
    pub mode: String,
    /// Preempt channels the destination's library was handed: 1, plus one per resume, with
    /// preempt; 0 without.
    pub preempt_channels: i64,
    pub blocks: Vec<Block>,
    pub time: Times,
    pub bytes_sent: u64,
    pub pages: Pages,
    pub precopy: Precopy,
    pub placement: Placement,
    pub requests: Requests,
    /// Demand-fault latency, request to placed.
    pub latency: Latency,
    /// Of those: pages sent because they were asked for.
    pub latency_on_demand: Latency,
    /// Of those: pages already sent by the stream when the request came.
    pub latency_in_stream: Latency,
    pub blocktime: Option<Blocktime>,
    pub blocktime_note: Option<String>,
    pub vcpus: Vec<Vcpu>,
    pub library: LibraryStats,
    /// Present when a cut was asked for or the migration resumed.
    pub recovery: Option<Recovery>,
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
        if d.vcpus.len() != d.vcpus_started as usize {
            problems.push(format!(
                "{} of {} vCPU threads did not finish their workload",
                d.vcpus_started as usize - d.vcpus.len().min(d.vcpus_started as usize),
                d.vcpus_started
            ));
        }
        if d.placed_twice > 0 {
            problems.push(format!(
                "{} pages arrived when already in place",
                d.placed_twice
            ));
        }
        let dr = &d.recovery;
        let sr = &s.recovery;
        let recovery = (cfg.cut_after.is_some() || dr.resumes > 0).then_some(Recovery {
            cut_after: cfg.cut_after,
            cut: dr.cut,
            placed_at_cut: dr.placed_at_cut,
            resumes: dr.resumes,
            pauses: d.library.pauses,
            outage_ms: dr.outage_ms,
            source_outage_ms: sr.outage_ms,
            faults_during_outage: dr.faults_during_outage,
            outstanding_at_resume: dr.outstanding_at_resume,
            resent_after_resume: d.library.resent_after_resume,
            request_errors: d.library.request_errors,
            preempt_channels: d.preempt_channels,
            reconnects: sr.reconnects,
            pages_lost_in_flight: sr.lost_in_flight,
            dest_lacked_at_resume: sr.dest_lacked_at_resume,
            requests_after_resume: sr.requests_after_resume,
            duplicate_requests_after_resume: sr.duplicate_requests_after_resume,
            repeat_requests_after_resume: sr.repeat_requests_after_resume,
            requests_dropped_in_cut: sr.requests_dropped_in_cut,
        });
        if let Some(r) = &recovery {
            if r.resumes > 0 {
                if r.resent_after_resume != r.outstanding_at_resume {
                    problems.push(format!(
                        "{} requests were outstanding at the resume but the library sent {} again",
                        r.outstanding_at_resume, r.resent_after_resume
                    ));
                }
                if r.duplicate_requests_after_resume > 0 {
                    problems.push(format!(
                        "the source received {} duplicate page requests after the resume",
                        r.duplicate_requests_after_resume
                    ));
                }
                if r.repeat_requests_after_resume > r.resent_after_resume {
                    problems.push(format!(
                        "{} pages were requested again after the resume, more than the {} re-sent requests",
                        r.repeat_requests_after_resume, r.resent_after_resume
                    ));
                }
            }
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
            mode: if cfg.preempt { "preempt" } else { "vanilla" }.to_string(),
            preempt_channels: d.preempt_channels,
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
            latency_on_demand: d.latency_on_demand.clone(),
            latency_in_stream: d.latency_in_stream.clone(),
            blocktime: d.blocktime.clone(),
            blocktime_note: d.blocktime_note.clone(),
            vcpus: d.vcpus.clone(),
            library: d.library.clone(),
            recovery,
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
        row(
            &mut o,
            "channels",
            if c.preempt {
                "preempt: page requests on the return path, requested pages on a second connection (the preempt channel)"
            } else {
                "vanilla: page requests on the return path, requested pages queued into the main stream (no preempt channel)"
            },
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
                "{} pages missing at switchover ({} kept from precopy): {} from the stream, {} on demand ({}), {} of them zero pages; setup took {}",
                pl.missing_at_switchover,
                pl.kept_from_precopy,
                pl.placed_from_stream,
                pl.placed_from_priority_channel,
                if c.preempt { "preempt channel" } else { "main channel" },
                pl.placed_zero,
                ms(pl.setup_ms)
            ),
        );
        row(
            &mut o,
            "demand requests",
            &format!(
                "{} faults, {} requests sent; {} served on demand ({} of them zero pages)",
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
                    "{}: p50 {}  p99 {}  max {}  mean {}  ({} pages, request to placed)",
                    self.mode,
                    us(l.p50_us),
                    us(l.p99_us),
                    us(l.max_us),
                    us(l.mean_us),
                    l.count
                ),
            );
            let part = |l: &Latency| {
                if l.count == 0 {
                    "none".to_string()
                } else {
                    format!(
                        "p50 {}  p99 {}  ({} pages)",
                        us(l.p50_us),
                        us(l.p99_us),
                        l.count
                    )
                }
            };
            let _ = writeln!(
                o,
                "  {:20}  sent on demand: {}; already in the stream: {}",
                "",
                part(&self.latency_on_demand),
                part(&self.latency_in_stream)
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
        if let Some(rc) = &self.recovery {
            if !rc.cut && rc.resumes == 0 {
                row(
                    &mut o,
                    "recovery",
                    &format!(
                        "no cut: postcopy placed fewer than {} pages",
                        rc.cut_after.unwrap_or(0)
                    ),
                );
            } else {
                row(
                    &mut o,
                    "recovery",
                    &format!(
                        "{}{} resume{}; link down {} (source: {}); fault thread paused {} time{}, {} faults recorded meanwhile, {} requests failed as the link broke",
                        if rc.cut {
                            format!("connections cut after {} pages placed in postcopy; ", rc.placed_at_cut)
                        } else {
                            String::new()
                        },
                        rc.resumes,
                        if rc.resumes == 1 { "" } else { "s" },
                        ms(rc.outage_ms),
                        ms(rc.source_outage_ms),
                        rc.pauses,
                        if rc.pauses == 1 { "" } else { "s" },
                        rc.faults_during_outage,
                        rc.request_errors
                    ),
                );
                let _ = writeln!(
                    o,
                    "  {:20}  {} requests outstanding at the resume, {} sent again by the library; source: {} reconnect{}, {} pages lost in flight and sent again, {} pages still missing at the resume",
                    "",
                    rc.outstanding_at_resume,
                    rc.resent_after_resume,
                    rc.reconnects,
                    if rc.reconnects == 1 { "" } else { "s" },
                    rc.pages_lost_in_flight,
                    rc.dest_lacked_at_resume
                );
                let _ = writeln!(
                    o,
                    "  {:20}  after the resume the source got {} requests: {} duplicates, {} for pages also requested before the cut; {} preempt channel{} seen by the destination",
                    "",
                    rc.requests_after_resume,
                    rc.duplicate_requests_after_resume,
                    rc.repeat_requests_after_resume,
                    rc.preempt_channels,
                    if rc.preempt_channels == 1 { "" } else { "s" }
                );
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
