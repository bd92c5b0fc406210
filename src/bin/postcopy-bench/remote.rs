//! Row 3: a demand fault served by a source over TCP loopback, in the demo's wire format:
//! the destination sends a 16-byte request header, the source answers with a 16-byte
//! page header and the 4 KiB page.
//!
//! Both sides have the same threads: a faulting thread; a request sender (library: its
//! fault thread, whose request callback writes the request; raw: a handler doing poll +
//! read + write); the source thread; and a receiver that reads replies and places them
//! (library: postcopy_place_page; raw: UFFDIO_COPY). Only the library is swapped for
//! bare kernel calls.
use crate::fault::{Cpus, Handler, RepResult, Workers};
use crate::lib_ctx::{LibCtx, FAULT_THREAD};
use crate::stats::{Goal, Reps, Row};
use crate::sys::{self, pin, EventFd, Mapping, RawUffd, PAGE};
use crate::Opts;
use postcopy_ram::ffi::placement::postcopy_place_page;
use postcopy_ram::ffi::types::{MigrationIncomingState, RAMBlock};
use postcopy_ram::standalone::PostcopyPageRequest;
use std::ffi::{c_char, c_int, c_void};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

const HDR: usize = 16;
/// The demo's frame kinds (src/bin/postcopy-demo/protocol.rs).
const KIND_PAGE: u8 = 3;
const KIND_REQUEST: u8 = 10;

fn request_frame(offset: u64) -> [u8; HDR] {
    let mut h = [0u8; HDR];
    h[0] = KIND_REQUEST;
    h[8..16].copy_from_slice(&offset.to_le_bytes());
    h
}

/// The source: answers each request with the page, until the connection closes.
fn source(mut s: TcpStream) {
    let mut req = [0u8; HDR];
    let mut reply = vec![0x5au8; HDR + PAGE];
    reply[..HDR].fill(0);
    reply[0] = KIND_PAGE;
    while s.read_exact(&mut req).is_ok() {
        reply[4..16].copy_from_slice(&req[4..16]);
        if s.write_all(&reply).is_err() {
            break;
        }
    }
}

/// Starts a long-lived thread and returns it with its kernel thread id.
fn spawn_tid(name: &str, body: impl FnOnce() + Send + 'static) -> (JoinHandle<()>, u32) {
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let _ = tx.send(sys::gettid());
            body()
        })
        .expect("spawn a thread");
    (t, rx.recv().expect("thread started"))
}

/// A connected pair on loopback: the destination end, and the source thread with its id.
fn connect() -> (TcpStream, (JoinHandle<()>, u32)) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = l.local_addr().expect("local addr");
    let src = spawn_tid("bench-source", move || {
        let (s, _) = l.accept().expect("accept");
        s.set_nodelay(true).expect("nodelay");
        source(s)
    });
    let d = TcpStream::connect(addr).expect("connect");
    d.set_nodelay(true).expect("nodelay");
    (d, src)
}

/// The threads both sides have besides the request sender: (source, receiver).
fn pin_helpers(tids: &[u32], cpu: Option<usize>) {
    for &t in tids {
        pin(t, cpu).expect("pin the source or receiver");
    }
}

/// write(2) of one whole request frame on a blocking socket.
fn send_request(fd: i32, offset: u64) -> c_int {
    let h = request_frame(offset);
    // SAFETY: writes HDR bytes from a live array to the socket fd.
    let n = unsafe { libc::write(fd, h.as_ptr().cast(), HDR) };
    if n == HDR as isize {
        0
    } else {
        -libc::EIO
    }
}

/// The receiver: reads replies and places each page with `place(offset, data)`.
fn receiver(mut s: TcpStream, place: impl Fn(u64, usize)) {
    let mut buf = vec![0u8; HDR + PAGE];
    while s.read_exact(&mut buf).is_ok() {
        let off = u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes"));
        place(off, buf.as_ptr() as usize + HDR);
    }
}

struct LibRemote {
    ctx: LibCtx,
    mem: Mapping,
    stream: TcpStream,
    _fd: Box<i32>,
    threads: Vec<JoinHandle<()>>,
    tids: Vec<u32>,
}

unsafe extern "C" fn request_over_tcp(
    opaque: *mut c_void,
    _rb: *mut RAMBlock,
    _idstr: *const c_char,
    req: *const PostcopyPageRequest,
) -> c_int {
    // SAFETY: `opaque` is the boxed socket fd registered with this callback (alive as long
    // as the context); `req` is the library's live request record.
    let (fd, req) = unsafe { (*(opaque as *const i32), &*req) };
    send_request(fd, req.offset)
}

impl LibRemote {
    fn new(pages: usize) -> LibRemote {
        let mem = Mapping::anon(pages * PAGE).expect("mmap");
        let ctx = LibCtx::new();
        let rb = ctx.add_block("bench.ram", mem.addr(), pages * PAGE, PAGE, -1);
        let (stream, src) = connect();
        let fd = Box::new(stream.as_raw_fd());
        ctx.set_request_callback(Some(request_over_tcp), &*fd as *const i32 as *mut c_void);
        let (mis, base, rb) = (ctx.mis as usize, mem.addr(), rb as usize);
        let rs = stream.try_clone().expect("clone socket");
        let recv = spawn_tid("bench-lib-recv", move || {
            receiver(rs, |off, data| {
                let rc = postcopy_place_page(
                    mis as *mut MigrationIncomingState,
                    (base + off as usize) as *mut c_void,
                    data as *mut c_void,
                    rb as *mut RAMBlock,
                );
                assert_eq!(rc, 0, "postcopy_place_page");
            })
        });
        LibRemote {
            ctx,
            mem,
            stream,
            _fd: fd,
            tids: vec![src.1, recv.1],
            threads: vec![src.0, recv.0],
        }
    }

    fn rep(&mut self, workers: &Workers, pages: usize, cpus: Cpus) -> RepResult {
        self.mem.touch(0, pages * PAGE, PAGE);
        self.ctx.setup();
        let ft = sys::find_thread(FAULT_THREAD).expect("the library's fault thread");
        pin(ft, cpus.handler).expect("pin the fault thread");
        pin_helpers(&self.tids, cpus.handler);
        let r = workers.run(self.mem.addr(), pages, cpus.worker);
        // The last placement's bookkeeping may still be finishing on the receiver.
        while self.ctx.stats().outstanding_requests > 0 {
            std::thread::yield_now();
        }
        self.ctx.cleanup();
        r
    }
}

impl Drop for LibRemote {
    fn drop(&mut self) {
        self.ctx.cleanup();
        let _ = self.stream.shutdown(Shutdown::Both);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

struct RawRemote {
    mem: Mapping,
    uffd: Arc<RawUffd>,
    stream: TcpStream,
    threads: Vec<JoinHandle<()>>,
    tids: Vec<u32>,
}

/// The raw request sender: poll + read + one 16-byte write per fault.
fn raw_requester(u: &RawUffd, quit: &EventFd, fd: i32, base: usize) {
    sys::raw_fault_loop(u, quit, |page| {
        assert_eq!(send_request(fd, (page - base) as u64), 0, "request write");
    });
}

impl RawRemote {
    fn new(pages: usize) -> RawRemote {
        let mem = Mapping::anon(pages * PAGE).expect("mmap");
        mem.touch(0, pages * PAGE, PAGE);
        let uffd = Arc::new(RawUffd::open().expect("userfaultfd"));
        uffd.register(mem.addr(), pages * PAGE)
            .expect("UFFDIO_REGISTER");
        let (stream, src) = connect();
        let base = mem.addr();
        let rs = stream.try_clone().expect("clone socket");
        let u = uffd.clone();
        let recv = spawn_tid("bench-raw-recv", move || {
            receiver(rs, |off, data| {
                u.copy(base + off as usize, data, PAGE)
                    .expect("UFFDIO_COPY");
            })
        });
        RawRemote {
            mem,
            uffd,
            stream,
            tids: vec![src.1, recv.1],
            threads: vec![src.0, recv.0],
        }
    }

    /// One repetition, with a request sender started for it (as the library's fault
    /// thread is started by each setup).
    fn rep(&self, workers: &Workers, pages: usize, cpus: Cpus) -> RepResult {
        self.mem
            .warm_and_drop(0, pages * PAGE, PAGE)
            .expect("drop pages");
        let (u, fd, base) = (self.uffd.clone(), self.stream.as_raw_fd(), self.mem.addr());
        let sender = Handler::spawn("bench-raw-req", move |quit| {
            raw_requester(&u, quit, fd, base)
        });
        pin(sender.tid, cpus.handler).expect("pin the request sender");
        pin_helpers(&self.tids, cpus.handler);
        workers.run(self.mem.addr(), pages, cpus.worker)
    }
}

impl Drop for RawRemote {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Both);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

pub fn run(opts: &Opts) -> Vec<Row> {
    let cpu = opts.cpu;
    let mut rows = Vec::new();
    let same = Cpus {
        worker: Some(cpu),
        handler: Some(cpu),
    };
    let anywhere = Cpus {
        worker: None,
        handler: None,
    };
    for (id, label, cpus) in [
        ("3a", format!("all threads on CPU {cpu}"), same),
        ("3b", "unpinned".to_string(), anywhere),
    ] {
        eprintln!("  remote faults over TCP loopback, {label} ...");
        rows.extend(variant(opts, id, &label, cpus));
    }
    rows
}

fn variant(opts: &Opts, id: &str, label: &str, cpus: Cpus) -> Vec<Row> {
    let pages = opts.remote_faults;
    let workers = Workers::new(1);
    let mut lib = LibRemote::new(pages);
    let raw = RawRemote::new(pages);
    let pair = || [Reps::default(), Reps::default()];
    let (mut p50, mut p99, mut rate, mut cpu) = (pair(), pair(), pair(), pair());
    for rep in 0..=opts.fault_reps {
        // Which side goes first alternates (see fault.rs).
        let (mut l, mut r) = if rep % 2 == 0 {
            let l = lib.rep(&workers, pages, cpus);
            (l, raw.rep(&workers, pages, cpus))
        } else {
            let r = raw.rep(&workers, pages, cpus);
            (lib.rep(&workers, pages, cpus), r)
        };
        if rep == 0 {
            continue;
        }
        for (i, x) in [&mut l, &mut r].into_iter().enumerate() {
            let (a, b) = x.p50_p99();
            p50[i].push(a / 1e3);
            p99[i].push(b / 1e3);
            rate[i].push(x.rate / 1e3);
            cpu[i].push(x.cpu_per_fault / 1e3);
        }
    }
    let [lp50, rp50] = p50;
    let [lp99, rp99] = p99;
    let [lrate, rrate] = rate;
    let [lcpu, rcpu] = cpu;
    vec![
        Row::new(
            id,
            &format!("remote fault p50 (TCP loopback, 16 B request, 4 KiB reply), {label}"),
            "us",
            lp50,
            Some(rp50),
            Goal::RatioAtMost(1.2),
        ),
        Row::new(
            id,
            &format!("remote fault p99, {label}"),
            "us",
            lp99,
            Some(rp99),
            Goal::None,
        ),
        Row::new(
            id,
            &format!("remote fault rate, {label}"),
            "kfaults/s",
            lrate,
            Some(rrate),
            Goal::None,
        ),
        Row::new(
            id,
            &format!("remote fault CPU time per fault (all threads, source included), {label}"),
            "us",
            lcpu,
            Some(rcpu),
            Goal::None,
        ),
    ]
}
