//! The postcopy preempt channel: a second connection so urgent (requested) pages do not
//! queue behind the background stream.
//!
//! The channel itself (a socket, TLS, a QEMUFile) belongs to the host; the library decides
//! when it is opened, waits for it, runs the destination's urgent-page loader thread, and
//! makes cleanup wait for outstanding requests without hanging when the source is gone.
use crate::error::{Error, Result};
use crate::host::{Host, LogLevel, PreemptConnect};
use crate::incoming::{Active, Incoming};
use crate::sync::{Condvar, Mutex};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

pub const THREAD_NAME: &str = "mig/dst/preempt";

/// How often cleanup re-checks the return path while waiting for outstanding pages.
const DRAIN_POLL: Duration = Duration::from_millis(50);

/// Destination side.
#[derive(Default)]
pub struct PreemptDst {
    inner: Mutex<DstInner>,
    cond: Condvar,
}

#[derive(Default)]
struct DstInner {
    /// The channel handed over by `postcopy_preempt_new_channel`, not yet consumed.
    channel: Option<usize>,
    /// The channel the loader is reading now.
    loading: Option<usize>,
    /// Channels received so far (a reconnect after a failure is the second one).
    channels_seen: u64,
    quit: bool,
    thread: Option<JoinHandle<()>>,
}

impl PreemptDst {
    /// Starts the urgent-page loader thread (setup, with the preempt capability on).
    pub fn start(&self, inc: Arc<Incoming>) -> Result<()> {
        let mut inner = self.inner.lock();
        inner.quit = false;
        let host = inc.host.clone();
        let handle = crate::fault_thread::spawn_postcopy_thread(host, THREAD_NAME, move || {
            inc.preempt.run(&inc)
        })
        .map_err(|e| Error::os("starting the preempt thread", e))?;
        inner.thread = Some(handle);
        Ok(())
    }

    /// `postcopy_preempt_new_channel`: the source connected the urgent-page channel.
    pub fn new_channel(&self, file: usize) {
        let mut inner = self.inner.lock();
        inner.channel = Some(file);
        inner.channels_seen += 1;
        self.cond.notify_all();
    }

    pub fn channels_seen(&self) -> u64 {
        self.inner.lock().channels_seen
    }

    fn run(&self, inc: &Incoming) {
        loop {
            let file = {
                let mut inner = self.inner.lock();
                while inner.channel.is_none() && !inner.quit {
                    self.cond.wait(&mut inner);
                }
                if inner.quit {
                    return;
                }
                let file = inner.channel.take().expect("checked above");
                inner.loading = Some(file);
                file
            };
            let rc = inc.host.preempt_load(inc.mis, file);
            let mut inner = self.inner.lock();
            inner.loading = None;
            if inner.quit {
                return;
            }
            if rc < 0 {
                drop(inner);
                // The channel broke: wait for the host to hand over a new one (recovery).
                inc.log(
                    LogLevel::Warning,
                    &format!("preempt channel failed ({rc}); waiting for a new channel"),
                );
            }
        }
    }

    /// At cleanup: wait until every requested page is placed (the source sends them on this
    /// channel), unless the return path is down; then shut the channel and join the thread.
    pub fn stop(&self, inc: &Incoming, _active: &Active) {
        let Some(handle) = self.inner.lock().thread.take() else {
            return;
        };
        inc.wait_requests_drained();
        let loading = {
            let mut inner = self.inner.lock();
            inner.quit = true;
            self.cond.notify_all();
            inner.loading.or(inner.channel)
        };
        if let Some(file) = loading {
            inc.host.preempt_shutdown(inc.mis, file);
        }
        if handle.join().is_err() {
            inc.log(LogLevel::Error, "the preempt thread panicked");
        }
        let mut inner = self.inner.lock();
        inner.channel = None;
        inner.loading = None;
    }
}

impl Incoming {
    /// Waits until no request is outstanding. Returns early, with a message, when the
    /// return path is down or the fault thread is paused: nobody would answer.
    pub fn wait_requests_drained(&self) -> bool {
        loop {
            let return_path_ok = self.host.return_path_ok();
            let mut req = self.requests.lock();
            if req.requested.is_empty() {
                return true;
            }
            if req.paused || !return_path_ok {
                let n = req.requested.len();
                drop(req);
                self.log(LogLevel::Warning, &format!("{n} page requests outstanding and the source is gone; not waiting for them"));
                return false;
            }
            self.drained.wait_for(&mut req, DRAIN_POLL);
        }
    }
}

/// Source side: the state of opening the preempt channel for one outgoing migration.
#[derive(Default)]
pub struct PreemptSrc {
    state: Mutex<SrcState>,
    cond: Condvar,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SrcState {
    #[default]
    Idle,
    Pending,
    Ready,
    Failed(i32),
}

impl PreemptSrc {
    /// `postcopy_preempt_setup`: ask the host to open the channel.
    pub fn setup(&self, host: &dyn Host, ms: usize) {
        *self.state.lock() = SrcState::Pending;
        let outcome = host.preempt_connect(ms);
        let mut state = self.state.lock();
        match outcome {
            PreemptConnect::Ready => *state = SrcState::Ready,
            // The host reports through `complete` (possibly already has).
            PreemptConnect::Pending => {}
            PreemptConnect::Failed(errno) => *state = SrcState::Failed(errno),
        }
        self.cond.notify_all();
    }

    /// The host's asynchronous result: 0 connected, negative errno failed.
    pub fn complete(&self, rc: i32) {
        *self.state.lock() = if rc == 0 {
            SrcState::Ready
        } else {
            SrcState::Failed(rc.abs())
        };
        self.cond.notify_all();
    }

    pub fn state(&self) -> SrcState {
        *self.state.lock()
    }

    /// `postcopy_preempt_establish_channel`: Ok at once without the capability; otherwise
    /// open the channel if nobody has, and wait until it exists or failed.
    pub fn establish(&self, host: &dyn Host, ms: usize) -> Result<()> {
        if !host.preempt_enabled() {
            return Ok(());
        }
        if self.state() == SrcState::Idle {
            self.setup(host, ms);
        }
        let mut state = self.state.lock();
        while *state == SrcState::Pending {
            self.cond.wait(&mut state);
        }
        // Consumed, as QEMU's postcopy_qemufile_src_sem is: the next establish (a resume)
        // opens a new channel.
        let result = std::mem::replace(&mut *state, SrcState::Idle);
        match result {
            SrcState::Ready => Ok(()),
            SrcState::Failed(errno) => Err(Error::Host {
                what: "opening the postcopy preempt channel",
                errno,
            }),
            SrcState::Idle | SrcState::Pending => unreachable!("loop exits only on a final state"),
        }
    }
}
