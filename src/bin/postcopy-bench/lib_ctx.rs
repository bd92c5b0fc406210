//! The library side: a destination driven through postcopy-ram's C entrypoints and its
//! standalone host, exactly as a C VMM would (c-tests/engine.c does the same in C).
use postcopy_ram::ffi::host_ops::postcopy_host_unregister;
use postcopy_ram::ffi::incoming::{
    postcopy_incoming_get_stats, postcopy_ram_incoming_cleanup, postcopy_ram_incoming_init,
    postcopy_ram_incoming_setup, postcopy_ram_prepare_discard, PostcopyIncomingStats,
};
use postcopy_ram::ffi::standalone::{
    postcopy_standalone_add_ram_block, postcopy_standalone_add_vcpu,
    postcopy_standalone_discard_range, postcopy_standalone_host_free,
    postcopy_standalone_host_install, postcopy_standalone_host_new,
    postcopy_standalone_set_capabilities, postcopy_standalone_set_request_callback,
    PostcopyRequestFn, PostcopyStandaloneHost,
};
use postcopy_ram::ffi::types::{MigrationIncomingState, RAMBlock};
use std::ffi::{c_void, CString};

/// Name of the library's fault thread (its comm), to pin it.
pub const FAULT_THREAD: &str = "mig/dst/fault";

/// One standalone host, installed, with its blocks and one `MigrationIncomingState`.
pub struct LibCtx {
    pub host: *mut PostcopyStandaloneHost,
    pub mis: *mut MigrationIncomingState,
    set_up: bool,
}

fn check(what: &str, rc: i32) {
    assert!(
        rc == 0,
        "{what} failed: {rc} ({})",
        std::io::Error::from_raw_os_error(-rc)
    );
}

impl LibCtx {
    pub fn new() -> LibCtx {
        let host = postcopy_standalone_host_new(0);
        assert!(!host.is_null(), "postcopy_standalone_host_new");
        check(
            "postcopy_standalone_host_install",
            postcopy_standalone_host_install(host),
        );
        // A C VMM passes its own MigrationIncomingState; any unique address will do. One
        // word leaked per context keeps every address distinct for the library's table.
        let mis = Box::leak(Box::new(0u64)) as *mut u64 as *mut MigrationIncomingState;
        LibCtx {
            host,
            mis,
            set_up: false,
        }
    }

    pub fn add_block(
        &self,
        name: &str,
        addr: usize,
        len: usize,
        page_size: usize,
        fd: i32,
    ) -> *mut RAMBlock {
        let cname = CString::new(name).expect("block name");
        let rb = postcopy_standalone_add_ram_block(
            self.host,
            cname.as_ptr(),
            addr as *mut c_void,
            len as u64,
            page_size as u64,
            fd,
            0,
        );
        assert!(!rb.is_null(), "postcopy_standalone_add_ram_block({name})");
        rb
    }

    pub fn set_request_callback(&self, cb: PostcopyRequestFn, opaque: *mut c_void) {
        check(
            "postcopy_standalone_set_request_callback",
            postcopy_standalone_set_request_callback(self.host, cb, opaque),
        );
    }

    pub fn set_blocktime(&self, on: bool) {
        check(
            "postcopy_standalone_set_capabilities",
            postcopy_standalone_set_capabilities(self.host, on, false),
        );
    }

    pub fn add_vcpu(&self, index: u32, tid: u32) {
        check(
            "postcopy_standalone_add_vcpu",
            postcopy_standalone_add_vcpu(self.host, index, tid),
        );
    }

    /// init (which discards every block: the pages are missing afterwards),
    /// prepare_discard, setup: the fault thread runs when this returns.
    pub fn setup(&mut self) {
        check(
            "postcopy_ram_incoming_init",
            postcopy_ram_incoming_init(self.mis),
        );
        check(
            "postcopy_ram_prepare_discard",
            postcopy_ram_prepare_discard(self.mis),
        );
        check(
            "postcopy_ram_incoming_setup",
            postcopy_ram_incoming_setup(self.mis),
        );
        self.set_up = true;
    }

    pub fn cleanup(&mut self) {
        if std::mem::take(&mut self.set_up) {
            check(
                "postcopy_ram_incoming_cleanup",
                postcopy_ram_incoming_cleanup(self.mis),
            );
        }
    }

    /// An incoming discard: clears the received bits and drops the memory.
    pub fn discard(&self, rb: *mut RAMBlock, start: usize, len: usize) {
        check(
            "postcopy_standalone_discard_range",
            postcopy_standalone_discard_range(self.host, rb, start as u64, len as u64),
        );
    }

    pub fn stats(&self) -> PostcopyIncomingStats {
        let mut st = PostcopyIncomingStats::default();
        check(
            "postcopy_incoming_get_stats",
            postcopy_incoming_get_stats(self.mis, &mut st),
        );
        st
    }
}

impl Drop for LibCtx {
    fn drop(&mut self) {
        self.cleanup();
        postcopy_host_unregister();
        postcopy_standalone_host_free(self.host);
    }
}
